"""The ComfyUI node pack against doubles of ComfyUI's interfaces (tests/comfy_doubles.py).

Cloning, attention-override chaining, block-patch chaining, exact restore, step/branch/grid extraction,
dense == no node bit for bit, the sparse path and the cache on ComfyUI-shaped Wan and FLUX models.
"""

from __future__ import annotations

import copy
import importlib
import json
import sys
import types

import pytest
import torch

import comfy_doubles as cd
from dit_accel.comfy import bridge, nodes, patching
from dit_accel.comfy.adapters import FluxAdapter, HunyuanVideoAdapter, SD3Adapter, UnsupportedModel, WanAdapter, adapter_for

WAN_SHAPE = (1, 4, 1, 32, 32)  # grid (1, 16, 16): 256 tokens, 2 kernel blocks
FLUX_SHAPE = (1, 4, 32, 32)    # grid (1, 16, 16): 256 image tokens + 8 text tokens


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _snapshot(model: cd.ModelPatcher) -> tuple:
    return (copy.deepcopy(model.model_options), {k: {k1: list(v1) for k1, v1 in v.items()} for k, v in model.wrappers.items()},
            {k: v.clone() for k, v in model.model.state_dict().items()})


def _same_snapshot(a: tuple, b: tuple) -> bool:
    return repr(a[0]) == repr(b[0]) and a[1] == b[1] and all(torch.equal(a[2][k], b[2][k]) for k in a[2])


@pytest.fixture()
def wan() -> cd.ModelPatcher:
    return cd.patcher(cd.TinyWan())


@pytest.fixture()
def flux() -> cd.ModelPatcher:
    return cd.patcher(cd.TinyFlux())


def test_nodes_clone_and_leave_the_input_unchanged(wan: cd.ModelPatcher) -> None:
    before = _snapshot(wan)
    a = nodes.apply_sparse_attention(wan, "full", "balanced", "bf16", 0)
    b = nodes.apply_feature_cache(a, "fixed", 0.5, warmup_steps=1)
    c = nodes.apply_preset(b, "balanced")
    assert a is not wan and b is not a and c is not b
    assert _same_snapshot(before, _snapshot(wan))
    assert patching.installed_config(wan) is None
    assert patching.installed_config(a).cache is None and patching.installed_config(a).method.name == "full"
    assert patching.installed_config(b).method.name == "full" and patching.installed_config(b).cache.scheduler == "fixed"
    assert patching.installed_config(c).method.name == "combo" and patching.installed_config(c).cache.scheduler == "procache"
    # one override and one set of wrappers however many nodes are chained
    assert isinstance(c.model_options["transformer_options"]["optimized_attention_override"], patching.AttentionOverride)
    assert c.model_options["transformer_options"]["optimized_attention_override"].previous is None
    assert len(c.get_wrappers(patching.OUTER_SAMPLE, patching.WRAPPER_KEY)) == 1
    assert len(c.get_wrappers(patching.APPLY_MODEL, patching.WRAPPER_KEY)) == 1


def test_dense_preset_is_bit_identical_to_no_node(wan: cd.ModelPatcher, flux: cd.ModelPatcher) -> None:
    for model, shape in ((wan, WAN_SHAPE), (flux, FLUX_SHAPE)):
        ref = cd.sample(model, shape, cfg=3.0, steps=2)
        out = cd.sample(nodes.apply_preset(model, "dense"), shape, cfg=3.0, steps=2)
        assert torch.equal(out, ref)


def test_sparse_path_at_full_density_matches_dense(wan: cd.ModelPatcher, flux: cd.ModelPatcher, caplog) -> None:
    caplog.set_level("INFO", logger="dit_accel")
    for model, shape, cfg in ((wan, WAN_SHAPE, 3.0), (flux, FLUX_SHAPE, 1.0)):
        ref = cd.sample(model, shape, cfg=cfg, steps=3)
        out = cd.sample(nodes.apply_sparse_attention(model, "full", "balanced", "bf16", 0), shape, cfg=cfg, steps=3)
        assert _rel(out, ref) < 1e-5
    runs = [json.loads(r.getMessage().split("dit-accel run: ", 1)[1]) for r in caplog.records if "dit-accel run:" in r.getMessage()]
    # Wan: 3 blocks x 3 steps, one self-attention each; FLUX: 2 double + 2 single blocks x 3 steps
    assert [(r["family"], r["attention_calls"], r["sparse_calls"]) for r in runs] == [("wan", 9, 9), ("flux", 12, 12)]


