"""Once-per-forward token order: keep the transformer blocks' token sequence in 3D-tile order.

The sparse methods ``permuted``/``combo``/``window``/``oracle`` form their 128-token blocks in the 3D-tile
order of the latent grid (:mod:`dit_accel.attention.tiling`), a fixed permutation per grid. With
``token_order="call"`` every self-attention call applies it inside the kernel (``q_index``/``kv_index``:
pointer loads, ~6-12 % slower than the same mask without an index). With
``token_order="forward"`` the permutation is applied once per transformer forward instead:

* at the entry of the first block: ``hidden_states`` ``(B, S, C)`` and every per-token block input
  (Wan: the rotary tables ``(1, S, 1, D)`` and Wan 2.2 TI2V's per-token timestep projection
  ``(B, S, 6, C)``; a tensor counts as per-token when its dim 1 has ``S`` entries) go to tile order;
* every later block gets the same per-token inputs in tile order (they are permuted once per forward and
  reused: the blocks receive the same objects);
* at the exit of the last block the output goes back to the model's row-major order.

Everything between the blocks' entry and exit is token-wise (norms, modulation, MLPs, cross-attention to
text keys) except self-attention, which is permutation-equivariant: the output equals the stock model up
to float reassociation (attention sums its keys in another order). The attention context learns the
order (``TransformerContext.token_order_tile`` -> ``TokenLayout.tile_order``), so ``sequence_order``
returns the identity, the methods plan in that order unchanged and the kernel runs without an index.

Families: only those whose self-attention sees video tokens alone (:data:`TOKEN_ORDER_FAMILIES`: Wan
2.1/2.2 and the testbed, a ``WanTransformer3DModel``). Joint text+video families (CogVideoX,
HunyuanVideo, FLUX, SD3) keep the folded path.

Composition with other hooks: the token-order hook must be the outermost hook of every block (it is
registered after the feature cache by ``dit_accel.apply``), so a cache hook sees, stores and reuses
residuals in tile order and a skipped first/last block is still permuted/restored exactly once. At block
0 of each forward the hook checks that; when another hook wraps a block (e.g. a cache installed by hand
after ``apply``), when diffusers context parallelism shards the sequence, or when the grid is unknown,
that forward runs in the model's order (the attention then folds the permutation as with ``"call"``) and
the reason is counted in :meth:`TokenOrderAttachment.summary`.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
from diffusers.hooks.hooks import ModelHook

from dit_accel.attention.tiling import choose_tile, tile_permutation, validate_tile
from dit_accel.block_hooks import InstalledHook, register_block_hook, remove_block_hooks
from dit_accel.context import TransformerContext

logger = logging.getLogger("dit_accel")

TOKEN_ORDERS = ("auto", "forward", "call")
"""Values of ``dit_accel.apply(token_order=...)``: ``"auto"`` (``"forward"`` where supported and useful, else
``"call"``), ``"forward"`` (once per transformer forward), ``"call"`` (folded into each attention call)."""

TOKEN_ORDER_HOOK_NAME = "dit_accel_token_order"
"""Name of the token-order hook in each block's ``HookRegistry``."""


@dataclass(frozen=True)
class TokenOrderSpec:
    """Where one family's transformer holds its blocks and which block inputs are per token."""

    family: str
    """dit-accel family name (``dit_accel.pipelines``)."""
    block_list: str
    """Name of the transformer's ``ModuleList`` of blocks, run in order on the video tokens."""
    token_arguments: tuple[str, ...]
    """Block forward arguments (besides ``hidden_states``) permuted along dim 1 when they hold one row per
    token (tensors, or tuples/lists of tensors, whose dim 1 has ``S`` entries)."""
    required_arguments: tuple[str, ...]
    """Of those, the ones that must be per token in every forward (else the forward runs unpermuted)."""


TOKEN_ORDER_FAMILIES: dict[str, TokenOrderSpec] = {
    # WanTransformerBlock.forward(hidden_states, encoder_hidden_states, temb, rotary_emb): rotary_emb is the
    # (cos, sin) pair of (1, S, 1, D) tables; temb is (B, 6, C), or (B, S, 6, C) in Wan 2.2 TI2V.
    "wan": TokenOrderSpec("wan", "blocks", ("temb", "rotary_emb"), ("rotary_emb",)),
}
"""Families whose self-attention sequences are pure video tokens, by family name."""


