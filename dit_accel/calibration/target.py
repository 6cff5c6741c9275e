"""Calibration to a quality target: the fastest configuration of sparse attention and feature caching that keeps
a PSNR target on the user's own model (``dit_accel.calibrate``, ``dit-accel calibrate --target-psnr``).

1. *Measure*: the prompts run dense, batched, with two recorders: the cache's reuse-error recorder on the blocks
   (:mod:`~dit_accel.calibration.measure`, what the schedule search needs) and a density probe on the
   self-attention calls (:class:`DensityProbe`: for each ``top_p`` of the grid it makes the plan the sparse method
   would make and keeps, per layer, the modelled cost of running it, heads above break-even counted dense). One
   transformer forward under torch's FLOP counter gives the share of the forward spent in the self-attention the
   method can make sparse.
2. *Model*: a candidate is a ``top_p`` per layer group (or no sparse attention) and a cache budget (or no cache; the
   schedule of a budget comes from the exact schedule search). Its modelled cost, relative to the dense
   transformer, is ``f * ((1 - a) + a * c)``: ``f`` the schedule's share of block evaluations, ``a`` the
   attention FLOP share, ``c`` the mean modelled cost of the self-attention calls (safety-valve calls 1; sparse
   ones the probe's cost plus the planning, ``plan_cost`` of a dense call per refresh). It is deterministic, so
   the same seed gives the same choice; it is a model, not a timing.
3. *Search*: cache budgets and uniform ``top_p`` values are each bisected for the most aggressive one that meets the
   target on its own (a real run of every prompt per evaluation); the best uniform ``top_p`` is then made sparser
   one layer group at a time; combinations are ranked by modelled cost and evaluated cheapest first among those
   whose predicted PSNR (the two parts' errors added, per prompt) meets the target. The cheapest evaluated
   configuration that measured at or above the target wins (dense when none did).
4. *Time and write*: the chosen configuration and dense are timed on the device (one batch each, after one
   warm-up batch), and a preset file (:mod:`dit_accel.preset_file`) is written. A time budget, ``max_evals``,
   Ctrl-C or SIGTERM end the search early; the best result so far is written, marked ``interrupted``.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from dit_accel.attention.base import PlannedMethod, PlanStages, safety_reason
from dit_accel.attention.blocks import text_blocks_of
from dit_accel.attention.combo import ComboConfig
from dit_accel.attention.draft import DraftSelection
from dit_accel.attention.permuted import permuted_order
from dit_accel.attention.head_split import break_even_of, cost_table_for
from dit_accel.attention.precision import kernel_precision
from dit_accel.calibration.measure import Prompt, PromptRunner, ReuseCosts, measure
from dit_accel.calibration.search import search
from dit_accel.calibration.settings import SearchSettings
from dit_accel.checks import check_number
from dit_accel.kernels.fp8_common import check_precision

ATTENTION = "combo"
"""The sparse method calibrated (the shipped presets' method)."""

ATTENTION_TEMPLATE: dict[str, Any] = {"drift_check": False, "skip_threshold": float("-inf"), "quality": "balanced",
                                      "dense_above": "auto"}
"""Its options besides ``top_p``: the plan reused between refreshes as in the presets (no drift check, no tile
statistics), the other thresholds of the balanced level, break-even routing by the device cost model."""

CACHE = "procache"
"""The cache scheduler calibrated (schedules from the exact search, no selective steps)."""


@dataclass(frozen=True)
class TargetSettings:
    """Options of a calibration to a target, validated on construction."""

    target_psnr: float
    """PSNR in dB against dense that the chosen configuration must reach on the calibration prompts (mean over
    prompts of each video's PSNR), in (0, 100)."""
    num_steps: int = 20
    """Denoising steps of every run (and of the cache schedule), >= 3."""
    seed: int = 0
    """Prompt ``i`` runs with seed ``seed + i``."""
    budgets: tuple[float, ...] = (0.75, 0.6, 0.5, 0.4, 0.35)
    """Cache budgets searched (share of block evaluations), in (0, 1)."""
    top_ps: tuple[float, ...] = (0.97, 0.92, 0.88, 0.835, 0.74, 0.6)
    """``top_p`` values searched, in (0, 1]."""
    layer_groups: int = 2
    """Groups of consecutive sparse layers whose ``top_p`` is lowered one at a time after the uniform search."""
    max_evals: int = 12
    """Most evaluations (a run of every prompt each) of the search, the dense run not counted."""
    time_budget_s: float | None = None
    """Wall-clock seconds after which no new evaluation starts (``None``: no limit)."""
    batch_size: int = 8
    """Prompts per pipeline call."""
    precision: str = "bf16"
    """Kernel precision of the sparse attention (``"bf16"`` or ``"fp8"``)."""
    warmup_steps: int = 2
    """First steps the cache always computes."""
    final_steps: int = 0
    """Last steps the cache always computes."""
    max_consecutive_reuse: int = 3
    """At most this many reused steps in a row."""
    plan_cost: float = 0.05
    """Modelled cost of one refresh plan, as a share of a dense attention call."""
    timing_prompts: int = 2
    """Prompts in the timed batch of the chosen configuration and of dense (``0``: no timing)."""

    def __post_init__(self) -> None:
        t = self.target_psnr
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (0.0 < t < 100.0):
            raise ValueError(f"target_psnr must be a number of dB in (0, 100), got {t!r}")
        check_number("num_steps", self.num_steps, 3, integer=True)
        check_number("seed", self.seed, 0, integer=True)
        for name, values, lo_open, hi in (("budgets", self.budgets, True, 1.0), ("top_ps", self.top_ps, True, 1.0)):
            if not values:
                raise ValueError(f"{name} must not be empty")
            for v in values:
                check_number(name, v, 0.0, hi, lo_open=lo_open)
        if any(b >= 1.0 for b in self.budgets):
            raise ValueError(f"budgets must be below 1 (1 is no cache), got {self.budgets}")
        check_number("layer_groups", self.layer_groups, 1, 64, integer=True)
        check_number("max_evals", self.max_evals, 1, 1000, integer=True)
        check_number("time_budget_s", self.time_budget_s, 0.0, math.inf, lo_open=True, allow_none=True)
        check_number("batch_size", self.batch_size, 1, 1024, integer=True)
        check_precision(self.precision)
        check_number("plan_cost", self.plan_cost, 0.0, 100.0)
        check_number("timing_prompts", self.timing_prompts, 0, 1024, integer=True)
        object.__setattr__(self, "budgets", tuple(sorted(set(self.budgets), reverse=True)))
        object.__setattr__(self, "top_ps", tuple(sorted(set(self.top_ps), reverse=True)))

    def cache_settings(self, budget: float) -> SearchSettings:
        """The schedule search's settings for ``budget``."""
        return SearchSettings(num_steps=self.num_steps, budget=budget, warmup_steps=self.warmup_steps,
                              final_steps=self.final_steps, max_consecutive_reuse=self.max_consecutive_reuse,
                              seed=self.seed)


# ------------------------------------------------------------------------------------------- measuring
class DensityProbe(PlannedMethod):
    """Runs every self-attention call dense and records, per layer and ``top_p`` of the grid, what the sparse
    method's plan would cost: per call the mean over heads of the kernel's relative cost at the head's planned
    density, or 1 for a head the break-even routing would run dense."""

    name = "_density_probe"
    config_class = ComboConfig

    def build_stages(self) -> PlanStages:
        """The sparse method's order and draft selection."""
        return PlanStages(order=permuted_order(self.cfg), select=DraftSelection(self.cfg))

    def setup(self, top_ps: Sequence[float]) -> DensityProbe:
        """Start recording for the ``top_p`` values ``top_ps`` (returns ``self``)."""
        self.selections = {p: DraftSelection(dataclasses.replace(self.cfg, top_p=p)) for p in top_ps}
        self.costs: dict[tuple[int, float], list[float]] = {}
        self.densities: dict[tuple[int, float], list[float]] = {}
        self.valve_calls: dict[int, int] = {}
        self.sparse_calls: dict[int, int] = {}
        self.shape: tuple[int, int, int, int] | None = None
        return self

    def plan(self, q: torch.Tensor, k: torch.Tensor, ctx: Any) -> None:
        """Record the would-be plans of this call; always ``None`` (the call runs dense)."""
        B, H, S, D = q.shape
        self.shape = self.shape or (B, H, S, D)
        if safety_reason(self.cfg, ctx) is not None:
            self.valve_calls[ctx.layer] = self.valve_calls.get(ctx.layer, 0) + 1
            return None
        self.sparse_calls[ctx.layer] = self.sparse_calls.get(ctx.layer, 0) + 1
        precision, _ = kernel_precision(q, self.cfg.precision)
        be, _ = break_even_of(self.cfg.dense_above, q.device, S, D, precision) if self.cfg.dense_above is not None \
            else (1.0, "off")
        table = cost_table_for(q.device)
        order = self.order_of(q, k, ctx)
        text = text_blocks_of(ctx.layout, S, q.device)
        for p, selection in self.selections.items():
            est = selection.estimate(q, k, order, text)
            dens = est.keep.float().mean(dim=(-1, -2)).reshape(-1).tolist()
            cost = sum(table.relative_cost(S, D, d, precision) if d <= be else 1.0 for d in dens) / len(dens)
            self.costs.setdefault((ctx.layer, p), []).append(cost)
            self.densities.setdefault((ctx.layer, p), []).append(sum(dens) / len(dens))
        return None


@dataclass
class ModelFacts:
    """What the dense measurement learned about the model, the inputs of the modelled cost."""

    layers: int
    """Self-attention layers seen by the probe."""
    sparse_layers: list[int]
    """Layers with calls the safety valves leave sparse."""
    attention_share: float
    """FLOP share of a transformer forward in those layers' self-attention."""
    valve_share: dict[int, float]
    """Per layer, the share of its calls the safety valves run dense."""
    cost: dict[tuple[int, float], float]
    """``(layer, top_p)`` -> mean modelled cost of a sparse call (1 = dense attention)."""
    density: dict[tuple[int, float], float]
    """``(layer, top_p)`` -> mean planned density."""
    refresh_period: int
    """Computed calls between two plans of the sparse method."""
    num_blocks: int
    """Blocks of the transformer (for the schedule search)."""


def attention_flop_share(transformer: torch.nn.Module, args: tuple, kwargs: dict, attention_flops: float) -> float:
    """``attention_flops`` over the FLOPs torch's FLOP counter counts in one forward of ``transformer`` (its CPU
    SDPA kernel counted like the CUDA ones: torch's counter has no formula for it)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_sdpa(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    custom = {}
    cpu_op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_op is not None:
        custom[cpu_op] = cpu_sdpa
    counter = FlopCounterMode(display=False, custom_mapping=custom)
    with torch.inference_mode(), counter:
        transformer(*args, **kwargs)
    total = counter.get_total_flops()
    return min(1.0, attention_flops / total) if total > 0 else 0.0


# --------------------------------------------------------------------------------------------- model
@dataclass(frozen=True)
class Candidate:
    """One configuration: a ``top_p`` per layer group (``None``: no sparse attention) and a cache budget
    (``None``: no cache)."""

    top_p: tuple[float, ...] | None
    """``top_p`` of each layer group, or ``None``."""
    budget: float | None
    """Cache budget, or ``None``."""

    @property
    def key(self) -> str:
        """A stable name, e.g. ``attn[0.92,0.88]+cache0.5``."""
        parts = [] if self.top_p is None else ["attn[" + ",".join(f"{p:g}" for p in self.top_p) + "]"]
        parts += [] if self.budget is None else [f"cache{self.budget:g}"]
        return "+".join(parts) or "dense"


@dataclass
class Evaluation:
    """A candidate run on every calibration prompt."""

    candidate: Candidate
    """The configuration evaluated."""
    psnr: float
    """Mean over prompts of the per-video PSNR against dense (dB)."""
    psnr_per_prompt: list[float]
    """PSNR against dense (dB) of each prompt's video (outputs clamped to [0, 1]), in prompt order."""
    mse_per_prompt: list[float]
    """Mean squared error against dense of each prompt's raw output (not clamped), in prompt order."""
    modelled_cost: float
    """:meth:`CostModel.cost` of the candidate: its modelled compute relative to the dense transformer (1.0)."""
    seconds: float
    """Wall-clock of the run (a timing field)."""
    mean_density: float | None
    """Mean share of attention tiles computed over all self-attention calls (dense calls count 1.0); ``None``
    for the stock pipeline (nothing applied)."""
    dense_head_share: float | None
    """Of the heads of the planned sparse calls, the share the break-even routing ran dense; ``None`` without
    such calls."""
    compute_fraction: float | None
    """Share of block evaluations the cache computed (mean over cached transformers); ``None`` without a cache."""
    source: str
    """Which step of the search asked for it."""


class CostModel:
    """The deterministic modelled cost of candidates (see the module docstring)."""

    def __init__(self, facts: ModelFacts, settings: TargetSettings, schedules: dict[float, dict[str, Any]]) -> None:
        self.facts = facts
        self.settings = settings
        self.schedules = schedules
        n = len(facts.sparse_layers)
        g = min(settings.layer_groups, max(1, n))
        self.groups = [facts.sparse_layers[i * n // g:(i + 1) * n // g] for i in range(g)] if n else []

    def layer_top_p(self, top_p: tuple[float, ...]) -> list[float | None]:
        """Per layer (index = layer), the ``top_p`` of its group (``None`` for layers outside every group)."""
        out: list[float | None] = [None] * self.facts.layers
        for group, p in zip(self.groups, top_p):
            for layer in group:
                out[layer] = p
        return out

    def attention_cost(self, top_p: tuple[float, ...] | None) -> float:
        """Mean modelled cost of the self-attention calls the method sees (1 = dense; layers the safety valves
        always run dense count 1)."""
        f = self.facts
        if top_p is None or not f.sparse_layers:
            return 1.0
        per_layer = self.layer_top_p(top_p)
        plan = self.settings.plan_cost / max(1, f.refresh_period)
        costs = []
        for layer in range(f.layers):
            if layer not in f.sparse_layers:
                costs.append(1.0)
                continue
            valve = f.valve_share[layer]
            costs.append(valve + (1.0 - valve) * (f.cost[(layer, per_layer[layer])] + plan))
        return sum(costs) / len(costs)

    def compute_fraction(self, budget: float | None) -> float:
        """Share of block evaluations of the budget's schedule (1 without a cache)."""
        return 1.0 if budget is None else self.schedules[budget]["compute_fraction"]

    def cost(self, c: Candidate) -> float:
        """``f * ((1 - a) + a * attention cost)`` relative to the dense transformer."""
        a = self.facts.attention_share
        return self.compute_fraction(c.budget) * ((1.0 - a) + a * self.attention_cost(c.top_p))


# -------------------------------------------------------------------------------------------- search
class _Stop(Exception):
    """The search's budget (evaluations or time) is spent."""


def _video(frames: torch.Tensor) -> torch.Tensor:
    """A generated sample as a ``(T, 3, H, W)`` video in [0, 1] (an image is one frame)."""
    return (frames[None] if frames.ndim == 3 else frames).clamp(0, 1)


def _psnr_of_mse(mse: float) -> float:
    from dit_accel.eval.metrics import PSNR_CAP

    return PSNR_CAP if mse < 1e-10 else min(PSNR_CAP, 10.0 * math.log10(1.0 / mse))


class Search:
    """Runs candidates on the calibration prompts and keeps their evaluations (see the module docstring)."""

    def __init__(self, pipe: Any, runner: PromptRunner, prompts: Sequence[Prompt], dense: list[torch.Tensor],
                 model: CostModel, settings: TargetSettings, progress: Callable[[str], None] | None) -> None:
        self.pipe = pipe
        self.runner = runner
        self.prompts = prompts
        self.dense = dense
        self.model = model
        self.settings = settings
        self.progress = progress
        self.evaluated: dict[str, Evaluation] = {}
        self.started = time.perf_counter()

    # --- configurations -----------------------------------------------------------------------------
    def apply_arguments(self, c: Candidate) -> dict[str, Any]:
        """``dit_accel.apply`` keyword arguments of a candidate (names and option dicts)."""
        return settings_of(c, self.model, self.settings)

    def evaluate(self, c: Candidate, source: str) -> Evaluation:
        """Run ``c`` on every prompt (or return its earlier evaluation)."""
        if c.key in self.evaluated:
            return self.evaluated[c.key]
        s = self.settings
        if len(self.evaluated) >= s.max_evals:
            raise _Stop(f"max_evals={s.max_evals} reached")
        if s.time_budget_s is not None and time.perf_counter() - self.started > s.time_budget_s:
            raise _Stop(f"time_budget_s={s.time_budget_s:g} spent")
        if self.progress is not None:
            self.progress(c.key)
        outputs, seconds, summary = run_configuration(self.pipe, self.runner, self.prompts, self.apply_arguments(c))
        from dit_accel.eval.metrics import psnr

        mse = [float(((o - d) ** 2).mean()) for o, d in zip(outputs, self.dense)]
        values = [psnr(_video(o), _video(d)) for o, d in zip(outputs, self.dense)]
        e = Evaluation(c, sum(values) / len(values), values, mse, self.model.cost(c), seconds,
                       summary.get("mean_density"), summary.get("dense_head_share"),
                       summary.get("compute_fraction"), source)
        self.evaluated[c.key] = e
        return e

    def passes(self, e: Evaluation) -> bool:
        """Whether an evaluation meets the target."""
        return e.psnr >= self.settings.target_psnr

    def bisect(self, ladder: list[Candidate], source: str) -> Candidate | None:
        """The most aggressive candidate of ``ladder`` (ordered from the mildest) meeting the target, assuming
        that quality falls along it; ``None`` if even the mildest misses."""
        lo, hi, best = 0, len(ladder) - 1, None
        while lo <= hi:
            mid = (lo + hi) // 2
            if self.passes(self.evaluate(ladder[mid], source)):
                best, lo = ladder[mid], mid + 1
            else:
                hi = mid - 1
        return best

    def predicted_psnr(self, attention: Evaluation | None, cache: Evaluation | None) -> float:
        """Mean over prompts of the PSNR the two parts' errors added would give."""
        parts = [e for e in (attention, cache) if e is not None]
        per_prompt = [_psnr_of_mse(sum(e.mse_per_prompt[i] for e in parts)) for i in range(len(self.dense))]
        return sum(per_prompt) / len(per_prompt)

    def best(self) -> Evaluation | None:
        """The evaluated candidate of lowest modelled cost that met the target (ties: by key)."""
        ok = [e for e in self.evaluated.values() if self.passes(e)]
        return min(ok, key=lambda e: (e.modelled_cost, e.candidate.key)) if ok else None

    # --- the search ---------------------------------------------------------------------------------------
    def run(self) -> None:
        """Steps 3 of the module docstring (raises :class:`_Stop` when the budget is spent)."""
        s, model = self.settings, self.model
        groups = max(1, len(model.groups))
        self.bisect([Candidate(None, b) for b in s.budgets], "cache")
        # top_p values whose modelled attention cost is below dense: the others cannot make anything faster
        gaining = [p for p in s.top_ps if model.attention_cost((p,) * groups) < 1.0]
        best_attn = self.bisect([Candidate((p,) * groups, None) for p in gaining], "attention") if gaining else None
        if best_attn is not None and groups > 1:
            current = best_attn
            for g in range(groups):
                lower = [p for p in gaining if p < current.top_p[g]]
                if not lower:
                    continue
                trial = Candidate(tuple(lower[0] if i == g else p for i, p in enumerate(current.top_p)), None)
                if model.cost(trial) < model.cost(current) and self.passes(self.evaluate(trial, "layer_group")):
                    current = trial
        tried: set[str] = set()
        while True:
            best = self.best()
            bar = best.modelled_cost if best is not None else model.cost(Candidate(None, None))
            attention = [e for e in self.evaluated.values() if e.candidate.budget is None and e.candidate.top_p]
            caches = [e for e in self.evaluated.values() if e.candidate.top_p is None and e.candidate.budget]
            combos = []
            for a in attention:
                for c in caches:
                    cand = Candidate(a.candidate.top_p, c.candidate.budget)
                    cost = model.cost(cand)
                    if cand.key in self.evaluated or cand.key in tried or cost >= bar:
                        continue
                    if self.predicted_psnr(a, c) >= s.target_psnr:
                        combos.append((cost, cand.key, cand))
            if not combos:
                return
            _, key, cand = min(combos)
            tried.add(key)
            self.evaluate(cand, "combination")


def settings_of(c: Candidate, model: CostModel, settings: TargetSettings) -> dict[str, Any]:
    """The preset settings of a candidate: attention and cache names with their option dicts."""
    attention = attention_config = None
    if c.top_p is not None:
        per_layer = model.layer_top_p(c.top_p)
        attention = ATTENTION
        attention_config = dict(ATTENTION_TEMPLATE, top_p=max(c.top_p), layer_top_p=per_layer,
                                precision=settings.precision)
    cache = cache_config = None
    if c.budget is not None:
        cache = CACHE
        sched = model.schedules[c.budget]
        cache_config = {"schedule": sched["schedule"], "order": sched["order"], "selective_blocks": 0,
                        "warmup_steps": settings.warmup_steps, "final_steps": settings.final_steps,
                        "max_consecutive_reuse": settings.max_consecutive_reuse}
    return {"attention": attention, "attention_config": attention_config, "cache": cache,
            "cache_config": cache_config}


def run_configuration(pipe: Any, runner: PromptRunner, prompts: Sequence[Prompt],
                      config: dict[str, Any] | None) -> tuple[list[torch.Tensor], float, dict[str, Any]]:
    """Outputs of every prompt under ``config`` (``None``: the stock pipeline), the wall-clock seconds, and the
    run's attention and cache summary (mean density, dense-head share, compute fraction)."""
    from dit_accel import api
    from dit_accel.attention.registry import get_method
    from dit_accel.caching import make_cache_config

    handle = None
    if config is not None and (config["attention"] is not None or config["cache"] is not None):
        attention = None if config["attention"] is None else get_method(config["attention"], **config["attention_config"])
        cache = None if config["cache"] is None else make_cache_config(config["cache"], **config["cache_config"])
        handle = api.apply(pipe, attention=attention, cache=cache)
    try:
        _sync()
        start = time.perf_counter()
        with torch.inference_mode():
            outputs = runner.run_all(prompts)
        _sync()
        seconds = time.perf_counter() - start
        summary: dict[str, Any] = {}
        if handle is not None:
            attn = handle.stats_summary()
            summary["mean_density"] = attn["mean_density"]
            summary["dense_head_share"] = attn["dense_head_share"]
            caches = handle.cache_summary() or {}
            fractions = [v["compute_fraction"] for v in caches.values() if v.get("compute_fraction") is not None]
            summary["compute_fraction"] = sum(fractions) / len(fractions) if fractions else None
    finally:
        if handle is not None:
            handle.remove()
    return outputs, seconds, summary


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------- calibration
def _measure_model(pipe: Any, prompts: Sequence[Prompt], settings: TargetSettings, runner: PromptRunner,
                   precision: str) -> tuple[list[torch.Tensor], ModelFacts, ReuseCosts]:
    """Step 1: the dense runs with the reuse-error recorder and the density probe; the attention FLOP share."""
    from dit_accel import api
    from dit_accel.preset_file import transformers_of

    template = dict(ATTENTION_TEMPLATE, precision=precision)
    probe = DensityProbe(**template).setup(settings.top_ps)
    transformer = next(iter(transformers_of(pipe).values()))
    captured: dict[str, Any] = {}

    def capture(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        captured.setdefault("call", (args, dict(kwargs)))

    hook = transformer.register_forward_pre_hook(capture, with_kwargs=True)
    # the probe plans in the tile order itself; the forward token order would sit inside the recorder's hooks
    handle = api.apply(pipe, attention=probe, token_order="call")
    try:
        # the frames of every prompt (runner.output_type "pt"): the reuse errors are measured on the blocks
        costs, dense, num_blocks = measure(pipe, handle, prompts, settings.cache_settings(settings.budgets[0]), runner)
    finally:
        handle.remove()
        hook.remove()
    if probe.shape is None:
        raise ValueError("the model made no self-attention call the sparse method could plan (sequence shorter than "
                         f"min_seq_len={probe.min_seq_len}, or an unsupported head dim)")
    B, H, S, D = probe.shape
    layers = max(list(probe.valve_calls) + list(probe.sparse_calls)) + 1
    args, kwargs = captured["call"]
    # the FLOPs of the self-attention the method plans (4 B H S^2 D per call) in one forward of the transformer
    share = attention_flop_share(transformer, args, kwargs, 4.0 * B * H * S * S * D * layers)
    calls = {layer: probe.valve_calls.get(layer, 0) + probe.sparse_calls.get(layer, 0) for layer in range(layers)}
    facts = ModelFacts(
        layers=layers,
        sparse_layers=sorted(probe.sparse_calls),
        attention_share=share,
        valve_share={layer: probe.valve_calls.get(layer, 0) / max(1, calls[layer]) for layer in range(layers)},
        cost={key: sum(v) / len(v) for key, v in probe.costs.items()},
        density={key: sum(v) / len(v) for key, v in probe.densities.items()},
        refresh_period=int(probe.cfg.resolved("refresh_period")),
        num_blocks=num_blocks,
    )
    return dense, facts, costs


def _schedules(costs: ReuseCosts, settings: TargetSettings, num_blocks: int) -> dict[float, dict[str, Any]]:
    """Per budget, the schedule search's best schedule, its forecast order and compute fraction."""
    out = {}
    for b in settings.budgets:
        result = search(costs, settings.cache_settings(b), num_blocks)
        schedule, _, order = result.best
        out[b] = {"schedule": list(schedule), "order": order, "compute_fraction": sum(schedule) / len(schedule)}
    return out


def _device_of(pipe: Any) -> torch.device:
    from dit_accel.preset_file import transformers_of

    return next(next(iter(transformers_of(pipe).values())).parameters()).device


def _device_name(pipe: Any) -> str:
    device = _device_of(pipe)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


class _TermAsInterrupt:
    """While active (main thread only), SIGTERM raises ``KeyboardInterrupt`` so the search can write its result."""

    def __enter__(self) -> _TermAsInterrupt:
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            def handler(signum: int, frame: Any) -> None:
                raise KeyboardInterrupt("SIGTERM")

            self.previous = signal.signal(signal.SIGTERM, handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def calibrate(
    pipe: Any,
    prompts: Sequence[Prompt],
    *,
    target_psnr: float,
    out: str | Path | None = None,
    model_id: str = "unknown",
    name: str | None = None,
    call_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
    **settings: Any,
) -> dict[str, Any]:
    """Search the fastest configuration of ``pipe`` that keeps ``target_psnr`` on ``prompts`` (see the module
    docstring) and return the preset file's content, written to ``out`` unless ``None``.

    ``prompts``: text prompts, or dicts of pipeline keyword arguments (run one at a time). ``call_kwargs``: extra
    pipeline arguments (size, frames, guidance). ``model_id`` and ``name`` are recorded in the file. ``settings``:
    the other fields of :class:`TargetSettings` (``num_steps``, ``seed``, ``budgets``, ``top_ps``, ``layer_groups``,
    ``max_evals``, ``time_budget_s``, ``batch_size``, ``precision``, ...). ``ValueError`` for a bad target or setting.
    dit-accel must not be applied to ``pipe`` (it is applied and removed per candidate).
    """
    from dit_accel import api
    from dit_accel.eval.harness import environment
    from dit_accel.preset_file import (
        PRESET_FILE_FORMAT,
        PRESET_FILE_VERSION,
        model_config_hash,
        save_preset_file,
        transformers_of,
    )

    s = TargetSettings(target_psnr=target_psnr, **settings)
    if not prompts:
        raise ValueError("calibrate needs at least one prompt")
    if api.get_handle(pipe) is not None:
        raise ValueError("dit-accel is applied to this pipeline: dit_accel.remove(pipe) before calibrating")
    started = time.perf_counter()
    kwargs = dict(call_kwargs or {})
    runner = PromptRunner(pipe, s.num_steps, s.seed, kwargs, batch_size=s.batch_size, output_type="pt")
    bar = _progress_bar(s.max_evals + 1) if progress else None
    say = (lambda text: (bar.set_postfix_str(text), bar.update(1))) if bar is not None else None
    interrupted: str | None = None
    search_obj: Search | None = None
    with _TermAsInterrupt():
        try:
            if say is not None:
                say("dense + measure")
            precision = s.precision
            dense, facts, costs = _measure_model(pipe, prompts, s, runner, precision)
            model = CostModel(facts, s, _schedules(costs, s, facts.num_blocks))
            search_obj = Search(pipe, runner, prompts, dense, model, s, say)
            search_obj.run()
        except _Stop as stop:
            interrupted = str(stop)
        except KeyboardInterrupt as stop:
            interrupted = f"interrupted ({stop or 'KeyboardInterrupt'})"
            if search_obj is None:
                raise
        finally:
            if bar is not None:
                bar.close()
    best = search_obj.best()
    chosen = best.candidate if best is not None else Candidate(None, None)
    config = settings_of(chosen, search_obj.model, s)
    timing: dict[str, Any] = {"search_s": None, "evaluations_s": {k: e.seconds for k, e in search_obj.evaluated.items()}}
    if s.timing_prompts and not (interrupted or "").startswith("interrupted"):
        timing.update(_time(pipe, runner, list(prompts[: s.timing_prompts]), config))
    timing["search_s"] = time.perf_counter() - started
    data = {
        "format": PRESET_FILE_FORMAT,
        "version": PRESET_FILE_VERSION,
        "name": name or f"{model_id}-{s.target_psnr:g}db",
        "model": {"id": model_id, "pipeline": type(pipe).__name__,
                  "transformers": {n: type(t).__name__ for n, t in transformers_of(pipe).items()},
                  "config_hash": model_config_hash(pipe)},
        "device": _device_name(pipe),
        "versions": environment(_device_of(pipe))["versions"],
        "target_psnr": s.target_psnr,
        "calibration": {
            "prompts": [p if isinstance(p, str) else "<kwargs>" for p in prompts],
            "num_steps": s.num_steps, "call": {k: v for k, v in kwargs.items() if isinstance(v, (int, float, str))},
            "seed": s.seed,
            "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(s).items()},
        },
        "measured": _measured(best, search_obj, s),
        "settings": config,
        "search": {
            "interrupted": interrupted,
            "attention_flop_share": search_obj.model.facts.attention_share,
            "sparse_layers": search_obj.model.facts.sparse_layers,
            "layer_groups": search_obj.model.groups,
            "modelled_attention_cost": {f"{p:g}": search_obj.model.attention_cost((p,) * max(1, len(search_obj.model.groups)))
                                        for p in s.top_ps},
            "planned_density": {f"{layer}@{p:g}": d for (layer, p), d in sorted(search_obj.model.facts.density.items())},
            "schedules": {f"{b:g}": v for b, v in search_obj.model.schedules.items()},
            "evaluated": [_evaluation_record(e) for e in search_obj.evaluated.values()],
            "modelled_cost_formula": "compute_fraction * ((1 - attention_flop_share) + attention_flop_share * "
                                     "modelled_attention_cost), relative to the dense transformer",
        },
        "timing": timing,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if out is not None:
        save_preset_file(data, out)
    return data


def _measured(best: Evaluation | None, search_obj: Search, s: TargetSettings) -> dict[str, Any]:
    if best is None:
        return {"psnr": None, "psnr_per_prompt": None, "modelled_cost": 1.0, "met_target": False,
                "note": f"no evaluated configuration reached {s.target_psnr:g} dB: the preset runs dense"}
    return {"psnr": best.psnr, "psnr_per_prompt": best.psnr_per_prompt, "modelled_cost": best.modelled_cost,
            "modelled_speedup": 1.0 / best.modelled_cost, "mean_density": best.mean_density,
            "dense_head_share": best.dense_head_share, "compute_fraction": best.compute_fraction, "met_target": True,
            "candidate": best.candidate.key}


def _evaluation_record(e: Evaluation) -> dict[str, Any]:
    return {"candidate": e.candidate.key, "source": e.source, "psnr": e.psnr, "psnr_per_prompt": e.psnr_per_prompt,
            "modelled_cost": e.modelled_cost, "mean_density": e.mean_density,
            "dense_head_share": e.dense_head_share, "compute_fraction": e.compute_fraction}


def _time(pipe: Any, runner: PromptRunner, prompts: list[Prompt], config: dict[str, Any]) -> dict[str, Any]:
    """Wall-clock of one batch of ``prompts``, dense (the stock pipeline) and under ``config``, each after a
    warm-up batch on CUDA (Triton compiles and autotunes on first use): the measured speed-up of the chosen
    configuration on this device."""
    timed = dataclasses.replace(runner, batch_size=max(1, len(prompts)))
    out: dict[str, Any] = {"timed_prompts": len(prompts)}
    for label, cfg in (("dense_s", None), ("preset_s", config)):
        if _device_of(pipe).type == "cuda":
            run_configuration(pipe, timed, prompts, cfg)
        out[label] = run_configuration(pipe, timed, prompts, cfg)[1]
    out["speedup"] = out["dense_s"] / out["preset_s"] if out["preset_s"] > 0 else None
    return out


def _progress_bar(total: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="calibrate", unit="run")
