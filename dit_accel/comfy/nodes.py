"""The three nodes: what each one does (plain functions) and its inputs (data both front-ends read).

* **dit-accel Apply**: a shipped preset, a preset file, overrides;
* **dit-accel Sparse Attention**: an attention method, its quality knob, the kernel precision;
* **dit-accel Feature Cache**: a cache scheduler with a compute budget or a schedule file.

Each takes a MODEL and returns a patched clone (:func:`dit_accel.comfy.patching.install`). The V3
front-end (``comfy_api``) is :mod:`dit_accel.comfy.nodes_v3`, the V1 one (``NODE_CLASS_MAPPINGS``, for
ComfyUI without ``comfy_api``) is :mod:`dit_accel.comfy.nodes_v1`; both build their inputs from
:data:`NODES`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from dit_accel.comfy import bridge, patching

CATEGORY = "model_patches/dit-accel"
"""Where the nodes appear in ComfyUI's Add Node menu."""
PRECISIONS = ("bf16", "fp8")
"""Kernel precisions the Sparse Attention node offers."""
NO_PRESET = "none"
"""Apply node's preset value that starts from no preset (only the file and overrides)."""


def parse_json_object(text: str, what: str) -> dict[str, Any]:
    """``text`` as a JSON object (empty text: ``{}``); ``ValueError`` names ``what`` otherwise."""
    text = (text or "").strip()
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what}: not valid JSON ({exc}); expected an object such as {{\"attention_config\": {{\"min_seq_len\": 0}}}}") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{what}: expected a JSON object, got {type(value).__name__}: {value!r}")
    return value


# --- what the nodes do -----------------------------------------------------------------------------
def apply_preset(model: Any, preset: str, preset_file: str = "", overrides: str = "") -> Any:
    """A clone of ``model`` with a shipped preset (or ``"none"``), then a preset file, then ``overrides``
    (JSON: ``attention``, ``attention_config``, ``cache``, ``cache_config``) installed."""
    config = bridge.resolve(None if preset == NO_PRESET else preset, preset_file.strip() or None,
                            parse_json_object(overrides, "overrides"))
    return patching.install(model, method=config.method, cache=config.cache, label=config.label)


def apply_sparse_attention(model: Any, method: str, quality: str, precision: str, min_seq_len: int,
                           options: str = "") -> Any:
    """A clone of ``model`` whose visual self-attention runs attention method ``method``.

    ``quality`` and ``min_seq_len`` go to methods that have those options (``dense`` and ``full`` have no
    quality knob); ``precision`` is the block-sparse kernel's (``"fp8"`` needs a sparse method; where the
    device has no FP8 tensor cores the calls run bf16 and the run statistics say why); ``options`` (JSON
    object) sets any other option of the method.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    opts = parse_json_object(options, "options")
    allowed = bridge.method_options(method)
    if "quality" in allowed:
        opts.setdefault("quality", quality)
    opts.setdefault("min_seq_len", min_seq_len)
    if "precision" in allowed:
        opts.setdefault("precision", precision)
    elif precision != "bf16":
        raise ValueError(f"precision {precision!r} needs an attention method with a 'precision' option (the fp8 kernel path); "
                         f"method {method!r} has the options {allowed}")
    built = bridge.build_method(method, opts)
    return patching.install(model, method=built, label=f"attention {method} {json.dumps(built.config(), sort_keys=True, default=str)}")


BUDGET_USE = {
    "procache": "budget",
    "fixed": "interval",
    "taylor": "interval",
}
"""How the Feature Cache node's ``budget`` (fraction of steps computed) reaches each scheduler:
``procache`` takes it as ``budget``; ``fixed``/``taylor`` compute every ``round(1 / budget)``-th step;
``probe`` decides from its ``threshold`` (set it in ``options``) and ignores ``budget``."""


def apply_feature_cache(model: Any, scheduler: str, budget: float, schedule_file: str = "", warmup_steps: int = 2,
                        options: str = "") -> Any:
    """A clone of ``model`` with cache scheduler ``scheduler``: a schedule file when given (``procache``,
    ``fixed``, ``taylor``), else ``budget`` (see :data:`BUDGET_USE`); ``options`` (JSON object) sets any
    other field of the scheduler's config."""
    opts = parse_json_object(options, "options")
    opts.setdefault("warmup_steps", warmup_steps)
    schedule_file = (schedule_file or "").strip()
    if schedule_file:
        opts.setdefault("schedule_file", schedule_file)
    elif BUDGET_USE.get(scheduler) == "budget":
        opts.setdefault("budget", budget)
    elif BUDGET_USE.get(scheduler) == "interval":
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"budget must be in (0, 1], got {budget!r}")
        opts.setdefault("interval", max(1, round(1.0 / budget)))
    config = bridge.build_cache_config(scheduler, opts)
    return patching.install(model, cache=config, label=f"cache {scheduler} {json.dumps(config.to_dict(), sort_keys=True, default=str)}")


