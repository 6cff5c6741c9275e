"""Once-per-forward token order: keep the transformer blocks' token sequence in 3D-tile order.

The sparse methods ``permuted``/``combo``/``window``/``oracle`` form their 128-token blocks in the 3D-tile
order of the latent grid (:mod:`dit_accel.attention.tiling`), a fixed permutation per grid. With
``token_order="call"`` every self-attention call applies it inside the kernel (``q_index``/``kv_index``:
pointer loads, ~6-12 % slower than the same mask without an index). With
``token_order="forward"`` the permutation is applied once per transformer forward instead, by hooks on the
modules that make the blocks' inputs and take their output (never on the blocks themselves):

* the rotary module (called first in the forward, on the latents ``(B, C, F, H, W)``) decides for the forward
  and returns its per-token tables (Wan: ``(1, S, 1, D)``) in tile order;
* the patch embedding returns its ``(B, C', F', H', W')`` output with the ``F'*H'*W'`` positions in tile order,
  so the transformer flattens it into a tile-ordered token sequence;
* the condition embedder returns a per-token timestep projection (Wan 2.2 TI2V: ``(B, S, 6*C)``) in tile order;
* the output norm gets the blocks' output back in the model's row-major order.

A tensor counts as per token when its dim 1 has ``S`` entries. Everything the blocks do is token-wise (norms,
modulation, MLPs, cross-attention to text keys) except self-attention, which is permutation-equivariant: the
output equals the stock model up to float reassociation (attention sums its keys in another order). The
attention context learns the order (``TransformerContext.token_order_tile`` -> ``TokenLayout.tile_order``), so
``sequence_order`` returns the identity, the methods plan in that order unchanged and the kernel runs without an
index. Every block hook (the feature cache, diffusers' or a user's) sees the same tile-ordered sequence, so
hooks compose in any order.

Families: only those whose self-attention sees video tokens alone (:data:`TOKEN_ORDER_FAMILIES`: Wan
2.1/2.2 and the testbed, a ``WanTransformer3DModel``). Joint text+video families (CogVideoX,
HunyuanVideo, FLUX, SD3) keep the folded path. A forward runs in the model's order (the attention then
folds the permutation as with ``"call"``) when diffusers context parallelism shards the sequence, under
gradients with gradient checkpointing, when the inputs are not what the family gives, or when no tile fits
the grid; the reason is counted in :meth:`TokenOrderAttachment.summary`.

Under ``torch.compile`` the hooks are traced with the transformer: the forward's decision and bookkeeping run
in the ``dit_accel::token_order_begin`` op and the permutations come from the ``dit_accel::token_order_perm`` op
(the identity when the forward runs in the model's order), so the graph does not depend on the decision.
With ``compile_repeated_blocks`` the hooked modules are not compiled at all.
"""

from __future__ import annotations

import itertools
import logging
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks.hooks import ModelHook

from dit_accel.attention.tiling import choose_tile, tile_permutation, validate_tile
from dit_accel.block_hooks import InstalledHook, register_block_hook, remove_block_hooks
from dit_accel.context import TransformerContext

logger = logging.getLogger("dit_accel")

TOKEN_ORDERS = ("auto", "forward", "call")
"""Values of ``dit_accel.apply(token_order=...)``: ``"auto"`` (``"forward"`` where supported and useful, else
``"call"``), ``"forward"`` (once per transformer forward), ``"call"`` (folded into each attention call)."""

TOKEN_ORDER_HOOK_NAME = "dit_accel_token_order"
"""Name of the token-order hook in the ``HookRegistry`` of each module it hooks."""


@dataclass(frozen=True)
class TokenOrderSpec:
    """Which modules of one family's transformer make the blocks' inputs and take their output."""

    family: str
    """dit-accel family name (``dit_accel.pipelines``)."""
    entry: str
    """Module called first in every forward, on the latents ``(B, C, F, H, W)``: the forward decides there; its
    per-token outputs (the rotary tables) are permuted."""
    patch_embedding: str
    """Module whose ``(B, C', F', H', W')`` output becomes the token sequence (flattened over ``F', H', W'``)."""
    per_token_outputs: dict[str, tuple[int, ...]]
    """Other modules and the positions of their tuple output that are permuted when they hold one row per token
    (dim 1 of ``S`` entries)."""
    exit: str
    """Module whose first input is the blocks' output ``(B, S, C)``: restored to the model's order there."""


