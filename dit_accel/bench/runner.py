"""The benchmark loop: models in turn, each within its share of the time budget, configurations in interleaved rounds.

Per model: build the pipeline; round 1 runs every configuration once in priority order (its *cold* generation:
the first after switching it on, which also pays Triton/inductor compiles on first use and serves as its
warm-up; the stock model's cold generation also records the first-block residuals the FirstBlockCache replay
needs, and every cold generation counts the blocks computed); then ``rounds`` timed rounds run every admitted
configuration once more, alternating the order (forward, then backward), so drift over time hits all alike.

Budget: ``time_budget_s`` covers everything from the start (builds, compiles, calibrations). Each model's share
is the remaining budget times its estimated need over the remaining models' (so a model needing more time, e.g.
Wan2.1-14B, gets more). A configuration is admitted only if its cold generation, its timed generations and those
already promised to admitted configurations fit the model's share; otherwise it is recorded as ``skipped:
budget``. The estimate of a generation is the FLOP estimate (:mod:`dit_accel.bench.models`) until the stock
model's first generation has been measured, then that measurement; compile costs are fixed allowances.
``bench.json`` is rewritten after every generation, so a kill or a timeout keeps everything finished.
"""

from __future__ import annotations

import fnmatch
import gc
import logging
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
import torch._dynamo

from dit_accel.bench import models as M
from dit_accel.bench import report as R
from dit_accel.bench import runs as RS
from dit_accel.bench.timing import BlockCounter, Clock, GenerationTiming, time_generation

logger = logging.getLogger("dit_accel")

DEFAULT_STEPS = 8
"""Denoising steps per generation on real models: enough for the cache schedules' warm-up, reuse and refresh."""
TINY_STEPS = 4
"""Steps of the tiny CPU flow (still past the caches' two warm-up steps)."""

COLD_ALLOWANCE_S = {"first_sparse": 12.0, "sparse": 4.0, "flex": 12.0, "compiled": 45.0}
"""Extra seconds budgeted for a cold generation on CUDA: the first dit-accel sparse run of the process (Triton
compiles of the planning and attention kernels), the first one of each later model (new shapes, head dims),
FlexAttention (inductor compile per shape), compiled blocks (inductor per configuration)."""
BUILD_ALLOWANCE_S = 4.0
"""Seconds budgeted for building one real model on CUDA."""
RESERVE_S = 10.0
"""Seconds kept free at the end of the budget (final writes)."""
SPARSE_KINDS = ("preset", "attention_part", "attention_peer")
"""Run kinds that may run dit-accel's sparse path (their first cold generation pays the Triton compiles)."""
COMPILED_SUFFIX = "+compile"
"""Key suffix of the ``--compile`` variants."""
RECOMPILE_LIMIT = 256
"""dynamo's per-code-object cache size with ``--compile`` (each configuration adds entries)."""


@dataclass
class BenchOptions:
    """Everything ``dit-accel bench`` was asked to do."""

    out: Path
    """``bench.json`` path (the PNG goes beside it)."""
    tiny: bool = False
    """Tiny CPU twins of the models (``TINY_SPECS``)."""
    device: str = "auto"
    """``auto``, ``cuda`` or ``cpu``."""
    models: tuple[str, ...] = ()
    """Model keys to run (all when empty)."""
    runs: tuple[str, ...] = ()
    """Run-key patterns (``fnmatch``) to run (all when empty; ``stock`` and what the peers need always run)."""
    steps: int | None = None
    """Denoising steps (default :data:`DEFAULT_STEPS`, tiny :data:`TINY_STEPS`)."""
    layers: int | None = None
    """Blocks to build per model (in total over its block lists); ``None``: each model's default."""
    rounds: int = 1
    """Timed rounds after the cold round."""
    time_budget_s: float = 500.0
    """Seconds for the whole run, builds and compiles included."""
    compile: bool = False
    """Add every configuration with its blocks compiled."""
    compile_backend: str | None = None
    """``torch.compile`` backend for ``--compile`` (default ``inductor`` on CUDA, ``eager`` on CPU)."""
    peer_preset: str = "balanced"
    """Preset whose cache fraction the cache peers are tuned to."""
    flex_preset: str = "balanced"
    """Preset whose attention method runs through FlexAttention."""
    seed: int = 0
    """Seed of weights, embeddings and noise."""
    argv: list[str] = field(default_factory=list)
    """The command line, for the report."""


