"""Time per denoising step of Wan2.1-14B at 720x1280 x 81 frames on one GPU vs two GPUs with diffusers' Ulysses
context parallelism, for dense cuDNN attention and for the ``balanced`` preset; outputs of one and two GPUs compared.

    torchrun --nproc-per-node 2 benchmarks/scale_2gpu.py --layers 40 --steps 5           # the 2-GPU figure
    python -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/scale_2gpu.py --tiny --device cpu \\
        --output /tmp/scale_2gpu_tiny.json                                              # CPU check (gloo)

What runs (every rank builds the same random-weight transformer: rank 0's weights are broadcast):

* ``WanPipeline`` without text encoder and VAE, driven with random prompt embeddings (512 x 4096, the UMT5
  shape) and ``output_type="latent"``: the real denoising loop (Flow-matching Euler, shift 5, guidance 5, so two
  transformer forwards per step: ``cond`` then ``uncond``), latents (16, 21, 90, 160) -> 75,600 tokens.
* Two copies of the transformer: the context-parallel one on every rank
  (``enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))``) and a single-GPU one on rank 0
  (a deep copy made before parallelism), so each configuration is timed on one GPU and then on all GPUs before the
  next one starts, and the JSON is written after each configuration (a timeout keeps what finished).
* Configurations: ``dense`` (the stock processors on diffusers' ``_native_cudnn`` backend; ``native`` on CPU)
  and ``balanced`` (``dit_accel.apply(pipe, preset="balanced")``: combo block-sparse attention + ProCache; applied
  to the context-parallel model after ``enable_parallelism``, then removed). Random weights give near-uniform
  attention, so the sparse methods keep more tiles than on a trained model: the JSON records the attention
  density and the cache's compute fraction the run actually had.
* Per configuration and GPU count: one warm-up pipeline call (``--warmup-steps``), then one timed call of
  ``--steps`` steps; a step's time is the wall time between ``callback_on_step_end`` calls after a device
  synchronisation. ``speedup`` = mean step time on one GPU / on ``WORLD`` GPUs. Outputs: the final latents of
  the one-GPU and the ``WORLD``-GPU call, ``max_abs_diff`` and ``psnr_db`` (peak = the one-GPU latents' range).

The 14B model in bf16 takes 28 GB per copy (rank 0 holds two) plus a transient 56 GB while it is built in fp32.
With 40 layers a 14B forward is ~12 s on one H100/H200 (``e2e_speed_gpu.json``: ~316 ms per layer), so the default
run (5 timed + 1 warm-up steps of two forwards, both configurations, 1 and 2 GPUs) takes about 7 minutes;
``--configs dense`` / ``--configs balanced`` split it in two, ``--layers 20`` halves it (per-layer costs scale; the
step time of the full model is then not measured).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import dit_accel  # noqa: E402
from e2e_speed import CONFIGS as MODELS  # noqa: E402
from e2e_speed import build  # noqa: E402

SIZES = {"wan2.1-14b-720p": dict(height=720, width=1280, num_frames=81, text_tokens=512),
         "tiny": dict(height=128, width=128, num_frames=9, text_tokens=16)}
"""Pixel size, frames and prompt length per model config of ``e2e_speed.CONFIGS`` (latents: /8 spatially,
(F-1)/4+1 frames): Wan2.1-T2V-14B's transformer at 720p, and a tiny one for the CPU check."""

CONFIGS = ("dense", "balanced")
"""Configurations timed, in order."""

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "scale_2gpu.json"


def build_transformer(name: str, layers: int | None, device: torch.device, dtype: torch.dtype):
    """Random-weight ``WanTransformer3DModel`` of ``e2e_speed.CONFIGS[name]`` (``layers`` of them), built as
    ``e2e_speed.build`` does (float32 modules kept as ``from_pretrained(torch_dtype=...)`` leaves them)."""
    model, _, cfg, _ = build(name, layers, device, dtype)
    return model, cfg


