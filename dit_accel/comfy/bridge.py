"""The only module of :mod:`dit_accel.comfy` that reaches into dit_accel's internals.

The node pack drives dit_accel's attention methods and cache schedulers from ComfyUI's patching
hooks instead of diffusers hooks; everything it needs from the rest of dit_accel goes through the
small surface below, so that a change of dit_accel's internal layout is adapted here only:

* presets: ``dit_accel.presets.get_preset`` / ``preset_names``;
* attention: ``dit_accel.attention.registry.get_method`` / ``available_methods``,
  ``dit_accel.attention.quality.QUALITY_LEVELS`` (the quality knob's names),
  ``dit_accel.attention.route.attend`` with a ``ModuleBinding`` per self-attention layer;
* context: ``dit_accel.context.TransformerContext`` / ``StepClock`` / ``ForwardInputs`` (ComfyUI's
  sampler, not a diffusers pipeline, says which step and guidance branch runs);
* caching: ``dit_accel.caching.make_cache_config`` / ``available_schedulers`` / ``build_scheduler`` /
  ``load_schedule``, and the block runner ``dit_accel.caching.controller.CacheController`` (with one
  ``BlockRef`` per ComfyUI block), so that guardrails, per-branch state, residual reuse and forecasts
  are the same code as on diffusers.

Tensors cross this surface as ``(B, H, S, D)`` q/k/v (attention) and as ``(hidden, text)`` stream
pairs (cache blocks), whatever the ComfyUI model's own layout is: that conversion lives in
:mod:`dit_accel.comfy.adapters`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from dit_accel.attention.base import AttentionMethod
from dit_accel.attention.quality import QUALITY_LEVELS
from dit_accel.attention.registry import available_methods, get_method
from dit_accel.attention.route import ModuleBinding, attend
from dit_accel.caching import CacheConfig, available_schedulers, build_scheduler, load_schedule, make_cache_config
from dit_accel.caching.blocks import BlockRef
from dit_accel.caching.controller import CacheController
from dit_accel.context import ForwardInputs, StepClock, TransformerContext
from dit_accel.preset_file import PRESET_FILE_FORMAT, preset_of, validate_preset_data
from dit_accel.presets import get_preset, preset_names

logger = logging.getLogger("dit_accel")

__all__ = [
    "AccelConfig",
    "CacheRunner",
    "SamplingRun",
    "available_methods",
    "available_schedulers",
    "build_cache_config",
    "build_method",
    "method_options",
    "preset_names",
    "quality_levels",
    "resolve",
]

Streams = tuple[torch.Tensor, "torch.Tensor | None"]
"""A block's ``(hidden, text)`` streams; ``text`` is ``None`` for blocks without a text stream."""

PRESET_FILE_KEYS = ("attention", "attention_config", "cache", "cache_config")
"""Keys a preset file (or the Apply node's overrides) may set; the same fields as a shipped preset."""


@dataclass(frozen=True)
class AccelConfig:
    """What a node installs: an attention method and a cache config (either may be ``None``)."""

    method: AttentionMethod | None
    """Attention method for the self-attention calls; ``None`` leaves attention to ComfyUI."""
    cache: CacheConfig | None
    """Feature-cache config; ``None`` computes every block at every step."""
    label: str
    """Short description for logs, e.g. ``"preset balanced@3"``."""

    def __deepcopy__(self, memo: dict) -> "AccelConfig":
        # ComfyUI deep-copies model_options on every ModelPatcher.clone(); this object is immutable
        # configuration (methods keep no per-call state on themselves), so a clone may share it.
        return self


# --- configuration ------------------------------------------------------------------------------
def quality_levels() -> list[str]:
    """Names of the sparse methods' quality levels, closest to dense first."""
    return sorted(QUALITY_LEVELS, key=QUALITY_LEVELS.__getitem__, reverse=True)


def method_options(name: str) -> list[str]:
    """Option names the attention method ``name`` accepts (raises ``ValueError`` for an unknown name)."""
    return sorted(get_method(name).config())


def build_method(name: str, options: dict[str, Any]) -> AttentionMethod:
    """The attention method ``name`` with ``options`` (``ValueError`` names a bad name or option)."""
    return get_method(name, **options)


def build_cache_config(name: str, options: dict[str, Any]) -> CacheConfig:
    """The cache config of scheduler ``name`` with ``options``, checked for what ComfyUI supports."""
    config = make_cache_config(name, **options)
    if config.target != "span":
        raise ValueError(
            f"cache target {config.target!r} is not supported in ComfyUI (ComfyUI's output layer has no patch point); "
            "use target='span'"
        )
    if getattr(config, "selective_tokens", None):
        raise ValueError("selective_tokens is not supported in ComfyUI (blocks run through ComfyUI's block patches); set it to 0")
    return config


