"""Device cost model of block-sparse attention: the kernel's time relative to dense cuDNN attention.

The routing layer asks, for a planned head, whether the block-sparse kernel at that density is faster
than dense attention on this device (:func:`break_even_density`, :func:`relative_cost`). The answer comes
from a :class:`CostTable`: for each precision (``"bf16"``, ``"fp8"``) and padded head dim (64, 128), the
ratio ``kernel time / dense time`` on a grid of sequence lengths x densities, read with linear
interpolation in density and in ``log(seq_len)``.

Where the table comes from, first hit wins:

1. this process's memory;
2. the disk cache, one JSON file per (device name, torch, triton, :data:`KERNEL_VERSION`) like Triton's
   autotune cache, under ``$DIT_ACCEL_CACHE_DIR`` (default ``~/.cache/dit_accel``) in ``cost_model/``;
   another torch, Triton or kernel version is another file, so a stale table is never read;
3. a measurement on the device (:func:`measure_cost_table`: a few seconds, plus Triton's one-time compile
   of each kernel variant), written to the disk cache; ``DIT_ACCEL_COST_MODEL=shipped`` turns it off;
4. the table shipped in the package (:data:`SHIPPED_TABLE`; its ``device`` and ``meta`` say where it was
   measured), when measuring is off or fails. Where a table has no curve for fp8 (a device without FP8
   tensor cores, or a table measured before the fp8 path), fp8 lookups use the bf16 curve.

On CPU the kernel is the torch reference, which materialises every logit and never beats dense attention, so
:func:`cost_table` gives a CPU device an empty table: :func:`relative_cost` is ``inf`` and
:func:`break_even_density` ``0.0``. Routing does not read that table: on CPU, ``dense_above="auto"`` reads the
shipped GPU table (:func:`dit_accel.attention.head_split.cost_table_for`), so a CPU run splits heads as the GPU
the table was measured on would, and a quality evaluation on CPU measures the quality that GPU delivers.
"""

from __future__ import annotations

import bisect
import datetime
import hashlib
import json
import math
import os
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .block_sparse_common import SUPPORTED_HEAD_DIMS
from .fp8_common import PRECISIONS, check_precision, fp8_supported, padded_head_dim

__all__ = [
    "CACHE_ENV",
    "COST_MODEL_ENV",
    "DEFAULT_DENSITIES",
    "DEFAULT_HEAD_DIMS",
    "DEFAULT_SEQ_LENS",
    "KERNEL_VERSION",
    "SHIPPED_TABLE",
    "CostCurve",
    "CostTable",
    "break_even_density",
    "cache_path",
    "cost_model_mode",
    "cost_table",
    "load_cached_table",
    "measure_cost_table",
    "relative_cost",
    "resolve_table",
    "save_cached_table",
    "shipped_table",
]

KERNEL_VERSION = "2"
"""Version of the kernels' performance behaviour; part of the cache key. Raise it whenever a kernel
change can move the break-even point (launch configs, load paths, a new precision)."""

TABLE_FORMAT = 1
"""Version of the JSON layout of a cost table."""

CACHE_ENV = "DIT_ACCEL_CACHE_DIR"
"""Environment variable naming the cache directory (default ``~/.cache/dit_accel``)."""

COST_MODEL_ENV = "DIT_ACCEL_COST_MODEL"
"""Environment variable: ``measure`` (default: measure on first use, then cache) or ``shipped`` (never
measure; use the disk cache if present, else the shipped table)."""

SHIPPED_TABLE = Path(__file__).with_name("cost_table.json")
"""The table shipped in the package, the fallback when measuring is off or fails (``benchmarks/
attention_kernel_fp8.py --cost`` writes one in this format)."""

DEFAULT_SEQ_LENS = (4096, 16384, 32768, 75600)
"""Sequence lengths of the measured grid."""

DEFAULT_DENSITIES = (0.1, 0.25, 0.5, 0.75, 1.0)
"""Block densities of the measured grid."""

DEFAULT_HEAD_DIMS = (64, 128)
"""Padded head dims of the measured grid (72 runs as 128)."""


