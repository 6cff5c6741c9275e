"""The ``dit-accel`` command line.

``dit-accel generate`` loads a pipeline (the shipped testbed, a local diffusers folder or a hub id),
applies an acceleration preset or method, generates, writes an mp4 (or PNG for image models) and
appends one JSON line per run to a run log. ``dit-accel presets`` lists the shipped presets.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

logger = logging.getLogger("dit_accel")

from dit_accel.argtypes import non_negative_float, positive_int
from dit_accel.attention.token_order import TOKEN_ORDERS
from dit_accel.loading import DEVICES, DTYPES, TESTBED_MODEL


class CLIError(Exception):
    """A user error: printed as one line, exit code 2, no traceback."""


@dataclass
class GenerateArgs:
    """Parsed and validated arguments of ``dit-accel generate``."""

    model: str
    prompt: str
    negative_prompt: str | None
    height: int | None
    width: int | None
    frames: int | None
    steps: int | None
    guidance: float | None
    seed: int
    preset: str | None
    attention: str | None
    cache: str | None
    token_order: str
    precision: str | None
    output: Path
    fps: int
    device: str
    dtype: str
    log: Path
    overwrite: bool


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser for every ``dit-accel`` subcommand."""
    parser = argparse.ArgumentParser(
        prog="dit-accel",
        description="Training-free acceleration for diffusion transformers (diffusers).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level (backend choices, timings)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="generate a video or image with acceleration")
    gen.add_argument(
        "--model",
        default=TESTBED_MODEL,
        help="'testbed' (the shipped model, default), a local diffusers pipeline folder, or a hub id "
        "(loaded with DiffusionPipeline.from_pretrained; needs the weights locally or network access)",
    )
    gen.add_argument("--prompt", required=True, help="text prompt (for the testbed: a caption of its grammar)")
    gen.add_argument("--negative-prompt", default=None, help="negative prompt, if the pipeline takes one")
    gen.add_argument("--height", type=positive_int, default=None, help="pixels; default: the model's CPU/GPU default")
    gen.add_argument("--width", type=positive_int, default=None, help="pixels; default: the model's CPU/GPU default")
    gen.add_argument("--frames", type=positive_int, default=None, help="number of frames (video models only)")
    gen.add_argument("--steps", type=positive_int, default=None, help="denoising steps")
    gen.add_argument("--guidance", type=non_negative_float, default=None, help="classifier-free guidance scale")
    gen.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    gen.add_argument("--preset", default=None, help="speed preset name (see `dit-accel presets`)")
    gen.add_argument("--attention", default=None, help="attention method name; overrides the preset's")
    gen.add_argument("--cache", default=None, help="feature-cache scheduler name; overrides the preset's")
    gen.add_argument("--token-order", choices=TOKEN_ORDERS, default="auto",
                     help="where the 3D-tile token permutation runs: once per transformer forward (Wan family), "
                          "in every attention call, or auto (default: forward where supported)")
    gen.add_argument("--precision", choices=("bf16", "fp8"), default=None,
                     help="block-sparse kernel precision (default: the preset's or method's; fp8 falls back to bf16 "
                          "where the device has no 8-bit kernel, and the run log says why)")
    gen.add_argument("--output", "-o", type=Path, default=Path("outputs/out.mp4"), help="output .mp4 (video) or .png (image)")
    gen.add_argument("--fps", type=positive_int, default=8, help="frames per second of the mp4 (default 8)")
    gen.add_argument("--device", choices=DEVICES, default="auto", help="default: cuda if available, else cpu")
    gen.add_argument("--dtype", choices=DTYPES, default="auto", help="default: bfloat16 on cuda, float32 on cpu")
    gen.add_argument("--log", type=Path, default=None, help="JSONL run log to append to (default: OUTPUT with .jsonl)")
    gen.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")

    sub.add_parser("presets", help="list the shipped speed presets")

    from dit_accel.calibration import cli as calibrate_cmd

    cal = sub.add_parser("calibrate", help="search a feature-cache schedule for a model, step count and budget")
    calibrate_cmd.add_arguments(cal)

    from dit_accel.eval import cli as eval_cmd

    ev = sub.add_parser("eval", help="quality and speed of configurations vs dense over a prompt set, with a report")
    eval_cmd.add_arguments(ev)
    return parser


def _to_generate_args(ns: argparse.Namespace) -> GenerateArgs:
    output: Path = ns.output
    if output.suffix.lower() not in (".mp4", ".png"):
        raise CLIError(f"--output must end in .mp4 (video) or .png (image), got {str(output)!r}")
    if output.exists() and not ns.overwrite:
        # Refuse before generating, so no minutes of work are lost to a name clash.
        raise CLIError(f"{str(output)!r} exists; pass --overwrite to replace it or choose another --output")
    if ns.preset is None and ns.attention is None and ns.cache is None:
        ns.preset = "dense"
    return GenerateArgs(
        model=ns.model,
        prompt=ns.prompt,
        negative_prompt=ns.negative_prompt,
        height=ns.height,
        width=ns.width,
        frames=ns.frames,
        steps=ns.steps,
        guidance=ns.guidance,
        seed=ns.seed,
        preset=ns.preset,
        attention=ns.attention,
        cache=ns.cache,
        token_order=ns.token_order,
        precision=ns.precision,
        output=output,
        fps=ns.fps,
        device=ns.device,
        dtype=ns.dtype,
        log=ns.log if ns.log is not None else output.with_suffix(".jsonl"),
        overwrite=ns.overwrite,
    )


def _call_kwargs(pipe: Any, args: GenerateArgs, generator: Any) -> dict[str, Any]:
    """Keyword arguments for ``pipe(...)``, passing only what this pipeline's ``__call__`` accepts."""
    params = inspect.signature(pipe.__call__).parameters
    wanted: dict[str, Any] = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "height": args.height,
        "width": args.width,
        "num_frames": args.frames,
        "num_inference_steps": args.steps,
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
    """Write frames (T, H, W, 3) in [0, 1] to ``path`` (.mp4 or .png) atomically; return the written path.

    If encoding fails, the frames are kept as ``.npy`` beside ``path`` and the error is re-raised, so a
    finished generation is never lost.
    """
    import imageio.v2 as imageio
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    uint8 = (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        if path.suffix.lower() == ".png":
            if uint8.shape[0] != 1:
                raise CLIError(f"a .png output holds one image; this model made {uint8.shape[0]} frames: use .mp4")
            imageio.imwrite(tmp_name, uint8[0], format="png")
        else:
            # macro_block_size=1 keeps the exact size (the testbed's 128 px frames are fine either way).
            with imageio.get_writer(tmp_name, format="FFMPEG", fps=fps, codec="libx264", quality=8, macro_block_size=1) as w:
                for frame in uint8:
                    w.append_data(frame)
        # mkstemp creates the file 0600; give the output the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_name, 0o666 & ~umask)
        os.replace(tmp_name, path)
    except Exception:
        Path(tmp_name).unlink(missing_ok=True)
        rescue = path.with_suffix(".frames.npy")
        np.save(rescue, uint8)
        logger.error("could not write %s; the frames are saved in %s", path, rescue)
        raise
    return path


def _versions() -> dict[str, str]:
    import diffusers
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = "not installed"
    return versions


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=str) + "\n")


