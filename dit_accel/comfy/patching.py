"""How dit-accel is installed on a ComfyUI ``ModelPatcher``: only through ComfyUI's patching API.

:func:`install` clones the patcher (the input is never changed) and, on the clone only, adds:

* ``transformer_options["dit_accel"]``: the :class:`~dit_accel.comfy.bridge.AccelConfig` (immutable);
* ``transformer_options["optimized_attention_override"]``: an :class:`AttentionOverride` that routes the
  visual self-attention calls to dit_accel's router and hands every other call to the override that
  was there before (chained) or to ComfyUI's own attention function;
* an ``OUTER_SAMPLE`` wrapper that gives every sampling run a fresh :class:`Run` (step clock, method
  state, cache) and drops it afterwards, and an ``APPLY_MODEL`` wrapper that tells the run, before each
  model call, the step (from ComfyUI's ``sample_sigmas`` and ``sigmas``), the guidance branch of each
  batch row (from ``cond_or_uncond``) and the token grid (from the latent's shape);
* with a feature cache, a :class:`BlockPatch` per transformer block in ``patches_replace["dit"]``
  (chaining any block patch already there) that runs or skips the block by the cache's decision.

Nothing is written to the torch modules, so the unpatched ``ModelPatcher`` (the node's input, or the
model with the node removed) runs exactly as before. Applying a second dit-accel node to a patched model
replaces the part it configures (attention or cache) and keeps the other.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable

import torch

from dit_accel.comfy import bridge
from dit_accel.comfy.adapters import Adapter, BlockKey, ForwardInfo, adapter_for

logger = logging.getLogger("dit_accel")

CONFIG_KEY = "dit_accel"
"""``transformer_options`` key of the installed :class:`~dit_accel.comfy.bridge.AccelConfig`."""
RUN_KEY = "dit_accel_run"
"""``transformer_options`` key of the current sampling run's :class:`Run` (only during sampling)."""
WRAPPER_KEY = "dit_accel"
"""Key of our wrappers in the ModelPatcher's wrapper registry."""
OVERRIDE_KEY = "optimized_attention_override"
"""ComfyUI's ``transformer_options`` key for a replacement of ``optimized_attention``."""
OUTER_SAMPLE = "outer_sample"
"""``comfy.patcher_extension.WrappersMP.OUTER_SAMPLE``: wraps one whole sampling run."""
APPLY_MODEL = "apply_model"
"""``comfy.patcher_extension.WrappersMP.APPLY_MODEL``: wraps each model call."""
BRANCH_OF_COND_INDEX = {0: "cond", 1: "uncond"}
"""ComfyUI's ``cond_or_uncond`` values (index into ``[positive, negative]``) as dit_accel branch labels;
other indices (extra conds of custom guiders) are ``"extra"``."""

_MISSING = object()


