"""The bases of the attention methods: the plan types, the method classes and the stages of a sparse plan.

A method implements ``plan(q, k, ctx) -> BlockMask | SparsePlan | None``: ``q`` and ``k`` are ``(B, H, S, D)``,
``ctx`` is the call's :class:`dit_accel.context.AttentionCall` (layout, step, branch per batch row).
``None`` means "run dense". A :class:`SparsePlan` adds a token permutation (the kernel runs on the permuted
tokens and the output is permuted back). A method that sets ``needs_tile_stats`` gets the kernel's per-tile
statistics back through ``observe(ctx, tile_stats)`` after the call. Methods are configuration only: one
instance is shared by every layer, so what must survive between calls is a typed state in the context
(``ctx.state(branch, MyState)``, see :class:`dit_accel.context.State`), never an attribute of ``self``.

The sparse methods are :class:`PlannedMethod` s, configured by one frozen dataclass deriving from
:class:`SparseConfig` and composed of plan stages (:class:`PlanStages`):

* ``order``: the token order the 128-token blocks are formed in (``None``: the model's own order);
* ``select``: the BlockMask of the call in that order;
* ``reuse`` (optional): plans with ``order`` and ``select`` on refresh calls and reuses that plan in between.

The registry of method names is :mod:`dit_accel.attention.registry`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

from dit_accel.attention.blocks import Order, text_blocks_of
from dit_accel.attention.quality import knob_thresholds, quality_value
from dit_accel.checks import check_bool, check_number, check_options

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

    from dit_accel.context import AttentionCall

DEFAULT_MIN_SEQ_LEN = 1024
"""Below this many tokens a self-attention call runs dense: block sparsity cannot pay off."""


@dataclass(frozen=True)
class SparsePlan:
    """A block mask over a permuted token order.

    ``perm`` maps permuted positions to original ones: token ``i`` of the permuted sequence is token
    ``perm[i]`` of the original. Shape ``(S,)`` (same order for every batch row and head) or
    ``(B, H, S)``; ``None`` means no permutation. ``mask`` is expressed in the permuted order.
    """

    mask: "BlockMask"
    """Block mask over the (permuted) sequence."""
    perm: torch.Tensor | None = None
    """int64 permutation of the sequence positions, or ``None``."""
    index: torch.Tensor | None = None
    """``perm`` as the kernel's int32 token index when the plan keeps one (a shared order: the same tensor at
    every call); ``None``: the route converts ``perm`` per call."""
    fresh: bool = True
    """Whether the plan was made for this call (``False``: a reuse stage returned the plan of its last refresh;
    the route then keeps the dense/sparse split of the heads it chose at that refresh)."""


def plan_of(mask: "BlockMask", order: Order | None, fresh: bool = True) -> "BlockMask | SparsePlan":
    """The plan of ``mask`` formed in ``order``: the mask itself in the model's order (when ``fresh``), else a
    :class:`SparsePlan` carrying the order's permutation and kernel index."""
    if order is None:
        return mask if fresh else SparsePlan(mask, fresh=False)
    return SparsePlan(mask, order.perm, order.kernel_index(), fresh=fresh)


class AttentionMethod:
    """Base class of attention methods (configuration plus a ``plan`` function)."""

    name: ClassVar[str] = ""
    """Registry name, e.g. ``"full"``."""
    needs_tile_stats: ClassVar[bool] = False
    """When True the kernel also returns per-tile statistics, passed to :meth:`observe`."""
    plans: ClassVar[bool] = True
    """False for a method whose ``plan`` always returns ``None`` (``dense``): the route then skips the call context
    and the plan (host work on every call)."""
    plans_in_tile_order: ClassVar[bool] = False
    """Whether the method forms its blocks in the 3D-tile order; then the forward token order
    (:mod:`dit_accel.attention.token_order`) saves the per-call permutation."""
    token_order_tile: ClassVar[tuple[int, int, int] | None] = None
    """Tile of the 3D-tile order the method plans in (``None``: chosen from the grid)."""
    dense_above: float | str | None = None
    """Heads whose planned density is above this run dense (see :attr:`SparseConfig.dense_above`); ``None``:
    every planned head runs the kernel."""
    precision: str = "bf16"
    """Precision of the block-sparse kernel (see :attr:`SparseConfig.precision`)."""

    def __init__(self, *, min_seq_len: int = DEFAULT_MIN_SEQ_LEN) -> None:
        """``min_seq_len``: self-attention calls shorter than this run dense without planning."""
        check_number("min_seq_len", min_seq_len, 0, integer=True)
        self.min_seq_len = min_seq_len

    def plan(self, q: torch.Tensor, k: torch.Tensor, ctx: "AttentionCall") -> "BlockMask | SparsePlan | None":
        """Return the block mask (or a permuted :class:`SparsePlan`) for this call, or ``None`` to run dense."""
        raise NotImplementedError

    def observe(self, ctx: "AttentionCall", tile_stats: torch.Tensor) -> None:
        """Receive the kernel's ``(B, H, Q_BLOCKS, KV_BLOCKS)`` tile statistics of the call just run
        (in the planned, possibly permuted, order); only called when ``needs_tile_stats`` is True."""

    def config(self) -> dict[str, Any]:
        """The method's options as a plain dict (recorded in run logs)."""
        return {"min_seq_len": self.min_seq_len}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({opts})"


