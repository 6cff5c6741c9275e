"""Step 1 of the schedule search: measure what reusing (or forecasting) earlier span residuals would cost.

Dense generations run on the calibration prompts with a recorder on the blocks: at every step and guidance
branch the residual of the cacheable span ``R_t`` (span output minus span input) is compared with the
residuals of the previous ``max_consecutive_reuse + 1`` steps. The cost of reusing step ``s``'s residual at
step ``t`` is::

    c(s, t) = dt_t * mean|R_t - R_s| / mean_t(mean|R_t|)

(``dt_t`` the sampler's sigma step, so errors count as much as they move the latent), averaged over prompts,
branches and transformers; for order 1 the error of the linear forecast from two computed steps is measured
the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from dit_accel.api import AccelHandle
from dit_accel.caching.base import CacheConfig, CacheScheduler, CacheState, Streams
from dit_accel.caching.blocks import find_blocks
from dit_accel.caching.controller import CacheController
from dit_accel.caching.hooks import install_controller
from dit_accel.calibration.settings import SearchSettings

CostFn = Callable[[int, int, int], "float | None"]
"""``cost(prev, last, u)``: cost of step ``u`` reused after computed steps ``prev < last``
(``prev = -1`` when ``last`` is the first computed step); ``None`` when unknown (not allowed)."""

Prompt = str | dict[str, Any]
"""A calibration prompt, or keyword arguments for the pipeline (e.g. ``prompt_embeds``)."""


@dataclass
class PromptRunner:
    """Runs the pipeline on calibration prompts (prompt ``i`` with seed ``seed + i``) and returns their outputs."""

    pipe: Any
    """The diffusers pipeline."""
    num_steps: int
    """Denoising steps of every run."""
    seed: int = 0
    """Base seed."""
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra pipeline arguments (size, guidance, ...)."""
    batch_size: int = 1
    """Text prompts generated per pipeline call (one generator per prompt, so a prompt's initial noise is the same
    in any batch); keyword-argument prompts always run alone."""
    output_type: str = "latent"
    """``"latent"`` (final latents) or ``"pt"`` (decoded frames in [0, 1])."""

    def __call__(self, i: int, prompt: Prompt) -> torch.Tensor:
        """Output (float32) of prompt ``i``."""
        return self._run([(i, prompt)])[0]

    def run_all(self, prompts: Sequence[Prompt]) -> list[torch.Tensor]:
        """Outputs (float32) of every prompt, in order, ``batch_size`` text prompts per pipeline call."""
        out: list[torch.Tensor] = []
        batch: list[tuple[int, Prompt]] = []
        for i, p in enumerate(prompts):
            if isinstance(p, dict):
                out += self._run(batch) + self._run([(i, p)])
                batch = []
                continue
            batch.append((i, p))
            if len(batch) == self.batch_size:
                out += self._run(batch)
                batch = []
        return out + self._run(batch)

    def _run(self, batch: list[tuple[int, Prompt]]) -> list[torch.Tensor]:
        if not batch:
            return []
        kwargs = dict(self.call_kwargs)
        first = batch[0][1]
        if isinstance(first, dict):
            kwargs.update(first)
        else:
            kwargs["prompt"] = [p for _, p in batch] if len(batch) > 1 else first
        kwargs.setdefault("output_type", self.output_type)
        gens = [torch.Generator().manual_seed(self.seed + i) for i, _ in batch]
        result = self.pipe(num_inference_steps=self.num_steps, generator=gens if len(gens) > 1 else gens[0], **kwargs)
        sample = sample_of(result).detach().float()
        return list(sample) if len(batch) > 1 else [sample[0] if sample.shape[0] == 1 else sample]


def sample_of(result: Any) -> torch.Tensor:
    """The generated tensor of a pipeline result (latents with ``output_type="latent"``)."""
    if isinstance(result, tuple):
        return result[0]
    for attr in ("frames", "images", "videos"):
        value = getattr(result, attr, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"cannot find the output tensor in {type(result).__name__}; pass output_type='latent'")


class Measurements:
    """Residual magnitudes and reuse/forecast errors, listed over prompts, branches and transformers."""

    def __init__(self) -> None:
        self.scale: dict[int, list[float]] = {}
        """Step -> mean|R_t| of each run and branch."""
        self.err: dict[tuple[int, ...], list[float]] = {}
        """``(s, t)`` or ``(s0, s1, t)`` -> errors of reusing ``R_s`` / forecasting from ``s0, s1`` at ``t``."""

    def add(self, step: int, scale: float, errors: dict[tuple[int, ...], float]) -> None:
        """Record one step of one run and branch."""
        self.scale.setdefault(step, []).append(scale)
        for key, v in errors.items():
            self.err.setdefault(key + (step,), []).append(v)


@dataclass
class RecorderState(CacheState):
    """The recent span residuals of one branch in the generation being measured."""

    history: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    """``(step, residual)`` of the last steps, oldest first."""


