"""Benchmark and GPU check of the block-sparse attention kernel against dense and sparse peers.

Run on a GPU (bf16, B=1, non-causal):

    python benchmarks/attention_kernel.py --check --sweep --full --out benchmarks/results

- ``--check``: bf16/fp16 correctness on the GPU against the float32 torch reference (relative error
  ``||out - ref|| / ||ref||``, LSE and tile statistics), ragged lengths, empty rows, full blocks, broadcast
  masks, the (B, S, H, D) transposed layout, each load path.
- ``--sweep``: kernel variants (load path, BLOCK_N, warps, stages, tile-stat reduction) at one shape.
- ``--full``: heads x tokens x densities for our kernel (with and without tile statistics), cuDNN SDPA,
  FlashAttention-2 SDPA, FlexAttention (torch.compile, same blocks passed as full blocks), xformers and
  SageAttention when they import (dense only). Writes ``attention_kernel.json`` and ``attention_kernel.png``.

Timing: CUDA events, one warm-up call (compiles), then repeats until ~``--target-ms`` of work, median.
Effective TFLOP/s = 4 * B * H * S^2 * D * density / time, density = fraction of tiles computed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit_accel.kernels import (  # noqa: E402
    block_mask_density,
    block_mask_from_bool,
    block_mask_from_scores,
    block_sparse_attention,
    block_sparse_attention_reference,
    dense_block_mask,
)
from dit_accel.kernels import block_sparse_triton as bst  # noqa: E402
from dit_accel.kernels.block_sparse_common import check_inputs  # noqa: E402


DEVICE = "cuda"


def time_ms(fn, target_ms: float = 150.0, min_reps: int = 3, max_reps: int = 40) -> float:
    """Median time of ``fn()`` in ms (CUDA events), after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end), 1e-3)
    reps = int(min(max_reps, max(min_reps, target_ms / est)))
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def tflops(B: int, H: int, S: int, D: int, density: float, ms: float) -> float:
    return 4.0 * B * H * S * S * D * density / (ms * 1e-3) / 1e12


