"""The configurations the benchmark times on every model, in priority order, and how each is switched on and off.

Keys (stable; the report's ``runs`` are keyed by them):

- ``stock``: the pipeline as built, diffusers' default attention (torch SDPA with its own backend choice);
- ``stock_cudnn``: the same with cuDNN SDPA first (``sdpa_kernel([cuDNN, flash, efficient, math],
  set_priority=True)`` around the call: every family's SDPA call, dispatcher or direct, falls back to the next
  backend only when cuDNN cannot take a call, e.g. one with a mask). On a CPU there is no cuDNN: same as stock;
- ``<preset>`` for each shipped preset (``dit_accel.presets.preset_names()``): ``dit_accel.apply(pipe, preset=...)``;
- ``<preset>.attention`` / ``<preset>.cache``: the preset's attention method alone / its cache alone (only for
  presets that have both; a preset with only one part *is* that part, recorded as ``same_as``);
- ``<preset>.attention.fp8``: the preset's sparse attention method alone with the 8-bit kernel (optional: the
  budget drops it before the required runs; where the device has no FP8 tensor cores it runs bf16 and the
  run's statistics say why);
- peers: ``fbc``, ``magcache``, ``taylorseer`` (diffusers), ``dbcache`` (cache-dit, when it imports), all tuned to
  the compute fraction our ``<peer preset>.cache`` run measured (see :mod:`dit_accel.bench.peers`);
  ``flex.<preset>``: the preset's attention method with its masks run by FlexAttention; ``sage``: SageAttention
  (when it imports; CUDA);
- ``<key>+compile``: with ``--compile``, each of the above with the transformer's blocks compiled
  (``compile_repeated_blocks(fullgraph=False)``, or each block's ``compile()`` for classes that list no repeated
  blocks).

Identical configurations (e.g. two presets sharing a cache) run once; the others record ``same_as``.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from dit_accel.bench import peers as P

STOCK = "stock"
STOCK_CUDNN = "stock_cudnn"

SPARSE_METHODS_WITH_PRECISION = ("draft", "permuted", "temporal_skip", "combo")
"""Methods whose block-sparse kernel takes ``precision="fp8"`` (their ``<preset>.attention.fp8`` runs)."""

KINDS = ("stock", "preset", "attention_part", "cache_part", "cache_peer", "attention_peer")
"""Run kinds, as recorded in the report."""


@dataclass
class Active:
    """A configuration switched on for one generation."""

    handle: Any = None
    """The dit-accel handle (``None`` for stock and peers that do not use dit-accel)."""
    call_context: Callable[[], Any] | None = None
    """Context-manager factory entered around the pipeline call."""
    closers: list[Callable[[], None]] = field(default_factory=list)
    """Undo steps, run in reverse order by :meth:`close`."""
    counters: dict[str, Callable[[], int]] = field(default_factory=dict)
    """Call counters read after the generation (``flex_calls``, ``sage_calls``, ...)."""

    def close(self) -> None:
        """Switch the configuration off again."""
        while self.closers:
            self.closers.pop()()


@dataclass
class ModelContext:
    """What runs need from the model under test, plus calibrations shared between runs."""

    pipe: Any
    """The pipeline."""
    spec: Any
    """Its :class:`dit_accel.bench.models.ModelSpec`."""
    steps: int
    """Denoising steps of every generation."""
    call_kwargs: dict[str, Any]
    """The pipeline call's arguments (for calibration generations)."""
    device: torch.device
    """Where it runs."""
    peer_preset: str
    """Preset whose cache sets the peers' target compute fraction and guard rails."""
    built_layers: int = 0
    """Blocks built (over all block lists)."""
    full_layers: int = 0
    """Blocks of the published model."""
    min_seq_len: int | None = None
    """Overrides the sparse methods' ``min_seq_len`` (the tiny CPU run: 0, so its short sequences go sparse)."""
    target_fraction: float | None = None
    """Compute fraction the cache peers are tuned to (measured on ``<peer_preset>.cache``)."""
    first_block_diffs: list[list[list[float]]] | None = None
    """Per branch, first-block residual changes recorded on the stock model (for the FirstBlockCache replay)."""
    magcache_ratios: list[float] | None = None
    """MagCache's calibrated magnitude ratios (one generation, on first use)."""
    notes: dict[str, Any] = field(default_factory=dict)
    """Facts recorded per run key while activating (thresholds, intervals, replayed shares)."""

    @property
    def transformer(self) -> torch.nn.Module:
        """The pipeline's transformer."""
        return self.pipe.transformer

    def guard(self) -> dict[str, int]:
        """Warm-up steps and cap on consecutive reuse of the peer preset's cache (defaults 2 and 3)."""
        from dit_accel.presets import get_preset

        cfg = dict(get_preset(self.peer_preset).cache_config)
        return {"warmup_steps": int(cfg.get("warmup_steps", 2)), "max_consecutive_reuse": int(cfg.get("max_consecutive_reuse", 3))}


