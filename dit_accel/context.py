"""Per-call context: where the tokens sit, which denoising step and guidance branch is running.

Attention processors see only q/k/v; the sparse methods also need the latent grid, the text-token
layout, the step index and the guidance branch. Nothing of this reaches a processor through
diffusers' own arguments for every family (Wan, LTX and HunyuanVideo drop ``attention_kwargs``), so
a forward pre-hook on the transformer (:class:`ContextHook`, a diffusers ``ModelHook``) reads it
from the transformer's inputs and stores it in the transformer's :class:`TransformerContext`.

Objects, from the widest to the narrowest:

* :class:`StepClock` -- denoising progress of one pipeline, shared by all its transformers (Wan2.2's
  ``transformer`` and ``transformer_2`` see different steps of the same loop).
* :class:`TransformerContext` -- one per transformer: the layout of the current forward, the branch
  of each batch row, the typed method states, the cache status and the statistics list.
* :class:`AttentionCall` -- what a method's ``plan(q, k, ctx)`` receives for one attention call.

State kept between calls is typed: a method declares a dataclass deriving from :class:`State` and asks the
context for its instance per (layer, branch) with ``ctx.state(branch, MyState)``; every instance is reset at
each new pipeline call (a new generation).

Guidance branches (checked in diffusers 0.42.1 pipeline sources):

* Wan (T2V, I2V, 2.2), FLUX.1 (true CFG) and HunyuanVideo (true CFG) call the transformer twice per
  step: first ``cond`` then ``uncond``; they also announce it with ``cache_context("cond"|"uncond")``,
  which this hook reads when present.
* CogVideoX, LTX-Video, PixArt-α/Σ and SD3/3.5 batch both branches in one call:
  ``torch.cat([negative, positive])``, so the first half of the batch rows is ``uncond`` and the
  second half ``cond``, when ``guidance_scale > 1``. A further call at the same timestep (SD3's
  skip-layer guidance) is labelled ``extra``.

When dit-accel was applied to a bare transformer (no pipeline), guidance is not known: batched
families label every row ``cond``; sequential families use the call order within a timestep.

Under ``torch.compile`` the hook's bookkeeping needs host values (the timestep, FLUX's grid, HunyuanVideo's
text padding) that a traced tensor cannot give without a device-to-host sync, so inside a compiled region the
hook hands its inputs to the ``dit_accel::begin_forward`` custom op, whose eager body does exactly what the
hook does in eager mode. The op updates the context's ``forward_token``, which every attention op reads: the
data dependency keeps the attention calls after it in any compiled graph.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, TypeVar

import torch
from diffusers.hooks.hooks import BaseState, ModelHook, StateManager

TextPosition = Literal["none", "first", "last"]
"""Where the text tokens sit in a joint-attention sequence: absent, before or after the visual tokens."""

Branch = str
"""A guidance branch label: ``"cond"``, ``"uncond"`` or ``"extra"``."""


@dataclass(frozen=True)
class TokenLayout:
    """Token layout of one attention sequence.

    The visual tokens arrive in row-major ``(f, h, w)`` order in every supported family; while the
    once-per-forward token order (:mod:`dit_accel.attention.token_order`) holds the sequence in 3D-tile
    order, ``tile_order`` names that order's tile.
    """

    grid: tuple[int, int, int] | None
    """Latent token grid ``(F', H', W')`` of the visual tokens; ``None`` when unknown or when the sequence
    does not hold the whole grid (e.g. a context-parallel shard)."""
    patch_size: tuple[int, int, int]
    """Extent of one token in VAE-latent units ``(p_t, p_h, p_w)`` (FLUX's 2x2 packing counts as a patch)."""
    text_tokens: int = 0
    """Number of text tokens in this sequence (0 for video/image-only self-attention)."""
    text_position: TextPosition = "none"
    """Where those text tokens sit: ``"first"`` (CogVideoX, FLUX), ``"last"`` (HunyuanVideo, SD3) or ``"none"``."""
    tile_order: tuple[int, int, int] | None = None
    """Tile ``(tf, th, tw)`` of the 3D-tile order the visual tokens are already in (``tiling.visual_order``
    of ``grid`` and this tile), or ``None`` when they are in row-major order."""

    @property
    def visual_tokens(self) -> int | None:
        """Number of visual tokens ``F'*H'*W'``, or ``None`` when the grid is unknown."""
        if self.grid is None:
            return None
        f, h, w = self.grid
        return f * h * w

    def visual_slice(self, seq_len: int) -> slice:
        """Slice of the visual tokens inside a sequence of length ``seq_len``."""
        if self.text_position == "first":
            return slice(self.text_tokens, seq_len)
        if self.text_position == "last":
            return slice(0, seq_len - self.text_tokens)
        return slice(0, seq_len)


@dataclass
class StepClock:
    """Denoising progress of one pipeline (or of one bare transformer), shared by its transformers.

    A step is a distinct timestep value; the pipeline wrapper installed by ``dit_accel.apply`` calls
    :meth:`begin_call` at the start of every pipeline call. Without that wrapper, a timestep larger
    than the previous one starts a new call (timesteps decrease during denoising).
    """

    pipeline_bound: bool = False
    """True when a pipeline wrapper calls :meth:`begin_call`; then timesteps never start a call."""
    num_steps_fn: Callable[[], int | None] | None = None
    """Returns the number of denoising steps of the running pipeline call (read at its first step)."""
    call_index: int = -1
    """Index of the current pipeline call (0-based; -1 before the first one)."""
    step: int = -1
    """Index of the current denoising step within the call (-1 before the first transformer call)."""
    num_steps: int | None = None
    """Total denoising steps of the current call, ``None`` when unknown."""
    call_in_step: int = 0
    """How many transformer calls of this step came before the current one (0 = first)."""
    cfg: bool | None = None
    """Whether classifier-free guidance is on for the current pipeline call (``None``: unknown)."""
    host_timestep_fn: Callable[[], float | None] | None = None
    """Returns the running step's timestep from host-side state (the pipeline scheduler's ``step_index``
    into a host copy of its ``timesteps``), or ``None`` when that state is unavailable. Set by
    ``dit_accel.apply`` for pipelines; lets the context hook skip its device-to-host sync per forward."""
    host_timestep_ok: bool | None = None
    """Whether the host-side timestep matched the forward's own timestep in this call (checked once per
    call on the first forward, with one sync); ``None`` before that check."""
    _last_timestep: float | None = None
    _on_new_call: list[Callable[[], None]] = field(default_factory=list)

    def begin_call(self, cfg: bool | None = None) -> None:
        """Start a new pipeline call: reset steps and notify the transformer contexts."""
        self.call_index += 1
        self.step = -1
        self.num_steps = None
        self.call_in_step = 0
        self.cfg = cfg
        self.host_timestep_ok = None
        self._last_timestep = None
        for callback in self._on_new_call:
            callback()

    def observe(self, timestep: float) -> None:
        """Record one transformer call at ``timestep``; advance the step on a new timestep value."""
        if self._last_timestep is not None and timestep == self._last_timestep:
            self.call_in_step += 1
            return
        if self.call_index < 0 or (
            not self.pipeline_bound and self._last_timestep is not None and timestep > self._last_timestep
        ):
            self.begin_call(cfg=self.cfg)
        self._last_timestep = timestep
        self.step += 1
        self.call_in_step = 0
        if self.step == 0 and self.num_steps_fn is not None:
            self.num_steps = self.num_steps_fn()


@dataclass
class ForwardInputs:
    """What a family adapter reads from one transformer forward call."""

    batch_size: int
    """Number of batch rows of this forward."""
    timestep: torch.Tensor
    """The timestep argument (any shape); its maximum identifies the denoising step."""
    grid: tuple[int, int, int] | None
    """Latent token grid ``(F', H', W')``; may be filled later from ``grid_tensor``."""
    patch_size: tuple[int, int, int]
    """Token extent in VAE-latent units."""
    text_tokens: int = 0
    """Number of text tokens the transformer was given (joint families; 0 otherwise)."""
    grid_tensor: torch.Tensor | None = None
    """Optional small tensor of 3 values ``(F'-1, H'-1, W'-1)`` to be fetched with the timestep (FLUX ids)."""
    text_valid_tensor: torch.Tensor | None = None
    """Optional per-row count of valid (unpadded) text tokens (HunyuanVideo's text mask)."""


class State(BaseState):
    """Base of the state kept between calls: a dataclass whose field defaults are the empty state.

    Attention methods keep one instance per (transformer, layer, guidance branch) and class, owned by the
    :class:`TransformerContext` (``ctx.state(branch, MyState)``); the feature cache keeps one per (transformer,
    branch). :meth:`reset` is called at every new pipeline call.
    """

    def reset(self, *args: Any, **kwargs: Any) -> None:
        """Back to the empty state: every field to its default (diffusers calls it with the module)."""
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if f.default_factory is not dataclasses.MISSING:
                setattr(self, f.name, f.default_factory())
            else:
                setattr(self, f.name, f.default)


S = TypeVar("S", bound=State)


@dataclass
class CacheStatus:
    """What the feature cache decided for the transformer call in progress, per guidance branch.

    Written by the cache controller (``dit_accel.caching``) before the blocks of a call run; the attention
    route records ``decision`` with each attention call. A layer whose block the cache skips sees no attention
    call at that step: a method comparing ``ctx.step`` with the step of its own last update finds the gaps in
    :attr:`cached_steps`.
    """

    step: int = -1
    """Denoising step of the call."""
    decision: str = "compute"
    """``"compute"``, ``"reuse"``, ``"selective"``, or ``"probe"`` until the probe blocks decided."""
    computed_blocks: tuple[tuple[int, int], ...] = ()
    """Block index ranges ``(lo, hi)`` that run in this call."""
    last_computed_step: int | None = None
    """Last step whose blocks all ran (``None`` before the first)."""
    cached_steps: list[int] = field(default_factory=list)
    """Every earlier step of this generation that skipped the span."""
    token_share: float = 0.0
    """On a selective call, the share of the tokens the front span runs on (0: all of them): those attention
    calls see a token subset, not the model's grid."""


@dataclass
class AttentionCall:
    """What an attention method sees for one self-attention call (the ``ctx`` of ``plan(q, k, ctx)``)."""

    context: "TransformerContext"
    """The transformer's context (holds the method states)."""
    layer: int
    """Index of the attention module among the transformer's self-attention modules (model order)."""
    module_name: str
    """Dotted name of the attention module, e.g. ``blocks.3.attn1``."""
    layout: TokenLayout
    """Token layout of this call's sequence."""
    step: int
    """Denoising step index within the pipeline call (0-based)."""
    num_steps: int | None
    """Total denoising steps, ``None`` when unknown."""
    branches: tuple[Branch, ...]
    """Guidance branch of each batch row."""
    extra_stats: dict[str, Any] = field(default_factory=dict)
    """Keys a method added to this call's statistics record (:meth:`add_stats`)."""

    def state(self, branch: Branch, cls: type[S]) -> S:
        """This layer's ``cls`` state for ``branch`` (created on first use, reset per pipeline call)."""
        return self.context.method_state(self.layer, branch, cls)

    @property
    def stats_enabled(self) -> bool:
        """Whether this call's statistics are recorded (computing them may synchronise with the GPU)."""
        return self.context.stats_enabled

    def add_stats(self, **values: Any) -> None:
        """Add keys to this call's statistics record (the route merges them into it). Values should be plain
        Python numbers, strings or bools; they are only kept when statistics are enabled."""
        if self.context.stats_enabled:
            self.extra_stats.update(values)


class TransformerContext:
    """Per-transformer context: current forward layout, branches, method state and statistics."""

    def __init__(
        self,
        transformer: torch.nn.Module,
        family: str,
        name: str,
        clock: StepClock,
        cfg_style: Literal["sequential", "batched"],
    ) -> None:
        self.family = family
        self.cfg_style = cfg_style
        self.name = name
        self.clock = clock
        self.grid: tuple[int, int, int] | None = None
        self.patch_size: tuple[int, int, int] = (1, 1, 1)
        self.text_tokens = 0
        self.text_valid: tuple[int, ...] | None = None
        self.branches: tuple[Branch, ...] = ()
        self.cache_context_name: str | None = None
        self.token_order_tile: tuple[int, int, int] | None = None
        """Tile of the 3D-tile order the blocks' token sequence is in during this forward (set and cleared by
        the token-order hook, ``dit_accel.attention.token_order``); ``None``: row-major order."""
        self.forward_index = -1
        """Number of transformer forwards begun so far, minus one (tells a hook which forward it is in)."""
        self.forward_token = torch.full((), -1, dtype=torch.int64)
        """``forward_index`` as a CPU tensor: the ``dit_accel::begin_forward`` op writes it and every attention
        op reads it, so compiled graphs keep the attention calls after the forward's bookkeeping."""
        self.stats_enabled = True
        self.cache_status: dict[Branch, CacheStatus] = {}
        """The feature cache's decision for the call in progress, per branch (empty without a cache)."""
        self._states: dict[tuple[int, Branch, type[State]], State] = {}
        self._stats: list[dict[str, Any]] = []
        clock._on_new_call.append(self.reset_state)

    # --- state -------------------------------------------------------------------------------
    def method_state(self, layer: int, branch: Branch, cls: type[S]) -> S:
        """The ``cls`` state of attention layer ``layer`` and guidance branch ``branch``, created on first use."""
        key = (layer, branch, cls)
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = cls()
        return state  # type: ignore[return-value]

    def reset_state(self) -> None:
        """Reset every method state and forget the cache status (called at every new pipeline call)."""
        for state in self._states.values():
            state.reset()
        self.cache_status.clear()

    def close(self) -> None:
        """Stop listening to the clock (the transformer was detached)."""
        if self.reset_state in self.clock._on_new_call:
            self.clock._on_new_call.remove(self.reset_state)

    # --- statistics ---------------------------------------------------------------------------
    def record(self, entry: dict[str, Any]) -> None:
        """Append one attention-call record (tensor values are converted lazily by :meth:`stats`)."""
        if self.stats_enabled:
            self._stats.append(entry)

    def stats(self) -> list[dict[str, Any]]:
        """Records of all self-attention calls since the last :meth:`reset_stats`, as plain Python values."""
        out = []
        for entry in self._stats:
            row = dict(entry)
            if isinstance(row.get("density"), torch.Tensor):
                row["density"] = float(row["density"])
            out.append(row)
        return out

    def reset_stats(self) -> None:
        """Drop all statistics records."""
        self._stats.clear()

    # --- per forward ------------------------------------------------------------------------------
    def begin_forward(self, inputs: ForwardInputs, timestep: float, cache_context: Any | None) -> None:
        """Update the context at the start of one transformer forward."""
        self.forward_index += 1
        self.forward_token.fill_(self.forward_index)
        self.token_order_tile = None  # the token-order hook sets it again when block 0 permutes
        self.grid = inputs.grid
        self.patch_size = inputs.patch_size
        self.text_tokens = inputs.text_tokens
        self.cache_context_name = getattr(cache_context, "name", None)
        self.clock.observe(timestep)
        self.branches = self._branches(inputs.batch_size)

    def _branches(self, batch: int) -> tuple[Branch, ...]:
        name = self.cache_context_name
        if name in ("cond", "uncond"):
            return (name,) * batch
        if self.clock.call_in_step > 0:
            if self.cfg_style == "sequential" and self.clock.call_in_step == 1:
                return ("uncond",) * batch
            return ("extra",) * batch
        if self.cfg_style == "batched" and self.clock.cfg and batch % 2 == 0:
            half = batch // 2
            return ("uncond",) * half + ("cond",) * half
        return ("cond",) * batch

    def attention_call(self, layer: int, module_name: str, layout: TokenLayout) -> AttentionCall:
        """Build the ``ctx`` handed to ``method.plan`` for one attention call."""
        return AttentionCall(
            context=self,
            layer=layer,
            module_name=module_name,
            layout=layout,
            step=self.clock.step,
            num_steps=self.clock.num_steps,
            branches=self.branches,
        )

    def layout(self, seq_len: int, text_tokens: int, text_position: TextPosition) -> TokenLayout:
        """Layout of a sequence of ``seq_len`` tokens with ``text_tokens`` text tokens at ``text_position``.

        The grid is kept only when the visual part holds exactly ``F'*H'*W'`` tokens; the tile order only
        then, and only for sequences without text tokens (the forward token order permutes video-only ones).
        """
        grid = self.grid
        if grid is not None and grid[0] * grid[1] * grid[2] != seq_len - text_tokens:
            grid = None
        return TokenLayout(
            grid=grid,
            patch_size=self.patch_size,
            text_tokens=text_tokens,
            text_position=text_position if text_tokens > 0 else "none",
            tile_order=self.token_order_tile if grid is not None and text_tokens == 0 else None,
        )

    def describe(self) -> dict[str, Any]:
        """Current context as a plain dict (for logs and tests)."""
        return {
            "transformer": self.name,
            "family": self.family,
            "grid": self.grid,
            "patch_size": self.patch_size,
            "text_tokens": self.text_tokens,
            "call": self.clock.call_index,
            "step": self.clock.step,
            "num_steps": self.clock.num_steps,
            "branches": self.branches,
            "token_order_tile": self.token_order_tile,
        }


_HOOK_KEYS = itertools.count(1)
_HOOKS: "weakref.WeakValueDictionary[int, ContextHook]" = weakref.WeakValueDictionary()


class ContextHook(ModelHook):
    """Transformer forward pre-hook that fills a :class:`TransformerContext` from the forward inputs.

    Stateful in diffusers' sense only so that ``cache_context(...)`` (set by Wan, FLUX and HunyuanVideo
    pipelines) reaches its ``StateManager``; it never changes the inputs. Inside a compiled region it calls the
    ``dit_accel::begin_forward`` op instead of reading host values itself (see the module docstring).
    """

    _is_stateful = True
    HOOK_NAME = "dit_accel_context"

    def __init__(self, context: TransformerContext, read_inputs: Callable[[inspect.BoundArguments], ForwardInputs]):
        super().__init__()
        self.context = context
        self.read_inputs = read_inputs
        # diffusers' _set_cache_context finds StateManager attributes on stateful hooks.
        self.cache_state = StateManager(_NoState)
        self._signature: inspect.Signature | None = None
        self.key = torch.tensor(next(_HOOK_KEYS), dtype=torch.int64)
        """Names this hook in ``dit_accel::begin_forward`` calls (a tensor, so compiled graphs hold no Python value)."""
        _HOOKS[int(self.key)] = self

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self._signature = inspect.signature(type(module).forward)
        return module

    def _host_timestep(self, inputs: ForwardInputs) -> float | None:
        """The forward's timestep from host-side state, or ``None`` when it must be read from the device.

        A sync before every forward stalls the host until the GPU has caught up, so small models run a few
        percent slower. The first forward of each pipeline call still syncs once to check that the scheduler's
        host state names the same timestep the pipeline passed; any mismatch (e.g. a pipeline that rescales its
        timesteps) keeps the sync for the rest of that call.
        """
        clock = self.context.clock
        if clock.host_timestep_fn is None or clock.host_timestep_ok is False:
            return None
        if inputs.grid_tensor is not None or inputs.text_valid_tensor is not None:
            return None  # those need a transfer anyway; the timestep rides along
        host = clock.host_timestep_fn()
        if host is None:
            return None
        if clock.host_timestep_ok is None:
            device = float(inputs.timestep.detach().float().max())
            # Exact: the clock compares timesteps exactly, and a later forward may still fall back to the
            # device value, so both sources must agree to the bit.
            clock.host_timestep_ok = device == host
            if not clock.host_timestep_ok:
                return None
        return host

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        bound = self._signature.bind(module, *args, **kwargs)
        inputs = self.read_inputs(bound)
        if torch.compiler.is_compiling():
            torch.ops.dit_accel.begin_forward(
                self.context.forward_token,
                self.key,
                inputs.timestep,
                inputs.grid_tensor,
                inputs.text_valid_tensor,
                inputs.batch_size,
                [] if inputs.grid is None else list(inputs.grid),
                list(inputs.patch_size),
                inputs.text_tokens,
            )
        else:
            self.begin(inputs)
        return args, kwargs

    def begin(self, inputs: ForwardInputs) -> None:
        """Start one forward in the context: step, branches, layout (host values, read with at most one sync)."""
        host = self._host_timestep(inputs)
        if host is not None:
            self.context.text_valid = None
            self.context.begin_forward(inputs, host, self.cache_state._context)
            return
        # One host sync per forward: the step needs the timestep value; FLUX's grid and
        # HunyuanVideo's text padding ride along in the same transfer.
        parts = [inputs.timestep.detach().float().max().reshape(1)]
        if inputs.grid_tensor is not None:
            parts.append(inputs.grid_tensor.detach().float().reshape(-1))
        if inputs.text_valid_tensor is not None:
            parts.append(inputs.text_valid_tensor.detach().float().reshape(-1))
        values = torch.cat([p.to(parts[0].device) for p in parts]).tolist()
        timestep = values[0]
        pos = 1
        if inputs.grid_tensor is not None:
            f, h, w = (int(v) + 1 for v in values[pos : pos + 3])
            inputs.grid = (f, h, w)
            pos += 3
        self.context.text_valid = tuple(int(v) for v in values[pos:]) if inputs.text_valid_tensor is not None else None
        self.context.begin_forward(inputs, timestep, self.cache_state._context)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.context.reset_state()
        return module


@torch.library.custom_op("dit_accel::begin_forward", mutates_args=("token",))
def _begin_forward_op(
    token: torch.Tensor,
    hook_key: torch.Tensor,
    timestep: torch.Tensor,
    grid_tensor: torch.Tensor | None,
    text_valid: torch.Tensor | None,
    batch_size: int,
    grid: list[int],
    patch_size: list[int],
    text_tokens: int,
) -> None:
    """:meth:`ContextHook.begin` for a compiled forward: the hook's inputs as op arguments (``grid`` empty when
    unknown); writes the new forward index into ``token``."""
    hook = _HOOKS.get(int(hook_key))
    if hook is None:
        raise RuntimeError(f"dit_accel::begin_forward: no context hook with key {int(hook_key)} (dit-accel was removed)")
    inputs = ForwardInputs(
        batch_size=batch_size,
        timestep=timestep,
        grid=tuple(grid) if grid else None,  # type: ignore[arg-type]
        patch_size=tuple(patch_size),  # type: ignore[arg-type]
        text_tokens=text_tokens,
        grid_tensor=grid_tensor,
        text_valid_tensor=text_valid,
    )
    hook.begin(inputs)
    # Under functionalisation ``token`` may be a copy of the context's tensor that is copied back after the op.
    token.fill_(hook.context.forward_index)


@_begin_forward_op.register_fake
def _begin_forward_fake(token, hook_key, timestep, grid_tensor, text_valid, batch_size, grid, patch_size, text_tokens):
    return None


class _NoState:
    """Placeholder state class: the hook keeps no per-cache-context state of its own."""

    def reset(self, *args, **kwargs) -> None:
        """Nothing to reset."""


def timed() -> float:
    """Monotonic clock in milliseconds, for ``plan_ms``: host time around a plan. GPU work the plan only queues
    is not included, but a device synchronisation inside the plan (the run statistics read the draft estimate
    on refresh calls) makes it include everything queued before, so ``plan_ms`` is an upper bound."""
    return time.perf_counter() * 1000.0
