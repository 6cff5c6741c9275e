"""Feature-caching schedulers on a tiny random Wan pipeline (CPU): exactness, state isolation,
skipped blocks, guardrails, memory, composition with attention methods, config errors."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dit_accel.api as api  # noqa: E402
from dit_accel.attention.base import AttentionMethod  # noqa: E402
from dit_accel.caching import (  # noqa: E402
    FixedCacheConfig,
    available_schedulers,
    install_cache,
    make_cache_config,
)
from dit_accel.caching.base import CacheState  # noqa: E402
from dit_accel.caching.taylor import TaylorScheduler  # noqa: E402
from dit_accel.context import State  # noqa: E402

NUM_LAYERS = 4
TEXT_DIM = 16
STEPS = 8


# --- tiny models (shared with test_caching_calibrate.py) --------------------------------------------
def tiny_wan_transformer(seed: int = 0, num_layers: int = NUM_LAYERS, head_dim: int = 8) -> torch.nn.Module:
    """A 4-block ``WanTransformer3DModel`` with 16 latent channels (matches the tiny VAE); head dim 64
    where the sparse attention path must be reachable."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    cfg = dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=head_dim, in_channels=16, out_channels=16,
        text_dim=TEXT_DIM, freq_dim=32, ffn_dim=32, num_layers=num_layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )
    return WanTransformer3DModel.from_config(cfg).eval()