@dataclass(frozen=True)
class RunSpec:
    """One configuration of the benchmark."""

    key: str
    """Stable key in the report."""
    kind: str
    """One of :data:`KINDS`."""
    description: str
    """One line for the report."""
    activate: Callable[[ModelContext], Active]
    """Switch it on (raises on failure; the runner records the error)."""
    preset: str | None = None
    """The preset it belongs to (presets and their parts), else ``None``."""
    signature: tuple | None = None
    """Identical configurations share a signature (only the first one runs)."""
    needs: tuple[str, ...] = ()
    """Modules that must import (optional peers)."""
    needs_cuda: bool = False
    """Runs only on CUDA."""
    required: bool = True
    """Part of the benchmark's required table (optional peers: ``False``); the budget drops optional runs first."""
    compiled: bool = False
    """Blocks compiled (``--compile`` variants)."""
    extra_generations: int = 0
    """Generations it needs besides its timed ones (calibration)."""
    runs_last: bool = False
    """Its teardown does not restore the model in full, so its generations run after every other configuration's
    on that model (cache-dit 1.5.3: after ``disable_cache`` our cache and FirstBlockCache fail on HunyuanVideo)."""


# --- ours ---------------------------------------------------------------------------------------------------------
def _freeze(value: Any) -> Any:
    if isinstance(value, dict) or hasattr(value, "items"):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def depth_scaled_method(ctx: ModelContext, key: str, name: str, config: dict[str, Any]) -> Any:
    """The attention method ``name(**config)``, its dense-first-layers valve scaled to the built depth.

    The sparse methods run their first ``dense_first_layers`` self-attention layers dense (1 of 30 at Wan2.1-1.3B's
    published depth). A model built with fewer blocks stands for the published one layer for layer, so the valve
    is scaled with it (``round(k x built / published)``, usually 0): otherwise a 2-block model would run half its
    layers dense where the published model runs 1/30. The change is recorded in ``ctx.notes[key]``.
    """
    import dit_accel

    options = dit_accel.get_method(name, **config).config()
    config = dict(config)
    k = options.get("dense_first_layers")
    if k is not None and ctx.full_layers and ctx.built_layers < ctx.full_layers:
        scaled = round(k * ctx.built_layers / ctx.full_layers)
        if scaled != k:
            config["dense_first_layers"] = scaled
            ctx.notes.setdefault(key, {})["dense_first_layers"] = (
                f"{k} -> {scaled}: scaled to the built depth ({ctx.built_layers} of {ctx.full_layers} blocks)")
    if ctx.min_seq_len is not None and "min_seq_len" in options and options["min_seq_len"] != ctx.min_seq_len:
        config["min_seq_len"] = ctx.min_seq_len
        ctx.notes.setdefault(key, {})["min_seq_len"] = f"{options['min_seq_len']} -> {ctx.min_seq_len} (tiny run)"
    return dit_accel.get_method(name, **config)


def _accel(key: str, preset: str | None = None, attention: tuple[str, dict] | None = None,
           cache: tuple[str, dict] | None = None) -> Callable[[ModelContext], Active]:
    def activate(ctx: ModelContext) -> Active:
        import dit_accel
        from dit_accel.caching import make_cache_config
        from dit_accel.presets import get_preset

        method = None
        if attention is not None:
            method = depth_scaled_method(ctx, key, attention[0], attention[1])
        elif preset is not None and get_preset(preset).attention is not None:
            p = get_preset(preset)
            method = depth_scaled_method(ctx, key, p.attention, dict(p.attention_config))
        cache_cfg = None if cache is None else make_cache_config(cache[0], **cache[1])
        handle = dit_accel.apply(ctx.pipe, preset=preset, attention=method, cache=cache_cfg)
        return Active(handle=handle, closers=[lambda: dit_accel.remove(ctx.pipe)])

    return activate


