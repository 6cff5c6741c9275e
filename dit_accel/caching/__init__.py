"""Feature caching: schedulers that decide, per denoising step and guidance branch, which blocks to
compute and which to reuse, installed on diffusers' ``HookRegistry`` (no model forward is edited).

    from dit_accel.caching import install_cache, make_cache_config
    attachment = install_cache(transformer, context, "procache", budget=0.5)   # context: TransformerContext
    ...
    attachment.summary()   # compute fraction, reused calls, peak cached bytes
    attachment.remove()

Schedulers, one per module: ``fixed`` (uniform or listed steps, residual reuse), ``probe`` (first-block probe
with an accumulated relative-L1 budget), ``taylor`` (fixed schedule, Taylor forecast of the residual) and
``procache`` (offline-searched non-uniform schedule with optional selective recomputation of deep blocks and of
the tokens that changed most). What they share is :mod:`dit_accel.caching.base`; the registry is
:mod:`dit_accel.caching.registry`; the controller that runs one on a transformer's blocks is
:mod:`dit_accel.caching.controller`, its hooks :mod:`dit_accel.caching.hooks`.
"""

from dit_accel.caching.base import CacheConfig, CacheScheduler, CacheState, Decision
from dit_accel.caching.blocks import find_blocks
from dit_accel.caching.fixed import FixedCacheConfig
from dit_accel.caching.hooks import CACHE_HOOK_NAME, CacheAttachment, install_cache, summarize
from dit_accel.caching.probe import ProbeCacheConfig
from dit_accel.caching.procache import ProCacheConfig
from dit_accel.caching.registry import (
    CONFIG_CLASSES,
    available_schedulers,
    build_scheduler,
    make_cache_config,
    register_scheduler,
)
from dit_accel.caching.schedule_file import load_schedule, resample_schedule, save_schedule
from dit_accel.caching.taylor import TaylorCacheConfig

__all__ = [
    "CACHE_HOOK_NAME",
    "CONFIG_CLASSES",
    "CacheAttachment",
    "CacheConfig",
    "CacheScheduler",
    "CacheState",
    "Decision",
    "FixedCacheConfig",
    "ProCacheConfig",
    "ProbeCacheConfig",
    "TaylorCacheConfig",
    "available_schedulers",
    "build_scheduler",
    "find_blocks",
    "install_cache",
    "load_schedule",
    "make_cache_config",
    "register_scheduler",
    "resample_schedule",
    "save_schedule",
    "summarize",
]
