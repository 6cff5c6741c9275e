"""dit-accel under diffusers' Ulysses context parallelism, 2 CPU ranks (gloo).

One spawn of two ranks runs every scenario (importing torch and diffusers twice costs more than all of them);
each rank compares its context-parallel run with the single-process run of the same model, which it computes
itself. The tests below read the per-rank results.
"""

from __future__ import annotations

import os
import socket
import sys
import traceback
from typing import Any, Callable

import pytest
import torch
import torch.multiprocessing as mp

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
WORLD = 2
STEPS = (999.0, 750.0, 500.0, 250.0)
"""Timesteps of a bare-transformer "generation" (decreasing: one denoising step each)."""
SPARSE = dict(top_p=0.6, min_blocks_fraction=0.1, similarity_threshold=-1.0, dense_warmup=0.0, dense_first_layers=0,
              dense_last_step=False, min_seq_len=0, dense_above=None)
"""combo/permuted options that keep some tiles out, turn the safety valves off and always run the kernel."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- run inside each rank ------------------------------------------------------------------------------------
def _wan(num_layers: int = 3):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=4,
               text_dim=16, freq_dim=32, ffn_dim=32, num_layers=num_layers, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    return WanTransformer3DModel.from_config(cfg).eval()


def _inputs(split_content: bool = False) -> dict:
    """Grid (4, 16, 16) = 1,024 tokens (eight 128-token blocks). ``split_content``: frames 0-1 (rank 0's shard)
    nearly flat, frames 2-3 (rank 1's) strong noise, so the shards' probe changes differ."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, 4, 4, 32, 32, generator=g)
    if split_content:
        hidden[:, :, :2] *= 0.05
        hidden[:, :, 2:] *= 3.0
    return dict(hidden_states=hidden, encoder_hidden_states=torch.randn(1, 12, 16, generator=g))


def _generate(model, inputs: dict, handle=None) -> list[torch.Tensor]:
    """One bare-transformer generation: a forward per timestep of :data:`STEPS`."""
    if handle is not None:
        handle.begin_call()
    outs = []
    with torch.no_grad():
        for t in STEPS:
            outs.append(model(**inputs, timestep=torch.tensor([t]), return_dict=False)[0])
    return outs


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def _decisions(handle) -> list[tuple[int, str, float | None]]:
    return [(r["step"], r["decision"], r["probe_change"]) for r in handle.cache_stats()]


def _enable(model, mesh) -> None:
    from diffusers import ContextParallelConfig

    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD, mesh=mesh))


def _single_and_parallel(accelerate: Callable, inputs: dict, mesh) -> tuple[Any, Any, float]:
    """``accelerate`` (a model -> handle function) on a single-process model and, before ``enable_parallelism``,
    on a context-parallel one; one generation each. Returns both handles and the outputs' max difference."""
    single = _wan()
    ref_handle = accelerate(single)
    reference = _generate(single, inputs, ref_handle)
    model = _wan()
    handle = accelerate(model)
    _enable(model, mesh)
    return ref_handle, handle, _max_diff(_generate(model, inputs, handle), reference)


def scenario_full(mesh) -> dict:
    """The ``full`` method (every tile) under Ulysses: each rank's attention sees the whole sequence."""
    import dit_accel

    model, inputs = _wan(2), _inputs()
    inputs["hidden_states"] = inputs["hidden_states"][:, :, :2, :20, :20]  # grid (2, 10, 10) = 200 tokens
    with torch.no_grad():
        reference = [model(**inputs, timestep=torch.tensor([STEPS[0]]), return_dict=False)[0]]
    handle = dit_accel.apply(model, attention=dit_accel.get_method("full", min_seq_len=0))
    _enable(model, mesh)
    handle.begin_call()
    with torch.no_grad():
        out = [model(**inputs, timestep=torch.tensor([STEPS[0]]), return_dict=False)[0]]
    return {"diff": _max_diff(out, reference), "seen": sorted({(s["seq_len"], s["backend"]) for s in handle.stats()})}


def scenario_sparse_cached(mesh) -> dict:
    """combo (sparse, plan reused between refreshes) + ProCache, as in the balanced preset."""
    import dit_accel
    from dit_accel.caching import ProCacheConfig

    def accelerate(model):
        return dit_accel.apply(model, attention=dit_accel.get_method("combo", **SPARSE), token_order="call",
                               cache=ProCacheConfig(schedule=[1, 1, 0, 1], warmup_steps=1, final_steps=0,
                                                    num_inference_steps=len(STEPS)))

    ref_handle, handle, diff = _single_and_parallel(accelerate, _inputs(), mesh)
    sparse = [s for s in handle.stats() if s["backend"] == "block_sparse"]
    return {
        "diff": diff,
        "decisions": _decisions(handle),
        "reference_decisions": _decisions(ref_handle),
        "seq_lens": sorted({s["seq_len"] for s in handle.stats()}),
        "sparse_calls": len(sparse),
        "min_density": min(float(s["density"]) for s in sparse),
        "reference_density": [float(s["density"]) for s in ref_handle.stats() if s["backend"] == "block_sparse"],
        "density": [float(s["density"]) for s in sparse],
    }


