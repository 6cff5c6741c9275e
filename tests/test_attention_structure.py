"""Tests of benchmarks/testbed_attention_structure.py on CPU with a tiny random-weight Wan transformer."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "testbed_attention_structure.py"
_spec = importlib.util.spec_from_file_location("testbed_attention_structure", _PATH)
tas = importlib.util.module_from_spec(_spec)
sys.modules["testbed_attention_structure"] = tas
_spec.loader.exec_module(tas)


def tiny_transformer() -> WanTransformer3DModel:
    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        rope_max_seq_len=32,
    ).eval()


class TinyPipeline:
    """Minimal stand-in for a Wan pipeline: Euler steps with classifier-free guidance as two calls per step."""

    def __init__(self, transformer: WanTransformer3DModel):
        self.transformer = transformer

    @torch.no_grad()
    def __call__(self, prompt, *, num_frames, height, width, num_inference_steps, generator, output_type,
                 guidance_scale=3.0):
        batch = 1 if isinstance(prompt, str) else len(prompt)
        latents = torch.randn(batch, 4, num_frames, height // 4, width // 4, generator=generator)
        cond = torch.randn(batch, 5, 16, generator=generator)
        uncond = torch.zeros_like(cond)
        timesteps = torch.linspace(1000, 50, num_inference_steps)
        for i, t in enumerate(timesteps):
            ts = t.expand(batch)
            v_c = self.transformer(latents, ts, cond, return_dict=False)[0]
            v_u = self.transformer(latents, ts, uncond, return_dict=False)[0]
            latents = latents - 0.05 * (v_u + guidance_scale * (v_c - v_u))
        return latents


def test_block_mass_coverage_known_answers():
    uniform = torch.full((3, 10), 0.1)
    assert tas.block_mass_coverage(uniform).tolist() == [[9, 10, 10]] * 3
    one_hot = torch.zeros(2, 8)
    one_hot[0, 3] = 1.0
    one_hot[1, 0] = 5.0  # unnormalised rows are normalised
    assert tas.block_mass_coverage(one_hot, (0.5, 0.99, 1.0)).tolist() == [[1, 1, 1]] * 2
    skewed = torch.tensor([0.05, 0.6, 0.3, 0.05])
    assert tas.block_mass_coverage(skewed, (0.6, 0.9, 0.95, 0.99)).tolist() == [1, 2, 3, 4]
    kept = tas.kept_blocks(skewed, 0.9)
    assert kept.tolist() == [False, True, True, False]
    assert tas.jaccard(kept, torch.tensor([False, True, False, True])).item() == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="masses"):
        tas.block_mass_coverage(uniform, (1.5,))


def test_tiles_and_block_ids():
    assert tas.default_tile((16, 32, 32), 128) == (2, 8, 8)
    ids = tas.tile_block_ids((2, 4, 4), (1, 2, 2))
    assert ids.shape == (32,) and ids.max() == 7
    # Every tile holds 4 tokens forming a 2x2 square of one frame.
    grid = ids.view(2, 4, 4)
    assert (grid[0, :2, :2] == 0).all() and (grid[0, :2, 2:] == 1).all() and (grid[1, 2:, 2:] == 7).all()
    assert torch.bincount(ids).tolist() == [4] * 8
    assert tas.raster_block_ids((2, 4, 4), 8).tolist() == [i // 8 for i in range(32)]
    with pytest.raises(ValueError, match="no tile"):
        tas.default_tile((3, 5, 7), 128)


def test_query_block_masses_one_hot_attention_needs_one_block():
    s, d = 32, 32
    key = (50.0 * torch.eye(s)).view(1, s, 1, d)
    target = torch.randperm(s, generator=torch.Generator().manual_seed(0))
    query = torch.eye(s)[target].view(1, s, 1, d) * 4.0  # row i looks only at key target[i]
    ids = tas.raster_block_ids((2, 4, 4), 8)
    masses = tas.query_block_masses(query, key, torch.arange(s), ids, 4)
    assert masses.shape == (1, 1, s, 4)
    torch.testing.assert_close(masses.sum(-1), torch.ones(1, 1, s))
    assert (tas.block_mass_coverage(masses) == 1).all()
    assert (masses.argmax(-1)[0, 0] == target // 8).all()


def test_capturing_processor_recomputes_q_k_and_keeps_output():
    transformer = tiny_transformer()
    x = torch.randn(1, 4, 2, 16, 16)
    t = torch.tensor([500.0])
    text = torch.randn(1, 5, 16)
    with torch.no_grad():
        reference = transformer(x, t, text, return_dict=False)[0]
        recorder = tas.AttentionStructureRecorder(block_size=16, query_blocks_per_layer=2)
        state = tas.install_recorder(transformer, recorder)
        captured = transformer(x, t, text, return_dict=False)[0]
        tas.remove_recorder(transformer, state)
        restored = transformer(x, t, text, return_dict=False)[0]
    assert torch.equal(captured, reference) and torch.equal(restored, reference)
    assert all(type(p).__name__ == "WanAttnProcessor" for p in transformer.attn_processors.values())
    assert recorder.grid == (2, 8, 8)
    assert {k[0] for k in recorder.records} == {0, 1} and {k[3] for k in recorder.records} == {"raster", "tile"}

    # q/k are those of the stock processor: attention on them reproduces attn1's output.
    attn = transformer.blocks[0].attn1
    hidden = torch.randn(1, 128, attn.inner_dim)
    rotary = transformer.rope(x)
    with torch.no_grad():
        q, k = tas.wan_query_key(attn, hidden, rotary)
        v = attn.to_v(hidden).unflatten(2, (attn.heads, -1))
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = attn.to_out[0](out.transpose(1, 2).flatten(2))
        torch.testing.assert_close(out, attn(hidden, None, None, rotary), rtol=1e-5, atol=1e-5)


def test_measure_on_random_weights_is_near_uniform():
    pipe = TinyPipeline(tiny_transformer())
    summary = tas.measure_attention_structure(
        pipe, ["a", "b"], num_frames=2, height=64, width=64, num_inference_steps=3, guidance_scale=2.0, seed=0,
        query_blocks_per_layer=2, device="cpu", block_size=16, tile=(1, 4, 4),
    )
    assert summary["layers"] == [0, 1] and summary["steps"] == [0, 1, 2] and summary["calls_per_step"] == 2
    assert summary["settings"]["tokens"] == 128 and summary["settings"]["latent_grid"] == [2, 8, 8]
    for order in ("raster", "tile"):
        shares = summary[order]["row_share_per_layer"]["0.95"]
        assert all(share > 0.8 for share in shares), (order, shares)
        per_step = torch.tensor(summary[order]["row_share_per_layer_step"])
        assert per_step.shape == (2, 3, 3) and (per_step[..., 0] <= per_step[..., 2]).all()
        overlap = summary[order]["overlap_per_layer"]
        assert all(0.0 <= o <= 1.0 for o in overlap)
    assert all(type(p).__name__ == "WanAttnProcessor" for p in pipe.transformer.attn_processors.values())
    table = tas.markdown_table(summary)
    assert table.count("\n| ") == 3 and "tile 95%" in table
