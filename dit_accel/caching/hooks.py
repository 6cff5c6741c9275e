"""Block hooks (diffusers ``ModelHook``) that run a cache scheduler; one controller per transformer.

Every transformer block gets a :class:`CacheBlockHook` in its ``HookRegistry``. The hook of block 0
asks the controller for the call's plan (one host-side decision per call, before any block runs);
each hook then either runs its block, or returns at once without entering the block (the block's
own forward, its attention and MLP are not called):

* the first block of a skipped span returns ``input + cached (or forecast) residual``;
* the other blocks of the span return their input unchanged;
* with ``target="output"`` no residual is added: every block after the head returns its input and
  a :class:`CacheOutputHook` on ``proj_out`` returns the cached (or forecast) projection instead.

Guidance branches: the transformer's :class:`~dit_accel.context.TransformerContext` (filled by the
context hook before any block runs) labels every batch row ``cond``/``uncond``/``extra``. State is
kept per branch: with batched guidance the rows of each branch are sliced out of the residuals; a
call takes one decision for all its rows (computing if any branch needs it).

Before the blocks of a call run, the controller publishes its decision for every branch of the call in
``context.cache_status`` (a :class:`~dit_accel.context.CacheStatus`; ``"probe"`` is replaced by the final
decision once the probe blocks ran, before the span); the attention route records it with each attention call.
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
from diffusers.hooks.hooks import ModelHook

from dit_accel.caching.config import CacheConfig
from dit_accel.caching.schedulers import (
    OUTPUT_SLOT,
    BranchState,
    CacheScheduler,
    Decision,
    StepInfo,
    Streams,
    build_scheduler,
)
from dit_accel.block_hooks import InstalledHook, register_block_hook, remove_block_hooks
from dit_accel.context import CacheStatus, TransformerContext

logger = logging.getLogger("dit_accel")

CACHE_HOOK_NAME = "dit_accel_cache"
"""Name of the cache hook in each block's ``HookRegistry``."""

Rows = slice | torch.Tensor


@dataclass
class BlockRef:
    """One transformer block and its diffusers metadata (argument and return positions)."""

    name: str
    """Dotted module name, e.g. ``blocks.3``."""
    module: torch.nn.Module
    """The block module."""
    metadata: TransformerBlockMetadata
    """diffusers' ``TransformerBlockRegistry`` entry of the block class."""


def find_blocks(transformer: torch.nn.Module) -> list[BlockRef]:
    """All blocks of the transformer's block lists, in model order.

    Block lists are the ``nn.ModuleList`` children diffusers' own cache hooks look for (``blocks``,
    ``transformer_blocks``, ``single_transformer_blocks``, ...). Raises ``ValueError`` when none is
    found or a block class has no diffusers block metadata.
    """
    out: list[BlockRef] = []
    for list_name, child in transformer.named_children():
        if list_name not in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS or not isinstance(child, torch.nn.ModuleList):
            continue
        for index, block in enumerate(child):
            try:
                metadata = TransformerBlockRegistry.get(type(block))
            except ValueError as exc:
                known = sorted(c.__name__ for c in TransformerBlockRegistry._registry)
                raise ValueError(
                    f"block class {type(block).__name__} ({list_name}.{index}) has no diffusers block metadata; "
                    f"supported block classes: {known}"
                ) from exc
            out.append(BlockRef(f"{list_name}.{index}", block, metadata))
    if not out:
        raise ValueError(
            f"{type(transformer).__name__} has no block list (looked for ModuleList children named "
            f"{sorted(_ALL_TRANSFORMER_BLOCK_IDENTIFIERS)})"
        )
    return out


def _streams_of(ref: BlockRef, args: tuple, kwargs: dict) -> Streams:
    meta = ref.metadata
    hidden = meta._get_parameter_from_args_kwargs(meta.hidden_states_argument_name, args, kwargs)
    encoder = None
    if meta.return_encoder_hidden_states_index is not None:
        encoder = meta._get_parameter_from_args_kwargs(meta.encoder_hidden_states_argument_name, args, kwargs)
    return hidden, encoder


def _output_streams(ref: BlockRef, output: Any) -> Streams:
    meta = ref.metadata
    if isinstance(output, tuple):
        enc = None if meta.return_encoder_hidden_states_index is None else output[meta.return_encoder_hidden_states_index]
        return output[meta.return_hidden_states_index], enc
    return output, None


