"""Triton kernels and their torch reference implementations.

Block-sparse attention (layout, LSE and tile statistics: :mod:`.block_sparse_common`):

- :func:`block_sparse_attention` — Triton on CUDA, torch reference on CPU; optional ``q_index`` /
  ``kv_index`` fold a token permutation into the kernel's loads and stores (no permuted copies);
- :func:`block_sparse_attention_reference` — the torch reference, same signature;
- mask helpers building torch's FlexAttention ``BlockMask``: :func:`dense_block_mask`,
  :func:`block_mask_from_bool`, :func:`block_mask_from_indices` (rows compacted on the device by the
  draft selection kernel), :func:`block_mask_from_scores`, :func:`block_mask_density`;
- ``precision="fp8"`` on both attention functions: 8-bit Q/K (K smoothed) and P/V with fine-grained scales
  (:mod:`.fp8_common`); :func:`fp8_supported` says whether this device runs it and why not;
- the device cost model for break-even routing (:mod:`.cost_model`): :func:`relative_cost`,
  :func:`break_even_density`, :func:`cost_table`.

The Triton module is imported lazily (on the first CUDA call), so importing this package needs no GPU.
"""

from .block_mask import (
    DEFAULT_BLOCK_SIZE,
    block_mask_density,
    block_mask_from_bool,
    block_mask_from_indices,
    block_mask_from_scores,
    dense_block_mask,
)
from .block_sparse import block_sparse_attention
from .block_sparse_common import SUPPORTED_HEAD_DIMS, BlockSparseOutput
from .block_sparse_reference import block_sparse_attention_reference
from .cost_model import break_even_density, cost_table, relative_cost
from .fp8_common import PRECISIONS, fp8_supported

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "PRECISIONS",
    "SUPPORTED_HEAD_DIMS",
    "BlockSparseOutput",
    "block_mask_density",
    "block_mask_from_bool",
    "block_mask_from_indices",
    "block_mask_from_scores",
    "dense_block_mask",
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "break_even_density",
    "cost_table",
    "fp8_supported",
    "relative_cost",
]
