"""The presets' cache schedules at other step counts: nearest-neighbour resampling against density resampling.

The shipped cache schedules were searched at 20 steps; a run of another length resamples them
(:func:`dit_accel.caching.schedule_file.resample_schedule`). This study runs each preset's cache schedule on the
shipped testbed, attention dense (the cache alone), at other step counts, resampled two ways: by nearest-neighbour
picking of the 20-step values (``nearest``) and by the density-following resampling that ships (``density``); per
row the compute fraction the run measured and the PSNR against the stock pipeline of the same prompt and seed.

    python benchmarks/cache_resample.py --steps 8 30 50 --prompts 4 --out benchmarks/results/cache_resample_cpu.json

CPU-sized by default (128x128 x 8 frames, guidance 1). Ctrl-C writes the rows done so far.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS = ("quality", "balanced", "fast", "turbo")


def nearest_resample(schedule: list[int], num_steps: int) -> list[int]:
    """Nearest-neighbour picking of a per-step schedule (first and last kept): the resampling compared against."""
    n = len(schedule)
    if n == num_steps:
        return list(schedule)
    scale = (n - 1) / (num_steps - 1)
    return [schedule[int(i * scale + 0.5)] for i in range(num_steps)]


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return 100.0 if mse == 0 else 10.0 * float(torch.log10(torch.tensor(1.0 / mse)))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every (steps, preset, resampling) row; writes ``args.out`` after each row."""
    import dit_accel
    from dit_accel.caching.registry import make_cache_config
    from dit_accel.caching.schedule_file import resample_schedule
    from dit_accel.eval import builtin_prompts
    from dit_accel.eval.harness import environment
    from dit_accel.presets import get_preset
    from dit_accel.testbed import load_testbed_pipeline

    torch.manual_seed(0)
    pipe = load_testbed_pipeline()
    pipe.set_progress_bar_config(disable=True)
    prompts = builtin_prompts(args.prompts, seed=args.seed)
    call = {"height": args.height, "width": args.width, "num_frames": args.frames, "guidance_scale": args.guidance,
            "output_type": "pt"}
    data: dict[str, Any] = {
        "benchmark": "cache_resample", "device": "cpu", "versions": environment("cpu")["versions"],
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "argv": sys.argv[1:],
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "what": "each preset's cache schedule (attention dense) resampled from 20 steps by nearest-neighbour picking "
                "or by the shipped density resampling; PSNR against the stock pipeline, same prompt and seed",
        "complete": False, "rows": [],
    }

    def generate(num_steps: int, prompt: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(args.seed)
        return pipe(prompt, num_inference_steps=num_steps, generator=g, **call).frames[0]

    def write() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=1) + "\n")

    try:
        for num_steps in args.steps:
            stock = [generate(num_steps, p) for p in prompts]
            for name in PRESETS:
                preset = get_preset(name)
                schedule = list(preset.cache_config["schedule"])
                for variant, resample in (("nearest", nearest_resample), ("density", resample_schedule)):
                    resampled = resample(schedule, num_steps)
                    config = make_cache_config(preset.cache, **dict(preset.cache_config, schedule=resampled))
                    handle = dit_accel.apply(pipe, attention="dense", cache=config)
                    try:
                        psnrs = [_psnr(generate(num_steps, p), s) for p, s in zip(prompts, stock)]
                        summary = next(iter(handle.cache_summary().values()))
                    finally:
                        dit_accel.remove(pipe)
                    row = {"steps": num_steps, "preset": preset.tag, "resampling": variant, "schedule": resampled,
                           "compute_fraction": summary["compute_fraction"], "psnr_mean": sum(psnrs) / len(psnrs),
                           "psnr_min": min(psnrs)}
                    data["rows"].append(row)
                    print(f"{num_steps} steps {name:8s} {variant:7s} compute {row['compute_fraction']:.2f} "
                          f"PSNR {row['psnr_mean']:.2f} dB", flush=True)
                    write()
        data["complete"] = True
    except KeyboardInterrupt:
        print("interrupted: writing the rows done so far", flush=True)
    write()
    return data


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[8, 30, 50], help="step counts to run (20 is the search's)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cache_resample_cpu.json")
    args = parser.parse_args(argv)
    if any(s < 3 for s in args.steps):
        parser.error(f"--steps must be >= 3, got {args.steps}")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