# --- budget -------------------------------------------------------------------------------------------------------
class Budget:
    """Wall-clock budget with per-model shares and promised (reserved) time; ``now`` may be a virtual clock."""

    def __init__(self, total_s: float, now: Callable[[], float] = time.perf_counter) -> None:
        self.now = now
        self.start = now()
        self.total_s = total_s
        self.model_deadline = self.start + total_s
        self.reserved = 0.0

    @property
    def deadline(self) -> float:
        """When everything must be done (minus :data:`RESERVE_S`)."""
        return self.start + self.total_s - RESERVE_S

    def elapsed(self) -> float:
        """Seconds since the start."""
        return self.now() - self.start

    def begin_model(self, need: float, needs_left: float) -> float:
        """Open the next model's share (remaining x need / needs of the remaining models); returns it."""
        remaining = max(0.0, self.deadline - self.now())
        share = remaining * (need / needs_left) if needs_left > 0 else remaining
        self.model_deadline = self.now() + share
        self.reserved = 0.0
        return share

    def admit(self, cold_s: float, timed_s: float, keep_s: float = 0.0) -> bool:
        """Whether a configuration's cold and timed generations fit next to the time already promised and
        ``keep_s`` kept for configurations that must come first; if so, the timed part is promised."""
        end = self.now() + cold_s + timed_s + self.reserved + keep_s
        if end > self.model_deadline or end > self.deadline:
            return False
        self.reserved += timed_s
        return True

    def release(self, seconds: float) -> None:
        """Give back promised time (a generation ran, or its configuration failed)."""
        self.reserved = max(0.0, self.reserved - seconds)

    def fits(self, seconds: float) -> bool:
        """Whether ``seconds`` more fit before the overall deadline."""
        return self.now() + seconds <= self.deadline


# --- estimates ----------------------------------------------------------------------------------------------------
@dataclass
class ModelPlan:
    """One model's estimated cost and configurations."""

    spec: M.ModelSpec
    """The model."""
    layers: tuple[int, ...]
    """Blocks built per block list."""
    description: dict[str, Any]
    """Size and FLOP estimate (:func:`dit_accel.bench.models.describe`)."""
    gen_s: float
    """Estimated seconds of one generation."""
    build_s: float
    """Seconds budgeted for the build."""


def _select(runs: list[RS.RunSpec], patterns: tuple[str, ...], peer_preset: str) -> list[RS.RunSpec]:
    if not patterns:
        return runs

    def base(key: str) -> str:
        return key.removesuffix(COMPILED_SUFFIX)

    # a pattern selects a configuration and, with --compile, its compiled variant
    wanted = {base(r.key) for r in runs if any(fnmatch.fnmatchcase(base(r.key), p) or fnmatch.fnmatchcase(r.key, p)
                                               for p in patterns)}
    if not wanted:
        raise ValueError(f"--runs {list(patterns)} matches no configuration; keys: {[r.key for r in runs]}")
    wanted.add(RS.STOCK)  # the reference of every speed-up
    if any(r.kind == "cache_peer" for r in runs if base(r.key) in wanted):
        wanted.add(f"{peer_preset}.cache")  # the peers' target fraction comes from it
    return [r for r in runs if base(r.key) in wanted]


def cold_allowance(run: RS.RunSpec, cuda: bool, first_sparse_done: bool, model_sparse_done: bool) -> float:
    """Extra seconds budgeted for ``run``'s cold generation (see :data:`COLD_ALLOWANCE_S`)."""
    if not cuda:
        return 0.0
    extra = 0.0
    if run.compiled:
        extra += COLD_ALLOWANCE_S["compiled"]
    if run.key.startswith("flex."):
        extra += COLD_ALLOWANCE_S["flex"]
    if run.kind in SPARSE_KINDS and run.key not in (RS.STOCK, RS.STOCK_CUDNN) and not model_sparse_done:
        extra += COLD_ALLOWANCE_S["sparse" if first_sparse_done else "first_sparse"]
    return extra


def model_need(plan: ModelPlan, runs: list[RS.RunSpec], rounds: int, cuda: bool) -> float:
    """Estimated seconds for every configuration of one model (cold + timed + calibrations + allowances)."""
    total = plan.build_s
    sparse_seen = False
    for r in runs:
        total += plan.gen_s * (1 + rounds + r.extra_generations) + cold_allowance(r, cuda, True, sparse_seen)
        sparse_seen = sparse_seen or r.kind in SPARSE_KINDS
    return total