@dataclass(frozen=True)
class SparseConfig:
    """Options shared by every sparse method: the quality knob and the dense safety valves."""

    min_seq_len: int = DEFAULT_MIN_SEQ_LEN
    """Self-attention calls shorter than this many tokens run dense without planning."""
    quality: float | str = "balanced"
    """One knob in [0, 1] (1 = closest to dense) or a level name (``max``, ``quality``, ``balanced``, ``fast``,
    ``turbo``); it sets every threshold left at ``None`` (see :data:`dit_accel.attention.quality.QUALITY_ANCHORS`)."""
    dense_warmup: float | None = None
    """Fraction of the denoising steps, from the first, run dense (``None``: from ``quality``). When the
    pipeline's step count is unknown, only step 0 counts as warm-up."""
    dense_first_layers: int = 1
    """The first this-many self-attention layers always run dense."""
    dense_last_step: bool = True
    """Run the last denoising step dense (needs the step count; ignored when it is unknown)."""
    dense_above: float | str | None = "auto"
    """Break-even routing: per (batch row, head), a planned block density above this runs dense attention on that
    head, the other heads run the block-sparse kernel (one output); a call with no head at or below it runs dense.
    The split is made when a plan is made and kept by the calls that reuse it (``temporal_skip``, ``combo``).
    ``"auto"``: the break-even density of the device cost model
    (:func:`dit_accel.kernels.cost_model.break_even_density`) at the call's sequence length, head dim and
    precision, so a head runs the kernel only where that is faster than dense attention; a float in [0, 1]: that
    fixed density; ``None``: never dense (every planned head runs the kernel). On CPU ``"auto"`` reads the cost
    table shipped for the GPU: the torch reference that runs the kernel on CPU is never faster than dense
    attention (the CPU table would send every head dense), and the CPU path exists to check numbers, so CPU runs
    take the same decisions a GPU would and their quality stays the quality the GPU delivers."""
    precision: str = "bf16"
    """Precision of the block-sparse kernel: ``"bf16"`` (the inputs' 16-bit dtype) or ``"fp8"`` (8-bit Q, K, P, V
    with fine-grained scales, :mod:`dit_accel.kernels.fp8_common`). Where the device has no 8-bit kernel an fp8
    request runs bf16 and the run statistics say why (``precision_fallback``); on CPU fp8 runs the torch
    reference of the 8-bit arithmetic, so its numbers are those the GPU kernel gives. The break-even lookup uses
    the precision that runs."""
    layer_top_p: tuple[float | None, ...] | None = None
    """Per self-attention layer (index = layer), a ``top_p`` for that layer (``None`` entries and layers past
    the end: the method's own); written by calibration (:mod:`dit_accel.calibration.target`). Methods without a
    ``top_p`` ignore it."""

    def __post_init__(self) -> None:
        check_number("min_seq_len", self.min_seq_len, 0, integer=True)
        quality_value(self.quality)
        check_number("dense_warmup", self.dense_warmup, 0.0, 1.0, allow_none=True)
        check_number("dense_first_layers", self.dense_first_layers, 0, 10**6, integer=True)
        check_bool("dense_last_step", self.dense_last_step)
        above = self.dense_above
        if not (above is None or above == "auto" or (isinstance(above, (int, float)) and not isinstance(above, bool)
                                                        and 0.0 <= above <= 1.0)):
            raise ValueError(f"dense_above must be 'auto', None or a float in [0, 1], got {above!r}")
        from dit_accel.kernels.fp8_common import check_precision

        check_precision(self.precision)
        if self.layer_top_p is not None:
            if isinstance(self.layer_top_p, list):
                object.__setattr__(self, "layer_top_p", tuple(self.layer_top_p))
            if not isinstance(self.layer_top_p, tuple):
                raise ValueError(f"layer_top_p must be a tuple of floats in (0, 1] or None, got {self.layer_top_p!r}")
            for i, value in enumerate(self.layer_top_p):
                check_number(f"layer_top_p[{i}]", value, 0.0, 1.0, lo_open=True, allow_none=True)

    def resolved(self, name: str) -> Any:
        """The value of threshold ``name``: the field when set, else the quality knob's value."""
        value = getattr(self, name, None)
        return knob_thresholds(quality_value(self.quality))[name] if value is None else value

    def top_p_of(self, layer: int) -> float:
        """``top_p`` of self-attention layer ``layer``: its :attr:`layer_top_p` entry, else the resolved ``top_p``."""
        per_layer = self.layer_top_p
        if per_layer is not None and 0 <= layer < len(per_layer) and per_layer[layer] is not None:
            return per_layer[layer]
        return self.resolved("top_p")


