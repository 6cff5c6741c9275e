"""GPU check and benchmark of the 8-bit block-sparse attention path against cuDNN and the bf16 kernel.

    python benchmarks/attention_kernel_fp8.py --check --sweep --cost --full --out benchmarks/results

- ``--check``: on small shapes, each recipe (Q.K fp8/int8 x P.V fp8/16-bit) and launch variant: the Triton
  quantisation pass against the torch reference (8-bit codes, scales), the attention kernel against the
  reference attention on the same codes (output, LSE, tile statistics, -inf patterns, NaN), and the whole
  path against float32 attention. The kernel runs before the reference on fresh random inputs, so an
  unwritten output element would hold stale data of another case and show as an error.
- ``--sweep``: launch variants (rows per program, BLOCK_N, warps, stages, TMA) and recipes at one shape per
  head dim, time with and without the quantisation pass; the fastest variant per head dim becomes the
  launch of the rest of the run (recorded in the JSON).
- ``--cost``: the device cost table (:func:`dit_accel.kernels.cost_model.measure_cost_table`), written as
  ``cost_table.json`` (the package ships it as its fallback table).
- ``--full``: heads x head dims x tokens x densities: cuDNN SDPA (``SDPBackend.CUDNN_ATTENTION``), the bf16
  kernel and each 8-bit variant (quantisation included in its time), plus accuracy against float32
  attention (relative L2 and cosine on sampled query blocks of every head) on random inputs.

Timing: CUDA events around each call, one warm-up call (compiles), then repeats up to ``--target-ms``,
median. Writes ``attention_kernel_fp8.json`` after every shape, so a time limit keeps what was done.
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
import traceback
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
from dit_accel.kernels import block_sparse_fp8_triton as bfp8  # noqa: E402
from dit_accel.kernels.block_sparse_common import check_index, check_inputs  # noqa: E402
from dit_accel.kernels.block_sparse_fp8_triton import Launch8bit  # noqa: E402
from dit_accel.kernels.reference_common import block_allowed  # noqa: E402
from dit_accel.kernels.fp8_common import RECIPES as RECIPES_BY_PRECISION  # noqa: E402
from dit_accel.kernels.fp8_common import QuantRecipe, fp8_supported  # noqa: E402
from dit_accel.kernels.fp8_quantize_triton import quantize_qkv_triton  # noqa: E402
from dit_accel.kernels.fp8_reference import attention_quantized_reference, quantize_qkv_reference  # noqa: E402

DEV = "cuda"
RECIPES = {
    "fp8": RECIPES_BY_PRECISION["fp8"],
    "fp8_qk_fp8_pv": QuantRecipe("fp8", "fp8"),
    "fp8_qk": QuantRecipe("fp8", "16bit"),
    "int8_qk": QuantRecipe("int8", "16bit"),
}
"""Variants measured: name -> recipe. ``fp8`` is what ``precision="fp8"`` runs (int8 Q.K, e4m3 P.V)."""


def time_ms(fn, target_ms: float = 120.0, min_reps: int = 3, max_reps: int = 30) -> float:
    """Median time of ``fn()`` in ms (CUDA events), after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end), 1e-3)
    times = []
    for _ in range(int(min(max_reps, max(min_reps, target_ms / est)))):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def tflops(H: int, S: int, D: int, density: float, ms: float) -> float:
    return 4.0 * H * S * S * D * density / (ms * 1e-3) / 1e12


