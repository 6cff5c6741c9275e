"""dit-accel next to the rest of diffusers: IP-Adapter loading and unloading, gradients, copy.deepcopy."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from conftest import TINY_CASES, run_model

import dit_accel
from dit_accel.attention.base import AttentionMethod
from dit_accel.attention.op import site_of
from dit_accel.attention.processors import DitAccelProcessorMixin
from dit_accel.kernels import block_mask_from_bool
from dit_accel.pipelines.families import detect_family

pytestmark = pytest.mark.usefixtures("one_thread")


def _full():
    return dit_accel.get_method("full", min_seq_len=0)


class DiagonalMethod(AttentionMethod):
    """Block-diagonal mask: half the tiles of a 2-block sequence, so a sparse call differs from dense."""

    name = "test_diagonal_compat"

    def plan(self, q, k, ctx):
        n = -(-q.shape[-2] // 128)
        return block_mask_from_bool(torch.eye(n, dtype=torch.bool)[None, None], q.shape[-2], k.shape[-2])


# --- IP-Adapter --------------------------------------------------------------------------------------
def _flux_ip_state_dict(model) -> dict:
    """A random IP-Adapter for a tiny FLUX transformer, built as diffusers' own transformer tests build one."""
    from diffusers.models.embeddings import ImageProjection
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    torch.manual_seed(3)
    hidden = model.config.num_attention_heads * model.config.attention_head_dim
    ip: dict[str, torch.Tensor] = {}
    dual = [n for n in model.attn_processors if not n.startswith("single_transformer_blocks")]
    for key_id, _ in enumerate(dual):
        sd = FluxIPAdapterAttnProcessor(hidden_size=hidden, cross_attention_dim=model.config.joint_attention_dim).state_dict()
        for w in ("weight", "bias"):
            ip[f"{key_id}.to_k_ip.{w}"] = sd[f"to_k_ip.0.{w}"]
            ip[f"{key_id}.to_v_ip.{w}"] = sd[f"to_v_ip.0.{w}"]
    proj = ImageProjection(cross_attention_dim=model.config.joint_attention_dim,
                           image_embed_dim=model.config.pooled_projection_dim, num_image_text_embeds=4).state_dict()
    image_proj = {"proj.weight": proj["image_embeds.weight"], "proj.bias": proj["image_embeds.bias"],
                  "norm.weight": proj["norm.weight"], "norm.bias": proj["norm.bias"]}
    return {"image_proj": image_proj, "ip_adapter": ip}


def _sd3_ip_state_dict(model) -> dict:
    """A random SD3 IP-Adapter (one joint IP processor per attention module and a time-aware image projection)."""
    from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0
    from diffusers.models.embeddings import IPAdapterTimeImageProjection

    torch.manual_seed(3)
    hidden = model.config.num_attention_heads * model.config.attention_head_dim
    ip: dict[str, torch.Tensor] = {}
    for idx in range(len(model.attn_processors)):
        sd = SD3IPAdapterJointAttnProcessor2_0(hidden_size=hidden, ip_hidden_states_dim=hidden,
                                               head_dim=model.config.attention_head_dim, timesteps_emb_dim=64).state_dict()
        ip.update({f"{idx}.{k}": v for k, v in sd.items()})
    proj = IPAdapterTimeImageProjection(embed_dim=16, output_dim=hidden, hidden_dim=64, heads=1, num_queries=4,
                                        timestep_in_dim=8).state_dict()
    return {"image_proj": proj, "ip_adapter": ip}


def _flux_pipeline(transformer):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)


def _sd3_pipeline(transformer):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)


IP_CASES = {
    # family: (pipeline builder, state dict builder, IP-Adapter forward kwargs, modules the IP-Adapter takes over)
    "flux": (_flux_pipeline, _flux_ip_state_dict, {"ip_adapter_image_embeds": torch.randn(1, 1, 32)},
             {"transformer_blocks.0.attn"}),
    "sd3": (_sd3_pipeline, _sd3_ip_state_dict, {"ip_adapter_image_embeds": torch.randn(1, 3, 16)},
            {"transformer_blocks.0.attn", "transformer_blocks.0.attn2", "transformer_blocks.1.attn"}),
}


