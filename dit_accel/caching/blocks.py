"""Transformer blocks as the cache sees them: where the block lists are, how a block's hidden and text
streams are read from its arguments and written into its return value, and which batch rows hold which
guidance branch."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry

from dit_accel.caching.base import Streams

Rows = slice | torch.Tensor
"""The batch rows of one guidance branch: a slice when contiguous, else an index tensor."""


@dataclass
class BlockRef:
    """One transformer block and its diffusers metadata (argument and return positions)."""

    name: str
    """Dotted module name, e.g. ``blocks.3``."""
    module: torch.nn.Module
    """The block module."""
    metadata: TransformerBlockMetadata
    """diffusers' ``TransformerBlockRegistry`` entry of the block class."""
    params: tuple[str, ...] = field(init=False)
    """Names of the block forward's parameters after ``self``, read once here: ``torch.compile`` cannot trace
    ``inspect.signature``, and the hooks look arguments up at every call."""

    def __post_init__(self) -> None:
        self.params = tuple(inspect.signature(type(self.module).forward).parameters)[1:]

    def argument(self, name: str, args: tuple, kwargs: dict) -> Any:
        """The block call's argument ``name`` (keyword or positional; ``None`` when not given)."""
        if name in kwargs:
            return kwargs[name]
        pos = self.params.index(name) if name in self.params else len(args)
        return args[pos] if pos < len(args) else None


def find_blocks(transformer: torch.nn.Module) -> list[BlockRef]:
    """All blocks of the transformer's block lists, in model order.

    Block lists are the ``nn.ModuleList`` children diffusers' own cache hooks look for (``blocks``,
    ``transformer_blocks``, ``single_transformer_blocks``, ...). Raises ``ValueError`` when none is
    found or a block class has no diffusers block metadata.
    """
    out: list[BlockRef] = []
    for list_name, child in transformer.named_children():
        if list_name not in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS or not isinstance(child, torch.nn.ModuleList):
            continue
        for index, block in enumerate(child):
            try:
                metadata = TransformerBlockRegistry.get(type(block))
            except ValueError as exc:
                known = sorted(c.__name__ for c in TransformerBlockRegistry._registry)
                raise ValueError(
                    f"block class {type(block).__name__} ({list_name}.{index}) has no diffusers block metadata; "
                    f"supported block classes: {known}"
                ) from exc
            out.append(BlockRef(f"{list_name}.{index}", block, metadata))
    if not out:
        raise ValueError(
            f"{type(transformer).__name__} has no block list (looked for ModuleList children named "
            f"{sorted(_ALL_TRANSFORMER_BLOCK_IDENTIFIERS)})"
        )
    return out


def streams_of(ref: BlockRef, args: tuple, kwargs: dict) -> Streams:
    """The hidden stream and (joint-attention blocks) the text stream of a block call's arguments."""
    meta = ref.metadata
    hidden = ref.argument(meta.hidden_states_argument_name, args, kwargs)
    encoder = None
    if meta.return_encoder_hidden_states_index is not None:
        encoder = ref.argument(meta.encoder_hidden_states_argument_name, args, kwargs)
    return hidden, encoder


def output_streams(ref: BlockRef, output: Any) -> Streams:
    """The hidden stream and (joint-attention blocks) the text stream of a block's return value."""
    meta = ref.metadata
    if isinstance(output, tuple):
        enc = None if meta.return_encoder_hidden_states_index is None else output[meta.return_encoder_hidden_states_index]
        return output[meta.return_hidden_states_index], enc
    return output, None


def pack(ref: BlockRef, hidden: torch.Tensor, encoder: torch.Tensor | None) -> Any:
    """The block's return value built from the two streams (same layout as its forward returns)."""
    meta = ref.metadata
    if meta.return_encoder_hidden_states_index is None:
        return hidden
    size = max(meta.return_hidden_states_index, meta.return_encoder_hidden_states_index) + 1
    out: list[Any] = [None] * size
    out[meta.return_hidden_states_index] = hidden
    out[meta.return_encoder_hidden_states_index] = encoder
    return tuple(out)


def with_argument(ref: BlockRef, args: tuple, kwargs: dict, name: str, value: Any) -> tuple[tuple, dict]:
    """``args, kwargs`` with the block argument ``name`` replaced by ``value``."""
    if name in kwargs:
        return args, dict(kwargs, **{name: value})
    pos = ref.params.index(name)
    return args[:pos] + (value,) + args[pos + 1:], kwargs


def with_hidden(ref: BlockRef, args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """``args, kwargs`` with the hidden-states argument replaced."""
    return with_argument(ref, args, kwargs, ref.metadata.hidden_states_argument_name, hidden)


def take_tokens(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` ``(B, k)`` of dim 1 of ``t`` (a batch dim of 1 is broadcast over the rows)."""
    batch, k = idx.shape
    if t.shape[0] == 1 and batch > 1:
        t = t.expand(batch, *t.shape[1:])
    index = idx.to(t.device).view(batch, k, *([1] * (t.dim() - 2))).expand(batch, k, *t.shape[2:])
    return torch.gather(t, 1, index)


def token_subset_call(ref: BlockRef, args: tuple, kwargs: dict, idx: torch.Tensor, tokens: int) -> tuple[tuple, dict]:
    """The block's call arguments restricted to the tokens ``idx``: every tensor (also inside tuples and
    lists, e.g. rotary tables) whose dim 1 has the token count is gathered; the text stream is kept."""
    skip = {ref.metadata.encoder_hidden_states_argument_name}
    params = ref.params

    def take(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == tokens:
            return take_tokens(value, idx)
        if isinstance(value, (tuple, list)):
            return type(value)(take(v) for v in value)
        return value

    new_args = tuple(v if (i < len(params) and params[i] in skip) else take(v) for i, v in enumerate(args))
    new_kwargs = {key: (v if key in skip else take(v)) for key, v in kwargs.items()}
    return new_args, new_kwargs


def row_groups(branches: tuple[str, ...]) -> list[tuple[str, Rows]]:
    """Rows of each branch, in order of first appearance: a slice when contiguous, else an index tensor."""
    order: list[str] = []
    rows: dict[str, list[int]] = {}
    for i, b in enumerate(branches):
        if b not in rows:
            order.append(b)
            rows[b] = []
        rows[b].append(i)
    out: list[tuple[str, Rows]] = []
    for b in order:
        idx = rows[b]
        if idx == list(range(idx[0], idx[-1] + 1)):
            out.append((b, slice(idx[0], idx[-1] + 1)))
        else:
            out.append((b, torch.tensor(idx, dtype=torch.long)))
    return out
