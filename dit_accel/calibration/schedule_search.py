"""The offline schedule search behind ``dit-accel calibrate``: measure, search, refine, write.

1. *Measure* (:mod:`~dit_accel.calibration.measure`): dense generations with a recorder on the blocks give the
   cost of reusing (or forecasting) each earlier step's span residual at each step.
2. *Search* (:mod:`~dit_accel.calibration.search`): an exact dynamic programme picks the computed steps with
   the smallest total cost under the budget and the guardrails; part of the budget may buy selective steps.
3. *Refine* (:mod:`~dit_accel.calibration.refine`, optional): candidate schedules run for real; the one closest
   to dense is kept.
4. *Write* (:mod:`~dit_accel.calibration.write`): a schedule file that ``fixed`` and ``procache`` load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from dit_accel.api import apply, get_handle
from dit_accel.caching.schedule_file import save_schedule
from dit_accel.calibration.measure import Prompt, PromptRunner, measure
from dit_accel.calibration.refine import CandidateRuns, refine
from dit_accel.calibration.search import search
from dit_accel.calibration.settings import SearchSettings
from dit_accel.calibration.write import schedule_data


def calibrate(pipe: Any, prompts: Sequence[Prompt], *, out: str | Path | None = None, model_id: str = "unknown",
              call_kwargs: dict[str, Any] | None = None, **settings: Any) -> dict[str, Any]:
    """Search a cache schedule for ``pipe`` and return the schedule file's content (written to ``out`` unless
    ``None``).

    ``prompts``: calibration prompts; a dict is passed to the pipeline as keyword arguments instead (e.g.
    ``prompt_embeds`` for pipelines without a text encoder). ``model_id`` is recorded in the file (hub id, path
    or ``"testbed"``); ``call_kwargs`` are extra pipeline arguments (size, guidance, ...). ``settings`` are the
    fields of :class:`~dit_accel.calibration.settings.SearchSettings` (``num_steps`` and ``budget`` required).
    dit-accel's context is attached to ``pipe`` for the run when absent, and removed afterwards.
    """
    if not prompts:
        raise ValueError("calibrate needs at least one prompt")
    s = SearchSettings(**settings)
    runner = PromptRunner(pipe, s.num_steps, s.seed, dict(call_kwargs or {}))
    handle = get_handle(pipe)
    created_handle = handle is None
    if created_handle:
        handle = apply(pipe)
    try:
        costs, dense, num_blocks = measure(pipe, handle, prompts, s, runner)
        result = search(costs, s, num_blocks)
        schedule01, _, order = result.best
        runs = CandidateRuns(pipe, handle, prompts, runner, dense, s, costs, result)
        if s.refine > 0:
            schedule01, order = refine(runs, result, s)
    finally:
        if created_handle:
            handle.remove()
    data = schedule_data(s, result, costs, schedule01, order, num_blocks=num_blocks, model_id=model_id,
                         prompts=prompts, measured=runs.measured)
    if out is not None:
        save_schedule(data, out)
    return data