def _stock(cudnn: bool) -> Callable[[ModelContext], Active]:
    def activate(ctx: ModelContext) -> Active:
        if not cudnn:
            return Active()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        return Active(call_context=lambda: sdpa_kernel(order, set_priority=True))

    return activate


# --- peers --------------------------------------------------------------------------------------------------------
def _target(ctx: ModelContext) -> float:
    if ctx.target_fraction is None:
        raise RuntimeError(f"no target compute fraction: the '{ctx.peer_preset}.cache' run did not measure one")
    return ctx.target_fraction


def _need_two_blocks(ctx: ModelContext, what: str) -> None:
    if ctx.built_layers < 2:
        raise RuntimeError(f"{what} always computes the first block and caches the others: it needs >= 2 blocks, "
                           f"this model is built with {ctx.built_layers} (measure it with --layers 2 --models {ctx.spec.name})")


def _diffusers_cache(name: str) -> Callable[[ModelContext], Active]:
    def activate(ctx: ModelContext) -> Active:
        from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

        target, guard, steps = _target(ctx), ctx.guard(), ctx.steps
        note: dict[str, Any] = {"target_fraction": target}
        if name == "fbc":
            _need_two_blocks(ctx, "FirstBlockCache")
            if ctx.first_block_diffs is None:
                raise RuntimeError("no first-block residuals were recorded on the stock model")
            threshold, share = P.fit_first_block_threshold(ctx.first_block_diffs, target)
            config: Any = FirstBlockCacheConfig(threshold=threshold)
            note.update(threshold=threshold, replayed_step_share=share)
        elif name == "magcache":
            if ctx.magcache_ratios is None:
                ctx.magcache_ratios = _calibrate_magcache(ctx)
            retention = guard["warmup_steps"] / steps
            threshold, share = P.fit_magcache_threshold(ctx.magcache_ratios, target, retention, guard["max_consecutive_reuse"])
            config = MagCacheConfig(threshold=threshold, max_skip_steps=guard["max_consecutive_reuse"], retention_ratio=retention,
                                    num_inference_steps=steps, mag_ratios=list(ctx.magcache_ratios))
            note.update(threshold=threshold, replayed_step_share=share, mag_ratios=[round(r, 5) for r in ctx.magcache_ratios],
                        retention_ratio=retention, max_skip_steps=guard["max_consecutive_reuse"])
        else:
            interval, share = P.fit_taylorseer_interval(steps, target, guard["warmup_steps"])
            config = TaylorSeerCacheConfig(cache_interval=interval, disable_cache_before_step=guard["warmup_steps"],
                                           max_order=1, use_lite_mode=True, taylor_factors_dtype=None)
            note.update(cache_interval=interval, disable_cache_before_step=guard["warmup_steps"], step_share=share,
                        mode="lite (blocks skipped, output projection forecast, order 1)")
        ctx.notes[name] = note
        transformer = ctx.transformer
        P.apply_diffusers_cache(transformer, config)
        return Active(call_context=lambda: P.default_cache_context(transformer),
                      closers=[lambda: P.remove_diffusers_cache(transformer)])

    return activate


def _calibrate_magcache(ctx: ModelContext) -> list[float]:
    """One generation with diffusers' MagCache calibration; the ratios averaged over guidance branches."""
    from diffusers import MagCacheConfig

    transformer = ctx.transformer
    P.apply_diffusers_cache(transformer, MagCacheConfig(calibrate=True, num_inference_steps=ctx.steps))
    try:
        with P.capture_magcache_ratios() as found, P.default_cache_context(transformer), torch.inference_mode():
            ctx.pipe(**ctx.call_kwargs, generator=torch.Generator().manual_seed(0))
    finally:
        P.remove_diffusers_cache(transformer)
    if not found:
        raise RuntimeError("diffusers' MagCache calibration logged no ratios")
    return [sum(col) / len(col) for col in zip(*found)]


