"""Speed of the sparse methods at real video attention shapes: planning + permutation cost against the
sparse attention call, and the attention speed-up against dense cuDNN SDPA in the same run.

    python benchmarks/sparse_speed.py --out benchmarks/results                 # GPU: Wan2.1 1.3B 480p + 14B 720p
    python benchmarks/sparse_speed.py --tiny --out /tmp                        # CPU smoke test, tiny shape
    python benchmarks/sparse_speed.py --device cpu --skip-attention --shapes wan2.1-1.3b-480p   # CPU: plan + gather only
    python benchmarks/sparse_speed.py --labels none --preset-densities benchmarks/results/eval_presets_gpu/report.json
                                                                               # GPU: each preset at its testbed density
    python benchmarks/sparse_speed.py --summary out/a.json out/b.json          # print the summary table of results

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
  50-step generation with 15 % warm-up (42 calls per layer and branch);
* with ``--preset-densities``, one ``preset`` row per shipped sparse preset (:func:`preset_rows`): the
  preset's own method and options run as ``dit_accel.apply`` runs them on Wan (tokens in 3D-tile order
  once per forward, plan reused between refreshes), the kernel timed at the density the testbed
  calibration gave the preset's sparse calls (an input: read from an eval report or given), with a mask
  made by the same method (top_p bisected so that its plan hits that density on these inputs), plus the
  plan amortised over a 50-step generation and the forward token order's gathers per call, against
  cuDNN dense in the same run.

Timing: wall clock around a synchronised call, median of ``--reps`` after one warm-up call (planning
has host work, so CUDA events alone would hide it). JSON records device, versions and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit_accel.attention import draft_estimate as draft_module  # noqa: E402
from dit_accel.attention import temporal_skip  # noqa: E402
from dit_accel.attention.base import SparsePlan  # noqa: E402
from dit_accel.attention.blocks import Order, permute_tokens  # noqa: E402
from dit_accel.attention.draft_estimate import draft_map, top_p_keep  # noqa: E402
from dit_accel.attention.oracle import block_mass  # noqa: E402
from dit_accel.attention.registry import get_method  # noqa: E402
from dit_accel.attention.route import plan_index  # noqa: E402
from dit_accel.attention.temporal_skip import TemporalSkipState  # noqa: E402
from dit_accel.attention.tiling import choose_tile, tile_permutation  # noqa: E402
from dit_accel.context import StepClock, TransformerContext  # noqa: E402
from dit_accel.kernels import (  # noqa: E402
    block_mask_density,
    block_mask_from_bool,
    block_mask_from_indices,
    block_sparse_attention,
)
from dit_accel.presets import get_preset  # noqa: E402

SHAPES = {
    # model_dim / layers: Wan2.1's hidden size and block count (the forward token order's gathers per call)
    "wan2.1-1.3b-480p": {"heads": 12, "grid": (21, 30, 52), "head_dim": 128, "model_dim": 1536, "layers": 30},  # 32,760 tokens
    "wan2.1-14b-720p": {"heads": 40, "grid": (21, 45, 80), "head_dim": 128, "model_dim": 5120, "layers": 40},  # 75,600 tokens
    "tiny": {"heads": 2, "grid": (4, 16, 16), "head_dim": 64, "model_dim": 128, "layers": 2},  # 1,024 tokens (CPU smoke test)
}
"""Attention shapes (B=1): heads, latent grid (F', H', W') after patching, head dim; the model's hidden size and
number of blocks."""

VALVES_OFF = {"dense_warmup": 0.0, "dense_first_layers": 0, "dense_last_step": False, "min_seq_len": 0}

STATEFUL_METHODS = ("temporal_skip", "combo")
"""Methods with per-generation state: timed on a refresh and a reuse call."""


def timed_method(name: str, options: dict):
    """The method as the timed rows run it: valves off (every timed call is sparse) and, for the stateful methods,
    no exact-mass calibration (once per generation; ``calibrate_ms`` times it apart)."""
    no_calibration = {"calibrate": False} if name in STATEFUL_METHODS else {}
    return get_method(name, **dict(VALVES_OFF, **options, **no_calibration))


def as_plan(result) -> SparsePlan:
    """A method's ``plan`` result (a BlockMask, or a SparsePlan with its permutation) as a SparsePlan."""
    return result if isinstance(result, SparsePlan) else SparsePlan(result)


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
    return {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
            "diffusers": diffusers.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


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
"""(``map_rows``, ``stages`` of ``draft_map.MAP_LAUNCH``, ``draft_map.SCORE_PRECISION``) timed in the breakdown
(the kernel's knobs; ``benchmarks/draft_map_tune.py`` searches all launch fields)."""


def amortised_plan_ms(refresh_ms: float, reuse_ms: float, period: int) -> tuple[float, float]:
    """Planning ms per sparse call with one refresh plan every ``period`` computed calls and reused plans in
    between: ``(per refresh period, over the 42 sparse calls of a 50-step generation)`` (the first sparse call
    of a generation is a refresh, so a generation holds ``ceil(42 / period)`` refreshes)."""
    n_ref = -(-SPARSE_CALLS_PER_GENERATION // period)
    per_period = (refresh_ms + (period - 1) * reuse_ms) / period
    per_generation = (n_ref * refresh_ms + (SPARSE_CALLS_PER_GENERATION - n_ref) * reuse_ms) / SPARSE_CALLS_PER_GENERATION
    return per_period, per_generation


def amortised_row(base: dict, label: str, refresh: dict, reuse: dict) -> dict:
    """Planning cost per call of a method with plan reuse: one refresh plan every ``refresh_period`` computed
    calls (the method's own setting), reused plans in between; per refresh period and over the 42 sparse calls
    of a 50-step generation (the first sparse call is a refresh). Shares are of the sparse attention call
    without permutation (``attn_unpermuted_ms`` of the refresh row)."""
    period = refresh["refresh_period"]
    row = dict(base, row="amortised", label=label, refresh_period=period, drift_check=refresh.get("drift_check"),
               refresh_plan_ms=refresh["plan_ms"], reuse_plan_ms=reuse["plan_ms"],
               refresh_plan_ms_torch_map=refresh["plan_ms_torch_map"], reuse_plan_ms_torch_map=reuse["plan_ms_torch_map"])
    for key, ref_ms, reuse_ms in (("", refresh["plan_ms"], reuse["plan_ms"]),
                                  ("_torch_map", refresh["plan_ms_torch_map"], reuse["plan_ms_torch_map"])):
        per_period, per_generation = amortised_plan_ms(ref_ms, reuse_ms, period)
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
    """The BlockMask as ``block_mask_from_bool`` built it before the sort-free compaction (a stable argsort on "not selected"),
    kept here only to time it beside the sort-free compaction (same kv_num_blocks / kv_indices)."""
    from torch.nn.attention.flex_attention import BlockMask

    kv_num = keep.sum(dim=-1, dtype=torch.int32)
    kv_idx = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, BLOCK_SIZE=128, seq_lengths=(seq_len, seq_len),
                                    compute_q_blocks=False)


def pool_of(perm: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The block-averaging matrix of a shared order (as the methods' torch path uses it), ``None`` without one."""
    return None if perm is None else Order(perm).pool(dtype)


def count_compactions(plan_once) -> int:
    """How many ``block_mask_from_bool`` compaction passes one call of ``plan_once`` runs (the plan modules' own
    reference to it counted; untimed)."""
    calls: list[int] = []

    def counting(*args, **kwargs):
        calls.append(1)
        return block_mask_from_bool(*args, **kwargs)

    try:
        draft_module.block_mask_from_bool = temporal_skip.block_mask_from_bool = counting
        plan_once()
    finally:
        draft_module.block_mask_from_bool = temporal_skip.block_mask_from_bool = block_mask_from_bool
    return len(calls)


def plan_breakdown(base: dict, label: str, name: str, options: dict, q: torch.Tensor, k: torch.Tensor, grid,
                   device: torch.device, reps: int) -> dict:
    """Where one (refresh) plan's time goes: the draft map (fused kernel and torch reference), the selection
    (top-p + protect kernel, alone and writing the BlockMask rows; torch ``top_p_keep``), the whole estimate
    and plan on both backends, the BlockMask compaction of the torch path (``block_mask_from_bool``, and the
    former sort), and the rest of ``plan`` (order, state, ...); plus the map kernel at its tuning variants
    (:data:`MAP_VARIANTS`).

    Since the selection kernel writes ``kv_num_blocks`` / ``kv_indices`` itself, the kernel path's plan runs no
    compaction pass (``plan_compactions`` counts the ``block_mask_from_bool`` calls of one plan, to show it):
    ``rest_ms`` is ``plan_ms - estimate_indices_ms - plan_compactions * block_mask_ms``, and ``split_*`` splits
    ``plan_ms`` into map / selection with rows / rest (``split_backend`` says which path the plan ran)."""
    from dit_accel.kernels import draft_map as draft_map_kernel

    S = q.shape[-2]
    method = timed_method(name, options)
    cfg = method.cfg
    ctx, call = hand_call(grid, S, 1)
    order = method.order_of(q, k, call)
    perm = None if order is None else order.perm
    scale = 1.0 / math.sqrt(q.shape[-1]) / cfg.temperature
    kw = dict(perm=perm, query_pool=cfg.query_pool, scale=scale, log_block_size=cfg.log_block_size)
    pool = None if order is None else order.pool(q.dtype)
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
        def select(indices: bool):
            return draft_map_kernel.select_blocks_triton(
                probs, sims.q_similarity, sims.k_similarity, top_p=top_p, min_blocks=min_blocks,
                similarity_threshold=thr, indices=indices)

        row["select_ms"] = time_ms(lambda: select(False), device, reps)
        # the selection as the plans run it: also writing the BlockMask rows (what replaced the compaction pass)
        row["select_indices_ms"] = time_ms(lambda: select(True), device, reps)
        sel = select(True)
        ref_mask = block_mask_from_bool(sel.keep, S, S)
        row["select_rows_equal_block_mask"] = bool(torch.equal(sel.kv_num_blocks, ref_mask.kv_num_blocks)
                                                   and torch.equal(sel.kv_indices, ref_mask.kv_indices))
        row["block_mask_from_indices_ms"] = time_ms(
            lambda: block_mask_from_indices(sel.kv_num_blocks, sel.kv_indices, S, S), device, reps)
        del sel, ref_mask

    def plan_once(m):
        ctx.reset_state()
        _, c = hand_call(grid, S, 2, ctx)
        return m.plan(q, k, c)

    for suffix, backend in (("", "auto"), ("_torch", "torch")):
        m = timed_method(name, dict(options, map_backend=backend))
        select = m.stages.select
        row[f"estimate_ms{suffix}"] = time_ms(lambda: select.estimate(q, k, order, None), device, reps)
        row[f"estimate_indices_ms{suffix}"] = time_ms(
            lambda: select.estimate(q, k, order, None, block_indices=True), device, reps)
        keep = select.estimate(q, k, order, None).keep
        row[f"plan_ms{suffix}"] = time_ms(lambda: plan_once(m), device, reps)
        row[f"plan_compactions{suffix}"] = count_compactions(lambda: plan_once(m))
    row["block_mask_ms"] = time_ms(lambda: block_mask_from_bool(keep, S, S), device, reps)
    # the argsort BlockMask, timed beside the sort-free compaction: before/after in one run
    row["block_mask_ms_sort"] = time_ms(lambda: block_mask_by_sort(keep, S), device, reps)
    new_mask, sort_mask = block_mask_from_bool(keep, S, S), block_mask_by_sort(keep, S)
    row["block_mask_equal_sort"] = bool(torch.equal(new_mask.kv_num_blocks, sort_mask.kv_num_blocks)
                                        and torch.equal(new_mask.kv_indices, sort_mask.kv_indices))
    # plan = estimate (map + selection, with the BlockMask rows on the kernel path) + the compaction passes the plan
    # still runs (none on the kernel path, one on the torch path) + rest (order, state, BlockMask object)
    for suffix in ("", "_torch"):
        row[f"rest_ms{suffix}"] = (row[f"plan_ms{suffix}"] - row[f"estimate_indices_ms{suffix}"]
                                   - row[f"plan_compactions{suffix}"] * row["block_mask_ms"])
    # the plan split as the next GPU run should read it: map / selection with the mask rows / everything else
    if uses_kernel:
        row["split_backend"] = "triton"
        row["split_map_ms"], row["split_select_indices_ms"] = row["map_ms"], row["select_indices_ms"]
    else:  # the torch path: the selection's share is top_p_keep plus the compaction pass
        row["split_backend"] = "torch"
        row["split_map_ms"] = row["map_ms_torch"]
        row["split_select_indices_ms"] = row["top_p_ms_torch"] + row["plan_compactions"] * row["block_mask_ms"]
    # rest = rest_ms (plan - fused estimate - the compaction passes it runs): map and selection timed alone add
    # up to more than inside one estimate, so a remainder after them went negative on the GPU; the three split
    # parts therefore do not sum exactly to plan_ms
    row["split_rest_ms"] = row["rest_ms"]
    if uses_kernel:
        saved = (draft_map_kernel.MAP_LAUNCH, draft_map_kernel.SCORE_PRECISION)
        variants = {}
        try:
            for rows, stages, precision in MAP_VARIANTS:
                draft_map_kernel.MAP_LAUNCH = replace(saved[0], map_rows=rows, stages=stages)
                draft_map_kernel.SCORE_PRECISION = precision
                variants[f"rows{rows}_stages{stages}_{precision}"] = time_ms(
                    lambda: draft_map(q, k, backend="triton", **kw), device, reps)
        finally:
            draft_map_kernel.MAP_LAUNCH, draft_map_kernel.SCORE_PRECISION = saved
        row["map_ms_variants"] = variants
        launch = saved[0]
        # earlier key names, kept for the summaries of older JSON files
        row["map_defaults"] = {"MAP_ROWS": launch.map_rows, "MAP_STAGES": launch.stages, "SCORE_PRECISION": saved[1],
                               "KEY_CHUNK": launch.key_chunk, "launch": asdict(launch)}
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
    cfg = get_method("draft", quality="balanced").cfg
    scale = 1.0 / math.sqrt(q.shape[-1]) / cfg.temperature
    ctx, call = hand_call(grid, S, 1)
    for order, perm in (("model", None), ("tile", sequence_order(call.layout, S, q.device))):
        kw = dict(perm=perm, query_pool=cfg.query_pool, scale=scale, log_block_size=cfg.log_block_size)
        got = draft_map(q, k, backend="triton", **kw)
        ref = draft_map(q, k, pool=pool_of(perm, q.dtype), backend="torch", **kw)
        ref32 = draft_map(q.float(), k.float(), pool=pool_of(perm, torch.float32), backend="torch", **kw)
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
            select = get_method("draft", quality="balanced", map_backend=backend).stages.select
            keeps[backend] = select.estimate(q, k, None if perm is None else Order(perm), None).keep
        res["keep_agreement"] = keeps["triton"].eq(keeps["torch"]).float().mean().item()
        res["keep_equal"] = bool(torch.equal(keeps["triton"], keeps["torch"]))
        res["keep_density_kernel"] = keeps["triton"].float().mean().item()
        res["keep_density_torch"] = keeps["torch"].float().mean().item()
        out[order] = res
        del got, ref, ref32
    return out


PRESET_ORDER: tuple[str, ...] = ("quality", "balanced", "fast", "turbo")
"""The shipped sparse presets (``dit_accel.presets``), in the order positional ``--preset-densities`` are read."""

DEFAULT_PRESET_REPORT = "benchmarks/results/eval_presets_gpu/report.json"
"""The committed eval report of the presets on the testbed (GPU, 16 prompts), whose densities the preset rows take."""


@dataclass(frozen=True)
class PresetDensity:
    """The density at which one preset's sparse attention call is timed, and where it came from."""

    preset: str
    """Preset name (one of :data:`PRESET_ORDER`)."""
    density: float
    """Mean block density of the preset's *sparse* attention calls on the testbed, in (0, 1]: what the kernel
    runs at. (The README's presets table shows the mean over *all* self-attention calls, the safety valves'
    dense calls counting 1.0: :attr:`mean_density_all_calls`.)"""
    source: str
    """``report:<path>`` or ``command line``."""
    mean_density_all_calls: float | None = None
    """The report's ``mean_density`` (all self-attention calls, dense ones counting 1.0); ``None`` when given."""
    attention_calls: int | None = None
    """Self-attention calls of the report's run (dense and sparse)."""
    sparse_calls: int | None = None
    """Of those, the calls that ran sparse."""
    measured_as: str | None = None
    """The preset tag the report measured (e.g. ``quality@3``), to compare with the current version."""


def _checked_density(name: str, value: float) -> float:
    if not (isinstance(value, float) and 0.0 < value <= 1.0):
        raise ValueError(f"density of preset {name!r} must be a number in (0, 1], got {value!r}")
    return value


def report_preset_densities(path: Path) -> list[PresetDensity]:
    """Sparse-call densities of the presets in a ``dit-accel eval`` report (``report.json``).

    A report gives, per configuration ``preset:NAME``, ``attention_summary`` = ``attention_calls`` (all
    self-attention calls), ``sparse_calls`` and ``mean_density`` over all of them with the dense calls
    counting 1.0 (``AccelHandle.stats_summary``); the sparse calls' mean density is therefore
    ``(mean_density * attention_calls - dense_calls) / sparse_calls``.
    """
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"cannot read the eval report {path}: {exc}") from None
    out: dict[str, PresetDensity] = {}
    for cfg in data.get("configs", []):
        label = str(cfg.get("label", ""))
        if not label.startswith("preset:") or label.split(":", 1)[1] not in PRESET_ORDER:
            continue
        name = label.split(":", 1)[1]
        summary = cfg.get("attention_summary") or {}
        calls, sparse, mean = summary.get("attention_calls"), summary.get("sparse_calls"), summary.get("mean_density")
        if not calls or not sparse or mean is None:
            raise ValueError(f"{path}: configuration {label!r} has no attention_summary with sparse calls")
        density = (float(mean) * calls - (calls - sparse)) / sparse
        out[name] = PresetDensity(name, _checked_density(name, min(1.0, density)), f"report:{path}", float(mean),
                                  int(calls), int(sparse), (cfg.get("acceleration") or {}).get("preset"))
    if not out:
        raise ValueError(f"{path}: no configuration labelled preset:NAME for NAME in {PRESET_ORDER}")
    return [out[n] for n in PRESET_ORDER if n in out]


def parse_preset_densities(spec: str) -> list[PresetDensity]:
    """``--preset-densities``: a ``dit-accel eval`` report (a path to a ``.json`` file, see
    :func:`report_preset_densities`), ``name=density`` pairs (``quality=0.68,turbo=0.46``), or one density per
    preset in the order of :data:`PRESET_ORDER`. Given densities are the sparse calls' mean density."""
    spec = spec.strip()
    if spec.endswith(".json") or Path(spec).is_file():
        return report_preset_densities(Path(spec))
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise ValueError("--preset-densities is empty")
    named = ["=" in s for s in items]
    if any(named) and not all(named):
        raise ValueError(f"--preset-densities mixes name=density and bare densities: {spec!r}")
    pairs: list[tuple[str, str]]
    if all(named):
        pairs = [tuple(s.split("=", 1)) for s in items]  # type: ignore[misc]
    elif len(items) == len(PRESET_ORDER):
        pairs = list(zip(PRESET_ORDER, items))
    else:
        raise ValueError(f"--preset-densities needs {len(PRESET_ORDER)} densities ({', '.join(PRESET_ORDER)}) "
                         f"or name=density pairs, got {spec!r}")
    out: dict[str, PresetDensity] = {}
    for name, value in pairs:
        name = name.strip()
        if name not in PRESET_ORDER:
            raise ValueError(f"unknown preset {name!r} in --preset-densities; allowed: {PRESET_ORDER}")
        if name in out:
            raise ValueError(f"preset {name!r} given twice in --preset-densities")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"density of preset {name!r} is not a number: {value!r}") from None
        out[name] = PresetDensity(name, _checked_density(name, number), "command line")
    return [out[n] for n in PRESET_ORDER if n in out]


def fit_top_p(plan_density: Callable[[float], tuple[float, Any]], target: float, iters: int = 20
              ) -> tuple[float, float, Any]:
    """The ``top_p`` whose plan density is nearest ``target``: bisection on ``(0, 1]``, since a plan keeps per
    query block the fewest blocks holding ``top_p`` of the mass (a superset for a larger ``top_p``) plus
    fixed protected tiles. ``plan_density(top_p)`` returns ``(density, plan)``; returns ``(top_p, density,
    plan)``. When ``target`` lies outside what the method reaches on these inputs (below its floor of
    protected and minimum blocks, say), the end point is returned: the caller records the density it got."""
    lo = (1e-4, *plan_density(1e-4))
    hi = (1.0, *plan_density(1.0))
    if target <= lo[1]:
        return lo
    if target >= hi[1]:
        return hi
    for _ in range(iters):
        mid_p = 0.5 * (lo[0] + hi[0])
        mid = (mid_p, *plan_density(mid_p))
        if mid[1] < target:
            lo = mid
        else:
            hi = mid
    return min((lo, hi), key=lambda r: abs(r[1] - target))


def tile_order_copy(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``x`` ``(B, H, S, D)`` (a view of ``(B, S, H, D)`` memory) with its tokens in the order ``perm``, again
    as a view of ``(B, S, H, D)`` memory: what the attention of a block sees when the forward token order
    holds the hidden states in tile order (q, k, v are projected from permuted rows)."""
    return x.transpose(1, 2).index_select(1, perm).transpose(1, 2)


def random_head_mask(heads: int, nb: int, density: float, device: torch.device, seed: int = 0) -> torch.Tensor:
    """Bool ``(1, heads, nb, nb)``: key blocks drawn at random per head and query block, the diagonal kept, so
    that the expected density is ``density``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    p = 1.0 if nb <= 1 else min(1.0, max(0.0, (density - 1.0 / nb) / (1.0 - 1.0 / nb)))
    keep = torch.rand(1, heads, nb, nb, generator=g) < p
    keep |= torch.eye(nb, dtype=torch.bool)
    return keep.to(device)


def forward_permutation_ms(shape: dict, perm: torch.Tensor, inverse: torch.Tensor, device: torch.device,
                           dtype: torch.dtype, reps: int) -> float:
    """Device time of the gathers the forward token order makes once per transformer forward on Wan: the
    hidden states ``(1, S, model_dim)`` into tile order at the first block and back at the last, and the two
    rotary tables ``(1, S, 1, head_dim)`` (float32) into tile order. The hook's host work is not included."""
    S = perm.numel()
    hidden = torch.randn(1, S, shape["model_dim"], device=device, dtype=dtype)
    rope = [torch.randn(1, S, 1, shape["head_dim"], device=device) for _ in range(2)]

    def run():
        into = hidden.index_select(1, perm)
        tables = [t.index_select(1, perm) for t in rope]
        return into.index_select(1, inverse), tables

    return time_ms(run, device, reps)


def time_refresh_reuse(method, ctx: TransformerContext, q: torch.Tensor, k: torch.Tensor, grid, device: torch.device,
                       reps: int) -> tuple[float, float, Any]:
    """``(refresh plan ms, reuse plan ms, a refresh plan)`` of a stateful method (``combo``/``temporal_skip``)
    on layer 1: the refresh calls start from an empty state, the reuse calls stay between refreshes."""
    S = q.shape[-2]
    step = [1]

    def plan(fresh: bool):
        if fresh:
            ctx.reset_state()
        step[0] += 1
        _, call = hand_call(grid, S, step[0], ctx)
        return method.plan(q, k, call)

    refresh_ms = time_ms(lambda: plan(True), device, reps)
    refresh_plan = plan(True)
    ctx.method_state(1, "cond", TemporalSkipState).calls = -10**6  # stay between refreshes while timing
    reuse_ms = time_ms(lambda: plan(False), device, reps)
    return refresh_ms, reuse_ms, refresh_plan




def preset_rows(base: dict, densities: list[PresetDensity], shape: dict, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor, device: torch.device, reps: int, dense_ms: float | None) -> Iterator[dict]:
    """One ``preset`` row per entry of ``densities``, yielded as soon as it is measured: the sparse attention call
    of a shipped preset at a Wan shape, as ``dit_accel.apply(pipe, preset=...)`` runs it there.

    * Token order ``"forward"`` (the presets' default on Wan): q, k, v are in 3D-tile order already, the plan
      needs no permutation and the kernel no index; the gathers that put the sequence in that order once per
      forward are timed apart and divided by the model's layers (``forward_perm_ms_per_call``).
    * The preset's method and options (valves off so that the timed call is sparse); its plan reused between
      refreshes: ``refresh_plan_ms`` and ``reuse_plan_ms`` amortised over a 50-step generation
      (:func:`amortised_plan_ms`, ``plan_ms_per_call_50_steps``).
    * The kernel at the density the testbed calibration gave the preset's sparse calls (``target_density``):
      random smooth inputs are not the testbed's attention, so the preset's knob gives another density here
      (``knob_density``); the mask is made by the same method with ``top_p`` bisected to that density
      (``fitted_top_p``, :func:`fit_top_p`; ``density`` is what it reached), and the plan times above are
      the fitted method's (the knob's are ``knob_*_plan_ms``). ``kernel_random_ms``: the kernel with random
      key blocks per head at the same density, to show whether the mask's shape matters.
    * ``speedup_vs_dense = dense_ms / (kernel_ms + plan_ms_per_call_50_steps + forward_perm_ms_per_call)``;
      ``overhead`` = (amortised plan + permutation) / kernel (target: <= 5 %).
    """
    grid = tuple(shape["grid"])
    S = q.shape[-2]
    tile = choose_tile(grid)
    if tile is None:
        raise ValueError(f"no 3D tile fits grid {grid}: the presets would run in the model's order")
    perm, inverse = tile_permutation(grid, tile.tile, str(device))
    qt, kt, vt = (tile_order_copy(t, perm) for t in (q, k, v))
    layers = shape["layers"]
    fwd_ms = forward_permutation_ms(shape, perm, inverse, device, q.dtype, reps)
    for pd in densities:
        preset = get_preset(pd.preset)
        options = dict(VALVES_OFF, **preset.attention_config)
        ctx, _ = hand_call(grid, S, 0)
        ctx.token_order_tile = tuple(tile.tile)  # the forward token order holds the sequence in this tile order

        def make(top_p: float | None = None):
            return get_method(preset.attention, **(options if top_p is None else dict(options, top_p=top_p)))

        def refresh_plan(method):
            ctx.reset_state()
            _, call = hand_call(grid, S, 1, ctx)
            return method.plan(qt, kt, call)

        def plan_density(top_p: float) -> tuple[float, Any]:
            mask = as_plan(refresh_plan(make(top_p))).mask
            return block_mask_density(mask), mask

        knob = make()
        knob_plan = as_plan(refresh_plan(knob))
        knob_mask, knob_perm = knob_plan.mask, knob_plan.perm
        if knob_perm is not None:
            raise AssertionError("in the forward token order the preset's plan must need no permutation")
        knob_ref_ms, knob_reuse_ms, _ = time_refresh_reuse(knob, ctx, qt, kt, grid, device, reps)
        top_p, density, mask = fit_top_p(plan_density, pd.density)
        method = make(top_p)
        ref_ms, reuse_ms, _ = time_refresh_reuse(method, ctx, qt, kt, grid, device, reps)
        period = method.cfg.resolved("refresh_period")
        per_period, per_generation = amortised_plan_ms(ref_ms, reuse_ms, period)
        with_stats = method.needs_tile_stats  # False for the presets (skip_threshold -inf)
        row = dict(base, row="preset", preset=preset.tag, method=preset.attention, options=dict(preset.attention_config),
                   token_order="forward", tile=list(tile.tile), tile_stats=with_stats, target_density=pd.density, density_source=pd.source,
                   mean_density_all_calls=pd.mean_density_all_calls, testbed_attention_calls=pd.attention_calls,
                   testbed_sparse_calls=pd.sparse_calls, measured_as=pd.measured_as,
                   knob_top_p=knob.cfg.resolved("top_p"), knob_density=block_mask_density(knob_mask),
                   knob_refresh_plan_ms=knob_ref_ms, knob_reuse_plan_ms=knob_reuse_ms,
                   fitted_top_p=top_p, density=density, refresh_plan_ms=ref_ms, reuse_plan_ms=reuse_ms,
                   refresh_period=period, plan_ms_per_call=per_period, plan_ms_per_call_50_steps=per_generation,
                   forward_perm_ms=fwd_ms, layers=layers, forward_perm_ms_per_call=fwd_ms / layers)
        if dense_ms is not None:
            kernel_ms = time_ms(lambda: block_sparse_attention(qt, kt, vt, mask, tile_stats=with_stats), device, reps)
            rnd = block_mask_from_bool(random_head_mask(q.shape[1], -(-S // 128), density, device), S, S)
            kernel_random_ms = time_ms(lambda: block_sparse_attention(qt, kt, vt, rnd, tile_stats=with_stats), device, reps)
            extra = per_generation + fwd_ms / layers
            row.update(kernel_ms=kernel_ms, kernel_random_ms=kernel_random_ms,
                       random_density=block_mask_density(rnd), dense_ms=dense_ms,
                       kernel_speedup_vs_dense=dense_ms / kernel_ms,
                       refresh_plan_share=ref_ms / kernel_ms, plan_share_50_steps=per_generation / kernel_ms,
                       perm_share=fwd_ms / layers / kernel_ms, overhead=extra / kernel_ms,
                       speedup_vs_dense=dense_ms / (kernel_ms + extra))
            del rnd
        del mask, knob_mask
        yield row
    del qt, kt, vt


def bench_shape(label: str, shape: dict, device: torch.device, dtype: torch.dtype, reps: int, skip_attention: bool,
                log: list, labels: set[str] | None = None, skip_fixed: bool = False, breakdown: bool = False,
                check: bool = False, skip_calibrate: bool = False, preset_densities: list[PresetDensity] | None = None,
                fixed_densities: tuple[float, ...] = FIXED_DENSITIES) -> None:
    """All rows of one shape, appended to ``log``: dense, the presets (``preset_densities``), the fixed
    densities, the methods, the breakdown and check rows, and dense again at the end (``dense_repeat``: how
    far cuDNN drifted during the run; the ratios use the first)."""
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
    # the presets first: the rows nothing else in this script measures (a run cut short still has them)
    for row in preset_rows(base, preset_densities, shape, q, k, v, device, reps, dense_ms) if preset_densities else ():
        log.append(row)
        print({k_: v_ for k_, v_ in row.items() if k_ not in ("grid", "options")}, flush=True)
    if not skip_attention:
        nb = -(-S // 128)
        for d in () if skip_fixed else fixed_densities:
            mask = block_mask_from_bool(random_mask(nb, d, device), S, S)
            ms = time_ms(lambda: block_sparse_attention(q, k, v, mask), device, reps)
            log.append(dict(base, row="fixed_density", nominal_density=d, density=block_mask_density(mask), ms=ms,
                            speedup_vs_dense=dense_ms / ms))
            print(log[-1], flush=True)
    for mlabel, name, options in METHODS:
        if labels and mlabel not in labels:
            continue
        stateful = name in STATEFUL_METHODS
        method = timed_method(name, options)
        with_stats = method.needs_tile_stats
        phases = ["refresh", "reuse"] if stateful else ["plan"]
        ctx, _ = hand_call(grid, S, 0)
        for phase in phases:
            step = [1]

            def plan_once(m=method):
                if phase == "refresh" or not stateful:
                    ctx.reset_state()  # every timed call is a fresh plan (k-means warm start kept separately below)
                step[0] += 1
                _, call = hand_call(grid, S, step[0], ctx)
                return m.plan(q, k, call)

            if phase == "reuse":
                _, call = hand_call(grid, S, 1, ctx)
                ctx.reset_state()
                first = method.plan(q, k, call)
                plan0 = as_plan(first)
                qp, kp, vp = (permute_tokens(t, plan0.perm) for t in (q, k, v))
                if not skip_attention:
                    stats = block_sparse_attention(qp, kp, vp, plan0.mask, tile_stats=True).tile_stats
                    method.observe(call, stats)
                del qp, kp, vp
                # stay between refreshes while timing
                ctx.method_state(1, "cond", TemporalSkipState).calls = -10**6
            if name == "permuted" and options.get("order") == "kmeans":
                # steady state: warm-started centroids (not reset between timed calls)
                def plan_once(m=method):  # noqa: F811
                    step[0] += 1
                    _, call = hand_call(grid, S, step[0], ctx)
                    return m.plan(q, k, call)
            plan_ms = time_ms(plan_once, device, reps)
            # the same plan with the draft map and the selection on the torch reference: before/after the kernels
            torch_map = timed_method(name, dict(options, map_backend="torch"))
            plan_ms_torch_map = time_ms(lambda: plan_once(torch_map), device, reps)
            result = plan_once()
            plan = as_plan(result)
            perm = plan.perm
            row = dict(base, row="method", label=mlabel, method=name, options=options, phase=phase,
                       density=block_mask_density(plan.mask), plan_ms=plan_ms, plan_ms_torch_map=plan_ms_torch_map,
                       map_kernel=draft_module.draft_map_kernel_applies(q),
                       perm_kind=None if perm is None else ("shared" if perm.dim() == 1 else "per_head"))

            index = plan_index(plan, q.device)
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
    if not skip_attention:
        log.append(dict(base, row="dense_repeat", backend=backend, ms=time_ms(fn, device, reps)))
        print(log[-1], flush=True)
    del q, k, v
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _ms(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _times(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100.0 * x:.1f} %"


def summary_lines(results: dict) -> list[str]:
    """Markdown tables of one results dict (or several merged): dense per shape, the planning share of the
    sparse call (method, amortised and breakdown rows: the <= 5 % target) and each preset's attention
    call against cuDNN dense."""
    rows = results["rows"]
    env = results.get("env", {})
    out = [f"device {env.get('device')}, torch {env.get('torch')}, triton {env.get('triton')}, "
           f"diffusers {env.get('diffusers')}, {env.get('date')}" + ("" if results.get("complete", True) else
                                                                     "  (INCOMPLETE: cut short)")]
    dense = [r for r in rows if r["row"] in ("dense", "dense_repeat")]
    if dense:
        out += ["", "| shape | dense backend | dense ms (first) | dense ms (end of shape) |", "| --- | --- | --- | --- |"]
        for shape in dict.fromkeys(r["shape"] for r in dense):
            first = next((r for r in dense if r["shape"] == shape and r["row"] == "dense"), None)
            last = next((r for r in dense if r["shape"] == shape and r["row"] == "dense_repeat"), None)
            out.append(f"| {shape} | {(first or last)['backend']} | {_ms(first and first['ms'])} | {_ms(last and last['ms'])} |")
    plans = [r for r in rows if r["row"] in ("method", "amortised")]
    if plans:
        out += ["", "Planning share of the sparse call (kernel at the density the method picked on these inputs, no index):",
                "| shape | plan | density | plan ms | plan / call | (plan + folded perm) / call |", "| --- | --- | --- | --- | --- | --- |"]
        for r in plans:
            if r["row"] == "method":
                what = f"{r['label']}, {'every call' if r['phase'] == 'plan' else r['phase'] + ' call'}"
                out.append(f"| {r['shape']} | {what} | {r['density']:.3f} | {_ms(r['plan_ms'], 3)} | "
                           f"{_pct(r.get('plan_share'))} | {_pct(r.get('overhead'))} |")
            else:
                what = f"{r['label']}, amortised (refresh every {r['refresh_period']}, 50 steps)"
                out.append(f"| {r['shape']} | {what} | - | {_ms(r['plan_ms_per_call_50_steps'], 3)} | "
                           f"{_pct(r.get('plan_share_50_steps'))} | - |")
    breakdown = [r for r in rows if r["row"] == "plan_breakdown"]
    if breakdown:
        out += ["", "| shape | plan breakdown (ms) | map | selection | selection + mask rows | rest | compaction passes "
                "in the plan | BlockMask compaction (sort), torch path | plan |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in breakdown:
            out.append(f"| {r['shape']} | {r['label']} | {_ms(r.get('map_ms'), 3)} | {_ms(r.get('select_ms'), 3)} | "
                       f"{_ms(r.get('split_select_indices_ms'), 3)} | {_ms(r.get('split_rest_ms'), 3)} | "
                       f"{r.get('plan_compactions', '-')} | "
                       f"{_ms(r['block_mask_ms'], 3)} ({_ms(r['block_mask_ms_sort'], 3)}) | {_ms(r['plan_ms'], 3)} |")
    presets = [r for r in rows if r["row"] == "preset"]
    if presets:
        out += ["", "Presets: one sparse attention call at the testbed's sparse-call density, tokens in tile order once per "
                "forward, plan amortised over 50 steps, vs cuDNN dense in the same run:",
                "| shape | preset | testbed density: sparse calls (all calls) | timed density (top_p) | kernel ms (random mask) "
                "| plan ms / call (refresh) | perm ms / call | overhead | kernel vs dense | call vs dense |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in presets:
            mean = r.get("mean_density_all_calls")
            out.append(
                f"| {r['shape']} | {r['preset']} | {r['target_density']:.3f} ({'-' if mean is None else f'{mean:.3f}'}) | "
                f"{r['density']:.3f} ({r['fitted_top_p']:.3f}) | {_ms(r.get('kernel_ms'))} ({_ms(r.get('kernel_random_ms'))}) | "
                f"{_ms(r['plan_ms_per_call_50_steps'], 3)} ({_ms(r['refresh_plan_ms'], 3)}) | {_ms(r['forward_perm_ms_per_call'], 3)} | "
                f"{_pct(r.get('overhead'))} | {_times(r.get('kernel_speedup_vs_dense'))} | {_times(r.get('speedup_vs_dense'))} |")
    return out


ROW_KINDS: dict[str, str] = {
    "dense": "dense SDPA (cuDNN on CUDA) on the shape's q/k/v, the baseline of every ratio in the shape",
    "dense_repeat": "the same dense call again at the end of the shape: how far the baseline drifted in the run",
    "preset": "a shipped preset's sparse attention call at the testbed's sparse-call density (preset_rows docstring)",
    "fixed_density": "the kernel with random key blocks per query block (diagonal kept, shared by heads) at a density",
    "method": "a method's plan (plan_ms) and the kernel at the density it picked on these inputs, folded permutation "
              "(attn_ms) and on pre-permuted tensors (attn_unpermuted_ms); phase refresh/reuse for stateful methods",
    "amortised": "a stateful method's plan per sparse call: refresh every refresh_period calls, reuse in between, "
                 "over the 42 sparse calls of a 50-step generation; shares of attn_unpermuted_ms of its refresh row",
    "plan_breakdown": "one refresh plan split into draft map, selection (alone and writing the BlockMask rows), the "
                      "torch path's BlockMask compaction (and the former sort) and the rest; split_* = map / selection "
                      "with mask rows / rest of plan_ms, plan_compactions = compaction passes one plan runs",
    "map_check": "draft-map kernel vs torch reference on these inputs",
}
"""What each ``row`` kind of the JSON holds (written into the JSON as ``row_kinds``)."""


class Interrupted(Exception):
    """Raised by the SIGTERM handler (``timeout``) so that the rows measured so far are written."""


def _on_sigterm(signum, frame) -> None:
    raise Interrupted(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Command line entry point (see the module docstring); returns the exit status (1 when cut short)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default="wan2.1-1.3b-480p,wan2.1-14b-720p", help=f"comma list of {sorted(SHAPES)}")
    parser.add_argument("--tiny", action="store_true", help="the tiny shape only (CPU smoke test)")
    parser.add_argument("--skip-attention", action="store_true", help="time planning and permutation only")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--labels", default="", help="comma list of METHODS labels to time (default: all; 'none': no method rows)")
    parser.add_argument("--skip-fixed", action="store_true", help="no fixed-density rows")
    parser.add_argument("--fixed-densities", default=",".join(str(d) for d in FIXED_DENSITIES),
                        help="comma list of the fixed-density rows' densities")
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (1: stable timings on a shared machine)")
    parser.add_argument("--breakdown", action="store_true", help=f"planning breakdown rows for {BREAKDOWN_LABELS}")
    parser.add_argument("--check", action="store_true", help="draft-map kernel vs torch reference on the inputs")
    parser.add_argument("--skip-calibrate", action="store_true", help="no calibrate_ms (exact block mass) timing")
    parser.add_argument("--preset-densities", default="",
                        help="preset rows at these sparse-call densities: a dit-accel eval report.json (e.g. "
                             f"{DEFAULT_PRESET_REPORT}), name=density pairs, or {len(PRESET_ORDER)} densities in the "
                             f"order {','.join(PRESET_ORDER)}")
    parser.add_argument("--name", default=None, help="basename of the JSON (default sparse_speed[_tiny|_cpu])")
    parser.add_argument("--summary", nargs="+", type=Path, default=None, metavar="JSON",
                        help="print the summary tables of these result files and exit (no timing)")
    args = parser.parse_args(argv)
    if args.summary:
        for path in args.summary:
            print(f"\n## {path}")
            print("\n".join(summary_lines(json.loads(path.read_text()))), flush=True)
        return 0
    try:
        fixed = tuple(float(x) for x in args.fixed_densities.split(",") if x.strip())
        presets = parse_preset_densities(args.preset_densities) if args.preset_densities.strip() else None
    except ValueError as exc:
        parser.error(str(exc))
    if any(not 0.0 < d <= 1.0 for d in fixed):
        parser.error(f"--fixed-densities must lie in (0, 1], got {fixed}")
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
    path = args.out / f"{name}.json"
    results = {"env": environment(device), "timing": "wall clock around synchronised calls, median", "reps": args.reps,
               "skip_attention": args.skip_attention, "argv": sys.argv[1:] if argv is None else list(argv),
               "complete": False, "row_kinds": ROW_KINDS, "rows": []}
    # `timeout` sends SIGTERM: write what was measured instead of losing the shape in progress
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    status = 0
    try:
        with torch.no_grad():
            for s in shapes:
                bench_shape(s, SHAPES[s], device, dtype, args.reps, args.skip_attention, results["rows"],
                            {x.strip() for x in args.labels.split(",") if x.strip()} or None, args.skip_fixed,
                            args.breakdown, args.check, args.skip_calibrate, presets, fixed)
                path.write_text(json.dumps(results, indent=1))
        results["complete"] = True
    except Interrupted as exc:
        results["interrupted"] = str(exc)
        status = 1
        print(f"interrupted ({exc}): writing the rows measured so far", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path}", flush=True)
    print("\n".join(summary_lines(results)), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
