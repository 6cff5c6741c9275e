"""Per-call context: grid, steps, branches and resets, through tiny offline pipelines."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import dit_accel
from dit_accel.attention.base import AttentionMethod
from dit_accel.context import State, StepClock, TokenLayout


@dataclass
class _Calls(State):
    """Calls a method saw in one (layer, branch) this generation."""

    calls: int = 0


class RecordingMethod(AttentionMethod):
    """Test method: records what each call's context says and counts calls in the state store."""

    name = "recording"

    def __init__(self) -> None:
        super().__init__(min_seq_len=0)
        self.seen: list[tuple] = []

    def plan(self, q, k, ctx):
        for row, branch in enumerate(ctx.branches):
            state = ctx.state(branch, _Calls)
            state.calls += 1
            self.seen.append(
                (ctx.context.name, ctx.step, ctx.num_steps, ctx.layer, row, branch, state.calls, ctx.layout.grid)
            )
        return None


def _wan_transformer():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel.from_config(
        dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=16, out_channels=16,
             text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
             qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    )


@pytest.fixture(scope="module")
def wan22_pipe():
    """Tiny Wan2.2-style pipeline: two transformers split at boundary_ratio=0.5, no text encoder."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    return WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
                       transformer=_wan_transformer(), transformer_2=_wan_transformer(), boundary_ratio=0.5)


def _run_wan(pipe, steps=4):
    g = torch.Generator().manual_seed(0)
    return pipe(prompt_embeds=torch.randn(1, 16, 32, generator=g), negative_prompt_embeds=torch.randn(1, 16, 32, generator=g),
                height=64, width=64, num_frames=9, num_inference_steps=steps, guidance_scale=5.0,
                output_type="np", generator=g).frames


def test_wan22_pipeline_records_grid_steps_branches_per_transformer(wan22_pipe):
    pipe = wan22_pipe
    reference = _run_wan(pipe)
    method = RecordingMethod()
    handle = dit_accel.apply(pipe, attention=method)
    assert set(handle.contexts) == {"transformer", "transformer_2"}
    out = _run_wan(pipe)
    assert out.shape == (1, 9, 64, 64, 3)
    assert abs(out - reference).max() <= 1e-5

    # latent (3, 8, 8) with patch (1, 2, 2) -> token grid (3, 4, 4)
    assert {rec[7] for rec in method.seen} == {(3, 4, 4)}
    assert {rec[2] for rec in method.seen} == {4}
    # Wan calls cond then uncond per step; transformer takes t >= 500, transformer_2 the rest
    per_transformer = {}
    for name, step, _, layer, _, branch, _, _ in method.seen:
        per_transformer.setdefault(name, set()).add((step, branch))
    assert per_transformer["transformer"] | per_transformer["transformer_2"] == {
        (s, b) for s in range(4) for b in ("cond", "uncond")
    }
    assert per_transformer["transformer"] and per_transformer["transformer_2"]
    assert not ({s for s, _ in per_transformer["transformer"]} & {s for s, _ in per_transformer["transformer_2"]})
    # per-(layer, branch) state lives across the steps of one call: one increment per step
    calls = [rec[6] for rec in method.seen if rec[0] == "transformer" and rec[3] == 0 and rec[5] == "cond"]
    assert calls == list(range(1, len(calls) + 1))

    stats = handle.stats()
    assert {(s["transformer"], s["call"]) for s in stats} == {("transformer", 0), ("transformer_2", 0)}
    assert {s["branch"] for s in stats} == {"cond", "uncond"}

    # a new pipeline call starts again at step 0 with fresh state
    method.seen.clear()
    handle.reset_stats()
    _run_wan(pipe, steps=2)
    assert {rec[1] for rec in method.seen} == {0, 1}
    assert {rec[2] for rec in method.seen} == {2}
    assert {s["call"] for s in handle.stats()} == {1}
    first = [rec for rec in method.seen if rec[0] == "transformer" and rec[3] == 0 and rec[5] == "cond"]
    assert first[0][6] == 1

    dit_accel.remove(pipe)
    assert type(pipe).__call__ is type(pipe).__mro__[0].__call__ and not hasattr(type(pipe), "_dit_accel_wrapped")
    assert abs(_run_wan(pipe) - reference).max() == 0


def test_host_timestep_replaces_the_sync_and_gives_the_same_steps(wan22_pipe, monkeypatch):
    """Steps and branches read from the scheduler's host state equal those read from the device values."""
    pipe = wan22_pipe
    method = RecordingMethod()
    handle = dit_accel.apply(pipe, attention=method)
    _run_wan(pipe)
    host_records = list(method.seen)
    assert handle.clock.host_timestep_ok is True

    # The same run with the host path disabled (every forward reads its device timestep).
    method.seen.clear()
    monkeypatch.setattr(handle.clock, "host_timestep_fn", None)
    _run_wan(pipe)
    assert method.seen == host_records
    dit_accel.remove(pipe)


