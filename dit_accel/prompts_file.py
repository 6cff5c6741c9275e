"""``dit-accel generate --prompts-file``: many prompts, one pipeline load per process, spread over processes.

    dit-accel generate --prompts-file prompts.txt --preset balanced -o outputs/clip.mp4            # one process
    accelerate launch --multi_gpu --num_processes 2 -m dit_accel.cli generate --prompts-file prompts.txt ...  # two GPUs
    torchrun --nproc-per-node 2 -m dit_accel.cli generate --prompts-file prompts.txt ...

* The prompts file holds one prompt per line (blank lines skipped). Prompt ``i`` (0-based, counting prompts)
  gets the seed ``--seed + i`` and the output ``OUTPUT`` with ``_{i:04d}`` before its suffix
  (``outputs/clip_0000.mp4``), whatever the number of processes: 1 or N processes write the same files.
* accelerate's ``PartialState`` reads the launcher's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``; set by
  ``accelerate launch`` and by ``torchrun``), initialises the process group and puts each process on its own
  GPU; ``split_between_processes`` gives process ``r`` a contiguous share of the prompt indices (the first
  ``len % N`` processes one more). Without a launcher it is one process with every prompt. On a CPU-only machine
  ``accelerate launch --cpu`` starts a single process (its multi-CPU mode needs MPI): use ``torchrun`` there.
* Each process loads the pipeline once, generates its share and writes its media files. The run-log records
  are gathered on every process (``gather_object``); rank 0 appends them to the run log in prompt order,
  then one summary line, and prints the summary.
* A failing prompt does not stop the others or leave the other processes waiting: its record has
  ``"event": "error"`` and the exit code is 1.

Each process runs the whole model on its prompts (no communication inside a generation): the feature cache
decides per process, since its transformer has no context-parallel group
(:func:`dit_accel.parallel.context_parallel.context_parallel_group`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dit_accel.generate import CLIError, GenerateArgs, append_jsonl, run_generate
from dit_accel.loading import load_pipeline, resolve_device_dtype

logger = logging.getLogger("dit_accel")


def read_prompts(path: Path) -> list[str]:
    """The prompts of ``path``: one per line, surrounding whitespace stripped, blank lines skipped.

    Raises :class:`~dit_accel.generate.CLIError` when the file cannot be read or holds no prompt.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise CLIError(f"cannot read --prompts-file {str(path)!r}: {err.strerror or err}") from err
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise CLIError(f"--prompts-file {str(path)!r} holds no prompt (one prompt per line)")
    return prompts


def indexed_output(output: Path, index: int) -> Path:
    """Output path of prompt ``index``: ``OUTPUT`` with ``_{index:04d}`` before the suffix."""
    return output.with_name(f"{output.stem}_{index:04d}{output.suffix}")


def _generate_share(args: GenerateArgs, prompts: list[str], outputs: list[Path], share: list[int],
                    rank: int, main: bool) -> list[dict[str, Any]]:
    """Load the pipeline once and generate the prompts ``share``; one record per prompt (errors included), its
    ``load_s`` being this process's pipeline load time."""
    records: list[dict[str, Any]] = []
    start = time.perf_counter()
    try:
        device, dtype = resolve_device_dtype(args.device, args.dtype)
        pipe = load_pipeline(args.model, device, dtype) if share else None
    except Exception as err:  # noqa: BLE001 - reported for every prompt of the share, then gathered
        logger.error("rank %d: could not load %s: %s", rank, args.model, err)
        return [{"event": "error", "index": i, "rank": rank, "prompt": prompts[i], "error": f"{type(err).__name__}: {err}"}
                for i in share]
    load_s = round(time.perf_counter() - start, 3)
    if pipe is not None and not main and hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)  # one progress bar (rank 0's) on the console
    for i in share:
        one = dataclasses.replace(args, prompt=prompts[i], seed=args.seed + i, output=outputs[i], prompts_file=None)
        try:
            record = run_generate(one, pipe=pipe, write_log=False) | {"load_s": load_s}
        except Exception as err:  # noqa: BLE001 - the other prompts and processes go on
            logger.exception("rank %d: prompt %d failed", rank, i)
            record = {"event": "error", "prompt": prompts[i], "seed": one.seed, "error": f"{type(err).__name__}: {err}"}
        records.append({"index": i, "rank": rank, **record})
    return records


def run_prompts_file(args: GenerateArgs) -> int:
    """Generate every prompt of ``args.prompts_file`` over the launched processes (see the module docstring);
    return the exit code (0, or 1 when a prompt failed). Raises :class:`~dit_accel.generate.CLIError` on bad input,
    before any process generates."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    if args.prompts_file is None:
        raise CLIError("run_prompts_file needs --prompts-file")
    prompts = read_prompts(args.prompts_file)
    outputs = [indexed_output(args.output, i) for i in range(len(prompts))]
    existing = [str(o) for o in outputs if o.exists()]
    if existing and not args.overwrite:
        # Every process checks every output, so all of them stop here alike, before any collective.
        raise CLIError(f"{len(existing)} output(s) exist, e.g. {existing[0]!r}; pass --overwrite or choose another --output")

    try:
        device, _ = resolve_device_dtype(args.device, args.dtype)
    except ValueError as err:
        raise CLIError(str(err)) from err
    start = time.perf_counter()
    # On CPU accelerate needs cpu=True to form a (gloo) process group from the launcher's environment.
    state = PartialState(cpu=device.type == "cpu")
    with state.split_between_processes(list(range(len(prompts)))) as share:
        share = list(share)
    records = _generate_share(args, prompts, outputs, share, state.process_index, state.is_main_process)
    everything = sorted(gather_object(records), key=lambda r: r["index"])
    failed = [r["index"] for r in everything if r.get("event") == "error"]
    if state.is_main_process:
        for record in everything:
            append_jsonl(args.log, record)
        per_process: dict[int, int] = {}
        for record in everything:
            per_process[record["rank"]] = per_process.get(record["rank"], 0) + 1
        summary = {
            "event": "generate_prompts",
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "prompts_file": str(args.prompts_file),
            "prompts": len(prompts),
            "processes": state.num_processes,
            "prompts_per_process": per_process,
            "failed": failed,
            "outputs": [str(outputs[r["index"]]) for r in everything if r.get("event") != "error"],
            "wall_s": round(time.perf_counter() - start, 3),
        }
        append_jsonl(args.log, summary)
        print(f"wrote {len(prompts) - len(failed)} of {len(prompts)} prompt(s) on {state.num_processes} process(es) "
              f"({summary['wall_s']:.1f} s); log: {args.log}" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


__all__ = ["indexed_output", "read_prompts", "run_prompts_file"]
