"""End-to-end speed of ONE transformer forward (blocks, norms, MLPs, cross-attention: not only attention)
of a random-weight ``WanTransformer3DModel`` at real sizes, dense vs our sparse path, with the 3D-tile
token permutation folded into every attention call (``token_order="call"``) or applied once per forward
(``token_order="forward"``).

    python benchmarks/e2e_speed.py --out benchmarks/results                          # GPU: 1.3B 480p + 14B 720p (3 layers)
    python benchmarks/e2e_speed.py --configs tiny --device cpu --repeats 1 --out /tmp  # CPU smoke test

Models are built from their configs (no download), random weights, bf16 on the GPU (float32 on CPU), B=1,
the modules diffusers keeps in float32 (``_keep_in_fp32_modules``: rope, time embedder, modulation tables,
norms) in float32 as ``from_pretrained(torch_dtype=torch.bfloat16)`` leaves them; one text prompt of 512
tokens, timestep 500:

* ``wan2.1-1.3b-480p``: 30 layers, dim 1536, 12 heads, ffn 8960; latent 16 x 21 x 60 x 104 -> 32,760 tokens;
* ``wan2.1-14b-720p``: dim 5120, 40 heads, ffn 13824, only ``--layers-14b`` layers (default 3) of the 40
  (the blocks are identical, so the per-layer figures scale; the totals are NOT a full 14B forward);
  latent 16 x 21 x 90 x 160 -> 75,600 tokens;
* ``tiny``: 2 layers, 2 heads of 64, 1,024 tokens (CPU smoke test only).

Variants, each timed in the same run:

* ``stock_sdpa``: the stock model, diffusers' default attention (torch SDPA, its own backend choice);
* ``stock_cudnn``: the stock model with ``set_attention_backend("_native_cudnn")`` (diffusers then also sets
  its global active backend, which ``reset_attention_backend`` does not undo: the script sets it back to native
  by hand afterwards). diffusers' cuDNN backend copies q/k/v to a contiguous layout first, so it is a few per
  cent slower than the other two dense variants;
* ``dense_route``: ``dit_accel.apply(model, attention="dense")`` (our dense route: cuDNN SDPA, context hook);
* ``window_<density>_<call|forward>``: ``dit_accel.apply(model, attention=window(...), token_order=...)``.
  Random weights give near-uniform attention, so a content-adaptive method would not pick a meaningful
  density; the ``window`` method (static spatio-temporal window in 3D-tile order, content-independent)
  is used with radii searched on the grid for tile densities near ``--densities`` (the actual density is
  recorded), every layer and step sparse (no dense warm-up, no dense first layer). Its plan depends only on
  the grid and is built once and reused by every layer, so the sparse forward pays the kernel and the
  permutation, not planning.

Timing: CUDA events around each forward, ``--warmup`` forwards then ``--repeats`` timed forwards per variant
and round; ``--rounds`` rounds run every variant once each (interleaved, so clock drift hits all alike);
median over all timed forwards. Also recorded: the dense attention share (cuDNN SDPA on one layer's
q/k/v shape x layers / the stock cuDNN forward) and, per density, the sparse kernel alone on that mask
without an index and with the tile order folded in (``q_index``/``kv_index``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dit_accel  # noqa: E402
from dit_accel.attention.tiling import block_boxes, sequence_order, token_coords  # noqa: E402
from dit_accel.attention.window import window_keep  # noqa: E402
from dit_accel.context import TokenLayout  # noqa: E402

CONFIGS = {
    "wan2.1-1.3b-480p": {
        "model": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30),
        "latent": (21, 60, 104),
    },
    "wan2.1-14b-720p": {
        "model": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40),
        "latent": (21, 90, 160),
    },
    "tiny": {
        "model": dict(num_attention_heads=2, attention_head_dim=64, ffn_dim=256, num_layers=2, text_dim=64),
        "latent": (4, 32, 32),
        "text_tokens": 16,
    },
}
"""Wan2.1 configs (as the released checkpoints' transformer configs) and latent sizes (F, H, W) before patching."""

WAN_COMMON = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
"""Options shared by the Wan2.1 T2V transformers."""

SPARSE_VALVES_OFF = dict(dense_warmup=0.0, dense_first_layers=0, dense_last_step=False, min_seq_len=0)
"""Every layer and call sparse (the speed of the sparse path itself)."""


def search_radii(grid: tuple[int, int, int], targets: list[float]) -> list[dict]:
    """Window radii whose tile density (3D-tile order of ``grid``) is nearest each target."""
    S = grid[0] * grid[1] * grid[2]
    layout = TokenLayout(grid=grid, patch_size=(1, 2, 2))
    perm = sequence_order(layout, S, "cpu")
    coords = token_coords(layout, S, "cpu")
    if perm is not None:
        coords = coords.index_select(0, perm)
    lo, hi = block_boxes(coords)
    found: list[tuple[float, int, int]] = []
    for fr in range(0, min(grid[0], 16)):
        for sr in range(0, max(grid[1], grid[2]) + 1):
            found.append((window_keep(lo, hi, fr, sr, "none").float().mean().item(), fr, sr))
    out = []
    for t in targets:
        d, fr, sr = min(found, key=lambda r: (abs(r[0] - t), r[1], r[2]))
        out.append({"target": t, "frame_radius": fr, "space_radius": sr, "density": round(d, 4)})
    return out


class Timer:
    """Milliseconds of a callable: CUDA events on the GPU, wall clock on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1000.0


def build(name: str, layers: int | None, device: torch.device, dtype: torch.dtype):
    """Random-weight transformer and one forward's inputs."""
    from diffusers import WanTransformer3DModel

    spec = CONFIGS[name]
    cfg = dict(WAN_COMMON, **spec["model"])
    if layers is not None:
        cfg["num_layers"] = layers
    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel.from_config(cfg)
    # As from_pretrained(torch_dtype=bf16) does: the `_keep_in_fp32_modules` tensors stay in float32 (kept
    # from before the cast, so e.g. the rotary tables are not rounded through bf16).
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    saved = {n: t.data for n, t in tensors if t.is_floating_point() and any(p in keep for p in n.split("."))}
    model = model.to(dtype).eval().requires_grad_(False)
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        if n in saved:
            t.data = saved[n]
    F, H, W = spec["latent"]
    g = torch.Generator(device="cpu").manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(1, cfg["in_channels"], F, H, W, generator=g).to(device, dtype),
        timestep=torch.tensor([500.0], device=device),
        encoder_hidden_states=torch.randn(1, spec.get("text_tokens", 512), cfg["text_dim"], generator=g).to(device, dtype),
        return_dict=False,
    )
    grid = (F // cfg["patch_size"][0], H // cfg["patch_size"][1], W // cfg["patch_size"][2])
    return model, inputs, cfg, grid


def run_config(name: str, args, device: torch.device, dtype: torch.dtype) -> dict:
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    from dit_accel.attention.route import plan_index
    from dit_accel.kernels import block_sparse_attention

    layers = args.layers_14b if name == "wan2.1-14b-720p" else None
    t_build = time.perf_counter()
    model, inputs, cfg, grid = build(name, layers, device, dtype)
    tokens = grid[0] * grid[1] * grid[2]
    print(f"[{name}] built in {time.perf_counter() - t_build:.1f} s: {cfg['num_layers']} layers, grid {grid} = {tokens} tokens",
          flush=True)
    radii = search_radii(grid, args.densities)
    timer = Timer(device)
    cuda = device.type == "cuda"

    def forward():
        with torch.inference_mode():
            return model(**inputs)[0]

    # --- variants: (label, setup, teardown) -------------------------------------------------------
    handles: dict[str, object] = {}
    methods: dict[str, object] = {}

    def stock_cudnn_on():
        model.set_attention_backend("_native_cudnn")

    def stock_cudnn_off():
        model.reset_attention_backend()
        _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)  # reset leaves the global one

    def dit(label, **kw):
        def on():
            handles[label] = dit_accel.apply(model, **kw)
        return on

    def off():
        dit_accel.remove(model)

    variants = [("stock_sdpa", lambda: None, lambda: None)]
    if cuda:
        variants.append(("stock_cudnn", stock_cudnn_on, stock_cudnn_off))
    variants.append(("dense_route", dit(label="dense_route", attention="dense"), off))
    for r in radii:
        for order in ("call", "forward"):
            label = f"window_{r['target']}_{order}"
            method = dit_accel.get_method("window", frame_radius=r["frame_radius"], space_radius=r["space_radius"],
                                          **SPARSE_VALVES_OFF)
            methods[label] = method
            variants.append((label, dit(label=label, attention=method, token_order=order), off))

    times: dict[str, list[float]] = {label: [] for label, _, _ in variants}
    info: dict[str, dict] = {}
    finite = {}
    for rnd in range(args.rounds):
        for label, on, teardown in variants:
            on()
            try:
                for _ in range(args.warmup if rnd == 0 else 1):
                    out = forward()
                for _ in range(args.repeats):
                    times[label].append(timer(forward))
                if rnd == 0:
                    finite[label] = bool(torch.isfinite(out).all())
                    handle = handles.get(label)
                    if handle is not None:
                        stats = handle.stats()
                        orders: dict[str, int] = {}
                        for s in stats:
                            orders[str(s.get("token_order"))] = orders.get(str(s.get("token_order")), 0) + 1
                        sparse = [s for s in stats if s["backend"] == "block_sparse"]
                        info[label] = {
                            "token_order": handle.token_orders["transformer"],
                            "token_order_summary": handle.token_order_summary()["transformer"],
                            "attention_calls_by_token_order": orders,
                            "sparse_calls": len(sparse),
                            "mean_density": (sum(s["density"] for s in sparse) / len(sparse)) if sparse else None,
                        }
            finally:
                teardown()
            print(f"[{name}] round {rnd} {label}: {statistics.median(times[label][-args.repeats:]):.2f} ms", flush=True)

    med = {label: statistics.median(v) for label, v in times.items()}
    # The baseline is the fastest dense variant of this run, whichever it is.
    dense_labels = [label for label in ("stock_sdpa", "stock_cudnn", "dense_route") if label in med]
    base_label = min(dense_labels, key=med.__getitem__)
    base = med[base_label]

    # --- attention alone: dense cuDNN share, sparse kernel with/without the folded index -------------
    heads, hd = cfg["num_attention_heads"], cfg["attention_head_dim"]
    g = torch.Generator(device="cpu").manual_seed(2)
    # (B, S, H, D) memory viewed as (B, H, S, D): the layout diffusers' processors hand over
    q, k, v = (torch.randn(1, tokens, heads, hd, generator=g).to(device, dtype).transpose(1, 2) for _ in range(3))
    attention: dict[str, object] = {}
    reps = max(3, args.repeats)

    def med_ms(fn) -> float:
        fn()
        return statistics.median(timer(fn) for _ in range(reps))

    if cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def cudnn():
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                torch.nn.functional.scaled_dot_product_attention(q, k, v)

        dense_ms = med_ms(cudnn)
    else:
        dense_ms = med_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    attention["dense_call_ms"] = dense_ms
    attention["dense_share_of_forward"] = dense_ms * cfg["num_layers"] / base
    for r in radii:
        method = methods[f"window_{r['target']}_call"]
        plans = list(method.__dict__.get("_plans", {}).values())
        if not plans:
            continue
        plan = plans[0]
        idx = plan_index(plan, device)
        plain = med_ms(lambda: block_sparse_attention(q, k, v, plan.mask))
        folded = med_ms(lambda: block_sparse_attention(q, k, v, plan.mask, q_index=idx, kv_index=idx)) if idx is not None else None
        attention[f"window_{r['target']}"] = {
            "kernel_ms_no_index": plain,
            "kernel_ms_folded_index": folded,
            "folded_cost_per_call_ms": None if folded is None else folded - plain,
            "folded_cost_per_forward_ms": None if folded is None else (folded - plain) * cfg["num_layers"],
            "kernel_speedup_vs_cudnn_no_index": dense_ms / plain,
        }

    rows = {}
    for label in times:
        rows[label] = {
            "ms_median": med[label],
            "ms_all": [round(t, 3) for t in times[label]],
            "speedup_vs_baseline": base / med[label],
            **({"speedup_vs_stock_cudnn": med["stock_cudnn"] / med[label]} if "stock_cudnn" in med else {}),
            "finite_output": finite.get(label),
            **info.get(label, {}),
        }
    for r in radii:
        c, f = med[f"window_{r['target']}_call"], med[f"window_{r['target']}_forward"]
        rows[f"window_{r['target']}_forward"]["gain_vs_call"] = c / f
        rows[f"window_{r['target']}_forward"]["saved_ms_vs_call"] = c - f
    del model
    if cuda:
        torch.cuda.empty_cache()
    return {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
        "full_model_layers": CONFIGS[name]["model"]["num_layers"],
        "layers_timed": cfg["num_layers"],
        "grid": list(grid),
        "tokens": tokens,
        "text_tokens": inputs["encoder_hidden_states"].shape[1],
        "window_radii": radii,
        "baseline": base_label,
        "variants": rows,
        "attention_alone": attention,
        "per_layer_ms": {label: med[label] / cfg["num_layers"] for label in med},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=["wan2.1-1.3b-480p", "wan2.1-14b-720p"], choices=sorted(CONFIGS))
    parser.add_argument("--layers-14b", type=int, default=3, help="layers of the 14B config to build (of 40)")
    parser.add_argument("--densities", nargs="+", type=float, default=[0.7, 0.5, 0.3])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--time-budget", type=float, default=1e9, help="seconds; skip configs that would start after it")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import diffusers
    import triton

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result = {
        "benchmark": "e2e_speed",
        "what": "one full transformer forward, random weights, B=1; dense vs sparse window with token_order call/forward",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "diffusers": diffusers.__version__,
                     "python": platform.python_version()},
        "dtype": str(dtype),
        "settings": {"warmup": args.warmup, "repeats": args.repeats, "rounds": args.rounds, "densities": args.densities},
        "results": {},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "e2e_speed.json" if device.type == "cuda" else args.out / "e2e_speed_cpu.json"
    t0 = time.perf_counter()
    for name in args.configs:
        if time.perf_counter() - t0 > args.time_budget:
            result["results"][name] = {"skipped": f"time budget {args.time_budget} s spent"}
            continue
        result["results"][name] = run_config(name, args, device, dtype)
        result["elapsed_s"] = round(time.perf_counter() - t0, 1)
        path.write_text(json.dumps(result, indent=1))  # after each config: a timeout keeps what finished
        print(f"wrote {path} ({result['elapsed_s']} s)", flush=True)
    path.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