def test_override_chains_the_previous_one_and_leaves_cross_attention_to_it(wan: cd.ModelPatcher) -> None:
    seen: list[tuple[int, int]] = []

    def previous(func, *args, **kwargs):
        seen.append((args[0].shape[1], args[1].shape[1]))
        return func(*args, **kwargs)

    wan.model_options["transformer_options"]["optimized_attention_override"] = previous
    patched = nodes.apply_sparse_attention(wan, "full", "balanced", "bf16", 0)
    assert patched.model_options["transformer_options"]["optimized_attention_override"].previous is previous
    cd.sample(patched, WAN_SHAPE, steps=2)
    # only the cross-attention calls (256 video queries, 8 text keys) reach the previous override
    assert seen and set(seen) == {(256, 8)}
    assert len(seen) == 2 * 3
    seen.clear()
    cd.sample(wan, WAN_SHAPE, steps=2)  # the input model still runs the previous override on every call
    assert sorted(set(seen)) == [(256, 8), (256, 256)]


def test_removal_restores_the_original_output(wan: cd.ModelPatcher, flux: cd.ModelPatcher) -> None:
    for model, shape in ((wan, WAN_SHAPE), (flux, FLUX_SHAPE)):
        before = _snapshot(model)
        ref = cd.sample(model, shape, cfg=3.0, steps=3)
        patched = nodes.apply_feature_cache(nodes.apply_sparse_attention(model, "full", "max", "bf16", 0), "fixed", 0.5,
                                            warmup_steps=1, options='{"final_steps": 0}')
        accelerated = cd.sample(patched, shape, cfg=3.0, steps=3)
        assert not torch.equal(accelerated, ref)
        again = cd.sample(model, shape, cfg=3.0, steps=3)
        assert torch.equal(again, ref)
        assert _same_snapshot(before, _snapshot(model))
        # nothing was attached to the torch modules
        assert not any(m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__ for m in model.model.modules())


def test_step_branches_and_grid_come_from_comfyui_inputs() -> None:
    dm = cd.TinyWan()
    run = patching.Run(bridge.AccelConfig(None, None, "test"), WanAdapter(), dm)
    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    options = {"sample_sigmas": sigmas, "cond_or_uncond": [1, 0]}
    x = torch.zeros(4, 4, 3, 9, 16)  # two rows per branch; H = 9 is padded to 10 (the patch)
    run.begin_forward(x, torch.full((4,), 0.5), torch.zeros(4, 7, 32), {}, options)
    ctx = run.sampling.context
    assert (ctx.clock.step, ctx.clock.num_steps) == (2, 4)
    assert ctx.branches == ("uncond", "uncond", "cond", "cond")
    assert ctx.grid == (3, 5, 8) and ctx.patch_size == (1, 2, 2)
    assert run.forward.cross_lengths == (7,)
    # a sigma between two scheduled ones (a second-order sampler's extra call) belongs to the earlier step
    run.begin_forward(x[:1], torch.tensor([0.3]), torch.zeros(1, 7, 32), {}, {"sample_sigmas": sigmas, "cond_or_uncond": [0]})
    assert ctx.clock.step == 2 and ctx.branches == ("cond",)
    assert patching.branches_of([0, 1, 2], 3) == ("cond", "uncond", "extra")
    assert patching.branches_of(None, 2) == ("cond", "cond")


