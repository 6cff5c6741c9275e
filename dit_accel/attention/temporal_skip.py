"""``temporal_skip``: temporally-coherent tile skipping. Tiles the kernel found negligible at one
denoising step stay skipped at the next ones, until a refresh.

Per (transformer, layer, guidance branch), in the context's state store:

* a **refresh** call runs the draft plan (and, in ``combo``, recomputes the token order); its selection
  becomes the *base* mask and the skip list is emptied;
* after every computed call the kernel's tile statistics come back through :meth:`observe`: a computed
  tile whose statistic (log upper bound of its largest attention probability; its share of any row's
  mass is at most ``128 * exp(stat)``) is below ``skip_threshold`` joins the skip list;
* the calls in between run ``base & ~skip`` (plus the protected tiles: diagonal, text, blocks pooling
  cannot represent), with no planning beyond that;
* a refresh happens every ``refresh_period`` *computed* calls of the layer, and at once for the query
  blocks whose draft estimate drifted (``drift_check``: the estimated mass outside the refresh plan
  exceeds by more than ``drift_tolerance`` what it was when the plan was made, and at least ``1 - top_p``; those rows take the fresh selection and forget their skips,
  decided on the device without a host synchronisation). The drift check costs one draft estimate
  per call; without it the calls between refreshes plan nothing.

Exact-mass calibration (``calibrate``, off by default: too slow without a fused kernel, see the field): on the last dense warm-up step (the call runs
dense anyway) the exact block mass of the layer is computed once (:func:`oracle.block_mass`, one extra
attention-score pass) and kept per branch; every refresh then selects the top-p of the mean of that mass
and the fresh draft map. Why: offline on the testbed's captured q/k, the exact mass of the warm-up's
last step selects as well as the exact mass of the current step (the oracle) even 12 steps later, while
the draft alone is 2-4 dB worse at equal density (sparse_NOTES.md). Without a warm-up step the first
refresh computes it. A k-means order changes at each refresh, so there the calibration is skipped.

Coherence with feature caching: a step on which the cache skips this layer's block never calls the
attention, so it neither advances the refresh counter nor touches the skip list; the counter counts
computed calls only (``ts_calls``) and ``ts_last_step`` records the last step the layer ran. State is
cleared at every new pipeline call (new generation) and is kept apart per guidance branch. When one
call batches several branches (CogVideoX, PixArt, SD3, LTX) they refresh together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from dit_accel.attention.draft import DraftConfig, DraftEstimate, PlannedMethod, permute_tokens, top_p_keep
from dit_accel.attention.methods import SparsePlan, register_method
from dit_accel.attention.oracle import block_mass
from dit_accel.attention.sparse_base import (
    BLOCK,
    add_call_stats,
    branch_rows,
    check_range,
    safety_reason,
    stats_enabled,
    text_blocks_of,
    warmup_steps,
)
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
    torch computation it costs ~20 dense attention calls per layer and branch (200 ms at 32,760 tokens,
    3.7 s at 75,600 on an H100: ~38 % of a 50-step generation's sparse attention time,
    sparse_speed_gpu.json), for +0.5 dB at most over the draft on the testbed (sparse_quality_gpu_run2)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.calibrate, bool):
            raise ValueError(f"calibrate must be a bool, got {self.calibrate!r}")
        check_range("skip_threshold", self.skip_threshold, -math.inf, 0.0)
        check_range("refresh_period", self.refresh_period, 1, 10**6, integer=True)
        if not isinstance(self.drift_check, bool):
            raise ValueError(f"drift_check must be a bool, got {self.drift_check!r}")
        check_range("drift_tolerance", self.drift_tolerance, 0.0, 1.0)


def _rows_of(states: dict[str, dict[str, Any]], groups: dict[str, torch.Tensor], key: str, batch: int
             ) -> torch.Tensor:
    """A per-branch state tensor re-assembled over the call's batch rows."""
    if len(groups) == 1:
        return states[next(iter(groups))][key]
    first = states[next(iter(groups))][key]
    out = first.new_empty((batch, *first.shape[1:]))
    for branch, rows in groups.items():
        out[rows] = states[branch][key]
    return out


def _branch_part(t: torch.Tensor, rows: torch.Tensor, groups: dict[str, torch.Tensor]) -> torch.Tensor:
    """The rows ``rows`` of a per-call tensor for one branch's state: ``t`` itself when the call holds one
    branch (its rows are then all of the batch, in order), so no copy is made."""
    return t if len(groups) == 1 else t.index_select(0, rows)


