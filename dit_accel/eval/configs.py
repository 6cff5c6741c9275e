"""Named evaluation configurations: what ``--config SPEC`` means.

Grammar::

    SPEC   := "dense" | PART ("+" PART)*
    PART   := KIND ":" NAME [ "(" KEY "=" VALUE ("," KEY "=" VALUE)* ")" ]
    KIND   := "preset" | "attention" | "cache"

- ``dense``: the pipeline exactly as loaded, with nothing of dit-accel applied: the reference every other
  configuration is compared with (``preset:dense`` instead runs our processors in dense mode).
- ``preset:NAME``: a shipped preset (``dit_accel.presets``); ``attention:``/``cache:`` parts override its fields.
- ``attention:NAME(...)``: an attention method (``dit_accel.available_methods()``) with keyword options.
- ``cache:NAME(...)``: a feature-cache scheduler (``dit_accel.available_caches()``) with keyword options.
- ``VALUE`` is a Python literal (``0.9``, ``3``, ``True``, ``None``, ``[0, 2]``, ``'text'``); anything else is a string.

Examples: ``attention:draft``, ``cache:probe(threshold=0.05)``, ``attention:draft+cache:probe``,
``preset:balanced+cache:fixed(interval=3)``. Unknown kinds, names or options raise ``ValueError`` listing
the valid ones; the options are checked by building the method / cache config when the spec is parsed.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

__all__ = ["KINDS", "EvalConfig", "parse_config", "valid_names", "DENSE"]

KINDS: tuple[str, ...] = ("preset", "attention", "cache")
"""The part kinds a spec may combine."""

DENSE = "dense"
"""The spec of the unmodified pipeline (the reference)."""

_PART = re.compile(r"^\s*(?P<kind>[a-z_]+)\s*:\s*(?P<name>[A-Za-z0-9_.\-]+)\s*(?:\((?P<options>.*)\))?\s*$", re.S)


def valid_names() -> dict[str, list[str]]:
    """Valid names per kind, from the live registries (methods and schedulers registered so far)."""
    from dit_accel import api
    from dit_accel.attention.registry import available_methods
    from dit_accel.presets import preset_names

    return {"preset": preset_names(), "attention": available_methods(), "cache": api.available_caches()}


def _syntax_help() -> str:
    names = valid_names()
    return (
        "use 'dense' or KIND:NAME[(key=value,...)] joined by '+', KIND one of "
        f"{list(KINDS)}; presets: {names['preset']}; attention methods: {names['attention']}; "
        f"caches: {names['cache']}"
    )


@dataclass(frozen=True)
class EvalConfig:
    """One configuration to evaluate (parsed from a spec by :func:`parse_config`)."""

    label: str
    """The spec as written (normalised: no spaces); used as the configuration's name in reports."""
    preset: str | None = None
    """Preset name, or ``None``."""
    attention: str | None = None
    """Attention method name (overrides the preset's), or ``None``."""
    attention_options: Mapping[str, Any] = field(default_factory=dict)
    """Keyword options of the attention method."""
    cache: str | None = None
    """Cache scheduler name (overrides the preset's), or ``None``."""
    cache_options: Mapping[str, Any] = field(default_factory=dict)
    """Keyword options of the cache scheduler's config."""

    @property
    def is_dense(self) -> bool:
        """True for the unmodified pipeline (nothing applied)."""
        return self.preset is None and self.attention is None and self.cache is None

    def apply_arguments(self) -> dict[str, Any]:
        """Keyword arguments for ``dit_accel.apply`` (method instances / cache configs when options are given)."""
        from dit_accel.attention.registry import get_method
        from dit_accel.caching import make_cache_config

        attention: Any = self.attention
        if self.attention is not None and self.attention_options:
            attention = get_method(self.attention, **dict(self.attention_options))
        cache: Any = self.cache
        if self.cache is not None and self.cache_options:
            cache = make_cache_config(self.cache, **dict(self.cache_options))
        return {"preset": self.preset, "attention": attention, "cache": cache}

    def apply(self, pipe: Any) -> Any:
        """Apply this configuration to ``pipe``; returns the ``AccelHandle`` (``None`` for ``dense``)."""
        if self.is_dense:
            return None
        from dit_accel import api

        return api.apply(pipe, **self.apply_arguments())

    def as_dict(self) -> dict[str, Any]:
        """Plain data for reports."""
        return {
            "label": self.label,
            "preset": self.preset,
            "attention": self.attention,
            "attention_options": dict(self.attention_options),
            "cache": self.cache,
            "cache_options": dict(self.cache_options),
        }


def _split_top_level(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside parentheses and brackets."""
    parts, depth, current = [], 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def _parse_options(spec: str, text: str | None) -> dict[str, Any]:
    if text is None or not text.strip():
        return {}
    options: dict[str, Any] = {}
    for item in _split_top_level(text, ","):
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key.isidentifier():
            raise ValueError(f"bad option {item.strip()!r} in config {spec!r}: expected key=value")
        if key in options:
            raise ValueError(f"option {key!r} given twice in config {spec!r}")
        raw = raw.strip()
        try:
            options[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            options[key] = raw
    return options


def parse_config(spec: str) -> EvalConfig:
    """Parse a configuration spec (grammar in the module docstring); raise ``ValueError`` on bad specs."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty configuration spec {spec!r}; {_syntax_help()}")
    text = spec.strip()
    if text == DENSE:
        return EvalConfig(label=DENSE)
    names = valid_names()
    found: dict[str, tuple[str, dict[str, Any]]] = {}
    for part in _split_top_level(text, "+"):
        match = _PART.match(part)
        if match is None:
            raise ValueError(f"cannot parse {part.strip()!r} in config {spec!r}; {_syntax_help()}")
        kind, name = match["kind"], match["name"]
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r} in config {spec!r}; {_syntax_help()}")
        if kind in found:
            raise ValueError(f"{kind!r} given twice in config {spec!r}")
        if name not in names[kind]:
            raise ValueError(f"unknown {kind} {name!r} in config {spec!r}; valid {kind} names: {names[kind]}")
        options = _parse_options(spec, match["options"])
        if kind == "preset" and options:
            raise ValueError(f"presets take no options (config {spec!r}); override with attention:/cache: parts")
        found[kind] = (name, options)
    preset = found.get("preset", (None, {}))[0]
    attention, attention_options = found.get("attention", (None, {}))
    cache, cache_options = found.get("cache", (None, {}))
    config = EvalConfig(
        label=re.sub(r"\s+", "", text),
        preset=preset,
        attention=attention,
        attention_options=MappingProxyType(dict(attention_options)),
        cache=cache,
        cache_options=MappingProxyType(dict(cache_options)),
    )
    # Build once so bad options fail now, not after minutes of dense generation.
    config.apply_arguments()
    return config
