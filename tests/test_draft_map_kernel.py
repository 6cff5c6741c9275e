"""The fused draft-map kernel (dit_accel/kernels/draft_map.py) against its torch reference
(dit_accel.attention.draft_estimate.draft_map_reference), and the selection kernel against ``top_p_keep`` plus the protect
masks, its BlockMask rows (``indices=True``) against ``block_mask_from_bool`` of the same selection, bit for bit.

The kernel runs in the Triton interpreter in ONE subprocess started with TRITON_INTERPRET=1 (this file run as
a script: the variable must be set before Triton kernels are defined and must not leak into other tests);
each case below asserts on the numbers it reports. bf16 inputs are checked too: the kernel casts tiles to
float32 before its dots, so the interpreter's wrong bf16 ``tl.dot`` is never hit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]

# name: (B, H, S, D, dtype, query_pool, order, log_block_size, layout)
CASES: dict[str, tuple] = {
    "contig_fp32_d64_pool4_ragged": (1, 2, 3 * 128 + 37, 64, "float32", 4, "none", True, "bhsd"),
    "shared_perm_fp16_d128_pool4": (1, 2, 3 * 128 + 37, 128, "float16", 4, "shared", True, "bshd"),
    "per_head_perm_bf16_d64_pool128": (2, 2, 2 * 128 + 5, 64, "bfloat16", 128, "per_head", True, "bhsd"),
    "contig_fp32_d128_pool128_nolog": (1, 1, 5 * 128, 128, "float32", 128, "none", False, "bhsd"),
    "shared_perm_fp32_d64_pool16": (1, 1, 2 * 128 + 100, 64, "float32", 16, "shared", True, "bshd"),
    "contig_bf16_d64_pool4_short": (1, 1, 70, 64, "bfloat16", 4, "none", True, "bhsd"),
}

# draft_estimate with both backends (text blocks, similarity threshold, top-p): selections must agree
ESTIMATE_CASE = (1, 2, 6 * 128 + 20, 64, "float32", 4, "roll", True, "bshd")

# selection kernel on random maps, name: (B, H, blocks, top_p, min_blocks, text, similarity threshold, map)
SELECT_CASES: dict[str, tuple] = {
    "ragged_text": (1, 1, 12, 0.8, 3, True, 0.15, "random"),
    "small_no_text": (2, 1, 4, 0.5, 1, False, 0.15, "random"),
    "keep_all": (1, 1, 9, 1.0, 1, False, 0.15, "random"),
    "min_blocks": (1, 1, 6, 0.3, 4, False, 0.15, "random"),
    "diagonal_only": (1, 2, 7, 0.5, 1, False, -1.0, "peaked"),  # no protection but the diagonal
    "dense_rows_cols": (2, 3, 11, 0.4, 1, False, 0.5, "random"),  # many full rows (low similarity)
    "text_heads_batch": (2, 3, 13, 0.6, 2, True, 0.05, "random"),
    "single_block": (1, 2, 1, 0.5, 1, False, 0.15, "random"),
    "wide_row": (1, 1, 70, 0.7, 1, False, -1.0, "random"),  # 128 lanes for 70 columns
}


def _inputs(B, H, S, D, dtype, order, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    # smooth along the sequence plus noise, so block means and similarities carry structure
    base = torch.randn(B, H, S // 16 + 2, D, generator=g).repeat_interleave(16, dim=2)[:, :, :S]
    q = (base + 0.7 * torch.randn(B, H, S, D, generator=g)).to(getattr(torch, dtype))
    k = (base.roll(3, dims=2) + 0.7 * torch.randn(B, H, S, D, generator=g)).to(getattr(torch, dtype))
    if layout == "bshd":  # diffusers' (B, S, H, D) memory viewed as (B, H, S, D)
        q, k = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k))
    if order == "none":
        perm = None
    elif order == "shared":
        perm = torch.randperm(S, generator=g)
    elif order == "roll":  # a structured shared order: neighbours stay together
        perm = (torch.arange(S) + 64) % S
    else:
        perm = torch.stack([torch.randperm(S, generator=g) for _ in range(B * H)]).view(B, H, S)
    return q, k, perm


def _interp_main() -> None:
    """Run every case in the interpreter and print one JSON object of errors."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1")
    torch.set_num_threads(1)
    from dit_accel.attention import draft_estimate as draft
    from dit_accel.attention.blocks import pool_matrix as pool_of
    from dit_accel.kernels import block_mask_from_bool

    out = {}
    for name, (B, H, S, D, dtype, pool, order, log_bias, layout) in CASES.items():
        q, k, perm = _inputs(B, H, S, D, dtype, order, layout)
        pool_matrix = pool_of(perm) if perm is not None and perm.dim() == 1 else None
        kw = dict(perm=perm, query_pool=pool, scale=0.125 / 1.6, log_block_size=log_bias)
        # reference on float32 copies: it then pools in float32, as the kernel does
        ref = draft.draft_map_reference(q.float(), k.float(), pool=pool_matrix, **kw)
        got = draft.draft_map(q, k, backend="triton", **kw)
        out[name] = {
            "probs_err": (got.probs - ref.probs).abs().max().item(),
            "row_sum_err": (got.probs.sum(-1) - 1).abs().max().item(),
            "q_sim_err": (got.q_similarity - ref.q_similarity).abs().max().item(),
            "k_sim_err": (got.k_similarity - ref.k_similarity).abs().max().item(),
            "shape_ok": got.probs.shape == ref.probs.shape and got.q_similarity.shape == ref.q_similarity.shape,
            "finite": bool(torch.isfinite(got.probs).all()),
        }
    B, H, S, D, dtype, pool, order, log_bias, layout = ESTIMATE_CASE
    q, k, perm = _inputs(B, H, S, D, dtype, order, layout, seed=1)
    text = torch.zeros(-(-S // 128), dtype=torch.bool)
    text[-1] = True
    kw = dict(perm=perm, top_p=0.7, min_blocks_fraction=0.1, similarity_threshold=0.25, query_pool=pool,
              temperature=0.5, text_blocks=text)
    ref = draft.draft_estimate(q, k, pool=pool_of(perm).to(q.dtype), backend="torch", **kw)
    got = draft.draft_estimate(q, k, **kw)  # TRITON_INTERPRET=1: backend "auto" picks the kernel
    out["estimate"] = {
        "probs_err": (got.probs - ref.probs).abs().max().item(),
        "keep_equal": bool(torch.equal(got.keep, ref.keep)),
        "protect_equal": bool(torch.equal(got.protect, ref.protect)),
        "dense_rows_equal": bool(torch.equal(got.dense_rows, ref.dense_rows)),
        "dense_cols_equal": bool(torch.equal(got.dense_cols, ref.dense_cols)),
        "some_dense": bool(got.dense_rows.any() or got.dense_cols.any()),
        "some_skipped": bool((~got.keep).any()),
    }
    # the BlockMask rows written by the selection kernel (ragged last block, text block, dense rows/columns)
    got_rows = draft.draft_estimate(q, k, block_indices=True, **kw)
    ref_mask = block_mask_from_bool(ref.keep, S, S)
    out["estimate"].update(
        rows_keep_equal=bool(torch.equal(got_rows.keep, got.keep)),
        rows_num_equal=bool(torch.equal(got_rows.kv_num_blocks, ref_mask.kv_num_blocks)),
        rows_idx_equal=bool(torch.equal(got_rows.kv_indices, ref_mask.kv_indices)),
        no_rows_unasked=got.kv_indices is None and got.kv_num_blocks is None,
        torch_path_no_rows=ref.kv_indices is None,
    )
    out["select"] = _select_cases()
    out["plans"] = _plan_cases()
    out["launches"] = _launch_cases()
    print(json.dumps(out))


LAUNCH_VARIANTS = {"rows32_chunk32_stages1": dict(map_rows=32, key_chunk=32, stages=1, map_warps=4, key_warps=2),
                   "rows64_chunk128": dict(map_rows=64, key_chunk=128)}
"""MapLaunch fields replaced for the launch-independence check (tiling only: the map must not move)."""


def _launch_cases() -> dict:
    """The map under other launch parameters (``MAP_LAUNCH``, what benchmarks/draft_map_tune.py searches) against
    the shipped launch's: ragged last block, a shared permutation, several query blocks per program. The
    interpreter ignores ``num_warps`` / ``num_stages``: only ``map_rows`` and ``key_chunk`` change the tiling
    here; the warp and stage fields are checked on the GPU (the tune script's ``rows_equal`` / ``max_abs_diff``)."""
    from dataclasses import replace

    from dit_accel.kernels import draft_map as kernel

    q, k, perm = _inputs(1, 2, 5 * 128 + 37, 64, "float32", "shared", "bshd", seed=5)
    kw = dict(perm=perm, query_pool=4, scale=0.1, log_block_size=True)
    shipped = kernel.MAP_LAUNCH
    base = kernel.draft_map_triton(q, k, **kw)
    res = {}
    for name, fields in LAUNCH_VARIANTS.items():
        kernel.MAP_LAUNCH = replace(shipped, **fields)
        try:
            got = kernel.draft_map_triton(q, k, **kw)
        finally:
            kernel.MAP_LAUNCH = shipped
        res[name] = max((a - b).abs().max().item() for a, b in zip(got, base))
    return res


def _plan_cases() -> dict:
    """``draft`` and ``combo`` plans (the combo refresh call) on the kernel path, whose BlockMask comes from the
    selection kernel's rows, against ``block_mask_from_bool`` of the estimate's ``keep`` and against the whole
    plan on the torch path. Grid (3, 10, 10): 300 tokens, 3 blocks, the last one ragged (44 tokens)."""
    import sparse_helpers as helpers

    from dit_accel.attention import draft_estimate, temporal_skip
    from dit_accel.attention.blocks import text_blocks_of
    from dit_accel.attention.registry import get_method
    from dit_accel.kernels import block_mask_from_bool

    grid = (3, 10, 10)
    S = 300
    valves_off = dict(dense_warmup=0.0, dense_first_layers=0, dense_last_step=False, min_seq_len=0)
    res = {}
    for name, method_name, batch, options in (
        ("draft", "draft", 1, dict(top_p=0.6, similarity_threshold=0.0)),
        ("draft_batch2", "draft", 2, dict(top_p=0.6, similarity_threshold=0.0)),
        ("permuted", "permuted", 1, dict(top_p=0.6, similarity_threshold=0.0)),
        ("combo_reuse_batch2", "combo", 2, dict(top_p=0.6, similarity_threshold=0.0, drift_check=False,
                                                skip_threshold=float("-inf"))),
        ("combo_drift", "combo", 1, dict(top_p=0.6, similarity_threshold=0.0, skip_threshold=-8.0)),
    ):
        q, k = helpers.smooth_qk(grid, heads=2, dim=64, seed=3)
        if batch == 2:
            q2, k2 = helpers.smooth_qk(grid, heads=2, dim=64, seed=4)
            q, k = torch.cat([q, q2]), torch.cat([k, k2])
        masks, compactions = {}, {}
        for backend in ("auto", "torch"):  # auto: the kernels (TRITON_INTERPRET=1)
            method = get_method(method_name, **valves_off, **options, map_backend=backend)
            ctx = helpers.hand_context(grid)
            call = helpers.call_at(ctx, 0, S, batch=batch)
            # count the compaction passes the plan runs (none on the kernel path: the kernel wrote the rows)
            calls = []
            for module in (draft_estimate, temporal_skip):
                module.block_mask_from_bool = lambda *a, _calls=calls, **kw: _calls.append(1) or block_mask_from_bool(*a, **kw)
            try:
                plan = method.plan(q, k, call)
            finally:
                draft_estimate.block_mask_from_bool = temporal_skip.block_mask_from_bool = block_mask_from_bool
            compactions[backend] = len(calls)
            mask, perm = (plan.mask, plan.perm) if hasattr(plan, "mask") else (plan, None)
            masks[backend] = mask
            if backend == "auto":
                est = method.stages.select.estimate(q, k, method.order_of(q, k, call),
                                                    text_blocks_of(call.layout, S, q.device))
                ref = block_mask_from_bool(est.keep, S, S)
        got, torch_mask = masks["auto"], masks["torch"]
        res[name] = {
            "num_equal": bool(torch.equal(got.kv_num_blocks, ref.kv_num_blocks)),
            "idx_equal": bool(torch.equal(got.kv_indices, ref.kv_indices)),
            "torch_path_equal": bool(torch.equal(got.kv_num_blocks, torch_mask.kv_num_blocks)
                                     and torch.equal(got.kv_indices, torch_mask.kv_indices)),
            "seq_lengths": list(got.seq_lengths),
            "shape": list(got.kv_indices.shape),
            "some_skipped": bool((got.kv_num_blocks < got.kv_indices.shape[-1]).any()),
            "compactions": compactions,
        }
    return res


def _select_cases() -> dict:
    """The top-p + protect kernel against top_p_keep and the torch protect masks (random maps: no ties), and its
    BlockMask rows against block_mask_from_bool of the reference selection."""
    from dit_accel.attention.draft_estimate import top_p_keep
    from dit_accel.kernels import block_mask_from_bool
    from dit_accel.kernels.draft_map import select_blocks_triton

    g = torch.Generator().manual_seed(2)
    res = {}
    # name: (B, H, blocks, top_p, min_blocks, text, similarity threshold, map)
    for name, (B, H, nb, top_p, min_blocks, text_on, thr, kind) in SELECT_CASES.items():
        probs = torch.softmax(3 * torch.randn(B, H, nb, nb, generator=g), -1)
        if kind == "peaked":  # every row's mass on its diagonal block: top-p keeps only the diagonal
            probs = torch.softmax(probs + 30 * torch.eye(nb), -1)
        q_sim, k_sim = torch.rand(B, H, nb, generator=g), torch.rand(B, H, nb, generator=g)
        text = (torch.arange(nb) >= nb - 2) if text_on else None
        sel = select_blocks_triton(probs, q_sim, k_sim, top_p=top_p, min_blocks=min_blocks,
                                   similarity_threshold=thr, text_blocks=text, indices=True)
        plain = select_blocks_triton(probs, q_sim, k_sim, top_p=top_p, min_blocks=min_blocks,
                                     similarity_threshold=thr, text_blocks=text)
        ref_protect = torch.eye(nb, dtype=torch.bool) | (q_sim < thr)[..., None] | (k_sim < thr)[..., None, :]
        if text is not None:
            ref_protect = ref_protect | text[:, None] | text[None, :]
        ref_keep = top_p_keep(probs, top_p, min_blocks) | ref_protect
        ref_top_p = top_p_keep(probs, top_p, min_blocks)
        # the torch reference of the rows: block_mask_from_bool of the reference selection (any block size
        # fits: the rows depend only on the block matrix; 64-token blocks, the last one ragged)
        ref_mask = block_mask_from_bool(ref_keep, nb * 64 - 5, nb * 64 - 5, 64)
        per_row = sel.kv_num_blocks.flatten().tolist()
        res[name] = {"keep_equal": bool(torch.equal(sel.keep, ref_keep)),
                     "protect_equal": bool(torch.equal(sel.protect, ref_protect)),
                     "topp_only_equal": bool(torch.equal(sel.keep & ~sel.protect, ref_top_p & ~ref_protect)),
                     "skips": int((~sel.keep).sum()),
                     "num_equal": bool(torch.equal(sel.kv_num_blocks, ref_mask.kv_num_blocks)),
                     "idx_equal": bool(torch.equal(sel.kv_indices, ref_mask.kv_indices)),
                     "rows_dtype_ok": sel.kv_num_blocks.dtype == torch.int32 and sel.kv_indices.dtype == torch.int32
                     and sel.kv_num_blocks.is_contiguous() and sel.kv_indices.is_contiguous(),
                     "plain_same_keep": bool(torch.equal(plain.keep, sel.keep) and torch.equal(plain.protect, sel.protect)),
                     "plain_no_rows": plain.kv_num_blocks is None and plain.kv_indices is None,
                     "diagonal_only_rows": sum(n == 1 for n in per_row),
                     "full_rows": sum(n == nb for n in per_row)}
    return res


@pytest.fixture(scope="module")
def interp_results() -> dict:
    pytest.importorskip("triton")
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    proc = subprocess.run([sys.executable, str(HERE)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_reference(interp_results: dict, case: str) -> None:
    r = interp_results[case]
    assert r["shape_ok"] and r["finite"], r
    # float32 arithmetic in another summation order: probabilities agree to ~1e-6
    assert r["probs_err"] < 2e-5, r
    assert r["row_sum_err"] < 1e-5, r
    assert r["q_sim_err"] < 1e-5 and r["k_sim_err"] < 1e-5, r


def test_kernel_estimate_selects_as_reference(interp_results: dict) -> None:
    r = interp_results["estimate"]
    assert r["probs_err"] < 2e-5, r
    assert r["keep_equal"] and r["protect_equal"] and r["dense_rows_equal"] and r["dense_cols_equal"], r
    assert r["some_skipped"], r  # the case exercises the selection, not only "keep everything"


@pytest.mark.parametrize("case", list(SELECT_CASES))
def test_select_kernel_matches_top_p_keep_and_protect(interp_results: dict, case: str) -> None:
    r = interp_results["select"][case]
    assert r["keep_equal"] and r["protect_equal"] and r["topp_only_equal"], r
    assert (r["skips"] == 0) == (case in ("keep_all", "single_block")), r


@pytest.mark.parametrize("case", list(SELECT_CASES))
def test_select_kernel_rows_equal_block_mask_from_bool(interp_results: dict, case: str) -> None:
    r = interp_results["select"][case]
    assert r["num_equal"] and r["idx_equal"] and r["rows_dtype_ok"], r
    assert r["plain_same_keep"] and r["plain_no_rows"], r
    if case == "diagonal_only":
        assert r["diagonal_only_rows"] == 2 * 7, r  # every row holds only its diagonal block
    if case in ("dense_rows_cols", "keep_all"):
        assert r["full_rows"] > 0, r


def test_estimate_rows_equal_block_mask_from_bool(interp_results: dict) -> None:
    r = interp_results["estimate"]
    assert r["rows_keep_equal"] and r["rows_num_equal"] and r["rows_idx_equal"], r
    assert r["no_rows_unasked"] and r["torch_path_no_rows"], r


@pytest.mark.parametrize("case", ["draft", "draft_batch2", "permuted", "combo_reuse_batch2", "combo_drift"])
def test_plans_take_the_kernel_rows(interp_results: dict, case: str) -> None:
    r = interp_results["plans"][case]
    assert r["num_equal"] and r["idx_equal"], r
    assert r["torch_path_equal"], r  # the whole plan as on the torch path (these inputs have no near-ties)
    assert r["seq_lengths"] == [300, 300] and r["shape"][-2:] == [3, 3], r
    assert r["shape"][0] == (2 if "batch2" in case else 1), r
    assert r["some_skipped"], r
    assert r["compactions"] == {"auto": 0, "torch": 1}, r  # the kernel path runs no compaction pass


@pytest.mark.parametrize("variant", list(LAUNCH_VARIANTS))
def test_map_does_not_depend_on_the_launch(interp_results: dict, variant: str) -> None:
    # probabilities and similarities of another tiling equal the shipped launch's up to float32 summation order
    assert interp_results["launches"][variant] < 1e-6


@pytest.mark.parametrize("fields", [dict(select_warps=3), dict(map_rows=100), dict(stages=0), dict(key_warps=True)])
def test_map_launch_rejects_bad_fields(fields: dict) -> None:
    from dit_accel.kernels.draft_map import MapLaunch

    name = next(iter(fields))
    with pytest.raises(ValueError, match=f"MapLaunch.{name} must be one of"):
        MapLaunch(**fields)


def test_select_kernel_bad_input_is_a_clear_error() -> None:
    pytest.importorskip("triton")
    from dit_accel.kernels.draft_map import select_blocks_triton

    probs, sim = torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4)
    with pytest.raises(ValueError, match="probs must be a"):
        select_blocks_triton(probs.double(), sim, sim, top_p=0.5, min_blocks=1, similarity_threshold=0.0)
    with pytest.raises(ValueError, match=r"similarities must be \(1, 1, 4\)"):
        select_blocks_triton(probs, sim[..., :3], sim, top_p=0.5, min_blocks=1, similarity_threshold=0.0)
    with pytest.raises(ValueError, match=r"text_blocks must be \(4,\)"):
        select_blocks_triton(probs, sim, sim, top_p=0.5, min_blocks=1, similarity_threshold=0.0,
                             text_blocks=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="top_p must be > 0"):
        select_blocks_triton(probs, sim, sim, top_p=0.0, min_blocks=1, similarity_threshold=0.0)


def _qk(D=64, S=200, dtype=torch.float32):
    return torch.randn(1, 2, S, D, dtype=dtype), torch.randn(1, 2, S, D, dtype=dtype)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(query_pool=3), "query_pool must be a divisor of 128"),
        (dict(query_pool=256), "query_pool must be a divisor of 128"),
        (dict(block=64), "block must be 128"),
        (dict(perm=torch.arange(199)), r"perm shape must be \(200,\) or \(1, 2, 200\)"),
        (dict(perm=torch.arange(200).float()), "perm dtype must be torch.int32 or torch.int64"),
        (dict(scale=0.0), "scale must be a finite number > 0"),
    ],
)
def test_kernel_bad_input_is_a_clear_error(kwargs: dict, match: str) -> None:
    pytest.importorskip("triton")
    from dit_accel.kernels.draft_map import draft_map_triton

    q, k = _qk()
    args = dict(scale=0.1) | kwargs
    with pytest.raises(ValueError, match=match):
        draft_map_triton(q, k, **args)