def random_mask(H: int, S: int, density: float, seed: int = 0):
    """Per-head random top-k block mask with round(density * KB) key blocks per query block."""
    kb = math.ceil(S / 128)
    if density >= 1.0:
        return dense_block_mask(1, H, S, S, device=DEV)
    g = torch.Generator(device=DEV).manual_seed(seed)
    scores = torch.rand(1, H, kb, kb, device=DEV, generator=g)
    return block_mask_from_scores(scores, top_k=max(1, round(density * kb)), keep_diagonal=False, q_len=S, kv_len=S)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.float(), ref.float()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def cosine(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.float().flatten(), ref.float().flatten()
    return float((x @ ref) / (x.norm() * ref.norm()).clamp_min(1e-30))


def fin(t: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(t), t, torch.zeros_like(t))


# ----------------------------------------------------------------------------------------------- check
CHECK_CASES = [
    (1, 2, 1000, 1000, 128, torch.bfloat16, 0.5, "bhsd", 128, False, 0.0),
    (2, 3, 777, 777, 64, torch.float16, 0.6, "bshd", 128, True, 3.0),
    (1, 2, 640, 900, 72, torch.bfloat16, 0.7, "bhsd", 128, True, 0.0),
    (1, 2, 2048 + 17, 2048 + 17, 128, torch.bfloat16, 1.0, "bshd", 128, False, 5.0),
    (1, 2, 515, 515, 128, torch.float16, 0.5, "bhsd", 64, True, 0.0),
    (1, 2, 384, 384, 64, torch.float32, 0.6, "bhsd", 128, False, 0.0),
]
"""(B, H, S_q, S_kv, D, dtype, density, layout, block size, permuted, key offset) of the GPU checks."""


def run_check(log: list, cases: list = CHECK_CASES, public_shape: tuple[int, int] = (4, 4096)) -> bool:
    ok_all = True
    for ci, (B, H, S_q, S_kv, D, dt, dens, layout, blk, perm, k_bias) in enumerate(cases):
        # Every recipe on the first two cases, the default one on the rest (each variant is a compile).
        for name, recipe in (RECIPES.items() if ci < 2 else [("fp8", RECIPES["fp8"])]):
            torch.manual_seed(1000 * ci + len(name))
            if layout == "bshd":
                q = torch.randn(B, S_q, H, D, device=DEV, dtype=dt).transpose(1, 2)
                k, v = (torch.randn(B, S_kv, H, D, device=DEV, dtype=dt).transpose(1, 2) for _ in range(2))
            else:
                q = torch.randn(B, H, S_q, D, device=DEV, dtype=dt)
                k, v = (torch.randn(B, H, S_kv, D, device=DEV, dtype=dt) for _ in range(2))
            k = k + (k_bias * torch.randn(1, 1, 1, D, device=DEV)).to(dt)
            nq, nk = math.ceil(S_q / blk), math.ceil(S_kv / blk)
            bb = torch.rand(1 if B > 1 else B, H, nq, nk, device=DEV) < dens
            bb[..., 0, :] = False  # an empty query block
            mask = block_mask_from_bool(bb, S_q, S_kv, blk)
            view = check_inputs(q, k, v, mask, None)
            qi = check_index("q_index", torch.randperm(S_q, device=DEV).to(torch.int32) if perm else None,
                             B, H, S_q, q.device)
            ki = check_index("kv_index", torch.randperm(S_kv, device=DEV).to(torch.int32) if perm else None,
                             B, H, S_kv, q.device)
            qq = quantize_qkv_triton(q, k, v, view, recipe, q_index=qi, kv_index=ki, row_bias=True)
            rq = quantize_qkv_reference(q, k, v, view, recipe, q_index=qi, kv_index=ki, row_bias=True, k_mean=qq.k_mean)
            code_mismatch = {f: float((getattr(qq, f).float() != getattr(rq, f).float()).float().mean())
                             for f in ("q", "k", "v")}
            scale_err = max(float((getattr(qq, f) - getattr(rq, f)).abs().max() / getattr(rq, f).abs().max())
                            for f in ("q_scale", "k_scale", "v_scale"))
            # Default launch; pointer loads with 64-key sub-tiles; 64-row programs on TMA (no tile statistics).
            variants = [(None, True), (Launch8bit(blk, 64, 4 if blk == 64 else 8, 3, False), True),
                        (Launch8bit(64, 128 if blk == 128 else 64, 4, 3, True), False)]
            for launch_used, ts in variants:
                try:
                    got = bfp8.attention_quantized_triton(qq, view, out_dtype=q.dtype, return_lse=True,
                                                          tile_stats=ts, q_index=qi, launch=launch_used)
                    ref = attention_quantized_reference(qq, view, out_dtype=q.dtype, return_lse=True,
                                                        tile_stats=ts, q_index=qi)
                    exact = block_sparse_attention_reference(q.float(), k.float(), v.float(), mask,
                                                             q_index=qi, kv_index=ki)
                    e_out = rel_err(got.out, ref.out)
                    e_lse = float((fin(got.lse) - fin(ref.lse)).abs().max())
                    inf_ok = torch.equal(torch.isinf(got.lse), torch.isinf(ref.lse))
                    e_ts = 0.0
                    if ts:
                        e_ts = float((fin(got.tile_stats) - fin(ref.tile_stats)).abs().max())
                        inf_ok = inf_ok and torch.equal(torch.isinf(got.tile_stats), torch.isinf(ref.tile_stats))
                    nan = bool(got.out.isnan().any() or got.lse.isnan().any())
                    e_exact = rel_err(got.out, exact)
                    bound = 0.02 if recipe == QuantRecipe("int8", "16bit") else 0.08
                    ok = (e_out < 1e-2 and e_lse < 1e-2 and e_ts < 5e-2 and inf_ok and not nan
                          and e_exact < bound and max(code_mismatch.values()) < 1e-3 and scale_err < 1e-5)
                    rec = dict(case=ci, B=B, H=H, S_q=S_q, S_kv=S_kv, D=D, dtype=str(dt), block=blk, perm=perm,
                               k_bias=k_bias, recipe=name, launch=None if launch_used is None else list(launch_used),
                               tile_stats=ts, code_mismatch=code_mismatch, scale_rel_err=scale_err,
                               rel_err_same_codes=e_out, lse_err_same_codes=e_lse, ts_err_same_codes=e_ts,
                               inf_pattern_ok=inf_ok, nan=nan, rel_err_vs_fp32=e_exact, ok=ok)
                except Exception as e:  # noqa: BLE001 - a failing variant is recorded, not fatal
                    ok = False
                    rec = dict(case=ci, recipe=name, launch=None if launch_used is None else list(launch_used),
                               tile_stats=ts, error=repr(e)[:500], ok=False)
                    traceback.print_exc()
                ok_all &= ok
                log.append(rec)
                print("check", {k_: (round(v_, 6) if isinstance(v_, float) else v_) for k_, v_ in rec.items()},
                      flush=True)
    # The public entry point: precision="fp8" runs the 8-bit kernel here and differs from bf16.
    ph, ps = public_shape
    q, k, v = (torch.randn(1, ph, ps, 128, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    m = random_mask(ph, ps, 0.5)
    exact = block_sparse_attention_reference(q.float(), k.float(), v.float(), m)
    e8 = rel_err(block_sparse_attention(q, k, v, m, precision="fp8"), exact)
    e16 = rel_err(block_sparse_attention(q, k, v, m), exact)
    ok = fp8_supported(q)[0] and e8 < 0.08 and e16 < 1e-2 and e8 > e16
    ok_all &= ok
    rec = dict(case="public entry point", supported=fp8_supported(q), rel_err_fp8=e8, rel_err_bf16=e16, ok=ok)
    log.append(rec)
    print("check", rec, flush=True)
    return ok_all


# ----------------------------------------------------------------------------------------------- sweep
SPLIT = Launch8bit(64, 128, 4, 3, True)
"""64-row programs (two per 128-row query block, two CTAs per SM)."""
SWEEP_LAUNCHES = {
    128: [Launch8bit(128, 128, 8, 3, True), Launch8bit(128, 128, 8, 3, False), Launch8bit(128, 128, 8, 4, True),
          Launch8bit(128, 64, 8, 3, True), SPLIT, Launch8bit(64, 128, 4, 2, True), Launch8bit(64, 128, 4, 4, True),
          Launch8bit(64, 64, 4, 3, True)],
    64: [Launch8bit(128, 128, 8, 3, True), Launch8bit(128, 128, 8, 3, False), Launch8bit(128, 64, 4, 3, True),
         SPLIT, Launch8bit(64, 128, 4, 4, True), Launch8bit(64, 64, 4, 3, True)],
}


def run_sweep(log: list, S: int, H: int, D: int, target_ms: float) -> dict:
    """Launch variants x recipes at one shape; returns {recipe name: best Launch8bit}."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(1, H, S, D, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        t_cudnn = time_ms(lambda: F.scaled_dot_product_attention(q, k, v), target_ms)
    t_bf16 = {}
    for dens in (1.0, 0.25):
        mask = random_mask(H, S, dens, seed=S + H)
        t_bf16[dens] = time_ms(lambda: block_sparse_attention(q, k, v, mask), target_ms)
    log.append(dict(S=S, H=H, D=D, variant="cudnn", ms=t_cudnn, bf16_ms=t_bf16))
    print(f"sweep S={S} H={H} D={D} cudnn {t_cudnn:.3f} ms, bf16 kernel x{t_bf16[1.0] / t_cudnn:.3f} "
          f"(0.25: x{t_bf16[0.25] / t_cudnn:.3f})", flush=True)
    best: dict = {}
    plan = [(name, launch, False) for name in ("fp8",) for launch in SWEEP_LAUNCHES[D]]
    plan += [(name, launch, False) for name in RECIPES if name != "fp8" for launch in (SWEEP_LAUNCHES[D][0], SPLIT)]
    plan += [("fp8", launch, True) for launch in (SWEEP_LAUNCHES[D][0], SPLIT)]
    for dens in (1.0, 0.25):
        mask = random_mask(H, S, dens, seed=S + H)
        view = check_inputs(q, k, v, mask, None)
        d = block_mask_density(mask)
        qq = {name: quantize_qkv_triton(q, k, v, view, r) for name, r in RECIPES.items()}
        t_quant = {name: time_ms(lambda: quantize_qkv_triton(q, k, v, view, r), target_ms) for name, r in RECIPES.items()}
        for name, launch, precise in plan:
            recipe = RECIPES[name]
            try:
                t_attn = time_ms(lambda: bfp8.attention_quantized_triton(
                    qq[name], view, out_dtype=q.dtype, launch=launch, pv_precise=precise), target_ms)
                t_e2e = time_ms(lambda: bfp8.block_sparse_attention_fp8_triton(
                    q, k, v, view, recipe=recipe, launch=launch, pv_precise=precise), target_ms)
            except Exception as e:  # noqa: BLE001 - a config that does not fit is reported, not fatal
                print(f"sweep {name} {launch} precise={precise} failed: {e!r}"[:300], flush=True)
                log.append(dict(S=S, H=H, D=D, density=d, recipe=name, launch=list(launch), pv_precise=precise,
                                error=repr(e)[:300]))
                continue
            rec = dict(S=S, H=H, D=D, density=d, recipe=name, launch=list(launch), pv_precise=precise,
                       ms_attention=t_attn, ms_quantize=t_quant[name], ms=t_e2e,
                       ratio_vs_cudnn=t_e2e / t_cudnn, ratio_vs_bf16=t_e2e / t_bf16[dens],
                       tflops=tflops(H, S, D, d, t_e2e))
            log.append(rec)
            print(f"sweep D={D} dens={d:.2f} {name:15s} {str(tuple(launch)):28s} precise={precise:d} "
                  f"attn {t_attn:8.3f} quant {t_quant[name]:6.3f} e2e {t_e2e:8.3f} ms x{t_e2e / t_cudnn:.3f} cuDNN "
                  f"x{t_e2e / t_bf16[dens]:.3f} bf16 {rec['tflops']:.0f} TF/s", flush=True)
    # Best launch per recipe: smallest sum of (dense + 0.25) end-to-end times, without pv_precise.
    for name in RECIPES:
        rows = [r for r in log if r.get("recipe") == name and r.get("D") == D and "ms" in r and not r["pv_precise"]]
        score: dict = {}
        for r in rows:
            score.setdefault(tuple(r["launch"]), []).append(r["ms"])
        full = {lch: sum(ts) for lch, ts in score.items() if len(ts) == 2}
        if full:
            best[name] = Launch8bit(*min(full, key=full.get))
    del q, k, v
    torch.cuda.empty_cache()
    return best


# ------------------------------------------------------------------------------------------------ full
def sampled_reference(q, k, v, mask, out_by_variant: dict) -> dict:
    """Relative L2 and cosine of each output against float32 attention on three query blocks (first, middle,
    last) of every head."""
    B, H, S, D = q.shape
    view = check_inputs(q, k, v, mask, None)
    n_qb = view.num_q_blocks
    qbs = sorted({0, n_qb // 2, n_qb - 1})
    rows = torch.cat([torch.arange(b * 128, min((b + 1) * 128, S), device=DEV) for b in qbs])
    allowed = block_allowed(view, B, H)[:, :, qbs, :]  # (B, H, len(qbs), KB)
    row_block = torch.cat([torch.full((min((b + 1) * 128, S) - b * 128,), i, device=DEV) for i, b in enumerate(qbs)])
    col_block = torch.arange(S, device=DEV) // 128
    refs = []
    for h0 in range(0, H, 4):
        h1 = min(H, h0 + 4)
        logits = q[:, h0:h1, rows].float() @ k[:, h0:h1].float().transpose(-1, -2) / math.sqrt(D)
        tok = allowed[:, h0:h1][:, :, row_block][..., col_block]
        logits = logits.masked_fill(~tok, float("-inf"))
        refs.append(torch.softmax(logits, dim=-1) @ v[:, h0:h1].float())
        del logits, tok
    ref = torch.cat(refs, dim=1)
    return {name: dict(rel_l2=rel_err(o[:, :, rows], ref), cosine=cosine(o[:, :, rows], ref))
            for name, o in out_by_variant.items()}


def run_full(log: list, heads, tokens, dims, densities, target_ms: float, variants: list[str], dump,
             deadline: float) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for D in dims:
        for H in heads:
            for S in tokens:
                if time.time() > deadline:
                    log.append(dict(note=f"stopped before D={D} H={H} S={S}: time budget"))
                    return
                q, k, v = (torch.randn(1, H, S, D, device=DEV, dtype=torch.bfloat16) for _ in range(3))
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    t_cudnn = time_ms(lambda: F.scaled_dot_product_attention(q, k, v), target_ms)
                print(f"full D={D} H={H} S={S} cudnn {t_cudnn:.3f} ms {tflops(H, S, D, 1.0, t_cudnn):.0f} TF/s",
                      flush=True)
                for dens in densities:
                    try:
                        mask = random_mask(H, S, dens, seed=S + H)
                        d = block_mask_density(mask)
                        view = check_inputs(q, k, v, mask, None)
                        row = dict(H=H, S=S, D=D, density=d, nominal_density=dens, cudnn_ms=t_cudnn)
                        outs = {"bf16": block_sparse_attention(q, k, v, mask)}
                        row["bf16_ms"] = time_ms(lambda: block_sparse_attention(q, k, v, mask), target_ms)
                        for name in variants:
                            fn = lambda: bfp8.block_sparse_attention_fp8_triton(q, k, v, view, recipe=RECIPES[name])  # noqa: E731
                            outs[name] = fn()
                            row[f"{name}_ms"] = time_ms(fn, target_ms)
                        acc = sampled_reference(q, k, v, mask, outs)
                        for name in ["bf16"] + variants:
                            row[f"{name}_vs_cudnn"] = row[f"{name}_ms"] / t_cudnn
                            row[f"{name}_rel_l2"] = acc[name]["rel_l2"]
                            row[f"{name}_cosine"] = acc[name]["cosine"]
                        del outs
                    except Exception as e:  # noqa: BLE001
                        traceback.print_exc()
                        row = dict(H=H, S=S, D=D, nominal_density=dens, error=repr(e)[:500])
                    log.append(row)
                    print("full", {k_: (round(v_, 4) if isinstance(v_, float) else v_) for k_, v_ in row.items()},
                          flush=True)
                del q, k, v
                torch.cuda.empty_cache()
                dump()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--cost", action="store_true")
    p.add_argument("--full", action="store_true")
    p.add_argument("--sweep-shapes", default="32760,12,128;32760,40,64", help="S,H,D;... of the sweeps")
    p.add_argument("--heads", default="12,40")
    p.add_argument("--tokens", default="32760,75600")
    p.add_argument("--dims", default="128,64")
    p.add_argument("--densities", default="1.0,0.5,0.25,0.1")
    p.add_argument("--variants", default="fp8,fp8_qk_fp8_pv,int8_qk", help="8-bit recipes timed in --full")
    p.add_argument("--target-ms", type=float, default=120.0)
    p.add_argument("--budget-s", type=float, default=230.0, help="stop starting new --full shapes after this")
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    a = p.parse_args()
    t0 = time.time()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    import triton

    meta = dict(
        device=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
        versions=dict(torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                      cudnn=torch.backends.cudnn.version(), python=platform.python_version()),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        recipes={k: list(v) for k, v in RECIPES.items()},
        default_launch={d: list(v) for d, v in bfp8._LAUNCH_8BIT.items()},
        timing="CUDA events, 1 warm-up, median of repeats; 8-bit times include the quantisation pass; "
               "effective TFLOP/s = 4*H*S^2*D*density/t",
        inputs="random normal bf16 (1, H, S, D); masks: random top-k key blocks per query block",
    )
    print(meta, flush=True)
    res: dict = dict(meta)
    path = out / "attention_kernel_fp8.json"

    def dump() -> None:
        res["wall_s"] = time.time() - t0
        path.write_text(json.dumps(res, indent=1, default=str))

    if a.check:
        log: list = []
        res["check"] = log
        try:
            res["check_ok"] = run_check(log)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            res["check_ok"] = False
            res["check_error"] = repr(e)[:500]
        dump()
    if a.sweep:
        log = []
        res["sweep"] = log
        chosen = {}
        for shape in a.sweep_shapes.split(";"):
            S, H, D = (int(x) for x in shape.split(","))
            try:
                best = run_sweep(log, S, H, D, a.target_ms)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                log.append(dict(S=S, H=H, D=D, error=repr(e)[:500]))
                continue
            chosen[D] = {k: list(v) for k, v in best.items()}
            if "fp8" in best:
                bfp8._LAUNCH_8BIT[D] = best["fp8"]  # the rest of this run uses the winner
            dump()
        res["sweep_best"] = chosen
        res["launch_used_after_sweep"] = {d: list(v) for d, v in bfp8._LAUNCH_8BIT.items()}
        dump()
    if a.cost:
        from dit_accel.kernels.cost_model import measure_cost_table

        try:
            table = measure_cost_table(progress=lambda s: print(s, flush=True))
            (out / "cost_table.json").write_text(json.dumps(table.to_json(), indent=1))
            res["cost_table"] = "cost_table.json"
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            res["cost_table_error"] = repr(e)[:500]
        dump()
    if a.full:
        log = []
        res["full"] = log
        run_full(log, [int(x) for x in a.heads.split(",")], [int(x) for x in a.tokens.split(",")],
                 [int(x) for x in a.dims.split(",")], [float(x) for x in a.densities.split(",")], a.target_ms,
                 a.variants.split(","), dump, t0 + a.budget_s)
    dump()
    # Short table last (the device reply carries the end of the output).
    if a.full:
        names = ["bf16"] + a.variants.split(",")
        print("\nfull: time / cuDNN dense time (rel L2 vs fp32)")
        for r in res["full"]:
            if "cudnn_ms" in r:
                cells = " ".join(f"{n} {r[f'{n}_vs_cudnn']:.3f} ({r[f'{n}_rel_l2']:.4f})" for n in names if f"{n}_ms" in r)
                print(f"D={r['D']:3d} H={r['H']:2d} S={r['S']:6d} d={r['density']:.2f} cudnn {r['cudnn_ms']:8.2f} ms | {cells}")
    print("check_ok", res.get("check_ok"), "sweep_best", res.get("sweep_best"), "wall_s", round(res["wall_s"], 1))


if __name__ == "__main__":
    main()