def random_mask(B: int, H: int, S: int, density: float, device: str, seed: int = 0):
    """Per-head random top-k block mask with exactly round(density * KB) key blocks per query block."""
    kb = math.ceil(S / 128)
    if density >= 1.0:
        return dense_block_mask(B, H, S, S, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    scores = torch.rand(B, H, kb, kb, device=device, generator=g)
    k = max(1, round(density * kb))
    return block_mask_from_scores(scores, top_k=k, keep_diagonal=False, q_len=S, kv_len=S)


def as_full_blocks(mask):
    """The same blocks as FlexAttention "full" blocks (no mask_mod evaluation: flex's fastest path)."""
    from torch.nn.attention.flex_attention import BlockMask

    return BlockMask.from_kv_blocks(
        torch.zeros_like(mask.kv_num_blocks), mask.kv_indices, mask.kv_num_blocks, mask.kv_indices,
        BLOCK_SIZE=mask.BLOCK_SIZE, seq_lengths=mask.seq_lengths, compute_q_blocks=False,
    )


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.float(), ref.float()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------------------------- check
def run_check(log: list) -> bool:
    dev = "cuda"
    ok_all = True
    cases = [
        # (B, H, S, D, dtype, density, layout, block)
        (1, 2, 1000, 128, torch.bfloat16, 0.5, "bhsd", 128),
        (2, 3, 777, 64, torch.float16, 0.6, "bshd", 128),
        (1, 2, 640, 72, torch.bfloat16, 0.7, "bhsd", 128),
        (1, 2, 4096 + 17, 128, torch.bfloat16, 1.0, "bshd", 128),
        (1, 2, 515, 128, torch.float16, 0.5, "bhsd", 64),
        (1, 2, 384, 64, torch.float32, 0.6, "bhsd", 128),
    ]
    for (B, H, S, D, dt, dens, layout, blk) in cases:
        torch.manual_seed(S + D)
        if layout == "bshd":
            q, k, v = [torch.randn(B, S, H, D, device=dev, dtype=dt).transpose(1, 2) for _ in range(3)]
        else:
            q, k, v = [torch.randn(B, H, S, D, device=dev, dtype=dt) for _ in range(3)]
        nb = math.ceil(S / blk)
        bb = torch.rand(1 if B > 1 else B, H, nb, nb, device=dev) < dens
        bb[..., 0, :] = False  # an empty query block
        mask = block_mask_from_bool(bb, S, S, blk)
        ref = block_sparse_attention_reference(q.float(), k.float(), v.float(), mask, return_lse=True, tile_stats=True)
        for use_tma in (False, True):
            for cfg in ((None, (64, 4, 3)) if q.element_size() == 2 else (None,)):
                view = check_inputs(q, k, v, mask, None)
                got = bst.block_sparse_attention_triton(
                    q, k, v, view, return_lse=True, tile_stats=True, use_tma=use_tma, config=cfg
                )
                fin = lambda t: torch.where(torch.isfinite(t), t, torch.zeros_like(t))  # noqa: E731
                e_out = rel_err(got.out, ref.out)
                e_lse = float((fin(got.lse) - fin(ref.lse)).abs().max())
                e_ts = float((fin(got.tile_stats) - fin(ref.tile_stats)).abs().max())
                inf_ok = torch.equal(torch.isinf(got.lse), torch.isinf(ref.lse)) and torch.equal(
                    torch.isinf(got.tile_stats), torch.isinf(ref.tile_stats))
                nan = bool(got.out.isnan().any())
                tol = 2e-2 if dt == torch.bfloat16 else 5e-3
                ok = e_out < tol and e_lse < 2e-2 and e_ts < 5e-2 and inf_ok and not nan
                ok_all &= ok
                rec = dict(B=B, H=H, S=S, D=D, dtype=str(dt), block=blk, layout=layout, tma=use_tma,
                           config=cfg, rel_err_out=e_out, max_err_lse=e_lse, max_err_tile_stats=e_ts,
                           inf_pattern_ok=inf_ok, nan=nan, ok=ok)
                log.append(rec)
                print("check", rec, flush=True)
    # Full blocks (flex's full_kv_*) and a broadcast (B=1, H=1) dense mask through the public entry point.
    S, D = 1100, 128
    q, k, v = [torch.randn(2, 4, S, D, device=dev, dtype=torch.bfloat16) for _ in range(3)]
    m = random_mask(1, 4, S, 0.5, dev)
    ref = block_sparse_attention_reference(q.float(), k.float(), v.float(), m)
    got = block_sparse_attention(q, k, v, as_full_blocks(m))
    e1 = rel_err(got, ref)
    dm = dense_block_mask(1, 1, S, S, device=dev)
    e2 = rel_err(block_sparse_attention(q, k, v, dm), F.scaled_dot_product_attention(q.float(), k.float(), v.float()))
    ok = e1 < 2e-2 and e2 < 2e-2
    ok_all &= ok
    rec = dict(case="full blocks + broadcast dense vs SDPA", rel_err_full_blocks=e1, rel_err_dense_vs_sdpa=e2, ok=ok)
    log.append(rec)
    print("check", rec, flush=True)
    return ok_all


# ----------------------------------------------------------------------------------------------- sweep
def run_sweep(log: list, S: int, H: int, D: int) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = "cuda"
    q, k, v = [torch.randn(1, H, S, D, device=dev, dtype=torch.bfloat16) for _ in range(3)]
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        t_cudnn = time_ms(lambda: F.scaled_dot_product_attention(q, k, v))
    print(f"sweep S={S} H={H} D={D} cudnn {t_cudnn:.3f} ms {tflops(1, H, S, D, 1.0, t_cudnn):.0f} TF/s", flush=True)
    log.append(dict(S=S, H=H, D=D, variant="cudnn", ms=t_cudnn))
    configs = [(128, 8, 3), (128, 8, 2), (64, 8, 3), (64, 8, 4)] if D == 128 else [(128, 8, 3), (128, 4, 3), (64, 4, 3)]
    for dens in (1.0, 0.25):
        mask = random_mask(1, H, S, dens, dev)
        d = block_mask_density(mask)
        view = check_inputs(q, k, v, mask, None)
        for use_tma in (False, True):
            for cfg in configs:
                try:
                    fn = lambda: bst.block_sparse_attention_triton(q, k, v, view, config=cfg, use_tma=use_tma)  # noqa: E731
                    t = time_ms(fn)
                    t_ts = None
                    if dens == 1.0:
                        t_ts = time_ms(lambda: bst.block_sparse_attention_triton(
                            q, k, v, view, config=cfg, use_tma=use_tma, tile_stats=True))
                except Exception as e:  # a config that does not fit (shared memory) is reported, not fatal
                    print(f"sweep {cfg} tma={use_tma} failed: {e!r}"[:300], flush=True)
                    continue
                rec = dict(S=S, H=H, D=D, density=d, tma=use_tma, config=cfg, ms=t,
                           tflops=tflops(1, H, S, D, d, t), ratio_vs_cudnn=t / t_cudnn,
                           ms_tile_stats=t_ts)
                log.append(rec)
                extra = "" if t_ts is None else f" stats {t_ts / t - 1:+.1%}"
                print(f"sweep dens={d:.2f} tma={use_tma:d} cfg={cfg} {t:.3f} ms {rec['tflops']:.0f} TF/s "
                      f"x{t / t_cudnn:.3f} cudnn{extra}", flush=True)


# ------------------------------------------------------------------------------------------------ full
def run_full(log: list, heads: list[int], tokens: list[int], dims: list[int], densities: list[float],
             target_ms: float, alt_path: bool, dump=lambda: None) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.config.cache_size_limit = 256
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 256
    flex = torch.compile(flex_attention, dynamic=False)
    try:
        import xformers.ops as xops  # type: ignore
    except Exception as e:  # noqa: BLE001
        xops = None
        log.append(dict(note=f"xformers unavailable: {e!r}"[:300]))
    try:
        from sageattention import sageattn  # type: ignore
    except Exception as e:  # noqa: BLE001
        sageattn = None
        log.append(dict(note=f"sageattention unavailable: {e!r}"[:300]))

    dev = DEVICE
    for D in dims:
        for H in heads:
            for S in tokens:
                q, k, v = [torch.randn(1, H, S, D, device=dev, dtype=torch.bfloat16) for _ in range(3)]
                row = dict(B=1, H=H, S=S, D=D)

                def rec(name, ms, density=1.0, nominal=1.0):
                    r = dict(row, backend=name, density=density, nominal_density=nominal, ms=ms,
                             tflops=tflops(1, H, S, D, density, ms))
                    log.append(r)
                    print(f"full D={D} H={H} S={S} {name:>14s} dens={density:.3f} {ms:9.3f} ms "
                          f"{r['tflops']:6.0f} TF/s", flush=True)
                    return ms

                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    t_cudnn = rec("cudnn", time_ms(lambda: F.scaled_dot_product_attention(q, k, v), target_ms))
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    rec("fa2", time_ms(lambda: F.scaled_dot_product_attention(q, k, v), target_ms))
                if xops is not None:
                    try:
                        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
                        rec("xformers", time_ms(lambda: xops.memory_efficient_attention(qt, kt, vt), target_ms))
                    except Exception as e:  # noqa: BLE001
                        log.append(dict(row, note=f"xformers failed: {e!r}"[:300]))
                if sageattn is not None:
                    try:
                        rec("sage", time_ms(lambda: sageattn(q, k, v, tensor_layout="HND", is_causal=False), target_ms))
                    except Exception as e:  # noqa: BLE001
                        log.append(dict(row, note=f"sage failed: {e!r}"[:300]))
                for dens in densities:
                    mask = random_mask(1, H, S, dens, dev, seed=S + H)
                    d = block_mask_density(mask)
                    fmask = as_full_blocks(mask)
                    t_ours = rec("ours", time_ms(lambda: block_sparse_attention(q, k, v, mask), target_ms), d, dens)
                    if alt_path:
                        # The other load path (TMA vs pointer), same config otherwise: the default is a choice.
                        view = check_inputs(q, k, v, mask, None)
                        tma_default = bst.kernel_config(128 if D != 64 else 64, 2, 128, 128, S)[3]
                        rec("ours-tma" if not tma_default else "ours-ptr", time_ms(
                            lambda: bst.block_sparse_attention_triton(q, k, v, view, use_tma=not tma_default),
                            target_ms), d, dens)
                    t_ts = rec("ours+stats", time_ms(
                        lambda: block_sparse_attention(q, k, v, mask, tile_stats=True), target_ms), d, dens)
                    try:
                        t_flex = rec("flex", time_ms(lambda: flex(q, k, v, block_mask=fmask), target_ms), d, dens)
                    except Exception as e:  # noqa: BLE001
                        t_flex = float("nan")
                        log.append(dict(row, density=d, note=f"flex failed: {e!r}"[:300]))
                    log.append(dict(row, density=d, summary=True, ours_ms=t_ours, cudnn_ms=t_cudnn, flex_ms=t_flex,
                                    ours_tflops=tflops(1, H, S, D, d, t_ours), ours_vs_cudnn=t_ours / t_cudnn,
                                    ours_vs_flex=t_ours / t_flex, stats_overhead=t_ts / t_ours - 1.0))
                del q, k, v
                torch.cuda.empty_cache()
                dump()  # partial results survive a time limit


def plot(results: list, path: Path) -> None:
    """Time relative to cuDNN dense, per (D, H) panel: ours (solid) and FlexAttention (dashed) at each
    density, dense peers dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if "backend" in r]
    combos = sorted({(r["D"], r["H"]) for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, len(combos), figsize=(5.0 * len(combos), 4.6), squeeze=False)
    colors = {1.0: "tab:blue", 0.5: "tab:orange", 0.25: "tab:green", 0.1: "tab:red"}
    for ax, (D, H) in zip(axes[0], combos):
        sub = [r for r in rows if r["D"] == D and r["H"] == H]
        cudnn = {r["S"]: r["ms"] for r in sub if r["backend"] == "cudnn"}
        series: dict = {}
        for r in sub:
            if r["S"] in cudnn:
                series.setdefault((r["backend"], r.get("nominal_density", 1.0)), {})[r["S"]] = r["ms"] / cudnn[r["S"]]
        for (name, dens), pts in sorted(series.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
            xs = sorted(pts)
            ys = [pts[x] for x in xs]
            if name in ("ours", "flex"):
                ax.plot(xs, ys, "-" if name == "ours" else "--", marker="o" if name == "ours" else "x",
                        color=colors.get(dens, "k"), label=f"{name} d={dens:g}")
            elif name in ("fa2", "sage", "xformers"):
                ax.plot(xs, ys, ":", marker=".", color={"fa2": "gray", "sage": "purple"}.get(name, "k"), label=name)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(sorted(cudnn))
        ax.set_xticklabels([f"{s:,}" for s in sorted(cudnn)], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("tokens")
        ax.set_ylabel("time / cuDNN dense time")
        ax.set_title(f"B=1 H={H} D={D} bf16 ({path.stem})", fontsize=9)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=6, ncol=2, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--full", action="store_true")
    p.add_argument("--sweep-shape", default="32760,12,128", help="S,H,D of the sweep")
    p.add_argument("--sweep-shape2", default="", help="optional second S,H,D sweep")
    p.add_argument("--heads", default="12,40")
    p.add_argument("--tokens", default="4096,16384,32760,75600")
    p.add_argument("--dims", default="128,64")
    p.add_argument("--densities", default="1.0,0.5,0.25,0.1")
    p.add_argument("--target-ms", type=float, default=150.0)
    p.add_argument("--alt-path", action="store_true", help="also time the non-default load path (TMA/pointer)")
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    p.add_argument("--name", default="attention_kernel")
    p.add_argument("--plot-only", default="", help="redraw the plot of an existing results JSON and exit")
    a = p.parse_args()
    if a.plot_only:
        src = Path(a.plot_only)
        plot(json.loads(src.read_text())["full"], src.with_suffix(".png"))
        return
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    import triton

    meta = dict(
        device=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
        torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda, python=platform.python_version(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        kernel_defaults={f"D{k[0]}/{k[1]}B": dict(zip(("block_n", "warps", "stages", "tma"), v))
                         for k, v in bst._CONFIGS.items()},
        timing="CUDA events, 1 warm-up, median of repeats; effective TFLOP/s = 4*B*H*S^2*D*density/t",
    )
    print(meta, flush=True)
    res: dict = dict(meta=meta)
    t0 = time.time()
    if a.check:
        log: list = []
        res["check_ok"] = run_check(log)
        res["check"] = log
    if a.sweep:
        log = []
        for shape in [a.sweep_shape] + ([a.sweep_shape2] if a.sweep_shape2 else []):
            S, H, D = (int(x) for x in shape.split(","))
            run_sweep(log, S, H, D)
        res["sweep"] = log
    path = out / f"{a.name}.json"

    def dump() -> None:
        res["wall_s"] = time.time() - t0
        path.write_text(json.dumps(res, indent=1, default=str))

    if a.full:
        log = []
        res["full"] = log
        run_full(log, [int(x) for x in a.heads.split(",")], [int(x) for x in a.tokens.split(",")],
                 [int(x) for x in a.dims.split(",")], [float(x) for x in a.densities.split(",")], a.target_ms,
                 a.alt_path, dump)
        try:
            plot(log, out / f"{a.name}.png")
        except Exception as e:  # noqa: BLE001
            print("plot failed", repr(e), flush=True)
    dump()
    # Short table last (the device reply carries the end of the output).
    if a.full:
        print("\nsummary (ours vs cuDNN dense, vs flex same mask, tile-stats overhead)")
        for r in res["full"]:
            if r.get("summary"):
                print(f"D={r['D']:3d} H={r['H']:2d} S={r['S']:6d} dens={r['density']:.3f} "
                      f"ours {r['ours_ms']:8.3f} ms {r['ours_tflops']:4.0f} TF/s "
                      f"ours/cudnn={r['ours_vs_cudnn']:.3f} ours/flex={r['ours_vs_flex']:.3f} "
                      f"stats={r['stats_overhead']:+.1%}")
    print("check_ok", res.get("check_ok"), "wall_s", round(res["wall_s"], 1))


if __name__ == "__main__":
    main()