# --- inputs, as data ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Field:
    """One node input."""

    name: str
    """Input name (the keyword the node function receives)."""
    kind: Literal["MODEL", "COMBO", "STRING", "FLOAT", "INT"]
    """ComfyUI socket/widget type."""
    tooltip: str
    """Shown when hovering the input."""
    default: Any = None
    """Widget default."""
    options: tuple[str, ...] = ()
    """Choices of a COMBO."""
    minimum: float | None = None
    """Lower bound of a FLOAT/INT widget."""
    maximum: float | None = None
    """Upper bound of a FLOAT/INT widget."""
    step: float | None = None
    """Increment of a FLOAT/INT widget."""
    multiline: bool = False
    """STRING widget with several lines."""


@dataclass(frozen=True)
class NodeDef:
    """One node: id, names, inputs and the function it runs."""

    node_id: str
    """Globally unique node id (the ``class_type`` in API-format workflows)."""
    display_name: str
    """Name shown in ComfyUI."""
    description: str
    """Node tooltip."""
    function: Callable[..., Any]
    """Called with the inputs as keywords; returns the patched MODEL."""
    fields: tuple[Field, ...] = field(default_factory=tuple)
    """Inputs in display order."""


_MODEL = Field("model", "MODEL", "The diffusion model to accelerate (ComfyUI's Wan, HunyuanVideo, LTX-Video, FLUX.1 or SD3).")


def _node_defs() -> tuple[NodeDef, ...]:
    presets = tuple(bridge.preset_names()) + (NO_PRESET,)
    return (
        NodeDef(
            "DitAccelApply", "dit-accel Apply",
            "Training-free acceleration with a dit-accel preset: block-sparse attention and feature caching. "
            "The dense preset gives exactly the output of the model without this node.",
            apply_preset,
            (
                _MODEL,
                Field("preset", "COMBO", "Shipped preset (`dit-accel presets` lists them); 'none' starts from nothing.",
                      default="balanced", options=presets),
                Field("preset_file", "STRING", "Optional JSON file: a cache schedule from `dit-accel calibrate`, or "
                      "{attention, attention_config, cache, cache_config}; applied over the preset.", default=""),
                Field("overrides", "STRING", "Optional JSON object with the same keys, applied last, e.g. "
                      "{\"attention_config\": {\"min_seq_len\": 0}, \"cache\": null}.", default="", multiline=True),
            ),
        ),
        NodeDef(
            "DitAccelSparseAttention", "dit-accel Sparse Attention",
            "Block-sparse self-attention over the video/image tokens (dit-accel's attention methods and kernels); "
            "cross-attention, masked and short calls stay on ComfyUI's attention.",
            apply_sparse_attention,
            (
                _MODEL,
                Field("method", "COMBO", "Attention method: combo (3D-tile order + draft plan + temporal skip), draft, "
                      "permuted, temporal_skip, window, full (the sparse path at density 1), dense (ComfyUI's attention).",
                      default="combo", options=tuple(bridge.available_methods())),
                Field("quality", "COMBO", "Quality knob of the sparse methods (max is closest to dense).",
                      default="balanced", options=tuple(bridge.quality_levels())),
                Field("precision", "COMBO", "Kernel precision: bf16, or fp8 where the method has the fp8 kernel path.",
                      default="bf16", options=PRECISIONS),
                Field("min_seq_len", "INT", "Self-attention calls shorter than this many tokens run dense.",
                      default=1024, minimum=0, maximum=1 << 24, step=128),
                Field("options", "STRING", "Optional JSON object of further method options, e.g. {\"top_p\": 0.9}.",
                      default="", multiline=True),
            ),
        ),
        NodeDef(
            "DitAccelFeatureCache", "dit-accel Feature Cache",
            "Reuse the transformer blocks' residual on some denoising steps (dit-accel's cache schedulers), per guidance branch.",
            apply_feature_cache,
            (
                _MODEL,
                Field("scheduler", "COMBO", "procache (searched non-uniform schedule), fixed (uniform), taylor "
                      "(forecast residual), probe (first-block change budget; set threshold in options).",
                      default="procache", options=tuple(bridge.available_schedulers())),
                Field("budget", "FLOAT", "Fraction of the steps computed (procache: its budget; fixed/taylor: every "
                      "round(1/budget)-th step; probe: unused).", default=0.5, minimum=0.05, maximum=1.0, step=0.05),
                Field("schedule_file", "STRING", "Optional schedule JSON from `dit-accel calibrate` (replaces budget).",
                      default=""),
                Field("warmup_steps", "INT", "First steps always computed.", default=2, minimum=0, maximum=1000, step=1),
                Field("options", "STRING", "Optional JSON object of further scheduler options, e.g. {\"final_steps\": 1}.",
                      default="", multiline=True),
            ),
        ),
    )


NODES: tuple[NodeDef, ...] = _node_defs()
"""The node pack."""
