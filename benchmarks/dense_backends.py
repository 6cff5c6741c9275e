"""Which dense SDPA backend is fastest, per head dim, at the attention shapes of our model families?

    python benchmarks/dense_backends.py --out benchmarks/results   # on a GPU; writes dense_backends.json

Times torch SDPA with each backend forced (cuDNN, flash, memory-efficient) on bf16 (B, H, S, D) tensors,
CUDA events, median of `--reps` after warm-up. `dit_accel.attention.dense` picks its backend order from
this kind of measurement: the dense baseline must be the fastest dense path, not a fixed one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES: dict[str, tuple[int, int, int]] = {
    # name: (heads, tokens, head_dim)
    "testbed-256x256x16": (6, 16_384, 64),
    "cogvideox-5b-720x480x49": (48, 17_550, 64),
    "ltx-video-768x512x121": (32, 6_144, 64),
    "sd3-1024px": (24, 4_250, 64),
    "wan2.1-1.3b-480p": (12, 32_760, 128),
    "hunyuanvideo-720p-129f": (24, 119_056 // 4, 128),
    "flux-1024px": (24, 4_608, 128),
}
"""Representative self-attention shapes (batch 1): heads, sequence length, head dim. HunyuanVideo's 720p x
129-frame sequence is cut to a quarter to keep the run short (the ranking of backends does not depend on it)."""

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def time_backend(backend: SDPBackend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, reps: int) -> float | str:
    """Median milliseconds of one SDPA call with `backend` forced, or the error text if it cannot run."""
    try:
        with sdpa_kernel([backend]):
            for _ in range(3):
                F.scaled_dot_product_attention(q, k, v)
            torch.cuda.synchronize()
            times = []
            for _ in range(reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                F.scaled_dot_product_attention(q, k, v)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
    except Exception as exc:  # noqa: BLE001 - a backend that cannot take the shape is a result
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("dense_backends.py times CUDA backends; no GPU here")
    rows = []
    for name, (heads, tokens, dim) in SHAPES.items():
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, heads, tokens, dim, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
        row: dict = {"shape": name, "heads": heads, "tokens": tokens, "head_dim": dim}
        for label, backend in BACKENDS.items():
            row[f"{label}_ms"] = time_backend(backend, q, k, v, args.reps)
        timed = {b: row[f"{b}_ms"] for b in BACKENDS if isinstance(row[f"{b}_ms"], float)}
        row["fastest"] = min(timed, key=timed.get) if timed else None
        if "cudnn" in timed and "flash" in timed:
            row["cudnn_vs_flash_speed"] = round(timed["flash"] / timed["cudnn"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "cudnn": torch.backends.cudnn.version(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    path = args.out / "dense_backends.json"
    path.write_text(json.dumps({"env": env, "timing": f"CUDA events, median of {args.reps} after 3 warm-up calls, bf16, B=1",
                                "rows": rows}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
