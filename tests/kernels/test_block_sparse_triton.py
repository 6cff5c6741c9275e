"""The Triton kernel in the Triton interpreter (CPU) against the torch reference and SDPA.

The kernel runs in a subprocess started with TRITON_INTERPRET=1 (interp_checks.py), so the interpreter
never leaks into other tests; each case below asserts on the numbers it reports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

CASES = [
    "dense_fp32_d64",
    "random_fp16_ragged_b64_empty_row",
    "d72_fp32_b64",
    "d128_fp32_subtiles_32",
    "d128_fp32_subtiles_64",
    "cross_len_bshd_broadcast",
    "partial_plus_full_blocks",
    "empty_mask",
]

HEAD_CASES = ["heads_per_head_mask_fp16", "heads_broadcast_perm_d72"]

INDEX_CASES = [
    "index_fp16_d64_ragged",
    "index_per_head_d72_bshd",
    "index_d128_cross_subtiles",
    "index_q_only_d128",
    "index_kv_only_d128",
]


@pytest.fixture(scope="module")
def interp_results() -> dict:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, str(HERE / "interp_checks.py")], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("case", CASES + INDEX_CASES + HEAD_CASES)
def test_kernel_matches_reference(interp_results: dict, case: str) -> None:
    r = interp_results[case]
    # float16 inputs: the kernel rounds P to float16 before P @ V (as FlashAttention does).
    assert r["rel_err"] < 2e-3, r
    assert not r["nan"], r
    assert r["lse_err"] < 1e-4, r
    assert r["lse_inf_match"], r
    assert r["ts_err"] < 1e-4, r
    assert r["ts_inf_match"], r


def test_kernel_dense_equals_sdpa(interp_results: dict) -> None:
    assert interp_results["dense_fp32_d64"]["sdpa_rel_err"] < 1e-5


def test_kernel_empty_mask_gives_zeros_and_neg_inf(interp_results: dict) -> None:
    r = interp_results["empty_mask"]
    assert r["all_zero_out"] and r["all_lse_neg_inf"] and not r["nan"]


@pytest.mark.parametrize("case", INDEX_CASES)
def test_indexed_kernel_equals_explicit_gather_kernel_scatter(interp_results: dict, case: str) -> None:
    # Same loads in the same order and the same arithmetic: out, LSE and tile stats agree bit for bit.
    r = interp_results[case]
    assert r["explicit_bitwise"] and r["explicit_out_max_diff"] == 0.0, r


def test_identity_index_equals_no_index_bitwise(interp_results: dict) -> None:
    assert interp_results["index_identity_bitwise"]["equal"]


def test_indexed_dense_equals_sdpa_in_original_order(interp_results: dict) -> None:
    assert interp_results["index_dense_vs_sdpa"]["rel_err"] < 1e-5


@pytest.mark.parametrize("case", HEAD_CASES)
def test_head_subset_leaves_other_heads_uncomputed(interp_results: dict, case: str) -> None:
    assert interp_results[case]["others_ts_neg_inf"]


def test_every_case_ran(interp_results: dict) -> None:
    assert sorted(interp_results) == sorted(CASES + INDEX_CASES + HEAD_CASES
                                            + ["index_identity_bitwise", "index_dense_vs_sdpa"])