def test_adapters_classify_calls_and_split_single_streams() -> None:
    wan, flux = WanAdapter(), FluxAdapter()
    winfo = wan.read_forward(cd.TinyWan(), torch.zeros(1, 4, 2, 32, 32), torch.zeros(1, 8, 32), {"clip_fea": torch.zeros(1, 257, 4)})
    assert winfo.grid == (2, 16, 16) and winfo.cross_lengths == (8, 257)
    assert wan.self_attention(winfo, 512, 512) == (0, "none")
    assert wan.self_attention(winfo, 512, 8) is None
    assert wan.self_attention(winfo, 257, 257) is None  # looks like cross-attention with equal lengths: left alone
    finfo = flux.read_forward(cd.TinyFlux(), torch.zeros(1, 4, 32, 32), torch.zeros(1, 8, 32), {})
    assert finfo.grid == (1, 16, 16) and finfo.text_tokens == 8
    assert flux.self_attention(finfo, 264, 264) == (8, "first")
    assert flux.self_attention(finfo, 8, 8) is None
    joint = torch.arange(2 * 10 * 3, dtype=torch.float32).view(2, 10, 3)
    hidden, text = flux.streams(("single_block", 0), {"img": joint}, 4)
    assert torch.equal(text, joint[:, :4]) and torch.equal(hidden, joint[:, 4:])
    assert torch.equal(flux.pack(("single_block", 0), hidden, text)["img"], joint)
    hunyuan = HunyuanVideoAdapter()  # text after the video, in the joint attention and in the single stream
    hidden, text = hunyuan.streams(("single_block", 0), {"img": joint}, 4)
    assert torch.equal(hidden, joint[:, :6]) and torch.equal(text, joint[:, 6:])
    assert torch.equal(hunyuan.pack(("single_block", 0), hidden, text)["img"], joint)
    assert hunyuan.self_attention(finfo, 264, 264) == (8, "last")
    # SD3.5's image-only attn2 has no text tokens; the joint call has the text first
    assert SD3Adapter().self_attention(finfo, 256, 256) == (0, "none")
    assert SD3Adapter().self_attention(finfo, 264, 264) == (8, "first")


def test_cache_runs_the_scheduler_and_chains_block_patches(flux: cd.ModelPatcher, caplog) -> None:
    caplog.set_level("INFO", logger="dit_accel")
    calls: list[tuple] = []

    def previous_patch(args, extra):
        calls.append(args["img"].shape)
        return extra["original_block"](args)

    flux.model_options["transformer_options"]["patches_replace"] = {"dit": {("single_block", 1): previous_patch}}
    ref = cd.sample(flux, FLUX_SHAPE, steps=8)
    calls.clear()
    patched = nodes.apply_feature_cache(flux, "fixed", 0.5, warmup_steps=2, options='{"final_steps": 1}')
    out = cd.sample(patched, FLUX_SHAPE, steps=8)  # no attention method: ComfyUI's attention, cache only
    summary = [json.loads(r.getMessage().split("dit-accel run: ", 1)[1]) for r in caplog.records if "dit-accel run:" in r.getMessage()][-1]
    cache = summary["cache"]
    # warm-up steps 0-1, then every 2nd step computes (2, 4, 6), 3 and 5 reuse, 7 is the final step
    assert cache["blocks_total"] == 8 * 4 and cache["reused"] == 2
    assert cache["blocks_computed"] == 6 * 4
    assert len(calls) == 6  # the earlier patch runs only when its block runs
    assert 0 < _rel(out, ref) < 0.2


def test_layers_keep_their_index_when_the_cache_skips_blocks(wan: cd.ModelPatcher) -> None:
    layers: list[int] = []
    original = bridge.SamplingRun.attend_self

    def spy(self, method, layer, *args, **kwargs):
        layers.append(layer)
        return original(self, method, layer, *args, **kwargs)

    patched = nodes.apply_feature_cache(nodes.apply_sparse_attention(wan, "full", "balanced", "bf16", 0), "fixed", 0.5, warmup_steps=1,
                                        options='{"final_steps": 0, "tail_blocks": 1}')
    bridge.SamplingRun.attend_self = spy
    try:
        cd.sample(patched, WAN_SHAPE, steps=3)
    finally:
        bridge.SamplingRun.attend_self = original
    # steps 0 and 1 compute blocks 0-2; step 2 reuses the span (blocks 0-1) and runs only block 2, still layer 2
    assert layers == [0, 1, 2, 0, 1, 2, 2]


