"""Dense attention on the fastest backend that works on this machine.

On CUDA a one-time probe per device runs each candidate on a small problem and compares it with
the math backend; the first that works is the one reported by :func:`dense_backend_name`, in this
order: cuDNN SDPA, flash SDPA, xformers (only if installed *and* its operator actually runs: an xformers
wheel built against another torch release imports, then finds no operator, so only a run proves it usable),
memory-efficient SDPA, math.
On CPU the default ``scaled_dot_product_attention`` runs unchanged.

Per shape (:func:`prefers_probed_order`): the probed order (cuDNN first) is used for self-attention of at least
:data:`PROBED_MIN_KEYS` keys without a mask, where cuDNN was the fastest dense backend at every shape measured on
Hopper (4,096 to 75,600 tokens, head dims 64 and 128, 6 to 48 heads: 1.3-1.9x flash); every other call (cross-
attention over a few hundred text tokens, short sequences, masks) runs torch's own dispatch, the one the stock
model runs, for which no measurement says otherwise. The order is set by moving the probed backends to the front
of torch's SDPA priority order for the call and restoring it after (two calls into torch; ``sdpa_kernel``, which
does the same through Python bookkeeping, cost about 35 us per call on the host, a few percent of a small
model's step). A call the preferred backend cannot take (e.g. fp32, or a mask for cuDNN) falls through to the
next enabled one instead of failing.
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

PROBED_MIN_KEYS = 4096
"""Self-attention calls with at least this many keys run the probed order (see the module docstring)."""


@dataclass(frozen=True)
class DenseChoice:
    """Outcome of the backend probe on one device."""

    name: str
    """The backend used first: ``cudnn``, ``flash``, ``xformers``, ``efficient``, ``math`` or ``cpu_sdpa``."""
    sdpa_backends: tuple[SDPBackend, ...]
    """SDPA backends that passed the probe, in priority order (empty on CPU)."""
    probe: dict[str, str]
    """Per candidate: ``"ok"`` or the reason it was rejected."""
    priority: tuple[int, ...] = ()
    """torch's SDPA priority order with :attr:`sdpa_backends` moved to the front (empty on CPU, or when torch has
    no priority-order functions: then ``sdpa_kernel`` is used)."""


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
        working = tuple(b for n, b in _SDPA_CANDIDATES if probe[n] == "ok") or (SDPBackend.MATH,)
        name = next((n for n in _ORDER if probe.get(n) == "ok"), "math")
        priority: tuple[int, ...] = ()
        if hasattr(torch._C, "_get_sdp_priority_order") and hasattr(torch._C, "_set_sdp_priority_order"):
            front = [int(b) for b in working]
            priority = tuple(front + [b for b in torch._C._get_sdp_priority_order() if b not in front])
        choice = DenseChoice(name, working, probe, priority)
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


def prefers_probed_order(q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None) -> bool:
    """Whether a CUDA call runs the probed backend order (see the module docstring) rather than torch's own."""
    return attn_mask is None and q.shape[-2] == k.shape[-2] and k.shape[-2] >= PROBED_MIN_KEYS


TORCH_DISPATCH = "sdpa"
"""Backend name recorded for CUDA calls left to torch's own SDPA dispatch."""


def dense_call_backend(q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None = None) -> str:
    """Name of the dense backend a call of these shapes runs first: the probed one, ``"sdpa"`` (torch's own
    dispatch) or ``"cpu_sdpa"``."""
    if q.device.type == "cuda" and not prefers_probed_order(q, k, attn_mask):
        return TORCH_DISPATCH
    return _choose(q.device).name


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
    if not prefers_probed_order(q, k, attn_mask):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
        )
    if not choice.priority:
        with sdpa_kernel(list(choice.sdpa_backends), set_priority=True):
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
            )
    previous = torch._C._get_sdp_priority_order()
    torch._C._set_sdp_priority_order(list(choice.priority))
    try:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
        )
    finally:
        torch._C._set_sdp_priority_order(previous)