def tiny_wan_pipeline(two_transformers: bool = False, head_dim: int = 8):
    """``WanPipeline`` without text encoder (``prompt_embeds`` are passed); Wan2.2-style with two experts."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
    extra = dict(transformer_2=tiny_wan_transformer(seed=1), boundary_ratio=0.5) if two_transformers else {}
    return WanPipeline(
        tokenizer=None, text_encoder=None, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=tiny_wan_transformer(head_dim=head_dim), **extra,
    )


def embeds(seed: int) -> torch.Tensor:
    """Deterministic stand-in text embeddings ``(1, 8, TEXT_DIM)``."""
    return torch.randn(1, 8, TEXT_DIM, generator=torch.Generator().manual_seed(seed))


def generate(pipe, steps: int = STEPS, prompt_seed: int = 1, negative_seed: int = 2) -> torch.Tensor:
    """Final latents of one CFG generation (cond and uncond calls per step; no decode)."""
    return pipe(
        prompt_embeds=embeds(prompt_seed), negative_prompt_embeds=embeds(negative_seed), height=16, width=16,
        num_frames=5, num_inference_steps=steps, guidance_scale=4.0, output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).frames


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    return tiny_wan_pipeline()


@pytest.fixture(scope="module")
def dense(pipe):
    return generate(pipe)


@pytest.fixture
def handle(pipe):
    h = api.apply(pipe)
    yield h
    api.remove(pipe)


def _decisions(attachment, branch="cond"):
    return "".join(r["decision"][0] for r in attachment.stats() if r["branch"] == branch)


# --- exactness ------------------------------------------------------------------------------------
def test_cache_off_and_removed_equal_dense_bitwise(pipe, dense, handle):
    assert torch.equal(generate(pipe), dense)  # context only, no cache
    att = install_cache(pipe.transformer, handle.contexts["transformer"], "fixed", interval=3)
    assert not torch.equal(generate(pipe), dense)
    att.remove()
    assert torch.equal(generate(pipe), dense)
    assert all(not hasattr(b, "_diffusers_hook") for b in pipe.transformer.blocks)


@pytest.mark.parametrize(
    "name, options",
    [
        ("fixed", dict(interval=1)),
        ("taylor", dict(interval=1, order=2)),
        ("procache", dict(schedule=[1] * STEPS, selective_blocks=1)),
        ("probe", dict(threshold=0.0)),
        ("fixed", dict(schedule=[1] * STEPS, head_blocks=1, tail_blocks=1)),
        ("taylor", dict(interval=1, target="output")),
    ],
)
def test_schedule_computing_every_step_equals_dense(pipe, dense, handle, name, options):
    att = install_cache(pipe.transformer, handle.contexts["transformer"], name, **options)
    out = generate(pipe)
    att.remove()
    assert torch.equal(out, dense)
    assert att.summary()["compute_fraction"] == 1.0


def test_repeated_generations_are_identical_and_state_resets(pipe, dense, handle):
    att = install_cache(pipe.transformer, handle.contexts["transformer"], "procache", budget=0.5, warmup_steps=1)
    first = generate(pipe)
    second = generate(pipe)
    assert torch.equal(first, second) and not torch.equal(first, dense)
    stats = att.stats()
    calls = sorted({r["call"] for r in stats})
    assert len(calls) == 2
    for call in calls:  # every generation starts from an empty cache
        first_step = [r for r in stats if r["call"] == call and r["step"] == 0]
        assert {r["reason"] for r in first_step} == {"no_cache"}
    att.remove()


# --- skipped blocks, guardrails, stats --------------------------------------------------------------
def _count_block_runs(transformer):
    counts = [0] * len(transformer.blocks)
    handles = []
    for i, block in enumerate(transformer.blocks):
        def hook(_module, _args, i=i):
            counts[i] += 1
        handles.append(block.ffn.register_forward_pre_hook(hook))  # inside the block's own forward
    return counts, handles


def test_skipped_blocks_are_not_entered(pipe, handle):
    counts, hooks = _count_block_runs(pipe.transformer)
    att = install_cache(pipe.transformer, handle.contexts["transformer"], "fixed", interval=2, warmup_steps=1,
                        head_blocks=1, tail_blocks=1, max_consecutive_reuse=5)
    generate(pipe)
    for h in hooks:
        h.remove()
    stats = att.stats()
    att.remove()
    computed = sum(1 for r in stats if r["decision"] == "compute")
    reused = sum(1 for r in stats if r["decision"] == "reuse")
    assert reused > 0
    # head and tail blocks run on every call, middle blocks only on computed calls
    assert counts == [computed + reused, computed, computed, computed + reused]
    assert sum(r["blocks_computed"] for r in stats) == sum(counts)
    assert {r["blocks_computed"] for r in stats if r["decision"] == "reuse"} == {2}


def test_guardrails_are_respected(pipe, handle):
    # a schedule that never computes: only the guardrails do
    att = install_cache(pipe.transformer, handle.contexts["transformer"], "fixed", schedule=[0] * 9,
                        warmup_steps=2, final_steps=2, max_consecutive_reuse=1)
    generate(pipe, steps=9)
    stats = [r for r in att.stats() if r["branch"] == "cond"]
    att.remove()
    assert "".join(r["decision"][0] for r in stats) == "ccrcrcrcc"
    assert [r["reason"] for r in stats] == ["no_cache", "warmup", None, "max_consecutive", None, "max_consecutive",
                                            None, "final", "final"]
    assert [r["step"] for r in stats] == list(range(9))


def test_probe_budget_and_stats(pipe, handle):
    att = install_cache(pipe.transformer, handle.contexts["transformer"], "probe", threshold=10.0,
                        warmup_steps=1, final_steps=1, max_consecutive_reuse=2)
    generate(pipe)
    stats = att.stats()
    att.remove()
    cond = [r for r in stats if r["branch"] == "cond"]
    assert "".join(r["decision"][0] for r in cond) == "crrcrrcc"  # huge budget: only the cap stops reuse
    assert all(r["probe_change"] is not None for r in cond[1:])
    assert {r["blocks_computed"] for r in cond if r["decision"] == "reuse"} == {1}  # the probe block
    # a zero budget never reuses
    att = install_cache(pipe.transformer, handle.contexts["transformer"], "probe", threshold=0.0)
    generate(pipe)
    assert {r["decision"] for r in att.stats()} == {"compute"}
    att.remove()


def test_memory_at_most_two_stream_tensors_per_branch(pipe, handle):
    for name, options, limit in [
        ("fixed", dict(interval=2), 1),
        ("probe", dict(threshold=1.0), 2),
        ("taylor", dict(interval=2, order=1), 2),
        ("procache", dict(budget=0.5, selective_blocks=1), 2),
        ("taylor", dict(interval=2, order=2), 3),  # documented exception: a second difference
    ]:
        att = install_cache(pipe.transformer, handle.contexts["transformer"], name, warmup_steps=1, **options)
        generate(pipe)
        summary = att.summary()
        att.remove()
        for branch in ("cond", "uncond"):
            assert 0 < summary["peak_branch_bytes"][branch] <= limit * summary["stream_bytes"][branch], (name, summary)
        assert summary["peak_cached_bytes"] <= sum(summary["peak_branch_bytes"].values())


def test_output_target_reuses_the_projection_and_skips_every_block(bare_transformer):
    """target="output": reused calls enter no block and return the last computed call's output (order 0)."""
    transformer, handle = bare_transformer
    counts, hooks = _count_block_runs(transformer)
    outs, stats = _cached_cond_outputs(transformer, handle, make_cache_config(
        "fixed", schedule=[1, 0, 0, 1, 0, 1], warmup_steps=1, final_steps=0, target="output"), embeds(2), "sequential")
    for h in hooks:
        h.remove()
    cond = [r for r in stats if r["branch"] == "cond"]
    assert [r["decision"] for r in cond] == ["compute", "reuse", "reuse", "compute", "reuse", "compute"]
    assert counts == [2 * 3] * NUM_LAYERS  # 3 computed steps x 2 branches, nothing on reused steps
    assert torch.equal(outs[1], outs[0]) and torch.equal(outs[2], outs[0]) and torch.equal(outs[4], outs[3])
    assert not torch.equal(outs[3], outs[0])
    # the cache holds the projection output (16 channels x 2x2 patch = 64 per token), not the stream
    state = next(iter(stats))  # any record
    assert state["cached_bytes"] <= 20 * 64 * 4


