"""Registering and removing our diffusers hooks on transformer blocks so that removal restores the module exactly.

diffusers' ``HookRegistry`` replaces a module's ``forward`` with a wrapper the first time a registry is created
on it. Restoring the stock module therefore needs to know whether we created the registry and whether the
module had its own ``forward`` attribute before; both the cache hooks and the token-order hooks keep that record.
"""

from __future__ import annotations

import torch
from diffusers.hooks.hooks import HookRegistry, ModelHook

InstalledHook = tuple[torch.nn.Module, bool, bool]
"""``(module, registry created by us, module had an instance-level forward before)``."""


def register_block_hook(module: torch.nn.Module, hook: ModelHook, name: str) -> InstalledHook:
    """Register ``hook`` under ``name`` on ``module``'s diffusers registry; return what removal needs."""
    created = not hasattr(module, "_diffusers_hook")
    had_forward = "forward" in module.__dict__
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
    return module, created, had_forward


def remove_block_hooks(installed: list[InstalledHook], name: str) -> None:
    """Remove the hooks named ``name`` recorded in ``installed`` (emptied), and the registries we created
    when no other hook is left on them, so the modules are as they were before."""
    for module, created, had_forward in installed:
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None:
            continue
        registry.remove_hook(name, recurse=False)
        if created and not registry.hooks:
            del module._diffusers_hook
            if not had_forward:
                module.__dict__.pop("forward", None)
    installed.clear()