# --- one generation -------------------------------------------------------------------------------------------------
def _latents(output: Any) -> torch.Tensor | None:
    for attr in ("frames", "images"):
        value = getattr(output, attr, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def _dynamo_snapshot() -> dict[str, Any]:
    from torch._dynamo.utils import counters, guard_failures

    return {
        "graph_breaks": sum(counters["graph_break"].values()),
        "graph_break_reasons": dict(counters["graph_break"]),
        "frames_compiled": counters["frames"].get("total", 0),
        "unique_graphs": counters["stats"].get("unique_graphs", 0),
        "guard_failures": sum(len(v) for v in guard_failures.values()),
    }


def _dynamo_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    reasons = {k: v - before["graph_break_reasons"].get(k, 0) for k, v in after["graph_break_reasons"].items()}
    reasons = {k.splitlines()[0][:160]: v for k, v in reasons.items() if v > 0}
    return {
        "graph_breaks": after["graph_breaks"] - before["graph_breaks"],
        "recompiles": max(0, after["guard_failures"] - before["guard_failures"]),
        "frames_compiled": after["frames_compiled"] - before["frames_compiled"],
        "unique_graphs": after["unique_graphs"] - before["unique_graphs"],
        "graph_break_reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])[:8]),
        "counting": "during this generation: recompiles = dynamo guard failures (a configuration switched on "
                    "recompiles the blocks whose guards it changes; a later generation of the same configuration "
                    "should show none), graph breaks and frames compiled",
    }


def _scrub(ctx: RS.ModelContext) -> None:
    """Leave the pipeline as built after a failed activation or generation (every peer's undo, best effort)."""
    import dit_accel

    from dit_accel.bench.peers import remove_diffusers_cache

    for undo in (lambda: dit_accel.remove(ctx.pipe), lambda: remove_diffusers_cache(ctx.transformer)):
        try:
            undo()
        except Exception:  # noqa: BLE001 - best effort: the failure itself is what gets recorded
            pass
    if sys.modules.get("cache_dit") is not None:
        try:
            with RS.quiet_cache_dit():
                sys.modules["cache_dit"].disable_cache(ctx.pipe)
        except Exception:  # noqa: BLE001 - not applied, or already removed
            pass


def _generate(ctx: RS.ModelContext, run: RS.RunSpec, clock: Clock, *, cold: bool, seed: int,
              recorder: Any = None) -> dict[str, Any]:
    """One generation of ``run``; returns the measurements of this generation."""
    try:
        return _generate_once(ctx, run, clock, cold=cold, seed=seed)
    finally:
        if recorder is not None:
            recorder.remove()


def _generate_once(ctx: RS.ModelContext, run: RS.RunSpec, clock: Clock, *, cold: bool, seed: int) -> dict[str, Any]:
    counter = None
    before = _dynamo_snapshot() if run.compiled else None
    with RS.activated(run, ctx) as active:
        handle = active.handle
        if cold and not run.compiled:
            counter = BlockCounter(ctx.transformer)
        try:
            timing: GenerationTiming = time_generation(
                ctx.pipe, dict(ctx.call_kwargs, generator=torch.Generator().manual_seed(seed)), clock,
                method=None if handle is None else handle.method, probe_attention=not run.compiled,
                call_context=active.call_context,
            )
        finally:
            if counter is not None:
                counter.remove()
        out: dict[str, Any] = {"seconds": timing.seconds, "wall_s": timing.wall_s, "step_seconds": timing.step_seconds,
                               "peak_gib": timing.peak_gib, "attention_s": timing.attention_s,
                               "attention_calls": timing.attention_calls, "attention_s_by_kind": timing.attention_s_by_kind,
                               "plan_s": timing.plan_s, "plan_calls": timing.plan_calls}
        latents = _latents(timing.output)
        out["finite_output"] = None if latents is None else bool(torch.isfinite(latents).all())
        if counter is not None:
            out["blocks_computed_fraction"] = counter.fraction
        if handle is not None:
            summary = handle.stats_summary()
            out["mean_density"] = summary["mean_density"]
            out["attention_stats"] = {k: summary[k] for k in ("attention_calls", "sparse_calls", "backends", "dense_reasons")}
            out["plan_ms_host"] = summary["plan_ms_total"]
            caches = handle.cache_summary()
            if caches:
                cache = next(iter(caches.values()))
                out["cache_compute_fraction"] = cache.get("compute_fraction")
                out["cache_peak_bytes"] = cache.get("peak_cached_bytes")
        out["counters"] = {k: f() for k, f in active.counters.items()}
    if before is not None:
        out["dynamo"] = _dynamo_delta(before, _dynamo_snapshot())
    return out


# --- records ----------------------------------------------------------------------------------------------------------
def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _finish_record(rec: dict[str, Any], steps: int) -> None:
    """Fill the summary fields of a run record from its generations."""
    gens = rec.get("_timed", [])
    cold = rec.get("_cold")
    rec["seconds"] = _median([g["seconds"] for g in gens])
    rec["seconds_all"] = [g["seconds"] for g in gens]
    rec["seconds_cold"] = None if cold is None else cold["seconds"]
    rec["seconds_per_step"] = None if rec["seconds"] is None else rec["seconds"] / steps
    last = gens[-1] if gens else cold
    if last is None:
        return
    rec["step_seconds"] = last["step_seconds"]
    # peak memory of the timed generations (the cold one may hold compile workspaces and, for stock, the
    # first-block recorder); the cold one's beside it
    peaks = [g["peak_gib"] for g in (gens or [cold]) if g and g.get("peak_gib") is not None]
    rec["peak_gib"] = max(peaks) if peaks else None
    rec["peak_gib_cold"] = None if cold is None else cold.get("peak_gib")
    # without a dit-accel attention method every attention tile is computed
    rec["mean_density"] = last.get("mean_density", 1.0)
    for key in ("attention_stats", "plan_ms_host", "cache_compute_fraction", "cache_peak_bytes", "counters",
                "finite_output"):
        if key in last:
            rec[key] = last[key]
    if cold is not None and "blocks_computed_fraction" in cold:
        rec["blocks_computed_fraction"] = cold["blocks_computed_fraction"]
    rec["plan_ms"] = None if last.get("plan_s") is None else last["plan_s"] * 1e3
    rec["plan_calls"] = last.get("plan_calls", 0)
    rec["attention_s"] = last.get("attention_s")
    rec["attention_calls"] = last.get("attention_calls")
    rec["attention_s_by_kind"] = last.get("attention_s_by_kind")
    if cold is not None and "dynamo" in cold:
        rec["dynamo"] = cold["dynamo"]
        rec["dynamo_timed"] = [g["dynamo"] for g in gens if "dynamo" in g]


def _cache_fraction(rec: dict[str, Any]) -> float | None:
    """Our cache's own compute fraction, else the measured share of blocks computed (peers)."""
    if rec.get("cache_compute_fraction") is not None:
        return rec["cache_compute_fraction"]
    return rec.get("blocks_computed_fraction")


def finalize_model(entry: dict[str, Any]) -> None:
    """Speed-ups and Amdahl breakdowns of every run of one model (recomputed at every write)."""
    runs = entry["runs"]
    stock = runs.get(RS.STOCK, {})
    cudnn = runs.get(RS.STOCK_CUDNN, {})
    base, base_cudnn = stock.get("seconds"), cudnn.get("seconds")
    stock_attention = stock.get("attention_s")
    stock_rest = None if base is None or stock_attention is None else base - stock_attention
    entry["stock_attention_share"] = None if stock_rest is None or not base else stock_attention / base
    for key, rec in runs.items():
        if "same_as" in rec:
            continue
        seconds = rec.get("seconds")
        rec["speedup_vs_stock"] = base / seconds if base and seconds else None
        rec["speedup_vs_stock_cudnn"] = base_cudnn / seconds if base_cudnn and seconds else None
        if rec.get("compiled"):
            compiled_stock = runs.get(RS.STOCK + COMPILED_SUFFIX, {}).get("seconds")
            rec["speedup_vs_stock_compiled"] = compiled_stock / seconds if compiled_stock and seconds else None
        rec["cache_compute_fraction"] = _cache_fraction(rec) if "_timed" in rec or "_cold" in rec else rec.get("cache_compute_fraction")
        if rec.get("compiled"):
            rec["breakdown"] = None
            rec["breakdown_note"] = "not measured under torch.compile (the probes would add graph breaks)"
        elif seconds and stock_rest is not None and rec.get("attention_s") is not None:
            fraction = rec.get("blocks_computed_fraction")
            fraction = 1.0 if fraction is None else fraction
            planning = (rec.get("plan_ms") or 0.0) / 1e3
            rest = stock_rest * fraction
            rec["breakdown"] = {
                "attention_s": rec["attention_s"], "rest_s": rest, "planning_s": planning,
                "cache_overhead_s": seconds - rec["attention_s"] - planning - rest,
                "attention_share": rec["attention_s"] / seconds, "rest_share": rest / seconds,
                "planning_share": planning / seconds,
            }
        else:
            rec["breakdown"] = None
    own = ("kind", "description", "preset", "compiled", "required", "same_as", "params")
    for key, rec in runs.items():
        if "same_as" in rec and rec["same_as"] in runs:
            source = runs[rec["same_as"]]
            rec.update({f: v for f, v in source.items() if f not in own and not f.startswith("_")})


def public_report(report: dict[str, Any]) -> dict[str, Any]:
    """The report without the per-generation scratch fields (``_cold``, ``_timed``)."""
    out = dict(report)
    out["models"] = {}
    for name, entry in report["models"].items():
        e = dict(entry)
        e["runs"] = {k: {f: v for f, v in rec.items() if not f.startswith("_")} for k, rec in entry["runs"].items()}
        out["models"][name] = e
    return out


# --- the loop -------------------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; refuses cuda without a GPU."""
    if name not in ("auto", "cuda", "cpu"):
        raise ValueError(f"unknown device {name!r}; choose auto, cuda or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device; use --device cpu (with --tiny)")
    return torch.device(name)


def plan_models(options: BenchOptions, device: torch.device) -> list[ModelPlan]:
    """The models to run with their layers and estimated generation time."""
    specs = M.model_specs(options.tiny)
    names = list(options.models) or list(specs)
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; models: {list(specs)}")
    steps = options.steps or (TINY_STEPS if options.tiny else DEFAULT_STEPS)
    plans = []
    for name in names:
        spec = specs[name]
        layers = M.resolve_layers(spec, options.layers)
        description = M.describe(spec, layers, steps)
        if options.tiny:
            gen_s, build_s = 0.3, 0.2  # measured on the 2-core CPU machines; replaced by the stock measurement
        else:
            gen_s, build_s = description["est_generation_s"], BUILD_ALLOWANCE_S
        plans.append(ModelPlan(spec, layers, description, gen_s, build_s))
    return plans


def all_runs(options: BenchOptions, compiled_blocks: Callable[[RS.ModelContext], RS.CompiledBlocks] | None) -> list[RS.RunSpec]:
    """The configurations of this invocation, in priority order."""
    backend = options.compile_backend if options.compile else None
    runs = RS.plan_runs(peer_preset=options.peer_preset, flex_preset=options.flex_preset, compile_backend=backend,
                        compiled_blocks=compiled_blocks)
    return _select(runs, options.runs, options.peer_preset)


def new_report(options: BenchOptions, device: torch.device, clock: Clock) -> dict[str, Any]:
    """The report skeleton: device, versions, date, command line, settings."""
    from dit_accel.presets import get_preset, preset_names

    return {
        "schema": R.SCHEMA,
        "device": R.device_name(device),
        "device_type": device.type,
        "versions": R.versions(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": list(options.argv),
        "clock": clock.name,
        "settings": {
            "tiny": options.tiny, "steps": options.steps, "rounds_timed": options.rounds,
            "time_budget_s": options.time_budget_s, "compile": options.compile, "compile_backend": options.compile_backend,
            "peer_preset": options.peer_preset, "flex_preset": options.flex_preset, "seed": options.seed,
            "presets": [get_preset(n).tag for n in preset_names()],
            "dynamo_recompile_limit": RECOMPILE_LIMIT if options.compile else None,
            "dtype": "bfloat16" if device.type == "cuda" else "float32",
        },
        "notes": {
            "seconds": "median device time of the timed generations (round 2 on); seconds_cold: the configuration's "
                       "first generation after being switched on (Triton/inductor compiles on first use included)",
            "speedup_vs_stock": "stock seconds / this run's seconds, both timed in this process",
            "plan_ms": "device time inside the attention method's plan() per generation (CUDA events; host timer on CPU); "
                       "null without a dit-accel attention method",
            "mean_density": "dit-accel's mean share of 128x128 tiles computed over all self-attention calls (dense calls "
                            "count 1.0); 1.0 for configurations without a dit-accel attention method",
            "cache_compute_fraction": "ours: blocks computed / blocks of every call (the cache's own count); peers: "
                                      "self-attention module calls / (transformer calls x modules), counted on the cold generation",
            "breakdown": "Amdahl split of one timed generation: attention_s (device time in attention calls), planning_s, "
                         "rest_s = (stock seconds - stock attention) x share of blocks computed, cache_overhead_s = the "
                         "remainder (cache bookkeeping, hooks, forecasting; it also absorbs estimate error and can be negative)",
            "peers": "cache peers are tuned to the compute fraction of the peer preset's cache, measured in the same run "
                     "(share of steps whose blocks all run; at reduced depth a first-block cache's fixed block weighs more "
                     "than at the published depth)",
            "distribution_metrics": "not part of this benchmark (random weights); quality is measured on the testbed "
                                    "(dit-accel bench --testbed-quality)",
        },
        "budget": {"time_budget_s": options.time_budget_s},
        "models": {},
    }


def _write(report: dict[str, Any], out: Path, plot: bool = False) -> None:
    for entry in report["models"].values():
        finalize_model(entry)
    data = public_report(report)
    R.write_json(out, data)
    if plot:
        try:
            R.speedup_png(out.with_suffix(".png"), data)
        except Exception as exc:  # a plot must never lose the JSON
            logger.warning("bench: PNG plot failed: %s", exc)


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {str(exc).strip()}"
    return text if len(text) < 600 else text[:600] + " ..."


def run_bench(options: BenchOptions, print_fn: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the benchmark (see the module docstring); returns the report as written to ``options.out``."""
    threads = torch.get_num_threads()
    limits = (torch._dynamo.config.recompile_limit, torch._dynamo.config.accumulated_recompile_limit)
    try:
        return _run_bench(options, print_fn)
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.config.recompile_limit, torch._dynamo.config.accumulated_recompile_limit = limits


def _run_bench(options: BenchOptions, print_fn: Callable[[str], None]) -> dict[str, Any]:
    device = resolve_device(options.device)
    if device.type == "cpu" and not options.tiny and options.device == "auto":
        raise ValueError("no CUDA device: the real-size models need a GPU; use --tiny for the CPU flow "
                         "(or --device cpu to run the real sizes on the CPU anyway)")
    if options.tiny and device.type == "cuda":
        print_fn("bench: --tiny on CUDA: tiny configs, CUDA clock")
    cuda = device.type == "cuda"
    if options.tiny and not cuda:
        torch.set_num_threads(1)  # tiny shapes: two threads contending for the CPU run slower than one
    dtype = torch.bfloat16 if cuda else torch.float32
    steps = options.steps or (TINY_STEPS if options.tiny else DEFAULT_STEPS)
    options.steps = steps
    if options.compile and options.compile_backend is None:
        options.compile_backend = "inductor" if cuda else "eager"
    if options.compile:
        # every configuration keeps its own compiled blocks (switching back finds them in dynamo's cache): the
        # default limit of 8 entries per code object would silently fall back to eager after 8 configurations
        torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
        torch._dynamo.config.accumulated_recompile_limit = max(RECOMPILE_LIMIT * 8,
                                                               torch._dynamo.config.accumulated_recompile_limit)
    clock = Clock(device)
    budget = Budget(options.time_budget_s)
    plans = plan_models(options, device)
    compiled_cache: dict[int, RS.CompiledBlocks] = {}

    def compiled_blocks(ctx: RS.ModelContext) -> RS.CompiledBlocks:
        key = id(ctx.transformer)
        if key not in compiled_cache:
            compiled_cache.clear()  # one model at a time
            compiled_cache[key] = RS.CompiledBlocks(ctx.transformer, options.compile_backend or "inductor")
        return compiled_cache[key]

    runs = all_runs(options, compiled_blocks)
    same_as = RS.dedupe(runs)
    report = new_report(options, device, clock)
    needs = [model_need(p, runs, options.rounds, cuda) for p in plans]
    report["budget"]["estimated_need_s"] = {p.spec.name: round(n, 1) for p, n in zip(plans, needs)}
    out = options.out
    _write(report, out)
    first_sparse_done = False
    for index, plan in enumerate(plans):
        share = budget.begin_model(needs[index], sum(needs[index:]))
        spec = plan.spec
        entry: dict[str, Any] = {"title": spec.title, "source": spec.source, "family": spec.family,
                                 "pipeline": spec.pipeline, "shape": dict(spec.shape(), steps=steps),
                                 "estimate": plan.description, "budget_share_s": round(share, 1), "runs": {}}
        report["models"][spec.name] = entry
        print_fn(f"[{spec.name}] share {share:.0f} s of {max(0.0, budget.deadline - budget.now()):.0f} s left; "
                 f"layers {list(plan.layers)} of {list(spec.full_layers)}, est. {plan.gen_s:.2f} s/generation")
        if not budget.fits(plan.build_s + plan.gen_s):
            entry["skipped"] = "budget"
            for r in runs:
                entry["runs"][r.key] = {"kind": r.kind, "skipped": "budget"}
            _write(report, out)
            continue
        try:
            built = M.build_model(spec, device, dtype, plan.layers, steps, seed=options.seed)
        except Exception as exc:  # noqa: BLE001 - one model failing must not stop the others
            entry["error"] = _error_text(exc)
            print_fn(f"[{spec.name}] build failed: {entry['error']}")
            _write(report, out)
            continue
        entry.update(layers=built.layers_info(), build_s=round(built.build_s, 2), weights_gib=round(built.weights_gib, 3))
        ctx = RS.ModelContext(pipe=built.pipe, spec=spec, steps=steps, call_kwargs=built.call_kwargs, device=device,
                              peer_preset=options.peer_preset, built_layers=sum(plan.layers),
                              full_layers=sum(spec.full_layers), min_seq_len=0 if options.tiny else None)
        bench = _ModelBench(ctx, entry, plan, options, clock, budget, cuda, first_sparse_done, report, print_fn)
        first_sparse_done = bench.run(runs, same_as)
        entry["budget_used_s"] = round(budget.now() - (budget.model_deadline - share), 1)
        _write(report, out, plot=True)
        del ctx, built, bench
        compiled_cache.clear()
        if options.compile:
            torch._dynamo.reset()  # its cache holds the finished model's blocks
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    report["elapsed_s"] = round(budget.elapsed(), 1)
    _write(report, out, plot=True)
    print_fn(R.markdown_table(public_report(report)))
    print_fn(f"wrote {out} and {out.with_suffix('.png')} in {report['elapsed_s']} s")
    return public_report(report)


class _ModelBench:
    """One model's configurations: the cold round with admission, the timed rounds, then the runs-last peers."""

    def __init__(self, ctx: RS.ModelContext, entry: dict[str, Any], plan: ModelPlan, options: BenchOptions, clock: Clock,
                 budget: Budget, cuda: bool, first_sparse_done: bool, report: dict[str, Any],
                 print_fn: Callable[[str], None]) -> None:
        self.ctx, self.entry, self.options, self.clock, self.budget = ctx, entry, options, clock, budget
        self.cuda, self.first_sparse_done, self.report, self.print_fn = cuda, first_sparse_done, report, print_fn
        self.records: dict[str, dict[str, Any]] = entry["runs"]
        self.gen_s = plan.gen_s
        self.model_sparse_done = False

    def _say(self, text: str) -> None:
        self.print_fn(f"[{self.ctx.spec.name}] {text}")

    def _save(self) -> None:
        _write(self.report, self.options.out)

    def screen(self, run: RS.RunSpec, same_as: dict[str, str]) -> bool:
        """Create the run's record; ``False`` (with the reason recorded) when it will not run here."""
        rec: dict[str, Any] = {"kind": run.kind, "description": run.description, "preset": run.preset,
                               "compiled": run.compiled, "required": run.required}
        self.records[run.key] = rec
        if run.key in same_as:
            rec["same_as"] = same_as[run.key]
            return False
        if run.needs_cuda and not self.cuda:
            rec["skipped"] = "needs CUDA"
            return False
        missing = RS.missing_modules(run)
        if missing:
            rec["skipped"] = "not importable: " + "; ".join(missing)
            return False
        return True

    def cost(self, run: RS.RunSpec) -> float:
        """Estimated seconds of a run's cold and timed generations."""
        allowance = cold_allowance(run, self.cuda, self.first_sparse_done, self.model_sparse_done)
        return self.gen_s * (1 + run.extra_generations + self.options.rounds) + allowance

    def cold(self, run: RS.RunSpec, keep_s: float = 0.0) -> bool:
        """Admit and run the cold generation; ``True`` when the run is in for the timed rounds. ``keep_s``: time
        kept for required runs still to come (an optional run is admitted only beside them)."""
        from dit_accel.bench.peers import FirstBlockRecorder

        ctx, rec = self.ctx, self.records[run.key]
        timed = self.gen_s * self.options.rounds
        if not self.budget.admit(self.cost(run) - timed, timed, keep_s):
            rec["skipped"] = "budget"
            self._say(f"{run.key}: skipped (budget)")
            self._save()
            return False
        recorder = None
        if run.key == RS.STOCK:
            try:
                recorder = FirstBlockRecorder(ctx.transformer, ctx.spec.sequential_cfg)
            except Exception as exc:  # noqa: BLE001 - only the FirstBlockCache/DBCache peers need it
                ctx.notes["first_block_recorder"] = _error_text(exc)
        try:
            rec["_cold"] = _generate(ctx, run, self.clock, cold=True, seed=self.options.seed, recorder=recorder)
        except Exception as exc:  # noqa: BLE001 - a failing configuration is recorded; the others go on
            rec["error"] = _error_text(exc)
            rec["traceback_tail"] = traceback.format_exc().strip().splitlines()[-6:]
            self.budget.release(timed)
            _scrub(ctx)
            if self.cuda:
                torch.cuda.empty_cache()
            self._say(f"{run.key}: ERROR {rec['error']}")
            self._save()
            return False
        if recorder is not None:
            try:
                ctx.first_block_diffs = recorder.diffs()
            except Exception as exc:  # noqa: BLE001
                ctx.notes["first_block_recorder"] = _error_text(exc)
            recorder.residuals.clear()
            self.gen_s = rec["_cold"]["wall_s"]  # the measured stock generation replaces the FLOP estimate
        if run.key == RS.STOCK_CUDNN:
            # the first generation of the process also pays CUDA, cuBLAS and cuDNN set-up: the second dense
            # generation is the better estimate of the ones to come
            self.gen_s = rec["_cold"]["wall_s"]
        if run.key == f"{self.options.peer_preset}.cache":
            cold = rec["_cold"]
            ctx.target_fraction = cold.get("cache_compute_fraction") or cold.get("blocks_computed_fraction")
        if run.kind in SPARSE_KINDS:
            self.model_sparse_done = self.first_sparse_done = True
        self._say(f"{run.key}: cold {rec['_cold']['seconds']:.3f} s")
        self._save()
        return True

    def timed(self, run: RS.RunSpec, round_index: int) -> None:
        """One timed generation of an admitted run."""
        rec = self.records[run.key]
        if not self.budget.fits(self.gen_s):
            rec.setdefault("timed_skipped", []).append(f"round {round_index + 2}: budget")
        else:
            try:
                rec.setdefault("_timed", []).append(_generate(self.ctx, run, self.clock, cold=False, seed=self.options.seed))
            except Exception as exc:  # noqa: BLE001
                rec.setdefault("timed_errors", []).append(_error_text(exc))
                _scrub(self.ctx)
        self.budget.release(self.gen_s)
        _finish_record(rec, self.ctx.steps)
        self._save()

    def run(self, runs: list[RS.RunSpec], same_as: dict[str, str]) -> bool:
        """Every configuration; returns ``first_sparse_done`` for the next model."""
        candidates = [r for r in runs if self.screen(r, same_as)]
        admitted = []
        for i, run in enumerate(candidates):
            if run.runs_last:
                continue
            keep = 0.0 if run.required else sum(self.cost(r) for r in candidates[i + 1:] if r.required)
            if self.cold(run, keep):
                admitted.append(run)
        for r in range(self.options.rounds):
            for run in (admitted if r % 2 == 0 else list(reversed(admitted))):
                self.timed(run, r)
            self._say(f"timed round {r + 2} done ({self.budget.elapsed():.0f} s elapsed)")
        for run in [r for r in candidates if r.runs_last]:
            if self.cold(run):
                admitted.append(run)
                for r in range(self.options.rounds):
                    self.timed(run, r)
        for run in admitted:
            _finish_record(self.records[run.key], self.ctx.steps)
        if "first_block_recorder" in self.ctx.notes:
            self.entry.setdefault("notes", {})["first_block_recorder"] = self.ctx.notes["first_block_recorder"]
        for run in admitted:
            if run.key in self.ctx.notes:
                self.records[run.key]["params"] = dict(self.ctx.notes[run.key])
        self.entry["target_fraction"] = self.ctx.target_fraction
        return self.first_sparse_done