@dataclass(frozen=True)
class CostCurve:
    """``kernel time / dense time`` on a grid, for one precision and padded head dim."""

    seq_lens: tuple[int, ...]
    """Ascending sequence lengths."""
    densities: tuple[float, ...]
    """Ascending block densities in (0, 1]."""
    ratios: tuple[tuple[float, ...], ...]
    """``ratios[i][j]``: time at ``seq_lens[i]``, ``densities[j]`` over dense time at ``seq_lens[i]``."""

    def __post_init__(self) -> None:
        if not self.seq_lens or not self.densities:
            raise ValueError("a cost curve needs at least one sequence length and one density")
        if list(self.seq_lens) != sorted(set(self.seq_lens)) or self.seq_lens[0] <= 0:
            raise ValueError(f"seq_lens must be positive and strictly ascending, got {self.seq_lens}")
        if list(self.densities) != sorted(set(self.densities)) or not (0 < self.densities[0] and self.densities[-1] <= 1):
            raise ValueError(f"densities must be strictly ascending in (0, 1], got {self.densities}")
        if len(self.ratios) != len(self.seq_lens) or any(len(r) != len(self.densities) for r in self.ratios):
            raise ValueError(f"ratios must be {len(self.seq_lens)} x {len(self.densities)}, got "
                             f"{[len(r) for r in self.ratios]}")
        if any(not (x > 0 and math.isfinite(x)) for r in self.ratios for x in r):
            raise ValueError("ratios must be positive and finite")

    def row(self, seq_len: int) -> list[float]:
        """Ratios at each grid density for ``seq_len`` (linear in ``log(seq_len)``, clamped to the grid)."""
        s = self.seq_lens
        if seq_len <= s[0]:
            return list(self.ratios[0])
        if seq_len >= s[-1]:
            return list(self.ratios[-1])
        i = bisect.bisect_right(s, seq_len) - 1
        w = (math.log(seq_len) - math.log(s[i])) / (math.log(s[i + 1]) - math.log(s[i]))
        return [(1 - w) * a + w * b for a, b in zip(self.ratios[i], self.ratios[i + 1])]

    def ratio(self, seq_len: int, density: float) -> float:
        """Interpolated ``kernel / dense`` time; below the smallest grid density it extrapolates the first
        segment toward density 0 (never below 0 or above the value at the smallest density)."""
        row, d = self.row(seq_len), self.densities
        if len(d) == 1:
            return row[0] * density / d[0]
        if density <= d[0]:
            slope = (row[1] - row[0]) / (d[1] - d[0])
            return max(0.0, min(row[0], row[0] + slope * (density - d[0])))
        if density >= d[-1]:
            return row[-1]
        j = bisect.bisect_right(d, density) - 1
        w = (density - d[j]) / (d[j + 1] - d[j])
        return (1 - w) * row[j] + w * row[j + 1]

    def break_even(self, seq_len: int) -> float:
        """Largest density in [0, 1] at which the interpolated ratio is still below 1 (0.0 if none)."""
        row, d = self.row(seq_len), self.densities
        pts = [(0.0, self.ratio(seq_len, 0.0))] if d[0] > 0 else []
        pts += list(zip(d, row))
        if pts[-1][1] < 1.0:
            return float(pts[-1][0])
        for (d0, r0), (d1, r1) in zip(reversed(pts[:-1]), reversed(pts[1:])):
            if r0 < 1.0 <= r1:
                return float(d0 + (1.0 - r0) * (d1 - d0) / (r1 - r0))
        return 0.0