def test_kernel_rejects_unsupported_tensors() -> None:
    pytest.importorskip("triton")
    from dit_accel.kernels.draft_map import draft_map_triton

    q, k = _qk(D=72)
    with pytest.raises(ValueError, match=r"head dim must be one of \(64, 128\)"):
        draft_map_triton(q, k, scale=0.1)
    q, k = _qk()
    with pytest.raises(ValueError, match="dtype must be one of"):
        draft_map_triton(q.double(), k.double(), scale=0.1)
    with pytest.raises(ValueError, match="one shape"):
        draft_map_triton(q, k[:, :, :100], scale=0.1)
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            draft_map_triton(q, k, scale=0.1)


def test_dispatcher_mirrors_the_kernel_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    from dit_accel.attention import draft_estimate as draft
    from dit_accel.kernels.draft_map import DRAFT_MAP_DTYPES, DRAFT_MAP_HEAD_DIMS

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # only read by the check; no kernel runs here
    for d in (32, 64, 72, 128, 256):
        for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            q = torch.empty(1, 1, 4, d, dtype=dtype)
            assert draft.draft_map_kernel_applies(q) == (d in DRAFT_MAP_HEAD_DIMS and dtype in DRAFT_MAP_DTYPES)


def test_dispatcher_backend_choice() -> None:
    from dit_accel.attention import draft_estimate as draft

    q, k = _qk(D=72)  # no kernel for head dim 72 and none on CPU: the reference runs under "auto"
    assert not draft.draft_map_kernel_applies(q)
    got = draft.draft_map(q, k, query_pool=4, scale=0.1)
    ref = draft.draft_map_reference(q, k, query_pool=4, scale=0.1)
    assert torch.equal(got.probs, ref.probs)
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'torch'\)"):
        draft.draft_map(q, k, scale=0.1, backend="cuda")


if __name__ == "__main__":
    _interp_main()
