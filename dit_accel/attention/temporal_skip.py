"""``temporal_skip``: temporally-coherent tile skipping. Tiles the kernel found negligible at one
denoising step stay skipped at the next ones, until a refresh.

:class:`TemporalSkip` is the reuse stage (shared with ``combo``). Per (transformer, layer, guidance branch) it
keeps a :class:`TemporalSkipState`:

* a **refresh** call runs the method's order and draft selection (in ``combo`` the token order is recomputed);
  its selection becomes the *base* mask and the skip list is emptied;
* after every computed call the kernel's tile statistics come back through :meth:`TemporalSkip.observe`: a
  computed tile whose statistic (log upper bound of its largest attention probability; its share of any row's
  mass is at most ``128 * exp(stat)``) is below ``skip_threshold`` joins the skip list;
* the calls in between run ``base & ~skip`` (plus the protected tiles: diagonal, text, blocks pooling
  cannot represent), with no planning beyond that;
* a refresh happens every ``refresh_period`` *computed* calls of the layer, and at once for the query
  blocks whose draft estimate drifted (``drift_check``: the estimated mass outside the refresh plan
  exceeds by more than ``drift_tolerance`` what it was when the plan was made, and at least ``1 - top_p``;
  those rows take the fresh selection and forget their skips, decided on the device without a host
  synchronisation). The drift check costs one draft estimate per call; without it the calls between
  refreshes plan nothing.

Exact-mass calibration (``calibrate``, off by default: too slow without a fused kernel, see the field): on the
last dense warm-up step (the call runs dense anyway) the exact block mass of the layer is computed once
(:func:`oracle.block_mass`, one extra attention-score pass) and kept per branch; every refresh then selects the
top-p of the mean of that mass and the fresh draft map. Why: on the testbed's captured q/k, the exact mass of
the warm-up's last step selects as well as the exact mass of the current step (the oracle) even 12 steps
later, while the draft alone is 2-4 dB worse at equal density. Without a warm-up step the first refresh
computes it. A k-means order changes at each refresh, so there the calibration is skipped.

Coherence with feature caching: a step on which the cache skips this layer's block never calls the
attention, so it neither advances the refresh counter nor touches the skip list; the counter counts
computed calls only. State is reset at every new pipeline call (new generation) and is kept apart per guidance
branch. When one call batches several branches (CogVideoX, PixArt, SD3, LTX) they refresh together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from dit_accel.attention.base import OrderStage, PlannedMethod, PlanStages, SparsePlan, plan_of, warmup_steps
from dit_accel.attention.blocks import BLOCK, Order, branch_rows, permute_tokens, text_blocks_of
from dit_accel.attention.draft import DraftConfig, DraftSelection
from dit_accel.attention.draft_estimate import DraftEstimate, top_p_keep
from dit_accel.attention.oracle import block_mass
from dit_accel.checks import check_bool, check_number
from dit_accel.context import State
from dit_accel.kernels import block_mask_from_bool

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

    from dit_accel.context import AttentionCall


@dataclass(frozen=True)
class TemporalSkipConfig(DraftConfig):
    """Options of ``temporal_skip`` (the draft options set the plan made on refresh calls)."""

    skip_threshold: float | None = None
    """Natural-log tile statistic below which a computed tile is skipped at the following calls, in
    [-inf, 0]; ``-inf`` never skips (``None``: from ``quality``)."""
    refresh_period: int | None = None
    """Computed calls of a layer between two full re-plans, >= 1 (``None``: from ``quality``)."""
    drift_check: bool = True
    """On calls between refreshes, re-estimate the draft map and re-plan the query blocks that drifted."""
    drift_tolerance: float | None = None
    """Extra estimated mass outside the mask, beyond ``1 - top_p``, that triggers a row re-plan, in
    [0, 1] (``None``: from ``quality``)."""
    calibrate: bool = False
    """Compute the exact block mass once per generation (last dense warm-up step) and plan every refresh
    from the mean of it and the draft map (see the module docstring). Off by default: with the chunked
    torch computation it costs ~20 dense attention calls per layer and branch (about 38 % of a 50-step
    generation's sparse attention time at Wan-14B 720p on an H100), for +0.5 dB at most over the draft on
    the testbed."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bool("calibrate", self.calibrate)
        check_number("skip_threshold", self.skip_threshold, -math.inf, 0.0, allow_none=True)
        check_number("refresh_period", self.refresh_period, 1, 10**6, integer=True, allow_none=True)
        check_bool("drift_check", self.drift_check)
        check_number("drift_tolerance", self.drift_tolerance, 0.0, 1.0, allow_none=True)


@dataclass
class TemporalSkipState(State):
    """The refresh plan and skip list of one (transformer, layer, branch); tensors hold this branch's rows."""

    base: torch.Tensor | None = None
    """``(rows, H, QB, KB)`` bool: the refresh plan (``None`` before the first refresh)."""
    protect: torch.Tensor | None = None
    """``(rows, H, QB, KB)`` bool: the tiles always computed (diagonal, text, blocks pooling cannot represent)."""
    outside: torch.Tensor | None = None
    """``(rows, H, QB)``: estimated mass outside the plan when it was made (only with ``drift_check``)."""
    skip: torch.Tensor | None = None
    """``(rows, H, QB, KB)`` bool: tiles the kernel found negligible since the refresh."""
    order: Order | None = None
    """The order of the refresh plan: a shared order, or this branch's rows of a per-head one."""
    calls: int = 0
    """Computed calls since the refresh."""
    sequence: tuple[Any, ...] | None = None
    """``(sequence length, layout)`` the plan was made for."""
    refreshes: int = 0
    """Refreshes this generation."""
    calls_total: int = 0
    """Computed calls this generation."""
    mask: tuple[Any, "BlockMask"] | None = None
    """``(batch key, BlockMask)`` built on the refresh, returned again on reuse calls when they compute
    exactly the refresh plan (no drift check, no skipping)."""
    mass: torch.Tensor | None = None
    """``(rows, H, QB, KB)`` exact block mass of the calibration (``calibrate``)."""
    mass_order: Order | None = None
    """The order :attr:`mass` was computed in."""


def _gather_rows(parts: list[torch.Tensor], groups: dict[str, torch.Tensor], batch: int) -> torch.Tensor:
    """Per-branch tensors (in the order of ``groups``) re-assembled over the call's batch rows."""
    if len(groups) == 1:
        return parts[0]
    out = parts[0].new_empty((batch, *parts[0].shape[1:]))
    for rows, part in zip(groups.values(), parts):
        out[rows] = part
    return out


def _branch_part(t: torch.Tensor, rows: torch.Tensor, groups: dict[str, torch.Tensor]) -> torch.Tensor:
    """The rows ``rows`` of a per-call tensor for one branch's state: ``t`` itself when the call holds one
    branch (its rows are then all of the batch, in order), so no copy is made."""
    return t if len(groups) == 1 else t.index_select(0, rows)


class TemporalSkip:
    """Reuse stage: the draft plan on refresh calls, the kernel-statistics skip list in between (module doc)."""

    def __init__(self, cfg: TemporalSkipConfig, order: OrderStage | None, select: DraftSelection) -> None:
        self.cfg = cfg
        self.order = order
        """Order stage of the refresh plans (``None``: the model's order)."""
        self.select = select
        """Draft selection of the refresh plans and of the drift check."""

    @property
    def needs_tile_stats(self) -> bool:
        """Tile statistics are asked for only when they can skip a tile (``skip_threshold`` above ``-inf``):
        they cost the kernel 13-16 %."""
        return self.cfg.resolved("skip_threshold") > -math.inf

    @property
    def mask_reusable(self) -> bool:
        """Whether a reuse call computes exactly the refresh call's mask, so that the BlockMask built on the
        refresh is returned again: no drift check (the plan only changes on refresh) and no skipping (the
        skip list stays empty; the base plan holds the protected tiles, so ``(base & ~skip) | protect`` is
        the base)."""
        return not self.cfg.drift_check and self.cfg.resolved("skip_threshold") == -math.inf

    def _order_of(self, q: torch.Tensor, k: torch.Tensor, ctx: "AttentionCall") -> Order | None:
        return None if self.order is None else self.order(q, k, ctx)

    # --- dense calls: calibration -------------------------------------------------------------------
    def dense_call(self, q: torch.Tensor, k: torch.Tensor, ctx: "AttentionCall", reason: str) -> None:
        """On the last dense warm-up step, the exact-mass calibration (``calibrate``)."""
        cfg = self.cfg
        if (reason == "warmup" and cfg.calibrate
                and ctx.step == warmup_steps(cfg, ctx.num_steps) - 1 and ctx.layer >= cfg.dense_first_layers):
            self._calibrate(q, k, ctx, self._order_of(q, k, ctx))

    def _calibrate(self, q: torch.Tensor, k: torch.Tensor, ctx: "AttentionCall", order: Order | None) -> None:
        """Store the exact block mass of this call (in ``order``) per guidance branch."""
        if order is not None and not order.shared:
            return  # a per-head (k-means) order changes at every refresh: the mass would not match it
        perm = None if order is None else order.perm
        mass = block_mass(permute_tokens(q, perm), permute_tokens(k, perm))
        for b, rows in branch_rows(ctx, q.shape[0], q.device).items():
            st = ctx.state(b, TemporalSkipState)
            st.mass, st.mass_order = mass.index_select(0, rows), order
        ctx.add_stats(calibrated=True)

    def _fresh_keep(self, est: DraftEstimate, states: list[TemporalSkipState], groups: dict[str, torch.Tensor],
                    order: Order | None, batch: int, top_p: float) -> torch.Tensor:
        """The refresh selection: top-p of the mean of the calibrated exact mass and the draft map when every
        branch has a calibration in ``order``, else the draft's own selection."""
        if not all(st.mass is not None and st.mass_order is order and st.mass.shape[1:] == est.probs.shape[1:]
                   for st in states):
            return est.keep
        mass = _gather_rows([st.mass for st in states], groups, batch)
        nb = mass.shape[-1]
        min_blocks = max(1, math.ceil(self.cfg.resolved("min_blocks_fraction") * nb))
        return top_p_keep(0.5 * (mass + est.probs), top_p, min_blocks) | est.protect

    def _refresh_due(self, st: TemporalSkipState, rows: int, heads: int, nb: int, sequence: tuple) -> bool:
        if st.base is None or tuple(st.base.shape) != (rows, heads, nb, nb):
            return True
        if st.sequence != sequence:
            return True  # same block count, other sequence length or grid: the stored plan is for other tokens
        return st.calls >= self.cfg.resolved("refresh_period")

    @staticmethod
    def _cached_mask(states: list[TemporalSkipState], key: tuple, seq_len: int) -> "BlockMask | None":
        """The BlockMask the last refresh built for the same branches in the same batch rows (``key``), or
        ``None``."""
        cached = states[0].mask
        if cached is None or cached[0] != key or tuple(cached[1].seq_lengths) != (seq_len, seq_len):
            return None
        if any(st.mask is not cached for st in states):
            return None
        return cached[1]

    # --- sparse calls -------------------------------------------------------------------------------
    def plan(self, q: torch.Tensor, k: torch.Tensor, ctx: "AttentionCall") -> "BlockMask | SparsePlan":
        """A refresh plan when one is due for any branch of the call, else the reused one (see module doc)."""
        cfg = self.cfg
        B, H, S, _ = q.shape
        nb = -(-S // BLOCK)
        top_p = cfg.top_p_of(ctx.layer)
        text = text_blocks_of(ctx.layout, S, q.device)
        groups = branch_rows(ctx, B, q.device)
        states = [ctx.state(b, TemporalSkipState) for b in groups]
        sequence = (S, ctx.layout)
        refresh = any(self._refresh_due(st, len(r), H, nb, sequence) for st, r in zip(states, groups.values()))
        reusable = self.mask_reusable
        batch_key = (tuple(ctx.branches), B)  # decides which batch rows hold which branch (branch_rows)
        drift_rows: torch.Tensor | None = None
        mask: "BlockMask | None" = None
        if refresh:
            order = self._order_of(q, k, ctx)
            # with block_indices the selection kernel writes the BlockMask rows of est.keep: no compaction pass
            # below when the refresh plan is the draft's own selection; with calibration on, the plan is usually
            # the calibrated one, so the rows are not asked for (est.block_mask compacts keep when they are absent)
            est = self.select.estimate(q, k, order, text, block_indices=not cfg.calibrate, layer=ctx.layer)
            self.select.record(ctx, est)
            if cfg.calibrate and not all(st.mass is not None for st in states):
                self._calibrate(q, k, ctx, order)  # no warm-up step calibrated this layer
            keep = self._fresh_keep(est, states, groups, order, B, top_p)
            if keep is est.keep:
                mask = est.block_mask(S)
            # the row's estimated mass outside the plan: only the drift check reads it
            outside = (est.probs * ~keep).sum(-1) if cfg.drift_check else None
            for st, rows in zip(states, groups.values()):
                st.base = _branch_part(keep, rows, groups)
                st.protect = _branch_part(est.protect, rows, groups)
                if outside is not None:
                    st.outside = _branch_part(outside, rows, groups)
                st.skip = torch.zeros_like(st.base)
                st.order = order if order is None or order.shared else Order(_branch_part(order.perm, rows, groups))
                st.calls = 0
                st.sequence = sequence
                st.refreshes += 1
                st.mask = None
        else:
            first = states[0].order
            if first is None or first.shared or len(groups) == 1:
                order = first
            else:
                order = Order(_gather_rows([st.order.perm for st in states], groups, B))
            if reusable:
                mask = self._cached_mask(states, batch_key, S)
            if mask is None or ctx.stats_enabled:
                base = _gather_rows([st.base for st in states], groups, B)
                skip = _gather_rows([st.skip for st in states], groups, B)
                protect = _gather_rows([st.protect for st in states], groups, B)
            if mask is None:
                keep = (base & ~skip) | protect
            if cfg.drift_check:
                est = self.select.estimate(q, k, order, text, layer=ctx.layer)
                # Drift is measured against the refresh plan, not against the skips: skipped tiles were
                # judged by the kernel's exact statistics, the draft map would only second-guess them.
                # The reference is the row's estimated mass outside the plan when it was made (with a
                # calibrated plan it need not be below 1 - top_p): drift is the growth of that share.
                outside = (est.probs * ~(base | protect)).sum(-1)
                reference = _gather_rows([st.outside for st in states], groups, B)
                drift_rows = outside > reference.clamp_min(1.0 - top_p) + cfg.resolved("drift_tolerance")
                d = drift_rows.unsqueeze(-1)
                base = torch.where(d, self._fresh_keep(est, states, groups, order, B, top_p), base)
                skip = skip & ~d
                protect = torch.where(d, est.protect, protect)
                reference = torch.where(drift_rows, (est.probs * ~(base | protect)).sum(-1), reference)
                keep = (base & ~skip) | protect
                for st, rows in zip(states, groups.values()):
                    st.base = _branch_part(base, rows, groups)
                    st.skip = _branch_part(skip, rows, groups)
                    st.protect = _branch_part(protect, rows, groups)
                    st.outside = _branch_part(reference, rows, groups)
            if ctx.stats_enabled:
                values = [(base & skip & ~protect).sum()]
                if drift_rows is not None:
                    values.append(drift_rows.sum())
                values = torch.stack(values).tolist()
                ctx.add_stats(skipped_tiles=int(values[0]),
                              drift_rows=int(values[1]) if drift_rows is not None else 0)
        for st in states:
            st.calls += 1
            st.calls_total += 1
        ctx.add_stats(refresh=refresh)
        if mask is None:
            mask = block_mask_from_bool(keep, S, S)
        if refresh and reusable:
            cached = (batch_key, mask)
            for st in states:
                st.mask = cached
        return plan_of(mask, order, fresh=refresh)

    def observe(self, ctx: "AttentionCall", tile_stats: torch.Tensor) -> None:
        """Add the computed tiles whose statistic is below ``skip_threshold`` to each branch's skip list."""
        threshold = self.cfg.resolved("skip_threshold")
        if threshold == -math.inf:
            return
        groups = branch_rows(ctx, tile_stats.shape[0], tile_stats.device)
        new_total: list[torch.Tensor] = []
        for b, rows in groups.items():
            st = ctx.state(b, TemporalSkipState)
            if st.skip is None:
                continue
            stats = _branch_part(tile_stats, rows, groups)
            if stats.shape[1] != st.skip.shape[1]:
                stats = stats.expand(-1, st.skip.shape[1], -1, -1)
            # computed tiles (not -inf) below the threshold; same as isfinite(stats) & (stats < threshold),
            # since threshold <= 0 here, in 3 device ops instead of 6 (isfinite is abs, ne, eq, and)
            new = (stats > -math.inf) & (stats < threshold) & ~st.protect
            st.skip = st.skip | new
            if ctx.stats_enabled:
                new_total.append(new.sum())
        if new_total:
            ctx.add_stats(newly_skipped=int(torch.stack(new_total).sum()))


class TemporalSkipMethod(PlannedMethod):
    """Draft plan on refresh calls, kernel-statistics skip list in between (see the module docstring)."""

    name = "temporal_skip"
    config_class = TemporalSkipConfig

    def build_stages(self) -> PlanStages:
        """The draft selection in the model's order, reused between refreshes."""
        select = DraftSelection(self.cfg)
        return PlanStages(order=None, select=select, reuse=TemporalSkip(self.cfg, None, select))
