"""Tests of benchmarks/fp8_accuracy.py on CPU, tiny shapes: the row fields, the error ordering of the recipes,
the exactness of evaluating a subset of query blocks, the masks, the JSON written by main(), and the kernel
columns in the Triton interpreter."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("fp8_accuracy", ROOT / "benchmarks" / "fp8_accuracy.py")
fa = importlib.util.module_from_spec(_spec)
sys.modules["fp8_accuracy"] = fa
_spec.loader.exec_module(fa)

from dit_accel.kernels import block_mask_from_bool  # noqa: E402
from dit_accel.kernels.fp8_reference import block_sparse_attention_fp8_reference  # noqa: E402

FIELDS = {"source", "heads", "query_rows", "tokens", "head_dim", "dtype", "mask", "density", "density_requested",
          "recipe", "impl", "rel_l2", "rel_l2_worst_head", "cosine", "max_abs_err", "lse_max_abs_err",
          "lse_inf_mismatch", "meets_target", "seconds"}


def _rows() -> list[dict]:
    q, k, v = fa.random_inputs(2, 640, 64, seed=3, device="cpu")
    return fa.accuracy_rows(q, k, v, info={"source": "random"}, densities=[1.0, 0.4], seed=1)


def test_rows_have_the_fields_and_the_recipes_order_by_error() -> None:
    rows = _rows()
    assert len(rows) == 3 * len(fa.RECIPES)  # dense, random, pooled x every path
    by = {(r["mask"], r["recipe"]): r for r in rows}
    for r in rows:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert r["heads"] == 2 and r["tokens"] == 640 and r["head_dim"] == 64 and r["query_rows"] == 640
        assert 0 < r["rel_l2"] <= r["rel_l2_worst_head"] + 1e-12 and 0.99 < r["cosine"] <= 1.0 + 1e-9
        assert r["meets_target"] == (r["rel_l2"] <= fa.TARGET_REL_L2) and not r["lse_inf_mismatch"]
        # Cosine and relative L2 describe the same error: 1 - cos ~ rel_l2^2 / 2 for small errors.
        assert 1 - r["cosine"] < r["rel_l2"] ** 2
    for mask in ("dense", "random", "pooled"):
        e = {name: by[(mask, name)]["rel_l2"] for name in fa.RECIPES}
        # bf16 only rounds its output; int8 Q.K with 16-bit P.V is the finest 8-bit recipe, fp8/fp8 the coarsest.
        assert e["bf16"] < 0.005 < e["int8/16bit"] < e["fp8/16bit"] < e["fp8/fp8"] < 0.1, (mask, e)
        assert e["int8/16bit"] < e["int8/fp8"] < e["fp8/fp8"], (mask, e)
        assert by[(mask, "bf16")]["lse_max_abs_err"] < 1e-3 < by[(mask, "fp8/fp8")]["lse_max_abs_err"]
    assert by[("dense", "bf16")]["density"] == 1.0
    assert abs(by[("random", "bf16")]["density"] - 0.4) < 0.05  # round(0.4 * 5) = 2 of 5 key blocks


def test_metrics_match_a_direct_computation() -> None:
    q, k, v = fa.random_inputs(1, 300, 64, seed=5, device="cpu")
    (row,) = fa.accuracy_rows(q, k, v, info={"source": "random"}, densities=[1.0], recipes={"fp8/fp8": fa.RECIPES["fp8/fp8"]})
    mask = block_mask_from_bool(torch.ones(1, 1, 3, 3, dtype=torch.bool), 300, 300, fa.BLOCK)
    got = block_sparse_attention_fp8_reference(q, k, v, mask, recipe=fa.RECIPES["fp8/fp8"]).double()
    ref = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 8.0, dim=-1) @ v.double()
    assert math.isclose(row["rel_l2"], float((got - ref).norm() / ref.norm()), rel_tol=1e-3)
    assert math.isclose(row["max_abs_err"], float((got - ref).abs().max()), rel_tol=1e-2)
    assert math.isclose(1 - row["cosine"], 1 - float((got * ref).sum() / (got.norm() * ref.norm())), rel_tol=1e-2)


def test_a_subset_of_query_blocks_gives_the_full_calls_rows() -> None:
    q, k, v = fa.random_inputs(2, 1000, 64, seed=7, device="cpu")
    k = k + (3 * torch.randn(64)).to(k.dtype)  # a key offset: smoothing uses the mean over all keys
    blocks = fa.sample_query_blocks(1000, 3, seed=0)
    assert blocks.tolist() == sorted(blocks.tolist()) and len(blocks) == 3
    recipe = fa.RECIPES["fp8/fp8"]
    full = block_sparse_attention_fp8_reference(
        q, k, v, block_mask_from_bool(torch.ones(1, 2, 8, 8, dtype=torch.bool), 1000, 1000, 128), recipe=recipe)
    qs = fa.query_rows(q, blocks)
    sub = block_sparse_attention_fp8_reference(
        qs, k, v, block_mask_from_bool(torch.ones(1, 2, 3, 8, dtype=torch.bool), qs.shape[2], 1000, 128), recipe=recipe)
    assert torch.equal(fa.query_rows(full, blocks), sub)
    assert fa.sample_query_blocks(1000, None, seed=0).tolist() == list(range(8))


def test_pooled_mask_keeps_the_diagonal_and_the_top_blocks() -> None:
    q, k, _ = fa.random_inputs(1, 1024, 64, seed=2, device="cpu")
    blocks = torch.tensor([1, 5])
    masks = {kind: keep for kind, _, keep in fa.block_masks(fa.query_rows(q, blocks), k, blocks, [0.25], seed=0)}
    assert set(masks) == {"random", "pooled"}
    assert masks["random"].shape == (1, 1, 2, 8) and masks["random"].sum(-1).eq(2).all()
    pooled = masks["pooled"][0, 0]
    assert pooled[0, 1] and pooled[1, 5] and pooled.sum(-1).ge(2).all() and pooled.sum(-1).le(3).all()


def test_main_writes_the_json(tmp_path: Path) -> None:
    out = tmp_path / "acc.json"
    assert fa.main(["--sources", "random", "--shapes", "2x384x64", "--densities", "1.0", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {"device", "versions", "date", "argv", "settings", "rows", "summary"} <= set(data) and data["complete"]
    assert data["target_rel_l2"] == 0.03 and len(data["rows"]) == len(fa.RECIPES)
    assert {s["recipe"] for s in data["summary"]} == set(fa.RECIPES)


_INTERPRETED = """
import json, sys
sys.path[:0] = [{bench!r}, {kernels!r}]
import interp_patch  # noqa: F401  (numpy >= 2.4: loop bounds read from memory)
import fp8_accuracy as fa
q, k, v = fa.random_inputs(1, 256, 64, seed=0, device="cpu")
rows = fa.accuracy_rows(q, k, v, info={{"source": "random"}}, densities=[1.0, 0.5], kernel=True,
                        recipes={{r: fa.RECIPES[r] for r in ("fp8/fp8", "int8/fp8")}})
print(json.dumps(rows))
"""


def test_kernel_rows_in_the_triton_interpreter() -> None:
    # The --device cuda plumbing, on CPU: the interpreter computes the fp8 P.V recipes correctly (not 16-bit dots).
    code = _INTERPRETED.format(bench=str(ROOT / "benchmarks"), kernels=str(ROOT / "tests" / "kernels"))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(rows) == 6
    for r in rows:
        kernel = r["kernel"]
        assert not kernel["nan"] and not kernel["lse_inf_mismatch"]
        assert kernel["rel_l2_vs_torch_reference"] < 0.01, r
        assert abs(kernel["rel_l2"] - r["rel_l2"]) < 0.005 and abs(kernel["lse_max_abs_err"] - r["lse_max_abs_err"]) < 0.01, r