def scenario_forced_decisions(mesh) -> dict:
    """The probe scheduler where the shards' relative changes lie on both sides of the threshold."""
    import dit_accel
    from dit_accel.caching import ProbeCacheConfig

    inputs = _inputs(split_content=True)
    # The probe is block 0's residual; its relative change per shard, from a plain single-process run.
    plain = _wan()
    residuals = []
    plain.blocks[0].register_forward_hook(lambda m, args, out: residuals.append((out - args[0]).detach()))
    _generate(plain, inputs)
    def change(p0, p1):
        return ((p1 - p0).abs().mean() / p0.abs().mean()).item()

    half = residuals[0].shape[1] // WORLD
    local = [change(*(x[:, r * half:(r + 1) * half] for x in residuals[:2])) for r in range(WORLD)]
    whole = change(*residuals[:2])
    # Between the whole sequence's change and the shard farther from it: the ranks alone would disagree
    # at step 1, and the whole sequence's decision keeps a margin from the threshold.
    far = max(local) if whole < sum(local) / WORLD else min(local)
    threshold = (whole + far) / 2

    def accelerate(model):
        return dit_accel.apply(model, cache=ProbeCacheConfig(threshold=threshold, warmup_steps=0, final_steps=0,
                                                             num_inference_steps=len(STEPS)))

    ref_handle, handle, diff = _single_and_parallel(accelerate, inputs, mesh)
    return {"local": local, "whole": whole, "threshold": threshold, "decisions": _decisions(handle),
            "reference_decisions": _decisions(ref_handle), "diff": diff}


def scenario_token_order_forward(mesh) -> dict:
    """``token_order="forward"`` under context parallelism: every forward falls back to the folded order."""
    import dit_accel

    def accelerate(model):
        return dit_accel.apply(model, attention=dit_accel.get_method("permuted", **SPARSE), token_order="forward")

    ref_handle, handle, diff = _single_and_parallel(accelerate, _inputs(), mesh)
    return {"diff": diff, "summary": handle.token_order_summary(),
            "reference_summary": ref_handle.token_order_summary(),
            "orders": sorted({s.get("token_order") for s in handle.stats() if s["backend"] == "block_sparse"})}


def scenario_guidance_branches(mesh) -> dict:
    """A CFG pipeline (the testbed: ``cond`` then ``uncond`` per step, both on every rank) with the probe cache."""
    import dit_accel
    from dit_accel.caching import ProbeCacheConfig
    from sparse_helpers import generate, tiny_testbed

    def run(parallel: bool):
        pipe = tiny_testbed()
        handle = dit_accel.apply(pipe, cache=ProbeCacheConfig(threshold=0.2, warmup_steps=1, final_steps=0))
        if parallel:
            _enable(pipe.transformer, mesh)
        out = generate(pipe, steps=5)
        return out, [(r["step"], r["branch"], r["decision"], r["probe_change"]) for r in handle.cache_stats()]

    reference, reference_decisions = run(False)
    out, decisions = run(True)
    return {"diff": (out - reference).abs().max().item(), "decisions": decisions,
            "reference_decisions": reference_decisions}


def scenario_joint_text_dense(mesh) -> dict:
    """FLUX (joint [text, image] attention): with a sparse method, context-parallel calls run dense."""
    import dit_accel
    from conftest import TINY_CASES, flux_image_ids

    case = TINY_CASES["flux"]
    inputs = dict(case.inputs(), hidden_states=torch.randn(1, 24 * 20, 4, generator=torch.Generator().manual_seed(2)),
                  img_ids=flux_image_ids(24, 20))  # 480 image + 8 text tokens: four 128-token blocks

    def forward(model):
        with torch.no_grad():
            return [model(**inputs, return_dict=False)[0]]

    draft = dict(SPARSE, top_p=0.3)
    stock = forward(case.build())
    single = case.build()
    ref_handle = dit_accel.apply(single, attention=dit_accel.get_method("draft", **draft))
    sparse_single = forward(single)
    model = case.build()
    handle = dit_accel.apply(model, attention=dit_accel.get_method("draft", **draft))
    _enable(model, mesh)
    out = forward(model)
    return {"single_sparse_vs_stock": _max_diff(sparse_single, stock), "diff_to_stock": _max_diff(out, stock),
            "single_densities": [float(r["density"]) for r in ref_handle.stats()], "records": len(handle.stats())}


