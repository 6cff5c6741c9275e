"""The cache schedulers by name: the registry, filled from an explicit list, and the config/scheduler builders."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from dit_accel.caching.base import CacheConfig, CacheScheduler
from dit_accel.caching.fixed import FixedScheduler
from dit_accel.caching.probe import ProbeScheduler
from dit_accel.caching.procache import ProCacheScheduler
from dit_accel.caching.taylor import TaylorScheduler
from dit_accel.checks import check_options
from dit_accel.registry import Registry

SCHEDULERS: Registry[CacheScheduler] = Registry("cache scheduler", CacheScheduler, "available schedulers")
"""The cache schedulers ``make_cache_config`` and ``build_scheduler`` know, by name."""

for _cls in (FixedScheduler, ProbeScheduler, TaylorScheduler, ProCacheScheduler):
    SCHEDULERS.register(_cls)

CONFIG_CLASSES: dict[str, type[CacheConfig]] = {name: SCHEDULERS.get(name).config_class for name in SCHEDULERS.names()}
"""Config class per shipped scheduler name."""


def register_scheduler(cls: type[CacheScheduler]) -> type[CacheScheduler]:
    """Class decorator: register a :class:`CacheScheduler` subclass under ``cls.name``."""
    return SCHEDULERS.register(cls)


def available_schedulers() -> list[str]:
    """Names of the registered cache schedulers."""
    return SCHEDULERS.names()


def make_cache_config(name: str | CacheConfig, **options: Any) -> CacheConfig:
    """The config for scheduler ``name`` with keyword ``options`` (a config instance is returned as is).

    Raises ``ValueError`` naming an unknown scheduler or option and the allowed ones.
    """
    if isinstance(name, CacheConfig):
        if options:
            raise ValueError(f"options {sorted(options)} given together with a config instance {name!r}")
        if name.scheduler not in SCHEDULERS:
            raise ValueError(f"config {type(name).__name__} has no registered scheduler; available: {available_schedulers()}")
        return name
    if not isinstance(name, str):
        raise TypeError(
            f"cache must be a scheduler name or a CacheConfig, got {type(name).__name__}: {name!r}; "
            f"available schedulers: {available_schedulers()}"
        )
    config_cls = SCHEDULERS.get(name).config_class
    check_options(f"cache scheduler {name!r}", options, (f.name for f in fields(config_cls) if not f.name.startswith("_")))
    return config_cls(**options)


def build_scheduler(config: CacheConfig, num_blocks: int) -> CacheScheduler:
    """The scheduler for ``config`` on a transformer of ``num_blocks`` blocks."""
    config = make_cache_config(config)
    return SCHEDULERS.get(config.scheduler)(config, num_blocks)
