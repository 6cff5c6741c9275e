"""What the 8-bit path of block-sparse attention shares: precisions, recipes, the quantised layout, support.

``block_sparse_attention(..., precision="fp8")`` quantises q, k, v once per call and runs the attention
kernel on the 8-bit tensors. The arithmetic (the same in the Triton kernels and the torch reference):

- **Q** per (batch, head, query block of the mask): ``s_q = max|q| / QMAX``, ``q8 = round(q / s_q)``.
- **K** smoothed first: ``k' = k - mean_tokens(k)`` per (batch, head, channel). Softmax is invariant to it
  (every logit of a row moves by the same ``scale * q . mean``), and it takes the large per-channel offset
  that DiT keys carry out of the 8-bit range. Then per key block: ``s_k = max|k'| / QMAX``, ``k8 = round(k' / s_k)``.
- Logits (log2 units): ``x = (q8 . k8) * s_q * s_k * scale * log2(e)``: one scalar per tile, folded into
  the multiply the bf16 kernel already does.
- **P** for ``P @ V``: the running row maximum is kept as an integer (``m = ceil(max x)``), so that
  ``p = 2^(x - m + P_SHIFT)`` lies in ``(0, 2^P_SHIFT]`` and every rescale ``2^(m_old - m_new)`` is an exact
  power of two. Rounding to e4m3 is scale-invariant under powers of two, so the rounded P the online
  kernel multiplies with V equals the one a two-pass softmax would give (up to values below
  ``2^-14`` of the row maximum, which fall into e4m3's subnormal range): the torch reference can mirror
  the kernel without replaying its tile order. The row sum ``l`` adds the unrounded fp32 ``p``.
- **V** (``pv="fp8"``) per (batch, head, channel): ``s_v = max_tokens |v| / 448``, ``v8 = round(v / s_v)``,
  stored transposed ``(B, H, D, S)`` because Hopper's fp8 wgmma reads both operands K-major, and the K
  dimension of ``P @ V`` is the token axis. ``out = (p8 @ v8) * s_v / l``. With ``pv="16bit"`` V stays in
  16 bits and P is rounded to V's dtype.
- LSE and tile statistics are those of the *unsmoothed* logits: the quantisation pass also stores
  ``c = scale * log2(e) * q . mean(k)`` per query row and the kernel adds it back.

``round`` is e4m3 round-to-nearest-even saturating at 448 (``qk="fp8"``) or round-half-away-from-zero to
[-127, 127] (``qk="int8"``). Accumulation is in fp32 (int32 for int8 Q.K).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "FP8_MAX",
    "INT8_MAX",
    "P_SHIFT",
    "PRECISIONS",
    "RECIPES",
    "QuantRecipe",
    "QuantizedQKV",
    "check_precision",
    "fp8_support",
    "fp8_supported",
    "padded_head_dim",
]

FP8_MAX = 448.0
"""Largest finite float8 e4m3fn value."""

INT8_MAX = 127.0
"""Largest magnitude used for int8 (symmetric range)."""

P_SHIFT = 8
"""P is computed as ``2^(x - ceil(max x) + P_SHIFT)``: its largest entry lies in (2^7, 2^8], inside e4m3's
normal range, and entries down to 2^-14 of the row maximum stay normal."""

FP8_MIN_CAPABILITY = (8, 9)
"""Compute capability from which GPUs have FP8 tensor cores (Ada 8.9, Hopper 9.0 and later)."""


class QuantRecipe(NamedTuple):
    """Which 8-bit formats the two products use."""

    qk: str
    """Format of Q and K for ``Q @ K^T``: ``"fp8"`` (e4m3) or ``"int8"``."""
    pv: str
    """Format of P and V for ``P @ V``: ``"fp8"`` (e4m3, V scaled per channel) or ``"16bit"`` (V's own dtype,
    bfloat16 for float32 inputs; P rounded to it)."""


RECIPES: dict[str, QuantRecipe] = {
    "fp8": QuantRecipe(qk="int8", pv="fp8"),
}
"""The recipe behind each non-bf16 precision name. ``"fp8"`` names the 8-bit tensor-core path (compute
capability 8.9+, where FP8 and INT8 MMAs run at the same rate): int8 Q.K, whose 7 bits per block-scaled value
keep the logits close (e4m3's 3 mantissa bits do not: on the testbed's own q/k/v e4m3 Q.K errs 2.5-4x more,
``benchmarks/fp8_accuracy.py``), and e4m3 P.V, where P lies in a fixed range and V is scaled per channel."""

PRECISIONS = ("bf16", *RECIPES)
"""Accepted values of ``precision``: ``"bf16"`` runs the 16-bit kernel on the inputs as they are."""

_QK_FORMATS = ("fp8", "int8")
_PV_FORMATS = ("fp8", "16bit")


def check_precision(precision: object) -> str:
    """Return ``precision`` if it is one of :data:`PRECISIONS`, else raise ValueError naming the allowed ones."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def check_recipe(recipe: object) -> QuantRecipe:
    """Return ``recipe`` as a :class:`QuantRecipe` after checking its formats (ValueError otherwise)."""
    if not isinstance(recipe, QuantRecipe):
        raise ValueError(f"recipe must be a QuantRecipe, got {type(recipe).__name__}")
    if recipe.qk not in _QK_FORMATS:
        raise ValueError(f"recipe.qk must be one of {_QK_FORMATS}, got {recipe.qk!r}")
    if recipe.pv not in _PV_FORMATS:
        raise ValueError(f"recipe.pv must be one of {_PV_FORMATS}, got {recipe.pv!r}")
    return recipe


