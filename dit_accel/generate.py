"""Generating with acceleration: what ``dit-accel generate`` does once its options are parsed.

:func:`run_generate` loads a pipeline (the shipped testbed, a local diffusers folder or a hub id), applies an
acceleration preset or method, generates, writes an mp4 (or PNG for image models) and appends one JSON line
to a run log; with ``compare`` it also generates with the stock pipeline from the same seed and writes both
side by side. :mod:`dit_accel.prompts_file` runs it once per prompt of a prompts file. Torch and diffusers
are imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import inspect
import json
import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

COMPARE_LABEL = "dense (stock)"
"""How ``--compare`` names the reference: the pipeline as loaded, nothing applied."""


class CLIError(Exception):
    """A user error: printed as one line, exit code 2, no traceback."""


@dataclass
class GenerateArgs:
    """Parsed and validated arguments of ``dit-accel generate``."""

    model: str
    """``testbed``, a local diffusers pipeline folder or a hub id."""
    prompt: str
    """The text prompt."""
    negative_prompt: str | None
    """Negative prompt, for pipelines that take one."""
    height: int | None
    """Pixels; ``None`` keeps the pipeline's default."""
    width: int | None
    """Pixels; ``None`` keeps the pipeline's default."""
    frames: int | None
    """Frames (video pipelines); ``None`` keeps the pipeline's default."""
    steps: int | None
    """Denoising steps; ``None`` keeps the pipeline's default."""
    guidance: float | None
    """Classifier-free guidance scale; ``None`` keeps the pipeline's default."""
    seed: int
    """Seed of the CPU generator that draws the initial noise."""
    preset: str | None
    """Preset name; ``dense`` when no preset, attention or cache is given."""
    attention: str | None
    """Attention method overriding the preset's."""
    cache: str | None
    """Cache scheduler overriding the preset's."""
    token_order: str
    """Where the tile permutation runs (``auto``, ``forward``, ``call``)."""
    precision: str | None
    """Block-sparse kernel precision (``bf16``, ``fp8``); ``None`` keeps the preset's or method's."""
    output: Path
    """The .mp4 or .png to write."""
    fps: int
    """Frames per second of the mp4."""
    device: str
    """``auto``, ``cpu`` or ``cuda``."""
    dtype: str
    """``auto`` or a floating dtype name."""
    log: Path
    """JSONL run log to append to."""
    overwrite: bool
    """Replace ``output`` if it exists."""
    compare: bool = False
    """Also generate with the stock pipeline and write both side by side."""
    warmup_steps: int = 2
    """With ``compare``: steps of the untimed warm-up generation of each side (0: none)."""
    prompts_file: Path | None = None
    """One prompt per line, generated over the launched processes (``dit_accel.prompts_file``)."""


def _call_kwargs(pipe: Any, args: GenerateArgs, generator: Any, steps: int | None = None) -> dict[str, Any]:
    """Keyword arguments for ``pipe(...)``, passing only what this pipeline's ``__call__`` accepts."""
    params = inspect.signature(pipe.__call__).parameters
    wanted: dict[str, Any] = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "height": args.height,
        "width": args.width,
        "num_frames": args.frames,
        "num_inference_steps": steps if steps is not None else args.steps,
        "guidance_scale": args.guidance,
    }
    kwargs: dict[str, Any] = {"generator": generator, "output_type": "np"}
    for name, value in wanted.items():
        if value is None:
            continue
        if name not in params:
            flag = {"num_frames": "--frames", "num_inference_steps": "--steps", "guidance_scale": "--guidance"}.get(
                name, "--" + name.replace("_", "-")
            )
            raise CLIError(f"{flag} is not supported by {type(pipe).__name__} (it takes no {name!r} argument)")
        kwargs[name] = value
    return kwargs


def planned_frames(pipe: Any, frames: int | None) -> int | None:
    """Frames one call of ``pipe`` will make: ``frames`` (``--frames``) when given, else the ``num_frames``
    default of its ``__call__``; 1 for a pipeline without ``num_frames`` (an image pipeline); ``None`` when the
    default is not a number (the pipeline decides while generating)."""
    params = inspect.signature(pipe.__call__).parameters
    if "num_frames" not in params:
        return 1
    if frames is not None:
        return frames
    default = params["num_frames"].default
    return default if isinstance(default, int) and not isinstance(default, bool) else None


