"""Timing one generation on the device: whole call, steps, attention calls, planning, peak memory.

On CUDA every interval is measured with CUDA events recorded on the current stream (no host sync inside the
generation; one sync at its end), so an interval is device time, not the host's wait on the queue. On any other
device the host's ``time.perf_counter`` is used (the CPU runs ops synchronously); the report names the clock.

Probes, installed only for the generation they measure and removed right after:

- steps: ``pipe.scheduler.step`` wrapped on the instance (every diffusers pipeline calls it once per step);
- attention: ``torch.nn.functional.scaled_dot_product_attention`` (stock processors, diffusers' native backend,
  dit-accel's dense route) and ``dit_accel.kernels.block_sparse_attention`` (dit-accel's sparse route) wrapped by
  module attribute; a replacement a run installs there first (FlexAttention, SageAttention) is what the probe
  wraps, and it names itself through a ``bench_kind`` attribute. Only the outermost call is timed (a kernel
  that calls SDPA inside counts once);
- planning: the dit-accel handle's ``method.plan`` wrapped on the method instance (one instance serves every
  layer).

Under ``torch.compile`` the attention and planning probes are not installed: they would run inside compiled
regions and add graph breaks; only whole-generation and step times are measured there.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

CUDA_CLOCK = "cuda_events"
"""Clock name in the report when CUDA events time the intervals."""
HOST_CLOCK = "host_perf_counter"
"""Clock name in the report when the host timer does (CPU runs)."""


class Clock:
    """Marks and intervals on one device: CUDA events on CUDA, ``time.perf_counter`` elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.name = CUDA_CLOCK if self.cuda else HOST_CLOCK

    def mark(self) -> Any:
        """A point in time: a recorded CUDA event, or a host timestamp."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def sync(self) -> None:
        """Wait for the device (no-op on CPU)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def seconds(self, start: Any, end: Any) -> float:
        """Seconds between two marks (call :meth:`sync` first on CUDA)."""
        if self.cuda:
            return start.elapsed_time(end) / 1000.0
        return end - start


@dataclass
class _Intervals:
    """Start/end marks of one kind of call, outermost calls only."""

    spans: list[tuple[Any, Any]] = field(default_factory=list)
    depth: int = 0

    def total(self, clock: Clock) -> float:
        return sum(clock.seconds(a, b) for a, b in self.spans)


def _timed(fn: Callable[..., Any], clock: Clock, intervals: _Intervals) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if intervals.depth:
            return fn(*args, **kwargs)
        intervals.depth += 1
        start = clock.mark()
        try:
            return fn(*args, **kwargs)
        finally:
            intervals.spans.append((start, clock.mark()))
            intervals.depth -= 1

    return wrapper


_ATTENTION_TARGETS: tuple[tuple[str, str, str], ...] = (
    ("torch.nn.functional", "scaled_dot_product_attention", "sdpa"),
    ("dit_accel.kernels", "block_sparse_attention", "block_sparse"),
)
"""(module, attribute, default kind) of every attention entry point the probe wraps."""


@contextlib.contextmanager
def patched(module_name: str, attribute: str, replacement: Any) -> Iterator[Any]:
    """Set ``module.attribute`` to ``replacement`` for the block; yields the original."""
    import importlib

    module = importlib.import_module(module_name)
    original = getattr(module, attribute)
    setattr(module, attribute, replacement)
    try:
        yield original
    finally:
        setattr(module, attribute, original)


@dataclass
class GenerationTiming:
    """What one measured generation gives."""

    seconds: float
    """Device time of the whole ``pipe(...)`` call."""
    wall_s: float
    """Host time of the call (after a sync before and after)."""
    step_seconds: list[float]
    """Device time of each denoising step (the first one includes the pipeline's set-up before it)."""
    attention_s: float | None = None
    """Device time inside attention calls (``None``: not probed)."""
    attention_calls: dict[str, int] = field(default_factory=dict)
    """Attention calls by kind (``sdpa``, ``block_sparse``, ``flex``, ``sage``)."""
    attention_s_by_kind: dict[str, float] = field(default_factory=dict)
    """Device seconds by kind."""
    plan_s: float | None = None
    """Device time inside the attention method's ``plan`` (``None``: no dit-accel method or not probed)."""
    plan_calls: int = 0
    """Calls of ``plan``."""
    peak_gib: float | None = None
    """``torch.cuda.max_memory_allocated`` over the call, GiB (``None`` on CPU)."""
    output: Any = None
    """The pipeline output (latents)."""