@dataclass(frozen=True)
class CostTable:
    """Cost curves of one device and library versions (see the module docstring)."""

    device: str
    """Device name (``torch.cuda.get_device_name``), or ``"cpu"``."""
    torch_version: str
    """torch version the table was measured with."""
    triton_version: str
    """Triton version the table was measured with."""
    kernel_version: str
    """:data:`KERNEL_VERSION` at measurement."""
    source: str
    """Where this table came from: ``"measured"``, ``"cache"``, ``"shipped"`` or ``"cpu"``."""
    curves: dict[tuple[str, int], CostCurve] = field(default_factory=dict)
    """By (precision, padded head dim)."""
    meta: dict = field(default_factory=dict)
    """Free-form facts about the measurement (date, heads per point, dense backend)."""

    def _curve(self, precision: str, head_dim: int) -> CostCurve | None:
        d = padded_head_dim(head_dim)
        return self.curves.get((precision, d)) or self.curves.get(("bf16", d))

    def relative_cost(self, seq_len: int, head_dim: int, density: float, precision: str = "bf16") -> float:
        """``kernel time / dense time`` (``inf`` where the kernel never wins: CPU, or no curve)."""
        _check_query(seq_len, head_dim, density, precision)
        curve = self._curve(precision, head_dim)
        return math.inf if curve is None else curve.ratio(seq_len, density)

    def break_even_density(self, seq_len: int, head_dim: int, precision: str = "bf16") -> float:
        """Largest density at which the kernel is still faster than dense attention (0.0 = always dense)."""
        _check_query(seq_len, head_dim, 1.0, precision)
        curve = self._curve(precision, head_dim)
        return 0.0 if curve is None else curve.break_even(seq_len)

    def to_json(self) -> dict:
        """The table as a JSON-ready dict (:func:`table_from_json` reads it back)."""
        return dict(
            format=TABLE_FORMAT, device=self.device, torch=self.torch_version, triton=self.triton_version,
            kernel_version=self.kernel_version, meta=self.meta,
            curves=[dict(precision=p, head_dim=d, seq_lens=list(c.seq_lens), densities=list(c.densities),
                         ratios=[list(r) for r in c.ratios]) for (p, d), c in sorted(self.curves.items())],
        )


def table_from_json(data: dict, source: str) -> CostTable:
    """A :class:`CostTable` from :meth:`CostTable.to_json` output; ValueError if the layout is wrong."""
    if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
        raise ValueError(f"cost table format must be {TABLE_FORMAT}, got {data.get('format') if isinstance(data, dict) else data!r}")
    curves = {}
    for c in data["curves"]:
        if c["precision"] not in PRECISIONS or c["head_dim"] not in DEFAULT_HEAD_DIMS:
            raise ValueError(f"cost table curve with precision {c['precision']!r} / head dim {c['head_dim']} "
                             f"(allowed {PRECISIONS} / {DEFAULT_HEAD_DIMS})")
        curves[(c["precision"], int(c["head_dim"]))] = CostCurve(
            tuple(int(s) for s in c["seq_lens"]), tuple(float(d) for d in c["densities"]),
            tuple(tuple(float(x) for x in r) for r in c["ratios"]))
    return CostTable(str(data["device"]), str(data["torch"]), str(data["triton"]), str(data["kernel_version"]),
                     source, curves, dict(data.get("meta", {})))


def _check_query(seq_len: int, head_dim: int, density: float, precision: str) -> None:
    if not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {head_dim!r} is not supported; supported: {SUPPORTED_HEAD_DIMS}")
    if not (isinstance(density, (int, float)) and 0.0 <= density <= 1.0):
        raise ValueError(f"density must be in [0, 1], got {density!r}")
    check_precision(precision)


