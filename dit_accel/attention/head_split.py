"""Break-even routing of a plan's heads: which (batch row, head) run dense attention instead of the kernel.

A method's ``dense_above`` (:attr:`dit_accel.attention.base.SparseConfig.dense_above`) sets the break-even density:
a fixed float, or ``"auto"``, read from the device's cost table (:mod:`dit_accel.kernels.cost_model`; on CPU the
table shipped for the GPU). When a plan is made, each head whose planned density is above it runs dense; the split
is stored per (transformer, layer, branch) and kept by the calls that reuse the plan, so reading the densities
costs one host synchronisation per plan. :func:`dit_accel.attention.route.run_plan` executes the split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dit_accel.attention.base import AttentionMethod, SparsePlan
from dit_accel.context import AttentionCall, State


def block_mask_density_tensor(mask) -> torch.Tensor:
    """Fraction of (query block, key block) tiles computed, as a 0-d tensor (no host sync, unlike
    ``dit_accel.kernels.block_mask_density``); converted to float when statistics are read."""
    kv_blocks = mask.kv_num_blocks.to(torch.float32)
    total = kv_blocks.sum()
    if getattr(mask, "full_kv_num_blocks", None) is not None:
        total = total + mask.full_kv_num_blocks.to(torch.float32).sum()
    q_len, kv_len = mask.seq_lengths
    bq, bk = mask.BLOCK_SIZE
    n_q = -(-q_len // bq)
    n_k = -(-kv_len // bk)
    return total / float(kv_blocks.shape[0] * kv_blocks.shape[1] * n_q * n_k)


def head_densities(mask, batch: int, heads: int) -> torch.Tensor:
    """``(batch, heads)`` fraction of the (query block, key block) tiles each head of ``mask`` computes (a mask's
    batch or head size of 1 broadcasts)."""
    counts = mask.kv_num_blocks.to(torch.float32).sum(-1)
    if getattr(mask, "full_kv_num_blocks", None) is not None:
        counts = counts + mask.full_kv_num_blocks.to(torch.float32).sum(-1)
    q_len, kv_len = mask.seq_lengths
    bq, bk = mask.BLOCK_SIZE
    return (counts / float(-(-q_len // bq) * -(-kv_len // bk))).expand(batch, heads)


def cost_table_for(device: torch.device):
    """The cost table ``dense_above="auto"`` reads on ``device``: the device's own on CUDA
    (:func:`~dit_accel.kernels.cost_model.cost_table`), the table shipped for the GPU elsewhere (see
    :attr:`~dit_accel.attention.base.SparseConfig.dense_above`)."""
    from dit_accel.kernels.cost_model import cost_table

    return cost_table(device) if device.type == "cuda" else _shipped()


_SHIPPED: list = []


def _shipped():
    if not _SHIPPED:
        from dit_accel.kernels.cost_model import shipped_table

        _SHIPPED.append(shipped_table())
    return _SHIPPED[0]


_BREAK_EVEN: dict[tuple, tuple[float, str]] = {}


def break_even_of(dense_above: float | str, device: torch.device, seq_len: int, head_dim: int,
                  precision: str) -> tuple[float, str]:
    """``(break-even density, its source)`` of a method's ``dense_above`` (not ``None``) for one call: a float
    is itself (``"fixed"``); ``"auto"`` asks the device's cost table (on CPU the table shipped for the GPU, see
    :attr:`~dit_accel.attention.base.SparseConfig.dense_above`), whose ``source`` says where it came from."""
    if dense_above != "auto":
        return float(dense_above), "fixed"
    key = (device.type, device.index, seq_len, head_dim, precision)
    hit = _BREAK_EVEN.get(key)
    if hit is None:
        table = cost_table_for(device)
        hit = _BREAK_EVEN[key] = (table.break_even_density(seq_len, head_dim, precision), table.source)
    return hit


@dataclass(frozen=True)
class HeadSplit:
    """Which heads of a plan run dense (break-even routing), chosen when the plan was made."""

    dense: tuple[int, ...]
    """Flat heads ``b * H + h`` run dense."""
    heads: int
    """``B * H`` of the call."""
    break_even: float
    """The break-even density the planned densities were compared with."""
    source: str
    """Where it came from: ``"fixed"``, ``"measured"``, ``"cache"`` or ``"shipped"``."""
    sparse_index: torch.Tensor | None
    """int32 flat heads that run the kernel, when some heads run dense and some do not (else ``None``)."""
    dense_rows: tuple[torch.Tensor, torch.Tensor] | None
    """``(b, h)`` int64 indices of the dense heads (``None`` when none or all are dense)."""
    dense_flags: torch.Tensor | None
    """``(B, H)`` bool, True for the dense heads (``None`` when none or all are dense)."""
    planned: float | None
    """Mean planned density of the call when the split read it (fresh plans), else ``None``."""
    effective: float | None
    """Mean density computed (dense heads count 1) when the split read it, else ``None``."""

    @property
    def all_dense(self) -> bool:
        """Whether every head runs dense."""
        return len(self.dense) == self.heads


@dataclass
class HeadSplitState(State):
    """The head split of the last fresh plan of one (transformer, layer, branch)."""

    split: HeadSplit | None = None
    """The split, or ``None`` before the first plan."""
    key: tuple | None = None
    """``(branches, B, H, S, break-even)`` the split was made for."""


def choose_split(mask, batch: int, heads: int, break_even: float, source: str, device: torch.device) -> HeadSplit:
    """The head split of ``mask``: a head runs dense when its planned density is above ``break_even``. The
    densities are read on the host (one synchronisation) unless ``break_even`` decides alone (>= 1: no head is
    above it; <= 0: every head is, an empty one aside)."""
    n = batch * heads
    planned = effective = None
    if break_even >= 1.0:
        dense: tuple[int, ...] = ()
    elif break_even <= 0.0:
        dense = tuple(range(n))
    else:
        values = head_densities(mask, batch, heads).reshape(-1).tolist()
        dense = tuple(i for i, d in enumerate(values) if d > break_even)
        planned = sum(values) / n
        effective = (sum(values) + sum(1.0 - values[i] for i in dense)) / n
    if not dense or len(dense) == n:
        return HeadSplit(dense, n, break_even, source, None, None, None, planned, effective)
    chosen = set(dense)
    sparse_index = torch.tensor([i for i in range(n) if i not in chosen], dtype=torch.int32, device=device)
    flat = torch.tensor(dense, dtype=torch.int64, device=device)
    flags = torch.zeros(n, dtype=torch.bool, device=device)
    flags[flat] = True
    return HeadSplit(dense, n, break_even, source, sparse_index, (flat // heads, flat % heads),
                     flags.view(batch, heads), planned, effective)


def head_split(method: AttentionMethod, call: AttentionCall, plan: SparsePlan, q: torch.Tensor,
               precision: str) -> HeadSplit | None:
    """The call's head split (``None`` when the method never routes heads dense): chosen on a fresh plan, the
    stored one on a reused plan; its facts go to the call's statistics."""
    if method.dense_above is None:
        return None
    B, H, S, D = q.shape
    be, source = break_even_of(method.dense_above, q.device, S, D, precision)
    branches = call.branches
    state = call.state(branches[0] if branches else "cond", HeadSplitState)
    key = (branches, B, H, S, be)
    split = state.split
    if plan.fresh or split is None or state.key != key:
        split = state.split = choose_split(plan.mask, B, H, be, source, q.device)
        state.key = key
    if call.stats_enabled:
        if split.effective is not None:
            density: torch.Tensor | float = split.effective
        elif split.all_dense:
            density = 1.0
        elif split.dense_flags is None:
            density = block_mask_density_tensor(plan.mask)
        else:
            density = torch.where(split.dense_flags, 1.0, head_densities(plan.mask, B, H)).mean()
        call.add_stats(dense_heads=split.dense, heads=split.heads, break_even=be, cost_source=source, density=density)
        if split.planned is not None:
            call.add_stats(planned_density=split.planned)
    return split