def _dbcache(ctx: ModelContext) -> Active:
    import cache_dit

    _need_two_blocks(ctx, "DBCache F1B0")
    if ctx.first_block_diffs is None:
        raise RuntimeError("no first-block residuals were recorded on the stock model")
    target, guard = _target(ctx), ctx.guard()
    threshold, share = P.fit_first_block_threshold(ctx.first_block_diffs, target)
    config = cache_dit.DBCacheConfig(
        Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=threshold,
        max_warmup_steps=guard["warmup_steps"], max_continuous_cached_steps=guard["max_consecutive_reuse"],
        max_cached_steps=-1, num_inference_steps=ctx.steps,
    )
    ctx.notes["dbcache"] = {"target_fraction": target, "threshold": threshold, "replayed_step_share_fbc_rule": share,
                            "Fn_compute_blocks": 1, "Bn_compute_blocks": 0, **guard}
    saved = _instance_forwards(ctx.transformer)
    with quiet_cache_dit():
        cache_dit.enable_cache(ctx.pipe, cache_config=config)

    def close() -> None:
        with quiet_cache_dit():
            cache_dit.disable_cache(ctx.pipe)
        left = _restore_instance_forwards(ctx.transformer, saved)
        if left:
            # cache-dit 1.5.3's disable_cache leaves its forward on some transformers (HunyuanVideo): the next
            # configuration would run through it, so the bench puts the original back and says so
            ctx.notes.setdefault("dbcache", {})["restored_after_disable_cache"] = left

    return Active(closers=[close])


_MISSING = object()


def _instance_forwards(root: torch.nn.Module) -> dict[str, Any]:
    """Every module's instance-level ``forward`` attribute (``_MISSING`` where the class method is used)."""
    return {name: m.__dict__.get("forward", _MISSING) for name, m in root.named_modules()}


def _restore_instance_forwards(root: torch.nn.Module, saved: dict[str, Any]) -> list[str]:
    """Put back the saved instance ``forward`` attributes; returns the modules that needed it."""
    changed = []
    for name, m in root.named_modules():
        before = saved.get(name, _MISSING)
        if m.__dict__.get("forward", _MISSING) is not before:
            changed.append(name or type(root).__name__)
            if before is _MISSING:
                m.__dict__.pop("forward", None)
            else:
                m.__dict__["forward"] = before
    return changed


@contextlib.contextmanager
def quiet_cache_dit() -> Iterator[None]:
    """cache-dit prints and logs at INFO on every enable/disable: keep the bench's output readable."""
    import logging

    names = ["CACHE_DIT"] + [n for n in list(logging.root.manager.loggerDict) if n.upper().startswith("CACHE_DIT")]
    loggers = [logging.getLogger(n) for n in dict.fromkeys(names)]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _flex(preset: str) -> Callable[[ModelContext], Active]:
    def activate(ctx: ModelContext) -> Active:
        import dit_accel
        from dit_accel.presets import get_preset

        from dit_accel.bench.timing import patched

        p = get_preset(preset)
        method = depth_scaled_method(ctx, f"flex.{preset}", p.attention, dict(p.attention_config))
        if method.needs_tile_stats:
            raise RuntimeError(f"preset {preset!r}'s method asks for tile statistics, which FlexAttention does not give")
        handle = dit_accel.apply(ctx.pipe, attention=method)
        import dit_accel.kernels

        kernel = P.FlexKernel(reference=dit_accel.kernels.block_sparse_attention)
        stack = contextlib.ExitStack()
        stack.enter_context(patched("dit_accel.kernels", "block_sparse_attention", kernel))
        return Active(handle=handle, closers=[lambda: dit_accel.remove(ctx.pipe), stack.close],
                      counters={"flex_calls": lambda: kernel.calls,
                                "flex_max_abs_diff_vs_kernel": lambda: max(kernel.check_errors, default=None)})

    return activate


