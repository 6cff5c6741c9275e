"""The cache controller: runs one scheduler on one transformer's blocks.

The hook of block 0 asks the controller for the call's plan (one host-side decision per call, before any
block runs); each block hook then either runs its block or returns at once without entering it:

* the first block of a skipped span returns ``input + cached (or forecast) residual``;
* the other blocks of the span return their input unchanged;
* with ``target="output"`` no residual is added: every block after the head returns its input and the
  output projection's hook returns the cached (or forecast) projection instead.

Guidance branches: the transformer's :class:`~dit_accel.context.TransformerContext` (filled by the context hook
before any block runs) labels every batch row ``cond``/``uncond``/``extra``. State is kept per branch (the
scheduler's state class); with batched guidance the rows of each branch are sliced out of the residuals; a
call takes one decision for all its rows (computing if any branch needs it). The decision is published per
branch in ``context.cache_status`` before the blocks run.

Several processes: when the transformer's sequence is sharded over ranks (diffusers context parallelism), every
rank must take the same decision (a skipped block skips its collectives). The probe's relative change is the one
decision input computed on the rank's shard; :meth:`CacheController.relative_changes` sums its parts over
:attr:`CacheController.decision_group` (see :mod:`dit_accel.parallel.context_parallel`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from dit_accel.caching.base import OUTPUT_SLOT, CacheScheduler, CacheState, Decision, StepInfo, Streams
from dit_accel.caching.blocks import BlockRef, Rows, output_streams, pack, row_groups, streams_of
from dit_accel.caching.selective_tokens import SelectiveTokens
from dit_accel.context import CacheStatus, TransformerContext

OriginalForward = Callable[..., Any]
"""A module's own forward, without the cache hook."""


@dataclass
class CallPlan:
    """What the controller decided for the transformer call in progress."""

    info: StepInfo
    """Step of the call."""
    groups: list[tuple[str, Rows]]
    """Batch rows of each guidance branch, in first-seen order."""
    decision: Decision
    """The call's decision (``PROBE`` until the probe blocks ran)."""
    reasons: dict[str, str | None]
    """Per branch, the guardrail that forced a computation (``None``: the scheduler decided)."""
    reuse_end: int = 0
    """End (exclusive) of the skipped blocks on a reused or selective call."""
    span_in: Streams | None = None
    """The span input, kept until the residual is stored."""
    in0: torch.Tensor | None = None
    """Block 0's input, kept until the probe residual is known."""
    changes: dict[str, float | None] = field(default_factory=dict)
    """Per branch, the probe's relative change."""
    blocks_run: float = 0
    """Block evaluations of this call (a token share counts as that share of a block)."""


def _copy(t: torch.Tensor) -> torch.Tensor:
    """A copy in ``t``'s layout (what a skipped block returns inside a compiled graph)."""
    return t.clone()


def _no_group() -> None:
    """The decision group of a controller that decides alone."""
    return None


def combine(decisions) -> Decision:
    """One decision for a call whose branches voted: the most computing one wins."""
    ds = list(decisions)
    for d in (Decision.COMPUTE, Decision.PROBE, Decision.SELECTIVE, Decision.REUSE):
        if d in ds:
            return d
    return Decision.COMPUTE