def warmup_steps(cfg: SparseConfig, num_steps: int | None) -> int:
    """Number of dense warm-up steps (the first ones) for a pipeline of ``num_steps`` steps; when the step
    count is unknown, 1 (step 0) if any warm-up is configured, else 0."""
    warm = cfg.resolved("dense_warmup")
    if num_steps is None:
        return 1 if warm > 0 else 0
    return math.ceil(warm * num_steps - 1e-9)


def safety_reason(cfg: SparseConfig, ctx: "AttentionCall") -> str | None:
    """Why this call must run dense by the safety valves (``"warmup"``, ``"first_layers"``,
    ``"last_step"``), or ``None``."""
    if ctx.layer < cfg.dense_first_layers:
        return "first_layers"
    if ctx.step < warmup_steps(cfg, ctx.num_steps):
        return "warmup"
    if ctx.num_steps is None:
        return None
    if cfg.dense_last_step and ctx.step >= ctx.num_steps - 1:
        return "last_step"
    return None


class ConfiguredMethod(AttentionMethod):
    """Base class of the sparse methods: configured by one frozen dataclass (``config_class``).

    The constructor takes the dataclass fields as keyword-only options (``get_method("draft",
    top_p=0.9)``) or a ready config object (``DraftMethod(DraftConfig(top_p=0.9))``); the signature is
    generated from the dataclass, so the registry lists and checks its fields: one source of truth per option.
    """

    config_class: ClassVar[type[SparseConfig]] = SparseConfig
    """Dataclass holding this method's options."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        fields = [f for f in dataclasses.fields(cls.config_class) if f.init]
        params = [
            inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY),
            inspect.Parameter("config", inspect.Parameter.POSITIONAL_ONLY, default=None),
        ]
        for f in fields:
            default = f.default if f.default is not dataclasses.MISSING else inspect.Parameter.empty
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default))

        def __init__(self: ConfiguredMethod, config: SparseConfig | None = None, /, **options: Any) -> None:
            ConfiguredMethod._setup(self, config, options)

        __init__.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        __init__.__doc__ = f"Options: the fields of :class:`{cls.config_class.__name__}`."
        cls.__init__ = __init__  # type: ignore[method-assign]

    def _setup(self, config: SparseConfig | None, options: dict[str, Any]) -> None:
        cls = self.config_class
        if config is not None:
            if options:
                raise ValueError(f"options {sorted(options)} given together with a config object {config!r}")
            if not isinstance(config, cls):
                raise TypeError(f"{type(self).__name__} needs a {cls.__name__}, got {type(config).__name__}")
            self.cfg = config
        else:
            check_options(f"attention method {self.name!r}", options, (f.name for f in dataclasses.fields(cls)))
            self.cfg = cls(**options)
        AttentionMethod.__init__(self, min_seq_len=self.cfg.min_seq_len)
        self.dense_above = self.cfg.dense_above
        self.precision = self.cfg.precision
        self._build()

    def _build(self) -> None:
        """Build what the method derives from its config (called once, after ``self.cfg`` is set)."""

    def config(self) -> dict[str, Any]:
        """The method's options (the config dataclass) as a plain dict."""
        return dataclasses.asdict(self.cfg)