def make_pipeline(transformer):
    """A ``WanPipeline`` around ``transformer`` with no text encoder and no VAE (prompt embeddings in, latents out)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate(pipe, steps: int, size: dict, embeds: tuple[torch.Tensor, torch.Tensor], guidance: float,
             device: torch.device) -> tuple[torch.Tensor, list[float]]:
    """Final latents of one pipeline call of ``steps`` steps, and the wall seconds of each step."""
    marks: list[float] = []

    def on_step(_pipe, _i, _t, kwargs):
        sync(device)
        marks.append(time.perf_counter())
        return kwargs

    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        latents = pipe(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], height=size["height"],
                       width=size["width"], num_frames=size["num_frames"], num_inference_steps=steps,
                       guidance_scale=guidance, output_type="latent", generator=torch.Generator("cpu").manual_seed(0),
                       callback_on_step_end=on_step).frames
    return latents.float(), [b - a for a, b in zip([start] + marks[:-1], marks)]


def compare(reference: torch.Tensor, other: torch.Tensor) -> dict[str, Any]:
    """Max abs difference and PSNR (peak: the reference's range) of two latent tensors."""
    mse = (reference - other).double().pow(2).mean().item()
    peak = (reference.max() - reference.min()).item()
    return {
        "max_abs_diff": (reference - other).abs().max().item(),
        "psnr_db": math.inf if mse == 0 else 10 * math.log10(peak * peak / mse),
        "finite": bool(torch.isfinite(reference).all() and torch.isfinite(other).all()),
    }


def accelerate(name: str, pipe):
    """Install configuration ``name`` on ``pipe``: nothing for ``dense``, else the preset; the handle or ``None``."""
    return None if name == "dense" else dit_accel.apply(pipe, preset=name)


def timed_run(name: str, pipe, args, size: dict, embeds, device: torch.device) -> tuple[torch.Tensor, dict[str, Any]]:
    """Warm-up call, then the timed call of configuration ``name``; the latents and the timing record."""
    handle = accelerate(name, pipe)
    info: dict[str, Any] = {}
    try:
        generate(pipe, args.warmup_steps, size, embeds, args.guidance, device)
        if handle is not None:
            handle.reset_stats()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        latents, step_s = generate(pipe, args.steps, size, embeds, args.guidance, device)
        if handle is not None:
            info = {"attention": handle.stats_summary(), "cache": handle.cache_summary(),
                    "token_order_summary": handle.token_order_summary(), "acceleration": handle.summary()}
    finally:
        dit_accel.remove(pipe)
    record = {
        "step_s": [round(s, 4) for s in step_s],
        "mean_step_s": statistics.mean(step_s),
        "median_step_s": statistics.median(step_s),
        "total_s": sum(step_s),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        **info,
    }
    return latents, record


def versions() -> dict[str, str]:
    """Library versions of this run."""
    import diffusers

    out = {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
           "cuda": str(torch.version.cuda)}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = "not installed"
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=None, help="transformer layers to build (default: all 40; tiny: 2)")
    parser.add_argument("--steps", type=int, default=5, help="denoising steps of the timed call (default 5)")
    parser.add_argument("--warmup-steps", type=int, default=1, help="steps of the warm-up call (default 1)")
    parser.add_argument("--guidance", type=float, default=5.0, help="guidance scale (> 1: two forwards per step)")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny model and size (CPU check of the script)")
    parser.add_argument("--output", type=Path, default=None,
                        help=f"result JSON (default: {DEFAULT_OUTPUT.relative_to(DEFAULT_OUTPUT.parents[2])}; "
                             "with --tiny nothing is written unless given)")
    args = parser.parse_args(argv)
    if args.output is None and not args.tiny:
        args.output = DEFAULT_OUTPUT
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark on the ranks launched by torchrun; rank 0 returns (and writes) the result."""
    args = parse_args(argv)
    device_type = args.device
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=timedelta(minutes=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
        dtype = torch.bfloat16
    else:
        device, dtype = torch.device("cpu"), torch.float32
        torch.accelerator.device_count = lambda: 1  # diffusers computes rank % device_count; a CPU has none
    import transformers  # noqa: F401  diffusers' CP split hook logs through transformers' logger.warning_once
    from diffusers import ContextParallelConfig

    name = "tiny" if args.tiny else "wan2.1-14b-720p"
    size = SIZES[name]
    start = time.perf_counter()

    model, cfg = build_transformer(name, args.layers, device, dtype)
    for tensor in model.state_dict().values():
        dist.broadcast(tensor, src=0)  # one set of weights on every rank, whatever the RNG did
    backend = "_native_cudnn" if device_type == "cuda" else "native"
    model.set_attention_backend(backend)
    single = make_pipeline(copy.deepcopy(model)) if rank == 0 else None
    parallel = make_pipeline(model)
    parallel.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    g = torch.Generator("cpu").manual_seed(1)
    embeds = tuple(torch.randn(1, size["text_tokens"], cfg["text_dim"], generator=g).to(device, dtype) for _ in range(2))
    latent_grid = ((size["num_frames"] - 1) // 4 + 1, size["height"] // 16, size["width"] // 16)
    built_s = time.perf_counter() - start

    result: dict[str, Any] = {
        "benchmark": "scale_2gpu",
        "what": f"time per denoising step (CFG: 2 forwards), 1 GPU vs {world} with diffusers Ulysses context "
                "parallelism, random weights, dense cuDNN vs the balanced preset; latents of 1 and N GPUs compared",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device_type == "cuda" else platform.processor() or "cpu",
        "world_size": world,
        "versions": versions(),
        "settings": {"model": name, "layers": cfg["num_layers"], "full_model_layers": MODELS[name]["model"]["num_layers"], **size, "latent_grid": list(latent_grid),
                     "tokens": math.prod(latent_grid), "steps": args.steps, "warmup_steps": args.warmup_steps,
                     "guidance": args.guidance, "dtype": str(dtype).replace("torch.", ""), "dense_backend": backend,
                     "ulysses_degree": world, "build_s": round(built_s, 1)},
        "results": {},
        "complete": False,
    }
    for name in args.configs:
        row: dict[str, Any] = {}
        reference = None
        if rank == 0:
            reference, row["1gpu"] = timed_run(name, single, args, size, embeds, device)
            print(f"[{name}] 1 GPU: {row['1gpu']['mean_step_s']:.3f} s/step", flush=True)
        dist.barrier()
        latents, parallel_row = timed_run(name, parallel, args, size, embeds, device)
        per_rank = [None] * world
        dist.all_gather_object(per_rank, {"peak_memory_gib": parallel_row["peak_memory_gib"],
                                          "attention": parallel_row.get("attention")})
        if rank == 0:
            parallel_row["per_rank"] = per_rank
            row[f"{world}gpu"] = parallel_row
            row["speedup"] = row["1gpu"]["mean_step_s"] / parallel_row["mean_step_s"]
            row["outputs"] = compare(reference, latents)
            result["results"][name] = row
            result["elapsed_s"] = round(time.perf_counter() - start, 1)
            print(f"[{name}] {world} GPUs: {parallel_row['mean_step_s']:.3f} s/step, speed-up {row['speedup']:.2f}x, "
                  f"max abs diff {row['outputs']['max_abs_diff']:.3g}, PSNR {row['outputs']['psnr_db']:.1f} dB", flush=True)
            if args.output is not None:
                args.output.parent.mkdir(parents=True, exist_ok=True)
                args.output.write_text(json.dumps(result, indent=1, default=str))  # after each configuration
        dist.barrier()
    result["complete"] = True
    if rank == 0 and args.output is not None:
        args.output.write_text(json.dumps(result, indent=1, default=str))
        print(f"wrote {args.output}", flush=True)
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