def validate_token_order(token_order: Any) -> str:
    """``token_order`` if it is one of :data:`TOKEN_ORDERS`, else ``ValueError``/``TypeError`` naming them."""
    if not isinstance(token_order, str):
        raise TypeError(f"token_order must be a str, one of {TOKEN_ORDERS}; got {type(token_order).__name__}: {token_order!r}")
    if token_order not in TOKEN_ORDERS:
        raise ValueError(f"token_order must be one of {TOKEN_ORDERS}, got {token_order!r}")
    return token_order


def method_plans_in_tile_order(method: Any) -> bool:
    """Whether an attention method forms its blocks in the 3D-tile order (``permuted``, ``combo``, ``window``,
    ``oracle`` with ``order="tile"``): only then does the forward token order save work."""
    return method is not None and bool(getattr(method, "plans_in_tile_order", False))


def resolve_token_order(token_order: str, family: str, method: Any) -> str:
    """``"forward"`` or ``"call"`` for one transformer of ``family`` running ``method``.

    ``"auto"`` is ``"forward"`` when the family is in :data:`TOKEN_ORDER_FAMILIES` and the method plans in
    tile order, else ``"call"``. An explicit ``"forward"`` that cannot hold raises ``ValueError``: for another
    family (joint text+video attention keeps the folded path), or a method that plans in the model's
    row-major order (``draft``, ``temporal_skip``, ``dense``: their blocks would change, or every call
    would pay for an index back to row-major order).
    """
    validate_token_order(token_order)
    supported = family in TOKEN_ORDER_FAMILIES
    tile_method = method_plans_in_tile_order(method)
    if token_order == "auto":
        return "forward" if supported and tile_method else "call"
    if token_order == "forward":
        if not supported:
            raise ValueError(
                f"token_order='forward' is supported for families {sorted(TOKEN_ORDER_FAMILIES)} (video-only "
                f"self-attention); family {family!r} keeps token_order='call' (or 'auto')"
            )
        if not tile_method:
            name = getattr(method, "name", None)
            raise ValueError(
                f"token_order='forward' needs an attention method that plans in 3D-tile order (permuted, combo, "
                f"window, oracle with order='tile'); method {name!r} plans in the model's order: use "
                f"token_order='call' or 'auto'"
            )
    return token_order


@dataclass
class TokenOrderState:
    """What the hooks know during one transformer forward (reset at block 0 of every forward).

    A plain state object rather than diffusers' per-cache-context ``StateManager``: it lives for one forward
    only (set at block 0, cleared at the last block), and forwards of one transformer never interleave, so
    ``cond``/``uncond`` need no separate copies (and bare transformer calls have no cache context).
    """

    forward_index: int = -1
    """``TransformerContext.forward_index`` of the forward this state belongs to."""
    active: bool = False
    """Whether the blocks' sequence is in tile order in this forward."""
    inverse: torch.Tensor | None = None
    """Row-major position -> tile-order position, to restore the order at the last block's exit."""
    perm: torch.Tensor | None = None
    """The tile order (``perm[i]`` = row-major index of the i-th token in tile order)."""
    tokens: int = 0
    """Sequence length ``S`` of this forward."""
    permuted: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """Per-token block inputs in tile order: ``(argument name, position in a tuple or list, ...)`` ->
    ``(source, source in tile order)``; reused while a block gets the very same source object."""

    def reset(self) -> None:
        """Forget the forward (nothing permuted)."""
        self.forward_index = -1
        self.active = False
        self.inverse = None
        self.perm = None
        self.tokens = 0
        self.permuted.clear()