class TemporalSkipMixin:
    """The plan/observe steps of temporal skipping (shared by ``temporal_skip`` and ``combo``)."""

    @property
    def needs_tile_stats(self) -> bool:  # type: ignore[override]
        """Tile statistics are asked for only when they can skip a tile (``skip_threshold`` above ``-inf``):
        they cost the kernel +13-16 % (benchmarks/KERNEL_NOTES.md)."""
        return self.cfg.resolved("skip_threshold") > -math.inf

    def plan(self, q: torch.Tensor, k: torch.Tensor, ctx: "AttentionCall") -> "BlockMask | SparsePlan | None":
        """As :meth:`PlannedMethod.plan`; on the last dense warm-up step also the exact-mass calibration."""
        reason = safety_reason(self.cfg, ctx)
        if reason is None:
            return self._plan(q, k, ctx)
        add_call_stats(ctx, sparse_off=reason)
        if (reason == "warmup" and self.cfg.calibrate
                and ctx.step == warmup_steps(self.cfg, ctx.num_steps) - 1 and ctx.layer >= self.cfg.dense_first_layers):
            self._calibrate(q, k, ctx, self.order(q, k, ctx))
        return None

    def _calibrate(self, q: torch.Tensor, k: torch.Tensor, ctx: "AttentionCall", perm: torch.Tensor | None) -> None:
        """Store the exact block mass of this call (in the order ``perm``) per guidance branch."""
        if perm is not None and perm.dim() != 1:
            return  # a per-head (k-means) order changes at every refresh: the mass would not match it
        mass = block_mass(permute_tokens(q, perm), permute_tokens(k, perm))
        for b, rows in branch_rows(ctx, q.shape[0], q.device).items():
            ctx.state(b).update(ts_mass=mass.index_select(0, rows), ts_mass_perm=perm)
        add_call_stats(ctx, calibrated=True)

    def _fresh_keep(self, est: DraftEstimate, states: dict[str, dict[str, Any]], groups: dict[str, torch.Tensor],
                    perm: torch.Tensor | None, batch: int) -> torch.Tensor:
        """The refresh selection: top-p of the mean of the calibrated exact mass and the draft map when every
        branch has a calibration in the order ``perm``, else the draft's own selection."""
        if not all("ts_mass" in states[b] and states[b]["ts_mass_perm"] is perm
                   and states[b]["ts_mass"].shape[1:] == est.probs.shape[1:] for b in groups):
            return est.keep
        mass = _rows_of(states, groups, "ts_mass", batch)
        nb = mass.shape[-1]
        min_blocks = max(1, math.ceil(self.cfg.resolved("min_blocks_fraction") * nb))
        return top_p_keep(0.5 * (mass + est.probs), self.cfg.resolved("top_p"), min_blocks) | est.protect

    def _refresh_due(self, state: dict[str, Any], rows: int, heads: int, nb: int, sequence: tuple) -> bool:
        base = state.get("ts_base")
        if base is None or tuple(base.shape) != (rows, heads, nb, nb):
            return True
        if state.get("ts_sequence") != sequence:
            return True  # same block count, other sequence length or grid: the stored plan is for other tokens
        return state["ts_calls"] >= self.cfg.resolved("refresh_period")

    @property
    def _mask_reusable(self) -> bool:
        """Whether a reuse call computes exactly the refresh call's mask, so that the BlockMask built on the
        refresh is returned again: no drift check (the plan only changes on refresh) and no skipping (the
        skip list stays empty; the base plan holds the protected tiles, so ``(base & ~skip) | protect`` is
        the base)."""
        return not self.cfg.drift_check and self.cfg.resolved("skip_threshold") == -math.inf

    @staticmethod
    def _cached_mask(states: dict[str, dict[str, Any]], groups: dict[str, torch.Tensor], key: tuple, seq_len: int
                     ) -> "BlockMask | None":
        """The BlockMask the last refresh built for the same branches in the same batch rows (``key``), or
        ``None``."""
        cached = states[next(iter(groups))].get("ts_mask")
        if cached is None or cached[0] != key or tuple(cached[1].seq_lengths) != (seq_len, seq_len):
            return None
        if any(states[b].get("ts_mask") is not cached for b in groups):
            return None
        return cached[1]

    def _plan(self, q: torch.Tensor, k: torch.Tensor, ctx: "AttentionCall") -> "BlockMask | SparsePlan | None":
        cfg = self.cfg
        B, H, S, _ = q.shape
        nb = -(-S // BLOCK)
        text = text_blocks_of(ctx.layout, S, q.device)
        groups = branch_rows(ctx, B, q.device)
        states = {b: ctx.state(b) for b in groups}
        sequence = (S, ctx.layout)
        refresh = any(self._refresh_due(states[b], len(r), H, nb, sequence) for b, r in groups.items())
        reusable = self._mask_reusable
        batch_key = (tuple(ctx.branches), B)  # decides which batch rows hold which branch (branch_rows)
        drift_rows: torch.Tensor | None = None
        mask: "BlockMask | None" = None
        if refresh:
            perm = self.order(q, k, ctx)
            # with block_indices the selection kernel writes the BlockMask rows of est.keep: no compaction pass
            # below when the refresh plan is the draft's own selection; with calibration on, the plan is usually
            # the calibrated one, so the rows are not asked for (est.block_mask compacts keep when they are absent)
            est = self.estimate(q, k, perm, text, block_indices=not cfg.calibrate)
            self.record_estimate(ctx, est)
            if cfg.calibrate and not all("ts_mass" in states[b] for b in groups):
                self._calibrate(q, k, ctx, perm)  # no warm-up step calibrated this layer
            keep = self._fresh_keep(est, states, groups, perm, B)
            if keep is est.keep:
                mask = est.block_mask(S)
            # the row's estimated mass outside the plan: only the drift check reads it
            outside = (est.probs * ~keep).sum(-1) if cfg.drift_check else None
            for b, rows in groups.items():
                st = states[b]
                st["ts_base"] = _branch_part(keep, rows, groups)
                st["ts_protect"] = _branch_part(est.protect, rows, groups)
                if outside is not None:
                    st["ts_outside"] = _branch_part(outside, rows, groups)
                st["ts_skip"] = torch.zeros_like(st["ts_base"])
                st["ts_perm"] = perm if perm is None or perm.dim() == 1 else _branch_part(perm, rows, groups)
                st["ts_calls"] = 0
                st["ts_sequence"] = sequence
                st["ts_refreshes"] = st.get("ts_refreshes", 0) + 1
                st.pop("ts_mask", None)
        else:
            perms = [states[b]["ts_perm"] for b in groups]
            if perms[0] is None or perms[0].dim() == 1:
                perm = perms[0]
            else:
                perm = _rows_of(states, groups, "ts_perm", B)
            if reusable:
                mask = self._cached_mask(states, groups, batch_key, S)
            if mask is None or stats_enabled(ctx):
                base = _rows_of(states, groups, "ts_base", B)
                skip = _rows_of(states, groups, "ts_skip", B)
                protect = _rows_of(states, groups, "ts_protect", B)
            if mask is None:
                keep = (base & ~skip) | protect
            if cfg.drift_check:
                est = self.estimate(q, k, perm, text)
                # Drift is measured against the refresh plan, not against the skips: skipped tiles were
                # judged by the kernel's exact statistics, the draft map would only second-guess them.
                # The reference is the row's estimated mass outside the plan when it was made (with a
                # calibrated plan it need not be below 1 - top_p): drift is the growth of that share.
                outside = (est.probs * ~(base | protect)).sum(-1)
                reference = _rows_of(states, groups, "ts_outside", B)
                drift_rows = outside > reference.clamp_min(1.0 - cfg.resolved("top_p")) + cfg.resolved("drift_tolerance")
                d = drift_rows.unsqueeze(-1)
                base = torch.where(d, self._fresh_keep(est, states, groups, perm, B), base)
                skip = skip & ~d
                protect = torch.where(d, est.protect, protect)
                reference = torch.where(drift_rows, (est.probs * ~(base | protect)).sum(-1), reference)
                keep = (base & ~skip) | protect
                for b, rows in groups.items():
                    states[b].update(ts_base=_branch_part(base, rows, groups), ts_skip=_branch_part(skip, rows, groups),
                                     ts_protect=_branch_part(protect, rows, groups),
                                     ts_outside=_branch_part(reference, rows, groups))
            if stats_enabled(ctx):
                values = [(base & skip & ~protect).sum()]
                if drift_rows is not None:
                    values.append(drift_rows.sum())
                values = torch.stack(values).tolist()
                add_call_stats(ctx, order=self.order_name, skipped_tiles=int(values[0]),
                               drift_rows=int(values[1]) if drift_rows is not None else 0)
        for b in groups:
            st = states[b]
            st["ts_calls"] += 1
            st["ts_last_step"] = ctx.step
            st["ts_calls_total"] = st.get("ts_calls_total", 0) + 1
        add_call_stats(ctx, refresh=refresh)
        if mask is None:
            mask = block_mask_from_bool(keep, S, S)
        if refresh and reusable:
            cached = (batch_key, mask)
            for b in groups:
                states[b]["ts_mask"] = cached
        return mask if perm is None else SparsePlan(mask, perm)

    def observe(self, ctx: "AttentionCall", tile_stats: torch.Tensor) -> None:
        """Add the computed tiles whose statistic is below ``skip_threshold`` to each branch's skip list."""
        threshold = self.cfg.resolved("skip_threshold")
        if threshold == -math.inf:
            return
        groups = branch_rows(ctx, tile_stats.shape[0], tile_stats.device)
        with_stats = stats_enabled(ctx)
        new_total: list[torch.Tensor] = []
        for b, rows in groups.items():
            st = ctx.state(b)
            if "ts_skip" not in st:
                continue
            stats = _branch_part(tile_stats, rows, groups)
            if stats.shape[1] != st["ts_skip"].shape[1]:
                stats = stats.expand(-1, st["ts_skip"].shape[1], -1, -1)
            # computed tiles (not -inf) below the threshold; same as isfinite(stats) & (stats < threshold),
            # since threshold <= 0 here, in 3 device ops instead of 6 (isfinite is abs, ne, eq, and)
            new = (stats > -math.inf) & (stats < threshold) & ~st["ts_protect"]
            st["ts_skip"] = st["ts_skip"] | new
            if with_stats:
                new_total.append(new.sum())
        if new_total:
            add_call_stats(ctx, newly_skipped=int(torch.stack(new_total).sum()))


@register_method
class TemporalSkipMethod(TemporalSkipMixin, PlannedMethod):
    """Draft plan on refresh calls, kernel-statistics skip list in between (see the module docstring)."""

    name = "temporal_skip"
    config_class = TemporalSkipConfig
