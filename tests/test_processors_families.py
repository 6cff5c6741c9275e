"""Every family: our processors equal the stock ones (dense and full-mask sparse), remove() is exact."""

from __future__ import annotations

import pytest
import torch
from conftest import EXPECTED_GRID, TINY_CASES, run_model

import dit_accel
from dit_accel.attention.processors import DitAccelProcessorMixin
from dit_accel.pipelines.families import detect_family


def _our_processors(model: torch.nn.Module) -> dict[str, DitAccelProcessorMixin]:
    return {k: p for k, p in model.attn_processors.items() if isinstance(p, DitAccelProcessorMixin)}


@pytest.mark.parametrize("case_name", sorted(TINY_CASES))
def test_dense_method_matches_stock_processors(case_name):
    case = TINY_CASES[case_name]
    model, inputs = case.build(), case.inputs()
    reference = run_model(model, inputs)
    family = detect_family(model)

    handle = dit_accel.apply(model, attention="dense")
    ours = _our_processors(model)
    expected_modules = family.attention_modules(model)
    assert len(ours) == len(expected_modules) > 0
    assert all(hasattr(p, "_attention_backend") and hasattr(p, "_parallel_config") for p in ours.values())
    out = run_model(model, inputs)

    assert (out - reference).abs().max().item() <= 1e-5
    stats = handle.stats()
    n_self = sum(1 for _, _, role, _ in expected_modules if role == "self")
    assert len(stats) == n_self  # one record per self-attention call
    assert {s["backend"] for s in stats} == {dit_accel.dense_backend_name()}
    assert {s["dense_reason"] for s in stats} <= {"method", "short_sequence"}
    dit_accel.remove(model)


@pytest.mark.parametrize("case_name", sorted(TINY_CASES))
def test_full_mask_runs_block_sparse_kernel_and_matches(case_name):
    case = TINY_CASES[case_name]
    model, inputs = case.build(), case.inputs()
    reference = run_model(model, inputs)

    handle = dit_accel.apply(model, attention=dit_accel.get_method("full", min_seq_len=0))
    out = run_model(model, inputs)

    assert (out - reference).abs().max().item() <= 1e-5
    stats = handle.stats()
    assert stats and all(s["backend"] == "block_sparse" and s["dense_reason"] is None for s in stats)
    assert all(s["density"] == pytest.approx(1.0) for s in stats)
    assert handle.contexts["transformer"].grid == EXPECTED_GRID[case_name]
    layers = sorted({s["layer"] for s in stats})
    assert layers == list(range(len(layers)))
    dit_accel.remove(model)


@pytest.mark.parametrize("case_name", sorted(TINY_CASES))
def test_remove_restores_bit_identical_output_and_objects(case_name):
    case = TINY_CASES[case_name]
    model, inputs = case.build(), case.inputs()
    untouched = case.build()
    reference = run_model(untouched, inputs)
    originals = dict(model.attn_processors)

    dit_accel.apply(model, attention=dit_accel.get_method("full", min_seq_len=0))
    run_model(model, inputs)
    dit_accel.remove(model)

    assert torch.equal(run_model(model, inputs), reference)
    restored = model.attn_processors
    assert restored.keys() == originals.keys()
    assert all(restored[k] is originals[k] for k in originals)
    assert not hasattr(model, "_diffusers_hook")
    assert "forward" not in model.__dict__
    assert dit_accel.get_handle(model) is None


def test_low_level_processors_for_then_remove():
    case = TINY_CASES["wan"]
    model, inputs = case.build(), case.inputs()
    reference = run_model(model, inputs)
    originals = dict(model.attn_processors)

    processors = dit_accel.processors_for(model, method="full", min_seq_len=0)
    assert processors.keys() == originals.keys()
    model.set_attn_processor(processors)
    out = run_model(model, inputs)
    assert (out - reference).abs().max().item() <= 1e-5
    handle = dit_accel.get_handle(model)
    assert handle is not None and handle.stats()[0]["backend"] == "block_sparse"

    dit_accel.remove(model)
    assert all(model.attn_processors[k] is originals[k] for k in originals)
    assert torch.equal(run_model(model, inputs), reference)