# --- branches and transformers never mix ------------------------------------------------------------
TIMESTEPS = [900.0, 800.0, 700.0, 600.0, 500.0, 400.0]


def _cached_cond_outputs(transformer, handle, config, uncond_text, mode: str) -> tuple[list[torch.Tensor], list[dict]]:
    """Cond outputs of a cached run over TIMESTEPS with fixed latents (so cond inputs never depend on
    the other branch). ``mode``: "sequential" (cond call then uncond call per step, labelled with
    ``cache_context``), "batched" (one call with rows [uncond, cond]) or "alone" (cond calls only)."""
    context = handle.contexts["transformer"]
    context.cfg_style = "batched" if mode == "batched" else "sequential"
    handle.clock.cfg = mode == "batched"
    handle.begin_call()
    x = torch.randn(1, 16, 5, 4, 4, generator=torch.Generator().manual_seed(5))
    text_c = embeds(1)
    att = install_cache(transformer, context, config)
    outs = []
    with torch.no_grad():
        for t in TIMESTEPS:
            if mode == "batched":
                out = transformer(hidden_states=torch.cat([x, x]), timestep=torch.tensor([t, t]),
                                  encoder_hidden_states=torch.cat([uncond_text, text_c]), return_dict=False)[0]
                outs.append(out[1:])
                continue
            with transformer.cache_context("cond"):
                outs.append(transformer(hidden_states=x, timestep=torch.tensor([t]), encoder_hidden_states=text_c,
                                        return_dict=False)[0])
            if mode == "sequential":
                with transformer.cache_context("uncond"):
                    transformer(hidden_states=x, timestep=torch.tensor([t]), encoder_hidden_states=uncond_text,
                                return_dict=False)
    stats = att.stats()
    att.remove()
    return outs, stats


@pytest.fixture
def bare_transformer():
    transformer = tiny_wan_transformer()
    handle = api.apply(transformer)
    yield transformer, handle
    api.remove(transformer)


