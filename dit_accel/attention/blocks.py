"""The geometry the sparse methods plan in: 128-token kernel blocks, token orders and guidance-branch rows.

An :class:`Order` is a token permutation together with what the planning and the kernel derive from it (the
kernel's int32 token index, the block-averaging matrix of the draft map's reference path, whether its aligned
runs are contiguous). A shared order (one permutation for every batch row and head, e.g. the 3D-tile order of
a grid) is built once per grid and device (:mod:`dit_accel.attention.tiling` caches it), so those derived
tensors are computed once and stay next to the permutation they come from.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from dit_accel.context import AttentionCall, TokenLayout

BLOCK = 128
"""Kernel block size (query and key) the sparse methods plan for."""


def permute_tokens(x: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """``x`` ``(B, H, S, D)`` in the order ``perm`` (``(S,)`` or ``(B, H, S)``; ``None``: unchanged)."""
    if perm is None:
        return x
    if perm.dim() == 1:
        return x.index_select(2, perm)
    return torch.gather(x, 2, perm[..., None].expand(-1, -1, -1, x.shape[-1]))


def pool_matrix(perm: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """``(NB, S)`` float32 matrix averaging the tokens of each block of the order ``perm`` ``(S,)``:
    row ``b`` holds ``1 / count_b`` at the original positions of block ``b``'s tokens."""
    S = perm.shape[0]
    nb = -(-S // block)
    blocks = torch.arange(S, device=perm.device) // block
    counts = torch.bincount(blocks, minlength=nb).float()
    pool = torch.zeros(nb, S, device=perm.device)
    pool[blocks, perm] = 1.0 / counts[blocks]
    return pool


def runs_contiguous(perm: torch.Tensor, group: int) -> bool:
    """Whether every aligned ``group`` of the order ``perm`` ``(S,)`` is an aligned run of the model's order
    (one host synchronisation)."""
    runs = perm.view(-1, group)
    return bool(((runs[:, 0] % group) == 0).all()
                and (runs - runs[:, :1] == torch.arange(group, device=perm.device)).all())


class Order:
    """A token permutation (``perm[i]`` = current position of the i-th token of the order) and what is derived
    from it, computed on first use and kept for a shared order.

    ``perm`` is ``(S,)`` (shared by every batch row and head) or ``(B, H, S)`` (per head, e.g. k-means; made per
    call, so nothing is kept).
    """

    def __init__(self, perm: torch.Tensor) -> None:
        self.perm = perm
        self._index: torch.Tensor | None = None
        self._pools: dict[torch.dtype, torch.Tensor] = {}
        self._runs: dict[int, bool] = {}

    @property
    def shared(self) -> bool:
        """True for one permutation ``(S,)`` shared by every batch row and head."""
        return self.perm.dim() == 1

    def kernel_index(self) -> torch.Tensor | None:
        """The kernel's int32 token index of a shared order, the same tensor at every call (the kernel then
        validates it once); ``None`` for a per-head order (the route converts it per call)."""
        if not self.shared:
            return None
        if self._index is None:
            self._index = self.perm.to(torch.int32)
        return self._index

    def pool(self, dtype: torch.dtype) -> torch.Tensor | None:
        """:func:`pool_matrix` of a shared order in ``dtype``; ``None`` for a per-head order."""
        if not self.shared:
            return None
        if dtype not in self._pools:
            self._pools[dtype] = pool_matrix(self.perm).to(dtype)
        return self._pools[dtype]

    def runs_contiguous(self, group: int) -> bool:
        """:func:`runs_contiguous` of a shared order (one host synchronisation per order and group); False for
        a per-head order."""
        if not self.shared:
            return False
        if group not in self._runs:
            self._runs[group] = runs_contiguous(self.perm, group)
        return self._runs[group]

    def __repr__(self) -> str:
        return f"Order(shape={tuple(self.perm.shape)})"


def text_token_mask(layout: "TokenLayout", seq_len: int, device: torch.device) -> torch.Tensor | None:
    """Bool ``(seq_len,)``: True for the text tokens of a joint-attention sequence; ``None`` without text."""
    if layout.text_tokens <= 0:
        return None
    mask = torch.ones(seq_len, dtype=torch.bool, device=device)
    mask[layout.visual_slice(seq_len)] = False
    return mask


def blocks_touching(token_mask: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Bool ``(num_blocks,)``: True for the blocks of ``block`` tokens that hold any True token."""
    n = token_mask.shape[-1]
    nb = -(-n // block)
    padded = torch.zeros(nb * block, dtype=torch.bool, device=token_mask.device)
    padded[:n] = token_mask
    return padded.view(nb, block).any(-1)


def text_blocks_of(layout: "TokenLayout", seq_len: int, device: torch.device) -> torch.Tensor | None:
    """Bool ``(num_blocks,)``: True for the kernel blocks holding text tokens (``blocks_touching`` of
    :func:`text_token_mask`); ``None`` without text. Cached per layout, length and device (treat it as
    read-only): the planning path asks for it at every call."""
    if layout.text_tokens <= 0:
        return None
    return _text_blocks(layout, seq_len, device)


@functools.lru_cache(maxsize=64)
def _text_blocks(layout: "TokenLayout", seq_len: int, device: torch.device) -> torch.Tensor:
    return blocks_touching(text_token_mask(layout, seq_len, device))


def branch_rows(ctx: "AttentionCall", batch: int, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Batch-row indices (int64) of each guidance branch of the call, in first-seen order, on ``device`` (CPU
    when ``None``). The tensors are cached per rows and device (treat them as read-only): indexing with them
    costs no host-to-device copy, which would synchronise with the GPU, at every call."""
    branches = ctx.branches if len(ctx.branches) == batch else ("cond",) * batch
    rows: dict[str, list[int]] = {}
    for i, b in enumerate(branches):
        rows.setdefault(b, []).append(i)
    return {b: _row_tensor(tuple(r), device) for b, r in rows.items()}


@functools.lru_cache(maxsize=256)
def _row_tensor(rows: tuple[int, ...], device: torch.device | None) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)
