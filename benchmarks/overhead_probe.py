"""Wall-clock overhead of dit-accel's hooks with nothing skipped, on the testbed at its evaluation size.

Every variant computes the same dense generation (20 steps, CFG, 256x256 px x 16 frames); only the
machinery differs, so the ratios are the price of the hooks themselves:

* ``stock``: the pipeline as loaded (diffusers' default attention dispatch, torch SDPA heuristics);
* ``stock_cudnn``: the same with diffusers' attention backend forced to cuDNN (our dense baseline);
* ``apply_dense``: ``dit_accel.apply(pipe, preset="dense")`` (context hook + our dense route);
* ``apply_dense_hostclock``: ``apply_dense`` with the context hook's one host sync per forward removed
  (the step's timestep read from the scheduler's host state instead: a measurement of what that sync
  costs, not a shipped code path);
* ``apply_dense_cache_all``: the same plus the ``fixed`` cache scheduler computing every step
  (``interval=1``: every block hook runs, nothing is reused).

Timing: ``torch.cuda.synchronize`` around each whole generation, median over ``--repeats`` after one
warm-up generation per variant; the variants are interleaved per repeat so drift hits all alike.

    python benchmarks/overhead_probe.py --out $OUT/overhead_probe.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch

import dit_accel
from dit_accel.testbed import load_testbed_pipeline

PROMPT = "a small red circle moving left and a blue star moving up on a striped background"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _generate(pipe, args: argparse.Namespace) -> float:
    _sync()
    start = time.perf_counter()
    pipe(PROMPT, num_frames=args.frames, height=args.size, width=args.size, num_inference_steps=args.steps,
         generator=torch.Generator("cpu").manual_seed(0), output_type="pt")
    _sync()
    return time.perf_counter() - start


def _configure(pipe, variant: str, default_backend) -> None:
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    dit_accel.remove(pipe)
    pipe.transformer.reset_attention_backend()
    # set_attention_backend also sets diffusers' global active backend and reset does not undo it.
    _AttentionBackendRegistry.set_active_backend(default_backend)
    if variant == "stock":
        return
    if variant == "stock_cudnn":
        pipe.transformer.set_attention_backend("_native_cudnn")
        return
    if variant == "apply_dense":
        dit_accel.apply(pipe, preset="dense")
        return
    if variant == "apply_dense_hostclock":
        import dataclasses

        handle = dit_accel.apply(pipe, preset="dense")
        host = {}

        def host_timestep(sched=pipe.scheduler) -> torch.Tensor:
            key = id(sched.timesteps)
            if key not in host:
                host.clear()
                host[key] = sched.timesteps.tolist()
            index = sched.step_index if sched.step_index is not None else 0
            return torch.tensor([host[key][index]])

        hook = pipe.transformer._diffusers_hook.get_hook("dit_accel_context")
        read = hook.read_inputs
        hook.read_inputs = lambda bound: dataclasses.replace(read(bound), timestep=host_timestep())
        return
    if variant == "apply_dense_cache_all":
        from dit_accel.caching import make_cache_config

        dit_accel.apply(pipe, preset="dense", cache=make_cache_config("fixed", interval=1, warmup_steps=0, final_steps=0))
        return
    raise ValueError(f"unknown variant {variant!r}")


def main() -> None:
    """Time every variant and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--variants", nargs="+", default=["stock", "stock_cudnn", "apply_dense", "apply_dense_hostclock", "apply_dense_cache_all"])
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    pipe = load_testbed_pipeline("cuda" if cuda else "cpu", torch.bfloat16 if cuda else torch.float32)
    pipe.set_progress_bar_config(disable=True)
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    default_backend = _AttentionBackendRegistry.get_active_backend()[0]
    times: dict[str, list[float]] = {v: [] for v in args.variants}
    errors: dict[str, str] = {}
    for variant in list(args.variants):
        try:
            _configure(pipe, variant, default_backend)
            _generate(pipe, args)  # warm-up (autotune, cuDNN plans, caches)
        except Exception as exc:  # a variant that cannot run is reported, not fatal
            errors[variant] = f"{type(exc).__name__}: {exc}"
            args.variants.remove(variant)
            _configure(pipe, "stock", default_backend)
    for _ in range(args.repeats):
        for variant in args.variants:
            _configure(pipe, variant, default_backend)
            times[variant].append(_generate(pipe, args))
    medians = {v: statistics.median(times[v]) for v in args.variants if times[v]}
    base = medians.get("stock")
    result = {
        "benchmark": "overhead_probe",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "versions": {"torch": torch.__version__, "diffusers": __import__("diffusers").__version__,
                     "dit_accel": dit_accel.__version__ if hasattr(dit_accel, "__version__") else None},
        "settings": {"steps": args.steps, "size": args.size, "frames": args.frames, "repeats": args.repeats,
                     "dtype": "bfloat16", "guidance": "default (CFG on, sequential)"},
        "seconds": times,
        "median_s": medians,
        "ratio_vs_stock": {v: (base / m if base else None) for v, m in medians.items()},
        "errors": errors,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("median_s", "ratio_vs_stock", "errors")}, indent=2))


if __name__ == "__main__":
    main()