class ReuseErrorRecorder(CacheScheduler):
    """Computes every step; measures what reusing (or forecasting) earlier residuals would cost.

    At step ``t`` with span residual ``R_t`` and the residuals of the previous steps in a window:
    ``e0(s, t) = mean|R_t - R_s|`` for ``t - s <= gap`` and, for order 1, the error of the linear
    forecast from two computed steps ``s0 < s1``: ``e1(s0, s1, t) = mean|R_t - F|`` with
    ``F = R_s1 + (R_s1 - R_s0) (t - s1) / (s1 - s0)``, for ``s1 - s0 <= gap`` and ``t - s1 <= gap``.
    """

    name = "_recorder"
    config_class = CacheConfig
    state_class = RecorderState

    def __init__(self, config: CacheConfig, num_blocks: int, gap: int, order: int, token_stride: int,
                 sink: Measurements) -> None:
        super().__init__(config, num_blocks)
        self.gap = gap
        self.forecast_order = order
        self.token_stride = token_stride
        self.sink = sink

    def guardrail(self, info, state) -> str | None:
        """Never reuse."""
        return "calibration"

    def decide(self, info, state):  # pragma: no cover - guardrail always forces compute
        """Never called: :meth:`guardrail` makes every step compute, so there is no reuse to decide."""
        raise AssertionError("unreachable")

    def store(self, state: RecorderState, end: int, residual: Streams, step: int) -> None:  # type: ignore[override]
        """Measure against the branch's window of previous residuals; keep no cached residual."""
        r = residual[0].detach()
        if self.token_stride > 1 and r.dim() >= 2:
            r = r[:, :: self.token_stride]
        r = r.float()
        past = dict(state.history)
        keys: list[tuple[int, ...]] = []
        values = [r.abs().mean()]
        for s1 in range(step - self.gap, step):
            if s1 not in past:
                continue
            keys.append((s1,))
            values.append((r - past[s1]).abs().mean())
            if self.forecast_order:
                for s0 in range(s1 - self.gap, s1):
                    if s0 in past:
                        forecast = past[s1] + (past[s1] - past[s0]) * ((step - s1) / (s1 - s0))
                        keys.append((s0, s1))
                        values.append((r - forecast).abs().mean())
        host = torch.stack(values).tolist()  # one host sync per step and branch
        self.sink.add(step, host[0], dict(zip(keys, host[1:])))
        state.history.append((step, r))
        del state.history[: -(2 * self.gap if self.forecast_order else self.gap)]


@dataclass
class ReuseCosts:
    """The measured costs, normalised: what the search minimises."""

    err: dict[tuple[int, ...], float]
    """``(s, t)`` / ``(s0, s1, t)`` -> ``dt_t * mean error / mean_t mean|R_t|``."""
    scale: list[float]
    """Mean residual magnitude per step."""

    def cost_fn(self, order: int) -> CostFn:
        """The cost of a reused step under forecast ``order`` (0: plain reuse of the last computed step)."""
        err = self.err

        def cost(prev: int, last: int, u: int) -> float | None:
            if order and prev >= 0:
                return err.get((prev, last, u))
            return err.get((last, u))

        return cost


def sigma_steps(pipe: Any, num_steps: int) -> list[float]:
    """The sampler's sigma step per denoising step (uniform when the scheduler has no sigmas)."""
    sigmas = getattr(getattr(pipe, "scheduler", None), "sigmas", None)
    if sigmas is None or len(sigmas) < num_steps + 1:
        return [1.0 / num_steps] * num_steps
    s = [float(v) for v in sigmas]
    return [abs(s[i] - s[i + 1]) for i in range(num_steps)]


def measure(pipe: Any, handle: AccelHandle, prompts: Sequence[Prompt], settings: SearchSettings,
            runner: PromptRunner) -> tuple[ReuseCosts, list[torch.Tensor], int]:
    """Run every prompt dense with the recorder on the blocks of every transformer of ``handle``; return the
    costs, the dense final latents and the number of blocks."""
    sink = Measurements()
    guard = settings.guard_config()
    attachments = []
    num_blocks = 0
    try:
        for name, context in handle.contexts.items():
            transformer = getattr(pipe, name) if hasattr(pipe, name) else pipe
            blocks = find_blocks(transformer)
            num_blocks = len(blocks)
            recorder = ReuseErrorRecorder(guard, num_blocks, settings.max_consecutive_reuse + 1, settings.measured_order,
                                          settings.token_stride, sink)
            attachments.append(install_controller(transformer, CacheController(name, context, recorder, blocks)))
        dense = runner.run_all(prompts)
        dts = sigma_steps(pipe, settings.num_steps)
    finally:
        for a in attachments:
            a.remove()
    if sorted(sink.scale) != list(range(settings.num_steps)):
        raise RuntimeError(f"calibration saw steps {sorted(sink.scale)}, expected 0..{settings.num_steps - 1}")
    scale = [_mean(sink.scale[t]) for t in range(settings.num_steps)]
    norm = max(_mean(scale), 1e-12)
    err = {key: dts[key[-1]] * _mean(values) / norm for key, values in sink.err.items()}
    return ReuseCosts(err, scale), dense, num_blocks


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