@pytest.mark.parametrize("name", ["fixed", "taylor", "procache", "probe", "procache_tokens"])
def test_separate_call_cfg_branches_do_not_mix(bare_transformer, name):
    """Cond outputs of a cached run with separate cond/uncond calls do not depend on the uncond
    prompt and equal a cached run with no uncond calls at all (bit for bit)."""
    transformer, handle = bare_transformer
    options = {"fixed": dict(interval=2), "taylor": dict(interval=2, order=2), "probe": dict(threshold=0.5),
               "procache": dict(schedule=[1, 1, 2, 0, 1, 1], selective_blocks=1),
               "procache_tokens": dict(schedule=[1, 1, 2, 2, 1, 2], selective_blocks=0, selective_tokens=0.3)}[name]
    config = make_cache_config(name.split("_")[0], warmup_steps=1, **options)
    a, stats = _cached_cond_outputs(transformer, handle, config, embeds(2), "sequential")
    b, _ = _cached_cond_outputs(transformer, handle, config, embeds(3), "sequential")
    alone, _ = _cached_cond_outputs(transformer, handle, config, None, "alone")
    assert {r["branch"] for r in stats} == {"cond", "uncond"}
    assert any(r["decision"] != "compute" for r in stats if r["branch"] == "cond")
    for x_a, x_b, x_alone in zip(a, b, alone):
        assert torch.equal(x_a, x_b) and torch.equal(x_a, x_alone)


@pytest.mark.parametrize("name, options", [
    ("taylor", dict(interval=2, order=1)),
    ("procache", dict(schedule=[1, 1, 2, 2, 1, 2], selective_blocks=0, selective_tokens=0.3)),  # per-row token picks
])
def test_batched_cfg_rows_keep_their_own_residuals(bare_transformer, name, options):
    """Batched guidance ([uncond row, cond row] in one call): the cond row's cached outputs do not
    depend on the uncond row and match the cond row cached alone."""
    transformer, handle = bare_transformer
    config = make_cache_config(name, warmup_steps=1, **options)
    a, stats = _cached_cond_outputs(transformer, handle, config, embeds(2), "batched")
    b, _ = _cached_cond_outputs(transformer, handle, config, embeds(3), "batched")
    alone, _ = _cached_cond_outputs(transformer, handle, config, None, "alone")
    assert {r["branch"] for r in stats} == {"cond", "uncond"}
    assert any(r["decision"] in ("reuse", "selective") for r in stats)
    for x_a, x_b, x_alone in zip(a, b, alone):
        torch.testing.assert_close(x_a, x_b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x_a, x_alone, rtol=1e-5, atol=1e-6)


def test_two_transformers_keep_separate_states():
    pipe = tiny_wan_pipeline(two_transformers=True)
    dense = generate(pipe)
    handle = api.apply(pipe)
    atts = {
        name: install_cache(getattr(pipe, name), ctx, "fixed", interval=1)
        for name, ctx in handle.contexts.items()
    }
    assert torch.equal(generate(pipe), dense)  # computing every step stays exact with two experts
    for a in atts.values():
        a.remove()
    atts = {
        name: install_cache(getattr(pipe, name), ctx, "fixed", interval=2, warmup_steps=0, final_steps=0)
        for name, ctx in handle.contexts.items()
    }
    first = generate(pipe)
    assert torch.equal(first, generate(pipe))
    steps = {name: sorted({r["step"] for r in a.stats()}) for name, a in atts.items()}
    assert steps["transformer"] and steps["transformer_2"]
    assert set(steps["transformer"]).isdisjoint(steps["transformer_2"])
    assert set(steps["transformer"]) | set(steps["transformer_2"]) == set(range(STEPS))
    # the low-noise expert starts from an empty cache even though the first expert had one
    boundary = steps["transformer_2"][0]
    first_call = min(r["call"] for r in atts["transformer_2"].stats())
    first_calls = [r for r in atts["transformer_2"].stats() if r["step"] == boundary and r["call"] == first_call]
    assert {r["reason"] for r in first_calls} == {"no_cache"}
    for a in atts.values():
        a.remove()
    handle.remove()


# --- ProCache selective tokens ---------------------------------------------------------------------------
def _latents_32px(pipe, steps: int = STEPS) -> torch.Tensor:
    """Like :func:`generate` at 32x32 px (8 tokens per call), so a token share selects a strict subset."""
    return pipe(
        prompt_embeds=embeds(1), negative_prompt_embeds=embeds(2), height=32, width=32, num_frames=5,
        num_inference_steps=steps, guidance_scale=4.0, output_type="latent", generator=torch.Generator().manual_seed(0),
    ).frames