def scenario_apply_after_enable(mesh) -> dict:
    """``enable_parallelism`` first, then ``apply`` (sparse + a fixed cache), then ``remove``."""
    import dit_accel
    from dit_accel.caching import FixedCacheConfig

    def accelerate(model):
        return dit_accel.apply(model, attention=dit_accel.get_method("combo", **SPARSE), token_order="call",
                               cache=FixedCacheConfig(interval=2, warmup_steps=1, final_steps=0,
                                                      num_inference_steps=len(STEPS)))

    single, inputs = _wan(), _inputs()
    stock = _generate(single, inputs)
    ref_handle = accelerate(single)
    reference = _generate(single, inputs, ref_handle)
    model = _wan()
    _enable(model, mesh)
    handle = accelerate(model)
    block0 = list(model.blocks[0]._diffusers_hook._hook_order)
    out = _generate(model, inputs, handle)
    decisions = _decisions(handle)
    dit_accel.remove(model)
    after_remove = _generate(model, inputs)
    return {"diff": _max_diff(out, reference), "decisions": decisions, "reference_decisions": _decisions(ref_handle),
            "block0_hooks": block0, "removed_diff": _max_diff(after_remove, stock)}


def scenario_ring_refused(ring_mesh) -> dict:
    """Ring attention: refused by ``apply`` after ``enable_parallelism``, and by the backend the other way round."""
    import dit_accel
    from diffusers import ContextParallelConfig

    errors = {}
    model = _wan(2)
    model.enable_parallelism(config=ContextParallelConfig(ring_degree=WORLD, mesh=ring_mesh))
    try:
        dit_accel.apply(model, attention="full")
        errors["apply"] = None
    except ValueError as exc:
        errors["apply"] = str(exc)
    errors["apply_left_processors"] = type(model.blocks[0].attn1.processor).__name__
    model = _wan(2)
    dit_accel.apply(model, attention=dit_accel.get_method("full", min_seq_len=0))
    model.enable_parallelism(config=ContextParallelConfig(ring_degree=WORLD, mesh=ring_mesh))
    try:
        _generate(model, _inputs())
        errors["forward"] = None
    except ValueError as exc:
        errors["forward"] = str(exc)
    return errors


def scenario_data_parallel(mesh) -> dict:
    """No context parallelism, a probe cache, different work per rank (rank 0 runs two generations, rank 1 one):
    decisions stay local (a reduction over the world group would hang rank 0's second generation)."""
    import torch.distributed as dist

    import dit_accel
    from dit_accel.caching import ProbeCacheConfig
    from dit_accel.parallel import context_parallel_group

    rank = dist.get_rank()
    model = _wan()
    handle = dit_accel.apply(model, cache=ProbeCacheConfig(threshold=0.5, warmup_steps=0, final_steps=0,
                                                           num_inference_steps=len(STEPS)))
    runs = []
    for i in range(2 if rank == 0 else 1):
        _generate(model, _inputs(split_content=(rank + i) % 2 == 1), handle)
        runs.append(len(handle.cache_stats()))
    return {"group": context_parallel_group(model), "runs": runs}


SCENARIOS: dict[str, Callable[..., dict]] = {
    "full": scenario_full,
    "sparse_cached": scenario_sparse_cached,
    "forced_decisions": scenario_forced_decisions,
    "token_order_forward": scenario_token_order_forward,
    "guidance_branches": scenario_guidance_branches,
    "joint_text_dense": scenario_joint_text_dense,
    "apply_after_enable": scenario_apply_after_enable,
    "ring_refused": scenario_ring_refused,
    "data_parallel": scenario_data_parallel,
}