def _merge(base: dict[str, Any], update: dict[str, Any], source: str) -> dict[str, Any]:
    unknown = sorted(set(update) - set(PRESET_FILE_KEYS))
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown}; allowed keys: {list(PRESET_FILE_KEYS)}")
    out = dict(base)
    for key in ("attention", "cache"):
        if key in update:
            if update[key] != base.get(key):
                out[f"{key}_config"] = {}  # another method or scheduler: the preset's options do not apply
            out[key] = update[key]
    for key in ("attention_config", "cache_config"):
        if key in update:
            if not isinstance(update[key], dict):
                raise ValueError(f"{source}: {key!r} must be a JSON object, got {update[key]!r}")
            out[key] = {**out.get(key, {}), **update[key]}
    return out


def load_preset_file(path: str | Path) -> dict[str, Any]:
    """A preset file as ``{attention, attention_config, cache, cache_config}`` (missing keys absent).

    Three formats: a preset file written by ``dit-accel calibrate --target-psnr`` (``format:
    "dit-accel-preset"``: its settings; the model-configuration check of :func:`dit_accel.apply` compares
    diffusers configs, which ComfyUI's own model classes do not have, so it is logged, not enforced), a cache
    schedule written by ``dit-accel calibrate --budget`` (``format: "dit-accel-cache-schedule"``; it becomes
    ``cache="procache", cache_config={"schedule_file": path}``), or a JSON object with the keys of
    :data:`PRESET_FILE_KEYS`.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"preset file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if isinstance(data, dict) and data.get("format") == PRESET_FILE_FORMAT:
        preset = preset_of(validate_preset_data(data, str(path)), str(path))
        logger.warning("dit-accel: %s was calibrated on %s (config hash %s); ComfyUI models cannot be checked "
                       "against it", path, data["model"].get("id"), data["model"]["config_hash"])
        return {"attention": preset.attention, "attention_config": dict(preset.attention_config),
                "cache": preset.cache, "cache_config": dict(preset.cache_config)}
    if isinstance(data, dict) and data.get("format") == "dit-accel-cache-schedule":
        load_schedule(path)  # validates
        return {"cache": "procache", "cache_config": {"schedule_file": str(path)}}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return _merge({}, {k: v for k, v in data.items() if k not in ("name", "version", "description")}, str(path))


def resolve(preset: str | None, preset_file: str | None = None, overrides: dict[str, Any] | None = None) -> AccelConfig:
    """The method and cache config of a shipped preset, then a preset file, then ``overrides`` on top
    (each a dict with the keys of :data:`PRESET_FILE_KEYS`; a ``None`` method or scheduler turns that
    part off)."""
    parts: dict[str, Any] = {}
    label = []
    if preset:
        p = get_preset(preset)
        parts = {"attention": p.attention, "attention_config": dict(p.attention_config),
                 "cache": p.cache, "cache_config": dict(p.cache_config)}
        label.append(f"preset {p.tag}")
    if preset_file:
        parts = _merge(parts, load_preset_file(preset_file), str(preset_file))
        label.append(f"file {Path(preset_file).name}")
    if overrides:
        parts = _merge(parts, overrides, "overrides")
        label.append(f"overrides {json.dumps(overrides, sort_keys=True)}")
    method = None if parts.get("attention") is None else build_method(parts["attention"], parts.get("attention_config", {}))
    cache = None if parts.get("cache") is None else build_cache_config(parts["cache"], parts.get("cache_config", {}))
    return AccelConfig(method, cache, ", ".join(label) or "no acceleration")


def is_host_dense(method: AttentionMethod) -> bool:
    """True for the ``dense`` method: its calls are left to ComfyUI's own attention (bit-identical to no node)."""
    return method.name == "dense"