def test_selective_tokens_share_one_computes_and_share_zero_reuses(pipe, handle):
    """Selective (value 2) steps with ``selective_tokens``: share 1.0 recomputes every token (bit for bit
    the dense output), share 0 is plain reuse (bit for bit the schedule with 0 instead of 2), a share
    in between recomputes that share of the tokens and counts it as that share of a block evaluation."""
    dense = _latents_32px(pipe)
    context = handle.contexts["transformer"]
    schedule = [1, 1, 2, 2, 1, 2, 2, 1]

    def run(sched, **options):
        att = install_cache(pipe.transformer, context, "procache", schedule=sched, warmup_steps=1, final_steps=1, **options)
        out = _latents_32px(pipe)
        att.remove()
        return out, att

    full, att = run(schedule, selective_blocks=0, selective_tokens=1.0)
    assert torch.equal(full, dense)
    assert _decisions(att) == "ccsscssc" and att.summary()["compute_fraction"] == 1.0
    off, att = run(schedule, selective_blocks=0, selective_tokens=0.0)
    reuse, _ = run([0 if v == 2 else v for v in schedule], selective_blocks=0)
    assert torch.equal(off, reuse) and _decisions(att) == "ccrrcrrc"
    seen = []  # (decision, token_share, tokens) at a span block's self-attention, cond branch

    def look(module, args):
        status = context.cache_status["cond"]
        if context.branches[0] == "cond":
            seen.append((status.decision, status.token_share, args[0].shape[1]))

    hook = pipe.transformer.blocks[1].attn1.register_forward_pre_hook(look)
    half, att = run(schedule, selective_blocks=0, selective_tokens=0.5)
    hook.remove()
    assert not torch.equal(half, dense) and not torch.equal(half, reuse)
    # attention methods see the subset and are told so (cache status "token_share")
    assert seen == [("compute", 0.0, 8) if v == 1 else ("selective", 0.5, 4) for v in schedule]
    selective = [r for r in att.stats() if r["decision"] == "selective"]
    assert len(selective) == 2 * 4 and {r["blocks_computed"] for r in selective} == {0.5 * NUM_LAYERS}
    assert att.summary()["compute_fraction"] == pytest.approx((4 * NUM_LAYERS + 4 * 0.5 * NUM_LAYERS) / (8 * NUM_LAYERS))
    # with a deep block: the front span on half of the tokens, the deep block on all of them
    _, att = run(schedule, selective_blocks=1, selective_tokens=0.5)
    assert {r["blocks_computed"] for r in att.stats() if r["decision"] == "selective"} == {1 + 0.5 * (NUM_LAYERS - 1)}


def test_selective_tokens_pick_the_tokens_that_changed_most(bare_transformer):
    """The recomputed rows are those whose span input moved most since the cached residual: with the
    input changed on known tokens only, exactly those rows differ from plain reuse."""
    transformer, handle = bare_transformer
    context = handle.contexts["transformer"]
    context.cfg_style = "sequential"
    handle.clock.cfg = False
    text = embeds(1)
    x = torch.randn(1, 16, 5, 4, 4, generator=torch.Generator().manual_seed(5))
    y = x.clone()
    y[:, :, 2, :2, :2] += 3.0  # latent frame 2, first 2x2 patch: token 2 * 2 * 2 + 0 = 8 (20 tokens in all)

    def outputs(**options):
        handle.begin_call()
        att = install_cache(transformer, context, "procache", schedule=[1, 1, 2], warmup_steps=1, final_steps=0, **options)
        with torch.no_grad():
            outs = [transformer(hidden_states=inp, timestep=torch.tensor([t]), encoder_hidden_states=text, return_dict=False)[0]
                    for inp, t in ((x, 900.0), (x, 800.0), (y, 700.0))]
        att.remove()
        return outs[-1]

    token_rows = lambda out: out[0].reshape(16, 5, 2, 2, 2, 2).permute(1, 2, 4, 0, 3, 5).reshape(20, -1)  # noqa: E731
    picked = token_rows(outputs(selective_blocks=0, selective_tokens=0.05))  # 1 token of 20
    reused = token_rows(outputs(selective_blocks=0, selective_tokens=0.0))
    changed = [i for i in range(20) if not torch.equal(picked[i], reused[i])]
    assert changed == [8]


