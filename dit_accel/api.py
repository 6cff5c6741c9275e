"""Public surface: ``apply``, ``remove``, ``processors_for`` and the handle ``apply`` returns.

``apply(pipe)`` attaches to every transformer of the pipeline (``transformer`` and, for Wan2.2,
``transformer_2``): a context hook (diffusers ``HookRegistry``) that records layout, step and
branch; our attention processors on the family's attention modules (when an attention method is
chosen); and a wrapper around the pipeline's ``__call__`` that starts a new call (step 0, fresh
method state) and reads the call's ``guidance_scale``. The wrapper is installed by giving the
pipeline instance a subclass of its own class (same name) whose ``__call__`` does that and then
calls the original: ``pipe(...)`` looks ``__call__`` up on the type, so an instance attribute would
not be used. ``remove`` puts back the original processor objects, removes the hook (and the hook
registry if we created it) and restores the pipeline's class.

Token order (``token_order=``): the sparse methods that plan in 3D-tile order (``permuted``, ``combo``,
``window``, ``oracle``) either fold the tile permutation into every attention call (``"call"``) or, for
families whose self-attention sees only video tokens (Wan), permute the token sequence once per
transformer forward, at the first block's entry, and restore it at the last block's exit (``"forward"``:
every attention call then runs the kernel without a token index; see
:mod:`dit_accel.attention.token_order`). ``"auto"`` (the default) picks ``"forward"`` where it is
supported and saves work, else ``"call"``.

Processors and modules: each patched attention module gets an ``AttentionSite`` (``dit_accel.attention.op``)
holding its layer, method and context; the processors themselves are stateless and built without arguments.
diffusers' IP-Adapter loaders rebuild processors as ``proc.__class__()`` and put their own IP-Adapter
processors on some modules: those modules then run the IP-Adapter's (dense) attention, listed by
:meth:`AccelHandle.replaced_processors`, and a pipeline's ``unload_ip_adapter()`` puts dit-accel's processors
back (``apply`` on a bare transformer cannot see the pipeline's unload: apply again after it). ``remove`` puts
the saved processors back only where dit-accel's run, so an IP-Adapter loaded after ``apply`` stays.

Copies: ``copy.deepcopy`` of a patched transformer returns an independent patched clone (its own context,
hooks, attention sites and cache, in bare-transformer mode, with the same method and cache settings).
diffusers' hooks keep calling the original module after a plain deep copy, so the clone is built from an
unpatched copy and patched again; a transformer that also carries hooks of other libraries cannot be
deep-copied (clear error). A pipeline with dit-accel applied cannot be deep-copied either: copy its
transformer, or ``remove`` first.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from diffusers.hooks.hooks import HookRegistry

from dit_accel.attention.base import AttentionMethod
from dit_accel.attention.op import SITE_ATTR, bind_module, site_of, unbind_module
from dit_accel.attention.processors import DitAccelProcessorMixin
from dit_accel.attention.registry import get_method
from dit_accel.attention.route import ModuleBinding
from dit_accel.attention.token_order import (
    TokenOrderAttachment,
    install_token_order,
    resolve_token_order,
    validate_token_order,
)
from dit_accel.context import ContextHook, StepClock, TransformerContext
from dit_accel.parallel.context_parallel import check_context_parallel, follow_context_parallel, parallel_config_of
from dit_accel.pipelines.base import Family
from dit_accel.pipelines.families import detect_family, supported_transformer_classes

if TYPE_CHECKING:
    from dit_accel.presets import Preset

logger = logging.getLogger("dit_accel")

TRANSFORMER_ATTRS = ("transformer", "transformer_2")
"""Pipeline attributes holding transformers (Wan2.2 has two)."""

_ATTACHMENT_ATTR = "_dit_accel_attachment"
_HANDLE_ATTR = "_dit_accel_handle"
_DEEPCOPY_ATTR = "__deepcopy__"  # copy.deepcopy looks it up on the instance, so a patched module can own it


def available_caches() -> list[str]:
    """Names of the feature-cache schedulers ``apply(cache=...)`` accepts (``dit_accel.caching``)."""
    from dit_accel.caching import available_schedulers

    return available_schedulers()


@dataclass
class _Attachment:
    """Everything dit-accel changed on one transformer, to undo it exactly."""

    name: str
    transformer: torch.nn.Module
    family: Family
    context: TransformerContext
    hook: ContextHook
    saved_processors: dict[str, Any]
    created_registry: bool
    had_forward_attr: bool
    handle: "AccelHandle"
    cache: Any | None = None
    """The ``dit_accel.caching.CacheAttachment`` on this transformer, if a cache was applied."""
    token_order: TokenOrderAttachment | None = None
    """The forward token order on this transformer (``token_order="forward"``), else ``None``."""


class AccelHandle:
    """What ``dit_accel.apply`` returns: statistics, contexts and ``remove()``.

    Statistics: one dict per self-attention call of a dit-accel processor, with keys
    ``transformer`` (``"transformer"``/``"transformer_2"``), ``call`` (pipeline call index),
    ``step``, ``num_steps``, ``layer``, ``module``, ``branch`` (``"cond"``, ``"uncond"``, ``"extra"``,
    or comma-joined per batch row for batched guidance, e.g. ``"uncond,cond"``), ``method``,
    ``density`` (fraction of 128x128 tiles computed; 1.0 for dense), ``plan_ms`` (host time of
    ``plan``), ``backend`` (``"block_sparse"`` or the dense backend name), ``dense_reason``
    (``None`` when sparse, else ``"mask"``, ``"short_sequence"``, ``"head_dim"``, ``"method"``,
    ``"dropout_or_causal"``, ``"grad"``: gradients are on, so SDPA runs for its autograd; inside a compiled
    region such calls are traced as SDPA and not recorded), ``seq_len``, ``text_tokens``, and, only when the
    tokens were permuted, ``token_order`` (``"forward"``: the sequence arrived in tile order and the kernel ran without a token
    index; ``"folded"``: the permutation was folded into the kernel; ``"forward+folded"``: a k-means order
    relative to the tile order), and, with a feature cache, ``cache_decision`` (the cache's decision for the
    transformer call: ``"compute"``, ``"reuse"``, ``"selective"``, or ``"probe"`` in the probe blocks before the
    probe scheduler decided), plus the keys the method added.
    """

    def __init__(
        self,
        target: Any,
        method: AttentionMethod | None,
        preset: Any | None,
        cache: Any | None,
        clock: StepClock,
        token_order: str = "call",
    ) -> None:
        self.target = target
        self.method = method
        self.preset = preset
        self.cache = cache
        """The feature-cache config (``dit_accel.caching.CacheConfig``) or ``None``."""
        self.token_order_option = token_order
        """The ``token_order`` option ``apply`` was given (``"auto"``, ``"forward"`` or ``"call"``)."""
        self.clock = clock
        self._attachments: list[_Attachment] = []
        self._pipeline_class: type | None = None
        self.active = True

    # --- read-out ---------------------------------------------------------------------------
    @property
    def contexts(self) -> dict[str, TransformerContext]:
        """Per-transformer contexts by attribute name (``"transformer"``, ``"transformer_2"``)."""
        return {a.name: a.context for a in self._attachments}

    @property
    def token_orders(self) -> dict[str, str]:
        """Token order in effect per transformer attribute name: ``"forward"`` or ``"call"``."""
        return {a.name: ("forward" if a.token_order is not None else "call") for a in self._attachments}

    def token_order_summary(self) -> dict[str, Any]:
        """Per transformer: ``{"token_order": "call"}``, or for ``"forward"`` the tile and how many forwards ran
        permuted (``"forward"``) or in the model's order, by reason (``"no_grid"``, ``"no_tile"``,
        ``"context_parallel"``, ``"grad_checkpointing"``, ``"not_outermost"``, ``"inputs"``)."""
        return {a.name: (a.token_order.summary() if a.token_order is not None else {"token_order": "call"})
                for a in self._attachments}

    @property
    def families(self) -> dict[str, str]:
        """Family name per transformer attribute name."""
        return {a.name: a.family.name for a in self._attachments}

    def stats(self) -> list[dict[str, Any]]:
        """Statistics records of all transformers since the last :meth:`reset_stats` (see class doc)."""
        out: list[dict[str, Any]] = []
        for a in self._attachments:
            out.extend(a.context.stats())
        return out

    def stats_summary(self) -> dict[str, Any]:
        """Aggregate of :meth:`stats` for run logs.

        Keys: ``attention_calls``, ``sparse_calls``, ``mean_density`` (over all self-attention calls,
        dense ones counting 1.0; ``None`` without calls), ``plan_ms_total``, ``backends`` and
        ``dense_reasons`` (name -> count), ``dense_head_share`` (of the heads of the planned calls, the share the
        break-even routing ran dense; ``None`` without such calls) and ``precision_fallbacks`` (reason -> count).
        """
        rows = self.stats()
        backends: dict[str, int] = {}
        reasons: dict[str, int] = {}
        fallbacks: dict[str, int] = {}
        dense_heads = heads = 0
        for r in rows:
            backends[r["backend"]] = backends.get(r["backend"], 0) + 1
            if r["dense_reason"] is not None:
                reasons[r["dense_reason"]] = reasons.get(r["dense_reason"], 0) + 1
            if "heads" in r:
                dense_heads += len(r["dense_heads"])
                heads += r["heads"]
            if "precision_fallback" in r:
                fallbacks[r["precision_fallback"]] = fallbacks.get(r["precision_fallback"], 0) + 1
        return {
            "attention_calls": len(rows),
            "sparse_calls": sum(1 for r in rows if r["dense_reason"] is None),
            "mean_density": (sum(r["density"] for r in rows) / len(rows)) if rows else None,
            "plan_ms_total": sum(r["plan_ms"] for r in rows),
            "backends": backends,
            "dense_reasons": reasons,
            "dense_head_share": dense_heads / heads if heads else None,
            "precision_fallbacks": fallbacks,
        }

    @property
    def stats_enabled(self) -> bool:
        """Whether attention calls are recorded (on by default; turn off for long-running services)."""
        return all(a.context.stats_enabled for a in self._attachments)

    @stats_enabled.setter
    def stats_enabled(self, enabled: bool) -> None:
        if not isinstance(enabled, bool):
            raise TypeError(f"stats_enabled must be a bool, got {type(enabled).__name__}: {enabled!r}")
        for a in self._attachments:
            a.context.stats_enabled = enabled

    def reset_stats(self) -> None:
        """Drop all statistics records (attention and cache)."""
        for a in self._attachments:
            a.context.reset_stats()
            if a.cache is not None:
                a.cache.reset_stats()
            if a.token_order is not None:
                a.token_order.reset_stats()

    def cache_stats(self) -> list[dict[str, Any]]:
        """Feature-cache records of all transformers (keys: see ``dit_accel.caching.install_cache``)."""
        out: list[dict[str, Any]] = []
        for a in self._attachments:
            if a.cache is not None:
                out.extend(a.cache.stats())
        return out

    def cache_summary(self) -> dict[str, Any] | None:
        """Per-transformer cache totals (compute fraction, reused calls, peak cached bytes); ``None`` without a cache."""
        if self.cache is None:
            return None
        return {a.name: a.cache.summary() for a in self._attachments if a.cache is not None}

    def begin_call(self) -> None:
        """Start a new generation by hand (step 0, fresh method state); the pipeline wrapper does this itself."""
        self.clock.begin_call(cfg=self.clock.cfg)

    def summary(self) -> dict[str, Any]:
        """Configuration of this handle as plain data, for run logs."""
        from dit_accel.attention.dense import dense_backend_name

        return {
            "preset": getattr(self.preset, "tag", None),
            "attention": None if self.method is None else self.method.name,
            "attention_config": None if self.method is None else self.method.config(),
            "cache": None if self.cache is None else self.cache.scheduler,
            "cache_config": None if self.cache is None else dataclasses.asdict(self.cache),
            "families": self.families,
            "token_order": self.token_orders,
            "dense_backend": dense_backend_name(),
            "replaced_processors": self.replaced_processors(),
        }

    def replaced_processors(self) -> dict[str, dict[str, str]]:
        """Per transformer: the modules dit-accel patched that now run another processor (module name -> its
        class), e.g. IP-Adapter processors loaded after ``apply``; those calls run that processor's own
        (dense) attention and leave no statistics record. Empty dicts when every patched module runs ours."""
        out: dict[str, dict[str, str]] = {}
        for a in self._attachments:
            if self.method is None:
                continue
            out[a.name] = {
                name: type(module.processor).__name__
                for name, module, _, _ in a.family.attention_modules(a.transformer)
                if site_of(module) is not None and not isinstance(module.processor, DitAccelProcessorMixin)
            }
        return out

    def reinstall_processors(self) -> list[str]:
        """Put dit-accel's processor back on the patched modules that run their family's stock processor again
        (e.g. after diffusers' ``unload_ip_adapter()``); returns those module names. Modules running any other
        processor are left alone."""
        restored: list[str] = []
        for a in self._attachments:
            if self.method is None:
                continue
            for name, module, _, _ in a.family.attention_modules(a.transformer):
                if site_of(module) is not None and type(module.processor) is a.family.stock_processor_cls:
                    module.set_processor(a.family.processor_cls())
                    restored.append(f"{a.name}.{name}")
        return restored

    def __deepcopy__(self, memo: dict) -> "AccelHandle":
        raise TypeError(
            f"cannot deep-copy a {type(self.target).__name__} with dit-accel applied: copy.deepcopy(pipe.transformer) "
            "gives an independently patched transformer, or call dit_accel.remove(...) first and apply to each copy"
        )

    def remove(self) -> None:
        """Undo everything this handle installed (same as ``dit_accel.remove(target)``)."""
        for attachment in list(self._attachments):
            _detach(attachment)
        self._attachments.clear()
        if self._pipeline_class is not None:
            self.target.__class__ = self._pipeline_class
            self._pipeline_class = None
        if self.target.__dict__.get(_HANDLE_ATTR) is self:
            del self.target.__dict__[_HANDLE_ATTR]
        self.active = False

    def __repr__(self) -> str:
        return f"AccelHandle(target={type(self.target).__name__}, families={self.families}, method={self.method!r}, active={self.active})"

    # --- pipeline wrapper callback -------------------------------------------------------------
    def _begin_pipeline_call(self, pipe: Any, args: tuple, kwargs: dict) -> None:
        cfg = None
        try:
            bound = inspect.signature(self._pipeline_class.__call__).bind(pipe, *args, **kwargs)
            bound.apply_defaults()
            scale = bound.arguments.get("guidance_scale")
            cfg = None if scale is None else bool(float(scale) > 1.0)
        except (TypeError, ValueError):
            cfg = None  # the pipeline raises its own error for bad arguments
        self.clock.begin_call(cfg=cfg)


# --- pipeline class wrapper ---------------------------------------------------------------------
_WRAPPED: dict[type, type] = {}


def _wrapped_pipeline_class(cls: type) -> type:
    if cls not in _WRAPPED:
        original_call = cls.__call__

        def __call__(self, *args, **kwargs):
            handle = self.__dict__.get(_HANDLE_ATTR)
            if handle is not None:
                handle._begin_pipeline_call(self, args, kwargs)
            return original_call(self, *args, **kwargs)

        functools.update_wrapper(__call__, original_call)
        namespace = {"__call__": __call__, "__module__": cls.__module__, "__qualname__": cls.__qualname__, "_dit_accel_wrapped": True}
        if hasattr(cls, "load_ip_adapter"):
            namespace["load_ip_adapter"] = _after(cls.load_ip_adapter, _report_replaced)
        if hasattr(cls, "unload_ip_adapter"):
            namespace["unload_ip_adapter"] = _after(cls.unload_ip_adapter, _reinstall_after_unload)
        _WRAPPED[cls] = type(cls.__name__, (cls,), namespace)
    return _WRAPPED[cls]


def _after(method: Any, then: Any) -> Any:
    """``method`` followed by ``then(handle)`` when dit-accel is applied to the pipeline."""

    def wrapper(self, *args, **kwargs):
        result = method(self, *args, **kwargs)
        handle = self.__dict__.get(_HANDLE_ATTR)
        if isinstance(handle, AccelHandle) and handle.active:
            then(handle)
        return result

    return functools.update_wrapper(wrapper, method)


def _report_replaced(handle: AccelHandle) -> None:
    for name, replaced in handle.replaced_processors().items():
        if replaced:
            classes = sorted(set(replaced.values()))
            logger.warning(
                "dit_accel: %d attention modules of %s now run %s instead of dit-accel's processor (dense, no "
                "statistics); unload_ip_adapter() puts dit-accel's back", len(replaced), name, classes
            )


def _reinstall_after_unload(handle: AccelHandle) -> None:
    restored = handle.reinstall_processors()
    if restored:
        logger.info("dit_accel: processors put back on %d modules after unload_ip_adapter()", len(restored))


def _is_pipeline(obj: Any) -> bool:
    return not isinstance(obj, torch.nn.Module) and hasattr(obj, "components") and callable(obj)


def _pipeline_transformers(pipe: Any) -> list[tuple[str, torch.nn.Module]]:
    found = [(n, getattr(pipe, n, None)) for n in TRANSFORMER_ATTRS]
    found = [(n, t) for n, t in found if t is not None]
    if not found:
        raise ValueError(
            f"pipeline {type(pipe).__name__} has no transformer (looked for {list(TRANSFORMER_ATTRS)}); "
            f"supported transformer classes: {supported_transformer_classes()}"
        )
    return found


def _pipeline_num_steps(pipe: Any) -> int | None:
    steps = getattr(pipe, "_num_timesteps", None)
    if isinstance(steps, int):
        return steps
    timesteps = getattr(getattr(pipe, "scheduler", None), "timesteps", None)
    return None if timesteps is None else len(timesteps)


class _HostTimestep:
    """The running step's timestep read from the pipeline scheduler's host-side state (no device sync).

    Uses ``scheduler.step_index`` (``begin_index`` before the first ``step()``, else 0) into a host copy of
    ``scheduler.timesteps``, copied once per ``set_timesteps`` (one sync per generation). Returns ``None``
    for schedulers without ``step_index`` (e.g. DDIM), so the context hook reads the device value instead.
    """

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self._source: torch.Tensor | None = None
        self._values: list[float] = []

    def __call__(self) -> float | None:
        scheduler = getattr(self.pipe, "scheduler", None)
        timesteps = getattr(scheduler, "timesteps", None)
        if not isinstance(timesteps, torch.Tensor) or timesteps.dim() != 1 or not hasattr(scheduler, "step_index"):
            return None
        index = scheduler.step_index
        if index is None:
            index = getattr(scheduler, "begin_index", None) or 0
        if timesteps is not self._source:
            self._source = timesteps
            self._values = [float(v) for v in timesteps.float().tolist()]
        return self._values[index] if 0 <= index < len(self._values) else None


# --- attach / detach -----------------------------------------------------------------------------
def _attach(name: str, transformer: torch.nn.Module, family: Family, handle: AccelHandle) -> _Attachment:
    context = TransformerContext(transformer, family.name, name, handle.clock, family.cfg_style)
    created_registry = not hasattr(transformer, "_diffusers_hook")
    had_forward_attr = "forward" in transformer.__dict__
    saved = dict(transformer.attn_processors)
    hook = ContextHook(context, family.read_inputs)
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    registry.register_hook(hook, ContextHook.HOOK_NAME)
    attachment = _Attachment(
        name, transformer, family, context, hook, saved, created_registry, had_forward_attr, handle
    )
    transformer.__dict__[_ATTACHMENT_ATTR] = attachment
    transformer.__dict__[_DEEPCOPY_ATTR] = _CloneOnDeepcopy(attachment)
    handle._attachments.append(attachment)
    return attachment


def _detach(attachment: _Attachment) -> None:
    transformer = attachment.transformer
    if attachment.token_order is not None:
        attachment.token_order.remove()
        attachment.token_order = None
    if attachment.cache is not None:
        attachment.cache.remove()
        attachment.cache = None
    # The saved processors go back where ours run; a processor loaded after apply (an IP-Adapter) stays.
    current = transformer.attn_processors
    transformer.set_attn_processor(
        {k: (attachment.saved_processors.get(k, p) if isinstance(p, DitAccelProcessorMixin) else p) for k, p in current.items()}
    )
    for _, module, _, _ in attachment.family.attention_modules(transformer):
        unbind_module(module)
    registry = getattr(transformer, "_diffusers_hook", None)
    if registry is not None:
        registry.remove_hook(ContextHook.HOOK_NAME, recurse=False)
        if attachment.created_registry and not registry.hooks:
            del transformer._diffusers_hook
            if not attachment.had_forward_attr:
                transformer.__dict__.pop("forward", None)
    # The saved processors predate an enable_parallelism called after apply: give them its config.
    follow_context_parallel(transformer)
    transformer.__dict__.pop(_ATTACHMENT_ATTR, None)
    transformer.__dict__.pop(_DEEPCOPY_ATTR, None)
    attachment.context.close()
    if attachment in attachment.handle._attachments:
        attachment.handle._attachments.remove(attachment)


def _bind_sites(attachment: _Attachment, method: AttentionMethod) -> None:
    """Attach an attention site (layer, role, method, context) to every module the family patches."""
    for name, module, role, layer in attachment.family.attention_modules(attachment.transformer):
        bind_module(module, ModuleBinding(attachment.context, method, layer, name, role, id(module)))


def _build_processors(attachment: _Attachment, method: AttentionMethod) -> dict[str, Any]:
    transformer = attachment.transformer
    processors = dict(transformer.attn_processors)
    stock = attachment.family.stock_processor_cls
    modules = attachment.family.attention_modules(transformer)
    for name, _, _, _ in modules:
        current = processors[f"{name}.processor"]
        if not isinstance(current, stock):
            # e.g. an IP-Adapter, PAG or fused-projection processor: replacing it would silently drop
            # what it does, so refuse instead.
            raise ValueError(
                f"module {name!r} runs {type(current).__name__}, not the stock {stock.__name__} dit-accel "
                "builds on; remove that processor first (e.g. unload IP-Adapters, unfuse_qkv_projections())"
            )
    _bind_sites(attachment, method)
    # enable_parallelism configures only the processors present when it ran.
    parallel_config = parallel_config_of(transformer)
    for name, _, _, _ in modules:
        processor = attachment.family.processor_cls()
        processor._parallel_config = parallel_config
        processors[f"{name}.processor"] = processor
    return processors


def _install_extras(attachment: _Attachment, cache_config: Any | None, token_order: str, method: AttentionMethod | None) -> None:
    """The feature cache and the forward token order of one attached transformer (after its processors)."""
    if cache_config is not None:
        from dit_accel.caching import install_cache

        # after the context hook, so steps and branches are known before block 0 runs
        attachment.cache = install_cache(attachment.transformer, attachment.context, cache_config)
    if token_order == "forward":
        # last, so its block hooks are the outermost: the cache sees the sequence in tile order
        attachment.token_order = install_token_order(
            attachment.transformer, attachment.context, attachment.family.name, getattr(method, "token_order_tile", None)
        )


# --- copy.deepcopy of a patched transformer ----------------------------------------------------------
class _CloneOnDeepcopy:
    """A patched transformer's ``__deepcopy__``: copy it unpatched, then patch the copy with the same settings."""

    def __init__(self, attachment: _Attachment) -> None:
        self.attachment = attachment

    def __call__(self, memo: dict) -> torch.nn.Module:
        original = self.attachment
        with _unpatched(original.transformer):
            clone = copy.deepcopy(original.transformer, memo)
        source = original.handle
        handle = AccelHandle(clone, source.method, source.preset, source.cache, StepClock(), source.token_order_option)
        clone.__dict__[_HANDLE_ATTR] = handle
        try:
            attachment = _attach("transformer", clone, original.family, handle)
            attachment.saved_processors = copy.deepcopy(original.saved_processors, memo)
            if source.method is not None:
                _bind_sites(attachment, source.method)
            cache = None if original.cache is None else original.cache.config
            order = "forward" if original.token_order is not None else "call"
            _install_extras(attachment, cache, order, source.method)
        except Exception:
            handle.remove()
            raise
        return clone


def _is_ours(hook: Any) -> bool:
    return type(hook).__module__.startswith("dit_accel.")


@contextlib.contextmanager
def _unpatched(transformer: torch.nn.Module) -> Iterator[None]:
    """Within the block, ``transformer`` looks as before dit-accel: its hooks, attention sites and attachment
    are taken out of the modules' ``__dict__`` (the same objects go back afterwards; processors stay, they
    hold nothing per module). Raises ``TypeError`` when a module also carries hooks of another library."""
    taken: list[tuple[dict, str, Any]] = []
    placed: list[tuple[dict, str]] = []

    def take(d: dict, key: str) -> None:
        if key in d:
            taken.append((d, key, d.pop(key)))

    try:
        for name, module in transformer.named_modules():
            d = module.__dict__
            registry = d.get("_diffusers_hook")
            if registry is not None and registry.hooks:
                foreign = sorted(n for n, h in registry.hooks.items() if not _is_ours(h))
                if foreign:
                    raise TypeError(
                        f"cannot deep-copy {type(transformer).__name__}: module {name or '<root>'!r} carries diffusers "
                        f"hooks {foreign} besides dit-accel's (after a deep copy diffusers' hooks still call the "
                        "original module); remove them or dit-accel before copying"
                    )
                first = registry._fn_refs[0]
                before = first.original_forward if first.original_forward is not None else first.forward
                take(d, "_diffusers_hook")
                take(d, "forward")
                if getattr(before, "__func__", None) is not type(module).forward:
                    d["forward"] = before  # the module had an instance-level forward of its own
                    placed.append((d, "forward"))
            take(d, SITE_ATTR)
        root = transformer.__dict__
        for key in (_ATTACHMENT_ATTR, _HANDLE_ATTR, _DEEPCOPY_ATTR):
            take(root, key)
        yield
    finally:
        for d, key in placed:
            d.pop(key, None)
        for d, key, value in reversed(taken):
            d[key] = value


def with_precision(method: AttentionMethod | None, precision: str | None) -> AttentionMethod | None:
    """``method`` with its kernel ``precision`` set (``None`` keeps the method's own). Raises ``ValueError`` for a
    precision other than bf16 on a method that runs no configurable kernel (``dense``, ``full``)."""
    if precision is None:
        return method
    from dit_accel.attention.base import ConfiguredMethod
    from dit_accel.kernels.fp8_common import check_precision

    check_precision(precision)
    if isinstance(method, ConfiguredMethod):
        if method.cfg.precision == precision:
            return method
        return type(method)(dataclasses.replace(method.cfg, precision=precision))
    if precision != "bf16":
        name = None if method is None else method.name
        raise ValueError(f"precision {precision!r} applies to the sparse attention methods; attention {name!r} has "
                         "no kernel precision (choose a sparse method or preset)")
    return method


def _resolve(preset: Any, attention: Any, cache: Any) -> tuple[Any, AttentionMethod | None, Any | None]:
    """Preset, attention method and cache config after applying the overrides (raises on bad values)."""
    from dit_accel.presets import Preset, get_preset

    resolved_preset = None
    attention_name = attention
    attention_config: dict[str, Any] = {}
    cache_name = cache
    cache_config: dict[str, Any] = {}
    if preset is not None:
        if isinstance(preset, Preset):
            resolved_preset = preset
        elif isinstance(preset, str):
            resolved_preset = get_preset(preset)
        else:
            raise TypeError(f"preset must be a str (a preset name or a .json preset file) or a Preset, got "
                            f"{type(preset).__name__}: {preset!r}")
        if attention is None:
            attention_name = resolved_preset.attention
            attention_config = dict(resolved_preset.attention_config)
        elif isinstance(attention, str) and attention == resolved_preset.attention:
            attention_config = dict(resolved_preset.attention_config)
        if cache is None:
            cache_name = resolved_preset.cache
            cache_config = dict(resolved_preset.cache_config)
        elif isinstance(cache, str) and cache == resolved_preset.cache:
            cache_config = dict(resolved_preset.cache_config)
    method = None if attention_name is None else get_method(attention_name, **attention_config)
    cache_cfg = None
    if cache_name is not None:
        from dit_accel.caching import make_cache_config

        cache_cfg = make_cache_config(cache_name, **cache_config)
    return resolved_preset, method, cache_cfg


# --- public functions -------------------------------------------------------------------------------
def apply(
    pipe_or_transformer: Any,
    preset: "str | Path | Preset | None" = None,
    attention: str | AttentionMethod | None = None,
    cache: Any | None = None,
    token_order: str = "auto",
    precision: str | None = None,
) -> AccelHandle:
    """Accelerate a diffusers pipeline (or a bare transformer) in place and return a handle.

    ``preset`` names a preset (``dit_accel.presets``), or is a preset file (a ``.json`` path written by
    ``dit_accel.calibrate``; refused with a ``ValueError`` naming both config hashes when it was calibrated on
    another model configuration), or a ``Preset``; ``attention`` (a method name or an
    :class:`AttentionMethod`) and ``cache`` (a scheduler name from :func:`available_caches` or a
    ``dit_accel.caching.CacheConfig``) override the preset's; a name equal to the preset's keeps the
    preset's options. With no preset and no attention the
    stock processors stay and only the context (steps, branches, layout) is recorded.

    ``token_order`` (``"auto"``, ``"forward"`` or ``"call"``): where the 3D-tile permutation of the methods
    that plan in tile order is applied: ``"forward"`` once per transformer forward (first block in, last
    block out; Wan family only), ``"call"`` folded into every attention call; ``"auto"`` is ``"forward"``
    for a Wan transformer running such a method, else ``"call"``. Outputs agree up to float reassociation
    (see :mod:`dit_accel.attention.token_order`); :meth:`AccelHandle.token_orders` tells which one runs.

    Context parallelism (``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))``) may
    be enabled before or after ``apply``; ring attention is refused (see :mod:`dit_accel.parallel.context_parallel`).

    ``precision`` (``"bf16"`` or ``"fp8"``; ``None`` keeps the method's or preset's): the block-sparse kernel's
    precision (:attr:`dit_accel.attention.base.SparseConfig.precision`); where the device cannot run fp8 the calls
    run bf16 and the statistics say why.

    Applying again first removes the previous application. Raises ``TypeError``/``ValueError`` naming the
    bad value and the allowed ones; nothing is changed when it raises.
    """
    validate_token_order(token_order)
    from dit_accel.preset_file import is_preset_file, load_preset_file

    if is_preset_file(preset):
        preset = load_preset_file(preset, pipe_or_transformer)
    resolved_preset, method, cache_config = _resolve(preset, attention, cache)
    method = with_precision(method, precision)
    target = pipe_or_transformer
    if _is_pipeline(target):
        transformers = _pipeline_transformers(target)
    elif isinstance(target, torch.nn.Module):
        transformers = [("transformer", target)]
    else:
        raise TypeError(
            f"apply() expects a diffusers pipeline or transformer, got {type(target).__name__}; "
            f"supported transformer classes: {supported_transformer_classes()}"
        )
    families = [(name, tr, detect_family(tr)) for name, tr in transformers]
    orders = {name: resolve_token_order(token_order, family.name, method) for name, _, family in families}
    for _, tr, _ in families:
        check_context_parallel(tr)

    remove(target)
    for _, tr, _ in families:
        remove(tr)

    is_pipe = _is_pipeline(target)
    clock = StepClock(
        pipeline_bound=is_pipe,
        num_steps_fn=(lambda: _pipeline_num_steps(target)) if is_pipe else None,
        host_timestep_fn=_HostTimestep(target) if is_pipe else None,
    )
    handle = AccelHandle(target, method, resolved_preset, cache_config, clock, token_order)
    try:
        for name, tr, family in families:
            attachment = _attach(name, tr, family, handle)
            if method is not None:
                tr.set_attn_processor(_build_processors(attachment, method))
            _install_extras(attachment, cache_config, orders[name], method)
            # enable_parallelism ran before apply: diffusers' split/gather hooks go back outside ours.
            follow_context_parallel(tr)
        if is_pipe:
            handle._pipeline_class = type(target)
            target.__dict__[_HANDLE_ATTR] = handle
            target.__class__ = _wrapped_pipeline_class(type(target))
        else:
            target.__dict__[_HANDLE_ATTR] = handle
    except Exception:
        handle.remove()
        raise
    logger.info("dit_accel applied: %s", {n: f.name for n, _, f in families} | {"method": repr(method), "token_order": orders})
    return handle


def remove(pipe_or_transformer: Any) -> None:
    """Undo ``apply`` / ``processors_for`` exactly: original processor objects, no hooks, original class.

    A no-op on an object dit-accel was never applied to.
    """
    target = pipe_or_transformer
    if target is None or not hasattr(target, "__dict__"):
        return
    handle = target.__dict__.get(_HANDLE_ATTR)
    if isinstance(handle, AccelHandle):
        handle.remove()
    if _is_pipeline(target):
        for _, tr in [(n, getattr(target, n, None)) for n in TRANSFORMER_ATTRS]:
            if tr is not None:
                remove(tr)
    elif isinstance(target, torch.nn.Module):
        attachment = target.__dict__.get(_ATTACHMENT_ATTR)
        if attachment is not None:
            owner = attachment.handle
            _detach(attachment)
            if owner.target is target:
                owner.remove()


def get_handle(pipe_or_transformer: Any) -> AccelHandle | None:
    """The active handle of a pipeline or transformer (``None`` if dit-accel is not applied)."""
    target = pipe_or_transformer
    if isinstance(target, torch.nn.Module):
        attachment = target.__dict__.get(_ATTACHMENT_ATTR)
        if attachment is not None:
            return attachment.handle
    handle = getattr(target, "__dict__", {}).get(_HANDLE_ATTR)
    return handle if isinstance(handle, AccelHandle) else None


def processors_for(transformer: torch.nn.Module, method: str | AttentionMethod = "dense", **method_config: Any) -> dict[str, Any]:
    """Processors for ``transformer.set_attn_processor(...)``: ours on the family's attention modules,
    the current ones elsewhere (e.g. HunyuanVideo's text refiner).

    Attaches the context hook if the transformer has none yet (bare-transformer mode: steps are
    counted from timesteps, guidance branches from call order); ``dit_accel.remove(transformer)``
    undoes it and restores the processors the transformer had at that moment. The token order is
    ``"call"`` here (the permutation folded into each attention call); ``apply`` installs ``"forward"``.
    The processors hold nothing per module: this call attaches an attention site (layer, ``method``, context)
    to each of the family's modules, which is what they read.
    """
    family = detect_family(transformer)
    resolved = get_method(method, **method_config)
    check_context_parallel(transformer)
    attachment = transformer.__dict__.get(_ATTACHMENT_ATTR)
    if attachment is None:
        handle = AccelHandle(transformer, resolved, None, None, StepClock())
        transformer.__dict__[_HANDLE_ATTR] = handle
        attachment = _attach("transformer", transformer, family, handle)
    return _build_processors(attachment, resolved)