# --- per sampling run ---------------------------------------------------------------------------
class SamplingRun:
    """dit_accel's per-transformer context for one ComfyUI sampling run (one KSampler execution).

    ComfyUI says which step and branch runs (its sigmas and ``cond_or_uncond``); :meth:`begin_forward`
    hands that to the :class:`~dit_accel.context.TransformerContext` the attention methods and the
    cache read, so their per-step and per-branch state behaves as under a diffusers pipeline.
    """

    def __init__(self, diffusion_model: torch.nn.Module, family: str) -> None:
        self._num_steps: int | None = None
        self.clock = StepClock(pipeline_bound=True, num_steps_fn=lambda: self._num_steps)
        self.context = TransformerContext(diffusion_model, family, "diffusion_model", self.clock, "batched")
        self.clock.begin_call()
        self._bindings: dict[tuple[int, int], ModuleBinding] = {}

    def begin_forward(
        self,
        *,
        step: int,
        num_steps: int | None,
        step_sigma: float,
        branches: tuple[str, ...],
        grid: tuple[int, int, int] | None,
        patch_size: tuple[int, int, int],
        text_tokens: int,
    ) -> None:
        """Start one diffusion-model forward at denoising ``step`` (of ``num_steps``) whose batch rows
        belong to ``branches``; ``step_sigma`` is the step's scheduled sigma (same value for every
        model call of the step)."""
        self._num_steps = num_steps
        inputs = ForwardInputs(batch_size=len(branches), timestep=torch.tensor(step_sigma), grid=grid,
                               patch_size=patch_size, text_tokens=text_tokens)
        self.context.begin_forward(inputs, step_sigma, None)
        # ComfyUI's sigma schedule, not the count of distinct sigmas seen, is the step index (a sampler
        # may evaluate the model between two scheduled sigmas).
        self.clock.step = step
        self.clock.num_steps = num_steps
        self.context.branches = tuple(branches)

    def attend_self(
        self,
        method: AttentionMethod,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        text_tokens: int,
        text_position: str,
    ) -> torch.Tensor:
        """Self-attention ``(B, H, S, D)`` of layer ``layer`` through dit_accel's router (sparse where the
        method plans it, dense otherwise)."""
        key = (id(method), layer)
        binding = self._bindings.get(key)
        if binding is None:
            binding = ModuleBinding(self.context, method, layer, f"layer.{layer}", "self", id(self))
            self._bindings[key] = binding
        return attend(binding, q, k, v, text_tokens=text_tokens, text_position=text_position)  # type: ignore[arg-type]

    def attention_summary(self) -> dict[str, Any]:
        """Totals of the self-attention calls routed so far: calls, sparse calls, mean density, dense reasons."""
        rows = self.context.stats()
        reasons: dict[str, int] = {}
        for r in rows:
            if r["dense_reason"] is not None:
                reasons[r["dense_reason"]] = reasons.get(r["dense_reason"], 0) + 1
        return {
            "attention_calls": len(rows),
            "sparse_calls": sum(1 for r in rows if r["dense_reason"] is None),
            "mean_density": (sum(r["density"] for r in rows) / len(rows)) if rows else None,
            "dense_reasons": reasons,
        }

    def close(self) -> None:
        """Drop the method state and statistics of this run."""
        self.context.reset_state()
        self.context.reset_stats()
        self.context.close()


def _block_metadata():
    from diffusers.hooks._helpers import TransformerBlockMetadata

    # Streams are passed by keyword; a block returns (hidden, text).
    return TransformerBlockMetadata(return_hidden_states_index=0, return_encoder_hidden_states_index=1)


class CacheRunner:
    """A dit_accel cache scheduler over the ComfyUI blocks of one sampling run.

    Blocks are numbered in model order over all block lists (e.g. FLUX's double then single blocks);
    :meth:`run_block` runs block ``index`` or skips it by the scheduler's decision for the current
    call (taken at block 0, before any block runs).
    """

    def __init__(self, sampling: SamplingRun, config: CacheConfig, blocks: list[tuple[str, torch.nn.Module]]) -> None:
        scheduler = build_scheduler(config, len(blocks))
        metadata = _block_metadata()
        refs = [BlockRef(name, module, metadata) for name, module in blocks]
        self.controller = CacheController("diffusion_model", sampling.context, scheduler, refs)

    def run_block(self, index: int, hidden: torch.Tensor, text: torch.Tensor | None,
                  compute: Callable[[torch.Tensor, "torch.Tensor | None"], Streams]) -> Streams:
        """The streams after block ``index``: ``compute(hidden, text)`` when the block runs, else the
        cached (or forecast) residual added at the span's first block and the input passed through."""
        ref = self.controller.blocks[index]

        def forward(hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None) -> Streams:
            return compute(hidden_states, encoder_hidden_states)

        out = self.controller.run_block(index, ref, forward, (), {"hidden_states": hidden, "encoder_hidden_states": text})
        return out[0], out[1]

    def summary(self) -> dict[str, Any]:
        """Totals of this run: compute fraction, reused calls, peak cached bytes."""
        from dit_accel.caching import summarize

        return summarize(self.controller.stats(), self.controller)

    def close(self) -> None:
        """Drop the cached tensors."""
        self.controller.reset()