# --- the stages of a planned method -------------------------------------------------------------------
class OrderStage(Protocol):
    """Chooses the token order a call's blocks are formed in."""

    name: str
    """Order recorded in statistics (``tile``, ``kmeans``, ``none``)."""
    plans_in_tile_order: bool
    """Whether the order is the 3D-tile order (or relative to it)."""
    tile: tuple[int, int, int] | None
    """Tile of that order (``None``: chosen from the grid)."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, ctx: "AttentionCall") -> Order | None:
        """The order of this call (``None``: the sequence's current order)."""
        ...


class SelectStage(Protocol):
    """Chooses the blocks of a call in a given order."""

    def mask(self, q: torch.Tensor, k: torch.Tensor, ctx: "AttentionCall", order: Order | None,
             text_blocks: torch.Tensor | None) -> "BlockMask":
        """The BlockMask of this call in ``order`` (``text_blocks``: the blocks holding text tokens)."""
        ...


class ReuseStage(Protocol):
    """Plans on refresh calls only and reuses that plan in between (state in the context)."""

    needs_tile_stats: bool
    """Whether the kernel must return tile statistics (then :meth:`observe` gets them)."""

    def plan(self, q: torch.Tensor, k: torch.Tensor, ctx: "AttentionCall") -> "BlockMask | SparsePlan":
        """The plan of a sparse call: a fresh one on refresh calls, the reused one otherwise."""
        ...

    def dense_call(self, q: torch.Tensor, k: torch.Tensor, ctx: "AttentionCall", reason: str) -> None:
        """Told about a call the safety valves run dense (``reason``)."""
        ...

    def observe(self, ctx: "AttentionCall", tile_stats: torch.Tensor) -> None:
        """The kernel's tile statistics of the call just run."""
        ...


@dataclass(frozen=True)
class PlanStages:
    """The stages a :class:`PlannedMethod` is composed of."""

    order: OrderStage | None
    """Token order of the blocks (``None``: the model's own order)."""
    select: SelectStage
    """Block selection in that order."""
    reuse: ReuseStage | None = None
    """Refresh/reuse between calls (``None``: every sparse call plans with ``order`` and ``select``)."""


class PlannedMethod(ConfiguredMethod):
    """A sparse method composed of plan stages: the safety valves, then ``order`` and ``select`` (or ``reuse``,
    which calls them on refresh calls). Subclasses set ``config_class`` and :meth:`build_stages`."""

    def build_stages(self) -> PlanStages:
        """The stages of this method, built from ``self.cfg``."""
        raise NotImplementedError

    def _build(self) -> None:
        self.stages = self.build_stages()

    @property
    def order_name(self) -> str:
        """Token order recorded in statistics."""
        return "none" if self.stages.order is None else self.stages.order.name

    @property
    def plans_in_tile_order(self) -> bool:  # type: ignore[override]
        """Whether the order stage forms the blocks in the 3D-tile order."""
        return self.stages.order is not None and self.stages.order.plans_in_tile_order

    @property
    def token_order_tile(self) -> tuple[int, int, int] | None:  # type: ignore[override]
        """Tile of the order stage's 3D-tile order (``None``: chosen from the grid)."""
        return None if self.stages.order is None else self.stages.order.tile

    @property
    def needs_tile_stats(self) -> bool:  # type: ignore[override]
        """Whether the reuse stage reads the kernel's tile statistics."""
        return self.stages.reuse is not None and self.stages.reuse.needs_tile_stats

    def plan(self, q: torch.Tensor, k: torch.Tensor, ctx: "AttentionCall") -> "BlockMask | SparsePlan | None":
        """Dense (``None``) when a safety valve applies, else the planned mask (and permutation)."""
        reason = safety_reason(self.cfg, ctx)
        if reason is not None:
            ctx.add_stats(sparse_off=reason)
            if self.stages.reuse is not None:
                self.stages.reuse.dense_call(q, k, ctx, reason)
            return None
        result = self.plan_sparse(q, k, ctx)
        if result is not None:
            ctx.add_stats(order=self.order_name)
        return result

    def plan_sparse(self, q: torch.Tensor, k: torch.Tensor, ctx: "AttentionCall") -> "BlockMask | SparsePlan | None":
        """The plan of a call the safety valves leave sparse."""
        if self.stages.reuse is not None:
            return self.stages.reuse.plan(q, k, ctx)
        order = self.order_of(q, k, ctx)
        mask = self.stages.select.mask(q, k, ctx, order, text_blocks_of(ctx.layout, q.shape[-2], q.device))
        return plan_of(mask, order)

    def order_of(self, q: torch.Tensor, k: torch.Tensor, ctx: "AttentionCall") -> Order | None:
        """The order stage's order of this call (``None``: the sequence's current order)."""
        return None if self.stages.order is None else self.stages.order(q, k, ctx)

    def observe(self, ctx: "AttentionCall", tile_stats: torch.Tensor) -> None:
        """Hand the kernel's tile statistics to the reuse stage."""
        if self.stages.reuse is not None:
            self.stages.reuse.observe(ctx, tile_stats)
