"""ProCache's selective tokens: on a selective step, run the reused front span on the tokens whose span input
changed most since their cached residual was computed, and splice their fresh outputs into the reused ones.

Change is measured on a per-token random sketch of the span input (:data:`SKETCH_DIM` values per token, kept
per branch in :class:`~dit_accel.caching.procache.ProCacheState`), so ranking the tokens costs a small GEMM
and no stream-size copy.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from dit_accel.caching.blocks import BlockRef, Rows, output_streams, take_tokens, token_subset_call, with_hidden
from dit_accel.caching.procache import ProCacheState

SKETCH_DIM = 32
"""Width of the per-token random sketch that ranks tokens by change."""

RunBlock = Callable[[int, tuple, dict], Any]
"""Runs block ``j``'s own forward (no hook) on ``(args, kwargs)``."""


class SelectiveTokens:
    """The token selection and recomputation of one cache controller (ProCache with ``selective_tokens``)."""

    def __init__(self, blocks: list[BlockRef], share: float) -> None:
        self.blocks = blocks
        self.share = share
        """Share of the tokens recomputed on a selective step."""
        self._projections: dict[tuple[int, torch.device], torch.Tensor] = {}

    def sketch(self, hidden: torch.Tensor) -> torch.Tensor:
        """Per-token random projection ``(B, S, 32)`` (fixed seed: the same for every run), computed in
        fp32 and kept in the stream's dtype (1/12 of a bf16 stream at width 384)."""
        key = (hidden.shape[-1], hidden.device)
        proj = self._projections.get(key)
        if proj is None:
            g = torch.Generator().manual_seed(0)
            proj = (torch.randn(hidden.shape[-1], SKETCH_DIM, generator=g) / math.sqrt(SKETCH_DIM)).to(hidden.device)
            self._projections[key] = proj
        return (hidden.detach().float() @ proj).to(hidden.dtype)

    def remember(self, groups: list[tuple[str, Rows]], states: list[ProCacheState], hidden: torch.Tensor) -> None:
        """On a computed step: each branch's sketch of the span input its cached residual comes from."""
        sketch = self.sketch(hidden)
        for (_, rows), state in zip(groups, states):
            state.token_sketch = sketch if len(groups) == 1 else sketch[rows]

    def _pick(self, sketch: torch.Tensor, groups: list[tuple[str, Rows]], states: list[ProCacheState],
              k: int) -> torch.Tensor:
        """Indices ``(B, k)`` of the tokens whose sketch moved most, in model order."""
        batch, tokens = sketch.shape[0], sketch.shape[1]
        if k == tokens:
            return torch.arange(tokens, device=sketch.device).expand(batch, tokens)
        refs = [state.token_sketch for state in states]
        if any(r is None for r in refs):
            score = sketch.float().square().sum(-1)
        else:
            ref = refs[0] if len(refs) == 1 else torch.empty_like(sketch)
            if len(refs) > 1:
                for (_, rows), r in zip(groups, refs):
                    ref[rows] = r
            score = (sketch.float() - ref.float()).square().sum(-1)
        return score.topk(k, dim=1).indices.sort(dim=1).values  # model order: attention sums as in a full run

    def recompute(self, run_block: RunBlock, start: int, end: int, groups: list[tuple[str, Rows]],
                  states: list[ProCacheState], args: tuple, kwargs: dict, fresh: torch.Tensor, approx: torch.Tensor,
                  refresh: bool) -> tuple[torch.Tensor, float]:
        """Run blocks ``[start, end)`` on the selected tokens of the span input ``fresh``; return ``approx`` (the
        reused span output) with their rows replaced, and the block evaluations spent (a share of a block per
        block). ``refresh``: also write the recomputed rows into each branch's cached residual of slot ``end``
        and into its sketch (not for a forecast slot, which keeps its history)."""
        tokens = fresh.shape[1]
        k = min(tokens, max(1, math.ceil(self.share * tokens - 1e-9)))
        sketch = self.sketch(fresh)
        idx = self._pick(sketch, groups, states, k)
        sub = take_tokens(fresh, idx)
        call_args, call_kwargs = token_subset_call(self.blocks[start], args, kwargs, idx, tokens)
        h = sub
        for j in range(start, end):
            a, kw = with_hidden(self.blocks[j], call_args, call_kwargs, h)
            h = output_streams(self.blocks[j], run_block(j, a, kw))[0]
        index = idx.unsqueeze(-1).expand(-1, -1, approx.shape[-1])
        out = approx.scatter(1, index, h)
        if refresh:
            delta = (h - sub).detach()
            sketch_index = idx.unsqueeze(-1).expand(-1, -1, SKETCH_DIM)
            new_sketch = sketch.gather(1, sketch_index)
            for (_, rows), state in zip(groups, states):
                part = slice(None) if len(groups) == 1 else rows
                cached = state.slots.get(end)
                if cached is not None and cached[0].shape == approx[part].shape:
                    cached[0].scatter_(1, index[part], delta[part].to(cached[0].dtype))
                if state.token_sketch is not None and state.token_sketch.shape == sketch[part].shape:
                    state.token_sketch.scatter_(1, sketch_index[part], new_sketch[part])
        return out, (end - start) * k / tokens
