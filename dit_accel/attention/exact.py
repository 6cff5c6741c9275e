"""The exact methods: ``dense`` (the baseline) and ``full`` (every block through the block-sparse kernel)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dit_accel.attention.base import AttentionMethod

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

    from dit_accel.context import AttentionCall


class DenseMethod(AttentionMethod):
    """Exact dense attention for every call (the baseline; runs on the fastest dense backend)."""

    name = "dense"
    plans = False

    def plan(self, q: torch.Tensor, k: torch.Tensor, ctx: "AttentionCall") -> "BlockMask | None":
        """Always ``None``: run dense."""
        return None


class FullMethod(AttentionMethod):
    """Every query block attends to every key block through the block-sparse kernel.

    Numerically equal to dense attention; it exists to exercise the sparse execution path
    (planning, mask, kernel, statistics) end to end.
    """

    name = "full"

    def plan(self, q: torch.Tensor, k: torch.Tensor, ctx: "AttentionCall") -> "BlockMask":
        """A full-density block mask for ``q``'s and ``k``'s shapes."""
        from dit_accel.kernels import dense_block_mask

        # B = H = 1 broadcasts over the batch and the heads.
        return dense_block_mask(1, 1, q.shape[-2], k.shape[-2], device=q.device)