TOKEN_ORDER_FAMILIES: dict[str, TokenOrderSpec] = {
    # WanTransformer3DModel.forward: rotary_emb = self.rope(hidden_states); hidden_states =
    # self.patch_embedding(hidden_states).flatten(2).transpose(1, 2); temb, timestep_proj, ... =
    # self.condition_embedder(...) (timestep_proj (B, S, 6*C) in Wan 2.2 TI2V, else (B, 6*C)); the blocks; then
    # self.norm_out(hidden_states.float()) with shift/scale from temb (per token in TI2V, model order).
    "wan": TokenOrderSpec("wan", "rope", "patch_embedding", {"condition_embedder": (1,)}, "norm_out"),
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
    """What the hooks know during one transformer forward (set by the entry module of every forward).

    A plain state object rather than diffusers' per-cache-context ``StateManager``: it describes one forward
    only, and forwards of one transformer never interleave, so ``cond``/``uncond`` need no separate copies (and
    bare transformer calls have no cache context).
    """

    forward_index: int = -1
    """``TransformerContext.forward_index`` of the forward this state belongs to."""
    active: bool = False
    """Whether the blocks' sequence is in tile order in this forward."""
    perm: torch.Tensor | None = None
    """The tile order (``perm[i]`` = row-major index of the i-th token in tile order)."""
    inverse: torch.Tensor | None = None
    """Row-major position -> tile-order position, to restore the order for the output norm."""
    tokens: int = 0
    """Sequence length ``S`` of this forward."""

    def reset(self) -> None:
        """Forget the forward (nothing permuted)."""
        self.forward_index = -1
        self.active = False
        self.perm = None
        self.inverse = None
        self.tokens = 0


_KEYS = itertools.count(1)
_ATTACHMENTS: "weakref.WeakValueDictionary[int, TokenOrderAttachment]" = weakref.WeakValueDictionary()


class TokenOrderAttachment:
    """The forward token order on one transformer: its module hooks, state, counters and exact removal."""

    def __init__(self, transformer: torch.nn.Module, context: TransformerContext, spec: TokenOrderSpec,
                 tile: tuple[int, int, int] | None = None) -> None:
        self.transformer = transformer
        self.context = context
        self.spec = spec
        self.tile = None if tile is None else validate_tile(tuple(tile))
        """Tile of the order (``None``: ``tiling.choose_tile`` of each forward's grid)."""
        roles = {spec.entry: "entry", spec.patch_embedding: "patch_embedding", spec.exit: "exit",
                 **{name: "per_token" for name in spec.per_token_outputs}}
        self.modules: dict[str, torch.nn.Module] = {}
        for name in roles:
            module = getattr(transformer, name, None)
            if not isinstance(module, torch.nn.Module):
                raise ValueError(f"{type(transformer).__name__} has no module {name!r} (token order of family {spec.family!r})")
            self.modules[name] = module
        self.roles = roles
        self.state = TokenOrderState()
        self.counts: dict[str, int] = {}
        """Forwards per path: ``"forward"`` (permuted) or the reason it was not (``"context_parallel"``,
        ``"grad_checkpointing"``, ``"inputs"``, ``"no_tile"``)."""
        self.key = torch.tensor(next(_KEYS), dtype=torch.int64)
        """Names this attachment in the ``dit_accel::token_order_*`` ops (a tensor: no Python value in a graph)."""
        _ATTACHMENTS[int(self.key)] = self
        self._installed: list[InstalledHook] = []
        self.active = False

    # --- install / remove -----------------------------------------------------------------------
    def install(self) -> "TokenOrderAttachment":
        """Register one hook per hooked module."""
        try:
            for name, module in self.modules.items():
                hook = TokenOrderHook(self, self.roles[name], self.spec.per_token_outputs.get(name, ()))
                self._installed.append(register_block_hook(module, hook, TOKEN_ORDER_HOOK_NAME))
        except Exception:
            self.remove()
            raise
        self._invalidate_registries()
        self.active = True
        return self

    def remove(self) -> None:
        """Remove the hooks (and the registries this attachment created)."""
        remove_block_hooks(self._installed, TOKEN_ORDER_HOOK_NAME)
        self._invalidate_registries()
        self.state.reset()
        self.context.token_order_tile = None
        self.active = False

    def _invalidate_registries(self) -> None:
        root = getattr(self.transformer, "_diffusers_hook", None)
        if root is not None:
            root.invalidate_child_registries_cache()

    # --- read-out -------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """``{"token_order": "forward", "tile": ..., "forwards": {path or reason: count}}``."""
        return {"token_order": "forward", "tile": self.tile, "forwards": dict(self.counts)}

    def reset_stats(self) -> None:
        """Drop the per-path counters."""
        self.counts.clear()

    # --- per forward ----------------------------------------------------------------------------
    def begin(self, latents: Any, tables: list[torch.Tensor]) -> None:
        """The entry module ran on ``latents`` and gave the per-token ``tables``: decide for this forward and
        publish the order to the attention context."""
        state, ctx = self.state, self.context
        state.reset()
        state.forward_index = ctx.forward_index
        reason, grid = self._why_not(latents, tables)
        if reason is not None:
            ctx.token_order_tile = None
            self.counts[reason] = self.counts.get(reason, 0) + 1
            return
        tile = self.tile or choose_tile(grid).tile  # type: ignore[union-attr]
        state.perm, state.inverse = tile_permutation(grid, tile, str(latents.device))
        state.active, state.tokens = True, grid[0] * grid[1] * grid[2]
        ctx.token_order_tile = tile
        self.counts["forward"] = self.counts.get("forward", 0) + 1

    def _why_not(self, latents: Any, tables: list[torch.Tensor]) -> tuple[str | None, tuple[int, int, int]]:
        grid = (0, 0, 0)
        if getattr(self.transformer, "_parallel_config", None) is not None:
            return "context_parallel", grid  # the sequence is sharded across ranks
        if torch.is_grad_enabled() and getattr(self.transformer, "gradient_checkpointing", False):
            # Training: attention runs dense under gradients, so the tile order saves nothing there.
            return "grad_checkpointing", grid
        if not isinstance(latents, torch.Tensor) or latents.dim() != 5:
            return "inputs", grid
        pt, ph, pw = _triple(self.transformer.config.patch_size)
        grid = (latents.shape[2] // pt, latents.shape[3] // ph, latents.shape[4] // pw)
        tokens = grid[0] * grid[1] * grid[2]
        if not tables or not all(t.dim() >= 2 and t.shape[1] == tokens for t in tables):
            return "inputs", grid
        if self.tile is None and choose_tile(grid) is None:
            return "no_tile", grid
        return None, grid

    def in_forward(self) -> bool:
        """Whether this forward's sequence is in tile order (its entry module decided so)."""
        return self.state.active and self.state.forward_index == self.context.forward_index

    def permutation(self, like: torch.Tensor, dim: int, inverse: bool) -> torch.Tensor | None:
        """The forward's order (``inverse``: back to row-major) for dim ``dim`` of ``like``; ``None`` in eager mode
        when the forward keeps the model's order. Inside a compiled region always a tensor (the identity then),
        from the ``dit_accel::token_order_perm`` op."""
        if torch.compiler.is_compiling():
            return torch.ops.dit_accel.token_order_perm(self.key, self.context.forward_token, like, dim, inverse)
        if not self.in_forward():
            return None
        return self.state.inverse if inverse else self.state.perm

    def start(self, latents: Any, tables: list[torch.Tensor]) -> None:
        """:meth:`begin`, through the ``dit_accel::token_order_begin`` op inside a compiled region."""
        if torch.compiler.is_compiling():
            torch.ops.dit_accel.token_order_begin(self.context.forward_token, self.key, latents, tables)
        else:
            self.begin(latents, tables)


def _triple(value: Any) -> tuple[int, int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (1, value, value)  # type: ignore[return-value]


def _permuted(value: Any, perm: torch.Tensor | None, tokens: int) -> Any:
    """``value`` with every per-token tensor (dim 1 of ``tokens`` entries) in ``perm``'s order; tuples and lists
    element-wise."""
    if perm is None:
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_permuted(v, perm, tokens) for v in value)
    if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == tokens:
        return value.index_select(1, perm.to(value.device))
    return value


class TokenOrderHook(ModelHook):
    """The hook on one module of the forward token order (see the module docstring for the roles)."""

    _is_stateful = True

    def __init__(self, attachment: TokenOrderAttachment, role: str, positions: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.attachment = attachment
        self.role = role
        """``"entry"``, ``"patch_embedding"``, ``"per_token"`` or ``"exit"``."""
        self.positions = positions
        """For ``"per_token"``: the positions of the module's tuple output that may be per token."""

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        """Run the module with its input or output in the forward's order."""
        att = self.attachment
        if self.role == "exit":
            hidden = args[0]
            perm = att.permutation(hidden, 1, inverse=True)
            if perm is not None:
                args = (hidden.index_select(1, perm),) + args[1:]
            return self.fn_ref.original_forward(*args, **kwargs)
        out = self.fn_ref.original_forward(*args, **kwargs)
        if self.role == "entry":
            tables = [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)]
            latents = args[0] if args else next(iter(kwargs.values()), None)
            att.start(latents, tables)
            if not tables:
                return out
            tokens = tables[0].shape[1]
            return _permuted(out, att.permutation(tables[0], 1, inverse=False), tokens)
        if self.role == "patch_embedding":
            flat = out.reshape(*out.shape[:2], -1)
            perm = att.permutation(flat, 2, inverse=False)
            return out if perm is None else flat.index_select(2, perm).reshape(out.shape)
        tokens = att.state.tokens if not torch.compiler.is_compiling() else None
        parts = list(out)
        for i in self.positions:
            value = parts[i]
            if isinstance(value, torch.Tensor) and value.dim() == 3:
                perm = att.permutation(value, 1, inverse=False)
                if perm is not None and (tokens is None or value.shape[1] == tokens):
                    parts[i] = value.index_select(1, perm)
        return type(out)(parts)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        """diffusers' ``_reset_stateful_cache``: forget the forward in progress."""
        if self.role == "entry":
            self.attachment.state.reset()
        return module


@torch.library.custom_op("dit_accel::token_order_begin", mutates_args=("forward_token",))
def _token_order_begin(forward_token: torch.Tensor, key: torch.Tensor, latents: torch.Tensor,
                       tables: list[torch.Tensor]) -> None:
    """:meth:`TokenOrderAttachment.begin` for a compiled forward; writes the forward index back into
    ``forward_token``, so the attention ops that read it run after this one."""
    att = _attachment(key)
    att.begin(latents, tables)
    forward_token.fill_(att.context.forward_index)


@_token_order_begin.register_fake
def _token_order_begin_fake(forward_token, key, latents, tables):
    return None


@torch.library.custom_op("dit_accel::token_order_perm", mutates_args=())
def _token_order_perm(key: torch.Tensor, forward_token: torch.Tensor, like: torch.Tensor, dim: int,
                      inverse: bool) -> torch.Tensor:
    """The forward's order (or its inverse) for dim ``dim`` of ``like``, as a new int64 tensor on its device; the
    identity when the forward keeps the model's order."""
    att = _attachment(key)
    n = like.shape[dim]
    if not att.in_forward() or att.state.tokens != n:
        return torch.arange(n, device=like.device)
    perm = att.state.inverse if inverse else att.state.perm
    return perm.to(like.device).clone()  # type: ignore[union-attr]


@_token_order_perm.register_fake
def _token_order_perm_fake(key, forward_token, like, dim, inverse):
    return torch.empty(like.shape[dim], dtype=torch.int64, device=like.device)


def _attachment(key: torch.Tensor) -> TokenOrderAttachment:
    att = _ATTACHMENTS.get(int(key))
    if att is None:
        raise RuntimeError(f"dit_accel token order op: no attachment with key {int(key)} (it was removed)")
    return att


def install_token_order(transformer: torch.nn.Module, context: TransformerContext, family: str,
                        tile: tuple[int, int, int] | None = None) -> TokenOrderAttachment:
    """Install the forward token order on ``transformer`` (family ``family``, one of
    :data:`TOKEN_ORDER_FAMILIES`) and return the attachment; ``tile`` fixes the tile of the order (``None``:
    chosen per grid, as the sparse methods do)."""
    if family not in TOKEN_ORDER_FAMILIES:
        raise ValueError(f"the forward token order supports families {sorted(TOKEN_ORDER_FAMILIES)}, got {family!r}")
    registry = getattr(getattr(transformer, TOKEN_ORDER_FAMILIES[family].entry, None), "_diffusers_hook", None)
    if registry is not None and registry.get_hook(TOKEN_ORDER_HOOK_NAME) is not None:
        raise ValueError("a dit-accel token order is already installed on this transformer; remove it first")
    return TokenOrderAttachment(transformer, context, TOKEN_ORDER_FAMILIES[family], tile).install()


__all__ = [
    "TOKEN_ORDERS",
    "TOKEN_ORDER_FAMILIES",
    "TOKEN_ORDER_HOOK_NAME",
    "TokenOrderAttachment",
    "TokenOrderHook",
    "TokenOrderSpec",
    "TokenOrderState",
    "install_token_order",
    "method_plans_in_tile_order",
    "resolve_token_order",
    "validate_token_order",
]
