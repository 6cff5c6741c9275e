"""Attention structure of a Wan-architecture video DiT during generation.

For every self-attention layer (``attn1``) and denoising step, measures on sampled query rows the share of
key blocks (``block_size`` tokens, default 128) needed to keep 90/95/99 % of each row's softmax mass, in raster
token order and in 3D-tile order (tiles of frames x rows x cols latent tokens holding ``block_size`` tokens, e.g.
2x8x8), and how much the per-query-block kept block sets (top blocks reaching ``overlap_mass`` of the query
block's mean mass) overlap (Jaccard) between consecutive steps.

How: a capturing processor replaces the stock ``WanAttnProcessor`` on the ``attn1`` modules. It recomputes q and
k exactly as the stock processor does (diffusers' own projection helper, RMS norms, Wan's RoPE), computes exact
softmax probabilities for all rows of a fixed random subset of query blocks per layer (one query block at a
time, to bound memory), sums them per key block and counts blocks; then it runs the stock processor, so the
generated video is unchanged. The original processors are restored afterwards.

Run on the GPU with the trained testbed (``python benchmarks/testbed_attention_structure.py``): writes
``benchmarks/results/testbed_attention_structure.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, _get_qkv_projections

MASSES: tuple[float, ...] = (0.9, 0.95, 0.99)
"""Attention-mass levels reported by default."""

ORDERS: tuple[str, ...] = ("raster", "tile")
"""Token orders in which key (and query) blocks are formed."""


# ------------------------------------------------------------------------------------------ block mass


def block_mass_coverage(probs_blocks: torch.Tensor, masses: Sequence[float] = MASSES) -> torch.Tensor:
    """Fewest key blocks whose summed attention mass reaches each level of ``masses``.

    ``probs_blocks``: (..., KB) non-negative attention mass per key block (rows need not sum to 1; each row is
    normalised by its total). Returns a LongTensor (..., len(masses)) of block counts in [1, KB]: the blocks are
    taken in decreasing order of mass until the running sum reaches ``mass x total``.
    """
    if probs_blocks.ndim < 1 or probs_blocks.shape[-1] < 1:
        raise ValueError(f"probs_blocks must have a last (key block) dimension >= 1, got shape {tuple(probs_blocks.shape)}")
    levels = torch.as_tensor(list(masses), dtype=torch.float64, device=probs_blocks.device)
    if levels.numel() == 0 or (levels <= 0).any() or (levels > 1).any():
        raise ValueError(f"masses must be in (0, 1], got {list(masses)}")
    p = probs_blocks.detach().to(torch.float64)
    cum = p.sort(dim=-1, descending=True).values.cumsum(dim=-1)
    total = cum[..., -1:].clamp_min(torch.finfo(torch.float64).tiny)
    cum = cum / total
    # Blocks strictly below the level, plus the one that reaches it; 1e-9 absorbs rounding at exact levels.
    below = (cum[..., None, :] < levels[:, None] - 1e-9).sum(dim=-1)
    return (below + 1).clamp_max(p.shape[-1])


def kept_blocks(probs_blocks: torch.Tensor, mass: float) -> torch.Tensor:
    """BoolTensor (..., KB): the key blocks kept by top-``mass`` selection (as counted by :func:`block_mass_coverage`)."""
    count = block_mass_coverage(probs_blocks, (mass,))[..., 0]
    order = probs_blocks.detach().argsort(dim=-1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return rank < count[..., None]


def jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Jaccard index |a & b| / |a | b| over the last dimension of two BoolTensors (1 where both are empty)."""
    inter = (a & b).sum(dim=-1).float()
    union = (a | b).sum(dim=-1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


# ------------------------------------------------------------------------------------------ token blocks


def raster_block_ids(grid: tuple[int, int, int], block_size: int) -> torch.Tensor:
    """Key-block id of every token (raster order f, h, w as Wan flattens patches): ``index // block_size``."""
    n = grid[0] * grid[1] * grid[2]
    return torch.arange(n) // block_size


def default_tile(grid: tuple[int, int, int], block_size: int) -> tuple[int, int, int]:
    """A (frames, rows, cols) tile of ``block_size`` tokens dividing ``grid``, as cubic as possible
    (2x8x8 for 128 tokens on a 16x32x32 grid). Raises ValueError when none divides the grid."""
    best: tuple[float, tuple[int, int, int]] | None = None
    for tf in range(1, block_size + 1):
        if block_size % tf:
            continue
        for th in range(1, block_size // tf + 1):
            if (block_size // tf) % th:
                continue
            tw = block_size // (tf * th)
            if grid[0] % tf or grid[1] % th or grid[2] % tw:
                continue
            # Prefer square spatial tiles, then about 2 frames deep (video DiT tiling practice).
            score = abs(math.log(th / tw)) * 2 + abs(math.log(tf / 2))
            if best is None or score < best[0]:
                best = (score, (tf, th, tw))
    if best is None:
        raise ValueError(f"no tile of {block_size} tokens divides the latent grid {grid}; pass tile= explicitly")
    return best[1]


def tile_block_ids(grid: tuple[int, int, int], tile: tuple[int, int, int]) -> torch.Tensor:
    """Key-block id of every token (raster index) when blocks are 3D tiles ``tile`` of the latent grid, tiles
    numbered in raster order of the tile grid (edge tiles may be partial)."""
    f, h, w = grid
    tf, th, tw = tile
    nh, nw = -(-h // th), -(-w // tw)
    fi = torch.arange(f).view(f, 1, 1) // tf
    hi = torch.arange(h).view(1, h, 1) // th
    wi = torch.arange(w).view(1, 1, w) // tw
    return ((fi * nh + hi) * nw + wi).flatten()


# ------------------------------------------------------------------------------------------ q/k of Wan


def _apply_wan_rotary(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    # Same arithmetic as the stock WanAttnProcessor (diffusers 0.42), so q/k are bit-identical.
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def wan_query_key(attn: Any, hidden_states: torch.Tensor, rotary_emb: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and key (B, S, heads, head_dim) of a Wan self-attention module, computed as ``WanAttnProcessor``
    does (projections, RMS norms, rotary embedding)."""
    query, key, _ = _get_qkv_projections(attn, hidden_states, None)
    query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
    key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
    if rotary_emb is not None:
        query = _apply_wan_rotary(query, *rotary_emb)
        key = _apply_wan_rotary(key, *rotary_emb)
    return query, key


def query_block_masses(
    query: torch.Tensor, key: torch.Tensor, rows: torch.Tensor, block_ids: torch.Tensor, num_blocks: int
) -> torch.Tensor:
    """Exact softmax attention mass per key block for the query rows ``rows``.

    ``query``, ``key``: (B, S, H, D); ``rows``: LongTensor (R,) of query token indices; ``block_ids``: LongTensor
    (S,) key-block id of each key token. Returns float32 (B, H, R, num_blocks) (each row sums to 1). Scale
    1/sqrt(D) as in SDPA.
    """
    q = query[:, rows].float().transpose(1, 2)  # (B, H, R, D)
    k = key.float().transpose(1, 2)  # (B, H, S, D)
    probs = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1]), dim=-1)
    out = probs.new_zeros(*probs.shape[:-1], num_blocks)
    return out.index_add_(-1, block_ids.to(probs.device), probs)


# ------------------------------------------------------------------------------------------ recording


@dataclass
class _Record:
    """Statistics of one (layer, step, call, order)."""

    row_share_sum: torch.Tensor  # (M,) float64, summed over rows
    rows: int
    block_share: torch.Tensor  # (M,) mean over (B, H, query blocks) of the query-block-level share
    kept: torch.Tensor  # (B, H, QB, KB) bool, query-block-level kept set at overlap_mass (CPU)


@dataclass
class AttentionStructureRecorder:
    """Collects block-mass statistics from the capturing processors; one per measurement."""

    block_size: int = 128
    """Tokens per block (key blocks and query blocks)."""
    tile: tuple[int, int, int] | None = None
    """3D tile (frames, rows, cols) in latent tokens; None picks :func:`default_tile`."""
    masses: tuple[float, ...] = MASSES
    """Attention-mass levels."""
    overlap_mass: float = 0.95
    """Mass level of the kept block sets compared between consecutive steps."""
    query_blocks_per_layer: int = 4
    """Query blocks sampled per layer and order (the same ones at every step)."""
    seed: int = 0
    """Seed of the query-block sampling."""
    active: bool = True
    """Whether processors record."""
    grid: tuple[int, int, int] | None = None
    step: int = -1
    call: int = 0
    records: dict[tuple[int, int, int, str], _Record] = field(default_factory=dict)
    _last_timestep: float | None = None
    _layout: dict[str, tuple[torch.Tensor, int]] = field(default_factory=dict)
    _queries: dict[tuple[int, str], list[torch.Tensor]] = field(default_factory=dict)

    def on_transformer_call(self, hidden_states: torch.Tensor, timestep: torch.Tensor | float, patch_size: Sequence[int]) -> None:
        """Note a transformer forward: latent grid, and the denoising step (a new timestep value starts a new
        step; repeated calls at the same timestep, e.g. the unconditional branch, count as calls of that step)."""
        _, _, f, h, w = hidden_states.shape
        grid = (f // patch_size[0], h // patch_size[1], w // patch_size[2])
        if grid != self.grid:
            self.grid = grid
            self._layout.clear()
            self._queries.clear()
        t = float(torch.as_tensor(timestep).flatten()[0])
        if self._last_timestep is None or t != self._last_timestep:
            self.step += 1
            self.call = 0
        else:
            self.call += 1
        self._last_timestep = t

    def layout(self, order: str) -> tuple[torch.Tensor, int]:
        """(block id per token, number of blocks) for ``order`` on the current grid."""
        if self.grid is None:
            raise RuntimeError("the recorder has not seen a transformer call (no latent grid yet)")
        if order not in self._layout:
            if order == "raster":
                ids = raster_block_ids(self.grid, self.block_size)
            elif order == "tile":
                ids = tile_block_ids(self.grid, self.tile or default_tile(self.grid, self.block_size))
            else:
                raise ValueError(f"unknown order {order!r}; allowed: {ORDERS}")
            self._layout[order] = (ids, int(ids.max()) + 1)
        return self._layout[order]

    def query_rows(self, layer: int, order: str) -> list[torch.Tensor]:
        """Token indices of the sampled query blocks of ``layer`` in ``order`` (fixed for the whole run)."""
        key = (layer, order)
        if key not in self._queries:
            ids, num_blocks = self.layout(order)
            g = torch.Generator().manual_seed(self.seed * 1000003 + layer * 2 + ORDERS.index(order))
            chosen = torch.randperm(num_blocks, generator=g)[: self.query_blocks_per_layer].sort().values
            self._queries[key] = [(ids == b).nonzero().flatten() for b in chosen.tolist()]
        return self._queries[key]

    @torch.no_grad()
    def observe(self, layer: int, query: torch.Tensor, key: torch.Tensor) -> None:
        """Record the statistics of one self-attention call (q, k: (B, S, H, D))."""
        if self.grid is None or query.shape[1] != self.grid[0] * self.grid[1] * self.grid[2]:
            raise RuntimeError(
                f"sequence length {query.shape[1]} does not match the latent grid {self.grid}; "
                "the recorder expects video tokens only in attn1"
            )
        for order in ORDERS:
            ids, num_blocks = self.layout(order)
            ids = ids.to(query.device)
            row_sum = torch.zeros(len(self.masses), dtype=torch.float64, device=query.device)
            rows = 0
            block_counts, kept = [], []
            for token_rows in self.query_rows(layer, order):
                masses = query_block_masses(query, key, token_rows.to(query.device), ids, num_blocks)  # (B,H,R,KB)
                row_sum += block_mass_coverage(masses, self.masses).double().sum(dim=(0, 1, 2))
                rows += masses.shape[0] * masses.shape[1] * masses.shape[2]
                mean_mass = masses.mean(dim=2)  # (B, H, KB): what a block-sparse kernel's query block needs
                block_counts.append(block_mass_coverage(mean_mass, self.masses))
                kept.append(kept_blocks(mean_mass, self.overlap_mass).cpu())
            counts = torch.stack(block_counts, dim=2).double()  # (B, H, QB, M)
            self.records[(layer, self.step, self.call, order)] = _Record(
                row_share_sum=(row_sum / num_blocks).cpu(),
                rows=rows,
                block_share=(counts.mean(dim=(0, 1, 2)) / num_blocks).cpu(),
                kept=torch.stack(kept, dim=2),
            )


class AttentionStructureProcessor(WanAttnProcessor):
    """Stock ``WanAttnProcessor`` that first reports exact block masses of sampled query rows to a recorder."""

    def __init__(self, recorder: AttentionStructureRecorder, layer: int):
        super().__init__()
        self.recorder = recorder
        self.layer = layer

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is None and self.recorder.active:
            with torch.no_grad():
                query, key = wan_query_key(attn, hidden_states, rotary_emb)
                self.recorder.observe(self.layer, query, key)
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)


def install_recorder(transformer: torch.nn.Module, recorder: AttentionStructureRecorder) -> tuple[dict[str, Any], Any]:
    """Put capturing processors on every ``attn1`` of a ``WanTransformer3DModel`` and a forward pre-hook that
    tracks steps. Returns what :func:`remove_recorder` needs to restore the model exactly."""
    original = dict(transformer.attn_processors)
    layers = sorted({int(name.split(".")[1]) for name in original if ".attn1." in name})
    if not layers:
        raise ValueError("the transformer has no blocks.<i>.attn1 attention modules (expected a WanTransformer3DModel)")
    new: dict[str, Any] = {}
    for name, proc in original.items():
        if ".attn1." in name:
            capture = AttentionStructureProcessor(recorder, int(name.split(".")[1]))
            # Keep the attention backend the user chose for the stock path.
            capture._attention_backend = getattr(proc, "_attention_backend", None)
            capture._parallel_config = getattr(proc, "_parallel_config", None)
            new[name] = capture
        else:
            new[name] = proc
    transformer.set_attn_processor(new)
    patch_size = transformer.config.patch_size

    def pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        recorder.on_transformer_call(hidden, timestep, patch_size)

    handle = transformer.register_forward_pre_hook(pre_hook, with_kwargs=True)
    return original, handle


def remove_recorder(transformer: torch.nn.Module, state: tuple[dict[str, Any], Any]) -> None:
    """Undo :func:`install_recorder`."""
    original, handle = state
    handle.remove()
    transformer.set_attn_processor(original)


# ------------------------------------------------------------------------------------------ summary


def summarize(recorder: AttentionStructureRecorder) -> dict[str, Any]:
    """Per-layer/per-step shares and step-to-step overlaps from a filled recorder (JSON-ready)."""
    if not recorder.records:
        raise RuntimeError("nothing was recorded: did the pipeline call the transformer?")
    layers = sorted({k[0] for k in recorder.records})
    steps = sorted({k[1] for k in recorder.records})
    calls = sorted({k[2] for k in recorder.records})
    masses = [str(m) for m in recorder.masses]
    out: dict[str, Any] = {"layers": layers, "steps": steps, "calls_per_step": len(calls), "masses": list(recorder.masses)}
    for order in ORDERS:
        row = torch.full((len(layers), len(steps), len(masses)), float("nan"), dtype=torch.float64)
        blk = torch.full_like(row, float("nan"))
        overlap = torch.full((len(layers), max(len(steps) - 1, 0)), float("nan"), dtype=torch.float64)
        for li, layer in enumerate(layers):
            for si, step in enumerate(steps):
                recs = [recorder.records[(layer, step, c, order)] for c in calls if (layer, step, c, order) in recorder.records]
                if recs:
                    row[li, si] = sum(r.row_share_sum for r in recs) / sum(r.rows for r in recs)
                    blk[li, si] = torch.stack([r.block_share for r in recs]).mean(dim=0)
                if si == 0:
                    continue
                values = [
                    jaccard(recorder.records[(layer, steps[si - 1], c, order)].kept, recorder.records[(layer, step, c, order)].kept).mean()
                    for c in calls
                    if (layer, steps[si - 1], c, order) in recorder.records and (layer, step, c, order) in recorder.records
                ]
                if values:
                    overlap[li, si - 1] = torch.stack(values).mean().double()
        out[order] = {
            "row_share_per_layer_step": row.tolist(),  # [layer][step][mass]
            "block_share_per_layer_step": blk.tolist(),
            "overlap_per_layer_step": overlap.tolist(),  # [layer][step-1]: Jaccard(step-1, step)
            "row_share_per_layer": {m: row[:, :, i].nanmean(dim=1).tolist() for i, m in enumerate(masses)},
            "block_share_per_layer": {m: blk[:, :, i].nanmean(dim=1).tolist() for i, m in enumerate(masses)},
            "overlap_per_layer": overlap.nanmean(dim=1).tolist() if overlap.shape[1] else [float("nan")] * len(layers),
        }
        middle = slice(len(layers) // 3, max(len(layers) // 3 + 1, (2 * len(layers) + 2) // 3))
        out[order]["middle_layers"] = {
            "layers": layers[middle],
            "row_share": {m: row[middle, :, i].nanmean().item() for i, m in enumerate(masses)},
            "overlap": overlap[middle].nanmean().item() if overlap.shape[1] else float("nan"),
        }
    return out


def measure_attention_structure(
    pipe: Any,
    prompts: str | list[str],
    *,
    num_frames: int,
    height: int,
    width: int,
    num_inference_steps: int,
    guidance_scale: float | None,
    seed: int,
    query_blocks_per_layer: int = 4,
    device: str | torch.device = "cuda",
    block_size: int = 128,
    tile: tuple[int, int, int] | None = None,
    masses: Sequence[float] = MASSES,
    overlap_mass: float = 0.95,
) -> dict[str, Any]:
    """Generate with ``pipe`` (a pipeline whose ``.transformer`` is a ``WanTransformer3DModel``) while measuring
    its self-attention structure; returns the :func:`summarize` dict plus the run's settings.

    ``guidance_scale=None`` keeps the pipeline's default. The pipeline's processors are restored afterwards.
    """
    recorder = AttentionStructureRecorder(
        block_size=block_size,
        tile=tile,
        masses=tuple(masses),
        overlap_mass=overlap_mass,
        query_blocks_per_layer=query_blocks_per_layer,
        seed=seed,
    )
    transformer = pipe.transformer
    state = install_recorder(transformer, recorder)
    kwargs: dict[str, Any] = {}
    if guidance_scale is not None:
        kwargs["guidance_scale"] = guidance_scale
    try:
        pipe(
            prompts,
            num_frames=num_frames,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            generator=torch.Generator(device=device).manual_seed(seed),
            output_type="latent",
            **kwargs,
        )
    finally:
        remove_recorder(transformer, state)
    summary = summarize(recorder)
    grid = recorder.grid
    assert grid is not None
    summary["settings"] = {
        "prompts": [prompts] if isinstance(prompts, str) else list(prompts),
        "num_frames": num_frames,
        "height": height,
        "width": width,
        "latent_grid": list(grid),
        "tokens": grid[0] * grid[1] * grid[2],
        "block_size": block_size,
        "tile": list(tile or default_tile(grid, block_size)),
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "seed": seed,
        "query_blocks_per_layer": query_blocks_per_layer,
        "overlap_mass": overlap_mass,
    }
    return summary


def markdown_table(summary: dict[str, Any]) -> str:
    """Per-layer table: mean row-level share of key blocks for each mass, raster and tile order, and the
    step-to-step Jaccard overlap of the kept sets."""
    masses = [str(m) for m in summary["masses"]]
    pct = [f"{float(m) * 100:g}%" for m in masses]
    s = summary["settings"]
    lines = [
        f"Share of {s['block_size']}-token key blocks needed to keep each query row's attention mass "
        f"(mean over sampled rows, heads and {len(summary['steps'])} steps; {s['tokens']} tokens, grid "
        f"{'x'.join(map(str, s['latent_grid']))}, tile {'x'.join(map(str, s['tile']))}); overlap = Jaccard of the "
        f"per-query-block kept sets ({s['overlap_mass'] * 100:g}% of the block's mass) between consecutive steps.",
        "",
        "| layer | " + " | ".join(f"raster {p}" for p in pct) + " | " + " | ".join(f"tile {p}" for p in pct)
        + " | overlap raster | overlap tile |",
        "|---" * (1 + 2 * len(masses) + 2) + "|",
    ]
    for li, layer in enumerate(summary["layers"]):
        cells = [f"{summary['raster']['row_share_per_layer'][m][li]:.3f}" for m in masses]
        cells += [f"{summary['tile']['row_share_per_layer'][m][li]:.3f}" for m in masses]
        cells += [f"{summary[o]['overlap_per_layer'][li]:.3f}" for o in ORDERS]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    for order in ORDERS:
        mid = summary[order]["middle_layers"]
        shares = ", ".join(f"{float(m) * 100:g}%: {mid['row_share'][m]:.3f}" for m in masses)
        lines.append(
            f"\nMiddle layers {mid['layers'][0]}-{mid['layers'][-1]}, {order} order: share of blocks {shares}; "
            f"step-to-step overlap {mid['overlap']:.3f}."
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Measure the shipped testbed at its evaluation size and write JSON + markdown."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-frames", type=int, default=16)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance-scale", type=float, default=None, help="default: the pipeline's own")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-prompts", type=int, default=2, help="held-out captions used as prompts")
    parser.add_argument("--query-blocks", type=int, default=4, help="query blocks sampled per layer and order")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--out", default="benchmarks/results/testbed_attention_structure.json")
    args = parser.parse_args(argv)

    from dit_accel.testbed import load_testbed_pipeline
    from dit_accel.testbed.data import make_batch

    dtype_name = args.dtype or ("bfloat16" if str(args.device).startswith("cuda") else "float32")
    pipe = load_testbed_pipeline(device=args.device, dtype=getattr(torch, dtype_name))
    prompts = make_batch(args.num_prompts, 1, 8, 8, seed=args.seed, split="heldout").captions
    summary = measure_attention_structure(
        pipe,
        prompts,
        num_frames=args.num_frames,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
        query_blocks_per_layer=args.query_blocks,
        device=args.device,
        block_size=args.block_size,
    )
    import diffusers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # recorded only
        triton_version = None
    summary["environment"] = {
        "device": torch.cuda.get_device_name() if str(args.device).startswith("cuda") else platform.processor() or "cpu",
        "dtype": dtype_name,
        "torch": torch.__version__,
        "triton": triton_version,
        "diffusers": diffusers.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1) + "\n")
    table = markdown_table(summary)
    out.with_suffix(".md").write_text("# Testbed attention structure\n\n" + table)
    print(table)


if __name__ == "__main__":
    main()