# ------------------------------------------------------------------------------------------ cache
def _versions() -> tuple[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return torch.__version__, triton_version


def cache_dir() -> Path:
    """``$DIT_ACCEL_CACHE_DIR/cost_model`` (default ``~/.cache/dit_accel/cost_model``)."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "dit_accel")
    return Path(root) / "cost_model"


def cache_path(device_name: str, torch_version: str, triton_version: str, kernel_version: str = KERNEL_VERSION) -> Path:
    """The cache file of one (device, torch, Triton, kernel version): any change is another file."""
    key = json.dumps([TABLE_FORMAT, device_name, torch_version, triton_version, kernel_version])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    slug = "".join(ch if ch.isalnum() else "_" for ch in device_name)[:40]
    return cache_dir() / f"{slug}-{digest}.json"


def load_cached_table(device_name: str, torch_version: str, triton_version: str,
                      kernel_version: str = KERNEL_VERSION) -> CostTable | None:
    """The cached table of these versions, or None (missing, unreadable, or written for other versions)."""
    path = cache_path(device_name, torch_version, triton_version, kernel_version)
    try:
        table = table_from_json(json.loads(path.read_text()), source="cache")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if (table.device, table.torch_version, table.triton_version, table.kernel_version) != (
            device_name, torch_version, triton_version, kernel_version):
        return None
    return table


def save_cached_table(table: CostTable) -> Path:
    """Write ``table`` to its cache file (atomically: a temporary file renamed into place)."""
    path = cache_path(table.device, table.torch_version, table.triton_version, table.kernel_version)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(table.to_json(), indent=1))
    os.replace(tmp, path)
    return path


def shipped_table() -> CostTable:
    """The table shipped in the package."""
    return table_from_json(json.loads(SHIPPED_TABLE.read_text()), source="shipped")


# -------------------------------------------------------------------------------------- measuring
def _time_ms(fn: Callable[[], object], min_total_ms: float = 15.0, min_reps: int = 3, max_reps: int = 50) -> float:
    """Median of CUDA-event timings of ``fn`` after one warm-up call (which also compiles)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    est = max(start.elapsed_time(end), 1e-3)
    times = []
    for _ in range(int(min(max_reps, max(min_reps, min_total_ms / est)))):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _heads_to_fill(seq_len: int, num_sms: int, block: int = 128, waves: int = 8) -> int:
    """Heads (batch 1) that give the kernel about ``waves`` waves of programs on the device."""
    return max(1, math.ceil(waves * num_sms / math.ceil(seq_len / block)))


def _measure_curves(
    device: torch.device,
    *,
    seq_lens: tuple[int, ...],
    densities: tuple[float, ...],
    head_dims: tuple[int, ...],
    precisions: tuple[str, ...],
    num_sms: int,
    timer: Callable[[Callable[[], object]], float],
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[tuple[str, int], CostCurve], dict[int, int]]:
    """The measuring loop of :func:`measure_cost_table` (any device; ``timer(fn)`` returns a time)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from .block_mask import block_mask_from_scores, dense_block_mask
    from .block_sparse import block_sparse_attention

    backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                SDPBackend.MATH]
    gen = torch.Generator(device=device).manual_seed(0)
    rows: dict[tuple[str, int], list[list[float]]] = {}
    heads_used: dict[int, int] = {}
    probe = torch.empty(1, 1, 128, 64, device=device, dtype=torch.bfloat16)
    run_precisions = [p for p in precisions if p == "bf16" or fp8_supported(probe)[0]]
    with torch.no_grad():
        for D in head_dims:
            for S in seq_lens:
                H = _heads_to_fill(S, num_sms)
                heads_used[S] = H
                q, k, v = (torch.randn(1, H, S, D, device=device, generator=gen).to(torch.bfloat16) for _ in range(3))
                with sdpa_kernel(backends):
                    dense = timer(lambda: F.scaled_dot_product_attention(q, k, v))
                kb = math.ceil(S / 128)
                scores = torch.rand(1, H, kb, kb, device=device, generator=gen)
                masks = [dense_block_mask(1, H, S, S, device=device) if dens >= 1.0 else block_mask_from_scores(
                    scores, top_k=max(1, round(dens * kb)), keep_diagonal=False, q_len=S, kv_len=S) for dens in densities]
                for prec in run_precisions:
                    ratios = [timer(lambda: block_sparse_attention(q, k, v, mask, precision=prec)) / dense
                              for mask in masks]
                    rows.setdefault((prec, D), []).append(ratios)
                    if progress is not None:
                        progress(f"cost model D={D} S={S} H={H} {prec}: dense {dense:.3f} ms, ratios "
                                 + " ".join(f"{r:.3f}" for r in ratios))
                del q, k, v
    curves = {key: CostCurve(tuple(seq_lens), tuple(densities), tuple(tuple(x) for x in r)) for key, r in rows.items()}
    return curves, heads_used


def measure_cost_table(
    device: torch.device | str | None = None,
    *,
    seq_lens: tuple[int, ...] = DEFAULT_SEQ_LENS,
    densities: tuple[float, ...] = DEFAULT_DENSITIES,
    head_dims: tuple[int, ...] = DEFAULT_HEAD_DIMS,
    precisions: tuple[str, ...] = PRECISIONS,
    progress: Callable[[str], None] | None = None,
) -> CostTable:
    """Time the kernel against dense SDPA (cuDNN where available) on this CUDA device, on a grid.

    Inputs are random bf16 ``(1, H, S, D)`` with H chosen per length to give the kernel about 8 waves of
    programs; masks are random top-k key blocks per query block (exact density). fp8 is measured only
    where :func:`~dit_accel.kernels.fp8_common.fp8_supported` allows it (elsewhere an fp8 request runs
    bf16, and lookups use the bf16 curve). Raises RuntimeError off CUDA.
    """
    device = torch.device(device if device is not None else "cuda")
    if device.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError(f"measuring the cost model needs a CUDA device, got {device}")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(device)
    with torch.cuda.device(device):
        curves, heads_used = _measure_curves(
            device, seq_lens=seq_lens, densities=densities, head_dims=head_dims, precisions=precisions,
            num_sms=props.multi_processor_count, timer=_time_ms, progress=progress)
    torch_version, triton_version = _versions()
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                heads_per_seq_len=heads_used, batch=1, dtype="bfloat16", mask="random top-k key blocks per query block",
                dense="F.scaled_dot_product_attention, backends cuDNN > flash > efficient > math",
                timing="CUDA events, 1 warm-up, median of >= 3 repeats")
    return CostTable(props.name, torch_version, triton_version, KERNEL_VERSION, "measured", curves, meta)


# -------------------------------------------------------------------------------------- resolving
_MEMORY: dict[str, CostTable] = {}


def resolve_table(
    device_name: str,
    *,
    allow_measure: bool,
    measure: Callable[[], CostTable],
    versions: tuple[str, str] | None = None,
) -> CostTable:
    """Disk cache, else a measurement (written to the cache) if allowed, else the shipped table.

    A failed measurement warns and falls back to the shipped table (nothing is cached then).
    """
    torch_version, triton_version = versions if versions is not None else _versions()
    cached = load_cached_table(device_name, torch_version, triton_version)
    if cached is not None:
        return cached
    if allow_measure:
        try:
            table = measure()
        except Exception as e:  # noqa: BLE001 - any failure to measure falls back to the shipped table
            warnings.warn(f"dit_accel cost model: measuring on {device_name} failed ({e!r}); using the shipped "
                          f"table", RuntimeWarning, stacklevel=3)
        else:
            try:
                save_cached_table(table)
            except OSError as e:
                warnings.warn(f"dit_accel cost model: could not write the cache ({e!r})", RuntimeWarning, stacklevel=3)
            return table
    return shipped_table()


def cost_model_mode() -> str:
    """``$DIT_ACCEL_COST_MODEL``: ``"measure"`` (default) or ``"shipped"``; ValueError for anything else."""
    mode = os.environ.get(COST_MODEL_ENV, "measure")
    if mode not in ("measure", "shipped"):
        raise ValueError(f"{COST_MODEL_ENV} must be 'measure' or 'shipped', got {mode!r}")
    return mode


def cost_table(device: torch.device | str | None = None) -> CostTable:
    """The cost table of ``device`` (default: the current CUDA device, or CPU without CUDA); see the module
    docstring for where it comes from. CPU devices get an empty table: relative cost ``inf``, break-even 0."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type != "cuda":
        if "cpu" not in _MEMORY:
            _MEMORY["cpu"] = CostTable("cpu", *_versions(), KERNEL_VERSION, "cpu")
        return _MEMORY["cpu"]
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    name = torch.cuda.get_device_name(device)
    key = f"{device}:{name}"
    if key not in _MEMORY:
        _MEMORY[key] = resolve_table(name, allow_measure=cost_model_mode() == "measure",
                                     measure=lambda: measure_cost_table(device))
    return _MEMORY[key]


def relative_cost(device: torch.device | str | None, seq_len: int, head_dim: int, density: float,
                  precision: str = "bf16") -> float:
    """Kernel time over dense attention time at this sequence length, head dim, block density and precision
    on ``device`` (``inf`` on CPU). See :class:`CostTable`."""
    return cost_table(device).relative_cost(seq_len, head_dim, density, precision)


def break_even_density(device: torch.device | str | None, seq_len: int, head_dim: int,
                       precision: str = "bf16") -> float:
    """The largest block density at which the kernel is still faster than dense attention on ``device``
    (interpolated; 0.0 means always dense, as on CPU; 1.0 means the kernel wins even at full density)."""
    return cost_table(device).break_even_density(seq_len, head_dim, precision)