def _sage(ctx: ModelContext) -> Active:
    from dit_accel.bench.timing import patched

    stack = contextlib.ExitStack()
    sage = P.SageSDPA(torch.nn.functional.scaled_dot_product_attention)
    stack.enter_context(patched("torch.nn.functional", "scaled_dot_product_attention", sage))
    return Active(closers=[stack.close], counters={"sage_calls": lambda: sage.sage_calls, "sdpa_calls": lambda: sage.sdpa_calls})


# --- compile -----------------------------------------------------------------------------------------------------
@dataclass
class CompiledBlocks:
    """The transformer's blocks compiled once, switched on and off by swapping each block's compiled call."""

    transformer: torch.nn.Module
    """The transformer."""
    backend: str
    """``torch.compile`` backend (``inductor`` on CUDA; ``eager`` keeps CPU runs cheap while exercising dynamo)."""
    how: str = ""
    """``compile_repeated_blocks`` or ``per-block compile()``."""
    _compiled: dict[int, Any] = field(default_factory=dict)

    def _blocks(self) -> list[torch.nn.Module]:
        from dit_accel.caching import find_blocks

        return [ref.module for ref in find_blocks(self.transformer)]

    def on(self) -> None:
        """Compile on first use; afterwards restore the compiled calls."""
        if not self._compiled:
            if getattr(type(self.transformer), "_repeated_blocks", None):
                self.transformer.compile_repeated_blocks(fullgraph=False, backend=self.backend)
                self.how = "compile_repeated_blocks(fullgraph=False)"
            else:
                for block in self._blocks():
                    block.compile(fullgraph=False, backend=self.backend)
                self.how = "per-block compile(fullgraph=False) (the class lists no _repeated_blocks)"
            # compile_repeated_blocks also compiles listed non-block modules (e.g. HunyuanVideo's refiner)
            for module in self.transformer.modules():
                impl = getattr(module, "_compiled_call_impl", None)
                if impl is not None:
                    self._compiled[id(module)] = impl
            return
        for module in self.transformer.modules():
            if id(module) in self._compiled:
                module._compiled_call_impl = self._compiled[id(module)]

    def off(self) -> None:
        """Back to the eager calls."""
        for module in self.transformer.modules():
            if id(module) in self._compiled:
                module._compiled_call_impl = None


def _compiled(run: RunSpec, blocks_for: Callable[[ModelContext], CompiledBlocks]) -> RunSpec:
    def activate(ctx: ModelContext) -> Active:
        blocks = blocks_for(ctx)
        blocks.on()
        try:
            active = run.activate(ctx)
        except Exception:
            blocks.off()
            raise
        active.closers.insert(0, blocks.off)
        ctx.notes[run.key + "+compile"] = {"compile": blocks.how, "backend": blocks.backend}
        return active

    return RunSpec(key=run.key + "+compile", kind=run.kind, description=run.description + ", blocks compiled",
                   activate=activate, preset=run.preset, signature=None if run.signature is None else ("compile", run.signature),
                   needs=run.needs, needs_cuda=run.needs_cuda, required=False, compiled=True,
                   extra_generations=run.extra_generations, runs_last=run.runs_last)


