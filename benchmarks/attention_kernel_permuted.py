"""Cost of a token permutation around the block-sparse kernel: folded into the kernel's loads and stores
(``q_index`` / ``kv_index``) against an explicit torch gather + kernel + scatter. GPU only.

    python benchmarks/attention_kernel_permuted.py --check --time --out benchmarks/results

- ``--check``: on the GPU, bf16/fp16, the indexed kernel against the float32 torch reference with the same
  index (relative error of out, LSE and tile-stat errors, -inf patterns), against (explicit gather,
  unindexed kernel, scatter), and the identity index against no index. Ragged S, D 64/72/128, (S,) and
  per-head (1, H, S) indices, the (B, S, H, D) transposed layout, both load paths of the unindexed kernel.
- ``--time``: B=1, D=128, bf16, q/k/v in the model's (B, S, H, D) layout (transposed views), for each
  (H, S, density), medians over interleaved rounds (every variant once per round, CUDA events, one
  warm-up round first), so clock drift hits all variants alike:

  * ``cudnn``: cuDNN SDPA dense;
  * ``plain``: our kernel, no index, on pre-permuted tensors (its default load path: TMA from 24,576 keys);
  * ``plain_ptr``: the same on the pointer load path (what the indexed kernel must use for K/V);
  * ``folded``: our kernel with ``q_index = kv_index = perm`` (permutation folded, no copies);
  * ``folded_s3``: the same with the unindexed pipeline depth (3 stages; ``folded`` uses 5, see
    ``indexed_num_stages``), H=12 only;
  * ``folded_q``: ``q_index`` only, K/V gathered by torch (keeps TMA for K/V), output not scattered;
  * ``explicit``: what ``dit_accel.attention.route`` did before: ``index_select`` of q, k, v, kernel,
    ``argsort`` of the perm and ``index_select`` of the output;
  * ``explicit_inv``: the same with a precomputed inverse permutation (cheapest explicit form);
  * ``folded_head`` / ``explicit_head``: a per-head (1, H, S) random permutation (the k-means order's
    shape), folded vs ``torch.gather`` + kernel + ``torch.gather`` back.

  The permutation is the 3D tile order of the Wan grid (21x30x52 = 32,760 and 21x45x80 = 75,600 tokens,
  ``dit_accel.attention.tiling.visual_order``). Masks: per head random top-k key blocks (exact density).
  Also timed: the index check (sort + compare + sync) of a new index tensor, and the gathers alone.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from attention_kernel import random_mask, rel_err, tflops  # noqa: E402

from dit_accel.kernels import block_mask_from_bool, block_sparse_attention  # noqa: E402
from dit_accel.kernels import block_sparse_triton as bst  # noqa: E402
from dit_accel.kernels.block_sparse_common import check_index, check_inputs  # noqa: E402
from dit_accel.kernels.block_sparse_reference import block_sparse_attention_reference  # noqa: E402
from dit_accel.kernels.reference_common import gather_rows, scatter_rows  # noqa: E402

GRIDS = {32760: (21, 30, 52), 75600: (21, 45, 80)}
"""Wan2.1 latent grids (frames, rows, columns) after patching: 1.3B at 480p and 14B at 720p, 81 frames."""


def tile_order(S: int, device: str) -> torch.Tensor:
    """The 3D tile order of the Wan grid of ``S`` tokens (random permutation if no grid is known)."""
    if S in GRIDS:
        from dit_accel.attention.tiling import visual_order

        perm = visual_order(GRIDS[S])
        if perm is not None:
            return perm.to(device)
    return torch.randperm(S, device=device)


# ----------------------------------------------------------------------------------------------- check
def run_check(log: list) -> bool:
    ok_all = True
    cases = [
        # (B, H, S, D, dtype, density, layout, block, index kind)
        (1, 2, 1000, 128, torch.bfloat16, 0.5, "bhsd", 128, "shared"),
        (2, 3, 777, 64, torch.float16, 0.6, "bshd", 128, "per_head"),
        (1, 2, 640, 72, torch.bfloat16, 0.7, "bshd", 128, "per_head"),
        (1, 2, 4096 + 17, 128, torch.bfloat16, 0.3, "bshd", 128, "shared"),
        (1, 2, 515, 128, torch.float16, 0.5, "bhsd", 64, "shared"),
        (1, 2, 25000 + 3, 128, torch.bfloat16, 0.2, "bshd", 128, "shared"),  # unindexed kernel on TMA
    ]
    for case in cases:
        try:
            ok_all &= _check_case(log, *case)
        except Exception as e:  # noqa: BLE001 - report and go on to the timing
            log.append(dict(case=str(case), error=repr(e)[:1000], ok=False))
            print("check failed", case, repr(e)[:1000], flush=True)
            ok_all = False
    return ok_all


def _check_case(log: list, B, H, S, D, dt, dens, layout, blk, kind) -> bool:
    dev = "cuda"
    fin = lambda t: torch.where(torch.isfinite(t), t, torch.zeros_like(t))  # noqa: E731
    torch.manual_seed(S + D)
    if layout == "bshd":
        q, k, v = [torch.randn(B, S, H, D, device=dev, dtype=dt).transpose(1, 2) for _ in range(3)]
    else:
        q, k, v = [torch.randn(B, H, S, D, device=dev, dtype=dt) for _ in range(3)]
    nb = math.ceil(S / blk)
    bb = torch.rand(B, H, nb, nb, device=dev) < dens
    bb[..., 1, :] = False  # an empty query block
    mask = block_mask_from_bool(bb, S, S, blk)
    if kind == "shared":
        p = torch.randperm(S, device=dev).to(torch.int32)
    else:
        p = torch.argsort(torch.rand(1, H, S, device=dev), dim=-1).to(torch.int32)
    got = block_sparse_attention(q, k, v, mask, return_lse=True, tile_stats=True, q_index=p, kv_index=p)
    rec = dict(B=B, H=H, S=S, D=D, dtype=str(dt), block=blk, layout=layout, index=kind)
    if S * S * B * H <= 4e8:
        ref = block_sparse_attention_reference(q.float(), k.float(), v.float(), mask, return_lse=True,
                                               tile_stats=True, q_index=p, kv_index=p)
        rec.update(
            rel_err_out=rel_err(got.out, ref.out),
            max_err_lse=float((fin(got.lse) - fin(ref.lse)).abs().max()),
            max_err_tile_stats=float((fin(got.tile_stats) - fin(ref.tile_stats)).abs().max()),
            inf_pattern_ok=bool(torch.equal(torch.isinf(got.lse), torch.isinf(ref.lse))
                                and torch.equal(torch.isinf(got.tile_stats), torch.isinf(ref.tile_stats))),
        )
    qp, kp, vp = gather_rows(q, p), gather_rows(k, p), gather_rows(v, p)
    for use_tma in (False, True):
        plain = bst.block_sparse_attention_triton(qp, kp, vp, check_inputs(qp, kp, vp, mask, None),
                                                  return_lse=True, tile_stats=True, use_tma=use_tma)
        out_x = scatter_rows(plain.out, p)
        lse_x = scatter_rows(plain.lse.unsqueeze(-1), p).squeeze(-1)
        tag = "tma" if use_tma else "ptr"
        rec[f"explicit_{tag}_max_abs_diff_out"] = float((got.out.float() - out_x.float()).abs().max())
        rec[f"explicit_{tag}_max_diff_lse"] = float((fin(got.lse) - fin(lse_x)).abs().max())
        rec[f"explicit_{tag}_bitwise"] = bool(torch.equal(got.out, out_x) and torch.equal(got.lse, lse_x)
                                              and torch.equal(got.tile_stats, plain.tile_stats))
    ident = torch.arange(S, device=dev, dtype=torch.int32)
    a = block_sparse_attention(q, k, v, mask, return_lse=True, q_index=ident, kv_index=ident)
    b_ = bst.block_sparse_attention_triton(q, k, v, check_inputs(q, k, v, mask, None), return_lse=True,
                                           use_tma=False)
    rec["identity_vs_none_ptr_bitwise"] = bool(torch.equal(a.out, b_.out) and torch.equal(a.lse, b_.lse))
    rec["nan"] = bool(got.out.isnan().any())
    tol = 2e-2 if dt == torch.bfloat16 else 5e-3
    ok = (not rec["nan"]) and rec["explicit_ptr_max_abs_diff_out"] <= (1e-2 if dt == torch.bfloat16 else 2e-3)
    if "rel_err_out" in rec:
        ok = ok and rec["rel_err_out"] < tol and rec["max_err_lse"] < 2e-2 and rec["max_err_tile_stats"] < 5e-2 \
            and rec["inf_pattern_ok"]
    rec["ok"] = ok
    log.append(rec)
    print("check", rec, flush=True)
    return ok


# ------------------------------------------------------------------------------------------------ time
def interleaved_ms(fns: dict, rounds: int) -> dict:
    """Median ms of each callable, timed in interleaved rounds after one warm-up round (CUDA events).
    A callable that raises in the warm-up is reported as ``error: ...`` and not timed."""
    failed = {}
    for name, f in list(fns.items()):
        try:
            f()
        except Exception as e:  # noqa: BLE001 - one broken variant must not lose the others
            failed[name] = f"error: {e!r}"[:400]
            print(name, failed[name], flush=True)
    fns = {n: f for n, f in fns.items() if n not in failed}
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times: dict = {name: [] for name in fns}
    for _ in range(rounds):
        for name, f in fns.items():
            start.record()
            f()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end))
    return {**{name: statistics.median(t) for name, t in times.items()}, **failed}


def sync_ms(fn, reps: int = 5) -> float:
    """Median host wall time of ``fn`` (which synchronises), in ms."""
    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def run_time(log: list, heads: list[int], tokens: list[int], densities: list[float], rounds: int, dump) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = "cuda"
    D = 128
    for S in tokens:
        perm = tile_order(S, dev)  # int64, as the sparse methods keep it
        perm32 = perm.to(torch.int32)
        inv = torch.argsort(perm)
        for H in heads:
            q, k, v = [torch.randn(1, S, H, D, device=dev, dtype=torch.bfloat16).transpose(1, 2) for _ in range(3)]
            qp, kp, vp = (x.index_select(2, perm) for x in (q, k, v))
            hperm = torch.argsort(torch.rand(1, H, S, device=dev), dim=-1)
            hperm32 = hperm.to(torch.int32)
            hinv = torch.argsort(hperm, dim=-1)
            row = dict(B=1, H=H, S=S, D=D)

            # The index check of a new tensor (sort + compare + host sync); later calls with the same tensor skip it.
            chk = dict(
                check_shared_ms=sync_ms(lambda: check_index("q_index", perm32.clone(), 1, H, S, q.device)),
                check_per_head_ms=sync_ms(lambda: check_index("q_index", hperm32.clone(), 1, H, S, q.device)),
            )
            check_index("q_index", perm32, 1, H, S, q.device)
            check_index("q_index", hperm32, 1, H, S, q.device)
            gathers = interleaved_ms({
                "gather_qkv": lambda: [x.index_select(2, perm) for x in (q, k, v)],
                "argsort_perm": lambda: torch.argsort(perm),
                "scatter_out": lambda: qp.index_select(2, inv),
            }, rounds)
            log.append(dict(row, kind="aux", **chk, **{f"{k_}_ms": t for k_, t in gathers.items()}))
            print(f"aux H={H} S={S}", chk, gathers, flush=True)

            def gh(x, idx):
                return torch.gather(x, 2, idx[..., None].expand(-1, -1, -1, D))

            for dens in densities:
                mask = random_mask(1, H, S, dens, dev, seed=S + H)
                view = check_inputs(q, k, v, mask, None)
                d = float(view.kv_num_blocks.sum()) / (H * view.num_q_blocks * view.num_kv_blocks)
                fns = {
                    "cudnn": None,
                    "plain": lambda: block_sparse_attention(qp, kp, vp, mask),
                    "plain_ptr": lambda: bst.block_sparse_attention_triton(
                        qp, kp, vp, view, use_tma=False),
                    "folded": lambda: block_sparse_attention(q, k, v, mask, q_index=perm32, kv_index=perm32),
                    "folded_q": lambda: block_sparse_attention(
                        q, k.index_select(2, perm), v.index_select(2, perm), mask, q_index=perm32),
                    "explicit": lambda: block_sparse_attention(
                        q.index_select(2, perm), k.index_select(2, perm), v.index_select(2, perm), mask
                    ).index_select(2, torch.argsort(perm)),
                    "explicit_inv": lambda: block_sparse_attention(
                        q.index_select(2, perm), k.index_select(2, perm), v.index_select(2, perm), mask
                    ).index_select(2, inv),
                    "folded_head": lambda: block_sparse_attention(q, k, v, mask, q_index=hperm32, kv_index=hperm32),
                    "explicit_head": lambda: gh(block_sparse_attention(gh(q, hperm), gh(k, hperm), gh(v, hperm), mask),
                                                hinv),
                }
                if H == min(heads):
                    fns["folded_s3"] = lambda: bst.block_sparse_attention_triton(
                        q, k, v, view, config=(128, 8, 3), q_index=perm32, kv_index=perm32)
                if dens < 1.0:
                    del fns["cudnn"]
                else:
                    def cudnn():
                        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                            F.scaled_dot_product_attention(q, k, v)
                    fns["cudnn"] = cudnn
                ms = interleaved_ms(fns, rounds)
                if "cudnn" in ms:
                    row["cudnn_ms"] = ms["cudnn"]
                def ratio(a_: str, b_: str = "plain") -> float:
                    x, y = ms.get(a_), ms.get(b_)
                    return x / y - 1.0 if isinstance(x, float) and isinstance(y, float) else float("nan")

                b = ms["plain"]
                rec = dict(row, kind="time", density=d, nominal_density=dens, ms=ms,
                           plain_tflops=tflops(1, H, S, D, d, b),
                           overhead_folded=ratio("folded"),
                           overhead_folded_q=ratio("folded_q"),
                           overhead_explicit=ratio("explicit"),
                           overhead_explicit_inv=ratio("explicit_inv"),
                           overhead_folded_head=ratio("folded_head"),
                           overhead_explicit_head=ratio("explicit_head"),
                           ptr_vs_tma=ratio("plain_ptr"),
                           folded_vs_plain_ptr=ratio("folded", "plain_ptr"),
                           vs_cudnn={name: t / row["cudnn_ms"] for name, t in ms.items() if isinstance(t, float)}
                           if "cudnn_ms" in row else None)
                if "folded_s3" in ms:
                    rec["overhead_folded_s3"] = ratio("folded_s3")
                log.append(rec)
                print(f"time H={H} S={S} dens={d:.3f} " + " ".join(
                    f"{n}={t:.3f}" if isinstance(t, float) else f"{n}=ERR" for n, t in ms.items()), flush=True)
                print(f"     overhead vs plain: folded {rec['overhead_folded']:+.2%} folded_q {rec['overhead_folded_q']:+.2%} "
                      f"explicit {rec['overhead_explicit']:+.2%} explicit_inv {rec['overhead_explicit_inv']:+.2%} "
                      f"head: folded {rec['overhead_folded_head']:+.2%} explicit {rec['overhead_explicit_head']:+.2%} "
                      f"ptr_vs_tma {rec['ptr_vs_tma']:+.2%}", flush=True)
                del mask, view
            del q, k, v, qp, kp, vp
            torch.cuda.empty_cache()
            dump()


def run_diagnose(log: list, shapes: list[tuple[int, int]], densities: list[float], rounds: int, dump) -> None:
    """Where the folded overhead goes: layout, q side, K/V side, pipeline depth and BLOCK_N of the indexed
    kernel (H=heads, S=tokens pairs; D=128, bf16)."""
    dev = "cuda"
    D = 128
    for H, S in shapes:
        perm = tile_order(S, dev)
        perm32 = perm.to(torch.int32)
        ident = torch.arange(S, device=dev, dtype=torch.int32)
        q, k, v = [torch.randn(1, S, H, D, device=dev, dtype=torch.bfloat16).transpose(1, 2) for _ in range(3)]
        qp, kp, vp = (x.index_select(2, perm) for x in (q, k, v))
        for dens in densities:
            mask = random_mask(1, H, S, dens, dev, seed=S + H)
            view = check_inputs(q, k, v, mask, None)
            d = float(view.kv_num_blocks.sum()) / (H * view.num_q_blocks * view.num_kv_blocks)

            def ours(qq, kk, vv, qi=None, ki=None, config=None, tma=None):
                return lambda: bst.block_sparse_attention_triton(qq, kk, vv, view, config=config, use_tma=tma,
                                                                 q_index=qi, kv_index=ki)

            fns = {
                "plain": ours(qp, kp, vp),
                "plain_ptr": ours(qp, kp, vp, tma=False),
                "ptr_bshd": ours(q, k, v, tma=False),  # model layout, no permutation
                "folded": ours(q, k, v, perm32, perm32),
                "folded_s3": ours(q, k, v, perm32, perm32, (128, 8, 3)),
                "folded_s4": ours(q, k, v, perm32, perm32, (128, 8, 4)),
                "folded_bn64_s5": ours(q, k, v, perm32, perm32, (64, 8, 5)),
                "folded_bn64_s7": ours(q, k, v, perm32, perm32, (64, 8, 7)),
                "folded_ident": ours(q, k, v, ident, ident),
                "q_only_pre": ours(q, kp, vp, perm32, None),  # K/V already permuted: TMA, q side only
                "kv_only_ptr": ours(qp, k, v, None, perm32),  # q already permuted: K/V side only
                "plain_stats": lambda: bst.block_sparse_attention_triton(qp, kp, vp, view, tile_stats=True),
                "folded_stats": lambda: bst.block_sparse_attention_triton(
                    q, k, v, view, tile_stats=True, q_index=perm32, kv_index=perm32),
            }
            ms = interleaved_ms(fns, rounds)
            b = ms["plain"]
            rec = dict(H=H, S=S, D=D, kind="diagnose", density=d, nominal_density=dens, ms=ms,
                       vs_plain={n: (t / b - 1.0 if isinstance(t, float) else t) for n, t in ms.items()})
            log.append(rec)
            print(f"diag H={H} S={S} dens={d:.3f} plain={b:.3f} " + " ".join(
                f"{n}={t / b - 1:+.2%}" if isinstance(t, float) else f"{n}=ERR" for n, t in ms.items() if n != "plain"),
                flush=True)
        del q, k, v, qp, kp, vp
        torch.cuda.empty_cache()
        dump()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true")
    p.add_argument("--time", action="store_true")
    p.add_argument("--diagnose", default="", help="H,S pairs, e.g. 12,32760;40,75600: overhead breakdown")
    p.add_argument("--heads", default="12,40")
    p.add_argument("--tokens", default="32760,75600")
    p.add_argument("--densities", default="1.0,0.25,0.1")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    p.add_argument("--name", default="attention_kernel_permuted")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    import triton

    try:
        import diffusers
        diffusers_version = diffusers.__version__
    except Exception:  # noqa: BLE001
        diffusers_version = None
    meta = dict(
        device=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
        torch=torch.__version__, triton=triton.__version__, diffusers=diffusers_version, cuda=torch.version.cuda,
        python=platform.python_version(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        timing=f"CUDA events, 1 warm-up round, median of {a.rounds} interleaved rounds (each variant once per round)",
        permutation="3D tile order of the Wan grid (tiling.visual_order); *_head: random per-head (1, H, S)",
    )
    print(meta, flush=True)
    res: dict = dict(meta=meta)
    t0 = time.time()
    path = out / f"{a.name}.json"

    def dump() -> None:
        res["wall_s"] = time.time() - t0
        path.write_text(json.dumps(res, indent=1, default=str))

    if a.check:
        log: list = []
        res["check"] = log
        res["check_ok"] = run_check(log)
        dump()
    if a.time:
        log = []
        res["time"] = log
        run_time(log, [int(x) for x in a.heads.split(",")], [int(x) for x in a.tokens.split(",")],
                 [float(x) for x in a.densities.split(",")], a.rounds, dump)
    if a.diagnose:
        log = []
        res["diagnose"] = log
        shapes = [tuple(int(x) for x in pair.split(",")) for pair in a.diagnose.split(";")]
        run_diagnose(log, shapes, [float(x) for x in a.densities.split(",")], a.rounds, dump)
    dump()
    if a.time:
        print("\nsummary: permutation overhead relative to the unindexed kernel on pre-permuted tensors")
        for r in res["time"]:
            if r.get("kind") == "time":
                print(f"H={r['H']:2d} S={r['S']:6d} dens={r['density']:.3f} plain {r['ms']['plain']:8.3f} ms "
                      f"folded {r['overhead_folded']:+.2%} folded_q {r['overhead_folded_q']:+.2%} "
                      f"explicit {r['overhead_explicit']:+.2%} (inv {r['overhead_explicit_inv']:+.2%}) "
                      f"head folded {r['overhead_folded_head']:+.2%} explicit {r['overhead_explicit_head']:+.2%} "
                      f"ptr/tma {r['ptr_vs_tma']:+.2%}"
                      + (f" s3 {r['overhead_folded_s3']:+.2%}" if "overhead_folded_s3" in r else ""))
    print("check_ok", res.get("check_ok"), "wall_s", round(res["wall_s"], 1))


if __name__ == "__main__":
    main()
