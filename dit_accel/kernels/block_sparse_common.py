"""What the block-sparse attention implementations share: the result type and input validation.

Layout contract (same as ``torch.nn.functional.scaled_dot_product_attention`` and FlexAttention):

- ``q``: ``(B, H, S_q, D)``, ``k`` and ``v``: ``(B, H, S_kv, D)``; any strides with the last one 1
  (a ``(B, S, H, D)`` tensor ``.transpose(1, 2)`` is fine, no copy is made);
- dtype float16 or bfloat16 (float32 is accepted for tests; on the GPU it runs as tf32);
- head dim ``D`` in ``SUPPORTED_HEAD_DIMS`` (64, 72, 128; 72 is zero-padded to 128 inside the kernel);
- output ``(B, H, S_q, D)`` contiguous, dtype of ``q``;
- LSE ``(B, H, S_q)`` float32, natural log of the softmax denominator of each row, with the scale
  applied: ``lse[r] = log(sum_c exp(scale * q_r . k_c))`` over the attended keys;
- tile statistics ``(B, H, Q_BLOCKS, KV_BLOCKS)`` float32, indexed by key-block index (not by position in
  ``kv_indices``): for every computed tile, ``max_{r in qb, c in kb}(scale * q_r . k_c) - min_{r in qb} lse[r]``,
  i.e. the log of an upper bound on the largest attention probability of any entry of the tile (so
  the tile's share of any row's attention mass is at most ``KV_BLOCK_SIZE * exp(stat)``). Always
  ``<= 0`` up to rounding. Tiles not computed hold ``-inf``.
- An empty query block (no key block) gives output zeros and LSE ``-inf``, never NaN.

Head subset (``head_index``, optional): int32 ``(N,)``, strictly ascending flat head numbers ``b * H + h`` in
``[0, B * H)``. Only those heads are computed (the launch grid covers N heads, not B x H); the output, LSE
and tile statistics keep their full ``(B, H, ...)`` shapes, and the rows of the heads not listed are left
unspecified (tile statistics: ``-inf``). A caller fills them itself, e.g. with dense attention.

Token permutation folded into the loads (``q_index`` / ``kv_index``, both optional and independent):

- ``q_index``: int32 ``(S_q,)`` or ``(B, H, S_q)`` (B, H may be 1: broadcast), a permutation of
  ``0..S_q-1`` along its last dim: row ``i`` of the *permuted* query sequence is row ``q_index[i]`` of
  ``q``. ``kv_index`` the same for k and v over ``S_kv``.
- The mask is in the permuted order (query block ``qb`` = permuted rows ``qb*Q_BLOCK ...``), and so are
  the tile statistics. The output and the LSE are in the *original* order of q: the result equals
  ``scatter(attention(gather(q), gather(k), gather(v)))``, with no permuted copy materialised.
"""

from __future__ import annotations

import math
import weakref
from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, noop_mask

__all__ = [
    "BlockSparseOutput",
    "SUPPORTED_DTYPES",
    "SUPPORTED_HEAD_DIMS",
    "MaskView",
    "check_head_index",
    "check_index",
    "check_inputs",
]

SUPPORTED_HEAD_DIMS = (64, 72, 128)
"""Head dims the kernel runs: 64 (SD3, CogVideoX, LTX), 72 (PixArt, padded to 128), 128 (Wan, HunyuanVideo, Flux)."""

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
"""Accepted dtypes of q, k, v (float32 is meant for tests)."""


class BlockSparseOutput(NamedTuple):
    """What ``block_sparse_attention`` returns when ``return_lse`` or ``tile_stats`` is set.

    Fields not asked for are None.
    """

    out: Tensor
    """Attention output ``(B, H, S_q, D)``, dtype of q."""
    lse: Tensor | None
    """Log-sum-exp per row ``(B, H, S_q)`` float32 (natural log; ``-inf`` for empty query blocks)."""
    tile_stats: Tensor | None
    """``(B, H, Q_BLOCKS, KV_BLOCKS)`` float32: log upper bound of the largest probability in each computed
    tile (see the module docstring); ``-inf`` where the tile was not computed."""


class MaskView(NamedTuple):
    """The parts of a BlockMask the implementations read, checked against q, k, v."""

    kv_num_blocks: Tensor
    kv_indices: Tensor
    full_kv_num_blocks: Tensor | None
    full_kv_indices: Tensor | None
    q_block: int
    kv_block: int
    num_q_blocks: int
    num_kv_blocks: int
    scale: float


