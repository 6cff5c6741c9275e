"""Dense attention on the fastest backend that works on this machine.

On CUDA a one-time probe per device runs each candidate on a small problem and compares it with
the math backend; the first that works is the one reported by :func:`dense_backend_name`, in this
order: cuDNN SDPA, flash SDPA, xformers (only if installed *and* its operator actually runs: the
current xformers wheel fails to load its operators on torch 2.11), memory-efficient SDPA, math.
Calls then run under ``sdpa_kernel(working_backends, set_priority=True)``, so a call that the
preferred backend cannot take (e.g. fp32, or a mask for cuDNN) falls through to the next working
one instead of failing. On CPU the default ``scaled_dot_product_attention`` runs unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

logger = logging.getLogger("dit_accel")

CPU_BACKEND = "cpu_sdpa"

_SDPA_CANDIDATES: tuple[tuple[str, SDPBackend], ...] = (
    ("cudnn", SDPBackend.CUDNN_ATTENTION),
    ("flash", SDPBackend.FLASH_ATTENTION),
    ("efficient", SDPBackend.EFFICIENT_ATTENTION),
    ("math", SDPBackend.MATH),
)
_ORDER = ("cudnn", "flash", "xformers", "efficient", "math")


@dataclass(frozen=True)
class DenseChoice:
    """Outcome of the backend probe on one device."""

    name: str
    """The backend used first: ``cudnn``, ``flash``, ``xformers``, ``efficient``, ``math`` or ``cpu_sdpa``."""
    sdpa_backends: tuple[SDPBackend, ...]
    """SDPA backends that passed the probe, in priority order (empty on CPU)."""
    probe: dict[str, str]
    """Per candidate: ``"ok"`` or the reason it was rejected."""


_CHOICES: dict[str, DenseChoice] = {}


def _probe_sdpa(backend: SDPBackend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ref: torch.Tensor) -> str:
    try:
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(q, k, v)
        torch.cuda.synchronize(q.device)
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable here"
        return f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    err = (out.float() - ref).abs().max().item()
    return "ok" if err < 2e-2 else f"wrong result (max abs err {err:.3g})"


def _probe_xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ref: torch.Tensor) -> str:
    try:
        import xformers.ops as xops  # type: ignore[import-not-found]
    except Exception as exc:  # noqa: BLE001
        return f"not available: {type(exc).__name__}"
    try:
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        torch.cuda.synchronize(q.device)
    except Exception as exc:  # noqa: BLE001 - e.g. "No operator found" with a mismatched wheel
        return f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    err = (out.transpose(1, 2).float() - ref).abs().max().item()
    return "ok" if err < 2e-2 else f"wrong result (max abs err {err:.3g})"


def _choose(device: torch.device) -> DenseChoice:
    key = str(device)
    if key in _CHOICES:
        return _CHOICES[key]
    if device.type != "cuda":
        choice = DenseChoice(CPU_BACKEND, (), {CPU_BACKEND: "ok"})
    else:
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v = (
            torch.randn(1, 2, 256, 64, device=device, dtype=torch.bfloat16, generator=gen) for _ in range(3)
        )
        with sdpa_kernel([SDPBackend.MATH]):
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        probe: dict[str, str] = {}
        for name, backend in _SDPA_CANDIDATES:
            probe[name] = _probe_sdpa(backend, q, k, v, ref)
        probe["xformers"] = _probe_xformers(q, k, v, ref)
        working = tuple(b for n, b in _SDPA_CANDIDATES if probe[n] == "ok")
        name = next((n for n in _ORDER if probe.get(n) == "ok"), "math")
        choice = DenseChoice(name, working or (SDPBackend.MATH,), probe)
    _CHOICES[key] = choice
    logger.info("dit_accel dense attention backend on %s: %s (probe: %s)", key, choice.name, choice.probe)
    return choice


def dense_backend_name(device: torch.device | str | None = None) -> str:
    """Name of the dense backend used on ``device`` (default: the current CUDA device, else CPU).

    Runs the one-time probe for that device if it has not run yet.
    """
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return _choose(torch.device(device)).name


def dense_probe_report(device: torch.device | str | None = None) -> dict[str, str]:
    """Per-candidate probe outcome on ``device`` (``"ok"`` or why it was rejected), for run logs."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return dict(_choose(torch.device(device)).probe)


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    *,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Exact attention on ``(B, H, S, D)`` tensors with the probed backend; same semantics as SDPA."""
    choice = _choose(q.device)
    if q.device.type != "cuda":
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
        )
    if (
        choice.name == "xformers"
        and attn_mask is None
        and not is_causal
        and dropout_p == 0.0
        and q.dtype in (torch.float16, torch.bfloat16)
    ):
        import xformers.ops as xops  # type: ignore[import-not-found]

        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
        return out.transpose(1, 2)
    with sdpa_kernel(list(choice.sdpa_backends), set_priority=True):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
        )