def _pack(ref: BlockRef, hidden: torch.Tensor, encoder: torch.Tensor | None) -> Any:
    """The block's return value built from the two streams (same layout as its forward returns)."""
    meta = ref.metadata
    if meta.return_encoder_hidden_states_index is None:
        return hidden
    size = max(meta.return_hidden_states_index, meta.return_encoder_hidden_states_index) + 1
    out: list[Any] = [None] * size
    out[meta.return_hidden_states_index] = hidden
    out[meta.return_encoder_hidden_states_index] = encoder
    return tuple(out)


SKETCH_DIM = 32
"""Width of the per-token random sketch that ranks tokens by change (ProCache selective tokens)."""


def _hidden_position(ref: BlockRef, kwargs: dict) -> str | int:
    """Keyword name or positional index of the block's hidden-states argument."""
    name = ref.metadata.hidden_states_argument_name
    if name in kwargs:
        return name
    params = list(inspect.signature(type(ref.module).forward).parameters)[1:]  # skip self
    return params.index(name)


def _with_hidden(ref: BlockRef, args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """``args, kwargs`` with the hidden-states argument replaced."""
    pos = _hidden_position(ref, kwargs)
    if isinstance(pos, str):
        return args, dict(kwargs, **{pos: hidden})
    return args[:pos] + (hidden,) + args[pos + 1:], kwargs


def _take_tokens(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` ``(B, k)`` of dim 1 of ``t`` (a batch dim of 1 is broadcast over the rows)."""
    batch, k = idx.shape
    if t.shape[0] == 1 and batch > 1:
        t = t.expand(batch, *t.shape[1:])
    index = idx.to(t.device).view(batch, k, *([1] * (t.dim() - 2))).expand(batch, k, *t.shape[2:])
    return torch.gather(t, 1, index)


def _token_subset_call(ref: BlockRef, args: tuple, kwargs: dict, idx: torch.Tensor, tokens: int) -> tuple[tuple, dict]:
    """The block's call arguments restricted to the tokens ``idx``: every tensor (also inside tuples and
    lists, e.g. rotary tables) whose dim 1 has the token count is gathered; the text stream is kept."""
    skip = {ref.metadata.encoder_hidden_states_argument_name}
    params = list(inspect.signature(type(ref.module).forward).parameters)[1:]

    def take(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == tokens:
            return _take_tokens(value, idx)
        if isinstance(value, (tuple, list)):
            return type(value)(take(v) for v in value)
        return value

    new_args = tuple(v if (i < len(params) and params[i] in skip) else take(v) for i, v in enumerate(args))
    new_kwargs = {key: (v if key in skip else take(v)) for key, v in kwargs.items()}
    return new_args, new_kwargs


def _row_groups(branches: tuple[str, ...]) -> list[tuple[str, Rows]]:
    """Rows of each branch, in order of first appearance: a slice when contiguous, else an index tensor."""
    order: list[str] = []
    rows: dict[str, list[int]] = {}
    for i, b in enumerate(branches):
        if b not in rows:
            order.append(b)
            rows[b] = []
        rows[b].append(i)
    out: list[tuple[str, Rows]] = []
    for b in order:
        idx = rows[b]
        if idx == list(range(idx[0], idx[-1] + 1)):
            out.append((b, slice(idx[0], idx[-1] + 1)))
        else:
            out.append((b, torch.tensor(idx, dtype=torch.long)))
    return out


@dataclass
class _CallPlan:
    """What the controller decided for the transformer call in progress."""

    info: StepInfo
    groups: list[tuple[str, Rows]]
    decision: Decision
    reasons: dict[str, str | None]
    reuse_end: int = 0
    span_in: Streams | None = None
    in0: torch.Tensor | None = None
    changes: dict[str, float | None] = field(default_factory=dict)
    blocks_run: int = 0


class CacheController:
    """Runs one scheduler on one transformer: per-branch states, per-call plan, statistics."""

    def __init__(self, transformer_name: str, context: TransformerContext, scheduler: CacheScheduler, blocks: list[BlockRef]) -> None:
        self.transformer_name = transformer_name
        self.context = context
        self.scheduler = scheduler
        self.blocks = blocks
        self.states: dict[str, BranchState] = {}
        self.plan: _CallPlan | None = None
        self._call_index: int | None = None
        self._stats: list[dict[str, Any]] = []
        self.stats_enabled = True
        self.peak_cached_bytes = 0
        """Largest total of cached bytes (all branches of this transformer) seen after a call."""
        self.peak_branch_bytes: dict[str, int] = {}
        """Largest cached bytes per branch."""
        self.stream_bytes: dict[str, int] = {}
        """Bytes of one span-input activation (hidden + text stream) per branch, for comparison."""
        self.block_hooks: list["CacheBlockHook"] = []
        """The block hooks in block order (set when installed; selective tokens run blocks through them)."""
        self._projections: dict[tuple[int, torch.device], torch.Tensor] = {}

    # --- state ------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every cached tensor and the published status (new generation, or the cache is removed)."""
        self.states.clear()
        self.plan = None
        self.context.cache_status.clear()

    def _state(self, branch: str) -> BranchState:
        if branch not in self.states:
            self.states[branch] = BranchState()
        return self.states[branch]

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
        groups = _row_groups(tuple(branches))
        decisions: dict[str, Decision] = {}
        reasons: dict[str, str | None] = {}
        for branch, rows in groups:
            state = self._state(branch)
            reason = self.scheduler.guardrail(info, state)
            if reason is None and not self._shapes_match(state, first_hidden, rows):
                reason = "shape_change"
            reasons[branch] = reason
            decisions[branch] = Decision.COMPUTE if reason is not None else self.scheduler.decide(info, state)
        decision = _combine(decisions.values())
        plan = _CallPlan(info=info, groups=groups, decision=decision, reasons=reasons)
        if decision in (Decision.REUSE, Decision.SELECTIVE):
            plan.reuse_end = self.scheduler.reuse_end(decision)
        self.plan = plan
        self._publish()

    def _shapes_match(self, state: BranchState, hidden: torch.Tensor, rows: Rows) -> bool:
        slot = next(iter(state.slots.values()), None)
        if slot is None:
            return True
        n = len(range(hidden.shape[0])[rows]) if isinstance(rows, slice) else int(rows.numel())
        # The output slot has the output's channels; rows and tokens must still match.
        same = slot[0].shape[1:-1] == hidden.shape[1:-1] if self.scheduler.output_target else slot[0].shape[1:] == hidden.shape[1:]
        return slot[0].shape[0] == n and same and slot[0].device == hidden.device

    def _publish(self) -> None:
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

    def _computed_ranges(self, plan: _CallPlan) -> tuple[tuple[int, int], ...]:
        n = len(self.blocks)
        if plan.decision in (Decision.COMPUTE, Decision.PROBE):
            return ((0, n),) if plan.decision is Decision.COMPUTE else ((0, self.scheduler.probe_blocks),)
        start = self.scheduler.span_start
        ranges = [(0, start), (plan.reuse_end, n)]
        return tuple(r for r in ranges if r[1] > r[0])

    def run_block(self, index: int, ref: BlockRef, hook: "CacheBlockHook", args: tuple, kwargs: dict) -> Any:
        """Run or skip block ``index`` according to the plan."""
        hidden, encoder = _streams_of(ref, args, kwargs)
        if index == 0:
            self.begin_call(hidden)
        plan = self.plan
        assert plan is not None
        sched = self.scheduler
        if index == 0 and sched.probe_blocks:
            plan.in0 = hidden
        if index == sched.span_start:
            plan.span_in = (hidden, encoder)
            self._note_stream_bytes(plan, hidden, encoder)
            if sched.token_share > 0 and plan.decision is Decision.COMPUTE:
                self._store_sketch(plan, self._sketch(hidden))
        skipped = plan.decision in (Decision.REUSE, Decision.SELECTIVE) and sched.span_start <= index < plan.reuse_end
        if skipped:
            if index == sched.span_start and not sched.output_target:
                fresh = hidden
                residual = self._merged_forecast(plan, plan.reuse_end, hidden)
                hidden = hidden + residual[0]
                if encoder is not None and residual[1] is not None:
                    encoder = encoder + residual[1]
                if plan.decision is Decision.SELECTIVE and sched.token_share > 0:
                    hidden = self._recompute_tokens(plan, args, kwargs, fresh, hidden)
            output = _pack(ref, hidden, encoder)
        else:
            output = hook.fn_ref.original_forward(*args, **kwargs)
            plan.blocks_run += 1
            out_hidden, out_encoder = _output_streams(ref, output)
            if sched.probe_blocks and index + 1 == sched.probe_blocks:
                self._after_probe(plan, out_hidden - plan.in0)
                plan.in0 = None
            if (index + 1) in sched.slot_ends and plan.span_in is not None and index >= sched.span_start:
                self._refresh(plan, index + 1, out_hidden, out_encoder)
        if index == len(self.blocks) - 1 and not sched.output_target:
            self.end_call()
        return output

    def run_output(self, hook: "CacheOutputHook", args: tuple, kwargs: dict) -> Any:
        """The output projection (``target="output"``): forecast it on reused steps, else run and store it."""
        plan = self.plan
        if plan is None:  # called outside a transformer call with blocks (should not happen)
            return hook.fn_ref.original_forward(*args, **kwargs)
        hidden = args[0] if args else next(iter(kwargs.values()))
        if plan.decision is Decision.REUSE:
            output = self._merged_forecast(plan, OUTPUT_SLOT, hidden)[0]
        else:
            output = hook.fn_ref.original_forward(*args, **kwargs)
            detached = output.detach()
            for branch, rows in plan.groups:
                part = detached if len(plan.groups) == 1 else detached[rows]
                self.scheduler.store(self._state(branch), OUTPUT_SLOT, (part, None), plan.info.step)
        self.end_call()
        return output

    # --- selective tokens (ProCache) ------------------------------------------------------------------
    def _sketch(self, hidden: torch.Tensor) -> torch.Tensor:
        """Per-token random projection ``(B, S, 32)`` (fixed seed: the same for every run), computed in
        fp32 and kept in the stream's dtype (1/12 of a bf16 stream at width 384)."""
        key = (hidden.shape[-1], hidden.device)
        proj = self._projections.get(key)
        if proj is None:
            g = torch.Generator().manual_seed(0)
            proj = (torch.randn(hidden.shape[-1], SKETCH_DIM, generator=g) / math.sqrt(SKETCH_DIM)).to(hidden.device)
            self._projections[key] = proj
        return (hidden.detach().float() @ proj).to(hidden.dtype)

    def _store_sketch(self, plan: _CallPlan, sketch: torch.Tensor) -> None:
        for branch, rows in plan.groups:
            self._state(branch).token_sketch = sketch if len(plan.groups) == 1 else sketch[rows]

    def _recompute_tokens(self, plan: _CallPlan, args: tuple, kwargs: dict, fresh: torch.Tensor,
                          approx: torch.Tensor) -> torch.Tensor:
        """Run the reused front span on the tokens whose span input changed most; return ``approx`` with
        their rows replaced by the fresh outputs, and refresh their rows of the cached residual."""
        sched = self.scheduler
        start, end = sched.span_start, plan.reuse_end
        batch, tokens = fresh.shape[0], fresh.shape[1]
        k = min(tokens, max(1, math.ceil(sched.token_share * tokens - 1e-9)))
        sketch = self._sketch(fresh)
        if k == tokens:
            idx = torch.arange(tokens, device=fresh.device).expand(batch, tokens)
        else:
            refs = [self._state(b).token_sketch for b, _ in plan.groups]
            if any(r is None for r in refs):
                score = sketch.float().square().sum(-1)
            else:
                ref = refs[0] if len(refs) == 1 else torch.empty_like(sketch)
                if len(refs) > 1:
                    for (_, rows), r in zip(plan.groups, refs):
                        ref[rows] = r
                score = (sketch.float() - ref.float()).square().sum(-1)
            idx = score.topk(k, dim=1).indices.sort(dim=1).values  # model order: attention sums as in a full run
        first = self.blocks[start]
        sub = _take_tokens(fresh, idx)
        call_args, call_kwargs = _token_subset_call(first, args, kwargs, idx, tokens)
        h = sub
        for j in range(start, end):
            a, kw = _with_hidden(self.blocks[j], call_args, call_kwargs, h)
            h = _output_streams(self.blocks[j], self.block_hooks[j].fn_ref.original_forward(*a, **kw))[0]
            plan.blocks_run += k / tokens
        index = idx.unsqueeze(-1).expand(-1, -1, approx.shape[-1])
        out = approx.scatter(1, index, h)
        # Refresh the recomputed rows of the cached front residual (a forecast slot keeps its history).
        if end != sched.slot_ends[-1] or sched.order == 0:
            delta = (h - sub).detach()
            sketch_index = idx.unsqueeze(-1).expand(-1, -1, SKETCH_DIM)
            new_sketch = sketch.gather(1, sketch_index)
            for branch, rows in plan.groups:
                state = self._state(branch)
                part = slice(None) if len(plan.groups) == 1 else rows
                cached = state.slots.get(end)
                if cached is not None and cached[0].shape == approx[part].shape:
                    cached[0].scatter_(1, index[part], delta[part].to(cached[0].dtype))
                if state.token_sketch is not None and state.token_sketch.shape == sketch[part].shape:
                    state.token_sketch.scatter_(1, sketch_index[part], new_sketch[part])
        return out

    def _note_stream_bytes(self, plan: _CallPlan, hidden: torch.Tensor, encoder: torch.Tensor | None) -> None:
        per_row = hidden[0].numel() * hidden.element_size()
        if encoder is not None:
            per_row += encoder[0].numel() * encoder.element_size()
        for branch, rows in plan.groups:
            n = len(range(hidden.shape[0])[rows]) if isinstance(rows, slice) else int(rows.numel())
            self.stream_bytes[branch] = max(self.stream_bytes.get(branch, 0), per_row * n)

    def _merged_forecast(self, plan: _CallPlan, end: int, like: torch.Tensor) -> Streams:
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

    def _refresh(self, plan: _CallPlan, end: int, out_hidden: torch.Tensor, out_encoder: torch.Tensor | None) -> None:
        in_hidden, in_encoder = plan.span_in  # type: ignore[misc]
        res_hidden = (out_hidden - in_hidden).detach()
        res_encoder = None
        if out_encoder is not None and in_encoder is not None and out_encoder.shape == in_encoder.shape:
            res_encoder = (out_encoder - in_encoder).detach()
        for branch, rows in plan.groups:
            residual = (res_hidden if len(plan.groups) == 1 else res_hidden[rows],
                        None if res_encoder is None else (res_encoder if len(plan.groups) == 1 else res_encoder[rows]))
            self.scheduler.store(self._state(branch), end, residual, plan.info.step)

    def _after_probe(self, plan: _CallPlan, probe: torch.Tensor) -> None:
        changes = []
        for branch, rows in plan.groups:
            part = probe if len(plan.groups) == 1 else probe[rows]
            changes.append(self.scheduler.observe_probe(self._state(branch), part))
        known = [c for c in changes if c is not None]
        values: list[float] = []
        if known:
            parts = torch.stack(known)  # (branches, 2): numerator and denominator of the relative L1
            if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
                # Context parallelism: each rank holds a token shard; sum so that every rank takes the same decision.
                torch.distributed.all_reduce(parts)
            # One host sync for all branches of the call.
            values = [n / max(d, 1e-12) for n, d in parts.tolist()]
        it = iter(values)
        change_by_branch = {b: (next(it) if c is not None else None) for (b, _), c in zip(plan.groups, changes)}
        plan.changes = change_by_branch
        if plan.decision is not Decision.PROBE:
            return
        decisions = []
        for branch, _ in plan.groups:
            change = change_by_branch[branch]
            state = self._state(branch)
            decisions.append(Decision.COMPUTE if change is None else self.scheduler.decide_after_probe(state, change))
        plan.decision = _combine(decisions)
        if plan.decision is Decision.REUSE:
            plan.reuse_end = self.scheduler.reuse_end(plan.decision)
        self._publish()

    def end_call(self) -> None:
        """Update counters and statistics once the last block returned."""
        plan = self.plan
        if plan is None:
            return
        full = plan.decision is Decision.COMPUTE
        total_bytes = 0
        for branch, _ in plan.groups:
            state = self._state(branch)
            if full:
                state.reused_in_row = 0
                state.last_computed_step = plan.info.step
                state.accumulated = 0.0
            else:
                state.reused_in_row += 1
                self.context.cache_status.setdefault(branch, CacheStatus()).cached_steps.append(plan.info.step)
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
                        "accumulated": state.accumulated if self.scheduler.probe_blocks else None,
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


def _combine(decisions) -> Decision:
    """One decision for a call whose branches voted: the most computing one wins."""
    ds = list(decisions)
    for d in (Decision.COMPUTE, Decision.PROBE, Decision.SELECTIVE, Decision.REUSE):
        if d in ds:
            return d
    return Decision.COMPUTE


class CacheBlockHook(ModelHook):
    """Per-block hook: runs the block or returns without entering it (see module doc)."""

    _is_stateful = True

    def __init__(self, controller: CacheController, index: int, ref: BlockRef) -> None:
        super().__init__()
        self.controller = controller
        self.index = index
        self.ref = ref

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        """Run or skip the block for the current plan."""
        return self.controller.run_block(self.index, self.ref, self, args, kwargs)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        """diffusers' ``_reset_stateful_cache`` forgets the cached tensors too."""
        if self.index == 0:
            self.controller.reset()
        return module


class CacheOutputHook(ModelHook):
    """Hook on the output projection for ``target="output"``: returns the forecast on reused steps."""

    def __init__(self, controller: CacheController) -> None:
        super().__init__()
        self.controller = controller

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        """Run or forecast the projection for the current plan."""
        return self.controller.run_output(self, args, kwargs)


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
    from dit_accel.caching.schedulers import make_cache_config

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
    attachment = CacheAttachment(transformer, controller)
    try:
        hooked = [(ref.module, CacheBlockHook(controller, index, ref)) for index, ref in enumerate(blocks)]
        controller.block_hooks = [hook for _, hook in hooked]
        if output_module is not None:
            hooked.append((output_module, CacheOutputHook(controller)))
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
