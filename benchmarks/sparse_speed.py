"""Speed of the sparse methods at real video attention shapes: planning + permutation cost against the
sparse attention call, and the attention speed-up against dense cuDNN SDPA in the same run.

    python benchmarks/sparse_speed.py --out benchmarks/results                 # GPU: Wan2.1 1.3B 480p + 14B 720p
    python benchmarks/sparse_speed.py --tiny --out /tmp                        # CPU smoke test, tiny shape
    python benchmarks/sparse_speed.py --device cpu --skip-attention --shapes wan2.1-1.3b-480p   # CPU: plan + gather only

Inputs: random q/k/v shaped like real video attention, smooth 3D fields over the latent grid plus
noise (so the draft map finds structure), bf16 on the GPU (float32 on CPU), B=1.

Per shape:
* dense: cuDNN SDPA (the best dense kernel on Hopper; on CPU the default SDPA);
* fixed densities (0.5, 0.3, 0.2, 0.1; random key blocks per query block, diagonal kept): our kernel
  time and the speed-up vs dense;
* each method (draft, permuted tile / k-means, temporal_skip and combo on a refresh call and on a reuse
  call, window): ``plan_ms`` (host + device, synchronised), ``attn_ms`` (the kernel as the route runs it:
  the permutation folded into its loads/stores through ``q_index``/``kv_index``, with tile statistics
  when the method uses them), ``attn_unpermuted_ms`` (the same kernel on already-permuted tensors, no
  index), ``perm_ms = attn_ms - attn_unpermuted_ms`` (what the folded permutation costs), the density,
  ``overhead = (plan + perm) / attn_unpermuted`` (target <= 5 %) and ``speedup = dense / (plan + attn)``;
* ``calibrate_ms`` for ``temporal_skip``/``combo``: the exact block mass computed once per generation per
  layer and branch (on the last dense warm-up step), and its share amortised over the sparse calls of a
  50-step generation with 15 % warm-up (42 calls per layer and branch).

Timing: wall clock around a synchronised call, median of ``--reps`` after one warm-up call (planning
has host work, so CUDA events alone would hide it). JSON records device, versions and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit_accel.attention import draft as draft_module  # noqa: E402
from dit_accel.attention.draft import cached_pool_matrix, draft_map, permute_tokens, top_p_keep  # noqa: E402
from dit_accel.attention.methods import SparsePlan, get_method  # noqa: E402
from dit_accel.attention.oracle import block_mass  # noqa: E402
from dit_accel.attention.route import kernel_index  # noqa: E402
from dit_accel.context import StepClock, TransformerContext  # noqa: E402
from dit_accel.kernels import block_mask_density, block_mask_from_bool, block_sparse_attention  # noqa: E402

SHAPES = {
    "wan2.1-1.3b-480p": {"heads": 12, "grid": (21, 30, 52), "head_dim": 128},  # 32,760 tokens
    "wan2.1-14b-720p": {"heads": 40, "grid": (21, 45, 80), "head_dim": 128},  # 75,600 tokens
    "tiny": {"heads": 2, "grid": (4, 16, 16), "head_dim": 64},  # 1,024 tokens (CPU smoke test)
}
"""Attention shapes (B=1): heads, latent grid (F', H', W') after patching, head dim."""

VALVES_OFF = {"dense_warmup": 0.0, "dense_first_layers": 0, "dense_last_step": False, "min_seq_len": 0}

METHODS: list[tuple[str, str, dict]] = [
    ("draft/quality", "draft", {"quality": "quality"}),
    ("draft/balanced", "draft", {"quality": "balanced"}),
    ("draft/fast", "draft", {"quality": "fast"}),
    ("permuted-tile/balanced", "permuted", {"quality": "balanced", "order": "tile"}),
    ("permuted-kmeans/balanced", "permuted", {"quality": "balanced", "order": "kmeans"}),
    ("temporal_skip/balanced", "temporal_skip", {"quality": "balanced"}),
    ("combo/quality", "combo", {"quality": "quality"}),
    ("combo/balanced", "combo", {"quality": "balanced"}),
    ("combo/fast", "combo", {"quality": "fast"}),
    ("combo-nodrift/balanced", "combo", {"quality": "balanced", "drift_check": False}),
    ("window/f3s9", "window", {"frame_radius": 3, "space_radius": 9}),
    # the presets' setting (v2): plan on refresh calls only, no drift check, no tile statistics
    ("combo-reuse/balanced", "combo", {"quality": "balanced", "drift_check": False, "skip_threshold": float("-inf")}),
]
"""(label, method, options) timed per shape; stateful methods are timed on a refresh and a reuse call (the
exact-mass calibration is timed apart, ``calibrate_ms``)."""

FIXED_DENSITIES = (0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)

SPARSE_CALLS_PER_GENERATION = 42
"""Sparse calls per layer and branch in a 50-step generation with 15 % dense warm-up and a dense last step."""


def environment(device: torch.device) -> dict:
    """Device, versions and date for the record."""
    import diffusers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {"device": name, "torch": torch.__version__, "triton": triton_version, "diffusers": diffusers.__version__,
            "python": platform.python_version(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def sync(device: torch.device) -> None:
    """Wait for the device."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, reps: int) -> float:
    """Median wall time of ``fn()`` in ms over ``reps`` synchronised calls, after one warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def video_qkv(grid, heads: int, dim: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """q, k, v ``(1, H, S, D)`` views of ``(1, S, H, D)`` memory (diffusers' layout): smooth random fields over
    the grid plus noise."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    F_, H_, W_ = grid
    out = []
    for i in range(3):
        coarse = torch.randn(1, heads * dim, max(1, F_ // 3), max(1, H_ // 6), max(1, W_ // 6), generator=g).to(device)
        field = torch.nn.functional.interpolate(coarse, size=grid, mode="trilinear", align_corners=False)
        x = field.view(heads, dim, -1).permute(2, 0, 1)  # (S, H, D)
        x = x + 0.5 * torch.randn(x.shape, generator=g).to(device)
        # (B, S, H, D) memory viewed as (B, H, S, D): how diffusers' processors hand q, k, v over
        out.append((2.0 * x if i < 2 else x).unsqueeze(0).to(dtype).contiguous().transpose(1, 2))
        del coarse, field
    return out


def hand_call(grid, seq_len: int, step: int, ctx: TransformerContext | None = None):
    """A context (created when ``ctx`` is None) and the ``AttentionCall`` of layer 1 at ``step``."""
    if ctx is None:
        ctx = TransformerContext(torch.nn.Linear(1, 1), "wan", "transformer", StepClock(num_steps_fn=lambda: 50), "sequential")
        ctx.grid = tuple(grid)
        ctx.stats_enabled = False  # no statistics host syncs inside the timed plans
    ctx.clock.observe(float(1000 - step))
    ctx.branches = ("cond",)
    return ctx, ctx.attention_call(1, "blocks.1.attn1", ctx.layout(seq_len, 0, "none"))


def dense_fn(q, k, v, device: torch.device):
    """Dense attention on the best backend: ``(fn, backend name)``; cuDNN on CUDA, else flash, else default."""
    if device.type != "cuda":
        return (lambda: F.scaled_dot_product_attention(q, k, v)), "cpu_sdpa"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        def run(backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v)
        try:
            run()
            torch.cuda.synchronize(device)
            return run, name
        except RuntimeError as exc:
            print(f"dense backend {name} failed: {exc}", flush=True)
    return (lambda: F.scaled_dot_product_attention(q, k, v)), "sdpa_default"


def random_mask(nb: int, density: float, device: torch.device, seed: int = 0):
    """Random key blocks per query block at ``density`` (diagonal kept), B = H = 1."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    keep = torch.rand(nb, nb, generator=g) < density
    keep |= torch.eye(nb, dtype=torch.bool)
    return keep.view(1, 1, nb, nb).to(device)


BREAKDOWN_LABELS = ("draft/balanced", "combo-reuse/balanced")
"""Methods whose planning is broken down into map / top-p / protect / BlockMask / rest (``--breakdown``)."""

MAP_VARIANTS = ((64, 3, "tf32"), (128, 2, "tf32"), (128, 3, "tf32"), (128, 3, "tf32x3"))
"""(``draft_map.MAP_ROWS``, ``MAP_STAGES``, ``SCORE_PRECISION``) timed in the breakdown (the kernel's knobs)."""


def amortised_row(base: dict, label: str, refresh: dict, reuse: dict) -> dict:
    """Planning cost per call of a method with plan reuse: one refresh plan every ``refresh_period`` computed
    calls (the method's own setting), reused plans in between; per refresh period and over the 42 sparse calls
    of a 50-step generation (the first sparse call is a refresh). Shares are of the sparse attention call
    without permutation (``attn_unpermuted_ms`` of the refresh row)."""
    period = refresh["refresh_period"]
    n_ref = -(-SPARSE_CALLS_PER_GENERATION // period)
    row = dict(base, row="amortised", label=label, refresh_period=period, drift_check=refresh.get("drift_check"),
               refresh_plan_ms=refresh["plan_ms"], reuse_plan_ms=reuse["plan_ms"],
               refresh_plan_ms_torch_map=refresh["plan_ms_torch_map"], reuse_plan_ms_torch_map=reuse["plan_ms_torch_map"])
    for key, ref_ms, reuse_ms in (("", refresh["plan_ms"], reuse["plan_ms"]),
                                  ("_torch_map", refresh["plan_ms_torch_map"], reuse["plan_ms_torch_map"])):
        per_period = (ref_ms + (period - 1) * reuse_ms) / period
        per_generation = (n_ref * ref_ms + (SPARSE_CALLS_PER_GENERATION - n_ref) * reuse_ms) / SPARSE_CALLS_PER_GENERATION
        row[f"plan_ms_per_call{key}"] = per_period
        row[f"plan_ms_per_call_50_steps{key}"] = per_generation
        if "attn_unpermuted_ms" in refresh:
            attn = refresh["attn_unpermuted_ms"]
            row["attn_unpermuted_ms"] = attn
            row[f"refresh_plan_share{key}"] = ref_ms / attn
            row[f"plan_share_per_call{key}"] = per_period / attn
            row[f"plan_share_50_steps{key}"] = per_generation / attn
    return row


def block_mask_by_sort(keep: torch.Tensor, seq_len: int):
    """The BlockMask as ``block_mask_from_bool`` built it up to session 3 (a stable argsort on "not selected"),
    kept here only to time it beside the sort-free compaction (same kv_num_blocks / kv_indices)."""
    from torch.nn.attention.flex_attention import BlockMask

    kv_num = keep.sum(dim=-1, dtype=torch.int32)
    kv_idx = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, BLOCK_SIZE=128, seq_lengths=(seq_len, seq_len),
                                    compute_q_blocks=False)


def plan_breakdown(base: dict, label: str, name: str, options: dict, q: torch.Tensor, k: torch.Tensor, grid,
                   device: torch.device, reps: int) -> dict:
    """Where one (refresh) plan's time goes: the draft map (fused kernel and torch reference), the selection
    (top-p + protect kernel; torch ``top_p_keep``), the whole estimate and plan on both backends, the
    BlockMask, and the rest of ``plan`` (order, state, ...); plus the map kernel at its tuning variants
    (:data:`MAP_VARIANTS`)."""
    from dit_accel.kernels import draft_map as draft_map_kernel

    S = q.shape[-2]
    stateful = name in ("temporal_skip", "combo")
    method = get_method(name, **dict(VALVES_OFF, **options, **({"calibrate": False} if stateful else {})))
    cfg = method.cfg
    ctx, call = hand_call(grid, S, 1)
    perm = method.order(q, k, call)
    scale = 1.0 / math.sqrt(q.shape[-1]) / cfg.temperature
    kw = dict(perm=perm, query_pool=cfg.query_pool, scale=scale, log_block_size=cfg.log_block_size)
    pool = cached_pool_matrix(perm, q.dtype)
    row = dict(base, row="plan_breakdown", label=label, perm_kind=None if perm is None else "shared")
    uses_kernel = draft_module.draft_map_kernel_applies(q)
    if uses_kernel:
        row["map_ms"] = time_ms(lambda: draft_map(q, k, backend="triton", **kw), device, reps)
    row["map_ms_torch"] = time_ms(lambda: draft_map(q, k, pool=pool, backend="torch", **kw), device, reps)
    probs = draft_map(q, k, pool=pool, **kw).probs
    nb = probs.shape[-1]
    min_blocks = max(1, math.ceil(cfg.resolved("min_blocks_fraction") * nb))
    top_p = cfg.resolved("top_p")
    row["top_p_ms_torch"] = time_ms(lambda: top_p_keep(probs, top_p, min_blocks), device, reps)
    if uses_kernel:
        sims = draft_map(q, k, backend="triton", **kw)
        thr = cfg.resolved("similarity_threshold")
        row["select_ms"] = time_ms(lambda: draft_map_kernel.select_blocks_triton(
            probs, sims.q_similarity, sims.k_similarity, top_p=top_p, min_blocks=min_blocks,
            similarity_threshold=thr), device, reps)

    def plan_once():
        ctx.reset_state()
        _, c = hand_call(grid, S, 2, ctx)
        return method.plan(q, k, c)

    for suffix, backend in (("", "auto"), ("_torch", "torch")):
        draft_module.DRAFT_MAP_BACKEND = backend
        try:
            row[f"estimate_ms{suffix}"] = time_ms(lambda: method.estimate(q, k, perm, None), device, reps)
            keep = method.estimate(q, k, perm, None).keep
            row[f"plan_ms{suffix}"] = time_ms(plan_once, device, reps)
        finally:
            draft_module.DRAFT_MAP_BACKEND = "auto"
    row["block_mask_ms"] = time_ms(lambda: block_mask_from_bool(keep, S, S), device, reps)
    # the session-3 BlockMask (stable argsort), timed beside the sort-free compaction: before/after in one run
    row["block_mask_ms_sort"] = time_ms(lambda: block_mask_by_sort(keep, S), device, reps)
    new_mask, sort_mask = block_mask_from_bool(keep, S, S), block_mask_by_sort(keep, S)
    row["block_mask_equal_sort"] = bool(torch.equal(new_mask.kv_num_blocks, sort_mask.kv_num_blocks)
                                        and torch.equal(new_mask.kv_indices, sort_mask.kv_indices))
    # estimate = map + selection (top-p + protect) + small ops; plan = estimate + BlockMask + rest (order, state)
    row["rest_ms"] = row["plan_ms"] - row["estimate_ms"] - row["block_mask_ms"]
    row["rest_ms_torch"] = row["plan_ms_torch"] - row["estimate_ms_torch"] - row["block_mask_ms"]
    if uses_kernel:
        saved = (draft_map_kernel.MAP_ROWS, draft_map_kernel.MAP_STAGES, draft_map_kernel.SCORE_PRECISION)
        variants = {}
        try:
            for rows, stages, precision in MAP_VARIANTS:
                draft_map_kernel.MAP_ROWS, draft_map_kernel.MAP_STAGES = rows, stages
                draft_map_kernel.SCORE_PRECISION = precision
                variants[f"rows{rows}_stages{stages}_{precision}"] = time_ms(
                    lambda: draft_map(q, k, backend="triton", **kw), device, reps)
        finally:
            draft_map_kernel.MAP_ROWS, draft_map_kernel.MAP_STAGES, draft_map_kernel.SCORE_PRECISION = saved
        row["map_ms_variants"] = variants
        row["map_defaults"] = {"MAP_ROWS": saved[0], "MAP_STAGES": saved[1], "SCORE_PRECISION": saved[2],
                               "KEY_CHUNK": draft_map_kernel.KEY_CHUNK}
    return row


def map_check(base: dict, q: torch.Tensor, k: torch.Tensor, grid, device: torch.device) -> dict:
    """The fused kernel against the torch reference on these inputs (bf16 on the GPU), model order and tile
    order: max abs error of the map and the similarities, against the reference as the methods run it (block
    means by a GEMM in the input dtype with a tile order) and against a float32 reference (float32 copies);
    agreement of the keep masks of ``draft_estimate`` (balanced thresholds) between the two backends."""
    from dit_accel.attention.tiling import sequence_order

    S = q.shape[-2]
    out = dict(base, row="map_check")
    if not draft_module.draft_map_kernel_applies(q):
        out["skipped"] = "the kernel does not apply on this device/shape"
        return out
    method = get_method("draft", quality="balanced")
    cfg = method.cfg
    scale = 1.0 / math.sqrt(q.shape[-1]) / cfg.temperature
    ctx, call = hand_call(grid, S, 1)
    for order, perm in (("model", None), ("tile", sequence_order(call.layout, S, q.device))):
        kw = dict(perm=perm, query_pool=cfg.query_pool, scale=scale, log_block_size=cfg.log_block_size)
        got = draft_map(q, k, backend="triton", **kw)
        ref = draft_map(q, k, pool=cached_pool_matrix(perm, q.dtype), backend="torch", **kw)
        ref32 = draft_map(q.float(), k.float(), pool=cached_pool_matrix(perm, torch.float32), backend="torch", **kw)
        res = {}
        for tag, r in (("ref", ref), ("ref_fp32", ref32)):
            res[f"probs_max_abs_err_vs_{tag}"] = (got.probs - r.probs).abs().max().item()
            res[f"probs_max_rel_err_vs_{tag}"] = ((got.probs - r.probs).abs() / r.probs.clamp_min(1e-6)).max().item()
            res[f"q_sim_max_abs_err_vs_{tag}"] = (got.q_similarity - r.q_similarity).abs().max().item()
            res[f"k_sim_max_abs_err_vs_{tag}"] = (got.k_similarity - r.k_similarity).abs().max().item()
        res["probs_row_sum_max_err"] = (got.probs.sum(-1) - 1).abs().max().item()
        res["probs_max"] = got.probs.max().item()
        keeps = {}
        for backend in ("triton", "torch"):
            draft_module.DRAFT_MAP_BACKEND = backend
            try:
                keeps[backend] = method.estimate(q, k, perm, None).keep
            finally:
                draft_module.DRAFT_MAP_BACKEND = "auto"
        res["keep_agreement"] = keeps["triton"].eq(keeps["torch"]).float().mean().item()
        res["keep_equal"] = bool(torch.equal(keeps["triton"], keeps["torch"]))
        res["keep_density_kernel"] = keeps["triton"].float().mean().item()
        res["keep_density_torch"] = keeps["torch"].float().mean().item()
        out[order] = res
        del got, ref, ref32
    return out


def bench_shape(label: str, shape: dict, device: torch.device, dtype: torch.dtype, reps: int, skip_attention: bool,
                log: list, labels: set[str] | None = None, skip_fixed: bool = False, breakdown: bool = False,
                check: bool = False, skip_calibrate: bool = False) -> None:
    """All rows of one shape, appended to ``log``."""
    grid, heads, dim = shape["grid"], shape["heads"], shape["head_dim"]
    S = grid[0] * grid[1] * grid[2]
    q, k, v = video_qkv(grid, heads, dim, device, dtype)
    base = {"shape": label, "tokens": S, "heads": heads, "head_dim": dim, "grid": list(grid), "dtype": str(dtype)}
    dense_ms = None
    if not skip_attention:
        fn, backend = dense_fn(q, k, v, device)
        dense_ms = time_ms(fn, device, reps)
        log.append(dict(base, row="dense", backend=backend, ms=dense_ms))
        print(log[-1], flush=True)
        nb = -(-S // 128)
        for d in () if skip_fixed else FIXED_DENSITIES:
            mask = block_mask_from_bool(random_mask(nb, d, device), S, S)
            ms = time_ms(lambda: block_sparse_attention(q, k, v, mask), device, reps)
            log.append(dict(base, row="fixed_density", nominal_density=d, density=block_mask_density(mask), ms=ms,
                            speedup_vs_dense=dense_ms / ms))
            print(log[-1], flush=True)
    for mlabel, name, options in METHODS:
        if labels and mlabel not in labels:
            continue
        stateful = name in ("temporal_skip", "combo")
        # the calibration (once per generation) is timed apart from the refresh plan
        method = get_method(name, **dict(VALVES_OFF, **options, **({"calibrate": False} if stateful else {})))
        with_stats = method.needs_tile_stats
        phases = ["refresh", "reuse"] if stateful else ["plan"]
        ctx, _ = hand_call(grid, S, 0)
        for phase in phases:
            step = [1]

            def plan_once():
                if phase == "refresh" or not stateful:
                    ctx.reset_state()  # every timed call is a fresh plan (k-means warm start kept separately below)
                step[0] += 1
                _, call = hand_call(grid, S, step[0], ctx)
                return method.plan(q, k, call)

            if phase == "reuse":
                _, call = hand_call(grid, S, 1, ctx)
                ctx.reset_state()
                first = method.plan(q, k, call)
                plan0 = first if isinstance(first, SparsePlan) else SparsePlan(first)
                qp, kp, vp = (permute_tokens(t, plan0.perm) for t in (q, k, v))
                if not skip_attention:
                    stats = block_sparse_attention(qp, kp, vp, plan0.mask, tile_stats=True).tile_stats
                    method.observe(call, stats)
                del qp, kp, vp
                # stay between refreshes while timing
                for st in ctx._store.values():
                    st["ts_calls"] = -10**6
            if name == "permuted" and options.get("order") == "kmeans":
                # steady state: warm-started centroids (not reset between timed calls)
                def plan_once():  # noqa: F811
                    step[0] += 1
                    _, call = hand_call(grid, S, step[0], ctx)
                    return method.plan(q, k, call)
            plan_ms = time_ms(plan_once, device, reps)
            # the same plan with the draft map on the torch reference (the session-2 code path): before/after
            draft_module.DRAFT_MAP_BACKEND = "torch"
            try:
                plan_ms_torch_map = time_ms(plan_once, device, reps)
            finally:
                draft_module.DRAFT_MAP_BACKEND = "auto"
            result = plan_once()
            plan = result if isinstance(result, SparsePlan) else SparsePlan(result)
            perm = plan.perm
            row = dict(base, row="method", label=mlabel, method=name, options=options, phase=phase,
                       density=block_mask_density(plan.mask), plan_ms=plan_ms, plan_ms_torch_map=plan_ms_torch_map,
                       map_kernel=draft_module.draft_map_kernel_applies(q),
                       perm_kind=None if perm is None else ("shared" if perm.dim() == 1 else "per_head"))

            index = None if perm is None else kernel_index(perm, q.device)
            if not skip_attention:
                attn_ms = time_ms(lambda: block_sparse_attention(q, k, v, plan.mask, tile_stats=with_stats, q_index=index,
                                                                 kv_index=index), device, reps)
                if perm is not None:
                    qp, kp, vp = (permute_tokens(t, perm) for t in (q, k, v))
                    base_ms = time_ms(lambda: block_sparse_attention(qp, kp, vp, plan.mask, tile_stats=with_stats),
                                      device, reps)
                    del qp, kp, vp
                else:
                    base_ms = attn_ms
                row.update(attn_ms=attn_ms, attn_unpermuted_ms=base_ms, perm_ms=attn_ms - base_ms,
                           overhead=(plan_ms + attn_ms - base_ms) / base_ms,
                           plan_share=plan_ms / base_ms, plan_share_torch_map=plan_ms_torch_map / base_ms,
                           speedup_vs_dense=dense_ms / (plan_ms + attn_ms), attn_speedup_vs_dense=dense_ms / attn_ms)
            if stateful and phase == "refresh" and not skip_calibrate:
                qp, kp = (permute_tokens(t, perm) for t in (q, k))
                cal_ms = time_ms(lambda: block_mass(qp, kp), device, max(1, reps // 4))
                del qp, kp
                row["calibrate_ms"] = cal_ms
                if not skip_attention:
                    row["calibrate_share"] = cal_ms / (SPARSE_CALLS_PER_GENERATION * row["attn_ms"])
            if stateful:
                row["refresh_period"] = method.cfg.resolved("refresh_period")
                row["drift_check"] = method.cfg.drift_check
            log.append(row)
            print({k_: v_ for k_, v_ in row.items() if k_ not in ("grid", "options")}, flush=True)
        if stateful and len(phases) == 2:
            log.append(amortised_row(base, mlabel, log[-2], log[-1]))
            print(log[-1], flush=True)
    if breakdown:
        for mlabel, name, options in METHODS:
            if mlabel in BREAKDOWN_LABELS and (not labels or mlabel in labels):
                log.append(plan_breakdown(base, mlabel, name, options, q, k, grid, device, reps))
                print(log[-1], flush=True)
    if check:
        log.append(map_check(base, q, k, grid, device))
        print(log[-1], flush=True)
    del q, k, v
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default="wan2.1-1.3b-480p,wan2.1-14b-720p", help=f"comma list of {sorted(SHAPES)}")
    parser.add_argument("--tiny", action="store_true", help="the tiny shape only (CPU smoke test)")
    parser.add_argument("--skip-attention", action="store_true", help="time planning and permutation only")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--labels", default="", help="comma list of METHODS labels to time (default: all)")
    parser.add_argument("--skip-fixed", action="store_true", help="no fixed-density rows")
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (1: stable timings on a shared machine)")
    parser.add_argument("--breakdown", action="store_true", help=f"planning breakdown rows for {BREAKDOWN_LABELS}")
    parser.add_argument("--check", action="store_true", help="draft-map kernel vs torch reference on the inputs")
    parser.add_argument("--skip-calibrate", action="store_true", help="no calibrate_ms (exact block mass) timing")
    parser.add_argument("--name", default=None, help="basename of the JSON (default sparse_speed[_tiny|_cpu])")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    shapes = ["tiny"] if args.tiny else [s.strip() for s in args.shapes.split(",") if s.strip()]
    bad = [s for s in shapes if s not in SHAPES]
    if bad:
        parser.error(f"unknown shape(s) {bad}; allowed: {sorted(SHAPES)}")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = args.name or ("sparse_speed_tiny" if args.tiny else "sparse_speed" if device.type == "cuda" else "sparse_speed_cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"env": environment(device), "timing": "wall clock around synchronised calls, median", "reps": args.reps,
               "skip_attention": args.skip_attention, "rows": []}
    with torch.no_grad():
        for s in shapes:
            bench_shape(s, SHAPES[s], device, dtype, args.reps, args.skip_attention, results["rows"],
                        {x.strip() for x in args.labels.split(",") if x.strip()} or None, args.skip_fixed,
                        args.breakdown, args.check, args.skip_calibrate)
            (args.out / f"{name}.json").write_text(json.dumps(results, indent=1))
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out / (name + '.json')}", flush=True)


if __name__ == "__main__":
    main()