def test_hunyuan_text_refiner_keeps_stock_processor():
    model = TINY_CASES["hunyuan_video"].build()
    originals = dict(model.attn_processors)
    processors = dit_accel.processors_for(model)
    refiner = [k for k in processors if "token_refiner" in k]
    assert refiner and all(processors[k] is originals[k] for k in refiner)
    assert all(isinstance(processors[k], DitAccelProcessorMixin) for k in processors if k not in refiner)
    dit_accel.remove(model)


def test_hunyuan_padded_text_is_dropped_from_sparse_call_and_unequal_padding_goes_dense():
    case = TINY_CASES["hunyuan_video"]
    model, inputs = case.build(), case.inputs()
    handle = dit_accel.apply(model, attention=dit_accel.get_method("full", min_seq_len=0))
    run_model(model, inputs)
    # 160 video tokens + 9 valid of 12 text tokens
    assert {(s["seq_len"], s["text_tokens"], s["backend"]) for s in handle.stats()} == {(169, 9, "block_sparse")}

    dit_accel.remove(model)
    batch = {k: (torch.cat([v, v]) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    batch["encoder_attention_mask"][1, 7:] = False  # rows with different padding: the mask must be applied
    reference = run_model(model, batch)
    handle = dit_accel.apply(model, attention=dit_accel.get_method("full", min_seq_len=0))
    out = run_model(model, batch)
    assert (out - reference).abs().max().item() <= 1e-5
    assert {s["dense_reason"] for s in handle.stats()} == {"mask"}
    dit_accel.remove(model)


def test_short_sequences_and_unsupported_head_dims_go_dense():
    case = TINY_CASES["wan"]
    model, inputs = case.build(), case.inputs()
    handle = dit_accel.apply(model, attention=dit_accel.get_method("full", min_seq_len=10_000))
    run_model(model, inputs)
    assert {s["dense_reason"] for s in handle.stats()} == {"short_sequence"}
    dit_accel.remove(model)

    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    odd = WanTransformer3DModel.from_config(
        dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
             text_dim=16, freq_dim=32, ffn_dim=32, num_layers=1, rope_max_seq_len=32)
    ).eval()
    reference = run_model(odd, inputs)
    handle = dit_accel.apply(odd, attention=dit_accel.get_method("full", min_seq_len=0))
    assert (run_model(odd, inputs) - reference).abs().max().item() <= 1e-5
    assert {s["dense_reason"] for s in handle.stats()} == {"head_dim"}
    dit_accel.remove(odd)


@pytest.mark.parametrize("case_name", ["wan", "sd3"])
def test_one_processor_instance_serves_every_module(case_name):
    # Processors hold nothing per module (the module's attention site does), like diffusers' own processors.
    case = TINY_CASES[case_name]
    model, inputs = case.build(), case.inputs()
    reference = run_model(model, inputs)
    originals = dict(model.attn_processors)
    one = type(next(iter(dit_accel.processors_for(model, method="full", min_seq_len=0).values())))()
    model.set_attn_processor(one)
    out = run_model(model, inputs)
    assert (out - reference).abs().max().item() <= 1e-5
    stats = dit_accel.get_handle(model).stats()
    family = detect_family(model)
    expected = [(name, layer) for name, _, role, layer in family.attention_modules(model) if role == "self"]
    assert [(s["module"], s["layer"]) for s in stats] == expected
    assert {s["backend"] for s in stats} == {"block_sparse"}
    dit_accel.remove(model)
    assert all(model.attn_processors[k] is originals[k] for k in originals)


def test_processor_on_an_unbound_module_runs_dense_like_stock():
    case = TINY_CASES["sd3"]
    model, inputs = case.build(), case.inputs()
    reference = run_model(model, inputs)
    processor_cls = detect_family(model).processor_cls
    model.set_attn_processor(processor_cls())  # built without arguments, no dit-accel site on the modules
    assert (run_model(model, inputs) - reference).abs().max().item() <= 1e-5
    assert dit_accel.get_handle(model) is None
