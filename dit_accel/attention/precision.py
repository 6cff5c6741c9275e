"""The precision the block-sparse kernel runs for a method's ``precision``, and why when it is not the one asked for."""

from __future__ import annotations

import os

import torch


def reference_runs(q: torch.Tensor) -> bool:
    """Whether the kernel call of ``q`` runs the torch reference (CPU without the Triton interpreter)."""
    return q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1"


def fp8_support_of(q: torch.Tensor) -> tuple[bool, str]:
    """Whether the route can run ``q``'s call in 8 bits and why: the torch reference of the 8-bit arithmetic
    on CPU, else :func:`~dit_accel.kernels.fp8_supported`."""
    if reference_runs(q):
        return True, "torch reference of the 8-bit arithmetic"
    from dit_accel.kernels import fp8_supported

    return fp8_supported(q)


_PRECISION: dict[tuple, tuple[str, str | None]] = {}


def kernel_precision(q: torch.Tensor, requested: str) -> tuple[str, str | None]:
    """``(precision the kernel runs, why not the requested one or None)`` for a method's ``precision``: an fp8
    request runs fp8 where :func:`fp8_support_of` allows it, else bf16 with the reason."""
    if requested == "bf16":
        return "bf16", None
    key = (q.device.type, q.device.index, requested)
    hit = _PRECISION.get(key)
    if hit is None:
        ok, reason = fp8_support_of(q)
        hit = _PRECISION[key] = (requested, None) if ok else ("bf16", reason)
    return hit
