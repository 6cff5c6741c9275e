"""dit-accel under diffusers' context parallelism (``transformer.enable_parallelism``).

diffusers shards a transformer's token sequence over the ranks of a device mesh with hooks from the model's
``_cp_plan`` (Wan: split the rotary tables and block 0's input, gather ``proj_out``'s output) and runs
attention through a "templated" backend. Under Ulysses (``ContextParallelConfig(ulysses_degree=N)``) an
all-to-all gives each rank the *whole* sequence for ``heads / N`` heads before the backend's ``forward_op``
runs, and another one brings the result back. What that means for dit-accel:

* **Attention.** The ``dit_accel`` backend (:mod:`dit_accel.attention.backend`) is such a backend: each rank
  plans on the global token grid (the context hook reads the unsharded 5-D input) for its own heads. Every
  sparse method plans each head on that head's q and k alone, so a head's plan, and its output, are the
  ones a single process computes. Ring attention (``ring_degree > 1``, also "unified" Ulysses+ring) gives
  a rank only a chunk of the keys per ring step; a block-sparse plan over the global grid cannot be cut
  into those chunks, so it is refused with a clear error naming the supported mode (:data:`SUPPORTED_MODE`).
* **Feature cache.** A rank that reuses a span skips its blocks and with them their all-to-alls, so every
  rank of the group must take the same decision, or the others wait forever. The schedule-driven schedulers
  (``fixed``, ``taylor``, ``procache``) decide from the step alone; the ``probe`` scheduler decides from the
  probe's relative change, whose numerator and denominator each rank computes on its token shard: the cache
  controller sums them over :func:`context_parallel_group` before deciding. The group is the transformer's
  context-parallel mesh, never the whole world: in a data-parallel run (different prompts per rank, see
  :mod:`dit_accel.prompts_file`) each process decides alone.
* **Hook order.** diffusers' split hook on block 0 must run *outside* dit-accel's cache and token-order hooks,
  so that those see the rank's shard (a skipped block 0 must still be split). ``dit_accel.apply`` before
  ``enable_parallelism`` gives that order by itself; ``dit_accel.apply`` after it (also after
  ``from_pretrained(..., parallel_config=...)``) calls :func:`follow_context_parallel`, which moves diffusers'
  hooks back outside and hands the parallel config to dit-accel's processors (diffusers sets it only on the
  processors present when ``enable_parallelism`` ran). ``dit_accel.remove`` does the same for the stock
  processors it puts back.
* **Guidance branches.** diffusers' context parallelism (0.42.1) has no guidance-parallel mode: every rank runs
  every branch (Wan: ``cond`` then ``uncond``), in the same order, so the branches' states stay aligned.
* **Token order.** ``token_order="forward"`` permutes the whole sequence at block 0; under context parallelism
  the sequence is sharded, so every forward runs in the model's order and the attention folds the permutation
  (counted as ``"context_parallel"`` in ``AccelHandle.token_order_summary()``); outputs stay exact.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks.context_parallel import ContextParallelGatherHook, ContextParallelSplitHook
from diffusers.hooks.hooks import HookRegistry

SUPPORTED_MODE = "ContextParallelConfig(ulysses_degree=N) (Ulysses; ring_degree must be 1)"
"""The context-parallel mode dit-accel supports, as named in error messages."""

_DIFFUSERS_CP_HOOKS = (ContextParallelSplitHook, ContextParallelGatherHook)


def parallel_config_of(module: torch.nn.Module) -> Any | None:
    """The diffusers ``ParallelConfig`` of ``module`` when it has context parallelism enabled, else ``None``."""
    config = getattr(module, "_parallel_config", None)
    if config is None or getattr(config, "context_parallel_config", None) is None:
        return None
    return config


def require_supported(cp_config: Any) -> None:
    """Raise ``ValueError`` unless ``cp_config`` (a ``ContextParallelConfig``) is plain Ulysses (``ring_degree == 1``)."""
    ring = getattr(cp_config, "ring_degree", None) or 1
    if ring > 1:
        ulysses = getattr(cp_config, "ulysses_degree", None) or 1
        raise ValueError(
            f"dit-accel supports diffusers' Ulysses context parallelism only: {SUPPORTED_MODE}; got "
            f"ring_degree={ring}, ulysses_degree={ulysses} (ring attention sees a chunk of the keys per ring step, "
            "which a block-sparse plan over the whole token grid cannot be split into)"
        )


def check_context_parallel(transformer: torch.nn.Module) -> None:
    """Raise ``ValueError`` when ``transformer`` runs a context-parallel mode dit-accel does not support."""
    config = parallel_config_of(transformer)
    if config is not None:
        require_supported(config.context_parallel_config)


def context_parallel_group(transformer: torch.nn.Module) -> Any | None:
    """The process group over which ``transformer``'s sequence is sharded (all ranks of its context-parallel
    mesh), or ``None`` when it is not sharded over more than one process. Cache decisions are reduced over it."""
    config = parallel_config_of(transformer)
    if config is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return None
    mesh = getattr(config.context_parallel_config, "_flattened_mesh", None)
    if mesh is None or mesh.size() < 2:
        return None
    return mesh.get_group()


def _move_outermost(registry: HookRegistry, names: list[str]) -> None:
    """Re-register the hooks ``names`` of ``registry`` as its outermost ones, the others keeping their order.

    Hooks are only ever removed from the outside in: diffusers rewires the chain correctly for the last hook,
    but removing one in the middle of a chain drops the ``new_forward`` of the hook after it.
    """
    order = registry._hook_order
    if order[len(order) - len(names):] == names:
        return
    popped: list[tuple[str, Any]] = []
    while any(name in registry._hook_order for name in names):
        name = registry._hook_order[-1]
        popped.append((name, registry.hooks[name]))
        registry.remove_hook(name, recurse=False)
    popped.reverse()
    for name, hook in [p for p in popped if p[0] not in names] + [p for p in popped if p[0] in names]:
        registry.register_hook(hook, name)


def follow_context_parallel(transformer: torch.nn.Module) -> None:
    """Align ``transformer``'s processors and hooks with its context parallelism (a no-op without it).

    Gives every processor that declares ``_parallel_config`` (diffusers' stock ones and dit-accel's) the
    transformer's config, as ``enable_parallelism`` does for the processors present when it ran, and makes
    diffusers' split/gather hooks the outermost hooks of every module, so that dit-accel's block hooks see the
    rank's shard.
    """
    config = parallel_config_of(transformer)
    if config is None:
        return
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_parallel_config"):
            processor._parallel_config = config
    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None:
            continue
        names = [n for n in registry._hook_order if isinstance(registry.hooks[n], _DIFFUSERS_CP_HOOKS)]
        if names:
            _move_outermost(registry, names)
    root = getattr(transformer, "_diffusers_hook", None)
    if root is not None:
        root.invalidate_child_registries_cache()


__all__ = [
    "SUPPORTED_MODE",
    "check_context_parallel",
    "context_parallel_group",
    "follow_context_parallel",
    "parallel_config_of",
    "require_supported",
]