def _load(pipe, state_dict, family):
    if family == "flux":
        pipe.load_ip_adapter(state_dict, weight_name="ip.safetensors", image_encoder_pretrained_model_name_or_path=None)
    else:
        pipe.load_ip_adapter(state_dict, weight_name="ip.safetensors", image_encoder_folder=None)


@pytest.mark.parametrize("family", sorted(IP_CASES))
def test_ip_adapter_load_and_unload_after_apply(family, caplog):
    build_pipe, build_state, ip_kwargs, taken = IP_CASES[family]
    case = TINY_CASES[family]
    inputs = case.inputs()
    ip_inputs = dict(inputs, joint_attention_kwargs=dict(ip_kwargs))

    stock = build_pipe(case.build())  # the reference: the same IP-Adapter on the stock model
    _load(stock, build_state(stock.transformer), family)
    stock_ip = run_model(stock.transformer, dict(inputs, joint_attention_kwargs=dict(ip_kwargs)))
    stock.unload_ip_adapter()
    stock_plain = run_model(stock.transformer, inputs)

    pipe = build_pipe(case.build())
    handle = dit_accel.apply(pipe, attention=_full())
    with caplog.at_level(logging.WARNING, logger="dit_accel"):
        _load(pipe, build_state(pipe.transformer), family)
    assert set(handle.replaced_processors()["transformer"]) == taken
    assert any("instead of dit-accel's processor" in r.message for r in caplog.records)
    out = run_model(pipe.transformer, ip_inputs)
    assert (out - stock_ip).abs().max().item() <= 1e-5
    # our attention stays on every module the IP-Adapter left alone (FLUX: the single-stream blocks)
    patched = {s["module"] for s in handle.stats()}
    ours = {n for n, m, _, _ in detect_family(pipe.transformer).attention_modules(pipe.transformer)}
    assert patched == ours - taken and {s["backend"] for s in handle.stats()} <= {"block_sparse"}

    pipe.unload_ip_adapter()
    assert handle.replaced_processors() == {"transformer": {}}
    handle.reset_stats()
    out = run_model(pipe.transformer, inputs)
    assert (out - stock_plain).abs().max().item() <= 1e-5
    assert {s["module"] for s in handle.stats()} == ours

    dit_accel.remove(pipe)
    assert not any(isinstance(p, DitAccelProcessorMixin) for p in pipe.transformer.attn_processors.values())
    assert torch.equal(run_model(pipe.transformer, inputs), stock_plain)


def test_remove_keeps_an_ip_adapter_loaded_after_apply():
    build_pipe, build_state, ip_kwargs, taken = IP_CASES["flux"]
    pipe = build_pipe(TINY_CASES["flux"].build())
    dit_accel.apply(pipe, attention="dense")
    _load(pipe, build_state(pipe.transformer), "flux")
    dit_accel.remove(pipe)
    kinds = {n.removesuffix(".processor"): type(p).__name__ for n, p in pipe.transformer.attn_processors.items()}
    assert kinds == {"transformer_blocks.0.attn": "FluxIPAdapterAttnProcessor",
                     "single_transformer_blocks.0.attn": "FluxAttnProcessor"}
    assert all(site_of(m) is None for m in pipe.transformer.modules())


# --- gradients ------------------------------------------------------------------------------------------
def _attention_weight_grads(model, inputs, forward=None) -> dict[str, torch.Tensor]:
    model.zero_grad()
    out = (model if forward is None else forward)(**inputs, return_dict=False)[0]
    out.square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if n.endswith(("to_q.weight", "to_v.weight"))}