def test_host_timestep_mismatch_falls_back_to_device_values(wan22_pipe, monkeypatch):
    """A scheduler whose host state names other timesteps than the pipeline passes is not trusted."""
    pipe = wan22_pipe
    method = RecordingMethod()
    handle = dit_accel.apply(pipe, attention=method)
    _run_wan(pipe)
    reference = list(method.seen)
    method.seen.clear()
    monkeypatch.setattr(handle.clock, "host_timestep_fn", lambda: 12345.0)
    _run_wan(pipe)
    assert handle.clock.host_timestep_ok is False
    assert [rec[1:] for rec in method.seen] == [rec[1:] for rec in reference]
    dit_accel.remove(pipe)


@pytest.fixture(scope="module")
def pixart_pipe():
    """Tiny PixArt-Σ pipeline (batched CFG), no text encoder."""
    from conftest import TINY_CASES
    from diffusers import AutoencoderKL, DDIMScheduler, PixArtSigmaPipeline

    torch.manual_seed(0)
    return PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=AutoencoderKL(),
                               transformer=TINY_CASES["pixart"].build(), scheduler=DDIMScheduler())


def _run_pixart(pipe, guidance_scale, batch=1):
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(batch, 8, 16, generator=g)
    neg = torch.randn(batch, 8, 16, generator=g)
    mask = torch.ones(batch, 8)
    return pipe(prompt_embeds=emb, prompt_attention_mask=mask, negative_prompt=None, negative_prompt_embeds=neg,
                negative_prompt_attention_mask=mask, height=32, width=24, num_inference_steps=3,
                guidance_scale=guidance_scale, use_resolution_binning=False, output_type="np", generator=g).images


def test_pixart_pipeline_batched_cfg_rows_and_grid(pixart_pipe):
    pipe = pixart_pipe
    reference = _run_pixart(pipe, 4.5)
    original_class = type(pipe)
    dit_accel.apply(pipe, attention="dense")
    method = RecordingMethod()
    handle = dit_accel.apply(pipe, attention=method)  # applying again replaces, never nests the wrapper
    assert type(pipe).__mro__[1] is original_class
    out = _run_pixart(pipe, 4.5)
    assert abs(out - reference).max() <= 1e-5
    # PixArt batches [uncond, cond]; 32x24 pixels, VAE factor 1, patch 2 -> (1, 16, 12)
    assert {rec[7] for rec in method.seen} == {(1, 16, 12)}
    assert {(rec[4], rec[5]) for rec in method.seen} == {(0, "uncond"), (1, "cond")}
    assert {rec[1] for rec in method.seen} == {0, 1, 2} and {rec[2] for rec in method.seen} == {3}
    assert {s["branch"] for s in handle.stats()} == {"uncond,cond"}

    method.seen.clear()
    _run_pixart(pipe, 1.0)  # no guidance: one branch only
    assert {rec[5] for rec in method.seen} == {"cond"}
    dit_accel.remove(pipe)
    assert type(pipe) is original_class


def test_pixart_pipeline_runs_block_sparse_end_to_end(pixart_pipe):
    pipe = pixart_pipe
    reference = _run_pixart(pipe, 4.5)
    handle = dit_accel.apply(pipe, attention=dit_accel.get_method("full", min_seq_len=0))
    out = _run_pixart(pipe, 4.5)
    assert abs(out - reference).max() <= 1e-4
    assert {s["backend"] for s in handle.stats()} == {"block_sparse"}
    dit_accel.remove(pipe)


def test_step_clock_without_pipeline_counts_distinct_timesteps_and_restarts():
    clock = StepClock()
    seen = []
    for t in (900.0, 900.0, 600.0, 600.0, 300.0, 900.0, 900.0):
        clock.observe(t)
        seen.append((clock.call_index, clock.step, clock.call_in_step))
    assert seen == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (0, 2, 0), (1, 0, 0), (1, 0, 1)]
    assert clock.num_steps is None


def test_bare_transformer_branches_follow_call_order_for_sequential_families():
    from conftest import TINY_CASES, run_model

    case = TINY_CASES["flux"]
    model, inputs = case.build(), case.inputs()
    method = RecordingMethod()
    dit_accel.apply(model, attention=method)
    run_model(model, inputs)
    run_model(model, inputs)  # same timestep: second call of the step
    assert [rec[5] for rec in method.seen if rec[3] == 0] == ["cond", "uncond"]
    ctx = dit_accel.get_handle(model).contexts["transformer"]
    assert ctx.text_tokens == 8 and ctx.patch_size == (1, 2, 2) and ctx.grid == (1, 12, 10)
    dit_accel.remove(model)


def test_token_layout_visual_slice():
    first = TokenLayout(grid=(1, 2, 3), patch_size=(1, 2, 2), text_tokens=4, text_position="first")
    last = TokenLayout(grid=(1, 2, 3), patch_size=(1, 2, 2), text_tokens=4, text_position="last")
    assert first.visual_slice(10) == slice(4, 10) and last.visual_slice(10) == slice(0, 6)
    assert first.visual_tokens == 6