def check_png_output(output: Path, frames: int | None, source: str) -> None:
    """Raise :class:`CLIError` when ``output`` is a ``.png`` but ``frames`` (from ``source``) is more than one, so the
    refusal comes before the generation rather than after it."""
    if output.suffix.lower() == ".png" and frames is not None and frames > 1:
        raise CLIError(f"a .png output holds one image, but {source} makes {frames} frames: write .mp4, or pass --frames 1")


def _frames_of(output: Any) -> Any:
    """The generated frames as a float array (T, H, W, 3) in [0, 1], for video and image pipelines alike."""
    import numpy as np

    if hasattr(output, "frames"):
        frames = np.asarray(output.frames[0])
    elif hasattr(output, "images"):
        frames = np.asarray(output.images[0])[None]
    else:
        raise CLIError(f"pipeline output {type(output).__name__} has neither .frames nor .images")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise CLIError(f"unexpected frame array shape {frames.shape}; expected (T, H, W, 3)")
    return frames


def write_media(frames: Any, path: Path, fps: int) -> Path:
    """:func:`dit_accel.media.write_media`, with its user errors (a .png of several frames) as CLIError."""
    from dit_accel.media import write_media as write

    try:
        return write(frames, path, fps)
    except ValueError as err:
        raise CLIError(str(err)) from err


def versions() -> dict[str, str]:
    """Versions of python, torch, diffusers, triton and dit-accel, for run logs and ``dit-accel info``."""
    import diffusers
    import torch

    found = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__}
    try:
        import triton

        found["triton"] = triton.__version__
    except ImportError:
        found["triton"] = "not installed"
    found["dit_accel"] = _package_version()
    return found


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dit-accel")
    except PackageNotFoundError:
        return "unknown (not installed)"


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one JSON line to ``path`` (folders created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=str) + "\n")


@dataclass
class _Generation:
    frames: Any
    seconds: float
    step_s: list[float]
    call: dict[str, Any]