def test_unsupported_models_are_named() -> None:
    with pytest.raises(UnsupportedModel, match="PixArtMS is not supported: ComfyUI's PixArt calls attention without transformer_options"):
        nodes.apply_preset(cd.patcher(cd.TinyPixArt()), "balanced")
    with pytest.raises(UnsupportedModel, match="no adapter for this ComfyUI model class.*comfy.ldm.wan.model.WanModel"):
        adapter_for(torch.nn.Linear(2, 2))


def test_node_inputs_are_checked(wan: cd.ModelPatcher, tmp_path) -> None:
    with pytest.raises(ValueError, match="precision 'fp8' needs an attention method with a 'precision' option"):
        nodes.apply_sparse_attention(wan, "full", "balanced", "fp8", 1024)
    # the sparse methods take the kernel precision
    assert patching.installed_config(nodes.apply_sparse_attention(wan, "combo", "balanced", "fp8", 1024)).method.precision == "fp8"
    with pytest.raises(ValueError, match="overrides: not valid JSON"):
        nodes.apply_preset(wan, "balanced", overrides="{cache: none}")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['cach'\]"):
        nodes.apply_preset(wan, "balanced", overrides='{"cach": null}')
    with pytest.raises(ValueError, match="cache target 'output' is not supported in ComfyUI"):
        nodes.apply_feature_cache(wan, "taylor", 0.5, options='{"target": "output"}')
    with pytest.raises(ValueError, match="unknown preset 'fastest'"):
        nodes.apply_preset(wan, "fastest")


def test_preset_file_and_overrides(wan: cd.ModelPatcher, tmp_path) -> None:
    from dit_accel.caching import save_schedule

    schedule = tmp_path / "schedule.json"
    save_schedule({"format": "dit-accel-cache-schedule", "version": 1, "num_steps": 4, "schedule": [1, 1, 0, 1]}, schedule)
    config = patching.installed_config(nodes.apply_preset(wan, "quality", str(schedule)))
    assert config.method.name == "combo" and config.cache.scheduler == "procache" and config.cache.schedule_file == str(schedule)
    preset_file = tmp_path / "preset.json"
    preset_file.write_text(json.dumps({"attention": "draft", "attention_config": {"quality": "fast"}, "cache": None}))
    config = patching.installed_config(nodes.apply_preset(wan, "balanced", str(preset_file), '{"attention_config": {"min_seq_len": 0}}'))
    assert config.method.name == "draft" and config.method.cfg.quality == "fast" and config.method.min_seq_len == 0
    assert config.cache is None
    config = patching.installed_config(nodes.apply_preset(wan, "none", overrides='{"cache": "fixed", "cache_config": {"interval": 3}}'))
    assert config.method is None and config.cache.interval == 3
    calibrated = tmp_path / "calibrated.json"  # the format `dit-accel calibrate --target-psnr` writes
    calibrated.write_text(json.dumps({
        "format": "dit-accel-preset", "version": 1, "name": "testbed-30db", "target_psnr": 30.0,
        "model": {"id": "testbed", "config_hash": "0123abcd"},
        "settings": {"attention": "combo", "attention_config": {"top_p": 0.8, "skip_threshold": "-inf"},
                     "cache": "fixed", "cache_config": {"interval": 2}},
    }))
    config = patching.installed_config(nodes.apply_preset(wan, "none", str(calibrated)))
    assert config.method.name == "combo" and config.method.cfg.top_p == 0.8
    assert config.method.cfg.skip_threshold == float("-inf") and config.cache.interval == 2


def test_sparse_attention_node_passes_the_kernel_precision(wan: cd.ModelPatcher) -> None:
    out = nodes.apply_sparse_attention(wan, "combo", "balanced", "fp8", 0)
    assert patching.installed_config(out).method.cfg.precision == "fp8"
    with pytest.raises(ValueError, match="precision"):
        nodes.apply_sparse_attention(wan, "full", "max", "fp8", 0)