def padded_head_dim(head_dim: int) -> int:
    """Head dim as the kernels store it: 64 stays 64, 72 and 128 become 128 (zero columns)."""
    return 64 if head_dim <= 64 else 128


class QuantizedQKV(NamedTuple):
    """q, k, v after the quantisation pass: permuted into the mask's token order, padded to whole blocks,
    contiguous. Produced by :func:`~dit_accel.kernels.fp8_quantize_triton.quantize_qkv_triton` and
    :func:`~dit_accel.kernels.fp8_reference.quantize_qkv_reference` (same layout and values)."""

    q: Tensor
    """``(B, H, S_q_pad, D_pad)`` float8_e4m3fn or int8. Rows past ``S_q`` repeat the last row."""
    k: Tensor
    """``(B, H, S_kv_pad, D_pad)`` float8_e4m3fn or int8, smoothed. Rows past ``S_kv`` repeat the last row."""
    v: Tensor
    """``pv="fp8"``: ``(B, H, D_pad, S_kv_pad)`` float8_e4m3fn (transposed); ``pv="16bit"``: ``(B, H, S_kv_pad,
    D_pad)`` in v's 16-bit dtype (bfloat16 for float32 inputs)."""
    q_scale: Tensor
    """``(B, H, Q_BLOCKS)`` float32 dequantisation scale of each query block."""
    k_scale: Tensor
    """``(B, H, KV_BLOCKS)`` float32 dequantisation scale of each key block."""
    v_scale: Tensor
    """``(B, H, D_pad)`` float32 per-channel scale of V (ones for ``pv="16bit"``)."""
    k_mean: Tensor
    """``(B, H, D_pad)`` float32 mean of k over its tokens (what was subtracted)."""
    row_bias: Tensor | None
    """``(B, H, S_q_pad)`` float32 ``scale * log2(e) * q . k_mean`` per query row in the permuted order (rows
    past ``S_q`` repeat the last one); None when neither LSE nor tile statistics were asked for."""
    recipe: QuantRecipe
    """The formats used."""
    seq_q: int
    """Number of real query tokens."""
    seq_kv: int
    """Number of real key tokens."""
    head_dim: int
    """Head dim of the inputs (before padding)."""


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fp8_support(device: torch.device, capability: tuple[int, int] | None, interpreted: bool,
                triton_available: bool) -> tuple[bool, str]:
    """The decision behind :func:`fp8_supported`, from explicit facts (testable without a GPU).

    Args:
        device: where q lives.
        capability: its CUDA compute capability (None off CUDA).
        interpreted: whether Triton kernels run in the interpreter (``TRITON_INTERPRET=1``).
        triton_available: whether Triton imports.
    """
    if not triton_available:
        return False, "Triton is not installed; the 8-bit path is a Triton kernel"
    if device.type == "cuda":
        if interpreted:
            return False, "TRITON_INTERPRET=1 with CUDA tensors: the interpreter runs CPU tensors only"
        if capability is None or tuple(capability) < FP8_MIN_CAPABILITY:
            return False, (f"GPU compute capability {capability} has no FP8 tensor cores "
                           f"(needs >= {FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]})")
        return True, f"FP8 tensor cores (compute capability {capability[0]}.{capability[1]})"
    if device.type == "cpu":
        if interpreted:
            return True, "Triton interpreter (TRITON_INTERPRET=1): the 8-bit kernel runs on the CPU, slowly"
        return False, ("CPU tensors run the torch reference; the 8-bit path needs the Triton kernel "
                       "(CUDA with compute capability >= 8.9, or TRITON_INTERPRET=1)")
    return False, f"device type {device.type!r} has no 8-bit kernel"


def fp8_supported(q: Tensor) -> tuple[bool, str]:
    """Whether ``block_sparse_attention(q, ..., precision="fp8")`` runs the 8-bit kernel for this ``q``, and why.

    When it returns False, an fp8 request runs the bf16 path instead; the reason is meant for run
    statistics. Every head dim, dtype and sequence length that the bf16 kernel takes is supported.
    """
    if not isinstance(q, Tensor):
        raise ValueError(f"q must be a torch.Tensor, got {type(q).__name__}")
    try:
        import triton  # noqa: F401
        triton_available = True
    except ImportError:
        triton_available = False
    capability = torch.cuda.get_device_capability(q.device) if q.is_cuda else None
    return fp8_support(q.device, capability, _interpreted(), triton_available)
