"""The peers the benchmark runs beside dit-accel, and how each is tuned to the compute fraction of our cache.

Feature caches (diffusers 0.42.1 ``diffusers.hooks``; cache-dit when it imports):

- ``FirstBlockCache``: the first block always runs; the others are skipped while the relative L1 change of the
  first block's residual since the last computed step stays under a threshold. The threshold is chosen, without
  extra generations, by replaying that rule on the first-block residuals recorded during the stock model's first
  generation (:class:`FirstBlockRecorder`): the replay picks the threshold whose share of computed steps is
  nearest the target. The measured share is reported beside it (skipping changes later residuals, so the
  replay is an estimate);
- ``MagCache``: its own calibration (``calibrate=True``, one generation) gives the magnitude ratios; its skip
  rule depends only on those ratios, so replaying it picks the threshold exactly;
- ``TaylorSeer`` (lite mode: whole blocks skipped, the output projection forecast to first order): the step
  interval is computed from its schedule formula;
- cache-dit ``DBCache`` F1B0 (first block as the probe, none at the back): the FirstBlockCache threshold (the
  same relative-L1 residual probe), warm-up and reuse cap of our cache.

Every cache gets our cache's warm-up steps and cap on consecutive reused steps where it has such a knob.

Attention peers:

- FlexAttention with our masks: a dit-accel attention method plans as usual and its ``BlockMask`` runs through
  ``torch.nn.attention.flex_attention`` (compiled on CUDA) instead of our kernel, converted per call to the form
  FlexAttention runs fastest (listed tiles as full blocks, ragged edge tiles bounded by a mask_mod; on a CPU,
  eager FlexAttention, whose mask_mod reads the tiles since the eager path ignores the block lists). The substitution replaces
  ``dit_accel.kernels.block_sparse_attention`` for the generation (the sparse route looks the kernel up there
  when it runs); the number of calls that reached it is reported, so a route that stops looking it up there
  shows as ``flex_calls: 0`` instead of silently timing our kernel;
- SageAttention (when it imports, CUDA only): ``torch.nn.functional.scaled_dot_product_attention`` replaced by
  ``sageattn`` for the calls it takes (no mask, no dropout, not causal, head dim 64/96/128, half precision);
  the others keep SDPA; both counts are reported.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

# --- the fraction replays -------------------------------------------------------------------------------------


def first_block_share(diffs: list[list[float]], threshold: float) -> float:
    """Share of steps FirstBlockCache computes at ``threshold``, replayed per branch.

    ``diffs[i][j]`` (``j < i``): relative L1 change of the first-block residual of step ``i`` against step ``j``.
    Step 0 always computes; step ``i`` computes when its change against the last computed step exceeds the
    threshold (diffusers' ``_should_compute_remaining_blocks``).
    """
    n = len(diffs)
    if n == 0:
        return 1.0
    last, computed = 0, 1
    for i in range(1, n):
        if diffs[i][last] > threshold:
            last, computed = i, computed + 1
    return computed / n


def fit_first_block_threshold(branches: list[list[list[float]]], target: float) -> tuple[float, float]:
    """The threshold whose mean computed share over the branches is nearest ``target``; returns
    ``(threshold, share)``. Candidates: 0 and the midpoints between the recorded changes."""
    values = sorted({d for diffs in branches for row in diffs for d in row})
    candidates = [0.0] + [(a + b) / 2 for a, b in zip(values, values[1:])] + ([values[-1] * 1.01] if values else [])
    best = (0.0, 1.0)
    for t in candidates:
        share = sum(first_block_share(d, t) for d in branches) / max(1, len(branches))
        if abs(share - target) < abs(best[1] - target) - 1e-12:
            best = (t, share)
    return best


def magcache_share(ratios: list[float], threshold: float, retention_ratio: float, max_skip_steps: int) -> float:
    """Share of steps MagCache computes at ``threshold`` (diffusers' ``MagCacheHeadHook`` rule, replayed)."""
    n = len(ratios)
    retention = int(retention_ratio * n + 0.5)
    acc_ratio, acc_err, acc_steps, computed = 1.0, 0.0, 0, 0
    for step in range(n):
        compute = True
        if step >= retention:
            acc_ratio *= ratios[step]
            acc_steps += 1
            acc_err += abs(1.0 - acc_ratio)
            if step > 0 and acc_err <= threshold and acc_steps <= max_skip_steps:
                compute = False
            else:
                acc_ratio, acc_err, acc_steps = 1.0, 0.0, 0
        computed += compute
    return computed / max(1, n)


def fit_magcache_threshold(ratios: list[float], target: float, retention_ratio: float, max_skip_steps: int) -> tuple[float, float]:
    """The threshold (log grid 1e-4..10, and 0) whose computed share is nearest ``target``: ``(threshold, share)``."""
    grid = [0.0] + [10 ** (-4 + 5 * i / 400) for i in range(401)]
    best = (0.0, 1.0)
    for t in grid:
        share = magcache_share(ratios, t, retention_ratio, max_skip_steps)
        if abs(share - target) < abs(best[1] - target) - 1e-12:
            best = (t, share)
    return best


def taylorseer_share(steps: int, interval: int, warmup: int) -> float:
    """Share of steps TaylorSeer computes (diffusers' ``_measure_should_compute``)."""
    computed = sum(1 for s in range(steps) if s < warmup or (s - warmup - 1) % interval == 0)
    return computed / max(1, steps)


def fit_taylorseer_interval(steps: int, target: float, warmup: int) -> tuple[int, float]:
    """The interval whose computed share is nearest ``target`` (smallest interval on ties): ``(interval, share)``."""
    best = (1, 1.0)
    for n in range(1, steps + 1):
        share = taylorseer_share(steps, n, warmup)
        if abs(share - target) < abs(best[1] - target) - 1e-12:
            best = (n, share)
    return best


# --- recording the first block's residual ---------------------------------------------------------------------
class FirstBlockRecorder:
    """Records the first block's residual (output - input hidden states) of every transformer call, a strided
    subset of at most ``max_tokens`` tokens per row kept on the device in float32, grouped by guidance branch
    (call parity for families that call cond and uncond separately). No host sync while recording."""

    def __init__(self, transformer: torch.nn.Module, sequential_cfg: bool, max_tokens: int = 1024) -> None:
        from diffusers.hooks._helpers import TransformerBlockRegistry

        from dit_accel.caching import find_blocks

        self.sequential_cfg = sequential_cfg
        self.max_tokens = max_tokens
        self.residuals: list[torch.Tensor] = []
        block = find_blocks(transformer)[0].module
        self.metadata = TransformerBlockRegistry.get(type(block))
        self._handle = block.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        hidden = self.metadata._get_parameter_from_args_kwargs("hidden_states", args, kwargs)
        out = output[self.metadata.return_hidden_states_index] if isinstance(output, tuple) else output
        residual = (out - hidden).detach()
        stride = max(1, residual.shape[1] // self.max_tokens)
        self.residuals.append(residual[:, ::stride].float())

    def remove(self) -> None:
        """Stop recording."""
        self._handle.remove()

    def diffs(self) -> list[list[list[float]]]:
        """Per branch, ``diffs[i][j]`` as :func:`first_block_share` takes it (one host sync)."""
        groups = [self.residuals[0::2], self.residuals[1::2]] if self.sequential_cfg else [self.residuals]
        out = []
        for group in groups:
            if not group:
                continue
            rows = []
            for i, r in enumerate(group):
                rows.append(torch.stack([(r - p).abs().mean() / p.abs().mean().clamp_min(1e-12) for p in group[:i]])
                            if i else torch.zeros(0, device=r.device))
            out.append([row.tolist() for row in rows])
        return out


# --- diffusers caches -------------------------------------------------------------------------------------------
_DIFFUSERS_HOOKS = ("fbc_leader_block_hook", "fbc_block_hook", "mag_cache_leader_block_hook", "mag_cache_block_hook",
                    "taylorseer_cache")
"""Hook names diffusers' FirstBlockCache, MagCache and TaylorSeer register (removed by :func:`remove_diffusers_cache`)."""


def apply_diffusers_cache(transformer: torch.nn.Module, config: Any) -> None:
    """Install a diffusers cache config on the transformer with ``diffusers.hooks``' own ``apply_*`` function
    (the transformers of PixArt and SD3 have no ``enable_cache``; the hooks themselves work on every family)."""
    from diffusers import hooks

    apply = {
        "FirstBlockCacheConfig": hooks.apply_first_block_cache,
        "MagCacheConfig": hooks.apply_mag_cache,
        "TaylorSeerCacheConfig": hooks.apply_taylorseer_cache,
    }[type(config).__name__]
    apply(transformer, config)
    _invalidate_registries(transformer)


def remove_diffusers_cache(transformer: torch.nn.Module) -> None:
    """Remove every diffusers cache hook :func:`apply_diffusers_cache` may have installed."""
    registry = getattr(transformer, "_diffusers_hook", None)
    if registry is None:
        return
    for name in _DIFFUSERS_HOOKS:
        registry.remove_hook(name, recurse=True)
    _invalidate_registries(transformer)


def _invalidate_registries(transformer: torch.nn.Module) -> None:
    """Drop diffusers' cached list of the hook registries under the transformer: hooks added or removed on
    blocks and sub-modules change it, and a stale list leaves new hooks without a cache context."""
    registry = getattr(transformer, "_diffusers_hook", None)
    invalidate = getattr(registry, "invalidate_child_registries_cache", None)
    if invalidate is not None:
        invalidate()


@contextlib.contextmanager
def default_cache_context(transformer: torch.nn.Module) -> Iterator[None]:
    """A diffusers cache context for the whole call: pipelines that set their own (``cond``/``uncond``) replace it
    per call; those that set none (PixArt, SD3) need one for the cache hooks' state."""
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    _set_cache_context(transformer, CacheContext("cond_uncond"))
    try:
        yield
    finally:
        _set_cache_context(transformer, None)


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def capture_magcache_ratios() -> Iterator[list[list[float]]]:
    """Collect the ratio lists diffusers' MagCache calibration logs at the end of each branch's generation."""
    import ast

    found: list[list[float]] = []
    logger = logging.getLogger("diffusers.hooks.mag_cache")
    handler = _ListHandler()
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(handler)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it also prints them
            yield found
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
        for message in handler.messages:
            if "Calibration Results:" in message:
                found.append([float(x) for x in ast.literal_eval(message.split("Results:", 1)[1].strip())])


# --- FlexAttention with our masks -----------------------------------------------------------------------------
_FLEX: dict[str, Callable[..., torch.Tensor]] = {}


def _flex_fn(device_type: str) -> Callable[..., torch.Tensor]:
    """``flex_attention``, compiled once per process on CUDA (eager FlexAttention is a reference path)."""
    if device_type not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        if device_type == "cuda":
            _FLEX[device_type] = torch.compile(flex_attention, dynamic=False)
        else:
            def eager(*args: Any, **kwargs: Any) -> torch.Tensor:
                with warnings.catch_warnings():  # "called without torch.compile()": intended off CUDA
                    warnings.simplefilter("ignore", UserWarning)
                    return flex_attention(*args, **kwargs)

            _FLEX[device_type] = eager
    return _FLEX[device_type]


_BOUNDS: dict[tuple[int, int], Callable[..., torch.Tensor]] = {}


def _bounded(q_len: int, kv_len: int) -> Callable[..., torch.Tensor]:
    """``mask_mod`` keeping positions inside the sequence (one function object per shape, so compiled
    FlexAttention sees the same mask_mod at every call)."""
    if (q_len, kv_len) not in _BOUNDS:
        def within(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
            return (q_idx < q_len) & (kv_idx < kv_len)

        _BOUNDS[(q_len, kv_len)] = within
    return _BOUNDS[(q_len, kv_len)]


def _tile_lookup(mask: Any) -> Callable[..., torch.Tensor]:
    """``mask_mod`` that reads the mask's tiles (eager FlexAttention applies only the mask_mod, not the block lists)."""
    q_len, kv_len = mask.seq_lengths
    bq, bk = mask.BLOCK_SIZE
    tiles = mask.to_dense().bool()  # (B, H, Q_BLOCKS, KV_BLOCKS); B and H may be 1

    def lookup(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        bb = b if tiles.shape[0] > 1 else torch.zeros_like(b)
        hh = h if tiles.shape[1] > 1 else torch.zeros_like(h)
        return tiles[bb, hh, q_idx // bq, kv_idx // bk] & (q_idx < q_len) & (kv_idx < kv_len)

    return lookup


def flex_block_mask(mask: Any, *, compiled: bool = True) -> Any:
    """Our ``BlockMask`` (every listed tile partial under ``noop_mask``) in the form FlexAttention runs fastest:
    the listed tiles as *full* blocks (no mask_mod evaluated) except the tiles of a ragged last query block or
    ragged last key block, which stay partial under a mask_mod bounding the sequence (the convention of
    ``create_block_mask``). Same tiles, same result; built on the device without a host sync.

    ``compiled=False`` (eager FlexAttention, the CPU path): eager FlexAttention ignores the block lists and
    applies the mask_mod to every position, so the mask_mod reads the tiles themselves.
    """
    from torch.nn.attention.flex_attention import BlockMask

    q_len, kv_len = mask.seq_lengths
    bq, bk = mask.BLOCK_SIZE
    num, idx = mask.kv_num_blocks, mask.kv_indices
    kv_blocks = idx.shape[-1]
    last = kv_blocks - 1
    valid = torch.arange(kv_blocks, device=idx.device) < num[..., None]
    ordered = torch.where(valid, idx, torch.full_like(idx, kv_blocks)).sort(dim=-1).values  # listed tiles first
    if kv_len % bk:  # the ragged last key block, when listed, is the last listed tile of its row
        partial_num = ((ordered.gather(-1, (num - 1).clamp(min=0)[..., None])[..., 0] == last) & (num > 0)).to(num.dtype)
    else:
        partial_num = torch.zeros_like(num)
    partial_idx = torch.full_like(idx, last)
    full_num = num - partial_num
    full_idx = ordered.clamp(max=last).to(idx.dtype)
    if q_len % bq:  # the ragged last query block: all its tiles partial
        partial_num, full_num = partial_num.clone(), full_num.clone()
        partial_idx[..., -1, :] = full_idx[..., -1, :]
        partial_num[..., -1] = num[..., -1]
        full_num[..., -1] = 0
    mask_mod = _bounded(q_len, kv_len) if compiled else _tile_lookup(mask)
    return BlockMask.from_kv_blocks(partial_num, partial_idx, full_num, full_idx, BLOCK_SIZE=(bq, bk),
                                    mask_mod=mask_mod, seq_lengths=(q_len, kv_len), compute_q_blocks=False)


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    if index.dim() == 1:
        return x.index_select(2, index.long())
    idx = index.long().expand(x.shape[0], x.shape[1], -1)
    return torch.gather(x, 2, idx[..., None].expand(-1, -1, -1, x.shape[-1]))


def _scatter(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    if index.dim() == 1:
        return out.index_copy_(2, index.long(), x)
    idx = index.long().expand(x.shape[0], x.shape[1], -1)
    return out.scatter_(2, idx[..., None].expand(-1, -1, -1, x.shape[-1]), x)


_FLEX_CHECKED: set[tuple] = set()
"""Call shapes whose FlexAttention output was compared with our kernel's (once per process)."""


@dataclass
class FlexKernel:
    """A drop-in for ``dit_accel.kernels.block_sparse_attention`` that runs the mask through FlexAttention.

    ``reference``: our kernel; the first call of each shape in the process also runs it and records the largest
    difference of the two outputs (``check_errors``), so a FlexAttention result that differs is visible in the
    report (the check runs in a configuration's cold generation, never in its timed one after that)."""

    reference: Callable[..., torch.Tensor] | None = None
    """Our kernel, for the once-per-shape output check (``None``: no check)."""
    calls: int = 0
    """Calls that reached FlexAttention."""
    check_errors: list[float] = field(default_factory=list)
    """Max abs difference to our kernel, per checked call."""
    bench_kind: str = "flex"
    """Name the attention probe records its calls under."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, *, scale: float | None = None,
                 return_lse: bool = False, tile_stats: bool = False, q_index: torch.Tensor | None = None,
                 kv_index: torch.Tensor | None = None) -> torch.Tensor:
        """Same contract as ``block_sparse_attention`` without LSE and tile statistics (FlexAttention has none
        of ours); token permutations are applied by gathering and scattering rows."""
        if return_lse or tile_stats:
            raise NotImplementedError("the FlexAttention peer runs methods without tile statistics or LSE only")
        self.calls += 1
        inputs = (q, k, v)
        if q_index is not None:
            q = _gather(q, q_index)
        if kv_index is not None:
            k, v = _gather(k, kv_index), _gather(v, kv_index)
        compiled = q.device.type == "cuda"
        out = _flex_fn(q.device.type)(q, k, v, block_mask=flex_block_mask(mask, compiled=compiled), scale=scale)
        out = _scatter(out, q_index) if q_index is not None else out
        key = (tuple(q.shape), str(q.dtype), q.device.type, q_index is not None)
        if self.reference is not None and key not in _FLEX_CHECKED:
            _FLEX_CHECKED.add(key)
            ours = self.reference(*inputs, mask, scale=scale, q_index=q_index, kv_index=kv_index)
            self.check_errors.append(float((out.float() - ours.float()).abs().max()))
        return out


# --- SageAttention ----------------------------------------------------------------------------------------------
@dataclass
class SageSDPA:
    """A drop-in for ``F.scaled_dot_product_attention`` sending the calls SageAttention takes to ``sageattn``."""

    fallback: Callable[..., torch.Tensor]
    """The SDPA it replaces (used for the calls sage cannot take)."""
    sage_calls: int = 0
    """Calls run by ``sageattn``."""
    sdpa_calls: int = 0
    """Calls left to SDPA."""
    bench_kind: str = "sage"
    """Name the attention probe records its calls under."""
    _sageattn: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        from sageattention import sageattn

        self._sageattn = sageattn

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Any = None,
                 dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                 enable_gqa: bool = False) -> torch.Tensor:
        """``sageattn`` on CUDA half-precision calls without mask/dropout/causality with head dim 64, 96 or 128."""
        if (query.is_cuda and attn_mask is None and dropout_p == 0.0 and not is_causal and not enable_gqa
                and query.shape[-1] in (64, 96, 128) and query.dtype in (torch.float16, torch.bfloat16)
                and query.shape[:-2] == key.shape[:-2]):
            self.sage_calls += 1
            return self._sageattn(query, key, value, tensor_layout="HND", is_causal=False, sm_scale=scale)
        self.sdpa_calls += 1
        return self.fallback(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                             scale=scale, enable_gqa=enable_gqa)