# --- per sampling run ----------------------------------------------------------------------------
class Run:
    """State of one sampling run of a dit-accel patched model (created by the ``OUTER_SAMPLE`` wrapper)."""

    def __init__(self, config: bridge.AccelConfig, adapter: Adapter, diffusion_model: torch.nn.Module) -> None:
        self.config = config
        self.adapter = adapter
        self.diffusion_model = diffusion_model
        self.sampling = bridge.SamplingRun(diffusion_model, adapter.name)
        blocks = adapter.block_keys(diffusion_model)
        self.block_index: dict[BlockKey, int] = {key: i for i, (key, _) in enumerate(blocks)}
        self.cache = None
        if config.cache is not None:
            self.cache = bridge.CacheRunner(self.sampling, config.cache,
                                            [(f"{key[0]}.{key[1]}", module) for key, module in blocks])
        self.forward: ForwardInfo | None = None
        self.forwards = 0
        self.override_calls = 0
        self.stream_text_len = 0
        self._layer = 0
        self._first_layer: dict[int, int] = {}
        self._sigmas_source: Any = None
        self._sigmas: list[float] = []

    # --- per model call --------------------------------------------------------------------------
    def begin_forward(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor | None,
                      extra: dict[str, Any], transformer_options: dict[str, Any]) -> None:
        """tell the sampling run which step, branches and grid the coming model call has."""
        info = self.adapter.read_forward(self.diffusion_model, x, context, extra)
        step, num_steps, step_sigma = self._step(sigma, transformer_options)
        self.forward = info
        self.forwards += 1
        self._layer = 0
        self.stream_text_len = info.text_tokens
        self.sampling.begin_forward(step=step, num_steps=num_steps, step_sigma=step_sigma,
                                   branches=branches_of(transformer_options.get("cond_or_uncond"), info.batch),
                                   grid=info.grid, patch_size=info.patch_size, text_tokens=info.text_tokens)

    def _step(self, sigma: torch.Tensor, transformer_options: dict[str, Any]) -> tuple[int, int | None, float]:
        """Step index, step count and the step's scheduled sigma: the last scheduled sigma at or above
        the current one (one host sync per call for the current sigma; the schedule is read once)."""
        current = float(sigma.detach().float().max()) if isinstance(sigma, torch.Tensor) else float(sigma)
        schedule = transformer_options.get("sample_sigmas")
        if schedule is not self._sigmas_source:
            self._sigmas_source = schedule
            self._sigmas = [] if schedule is None else [float(s) for s in torch.as_tensor(schedule).float().flatten().tolist()]
        sigmas = self._sigmas
        if len(sigmas) < 2:
            return max(self.forwards - 1, 0), None, current
        step = 0
        for i in range(len(sigmas) - 1):
            if sigmas[i] >= current - 1e-6 * max(1.0, abs(current)):
                step = i
        return step, len(sigmas) - 1, sigmas[step]

    def enter_block(self, index: int) -> None:
        """Block ``index`` starts: its first attention layer index is the one it had in a full forward."""
        if index in self._first_layer:
            self._layer = self._first_layer[index]
        else:
            self._first_layer[index] = self._layer

    # --- attention ------------------------------------------------------------------------------
    def attention(self, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
        """The output of one ``optimized_attention`` call through dit_accel, or ``None`` to leave it to ComfyUI."""
        method = self.config.method
        info = self.forward
        if method is None or info is None or bridge.is_host_dense(method):
            return None
        q, k, v = args[0], args[1], args[2]
        heads = _arg(args, kwargs, 3, "heads", None)
        mask = _arg(args, kwargs, 4, "mask", None)
        skip_reshape = bool(_arg(args, kwargs, 6, "skip_reshape", False))
        skip_output_reshape = bool(_arg(args, kwargs, 7, "skip_output_reshape", False))
        if mask is not None or heads is None:
            return None
        seq_dim = 2 if skip_reshape else 1
        kind = self.adapter.self_attention(info, q.shape[seq_dim], k.shape[seq_dim])
        if kind is None:
            return None
        self.override_calls += 1
        layer = self._layer
        self._layer += 1
        if skip_reshape:
            q4, k4, v4 = q, k, v
        else:
            b, s, inner = q.shape
            q4, k4, v4 = (t.view(b, -1, heads, inner // heads).transpose(1, 2) for t in (q, k, v))
        out = self.sampling.attend_self(method, layer, q4, k4, v4, text_tokens=kind[0], text_position=kind[1])
        if skip_output_reshape:
            return out
        return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)

    # --- feature cache ------------------------------------------------------------------------
    def run_block(self, key: BlockKey, args: dict[str, Any], call: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
        """Block ``key`` through the cache: run it (``call``) or skip it."""
        index = self.block_index[key]
        self.enter_block(index)
        if self.cache is None:
            return call(args)
        adapter = self.adapter
        if "txt" in args and args["txt"] is not None and key[0] != adapter.single_stream:
            self.stream_text_len = args["txt"].shape[1]
        text_len = self.stream_text_len
        hidden, text = adapter.streams(key, args, text_len)

        def compute(h: torch.Tensor, t: torch.Tensor | None) -> bridge.Streams:
            out = call(adapter.with_streams(key, args, h, t))
            return adapter.output_streams(key, out, text_len)

        hidden, text = self.cache.run_block(index, hidden, text, compute)
        return adapter.pack(key, hidden, text)

    # --- end -------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """What this run did: model calls, attention totals, cache totals."""
        out: dict[str, Any] = {"config": self.config.label, "family": self.adapter.name, "model_calls": self.forwards}
        if self.config.method is not None:
            out["attention"] = self.config.method.name
            out.update(self.sampling.attention_summary())
        if self.cache is not None:
            out["cache"] = self.cache.summary()
        return out

    def close(self) -> None:
        """Drop every tensor this run kept."""
        if self.cache is not None:
            self.cache.close()
        self.sampling.close()


def _arg(args: tuple, kwargs: dict[str, Any], index: int, name: str, default: Any) -> Any:
    """Argument ``name`` of ComfyUI's ``attention_*(q, k, v, heads, mask=None, attn_precision=None,
    skip_reshape=False, skip_output_reshape=False, **kwargs)``, given by position or keyword."""
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


def branches_of(cond_or_uncond: list[int] | None, batch: int) -> tuple[str, ...]:
    """Branch label of every batch row: ComfyUI concatenates equal-size chunks, one per ``cond_or_uncond``
    entry (0 = positive -> ``"cond"``, 1 = negative -> ``"uncond"``)."""
    if not cond_or_uncond or batch % len(cond_or_uncond):
        return ("cond",) * batch
    per = batch // len(cond_or_uncond)
    return tuple(BRANCH_OF_COND_INDEX.get(int(c), "extra") for c in cond_or_uncond for _ in range(per))


def _run_of(transformer_options: Any) -> Run | None:
    return transformer_options.get(RUN_KEY) if isinstance(transformer_options, dict) else None


# --- the objects placed in transformer_options and wrapper lists -------------------------------
class AttentionOverride:
    """``optimized_attention_override``: dit_accel for the visual self-attention, the previous override
    (or ComfyUI's attention function ``func``) for every other call."""

    def __init__(self, previous: Callable[..., Any] | None) -> None:
        self.previous = previous
        """The override that was installed before ours, called for the calls we leave alone."""

    def __deepcopy__(self, memo: dict) -> "AttentionOverride":
        return self  # immutable; ComfyUI deep-copies model_options on every clone

    def __call__(self, func: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        run = _run_of(kwargs.get("transformer_options"))
        if run is not None:
            out = run.attention(args, kwargs)
            if out is not None:
                return out
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)


class BlockPatch:
    """``patches_replace["dit"][key]``: runs or skips one transformer block by the run's cache."""

    def __init__(self, key: BlockKey, previous: Callable[..., Any] | None) -> None:
        self.key = key
        self.previous = previous
        """A block patch that was installed before ours (called instead of the original block)."""

    def __deepcopy__(self, memo: dict) -> "BlockPatch":
        return self

    def __call__(self, args: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        original = extra["original_block"]
        previous = self.previous

        def call(a: dict[str, Any]) -> dict[str, Any]:
            return previous(a, extra) if previous is not None else original(a)

        run = _run_of(args.get("transformer_options"))
        if run is None or self.key not in run.block_index:
            return call(args)
        return run.run_block(self.key, args, call)


def outer_sample_wrapper(executor: Any, *args: Any, **kwargs: Any) -> Any:
    """``OUTER_SAMPLE`` wrapper: a fresh :class:`Run` for this sampling run, dropped afterwards."""
    guider = executor.class_obj
    options = guider.model_options.setdefault("transformer_options", {})
    config = options.get(CONFIG_KEY)
    if not isinstance(config, bridge.AccelConfig):
        return executor(*args, **kwargs)
    diffusion_model = guider.model_patcher.get_model_object("diffusion_model")
    run = Run(config, adapter_for(diffusion_model), diffusion_model)
    options[RUN_KEY] = run
    try:
        return executor(*args, **kwargs)
    finally:
        options.pop(RUN_KEY, None)
        summary = run.summary()
        if config.method is not None and not bridge.is_host_dense(config.method) and run.forwards and not run.override_calls:
            logger.warning("dit-accel: no attention call reached dit-accel's attention override in %d model calls; "
                           "this ComfyUI may predate transformer_options['optimized_attention_override']", run.forwards)
        logger.info("dit-accel run: %s", json.dumps(summary, default=str, sort_keys=True))
        run.close()


def apply_model_wrapper(executor: Any, *args: Any, **kwargs: Any) -> Any:
    """``APPLY_MODEL`` wrapper: ``(x, t, c_concat, c_crossattn, control, transformer_options, **extra)``;
    tells the run the step, branches and grid of this model call."""
    transformer_options = args[5] if len(args) > 5 else kwargs.get("transformer_options")
    run = _run_of(transformer_options)
    if run is not None:
        context = args[3] if len(args) > 3 else kwargs.get("c_crossattn")
        extra = {k: v for k, v in kwargs.items() if k != "transformer_options"}
        run.begin_forward(args[0], args[1], context, extra, transformer_options)
    return executor(*args, **kwargs)


# --- install -------------------------------------------------------------------------------------
def install(model: Any, *, method: Any = _MISSING, cache: Any = _MISSING, label: str) -> Any:
    """A clone of ComfyUI ModelPatcher ``model`` with dit-accel installed; ``model`` is not changed.

    ``method`` (an attention method or ``None``) and ``cache`` (a cache config or ``None``) replace the
    parts a previous dit-accel node installed; a part not given keeps its previous value. Raises
    :class:`~dit_accel.comfy.adapters.UnsupportedModel` for a model class without an adapter.
    """
    for name in ("clone", "add_wrapper_with_key", "get_wrappers", "set_model_patch_replace", "get_model_object"):
        if not hasattr(model, name):
            raise TypeError(f"dit-accel needs a ComfyUI ModelPatcher with {name}() (ComfyUI >= 0.3.50), got {type(model).__name__}")
    diffusion_model = model.get_model_object("diffusion_model")
    adapter = adapter_for(diffusion_model)
    patched = model.clone()
    options = patched.model_options.setdefault("transformer_options", {})
    previous = options.get(CONFIG_KEY)
    old_method = previous.method if isinstance(previous, bridge.AccelConfig) else None
    old_cache = previous.cache if isinstance(previous, bridge.AccelConfig) else None
    new_method = old_method if method is _MISSING else method
    new_cache = old_cache if cache is _MISSING else cache
    labels = [previous.label] if isinstance(previous, bridge.AccelConfig) else []
    options[CONFIG_KEY] = bridge.AccelConfig(new_method, new_cache, "; ".join(labels + [label]))
    if new_method is not None and not isinstance(options.get(OVERRIDE_KEY), AttentionOverride):
        options[OVERRIDE_KEY] = AttentionOverride(options.get(OVERRIDE_KEY))
    if not patched.get_wrappers(OUTER_SAMPLE, WRAPPER_KEY):
        patched.add_wrapper_with_key(OUTER_SAMPLE, WRAPPER_KEY, outer_sample_wrapper)
    if not patched.get_wrappers(APPLY_MODEL, WRAPPER_KEY):
        patched.add_wrapper_with_key(APPLY_MODEL, WRAPPER_KEY, apply_model_wrapper)
    if new_cache is not None:
        dit_patches = options.get("patches_replace", {}).get("dit", {})
        for key, _ in adapter.block_keys(diffusion_model):
            existing = dit_patches.get(key)
            if not isinstance(existing, BlockPatch):
                patched.set_model_patch_replace(BlockPatch(key, existing), "dit", key[0], key[1])
    logger.info("dit-accel: %s installed on %s (%s)", label, adapter.name, type(diffusion_model).__name__)
    return patched


def installed_config(model: Any) -> bridge.AccelConfig | None:
    """The dit-accel configuration installed on ComfyUI ModelPatcher ``model`` (``None`` if none)."""
    config = getattr(model, "model_options", {}).get("transformer_options", {}).get(CONFIG_KEY)
    return config if isinstance(config, bridge.AccelConfig) else None


__all__ = [
    "AttentionOverride",
    "BlockPatch",
    "Run",
    "apply_model_wrapper",
    "branches_of",
    "install",
    "installed_config",
    "outer_sample_wrapper",
]