# --- the list -----------------------------------------------------------------------------------------------------
def plan_runs(*, peer_preset: str = "balanced", flex_preset: str = "balanced", compile_backend: str | None = None,
              compiled_blocks: Callable[[ModelContext], CompiledBlocks] | None = None) -> list[RunSpec]:
    """Every configuration in priority order (see the module docstring); ``compile_backend`` adds the compiled
    variants (``compiled_blocks`` gives the model's :class:`CompiledBlocks`)."""
    from dit_accel.presets import get_preset, preset_names

    names = preset_names()
    for option, value in (("peer preset", peer_preset), ("flex preset", flex_preset)):
        if value not in names:
            raise ValueError(f"unknown {option} {value!r}; shipped presets: {names}")
    if get_preset(peer_preset).cache is None:
        raise ValueError(f"peer preset {peer_preset!r} has no cache; choose one of "
                         f"{[n for n in names if get_preset(n).cache is not None]}")
    if get_preset(flex_preset).attention in (None, "dense"):
        raise ValueError(f"flex preset {flex_preset!r} has no sparse attention method")
    runs: list[RunSpec] = [
        RunSpec(STOCK, "stock", "the pipeline as built, diffusers' default attention", _stock(False), signature=("stock",)),
        RunSpec(STOCK_CUDNN, "stock", "stock with cuDNN SDPA first (falls back per call only where cuDNN cannot run)",
                _stock(True), signature=("stock_cudnn",)),
    ]
    parts: list[RunSpec] = []
    for name in names:
        p = get_preset(name)
        attention = None if p.attention is None else (p.attention, dict(p.attention_config))
        cache = None if p.cache is None else (p.cache, dict(p.cache_config))
        runs.append(RunSpec(name, "preset", f"preset {p.tag}: attention {p.attention}, cache {p.cache}",
                            _accel(name, preset=name), preset=name, signature=("accel", _freeze(attention), _freeze(cache))))
        if attention is not None:
            parts.append(RunSpec(f"{name}.attention", "attention_part", f"{p.tag}'s attention ({p.attention}) alone",
                                 _accel(f"{name}.attention", attention=attention), preset=name, signature=("accel", _freeze(attention), None)))
            if p.attention in SPARSE_METHODS_WITH_PRECISION:
                fp8 = (p.attention, dict(p.attention_config, precision="fp8"))
                parts.append(RunSpec(f"{name}.attention.fp8", "attention_part",
                                     f"{p.tag}'s attention ({p.attention}) alone, 8-bit kernel (precision fp8)",
                                     _accel(f"{name}.attention.fp8", attention=fp8), preset=name,
                                     signature=("accel", _freeze(fp8), None), required=False))
        if cache is not None:
            parts.append(RunSpec(f"{name}.cache", "cache_part", f"{p.tag}'s cache ({p.cache}) alone",
                                 _accel(f"{name}.cache", cache=cache), preset=name, signature=("accel", None, _freeze(cache))))
    # the peer preset's cache part first: the cache peers are tuned to the fraction it measures
    parts.sort(key=lambda r: r.key != f"{peer_preset}.cache")
    runs += parts
    runs += [
        RunSpec("fbc", "cache_peer", "diffusers FirstBlockCache at our cache's compute fraction", _diffusers_cache("fbc")),
        RunSpec("magcache", "cache_peer", "diffusers MagCache (calibrated) at our cache's compute fraction",
                _diffusers_cache("magcache"), extra_generations=1),
        RunSpec(f"flex.{flex_preset}", "attention_peer", f"{flex_preset}'s attention method, its masks run by FlexAttention",
                _flex(flex_preset), preset=flex_preset),
        RunSpec("taylorseer", "cache_peer", "diffusers TaylorSeer (lite, order 1) at our cache's compute fraction",
                _diffusers_cache("taylorseer"), required=False),
        RunSpec("dbcache", "cache_peer", "cache-dit DBCache F1B0 at our cache's compute fraction", _dbcache,
                needs=("cache_dit",), required=False, runs_last=True),
        RunSpec("sage", "attention_peer", "SageAttention (INT8 QK) for every SDPA call it takes", _sage,
                needs=("sageattention",), needs_cuda=True, required=False),
    ]
    if compile_backend is not None and compiled_blocks is not None:
        runs += [_compiled(r, compiled_blocks) for r in list(runs)]
    return runs


def dedupe(runs: list[RunSpec]) -> dict[str, str]:
    """``{key: key of the identical run that runs instead}`` for runs whose signature repeats an earlier one."""
    first: dict[tuple, str] = {}
    same: dict[str, str] = {}
    for r in runs:
        if r.signature is None:
            continue
        if r.signature in first:
            same[r.key] = first[r.signature]
        else:
            first[r.signature] = r.key
    return same


def missing_modules(run: RunSpec) -> list[str]:
    """The modules a run needs that do not import here (with the error)."""
    missing = []
    for name in run.needs:
        try:
            __import__(name)
        except Exception as exc:  # an optional peer: any import failure means "not available"
            missing.append(f"{name} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
    return missing


@contextlib.contextmanager
def activated(run: RunSpec, ctx: ModelContext) -> Iterator[Active]:
    """``run`` switched on for the block, off afterwards (also when the generation raises)."""
    active = run.activate(ctx)
    try:
        yield active
    finally:
        active.close()