def test_selective_tokens_need_a_separate_text_stream():
    from conftest import TINY_CASES

    model = TINY_CASES["flux"].build()
    handle = api.apply(model)
    with pytest.raises(ValueError, match="selective_tokens needs blocks with a separate text stream"):
        install_cache(model, handle.contexts["transformer"], "procache", schedule=[1, 2], selective_tokens=0.5)
    api.remove(model)
    with pytest.raises(ValueError, match=r"selective_tokens must be in \[0.0, 1.0\], got 1.5"):
        make_cache_config("procache", selective_tokens=1.5)
    with pytest.raises(ValueError, match="a forecast of order 1 would add a third stream-size tensor"):
        install_cache(model, api.apply(model).contexts["transformer"], "procache", schedule=[1, 2], order=1)
    api.remove(model)


def test_two_transformers_keep_separate_selective_token_states():
    pipe = tiny_wan_pipeline(two_transformers=True)
    handle = api.apply(pipe)
    atts = {name: install_cache(getattr(pipe, name), ctx, "procache", schedule=[1, 2] * (STEPS // 2), warmup_steps=0,
                                final_steps=0, selective_blocks=0, selective_tokens=0.5)
            for name, ctx in handle.contexts.items()}
    first = generate(pipe)
    assert torch.equal(first, generate(pipe))
    for name, att in atts.items():
        assert {r["branch"] for r in att.stats()} == {"cond", "uncond"}
        assert any(r["decision"] == "selective" for r in att.stats())
        first_call = min(r["call"] for r in att.stats())
        first_step = min(r["step"] for r in att.stats() if r["call"] == first_call)
        assert {r["reason"] for r in att.stats() if r["call"] == first_call and r["step"] == first_step} == {"no_cache"}
    steps = {name: {r["step"] for r in a.stats()} for name, a in atts.items()}
    assert steps["transformer"].isdisjoint(steps["transformer_2"])
    for a in atts.values():
        a.remove()
    handle.remove()


# --- composition with attention methods ------------------------------------------------------------
@dataclass
class _LastStep(State):
    """The step of a layer's last attention call."""

    step: int | None = None


class _CountingMethod(AttentionMethod):
    """Stand-in for the temporal-skip method: records every plan call and the cache status it sees."""

    name = "test_caching_counting"

    def __init__(self) -> None:
        super().__init__(min_seq_len=0)
        self.calls: list[tuple] = []

    def plan(self, q, k, ctx):
        branch = ctx.branches[0]
        status = ctx.context.cache_status[branch]
        layer_state = ctx.state(branch, _LastStep)
        gap = ctx.step - (ctx.step - 1 if layer_state.step is None else layer_state.step)
        layer_state.step = ctx.step
        self.calls.append((ctx.layer, ctx.step, branch, status.decision, tuple(status.cached_steps), gap))
        return None  # dense


def test_cached_steps_skip_attention_and_publish_status():
    pipe = tiny_wan_pipeline(head_dim=64)  # a head dim the sparse path takes, so plan() is called
    method = _CountingMethod()
    handle = api.apply(pipe, attention=method)
    att = install_cache(pipe.transformer, handle.contexts["transformer"], "fixed", schedule=[1, 1, 0, 0, 1, 0, 1, 1],
                        warmup_steps=1, final_steps=1, head_blocks=1)
    generate(pipe)
    att.remove()
    api.remove(pipe)
    reused_steps = [2, 3, 5]
    layer0 = [c for c in method.calls if c[0] == 0 and c[2] == "cond"]
    deep = [c for c in method.calls if c[0] == 2 and c[2] == "cond"]
    assert [c[1] for c in layer0] == list(range(STEPS))  # head block: every step
    assert [c[1] for c in deep] == [0, 1, 4, 6, 7]  # span blocks: computed steps only
    assert all(c[3] == "compute" for c in deep)
    assert {c[3] for c in layer0 if c[1] in reused_steps} == {"reuse"}
    # the cached steps a method missed are listed, and its own step gaps match them
    assert [c[4] for c in deep] == [(), (), (2, 3), (2, 3, 5), (2, 3, 5)]
    assert [c[5] for c in deep] == [1, 1, 3, 2, 1]
    # both branches: 4 self-attention layers x computed steps + head layer on reused steps
    assert len(method.calls) == 2 * (4 * 5 + 3)


def test_attention_records_carry_the_cache_decision():
    """The cache's decision reaches each attention call's statistics record (and only while a cache is on)."""
    pipe = tiny_wan_pipeline()
    handle = api.apply(pipe, attention="dense")
    generate(pipe)
    assert handle.stats() and all("cache_decision" not in r for r in handle.stats())
    handle.reset_stats()
    att = install_cache(pipe.transformer, handle.contexts["transformer"], "fixed", schedule=[1, 1, 0, 0, 1, 0, 1, 1],
                        warmup_steps=1, final_steps=1, head_blocks=1)
    generate(pipe)
    rows = [r for r in handle.stats() if r["branch"] == "cond"]
    assert {r["step"]: r["cache_decision"] for r in rows} == {s: "reuse" if s in (2, 3, 5) else "compute" for s in range(STEPS)}
    assert [r["layer"] for r in rows if r["cache_decision"] == "reuse"] == [0, 0, 0]  # the head block only
    att.remove()
    handle.reset_stats()
    generate(pipe)
    assert all("cache_decision" not in r for r in handle.stats())
    api.remove(pipe)


# --- forecasting ---------------------------------------------------------------------------------------
def test_taylor_forecast_is_exact_on_polynomial_residuals():
    for order in (1, 2):
        sched = TaylorScheduler(make_cache_config("taylor", order=order), num_blocks=4)
        state = CacheState()
        base = torch.randn(1, 3, 5)

        def residual(t):
            return (base * (1 + 0.5 * t + (0.1 * t * t if order == 2 else 0.0)), None)

        for step in (0, 2, 4):
            sched.store(state, 4, residual(step), step)
        for t in (5, 6, 7):
            torch.testing.assert_close(sched.forecast(state, 4, t)[0], residual(t)[0], rtol=1e-5, atol=1e-5)


# --- configuration errors ----------------------------------------------------------------------------
def test_bad_configs_raise_clear_errors(pipe):
    assert available_schedulers() == ["fixed", "probe", "procache", "taylor"]
    with pytest.raises(ValueError, match=r"unknown cache scheduler 'teacache'; available schedulers: \['fixed', 'probe'"):
        make_cache_config("teacache")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['treshold'\] for cache scheduler 'probe'; allowed options: \["):
        make_cache_config("probe", treshold=0.1)
    with pytest.raises(TypeError, match="cache must be a scheduler name or a CacheConfig, got int"):
        make_cache_config(3)
    for kwargs, message in [
        (dict(warmup_steps=-1), "warmup_steps must be an int >= 0, got -1"),
        (dict(interval=0), "interval must be an int >= 1, got 0"),
        (dict(schedule=[1, 3]), r"schedule values must be in \[0, 1\]"),
        (dict(max_consecutive_reuse=1.5), "max_consecutive_reuse must be an int >= 0, got 1.5"),
    ]:
        with pytest.raises(ValueError, match=message):
            FixedCacheConfig(**kwargs)
    with pytest.raises(ValueError, match="order must be 1 or 2, got 3"):
        make_cache_config("taylor", order=3)
    with pytest.raises(ValueError, match=r"budget must be in \(0.0, 1.0\], got 0"):
        make_cache_config("procache", budget=0)
    with pytest.raises(ValueError, match=r"threshold must be >= 0.0, got -1"):
        make_cache_config("probe", threshold=-1)
    with pytest.raises(ValueError, match="target must be 'span' or 'output', got 'blocks'"):
        make_cache_config("fixed", target="blocks")
    with pytest.raises(ValueError, match="target='output' skips every block after the head; tail_blocks must be 0, got 1"):
        make_cache_config("fixed", target="output", tail_blocks=1)
    with pytest.raises(ValueError, match="head_blocks must be an int >= 1, got 0"):
        make_cache_config("probe", head_blocks=0)
    with pytest.raises(FileNotFoundError, match="schedule file not found"):
        install_cache(pipe.transformer, _context_for(pipe), "fixed", schedule_file="/nonexistent/schedule.json")
    with pytest.raises(ValueError, match=r"head_blocks=2 \+ tail_blocks=1 \+ selective_blocks=1 leave no block to cache in a transformer of 4 blocks"):
        install_cache(pipe.transformer, _context_for(pipe), "procache", head_blocks=2, tail_blocks=1, selective_blocks=1)
    with pytest.raises(TypeError, match="context must be a TransformerContext"):
        install_cache(pipe.transformer, None, "fixed")
    handle = api.apply(pipe)
    att = install_cache(pipe.transformer, handle.contexts["transformer"], "fixed")
    with pytest.raises(ValueError, match="a dit-accel cache is already installed on blocks.0; remove it first"):
        install_cache(pipe.transformer, handle.contexts["transformer"], "probe")
    att.remove()
    api.remove(pipe)
    assert all(not hasattr(b, "_diffusers_hook") for b in pipe.transformer.blocks)


def _context_for(pipe):
    handle = api.get_handle(pipe) or api.apply(pipe)
    return handle.contexts["transformer"]


# --- other families ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["wan", "flux", "hunyuan_video", "cogvideox", "ltx_video", "pixart", "sd3"])
def test_every_family_caches_exactly_on_computed_steps(family):
    """Block metadata from diffusers drives the hooks: joint-stream blocks (FLUX, HunyuanVideo, SD3,
    CogVideoX) cache both streams; computed steps equal dense, reused ones differ but stay finite."""
    from conftest import TINY_CASES

    case = TINY_CASES[family]
    model, inputs = case.build(), case.inputs()
    t0 = inputs["timestep"].float()

    def run(k):
        kwargs = dict(inputs, timestep=(t0 * (1.0 - 0.15 * k)).to(inputs["timestep"].dtype))
        with torch.no_grad():
            return model(**kwargs, return_dict=False)[0]

    dense = [run(k) for k in range(4)]
    handle = api.apply(model)
    att = install_cache(model, handle.contexts["transformer"], "fixed", schedule=[1, 1, 0, 1], warmup_steps=1, final_steps=0)
    cached = [run(k) for k in range(4)]
    att.remove()
    api.remove(model)
    assert [r["decision"] for r in att.stats()] == ["compute", "compute", "reuse", "compute"]
    for k in (0, 1, 3):
        assert torch.equal(cached[k], dense[k])
    assert torch.isfinite(cached[2]).all() and not torch.equal(cached[2], dense[2])


def test_cache_composes_with_the_block_sparse_path():
    """Cache hooks on the blocks and dit-accel processors inside them: with every step computed the
    output equals the sparse-path output without cache, bit for bit; reused steps skip the kernel."""
    from dit_accel.attention.registry import get_method

    pipe = tiny_wan_pipeline(head_dim=64)
    handle = api.apply(pipe, attention=get_method("full", min_seq_len=0))
    sparse = generate(pipe, steps=4)
    att = install_cache(pipe.transformer, handle.contexts["transformer"], "fixed", interval=1)
    assert torch.equal(generate(pipe, steps=4), sparse)
    att.remove()
    handle.reset_stats()
    att = install_cache(pipe.transformer, handle.contexts["transformer"], "fixed", interval=2, warmup_steps=1, final_steps=0)
    generate(pipe, steps=4)
    sparse_calls = [r for r in handle.stats() if r["backend"] == "block_sparse"]
    computed_steps = {r["step"] for r in att.stats() if r["decision"] == "compute"}
    att.remove()
    api.remove(pipe)
    assert sparse_calls and {r["step"] for r in sparse_calls} == computed_steps