def _worker(rank: int, port: int, queue) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    results: dict[str, Any] = {}
    try:
        sys.path.insert(0, TESTS_DIR)
        import transformers  # noqa: F401  diffusers' CP hooks call logger.warning_once, which transformers adds
        from torch.distributed.device_mesh import init_device_mesh

        torch.accelerator.device_count = lambda: 1  # diffusers computes rank % device_count; CPU has none
        ulysses = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("ring", "ulysses"))
        ring = init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("ring", "ulysses"))
        for name, scenario in SCENARIOS.items():
            try:
                results[name] = scenario(ring if name == "ring_refused" else ulysses)
            except Exception:  # report to the parent instead of hanging it
                results[name] = {"error": traceback.format_exc()}
            dist.barrier()
    finally:
        queue.put((rank, results))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    """Per rank, the results of every scenario."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed not available")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    try:
        got = dict(queue.get(timeout=300) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [got[r] for r in range(WORLD)]


def _result(ranks: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    out = [r[name] for r in ranks]
    for rank, r in enumerate(out):
        assert "error" not in r, f"rank {rank}: {r['error']}"
    return out


def test_ulysses_attention_sees_whole_sequence_and_matches_single_process(ranks):
    for r in _result(ranks, "full"):
        assert r["diff"] <= 1e-5
        # each rank's attention ran on all 200 tokens (its half of the heads), on the block-sparse path
        assert r["seen"] == [(200, "block_sparse")]


def test_sparse_method_with_cache_matches_single_process(ranks):
    for r in _result(ranks, "sparse_cached"):
        assert r["seq_lens"] == [1024]
        assert r["sparse_calls"] > 0 and r["min_density"] < 1.0, "the setting must drop tiles"
        # each rank plans its own heads on the global grid: the plans, and so the outputs, are the single process's
        assert r["diff"] <= 1e-4
        assert [d[:2] for d in r["decisions"]] == [d[:2] for d in r["reference_decisions"]]
        assert "reuse" in {d[1] for d in r["decisions"]}
    # a rank holds one of the two heads: per call, their densities average to the single process's
    a, b = _result(ranks, "sparse_cached")
    assert [(x + y) / 2 for x, y in zip(a["density"], b["density"])] == pytest.approx(a["reference_density"], abs=1e-6)
    assert len(a["density"]) == len(a["reference_density"])


def test_probe_decisions_agree_across_ranks_when_the_shards_disagree(ranks):
    results = _result(ranks, "forced_decisions")
    local, threshold = results[0]["local"], results[0]["threshold"]
    # alone, one rank would reuse and the other compute at step 1
    assert min(local) < threshold < max(local) and max(local) > 1.2 * min(local)
    assert abs(results[0]["whole"] - threshold) > 0.02 * threshold
    assert results[0]["decisions"] == results[1]["decisions"]
    assert [d[:2] for d in results[0]["decisions"]] == [d[:2] for d in results[0]["reference_decisions"]]
    for (_, _, cp), (_, _, single) in zip(results[0]["decisions"], results[0]["reference_decisions"]):
        assert (cp is None) == (single is None) and (cp is None or cp == pytest.approx(single, rel=1e-4))
    assert all(r["diff"] <= 1e-4 for r in results)


def test_forward_token_order_falls_back_to_folded_under_context_parallelism(ranks):
    for r in _result(ranks, "token_order_forward"):
        assert r["reference_summary"]["transformer"]["forwards"] == {"forward": len(STEPS)}
        assert r["summary"]["transformer"]["forwards"] == {"context_parallel": len(STEPS)}
        assert r["orders"] == ["folded"]
        assert r["diff"] <= 1e-4


def test_guidance_branches_decide_alike_on_every_rank(ranks):
    a, b = _result(ranks, "guidance_branches")
    assert a["decisions"] == b["decisions"]
    assert {d[1] for d in a["decisions"]} == {"cond", "uncond"}
    assert [d[:3] for d in a["decisions"]] == [d[:3] for d in a["reference_decisions"]]
    assert a["diff"] <= 1e-4 and b["diff"] <= 1e-4


def test_joint_text_attention_runs_dense_under_context_parallelism(ranks):
    for r in _result(ranks, "joint_text_dense"):
        # single process: the draft plan drops tiles; under CP the gathered [text, image] chunks have no layout
        assert min(r["single_densities"]) < 1.0 and r["single_sparse_vs_stock"] > 1e-3
        assert r["diff_to_stock"] <= 1e-4 and r["records"] == 0


def test_apply_after_enable_parallelism_and_remove(ranks):
    for r in _result(ranks, "apply_after_enable"):
        # diffusers' split hook outside ours, so the cache sees (and skips) the rank's shard
        assert r["block0_hooks"] == ["dit_accel_cache", "cp_input---blocks.0"]
        assert r["diff"] <= 1e-4
        assert [d[:2] for d in r["decisions"]] == [d[:2] for d in r["reference_decisions"]]
        assert "reuse" in {d[1] for d in r["decisions"]}
        # the stock processors put back by remove() run context-parallel too
        assert r["removed_diff"] <= 1e-5


def test_ring_attention_is_refused_naming_ulysses(ranks):
    for r in _result(ranks, "ring_refused"):
        for where in ("apply", "forward"):
            assert r[where] is not None and "ulysses_degree=N" in r[where] and "ring_degree=2" in r[where]
        assert r["apply_left_processors"] == "WanAttnProcessor"  # nothing changed when apply raised


def test_data_parallel_ranks_decide_alone(ranks):
    first, second = _result(ranks, "data_parallel")
    assert first["group"] is None and second["group"] is None
    assert first["runs"] == [len(STEPS), 2 * len(STEPS)] and second["runs"] == [len(STEPS)]
