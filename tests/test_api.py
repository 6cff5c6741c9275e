"""Public API: argument errors, apply twice, remove without apply, presets, the dispatcher backend."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import TINY_CASES, run_model

import dit_accel
from dit_accel.attention.dense import dense_attention
from dit_accel.attention.op import site_of
from dit_accel.pipelines.families import detect_family


@pytest.fixture
def wan():
    case = TINY_CASES["wan"]
    return case.build(), case.inputs()


def test_unknown_method_lists_registered_ones(wan):
    model, _ = wan
    with pytest.raises(ValueError, match=r"unknown attention method 'sparse-magic'; registered methods: \[.*'dense'.*'full'"):
        dit_accel.apply(model, attention="sparse-magic")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['topk'\].*allowed options: \['min_seq_len'\]"):
        dit_accel.processors_for(model, method="full", topk=3)
    with pytest.raises(TypeError, match="attention method must be a str or AttentionMethod, got int"):
        dit_accel.apply(model, attention=3)
    with pytest.raises(ValueError, match="min_seq_len must be an int >= 0, got -1"):
        dit_accel.get_method("dense", min_seq_len=-1)
    # nothing was changed by the failed calls
    assert dit_accel.get_handle(model) is None and not hasattr(model, "_diffusers_hook")


def test_unsupported_transformer_and_wrong_types():
    with pytest.raises(ValueError, match=r"unsupported transformer class 'Linear'.*WanTransformer3DModel"):
        dit_accel.apply(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"expects a diffusers pipeline or transformer, got str"):
        dit_accel.apply("wan")
    with pytest.raises(TypeError, match=r"expected a diffusers transformer.*got int"):
        dit_accel.processors_for(5)
    compiled = torch.compile(TINY_CASES["wan"].build())
    with pytest.raises(ValueError, match="apply dit_accel before torch.compile"):
        dit_accel.apply(compiled)


def test_presets_and_cache_arguments(wan):
    model, inputs = wan
    with pytest.raises(ValueError, match=r"unknown preset 'warp'; valid presets: \['dense'"):
        dit_accel.apply(model, preset="warp")
    with pytest.raises(ValueError, match=r"unknown cache scheduler 'teacache'; available schedulers: \['fixed'"):
        dit_accel.apply(model, cache="teacache")
    with pytest.raises(TypeError, match=r"cache must be a scheduler name or a CacheConfig, got int"):
        dit_accel.apply(model, cache=3)
    assert dit_accel.get_handle(model) is None and not hasattr(model, "_diffusers_hook")
    with pytest.raises(TypeError, match="preset must be a str"):
        dit_accel.apply(model, preset=1)
    handle = dit_accel.apply(model, preset="dense")
    assert handle.method.name == "dense" and handle.preset.tag == "dense@1"
    handle = dit_accel.apply(model, preset="dense", attention="full")  # attention overrides the preset
    assert handle.method.name == "full"
    summary = handle.summary()
    assert summary["attention"] == "full" and summary["preset"] == "dense@1" and summary["families"] == {"transformer": "wan"}
    handle.remove()


def test_apply_twice_replaces_cleanly_and_remove_is_idempotent(wan):
    model, inputs = wan
    reference = run_model(model, inputs)
    originals = dict(model.attn_processors)
    first = dit_accel.apply(model, attention="dense")
    second = dit_accel.apply(model, attention="full")
    assert not first.active and second.active
    assert list(model._diffusers_hook.hooks) == ["dit_accel_context"]
    assert {site_of(m).binding.method.name for _, m, _, _ in detect_family(model).attention_modules(model)} == {"full"}
    run_model(model, inputs)
    dit_accel.remove(model)
    dit_accel.remove(model)  # second remove: no-op
    assert all(model.attn_processors[k] is originals[k] for k in originals)
    assert torch.equal(run_model(model, inputs), reference)


def test_remove_without_apply_is_a_noop(wan):
    model, inputs = wan
    reference = run_model(model, inputs)
    dit_accel.remove(model)
    dit_accel.remove(None)
    assert torch.equal(run_model(model, inputs), reference)


def test_attention_none_keeps_stock_processors_but_records_context(wan):
    model, inputs = wan
    originals = dict(model.attn_processors)
    handle = dit_accel.apply(model)
    assert all(model.attn_processors[k] is originals[k] for k in originals)
    run_model(model, inputs)
    assert handle.contexts["transformer"].grid == (2, 10, 10) and handle.stats() == []
    dit_accel.remove(model)


def test_stats_keys_and_reset(wan):
    model, inputs = wan
    handle = dit_accel.apply(model, attention=dit_accel.get_method("full", min_seq_len=0))
    run_model(model, inputs)
    stats = handle.stats()
    assert set(stats[0]) == {
        "transformer", "call", "step", "num_steps", "layer", "module", "branch", "method", "density",
        "plan_ms", "backend", "dense_reason", "seq_len", "text_tokens",
    }
    assert isinstance(stats[0]["density"], float) and stats[0]["module"] == "blocks.0.attn1"
    summary = handle.stats_summary()
    assert summary["attention_calls"] == summary["sparse_calls"] == 2
    assert summary["mean_density"] == pytest.approx(1.0) and summary["backends"] == {"block_sparse": 2}
    assert summary["dense_reasons"] == {}
    handle.reset_stats()
    assert handle.stats() == []
    handle.stats_enabled = False
    run_model(model, inputs)
    assert handle.stats() == [] and handle.stats_enabled is False
    with pytest.raises(TypeError, match="stats_enabled must be a bool"):
        handle.stats_enabled = "yes"
    dit_accel.remove(model)


def test_dense_backend_probe_on_cpu_is_logged_once(caplog):
    from dit_accel.attention import dense as dense_module

    dense_module._CHOICES.clear()
    with caplog.at_level(logging.INFO, logger="dit_accel"):
        assert dit_accel.dense_backend_name("cpu") == "cpu_sdpa"
        assert dit_accel.dense_backend_name("cpu") == "cpu_sdpa"
    assert sum("dense attention backend" in r.message for r in caplog.records) == 1
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    assert torch.equal(dense_attention(q, k, v), torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_registered_diffusers_backend_matches_native(wan):
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    model, inputs = wan
    reference = run_model(model, inputs)
    assert AttentionBackendName("dit_accel") in _AttentionBackendRegistry._backends
    model.set_attention_backend("dit_accel")  # stock processors, our backend: dense for every call
    try:
        assert (run_model(model, inputs) - reference).abs().max().item() <= 1e-5
    finally:
        model.reset_attention_backend()
        _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)
    handle = dit_accel.apply(model, attention="dense")
    procs = [p for p in model.attn_processors.values()]
    assert all(p._attention_backend == AttentionBackendName("dit_accel") and p._parallel_config is None for p in procs)
    handle.remove()


def test_context_parallel_limits_are_clear_errors():
    from types import SimpleNamespace

    from dit_accel.attention.backend import _dit_accel_attention

    q = torch.randn(1, 8, 2, 64)
    ring = SimpleNamespace(context_parallel_config=SimpleNamespace(ring_degree=2, ulysses_degree=1))
    with pytest.raises(ValueError, match=r"Ulysses context parallelism only: ContextParallelConfig\(ulysses_degree=N\).*got ring_degree=2"):
        _dit_accel_attention(q, q, q, _parallel_config=ring)
    with pytest.raises(ValueError, match="does not return LSE"):
        _dit_accel_attention(q, q, q, return_lse=True)

    case = TINY_CASES["pixart"]
    model, inputs = case.build(), case.inputs()
    dit_accel.apply(model, attention="dense")
    for processor in model.attn_processors.values():
        processor._parallel_config = object()  # what diffusers' enable_parallelism would do
    with pytest.raises(ValueError, match="context parallelism is not supported for PixArtDitAccelProcessor"):
        run_model(model, inputs)
    dit_accel.remove(model)


def test_non_stock_processor_is_refused_not_replaced(wan):
    from diffusers.models.attention_processor import AttnProcessor2_0

    model, _ = wan
    custom = AttnProcessor2_0()
    model.blocks[1].attn1.set_processor(custom)
    with pytest.raises(ValueError, match=r"module 'blocks.1.attn1' runs AttnProcessor2_0, not the stock WanAttnProcessor"):
        dit_accel.apply(model, attention="dense")
    assert model.blocks[1].attn1.processor is custom
    assert dit_accel.get_handle(model) is None and not hasattr(model, "_diffusers_hook")


def test_cache_argument_installs_and_removes_the_scheduler(wan):
    model, inputs = wan
    reference = run_model(model, inputs)
    handle = dit_accel.apply(model, attention="dense", cache="fixed")
    assert handle.summary()["cache"] == "fixed" and handle.summary()["cache_config"]["interval"] == 2
    assert any(hasattr(b, "_diffusers_hook") for b in model.blocks)
    assert (run_model(model, inputs) - reference).abs().max().item() <= 1e-5  # warm-up step: computed in full
    assert handle.cache_stats() and set(handle.cache_summary()) == {"transformer"}
    dit_accel.remove(model)
    assert not any(hasattr(b, "_diffusers_hook") for b in model.blocks) and not hasattr(model, "_diffusers_hook")
    assert torch.equal(run_model(model, inputs), reference)