@pytest.mark.parametrize("case_name", ["wan", "sd3"])
def test_gradients_run_dense_and_equal_stock(case_name):
    case = TINY_CASES[case_name]
    model, inputs = case.build(), case.inputs()
    stock = _attention_weight_grads(model, inputs)
    assert stock and all(g.abs().sum() > 0 for g in stock.values())

    handle = dit_accel.apply(model, attention=DiagonalMethod(min_seq_len=0))
    with torch.no_grad():  # without gradients the call is sparse (and differs from dense)
        run_model(model, inputs)
    assert {s["backend"] for s in handle.stats()} == {"block_sparse"}
    handle.reset_stats()

    ours = _attention_weight_grads(model, inputs)
    assert ours.keys() == stock.keys()
    for name in stock:
        torch.testing.assert_close(ours[name], stock[name], rtol=1e-4, atol=1e-6)
    stats = handle.stats()
    assert stats and {s["dense_reason"] for s in stats} == {"grad"} and {s["density"] for s in stats} == {1.0}
    dit_accel.remove(model)


def test_compiled_training_step_gets_the_stock_gradient():
    case = TINY_CASES["wan"]
    model, inputs = case.build(), case.inputs()
    stock = _attention_weight_grads(model, inputs)
    dit_accel.apply(model, attention=DiagonalMethod(min_seq_len=0))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ours = _attention_weight_grads(model, inputs, compiled)
    for name in stock:
        torch.testing.assert_close(ours[name], stock[name], rtol=1e-4, atol=1e-6)
    dit_accel.remove(model)


# --- copy.deepcopy ----------------------------------------------------------------------------------------
def test_deepcopy_gives_an_independent_patched_clone():
    case = TINY_CASES["wan"]
    model, inputs = case.build(), case.inputs()
    handle = dit_accel.apply(model, attention=DiagonalMethod(min_seq_len=0), cache="fixed")
    expected = run_model(model, inputs)
    handle.reset_stats()

    clone = copy.deepcopy(model)
    assert dit_accel.get_handle(model) is handle and handle.active
    clone_handle = dit_accel.get_handle(clone)
    assert clone_handle is not None and clone_handle is not handle
    for name, module, _, _ in clone_handle._attachments[0].family.attention_modules(clone):
        assert site_of(module).binding.context is clone_handle.contexts["transformer"]
        assert site_of(module) is not site_of(model.get_submodule(name))
    assert clone_handle.cache is handle.cache and clone_handle.method is handle.method

    with torch.no_grad():
        for p in clone.parameters():
            p.mul_(1.5)
    changed = run_model(clone, inputs)
    assert (changed - expected).abs().max().item() > 1e-3  # the clone computes with its own weights
    assert len(clone_handle.stats()) == 2 and handle.stats() == []
    assert torch.equal(run_model(model, inputs), expected)  # the original still works, unchanged
    assert len(handle.stats()) == 2

    # removing dit-accel from the clone leaves a stock model with the clone's weights
    dit_accel.remove(clone)
    reference = case.build()
    with torch.no_grad():
        for p in reference.parameters():
            p.mul_(1.5)
    assert torch.equal(run_model(clone, inputs), run_model(reference, inputs))
    assert "__deepcopy__" not in clone.__dict__ and not hasattr(clone, "_diffusers_hook")
    assert torch.equal(run_model(model, inputs), expected)
    dit_accel.remove(model)


def test_deepcopy_errors_are_clear():
    from diffusers.hooks.hooks import HookRegistry, ModelHook

    case = TINY_CASES["flux"]
    pipe = _flux_pipeline(case.build())
    dit_accel.apply(pipe, attention="dense")
    with pytest.raises(TypeError, match=r"cannot deep-copy a FluxPipeline with dit-accel applied"):
        copy.deepcopy(pipe)
    clone = copy.deepcopy(pipe.transformer)  # the transformer alone copies
    assert dit_accel.get_handle(clone).families == {"transformer": "flux"}
    dit_accel.remove(pipe)

    model = case.build()
    dit_accel.apply(model, attention="dense")
    HookRegistry.check_if_exists_or_initialize(model).register_hook(ModelHook(), "someone_elses_hook")
    with pytest.raises(TypeError, match=r"carries diffusers hooks \['someone_elses_hook'\] besides dit-accel's"):
        copy.deepcopy(model)
    assert dit_accel.get_handle(model).active and "forward" in model.__dict__  # untouched by the failed copy