def _shape(t: object) -> str:
    return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__


def check_inputs(q: Tensor, k: Tensor, v: Tensor, mask: BlockMask, scale: float | None) -> MaskView:
    """Validate q, k, v and the mask; raise ValueError naming the offending shapes, dtypes or devices.

    Returns the mask fields and the effective softmax scale (``1/sqrt(D)`` when ``scale`` is None).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, S, D), got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16 (float32 for tests)")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, H, S_q, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(
            f"k and v must be (B, H, S_kv, D) matching q {tuple(q.shape)}; got k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {D} is not supported (q shape {tuple(q.shape)}); supported: {SUPPORTED_HEAD_DIMS}")
    S_kv = k.shape[2]
    if S_q == 0 or S_kv == 0:
        raise ValueError(f"sequence lengths must be positive, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if not isinstance(mask, BlockMask):
        raise ValueError(f"mask must be a torch.nn.attention.flex_attention.BlockMask, got {type(mask).__name__}")
    if mask.mask_mod is not noop_mask:
        raise ValueError(
            "mask.mask_mod must be the default noop_mask: block_sparse_attention computes every listed block "
            f"in full and cannot apply an element-wise mask_mod (got {getattr(mask.mask_mod, '__name__', mask.mask_mod)})"
        )
    q_block, kv_block = mask.BLOCK_SIZE
    if q_block not in (64, 128) or kv_block not in (64, 128):
        raise ValueError(f"mask.BLOCK_SIZE must be 64 or 128 on each side, got {mask.BLOCK_SIZE}")
    if tuple(mask.seq_lengths) != (S_q, S_kv):
        raise ValueError(
            f"mask.seq_lengths {tuple(mask.seq_lengths)} does not match q {tuple(q.shape)} / k {tuple(k.shape)} "
            f"(expected ({S_q}, {S_kv}))"
        )
    n_qb = (S_q + q_block - 1) // q_block
    n_kb = (S_kv + kv_block - 1) // kv_block
    kv_num, kv_idx = mask.kv_num_blocks, mask.kv_indices
    pairs = [("kv_num_blocks/kv_indices", kv_num, kv_idx)]
    if mask.full_kv_num_blocks is not None:
        pairs.append(("full_kv_num_blocks/full_kv_indices", mask.full_kv_num_blocks, mask.full_kv_indices))
    for name, num, idx in pairs:
        if num.dim() != 3 or idx.dim() != 4:
            raise ValueError(f"mask {name} must be [B, H, Q_BLOCKS] / [B, H, Q_BLOCKS, KV_BLOCKS], got "
                             f"{_shape(num)} / {_shape(idx)}")
        if tuple(idx.shape[2:]) != (n_qb, n_kb) or num.shape[2] != n_qb:
            raise ValueError(
                f"mask {name} has shapes {_shape(num)} / {_shape(idx)} but q {tuple(q.shape)}, k {tuple(k.shape)} "
                f"with block size {mask.BLOCK_SIZE} need [*, *, {n_qb}] / [*, *, {n_qb}, {n_kb}]"
            )
        for dim, size, what in ((0, B, "batch"), (1, H, "heads")):
            for t in (num, idx):
                if t.shape[dim] not in (1, size):
                    raise ValueError(
                        f"mask {name} {what} size {t.shape[dim]} (shape {_shape(t)}) must be 1 or {size} "
                        f"(q shape {tuple(q.shape)})"
                    )
        if num.device != q.device or idx.device != q.device:
            raise ValueError(f"mask {name} is on {num.device}/{idx.device} but q is on {q.device}")
        if num.dtype != torch.int32 or idx.dtype != torch.int32:
            raise ValueError(f"mask {name} must be int32, got {num.dtype} / {idx.dtype}")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    scale = float(scale)
    if not (scale > 0.0 and math.isfinite(scale)):
        raise ValueError(f"scale must be a positive finite float, got {scale}")
    return MaskView(
        kv_num, kv_idx, mask.full_kv_num_blocks, mask.full_kv_indices, q_block, kv_block, n_qb, n_kb, scale
    )


# Index tensors already checked, by (kind, id): (weak reference, version counter at the check). A fixed
# order (the 3D tile order, the same tensor at every call) or head subset is then checked once, not per call.
_CHECKED_PERMUTATIONS: dict[tuple[str, int], tuple[weakref.ref, int]] = {}


def _version(index: Tensor) -> int:
    # Inference-mode tensors have no version counter: such an index is checked once per tensor object.
    try:
        return index._version
    except RuntimeError:
        return -1


def _known_permutation(index: Tensor, kind: str = "permutation") -> bool:
    hit = _CHECKED_PERMUTATIONS.get((kind, id(index)))
    return hit is not None and hit[0]() is index and hit[1] == _version(index)


def _remember_permutation(index: Tensor, kind: str = "permutation") -> None:
    if len(_CHECKED_PERMUTATIONS) >= 256:
        for key, (ref, _) in list(_CHECKED_PERMUTATIONS.items()):
            if ref() is None:
                del _CHECKED_PERMUTATIONS[key]
        if len(_CHECKED_PERMUTATIONS) >= 256:
            _CHECKED_PERMUTATIONS.clear()
    _CHECKED_PERMUTATIONS[(kind, id(index))] = (weakref.ref(index), _version(index))


def check_index(name: str, index: Tensor | None, B: int, H: int, S: int, device: torch.device) -> Tensor | None:
    """Validate a token-permutation index (``q_index`` / ``kv_index``, see the module docstring).

    It must be an int32 tensor on ``device`` of shape ``(S,)`` or ``(B or 1, H or 1, S)`` whose last dim
    is a permutation of ``0..S-1``. The permutation check sorts the index and compares on the host, so on
    a GPU it synchronises once per index tensor: a tensor that passed is remembered (by identity and
    in-place version; inference-mode tensors, which have no version, by identity only) and not checked
    again. Returns the index with a unit last stride, or None.

    Raises:
        ValueError: naming the argument and the bad dtype, device, shape or values.
    """
    if index is None:
        return None
    if not isinstance(index, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor (int32 permutation) or None, got {type(index).__name__}")
    if index.dtype != torch.int32:
        raise ValueError(
            f"{name} must be int32, got {index.dtype} (convert it once with .to(torch.int32) and reuse it)"
        )
    if index.device != device:
        raise ValueError(f"{name} is on {index.device} but q, k, v are on {device}")
    shape = tuple(index.shape)
    ok_shape = (index.dim() == 1 and shape == (S,)) or (
        index.dim() == 3 and shape[0] in (1, B) and shape[1] in (1, H) and shape[2] == S
    )
    if not ok_shape:
        raise ValueError(f"{name} has shape {shape}; expected ({S},) or (B, H, {S}) with B in (1, {B}), H in (1, {H})")
    if index.stride(-1) != 1:
        index = index.contiguous()
    if not _known_permutation(index):
        ordered = torch.sort(index, dim=-1).values
        expect = torch.arange(S, dtype=torch.int32, device=index.device).expand_as(ordered)
        if not torch.equal(ordered, expect):
            lo, hi = int(index.min()), int(index.max())
            raise ValueError(
                f"{name} must be a permutation of 0..{S - 1} along its last dim (each position exactly once); "
                f"got values in [{lo}, {hi}] with repeats or gaps"
            )
        _remember_permutation(index)
    return index


def check_head_index(index: Tensor | None, B: int, H: int, device: torch.device) -> Tensor | None:
    """Validate a head subset (``head_index``, see the module docstring): an int32 1-D tensor on ``device`` of
    strictly ascending values in ``[0, B * H)``. The value check reads the tensor on the host (one sync on a
    GPU), once per tensor object: a tensor that passed is remembered like a permutation index.

    Raises:
        ValueError: naming the bad dtype, device, shape or values.
    """
    if index is None:
        return None
    if not isinstance(index, Tensor):
        raise ValueError(f"head_index must be a torch.Tensor (int32 flat head numbers) or None, got {type(index).__name__}")
    if index.dtype != torch.int32 or index.dim() != 1:
        raise ValueError(f"head_index must be a 1-D int32 tensor, got {index.dtype} of shape {tuple(index.shape)}")
    if index.device != device:
        raise ValueError(f"head_index is on {index.device} but q, k, v are on {device}")
    if index.numel() == 0 or index.numel() > B * H:
        raise ValueError(f"head_index must list between 1 and B*H = {B * H} heads, got {index.numel()}")
    if index.stride(-1) != 1:
        index = index.contiguous()
    if not _known_permutation(index, "heads"):
        values = index.tolist()
        if values[0] < 0 or values[-1] >= B * H or any(a >= b for a, b in zip(values, values[1:])):
            raise ValueError(f"head_index must be strictly ascending values in [0, {B * H}) (b * H + h), got {values}")
        _remember_permutation(index, "heads")
    return index