def time_generation(
    pipe: Any,
    kwargs: dict[str, Any],
    clock: Clock,
    *,
    method: Any = None,
    probe_attention: bool = True,
    call_context: Callable[[], Any] | None = None,
) -> GenerationTiming:
    """Run ``pipe(**kwargs)`` once under inference mode and time it (see the module docstring).

    ``method``: the dit-accel attention method whose ``plan`` is timed (``None``: none). ``probe_attention``:
    install the attention and planning probes. ``call_context``: a context-manager factory entered around the
    call (a peer that needs one, e.g. a diffusers cache context).
    """
    step_marks: list[Any] = []
    scheduler = pipe.scheduler
    original_step = scheduler.step

    def timed_step(*args: Any, **kw: Any) -> Any:
        out = original_step(*args, **kw)
        step_marks.append(clock.mark())
        return out

    kinds: dict[str, _Intervals] = {}
    plan = _Intervals()
    with contextlib.ExitStack() as stack:
        scheduler.step = timed_step
        stack.callback(lambda: scheduler.__dict__.pop("step", None))
        if probe_attention:
            import importlib

            for module_name, attribute, default_kind in _ATTENTION_TARGETS:
                module = importlib.import_module(module_name)
                current = getattr(module, attribute, None)
                if current is None:
                    continue
                kind = getattr(current, "bench_kind", default_kind)
                intervals = kinds.setdefault(kind, _Intervals())
                stack.enter_context(patched(module_name, attribute, _timed(current, clock, intervals)))
            if method is not None:
                original_plan = method.plan
                method.plan = _timed(original_plan, clock, plan)
                stack.callback(lambda: method.__dict__.pop("plan", None))
        if call_context is not None:
            stack.enter_context(call_context())
        if clock.cuda:
            torch.cuda.synchronize(clock.device)
            torch.cuda.reset_peak_memory_stats(clock.device)
        wall = time.perf_counter()
        start = clock.mark()
        with torch.inference_mode():
            output = pipe(**kwargs)
        end = clock.mark()
        clock.sync()
        wall = time.perf_counter() - wall
    peak = torch.cuda.max_memory_allocated(clock.device) / 2**30 if clock.cuda else None
    bounds = [start, *step_marks]
    steps = [clock.seconds(a, b) for a, b in zip(bounds, bounds[1:])]
    timing = GenerationTiming(clock.seconds(start, end), wall, steps, peak_gib=peak, output=output)
    if probe_attention:
        timing.attention_calls = {k: len(v.spans) for k, v in kinds.items() if v.spans}
        timing.attention_s_by_kind = {k: v.total(clock) for k, v in kinds.items() if v.spans}
        timing.attention_s = sum(timing.attention_s_by_kind.values())
        if method is not None:
            timing.plan_s = plan.total(clock)
            timing.plan_calls = len(plan.spans)
    return timing


class BlockCounter:
    """Counts transformer calls and self-attention module calls (a forward pre-hook on each module the family
    routes, which runs only when its block computes), so ``fraction`` is the share of block evaluations that ran:
    1.0 without a cache, lower when a cache (ours or a peer's) skips blocks."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        from dit_accel.pipelines.families import detect_family

        modules = [m for _, m, role, _ in detect_family(transformer).attention_modules(transformer) if role == "self"]
        self.modules = len(modules)
        self.calls = 0
        self.attention_calls = 0
        self._handles = [transformer.register_forward_pre_hook(self._on_call)]
        self._handles += [m.register_forward_pre_hook(self._on_attention) for m in modules]

    def _on_call(self, *_: Any) -> None:
        self.calls += 1

    def _on_attention(self, *_: Any) -> None:
        self.attention_calls += 1

    @property
    def fraction(self) -> float | None:
        """Self-attention calls / (transformer calls x self-attention modules)."""
        total = self.calls * self.modules
        return self.attention_calls / total if total else None

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