class TokenOrderAttachment:
    """The forward token order on one transformer: its block hooks, state, counters and exact removal."""

    def __init__(self, transformer: torch.nn.Module, context: TransformerContext, spec: TokenOrderSpec,
                 tile: tuple[int, int, int] | None = None) -> None:
        self.transformer = transformer
        self.context = context
        self.spec = spec
        self.tile = None if tile is None else validate_tile(tuple(tile))
        """Tile of the order (``None``: ``tiling.choose_tile`` of each forward's grid)."""
        blocks = getattr(transformer, spec.block_list, None)
        if not isinstance(blocks, torch.nn.ModuleList) or len(blocks) == 0:
            raise ValueError(f"{type(transformer).__name__} has no block list {spec.block_list!r}")
        self.blocks: list[torch.nn.Module] = list(blocks)
        self.state = TokenOrderState()
        self.counts: dict[str, int] = {}
        """Forwards per path: ``"forward"`` (permuted) or the reason it was not (``"no_grid"``, ``"no_tile"``,
        ``"context_parallel"``, ``"grad_checkpointing"``, ``"not_outermost"``, ``"inputs"``)."""
        self.hooks: list[TokenOrderBlockHook] = []
        self._installed: list[InstalledHook] = []
        self._warned: set[str] = set()
        self.active = False

    # --- install / remove -----------------------------------------------------------------------
    def install(self) -> "TokenOrderAttachment":
        """Register one hook per block (outermost: call after any cache is installed)."""
        try:
            for index, block in enumerate(self.blocks):
                hook = TokenOrderBlockHook(self, index, block)
                self._installed.append(register_block_hook(block, hook, TOKEN_ORDER_HOOK_NAME))
                self.hooks.append(hook)
        except Exception:
            self.remove()
            raise
        root = getattr(self.transformer, "_diffusers_hook", None)
        if root is not None:
            root.invalidate_child_registries_cache()
        self.active = True
        return self

    def remove(self) -> None:
        """Remove the block hooks (and the block registries this attachment created)."""
        remove_block_hooks(self._installed, TOKEN_ORDER_HOOK_NAME)
        self.hooks.clear()
        root = getattr(self.transformer, "_diffusers_hook", None)
        if root is not None:
            root.invalidate_child_registries_cache()
        self.state.reset()
        self.context.token_order_tile = None
        self.active = False

    # --- read-out -------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """``{"token_order": "forward", "tile": ..., "forwards": {path or reason: count}}``."""
        return {"token_order": "forward", "tile": self.tile, "forwards": dict(self.counts)}

    def reset_stats(self) -> None:
        """Drop the per-path counters."""
        self.counts.clear()

    # --- per forward ----------------------------------------------------------------------------
    def _count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1
        if key == "not_outermost" and key not in self._warned:
            self._warned.add(key)
            logger.warning(
                "dit_accel token order: another hook wraps a transformer block outside the token-order hook "
                "(installed after dit_accel.apply?); forwards run in the model's order (folded permutation)"
            )

    def _outermost(self) -> bool:
        for block in self.blocks:
            registry = getattr(block, "_diffusers_hook", None)
            if registry is None or not registry._hook_order or registry._hook_order[-1] != TOKEN_ORDER_HOOK_NAME:
                return False
        return True

    def begin(self, hook: "TokenOrderBlockHook", args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Block 0's entry: decide for this forward and permute its hidden states."""
        state, ctx = self.state, self.context
        state.reset()
        state.forward_index = ctx.forward_index
        hidden = hook.get(args, kwargs, hook.hidden_name)
        reason = self._why_not(hook, hidden, args, kwargs)
        if reason is not None:
            ctx.token_order_tile = None
            self._count(reason)
            return args, kwargs
        tile = self.tile or choose_tile(tuple(ctx.grid)).tile
        perm, inverse = tile_permutation(tuple(ctx.grid), tile, str(hidden.device))
        state.active, state.perm, state.inverse, state.tokens = True, perm, inverse, hidden.shape[1]
        ctx.token_order_tile = tile
        self._count("forward")
        return hook.replace(args, kwargs, hook.hidden_name, hidden.index_select(1, perm))

    def _why_not(self, hook: "TokenOrderBlockHook", hidden: Any, args: tuple, kwargs: dict) -> str | None:
        ctx = self.context
        if getattr(self.transformer, "_parallel_config", None) is not None:
            return "context_parallel"  # the sequence is sharded across ranks
        if torch.is_grad_enabled() and getattr(self.transformer, "gradient_checkpointing", False):
            # Backward recomputes each block through its hooks after this forward's state is gone, so the
            # recomputed blocks would see model-order rotary tables on tile-ordered tokens.
            return "grad_checkpointing"
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            return "inputs"
        grid = ctx.grid
        if grid is None or grid[0] * grid[1] * grid[2] != hidden.shape[1]:
            return "no_grid"
        if self.tile is None and choose_tile(tuple(grid)) is None:
            return "no_tile"
        if not self._outermost():
            return "not_outermost"
        S = hidden.shape[1]
        for name in self.spec.required_arguments:
            value = hook.get(args, kwargs, name)
            parts = value if isinstance(value, (tuple, list)) else (value,)
            if not parts or not all(isinstance(p, torch.Tensor) and p.dim() >= 2 and p.shape[1] == S for p in parts):
                return "inputs"
        return None

    def permuted(self, value: Any, key: tuple[Any, ...]) -> Any:
        """``value`` (the block argument at ``key``: its name, then positions inside tuples/lists) in tile order
        if it is per token (dim 1 of size ``S``), else unchanged; tuples/lists element-wise. The blocks of a
        forward receive the same source objects, so each is permuted once per forward."""
        if isinstance(value, (tuple, list)):
            return type(value)(self.permuted(v, key + (i,)) for i, v in enumerate(value))
        if not isinstance(value, torch.Tensor) or value.dim() < 2 or value.shape[1] != self.state.tokens:
            return value
        hit = self.state.permuted.get(key)
        if hit is not None and hit[0] is value:
            return hit[1]
        out = value.index_select(1, self.state.perm.to(value.device))
        self.state.permuted[key] = (value, out)
        return out

    def in_forward(self) -> bool:
        """Whether this forward's sequence is in tile order (block 0 of this very forward permuted it)."""
        return self.state.active and self.state.forward_index == self.context.forward_index

    def end(self, output: Any, metadata: TransformerBlockMetadata) -> Any:
        """Last block's exit: back to the model's row-major order."""
        inverse = self.state.inverse
        if isinstance(output, tuple):
            i = metadata.return_hidden_states_index
            output = output[:i] + (output[i].index_select(1, inverse),) + output[i + 1:]
        else:
            output = output.index_select(1, inverse)
        self.state.reset()
        self.context.token_order_tile = None
        return output


class TokenOrderBlockHook(ModelHook):
    """Per-block hook of the forward token order (see the module docstring)."""

    _is_stateful = True

    def __init__(self, attachment: TokenOrderAttachment, index: int, block: torch.nn.Module) -> None:
        super().__init__()
        self.attachment = attachment
        self.index = index
        self.last = index == len(attachment.blocks) - 1
        self.metadata = TransformerBlockRegistry.get(type(block))
        self.hidden_name = self.metadata.hidden_states_argument_name
        self._params = list(inspect.signature(type(block).forward).parameters)[1:]  # without self

    # --- argument access by name (positional or keyword) --------------------------------------------
    def get(self, args: tuple, kwargs: dict, name: str) -> Any:
        """The block argument ``name`` of this call (``None`` if absent)."""
        if name in kwargs:
            return kwargs[name]
        pos = self._params.index(name) if name in self._params else len(args)
        return args[pos] if pos < len(args) else None

    def replace(self, args: tuple, kwargs: dict, name: str, value: Any) -> tuple[tuple, dict]:
        """``args, kwargs`` with the block argument ``name`` replaced by ``value``."""
        if name in kwargs:
            return args, dict(kwargs, **{name: value})
        pos = self._params.index(name)
        return args[:pos] + (value,) + args[pos + 1:], kwargs

    # --- hook ---------------------------------------------------------------------------------------
    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        """Block 0 decides and permutes the hidden states; every block gets per-token inputs in tile order."""
        att = self.attachment
        if self.index == 0:
            args, kwargs = att.begin(self, args, kwargs)
        if not att.in_forward():
            return args, kwargs
        for name in att.spec.token_arguments:
            value = self.get(args, kwargs, name)
            if value is not None:
                args, kwargs = self.replace(args, kwargs, name, att.permuted(value, (name,)))
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        """The last block restores the model's order."""
        if self.last and self.attachment.in_forward():
            return self.attachment.end(output, self.metadata)
        return output

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        """diffusers' ``_reset_stateful_cache``: forget the forward in progress."""
        if self.index == 0:
            self.attachment.state.reset()
        return module


def install_token_order(transformer: torch.nn.Module, context: TransformerContext, family: str,
                        tile: tuple[int, int, int] | None = None) -> TokenOrderAttachment:
    """Install the forward token order on ``transformer`` (family ``family``, one of
    :data:`TOKEN_ORDER_FAMILIES`) and return the attachment; ``tile`` fixes the tile of the order (``None``:
    chosen per grid, as the sparse methods do). Install it after any other block hook (cache)."""
    if family not in TOKEN_ORDER_FAMILIES:
        raise ValueError(f"the forward token order supports families {sorted(TOKEN_ORDER_FAMILIES)}, got {family!r}")
    for block in getattr(transformer, TOKEN_ORDER_FAMILIES[family].block_list, []):
        registry = getattr(block, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(TOKEN_ORDER_HOOK_NAME) is not None:
            raise ValueError("a dit-accel token order is already installed on this transformer; remove it first")
    return TokenOrderAttachment(transformer, context, TOKEN_ORDER_FAMILIES[family], tile).install()


__all__ = [
    "TOKEN_ORDERS",
    "TOKEN_ORDER_FAMILIES",
    "TOKEN_ORDER_HOOK_NAME",
    "TokenOrderAttachment",
    "TokenOrderBlockHook",
    "TokenOrderSpec",
    "TokenOrderState",
    "install_token_order",
    "method_plans_in_tile_order",
    "resolve_token_order",
    "validate_token_order",
]
