"""The cache on diffusers' ``HookRegistry``: one block hook per transformer block (and one on the output
projection for ``target="output"``) that hands the call to the transformer's
:class:`~dit_accel.caching.controller.CacheController` (inside a compiled region through the ops of
:mod:`dit_accel.caching.compiled`); installing and removing them exactly.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from diffusers.hooks.hooks import ModelHook

from dit_accel.block_hooks import InstalledHook, register_block_hook, remove_block_hooks
from dit_accel.caching.base import CacheConfig
from dit_accel.caching.blocks import BlockRef, find_blocks, output_streams, pack, streams_of
from dit_accel.caching.compiled import prepare_signatures, register_site, run_compiled
from dit_accel.caching.controller import CacheController
from dit_accel.caching.registry import build_scheduler, make_cache_config
from dit_accel.context import TransformerContext
from dit_accel.parallel.context_parallel import context_parallel_group

logger = logging.getLogger("dit_accel")

CACHE_HOOK_NAME = "dit_accel_cache"
"""Name of the cache hook in each block's ``HookRegistry``."""


class CacheBlockHook(ModelHook):
    """Per-block hook: runs the block or returns without entering it (see :mod:`dit_accel.caching.controller`)."""

    _is_stateful = True

    def __init__(self, controller: CacheController, index: int, ref: BlockRef) -> None:
        super().__init__()
        self.controller = controller
        self.index = index
        self.ref = ref
        self.key = register_site(self)
        """Names this hook in the ``dit_accel::cache_*`` ops (a tensor: compiled graphs hold no block index)."""
        self.text_out = bool(ref.metadata.return_encoder_hidden_states_index is not None
                             and not getattr(ref.module, "context_pre_only", False))
        """Whether the block returns a text stream (SD3's last block, ``context_pre_only``, takes one and returns
        none)."""
        self.attention_modules = [m for m in ref.module.modules() if hasattr(m, "processor")]
        """The block's attention modules (see ``compiled.prepare_signatures``)."""

    def original(self, *args: Any, **kwargs: Any) -> Any:
        """The block's own forward (what this hook wraps)."""
        return self.fn_ref.original_forward(*args, **kwargs)

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        """Run or skip the block for the current plan."""
        if torch.compiler.is_compiling():
            return self._traced(args, kwargs)
        return self.controller.run_block(self.index, self.ref, self.original, args, kwargs)

    def _traced(self, args: tuple, kwargs: dict) -> Any:
        ref, controller = self.ref, self.controller
        prepare_signatures(self.attention_modules)
        hidden, encoder = streams_of(ref, args, kwargs)
        call = (args, kwargs) if controller.tokens is not None else None
        out_hidden, out_encoder = run_compiled(
            self, controller.order, controller.context.forward_token, lambda: self.original(*args, **kwargs),
            lambda output: output_streams(ref, output), hidden, encoder, self.text_out, call,
        )
        return pack(ref, out_hidden, out_encoder)

    # --- the ops' eager bodies (dit_accel.caching.compiled) ------------------------------------------------
    def compiled_enter(self, hidden: torch.Tensor, encoder: torch.Tensor | None) -> bool:
        """Whether the block runs (block 0 takes the call's decision first)."""
        return self.controller.enter_block(self.index, hidden, encoder, in_graph=True)

    def compiled_skip(self, hidden: torch.Tensor, encoder: torch.Tensor | None, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        """The skipped block's streams, as new tensors."""
        out_hidden, out_encoder = self.controller.skip_block(self.index, hidden, encoder, args, kwargs, in_graph=True)
        return [out_hidden] if out_encoder is None else [out_hidden, out_encoder]

    def compiled_exit(self, hidden: torch.Tensor, encoder: torch.Tensor | None) -> None:
        """Residuals, probe and statistics after the block (its streams count only when it ran)."""
        ran = not self.controller.skipped(self.index)
        self.controller.exit_block(self.index, hidden if ran else None, encoder if ran else None)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        """diffusers' ``_reset_stateful_cache`` forgets the cached tensors too."""
        if self.index == 0:
            self.controller.reset()
        return module


class CacheOutputHook(ModelHook):
    """Hook on the output projection for ``target="output"``: returns the forecast on reused steps."""

    def __init__(self, controller: CacheController, module: torch.nn.Module) -> None:
        super().__init__()
        self.controller = controller
        self.key = register_site(self)
        """Names this hook in the ``dit_accel::cache_*`` ops."""
        self.out_width = getattr(module, "out_features", None)
        """Width of the projection's output (an ``nn.Linear``'s ``out_features``), for the compiled forecast."""

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        """Run or forecast the projection for the current plan."""
        if not torch.compiler.is_compiling():
            return self.controller.run_output(self.fn_ref.original_forward, args, kwargs)
        if not isinstance(self.out_width, int):
            raise ValueError(f"the compiled feature cache with target='output' needs an nn.Linear proj_out, got {type(module).__name__}")
        hidden = args[0] if args else next(iter(kwargs.values()))
        controller = self.controller
        return run_compiled(
            self, controller.order, controller.context.forward_token, lambda: self.fn_ref.original_forward(*args, **kwargs),
            lambda output: (output, None), hidden, None, False, out_width=self.out_width,
        )[0]

    # --- the ops' eager bodies (dit_accel.caching.compiled) ------------------------------------------------
    def compiled_enter(self, hidden: torch.Tensor, encoder: torch.Tensor | None) -> bool:
        """Whether the projection runs (else it is forecast)."""
        return self.controller.enter_output()

    def compiled_skip(self, hidden: torch.Tensor, encoder: torch.Tensor | None, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        """The cached (or forecast) projection, as a new tensor."""
        return [self.controller.skip_output(hidden, in_graph=True)]

    def compiled_exit(self, hidden: torch.Tensor, encoder: torch.Tensor | None) -> None:
        """Store the projection when it ran; close the call."""
        self.controller.exit_output(hidden if self.controller.enter_output() else None)


class CacheAttachment:
    """The cache installed on one transformer: its controller and how to remove it exactly."""

    def __init__(self, transformer: torch.nn.Module, controller: CacheController) -> None:
        self.transformer = transformer
        self.controller = controller
        self._installed: list[InstalledHook] = []
        self.active = False

    @property
    def config(self) -> CacheConfig:
        """The scheduler's config."""
        return self.controller.scheduler.config

    def stats(self) -> list[dict[str, Any]]:
        """Per-call, per-branch records (see :func:`install_cache`)."""
        return self.controller.stats()

    def reset_stats(self) -> None:
        """Drop the statistics records."""
        self.controller.reset_stats()

    def summary(self) -> dict[str, Any]:
        """Totals for run logs: compute fraction, reused calls, peak cached bytes."""
        return summarize(self.stats(), self.controller)

    def remove(self) -> None:
        """Remove the block hooks (and the block registries this attachment created)."""
        remove_block_hooks(self._installed, CACHE_HOOK_NAME)
        root = getattr(self.transformer, "_diffusers_hook", None)
        if root is not None:
            root.invalidate_child_registries_cache()
        self.controller.reset()
        self.active = False


def summarize(records: list[dict[str, Any]], controller: CacheController | None = None) -> dict[str, Any]:
    """Totals of cache statistics records (of one or several transformers)."""
    computed = sum(r["blocks_computed"] for r in records)
    total = sum(r["blocks_total"] for r in records)
    out: dict[str, Any] = {
        "records": len(records),
        "compute_fraction": (computed / total) if total else None,
        "blocks_computed": computed,
        "blocks_total": total,
        "reused": sum(1 for r in records if r["decision"] in ("reuse", "selective")),
        "selective": sum(1 for r in records if r["decision"] == "selective"),
    }
    if controller is not None:
        out["peak_cached_bytes"] = controller.peak_cached_bytes
        out["peak_branch_bytes"] = dict(controller.peak_branch_bytes)
        out["stream_bytes"] = dict(controller.stream_bytes)
    return out


def install_cache(
    transformer: torch.nn.Module,
    context: TransformerContext,
    config: CacheConfig | str,
    *,
    name: str | None = None,
    **options: Any,
) -> CacheAttachment:
    """Install a cache scheduler on ``transformer``'s blocks and return the attachment.

    ``context`` is the transformer's :class:`TransformerContext` (its context hook must already be
    registered on the transformer, so steps and branches are known before block 0 runs). ``config``
    is a :class:`CacheConfig` or a scheduler name with keyword ``options``. Statistics records have the
    keys ``transformer, call, step, num_steps, branch, scheduler, decision ("compute"/"reuse"/
    "selective"), reason (the guardrail that forced a computation, or None), blocks_computed,
    blocks_total, probe_change, accumulated, cached_bytes``.
    """
    if not isinstance(context, TransformerContext):
        raise TypeError(f"context must be a TransformerContext, got {type(context).__name__}")
    cfg = make_cache_config(config, **options)
    blocks = find_blocks(transformer)
    scheduler = build_scheduler(cfg, len(blocks))
    return install_controller(transformer, CacheController(name or context.name, context, scheduler, blocks))


def install_controller(transformer: torch.nn.Module, controller: CacheController) -> CacheAttachment:
    """Register the block hooks of an already built controller (calibration installs its recorder so)."""
    blocks = controller.blocks
    for ref in blocks:
        registry = getattr(ref.module, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(CACHE_HOOK_NAME) is not None:
            raise ValueError(f"a dit-accel cache is already installed on {ref.name}; remove it first")
    scheduler = controller.scheduler
    if scheduler.token_share > 0:
        joint = [ref.name for ref in blocks if ref.metadata.return_encoder_hidden_states_index is not None]
        if joint:
            raise ValueError(
                f"selective_tokens needs blocks with a separate text stream (Wan, LTX, PixArt); "
                f"{type(blocks[0].module).__name__} ({joint[0]}) returns a joint text stream; set selective_tokens=0"
            )
    output_module = None
    if scheduler.output_target:
        output_module = getattr(transformer, "proj_out", None)
        if not isinstance(output_module, torch.nn.Module):
            raise ValueError(f"target='output' needs an output projection `proj_out`; {type(transformer).__name__} has none")
    # Ranks sharing the transformer's sequence must decide alike (looked up per probe: CP may come later).
    controller.decision_group = functools.partial(context_parallel_group, transformer)
    attachment = CacheAttachment(transformer, controller)
    try:
        hooked = [(ref.module, CacheBlockHook(controller, index, ref)) for index, ref in enumerate(blocks)]
        controller.block_forwards = [hook.original for _, hook in hooked]
        if output_module is not None:
            hooked.append((output_module, CacheOutputHook(controller, output_module)))
        for module, hook in hooked:
            attachment._installed.append(register_block_hook(module, hook, CACHE_HOOK_NAME))
    except Exception:
        attachment.remove()
        raise
    root = getattr(transformer, "_diffusers_hook", None)
    if root is not None:
        root.invalidate_child_registries_cache()
    attachment.active = True
    logger.info("dit_accel cache %s installed on %s (%d blocks)", scheduler.name, controller.transformer_name, len(blocks))
    return attachment