def test_v1_mappings_and_install_shim(wan: cd.ModelPatcher, tmp_path) -> None:
    from dit_accel.comfy.install import write_shim
    from dit_accel.comfy.nodes_v1 import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    assert NODE_DISPLAY_NAME_MAPPINGS == {"DitAccelApply": "dit-accel Apply", "DitAccelSparseAttention": "dit-accel Sparse Attention",
                                          "DitAccelFeatureCache": "dit-accel Feature Cache"}
    cls = NODE_CLASS_MAPPINGS["DitAccelSparseAttention"]
    required = cls.INPUT_TYPES()["required"]
    assert list(required) == ["model", "method", "quality", "precision", "min_seq_len", "options"]
    assert "combo" in required["method"][0] and required["precision"][0] == ["bf16", "fp8"]
    (out,) = getattr(cls(), cls.FUNCTION)(model=wan, method="full", quality="max", precision="bf16", min_seq_len=0, options="")
    assert patching.installed_config(out).method.name == "full"
    (tmp_path / "custom_nodes").mkdir()
    shim = write_shim(tmp_path)
    spec = importlib.util.spec_from_file_location("dit_accel_nodes_shim", shim)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.NODE_CLASS_MAPPINGS is NODE_CLASS_MAPPINGS  # outside ComfyUI: the V1 mappings


def test_install_without_custom_nodes_is_one_error_line_and_exit_code_2(tmp_path, capsys) -> None:
    from dit_accel.comfy.install import main

    for folder in (tmp_path, tmp_path / "missing"):  # a folder without custom_nodes/, and no folder at all
        assert main(["--comfyui", str(folder)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert f"error: {folder / 'custom_nodes'} is not a directory; pass the ComfyUI folder" in err
    (tmp_path / "custom_nodes").mkdir()
    assert main(["--comfyui", str(tmp_path)]) == 0
    assert (tmp_path / "custom_nodes" / "dit_accel_nodes" / "__init__.py").is_file()


def _fake_comfy_api() -> types.ModuleType:
    """A double of ``comfy_api.latest`` recording what the V3 nodes declare."""
    io = types.SimpleNamespace()

    class _Socket:
        def __init__(self, kind):
            self.kind = kind

        def Input(self, id, **kw):  # noqa: N802 - ComfyUI's name
            return {"kind": self.kind, "id": id, **kw}

        def Output(self, **kw):  # noqa: N802
            return {"kind": self.kind, **kw}

    for kind in ("Model", "Combo", "String", "Float", "Int"):
        setattr(io, kind, _Socket(kind))
    io.Schema = lambda **kw: types.SimpleNamespace(**kw)
    io.NodeOutput = lambda *values: types.SimpleNamespace(result=values)
    io.ComfyNode = type("ComfyNode", (), {})
    latest = types.ModuleType("comfy_api.latest")
    latest.io = io
    latest.ComfyExtension = type("ComfyExtension", (), {})
    return latest


def test_v3_nodes_declare_the_same_inputs(wan: cd.ModelPatcher, monkeypatch) -> None:
    latest = _fake_comfy_api()
    monkeypatch.setitem(sys.modules, "comfy_api", types.ModuleType("comfy_api"))
    monkeypatch.setitem(sys.modules, "comfy_api.latest", latest)
    monkeypatch.delitem(sys.modules, "dit_accel.comfy.nodes_v3", raising=False)
    import asyncio

    v3 = importlib.import_module("dit_accel.comfy.nodes_v3")
    extension = asyncio.run(v3.comfy_entrypoint())
    classes = asyncio.run(extension.get_node_list())
    schemas = {c.define_schema().node_id: c.define_schema() for c in classes}
    assert list(schemas) == ["DitAccelApply", "DitAccelSparseAttention", "DitAccelFeatureCache"]
    cache = schemas["DitAccelFeatureCache"]
    assert [i["id"] for i in cache.inputs] == ["model", "scheduler", "budget", "schedule_file", "warmup_steps", "options"]
    assert cache.display_name == "dit-accel Feature Cache" and cache.outputs[0]["kind"] == "Model"
    apply = next(c for c in classes if c.define_schema().node_id == "DitAccelApply")
    out = apply.execute(model=wan, preset="dense", preset_file="", overrides="")
    assert patching.installed_config(out.result[0]).method.name == "dense"
    monkeypatch.delitem(sys.modules, "dit_accel.comfy.nodes_v3", raising=False)