class CacheController:
    """Runs one scheduler on one transformer: per-branch states, per-call plan, statistics."""

    def __init__(self, transformer_name: str, context: TransformerContext, scheduler: CacheScheduler, blocks: list[BlockRef]) -> None:
        self.transformer_name = transformer_name
        self.context = context
        self.scheduler = scheduler
        self.blocks = blocks
        self.states: dict[str, CacheState] = {}
        self.plan: CallPlan | None = None
        self._call_index: int | None = None
        self._stats: list[dict[str, Any]] = []
        self.stats_enabled = True
        self.peak_cached_bytes = 0
        """Largest total of cached bytes (all branches of this transformer) seen after a call."""
        self.peak_branch_bytes: dict[str, int] = {}
        """Largest cached bytes per branch."""
        self.stream_bytes: dict[str, int] = {}
        """Bytes of one span-input activation (hidden + text stream) per branch, for comparison."""
        self.block_forwards: list[OriginalForward] = []
        """Each block's own forward, in block order (set when installed; selective tokens run blocks with it)."""
        self.tokens = SelectiveTokens(blocks, scheduler.token_share) if scheduler.token_share > 0 else None
        """The selective-token recomputation (ProCache with ``selective_tokens``), else ``None``."""
        self.order = torch.zeros((), dtype=torch.int64)
        """CPU tensor the compiled cache ops mutate, so they keep their program order in a graph
        (:mod:`dit_accel.caching.compiled`)."""
        self.decision_group: Callable[[], Any] = _no_group
        """Returns the process group whose ranks must take the same decisions (the transformer's context-parallel
        group, set by ``install_controller``), or ``None`` when this process decides alone. Read at every probe,
        so it follows ``enable_parallelism`` called after the cache was installed."""

    # --- state ------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every cached tensor and the published status (new generation, or the cache is removed)."""
        for state in self.states.values():
            state.reset()
        self.states.clear()
        self.plan = None
        self.context.cache_status.clear()

    def _state(self, branch: str) -> CacheState:
        if branch not in self.states:
            self.states[branch] = self.scheduler.state_class()
        return self.states[branch]

    def _states(self, plan: CallPlan) -> list[CacheState]:
        return [self._state(branch) for branch, _ in plan.groups]

    # --- per call ---------------------------------------------------------------------------------
    def begin_call(self, first_hidden: torch.Tensor) -> None:
        """Take the call's decision (called by block 0's hook before anything runs)."""
        clock = self.context.clock
        if clock.call_index != self._call_index:
            self.reset()
            self._call_index = clock.call_index
        info = StepInfo(step=max(clock.step, 0), num_steps=clock.num_steps)
        branches = self.context.branches or ("cond",) * first_hidden.shape[0]
        if len(branches) != first_hidden.shape[0]:
            branches = ("cond",) * first_hidden.shape[0]
        groups = row_groups(tuple(branches))
        decisions: dict[str, Decision] = {}
        reasons: dict[str, str | None] = {}
        for branch, rows in groups:
            state = self._state(branch)
            reason = self.scheduler.guardrail(info, state)
            if reason is None and not self._shapes_match(state, first_hidden, rows):
                reason = "shape_change"
            reasons[branch] = reason
            decisions[branch] = Decision.COMPUTE if reason is not None else self.scheduler.decide(info, state)
        decision = combine(decisions.values())
        plan = CallPlan(info=info, groups=groups, decision=decision, reasons=reasons)
        if decision in (Decision.REUSE, Decision.SELECTIVE):
            plan.reuse_end = self.scheduler.reuse_end(decision)
        self.plan = plan
        self._publish()

    def _shapes_match(self, state: CacheState, hidden: torch.Tensor, rows: Rows) -> bool:
        slot = next(iter(state.slots.values()), None)
        if slot is None:
            return True
        n = len(range(hidden.shape[0])[rows]) if isinstance(rows, slice) else int(rows.numel())
        # The output slot has the output's channels; rows and tokens must still match.
        same = slot[0].shape[1:-1] == hidden.shape[1:-1] if self.scheduler.output_target else slot[0].shape[1:] == hidden.shape[1:]
        return slot[0].shape[0] == n and same and slot[0].device == hidden.device

    def _publish(self) -> None:
        """Write the call's decision into ``context.cache_status`` for every branch of the call."""
        plan = self.plan
        assert plan is not None
        ranges = self._computed_ranges(plan)
        share = self.scheduler.token_share if plan.decision is Decision.SELECTIVE else 0.0
        for branch, _ in plan.groups:
            status = self.context.cache_status.setdefault(branch, CacheStatus())
            status.step = plan.info.step
            status.decision = plan.decision.value
            status.computed_blocks = ranges
            status.last_computed_step = self._state(branch).last_computed_step
            status.token_share = share

    def _computed_ranges(self, plan: CallPlan) -> tuple[tuple[int, int], ...]:
        n = len(self.blocks)
        if plan.decision in (Decision.COMPUTE, Decision.PROBE):
            return ((0, n),) if plan.decision is Decision.COMPUTE else ((0, self.scheduler.probe_blocks),)
        start = self.scheduler.span_start
        ranges = [(0, start), (plan.reuse_end, n)]
        return tuple(r for r in ranges if r[1] > r[0])

    def run_block(self, index: int, ref: BlockRef, forward: OriginalForward, args: tuple, kwargs: dict) -> Any:
        """Run (``forward``) or skip block ``index`` according to the plan."""
        hidden, encoder = streams_of(ref, args, kwargs)
        if self.enter_block(index, hidden, encoder):
            output = forward(*args, **kwargs)
            self.exit_block(index, *output_streams(ref, output))
            return output
        output = pack(ref, *self.skip_block(index, hidden, encoder, args, kwargs))
        self.exit_block(index, None, None)
        return output

    # The three parts of one block call. ``run_block`` drives them in eager mode; under torch.compile the
    # ``dit_accel::cache_*`` ops of ``caching.compiled`` call them around the traced block, with ``in_graph=True``:
    # then tensors kept past the call are copied and skipped blocks return new tensors, because a compiled
    # graph may reuse the memory of its intermediate tensors and ``torch.cond`` branches may not return an input.
    def enter_block(self, index: int, hidden: torch.Tensor, encoder: torch.Tensor | None, in_graph: bool = False) -> bool:
        """Block ``index``'s entry: take the call's decision at block 0, keep what later blocks need; return
        whether the block runs (``False``: :meth:`skip_block` gives its output)."""
        if index == 0:
            self.begin_call(hidden)
        plan = self.plan
        assert plan is not None
        sched = self.scheduler
        if index == 0 and sched.probe_blocks:
            plan.in0 = hidden.clone() if in_graph else hidden
        if index == sched.span_start:
            plan.span_in = (hidden, encoder) if not in_graph else (hidden.clone(), None if encoder is None else encoder.clone())
            self._note_stream_bytes(plan, hidden, encoder)
            if self.tokens is not None and plan.decision is Decision.COMPUTE:
                self.tokens.remember(plan.groups, self._states(plan), hidden)  # type: ignore[arg-type]
        return not self.skipped(index)

    def skipped(self, index: int) -> bool:
        """Whether the plan skips block ``index`` (the span of a reused or selective call)."""
        plan = self.plan
        assert plan is not None
        return plan.decision in (Decision.REUSE, Decision.SELECTIVE) and self.scheduler.span_start <= index < plan.reuse_end

    def skip_block(self, index: int, hidden: torch.Tensor, encoder: torch.Tensor | None, args: tuple, kwargs: dict,
                   in_graph: bool = False) -> Streams:
        """The streams a skipped block returns: the span's first block adds the cached (or forecast) residual and
        recomputes the selected tokens; the others pass their input on."""
        plan = self.plan
        assert plan is not None
        sched = self.scheduler
        if index == sched.span_start and not sched.output_target:
            fresh = hidden
            residual = self._merged_forecast(plan, plan.reuse_end, hidden)
            hidden = hidden + residual[0]
            if encoder is not None and residual[1] is not None:
                encoder = encoder + residual[1]
            elif encoder is not None and in_graph:
                encoder = _copy(encoder)
            if plan.decision is Decision.SELECTIVE and self.tokens is not None:
                hidden, spent = self.tokens.recompute(
                    lambda j, a, kw: self.block_forwards[j](*a, **kw), sched.span_start, plan.reuse_end,
                    plan.groups, self._states(plan), args, kwargs, fresh, hidden,  # type: ignore[arg-type]
                    refresh=plan.reuse_end != sched.slot_ends[-1] or sched.order == 0,
                )
                plan.blocks_run += spent
            return hidden, encoder
        if in_graph:
            return _copy(hidden), None if encoder is None else _copy(encoder)
        return hidden, encoder

    def exit_block(self, index: int, out_hidden: torch.Tensor | None, out_encoder: torch.Tensor | None) -> None:
        """Block ``index``'s exit with its output streams (``None`` when it was skipped): count it, observe the
        probe, refresh the cached residuals, and close the call after the last block."""
        plan = self.plan
        assert plan is not None
        sched = self.scheduler
        if out_hidden is not None:
            plan.blocks_run += 1
            if sched.probe_blocks and index + 1 == sched.probe_blocks:
                self._after_probe(plan, out_hidden - plan.in0)
                plan.in0 = None
            if (index + 1) in sched.slot_ends and plan.span_in is not None and index >= sched.span_start:
                self._refresh(plan, index + 1, out_hidden, out_encoder)
        if index == len(self.blocks) - 1 and not sched.output_target:
            self.end_call()

    def run_output(self, forward: OriginalForward, args: tuple, kwargs: dict) -> Any:
        """The output projection (``target="output"``): forecast it on reused steps, else run and store it."""
        if self.plan is None:  # called outside a transformer call with blocks (should not happen)
            return forward(*args, **kwargs)
        hidden = args[0] if args else next(iter(kwargs.values()))
        if self.enter_output():
            output = forward(*args, **kwargs)
            self.exit_output(output)
            return output
        output = self.skip_output(hidden)
        self.exit_output(None)
        return output

    def enter_output(self) -> bool:
        """Whether the output projection runs in this call (else :meth:`skip_output` forecasts it)."""
        plan = self.plan
        assert plan is not None
        return plan.decision is not Decision.REUSE

    def skip_output(self, hidden: torch.Tensor, in_graph: bool = False) -> torch.Tensor:
        """The cached (or forecast) output projection (``in_graph``: always a new tensor)."""
        plan = self.plan
        assert plan is not None
        out = self._merged_forecast(plan, OUTPUT_SLOT, hidden)[0]
        return out.clone() if in_graph else out

    def exit_output(self, output: torch.Tensor | None) -> None:
        """Store the projection's ``output`` (``None`` when forecast) and close the call."""
        plan = self.plan
        assert plan is not None
        if output is not None:
            detached = output.detach()
            for branch, rows in plan.groups:
                part = detached if len(plan.groups) == 1 else detached[rows]
                self.scheduler.store(self._state(branch), OUTPUT_SLOT, (part, None), plan.info.step)
        self.end_call()

    # --- residuals --------------------------------------------------------------------------------
    def _note_stream_bytes(self, plan: CallPlan, hidden: torch.Tensor, encoder: torch.Tensor | None) -> None:
        per_row = hidden[0].numel() * hidden.element_size()
        if encoder is not None:
            per_row += encoder[0].numel() * encoder.element_size()
        for branch, rows in plan.groups:
            n = len(range(hidden.shape[0])[rows]) if isinstance(rows, slice) else int(rows.numel())
            self.stream_bytes[branch] = max(self.stream_bytes.get(branch, 0), per_row * n)

    def _merged_forecast(self, plan: CallPlan, end: int, like: torch.Tensor) -> Streams:
        parts = [(rows, self.scheduler.forecast(self._state(b), end, plan.info.step)) for b, rows in plan.groups]
        if len(parts) == 1:
            return parts[0][1]
        merged: list[torch.Tensor | None] = []
        for k in range(2):
            tensors = [p[k] for _, p in parts]
            if any(t is None for t in tensors):
                merged.append(None)
                continue
            out = torch.empty((like.shape[0],) + tensors[0].shape[1:], dtype=tensors[0].dtype, device=tensors[0].device)
            for (rows, _), t in zip(parts, tensors):
                out[rows] = t
            merged.append(out)
        return (merged[0], merged[1])  # type: ignore[return-value]

    def _refresh(self, plan: CallPlan, end: int, out_hidden: torch.Tensor, out_encoder: torch.Tensor | None) -> None:
        in_hidden, in_encoder = plan.span_in  # type: ignore[misc]
        res_hidden = (out_hidden - in_hidden).detach()
        res_encoder = None
        if out_encoder is not None and in_encoder is not None and out_encoder.shape == in_encoder.shape:
            res_encoder = (out_encoder - in_encoder).detach()
        for branch, rows in plan.groups:
            residual = (res_hidden if len(plan.groups) == 1 else res_hidden[rows],
                        None if res_encoder is None else (res_encoder if len(plan.groups) == 1 else res_encoder[rows]))
            self.scheduler.store(self._state(branch), end, residual, plan.info.step)

    def _after_probe(self, plan: CallPlan, probe: torch.Tensor) -> None:
        changes = []
        for branch, rows in plan.groups:
            part = probe if len(plan.groups) == 1 else probe[rows]
            changes.append(self.scheduler.observe_probe(self._state(branch), part))
        change_by_branch = self.relative_changes([b for b, _ in plan.groups], changes, probe)
        plan.changes = change_by_branch
        if plan.decision is not Decision.PROBE:
            return
        decisions = []
        for branch, _ in plan.groups:
            change = change_by_branch[branch]
            state = self._state(branch)
            decisions.append(Decision.COMPUTE if change is None else self.scheduler.decide_after_probe(state, change))
        plan.decision = combine(decisions)
        if plan.decision is Decision.REUSE:
            plan.reuse_end = self.scheduler.reuse_end(plan.decision)
        self._publish()

    def relative_changes(self, branches: list[str], parts: list[torch.Tensor | None],
                         like: torch.Tensor) -> dict[str, float | None]:
        """Per branch, the probe's relative L1 change from its ``[numerator, denominator]`` (``None``: unknown),
        the same on every rank of :attr:`decision_group`: there the parts are summed over the ranks first (each
        holds a token shard of equal size, so the sums' ratio is the whole sequence's), and a change known on
        only some ranks counts as unknown. One host sync for all branches of the call."""
        group = self.decision_group()
        if group is None and all(p is None for p in parts):
            return {b: None for b in branches}
        rows = [torch.cat([p.float(), p.new_ones(1, dtype=torch.float32)]) if p is not None
                else torch.zeros(3, device=like.device) for p in parts]
        table = torch.stack(rows)  # (branches, 3): numerator, denominator, ranks that know it
        ranks = 1
        if group is not None:
            torch.distributed.all_reduce(table, group=group)
            ranks = torch.distributed.get_world_size(group)
        return {b: (n / max(d, 1e-12) if round(k) == ranks else None) for b, (n, d, k) in zip(branches, table.tolist())}

    def end_call(self) -> None:
        """Update counters and statistics once the last block returned."""
        plan = self.plan
        if plan is None:
            return
        full = plan.decision is Decision.COMPUTE
        for branch, _ in plan.groups:
            self.scheduler.end_call(self._state(branch), plan.info.step, full)
            if not full:
                self.context.cache_status.setdefault(branch, CacheStatus()).cached_steps.append(plan.info.step)
        total_bytes = 0
        for branch, state in self.states.items():
            nbytes = state.nbytes()
            total_bytes += nbytes
            self.peak_branch_bytes[branch] = max(self.peak_branch_bytes.get(branch, 0), nbytes)
        self.peak_cached_bytes = max(self.peak_cached_bytes, total_bytes)
        if self.stats_enabled:
            for branch, _ in plan.groups:
                state = self._state(branch)
                self._stats.append(
                    {
                        "transformer": self.transformer_name,
                        "call": self._call_index,
                        "step": plan.info.step,
                        "num_steps": plan.info.num_steps,
                        "branch": branch,
                        "scheduler": self.scheduler.name,
                        "decision": plan.decision.value,
                        "reason": plan.reasons.get(branch),
                        "blocks_computed": plan.blocks_run,
                        "blocks_total": len(self.blocks),
                        "probe_change": plan.changes.get(branch),
                        **self.scheduler.record(state),
                        "cached_bytes": state.nbytes(),
                    }
                )
        plan.span_in = None
        plan.in0 = None

    # --- read-out --------------------------------------------------------------------------------
    def stats(self) -> list[dict[str, Any]]:
        """One record per (transformer call, branch) since the last :meth:`reset_stats`."""
        return [dict(r) for r in self._stats]

    def reset_stats(self) -> None:
        """Drop the statistics records (the peak byte counters too)."""
        self._stats.clear()
        self.peak_cached_bytes = 0
        self.peak_branch_bytes.clear()
        self.stream_bytes.clear()
