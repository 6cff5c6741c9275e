"""The feature cache under ``torch.compile``: a cached module's call as custom ops around one ``torch.cond``.

In eager mode a cache hook is Python (:meth:`~dit_accel.caching.controller.CacheController.run_block`). A
compiled region (the whole transformer, or each block with ``compile_repeated_blocks``) cannot hold that code:
the call's decision, its step and the block index are host values that change between calls and blocks, so
dynamo would guard on each and compile one graph per block and step. While a compiled region is traced the hooks
therefore trace this instead::

    run = dit_accel::cache_enter(order, site, forward_token, hidden, encoder)   # decision, kept inputs
    out = torch.cond(run, <the module's own forward>, dit_accel::cache_skip(site, hidden, encoder, ...))
    dit_accel::cache_exit(order, site, *out)                                     # probe, residuals, statistics

The ops' eager bodies are the controller's ``enter_*``/``skip_*``/``exit_*`` methods, the code eager mode runs, so
outputs and statistics equal eager mode's. The traced code holds no value that differs between blocks or steps:
the hook is named by a 0-d CPU tensor (its :attr:`CacheSite.key`) and the decision reaches the graph as the
predicate of ``torch.cond`` (a CPU tensor: reading it needs no device sync). One compiled graph therefore serves
every block of a class under ``compile_repeated_blocks`` and one graph the whole transformer, whatever the
decisions. The module's forward stays in the graph (the ``torch.cond`` branch), fused as usual.

Order: ``cache_enter`` and ``cache_exit`` mutate the controller's ``order`` tensor, so the cache ops of one
transformer run in program order and are never dropped; ``cache_enter`` also reads the context's forward token,
which ``dit_accel::begin_forward`` writes, so block 0 decides once the forward's step is known; the ops inside
the branches run after the predicate they depend on.
"""

from __future__ import annotations

import ast
import inspect
import itertools
import weakref
from typing import Any, Callable, Protocol

import torch

from dit_accel.caching.base import Streams