def run_generate(args: GenerateArgs) -> dict[str, Any]:
    """Load, accelerate, generate, write the media and the run-log line; return the log record."""
    import torch

    import dit_accel

    from dit_accel.loading import load_pipeline, resolve_device_dtype

    try:
        device, dtype = resolve_device_dtype(args.device, args.dtype)
        t0 = time.perf_counter()
        pipe = load_pipeline(args.model, device, dtype)
    except ValueError as err:
        raise CLIError(str(err)) from err
    load_s = time.perf_counter() - t0

    try:
        handle = dit_accel.apply(pipe, preset=args.preset, attention=args.attention, cache=args.cache,
                                 token_order=args.token_order, precision=args.precision)
    except (ValueError, TypeError) as err:
        raise CLIError(str(err)) from err

    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    kwargs = _call_kwargs(pipe, args, generator)
    step_times: list[float] = []
    if "callback_on_step_end" in inspect.signature(pipe.__call__).parameters:

        def _on_step_end(_pipe: Any, _i: int, _t: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_times.append(time.perf_counter())
            return callback_kwargs

        kwargs["callback_on_step_end"] = _on_step_end

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t1 = time.perf_counter()
    try:
        with torch.inference_mode():
            output = pipe(**kwargs)
    except ValueError as err:
        # Pipelines validate sizes and prompts (e.g. the testbed's vocabulary) when called.
        raise CLIError(str(err)) from err
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    generate_s = time.perf_counter() - t1
    frames = _frames_of(output)
    written = write_media(frames, args.output, args.fps)

    per_step = [b - a for a, b in zip([t1] + step_times[:-1], step_times)]
    record: dict[str, Any] = {
        "event": "generate",
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": args.model,
        "prompt": args.prompt,
        "seed": args.seed,
        "frames_shape": list(frames.shape),
        "call": {k: v for k, v in kwargs.items() if k not in ("generator", "callback_on_step_end", "prompt")},
        "acceleration": handle.summary(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(dtype).replace("torch.", ""),
        "versions": _versions(),
        "load_s": round(load_s, 3),
        "generate_s": round(generate_s, 3),
        "step_s": [round(s, 4) for s in per_step],
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None,
        "attention_stats": handle.stats_summary(),
        "cache_stats": handle.cache_summary(),
        "output": str(written),
    }
    _append_jsonl(args.log, record)
    dit_accel.remove(pipe)
    return record


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dit-accel`` console script; returns the process exit code."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if ns.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        if ns.command == "presets":
            from dit_accel.presets import get_preset, preset_names

            for name in preset_names():
                p = get_preset(name)
                print(f"{p.tag:<16} attention={p.attention} cache={p.cache}  {p.description}")
            return 0
        if ns.command == "eval":
            from dit_accel.eval import cli as eval_cmd

            return eval_cmd.run(ns)
        if ns.command == "calibrate":
            from dit_accel.calibration import cli as calibrate_cmd

            try:
                return calibrate_cmd.run(ns)
            except ValueError as err:
                raise CLIError(str(err)) from err
        if ns.command == "generate":
            args = _to_generate_args(ns)
            record = run_generate(args)
            print(
                f"wrote {record['output']} ({record['frames_shape'][0]} frames, "
                f"{record['generate_s']:.1f} s, preset {record['acceleration']['preset']}, "
                f"attention {record['acceleration']['attention']}, cache {record['acceleration']['cache']}); log: {args.log}"
            )
            return 0
    except CLIError as err:
        print(f"dit-accel: error: {err}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {ns.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