def _generate_once(pipe: Any, args: GenerateArgs, device: Any, steps: int | None = None) -> _Generation:
    """One timed generation from ``args.seed`` (``steps`` overrides ``args.steps``, for warm-ups)."""
    import torch

    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    kwargs = _call_kwargs(pipe, args, generator, steps)
    step_times: list[float] = []
    if "callback_on_step_end" in inspect.signature(pipe.__call__).parameters:

        def _on_step_end(_pipe: Any, _i: int, _t: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_times.append(time.perf_counter())
            return callback_kwargs

        kwargs["callback_on_step_end"] = _on_step_end
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            output = pipe(**kwargs)
    except ValueError as err:
        # Pipelines validate sizes and prompts (e.g. the testbed's vocabulary) when called.
        raise CLIError(str(err)) from err
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    per_step = [b - a for a, b in zip([t0] + step_times[:-1], step_times)]
    call = {k: v for k, v in kwargs.items() if k not in ("generator", "callback_on_step_end", "prompt")}
    return _Generation(_frames_of(output), seconds, [round(s, 4) for s in per_step], call)


def accelerated_label(acceleration: dict[str, Any], args: GenerateArgs) -> str:
    """A short name for an applied configuration: the preset tag and what ``--attention`` / ``--cache`` changed."""
    parts = [str(acceleration["preset"])] if acceleration.get("preset") else []
    without_preset = not parts
    for kind in ("attention", "cache"):
        if getattr(args, kind) is not None or without_preset:
            parts.append(f"{kind} {acceleration.get(kind) or 'none'}")
    return ", ".join(parts)


def run_generate(args: GenerateArgs, pipe: Any | None = None, write_log: bool = True) -> dict[str, Any]:
    """Load (unless ``pipe`` is given), accelerate, generate, write the media and (``write_log``) the run-log
    line; return the log record.

    With ``args.compare`` the stock pipeline generates first from the same seed, each side after an
    untimed warm-up of ``args.warmup_steps`` steps, and the output shows both side by side.
    """
    import torch

    from dit_accel import api
    from dit_accel.loading import load_pipeline, resolve_device_dtype

    try:
        device, dtype = resolve_device_dtype(args.device, args.dtype)
        t0 = time.perf_counter()
        if pipe is None:
            pipe = load_pipeline(args.model, device, dtype)
    except ValueError as err:
        raise CLIError(str(err)) from err
    load_s = time.perf_counter() - t0
    check_png_output(args.output, planned_frames(pipe, args.frames),
                     "--frames" if args.frames is not None else f"{type(pipe).__name__} by default")
    if hasattr(pipe, "set_progress_bar_config") and args.compare:
        pipe.set_progress_bar_config(desc=COMPARE_LABEL)

    dense: _Generation | None = None
    if args.compare:
        if args.warmup_steps:
            _generate_once(pipe, args, device, steps=args.warmup_steps)
        dense = _generate_once(pipe, args, device)

    try:
        handle = api.apply(pipe, preset=args.preset, attention=args.attention, cache=args.cache,
                                 token_order=args.token_order, precision=args.precision)
    except (ValueError, TypeError) as err:
        raise CLIError(str(err)) from err
    acceleration = handle.summary()
    label = accelerated_label(acceleration, args)
    try:
        if hasattr(pipe, "set_progress_bar_config") and args.compare:
            pipe.set_progress_bar_config(desc=label)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if args.compare and args.warmup_steps:
            _generate_once(pipe, args, device, steps=args.warmup_steps)
            handle.reset_stats()
        run = _generate_once(pipe, args, device)
        attention_stats = handle.stats_summary()
        cache_stats = handle.cache_summary()
    finally:
        api.remove(pipe)

    record: dict[str, Any] = {
        "event": "compare" if args.compare else "generate",
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": args.model,
        "prompt": args.prompt,
        "seed": args.seed,
        "frames_shape": list(run.frames.shape),
        "call": run.call,
        "acceleration": acceleration,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type,
        "dtype": str(dtype).replace("torch.", ""),
        "versions": versions(),
        "load_s": round(load_s, 3),
        "generate_s": round(run.seconds, 3),
        "step_s": run.step_s,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None,
        "attention_stats": attention_stats,
        "cache_stats": cache_stats,
    }
    if dense is None:
        written = write_media(run.frames, args.output, args.fps)
    else:
        from dit_accel.media import psnr_db, side_by_side

        speedup = dense.seconds / run.seconds
        psnr = psnr_db(dense.frames, run.frames)
        video = side_by_side(
            dense.frames, run.frames,
            [COMPARE_LABEL, f"{dense.seconds:.1f} s"],
            [label, f"{run.seconds:.1f} s, {speedup:.2f}x"],
        )
        written = write_media(video, args.output, args.fps)
        record.update({
            "label": label,
            "warmup_steps": args.warmup_steps,
            "dense_generate_s": round(dense.seconds, 3),
            "dense_step_s": dense.step_s,
            "speedup": round(speedup, 4),
            "psnr_db": None if psnr == float("inf") else round(psnr, 3),
        })
    record["output"] = str(written)
    record["log"] = str(args.log)
    if write_log:
        append_jsonl(args.log, record)
    return record


def compare_summary(record: dict[str, Any]) -> str:
    """The lines ``generate --compare`` prints: both times, the speed-up, the PSNR and the files written."""
    psnr = "identical frames" if record["psnr_db"] is None else f"PSNR {record['psnr_db']:.1f} dB vs dense"
    warm = f"after a {record['warmup_steps']}-step warm-up each" if record["warmup_steps"] else "no warm-up"
    return (
        f"{COMPARE_LABEL}: {record['dense_generate_s']:.1f} s; {record['label']}: {record['generate_s']:.1f} s "
        f"({warm}, same seed {record['seed']})\n"
        f"speed-up {record['speedup']:.2f}x, {psnr}\n"
        f"wrote {record['output']} (left: dense, right: {record['label']}, {record['frames_shape'][0]} frames); "
        f"log: {record['log']}"
    )


def cpu_sparse_note(record: dict[str, Any]) -> str | None:
    """A note when sparse attention ran on a CPU, where it is a slow torch reference, not the Triton kernel."""
    stats = record.get("attention_stats") or {}
    if record.get("device_type") == "cpu" and stats.get("sparse_calls"):
        return ("note: on CPU, block-sparse attention runs its torch reference (slower than dense attention); "
                "its speed-up needs a CUDA GPU, where the Triton kernel runs. Feature caching saves time on CPU too.")
    return None