class CacheSite(Protocol):
    """A cache hook as the ops see it (the block hooks and the output-projection hook)."""

    key: torch.Tensor
    """0-d int64 CPU tensor naming the hook in the ops."""

    def compiled_enter(self, hidden: torch.Tensor, encoder: torch.Tensor | None) -> bool:
        """The module's entry: whether it runs."""

    def compiled_skip(self, hidden: torch.Tensor, encoder: torch.Tensor | None, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        """New tensors the skipped module returns (its streams)."""

    def compiled_exit(self, hidden: torch.Tensor, encoder: torch.Tensor | None) -> None:
        """The module's exit with the streams it returned."""


_KEYS = itertools.count(1)
_SITES: "weakref.WeakValueDictionary[int, CacheSite]" = weakref.WeakValueDictionary()


def register_site(site: CacheSite) -> torch.Tensor:
    """A new key tensor for ``site``, which the ops resolve back to it while it lives."""
    key = torch.tensor(next(_KEYS), dtype=torch.int64)
    _SITES[int(key)] = site
    return key


def _site(key: torch.Tensor) -> CacheSite:
    site = _SITES.get(int(key))
    if site is None:
        raise RuntimeError(f"dit_accel cache op: no cache hook with key {int(key)} (the cache was removed)")
    return site


def run_compiled(site: CacheSite, order: torch.Tensor, forward_token: torch.Tensor, forward: Callable[[], Any],
                 streams: Callable[[Any], Streams], hidden: torch.Tensor, encoder: torch.Tensor | None,
                 text_out: bool, call: tuple[tuple, dict] | None = None, out_width: int = -1) -> Streams:
    """The traced form of one cached module call (see the module docstring); returns its output streams.

    ``forward()`` runs the module; ``streams`` reads the hidden and text streams of its output; ``text_out``: the
    module returns a text stream (``encoder`` is its input); ``call``: the module's ``(args, kwargs)`` when a
    skipped call needs them (ProCache's selective tokens run blocks on them); ``out_width``: last dim of the
    hidden output when it differs from the input's (the output projection), else -1.
    """
    operands = (hidden, encoder) if text_out else (hidden,)
    run = torch.ops.dit_accel.cache_enter(order, site.key, forward_token, hidden, encoder)

    def compute(*_: torch.Tensor) -> list[torch.Tensor]:
        out_hidden, out_encoder = streams(forward())
        like = hidden if out_width < 0 else None
        if not text_out:
            return [_own(out_hidden, like, False)]
        if out_encoder is None:
            raise ValueError("the compiled feature cache: a block that takes a text stream returned none")
        return [_own(out_hidden, like, True), _own(out_encoder, encoder, True)]

    tensors: list[torch.Tensor] = []
    spec = "" if call is None else encode_call(call, tensors)

    def skip(*inputs: torch.Tensor) -> list[torch.Tensor]:
        text = inputs[1] if len(inputs) > 1 else None
        return torch.ops.dit_accel.cache_skip(site.key, inputs[0], text, tensors, spec, out_width)

    outs = torch.cond(run, compute, skip, operands)
    out_encoder = outs[1] if len(outs) > 1 else None
    torch.ops.dit_accel.cache_exit(order, site.key, outs[0], out_encoder)
    return outs[0], out_encoder


def _own(out: torch.Tensor, like: torch.Tensor | None, joint: bool) -> torch.Tensor:
    """``out`` as a ``torch.cond`` branch may return it: not one of the branch's inputs, and laid out like the skip
    op's outputs (``torch.cond`` requires both branches to agree), which is ``torch.empty_like(like)`` (the input
    stream's layout, so a transposed stream such as HunyuanVideo's stays transposed and the next block's input
    matches this one's), or contiguous when ``like`` is ``None``. Joint-attention blocks may return slices of
    their joint sequence (FLUX's and HunyuanVideo's single blocks); a traced branch cannot read a tensor's storage
    offset, so their streams are always copied (one stream copy per block, small next to the block)."""
    if like is None:
        return out.contiguous()
    target = torch.empty_like(like)
    if joint or out is like or out.stride() != target.stride():
        return target.copy_(out)
    return out


def _laid_out_like(t: torch.Tensor, like: torch.Tensor | None) -> torch.Tensor:
    """``t`` (a tensor of the skip op's own) in the layout of ``torch.empty_like(like)``, contiguous when ``like`` is
    ``None``, at storage offset 0 (see :func:`_own`)."""
    if like is None:
        return t.contiguous() if t.storage_offset() == 0 else t.clone(memory_format=torch.contiguous_format)
    target = torch.empty_like(like)
    if t.stride() == target.stride() and t.storage_offset() == 0:
        return t
    return target.copy_(t)


def prepare_signatures(modules: list[torch.nn.Module]) -> None:
    """Build ``inspect.signature`` of each attention module's processor in the traced scope, outside any
    ``torch.cond`` branch. diffusers' attention forwards call it on every call; dynamo caches the result per
    trace, and a result first built inside one branch cannot be read in the next one (torch 2.13), so with
    several cached blocks in one graph the second block would fail to trace."""
    for module in modules:
        inspect.signature(module.processor.__call__)


# --- a module call's arguments through an op: tensors as a list, the rest as a literal -----------------------------
def encode_call(value: Any, tensors: list[torch.Tensor]) -> str:
    """``value`` (a call's ``(args, kwargs)``) as a Python literal with ``...`` where a tensor sits; the tensors go
    to ``tensors`` in order. Only literals, tensors, tuples, lists and dicts with string keys can be encoded."""
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return "..."
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    if isinstance(value, tuple):
        return "(" + "".join(encode_call(v, tensors) + "," for v in value) + ")"
    if isinstance(value, list):
        return "[" + "".join(encode_call(v, tensors) + "," for v in value) + "]"
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return "{" + "".join(repr(k) + ":" + encode_call(v, tensors) + "," for k, v in value.items()) + "}"
    raise TypeError(f"the compiled feature cache cannot pass a block argument of type {type(value).__name__} to its op")


def decode_call(spec: str, tensors: list[torch.Tensor]) -> Any:
    """The value :func:`encode_call` encoded."""
    it = iter(tensors)

    def fill(value: Any) -> Any:
        if value is Ellipsis:
            return next(it)
        if isinstance(value, tuple):
            return tuple(fill(v) for v in value)
        if isinstance(value, list):
            return [fill(v) for v in value]
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        return value

    return fill(ast.literal_eval(spec))


# --- the ops ----------------------------------------------------------------------------------------------------
@torch.library.custom_op("dit_accel::cache_enter", mutates_args=("order",))
def _cache_enter(order: torch.Tensor, site_key: torch.Tensor, forward_token: torch.Tensor, hidden: torch.Tensor,
                 encoder: torch.Tensor | None) -> torch.Tensor:
    """The module's entry (block 0 takes the call's decision); a 0-d bool CPU tensor: whether it runs."""
    order.add_(1)
    return torch.tensor(bool(_site(site_key).compiled_enter(hidden, encoder)))


@_cache_enter.register_fake
def _cache_enter_fake(order, site_key, forward_token, hidden, encoder):
    return torch.empty((), dtype=torch.bool)


@torch.library.custom_op("dit_accel::cache_skip", mutates_args=())
def _cache_skip(site_key: torch.Tensor, hidden: torch.Tensor, encoder: torch.Tensor | None,
                call_tensors: list[torch.Tensor], call_spec: str, out_width: int) -> list[torch.Tensor]:
    """A skipped module's output streams (new tensors laid out as :func:`_own` says); ``call_tensors``/``call_spec``:
    its encoded call, if needed; ``out_width``: see :func:`run_compiled`."""
    args, kwargs = decode_call(call_spec, call_tensors) if call_spec else ((), {})
    out = _site(site_key).compiled_skip(hidden, encoder, args, kwargs)
    likes = [hidden if out_width < 0 else None, encoder]
    return [_laid_out_like(t, like) for t, like in zip(out, likes)]


@_cache_skip.register_fake
def _cache_skip_fake(site_key, hidden, encoder, call_tensors, call_spec, out_width):
    out = [torch.empty_like(hidden) if out_width < 0 else hidden.new_empty((*hidden.shape[:-1], out_width))]
    return out + ([] if encoder is None else [torch.empty_like(encoder)])


@torch.library.custom_op("dit_accel::cache_exit", mutates_args=("order",))
def _cache_exit(order: torch.Tensor, site_key: torch.Tensor, hidden: torch.Tensor, encoder: torch.Tensor | None) -> None:
    """The module's exit with the streams it returned (residuals, probe, statistics)."""
    order.add_(1)
    _site(site_key).compiled_exit(hidden, encoder)


@_cache_exit.register_fake
def _cache_exit_fake(order, site_key, hidden, encoder):
    return None
