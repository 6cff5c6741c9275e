"""Feature caching at equal compute: our schedulers vs diffusers' and cache-dit's, PSNR/SSIM vs dense.

On the testbed (``load_testbed_pipeline``), for each target compute fraction (share of transformer
block evaluations, default 50 % and 35 %), every method is tuned to that fraction and run on the
same prompts and seeds; its videos are compared with the dense videos of the same seeds.

Methods:
    ours:      fixed (uniform schedule), taylor (same schedule, order-1 forecast of the span residual),
               taylor_out (same, forecasting the output projection), probe (threshold tuned),
               procache (DP schedule from ``calibrate`` + selective deep block), procache_dp (DP schedule
               only), procache_out (DP schedule searched for and applied to the output projection),
               procache_tok (DP schedule + selective steps that recompute 25 % of the tokens)
    diffusers: FirstBlockCacheConfig (threshold tuned), TaylorSeerCacheConfig (lite mode, interval tuned),
               MagCacheConfig (ratios calibrated on one prompt, threshold tuned)
    cache-dit: DBCache F1B0 (threshold tuned), and with its TaylorSeer calibrator (order 1; cache-dit's
               recommended recipe), when ``cache_dit`` is importable (benchmark-only dependency)

The compute fraction of every run is *measured* by counting block executions (a pre-hook on each
block's feed-forward, which runs only inside the block's own forward; a block run on a subset of the
tokens counts as that share of an evaluation, which over-counts its attention cost). Threshold-like parameters
are tuned by bisection on separate tuning prompts. Calibration and tuning prompts are disjoint from
the evaluation prompts.

    python benchmarks/caching_compare.py                      # GPU, testbed weights, 16 prompts
    python benchmarks/caching_compare.py --tiny --out /tmp/x.json   # CPU smoke run, random tiny testbed
    # the full comparison takes longer than one 10-minute GPU call: split it by methods, e.g.
    python benchmarks/caching_compare.py --methods fixed taylor taylor_out probe
    python benchmarks/caching_compare.py --append --methods procache procache_dp procache_out
    python benchmarks/caching_compare.py --append --methods diffusers_fbc diffusers_taylorseer diffusers_magcache cachedit_dbcache

Writes a JSON (device, versions, date, per-method results) and an SVG plot of PSNR vs compute.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import dit_accel.api as api  # noqa: E402
from dit_accel.caching import install_cache  # noqa: E402
from dit_accel.calibration.cli import captions_for_testbed  # noqa: E402
from dit_accel.calibration.schedule_search import calibrate  # noqa: E402

OURS = ("fixed", "taylor", "taylor_out", "probe", "procache", "procache_dp", "procache_out", "procache_tok")
DIFFUSERS = ("diffusers_fbc", "diffusers_taylorseer", "diffusers_magcache")
CACHE_DIT = ("cachedit_dbcache", "cachedit_dbcache_ts")
ALL_METHODS = OURS + DIFFUSERS + CACHE_DIT
IMPORT_ERRORS: dict[str, str] = {}
"""Why an optional peer could not be imported (recorded in the JSON)."""


# --- pipeline -------------------------------------------------------------------------------------------
def tiny_testbed_pipeline(seed: int = 0):
    """A random-weight testbed pipeline at CPU-test size (4 blocks, 16x16 px works)."""
    from dit_accel.testbed.captions import VOCAB
    from dit_accel.testbed.model import transformer_config
    from dit_accel.testbed.pipeline import build_pipeline

    torch.manual_seed(seed)
    pipe = build_pipeline(
        VOCAB,
        transformer_config=transformer_config(in_channels=4, text_dim=32, num_layers=4, num_heads=2, head_dim=16, ffn_mult=2),
        autoencoder_config=dict(z_dim=4, block_channels=(8, 16), norm_groups=4),
        text_encoder_config=dict(width=32, num_layers=1, num_heads=2, ffn_dim=64),
    )
    # The testbed init zeroes the output projection and the timestep modulation (the untrained model
    # predicts 0); give both random values so that the smoke run's videos, and caching errors, are not trivial.
    with torch.no_grad():
        for module in (pipe.transformer.condition_embedder.time_proj, pipe.transformer.proj_out):
            for p in module.parameters():
                p.normal_(0.0, 0.3)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass
class RunSettings:
    """Generation settings shared by every method."""

    steps: int
    height: int
    width: int
    frames: int
    guidance: float
    device: str


class BlockCounter:
    """Counts executed blocks (feed-forward pre-hooks, weighted by the share of the call's tokens they
    saw) and transformer calls of every transformer."""

    def __init__(self, pipe: Any) -> None:
        self.blocks = 0.0
        self.calls = 0
        self.num_blocks = 0
        self.tokens = 0
        self._hooks = []
        for name in ("transformer", "transformer_2"):
            tr = getattr(pipe, name, None)
            if tr is None:
                continue
            self.num_blocks = len(tr.blocks)
            patch = tuple(tr.config.patch_size)
            self._hooks.append(tr.register_forward_pre_hook(lambda m, a, kw, p=patch: self._on_call(a, kw, p), with_kwargs=True))
            for block in tr.blocks:
                self._hooks.append(block.ffn.register_forward_pre_hook(self._on_block))

    def _on_call(self, args: tuple, kwargs: dict, patch: tuple[int, ...]) -> None:
        self.calls += 1
        x = kwargs.get("hidden_states", args[0] if args else None)
        self.tokens = 0
        if isinstance(x, torch.Tensor) and x.dim() == 5:
            self.tokens = (x.shape[2] // patch[0]) * (x.shape[3] // patch[1]) * (x.shape[4] // patch[2])

    def _on_block(self, _module: Any, args: tuple) -> None:
        n = args[0].shape[1] if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 3 else 0
        self.blocks += min(1.0, n / self.tokens) if self.tokens and n else 1.0

    def reset(self) -> None:
        self.blocks, self.calls = 0.0, 0

    @property
    def fraction(self) -> float:
        return self.blocks / max(1, self.calls * self.num_blocks)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def generate(pipe: Any, prompt: str, seed: int, s: RunSettings) -> tuple[torch.Tensor, float]:
    """Decoded video ``(T, 3, H, W)`` in [0, 1] on the CPU, and the wall time in seconds."""
    if s.device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = pipe(prompt, num_frames=s.frames, height=s.height, width=s.width, num_inference_steps=s.steps,
               guidance_scale=s.guidance, output_type="pt", generator=torch.Generator().manual_seed(seed)).frames
    if s.device == "cuda":
        torch.cuda.synchronize()
    return out[0].float().cpu(), time.perf_counter() - start


# --- metrics -------------------------------------------------------------------------------------------
def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two videos in [0, 1] (over all frames; capped at 100 dB for identical videos)."""
    mse = float(((a - b) ** 2).mean())
    return 100.0 if mse <= 1e-10 else 10.0 * math.log10(1.0 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM over frames (torchmetrics, Gaussian window 11 or smaller for tiny frames)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    k = min(11, a.shape[-1], a.shape[-2])
    k = k if k % 2 else k - 1
    return float(structural_similarity_index_measure(a, b, data_range=1.0, kernel_size=k))


# --- methods ---------------------------------------------------------------------------------------------
@dataclass
class Method:
    """How to switch one caching method on for a parameter value and off again."""

    name: str
    family: str
    enable: Callable[[Any, Any], Any]
    """``enable(pipe, param) -> token``; token is passed to disable."""
    disable: Callable[[Any, Any], None]
    search: str
    """``"schedule"`` (param built from the fraction), ``"bisect"`` (float, larger = less compute) or
    ``"interval"`` (int, larger = less compute)."""
    summary: Callable[[Any], Any] | None = None
    """``summary(token)``: the method's own cache statistics (ours: compute fraction, cached bytes)."""


def uniform_schedule(steps: int, fraction: float, warmup: int, final: int) -> list[int]:
    """``round(fraction * steps)`` computed steps: the warm-up and final steps, the others evenly spaced
    between the last warm-up step and the first final step (or the end), so the reuse gaps are equal."""
    k = max(1, round(fraction * steps))
    forced = set(range(warmup)) | set(range(steps - final, steps)) | {0}
    r = max(0, k - len(forced))
    start = max(warmup, 1) - 1
    end = steps - final if final else steps
    chosen = {start + int((j + 1) * (end - start) / (r + 1) + 0.5) for j in range(r)}
    return [1 if (i in forced or i in chosen) else 0 for i in range(steps)]


def _ours(name: str, guard: dict[str, int], extra: Callable[[Any], dict[str, Any]]) -> Method:
    def enable(pipe, param):
        handle = api.apply(pipe)
        atts = [install_cache(getattr(pipe, n), ctx, name, **guard, **extra(param)) for n, ctx in handle.contexts.items()]
        return handle, atts

    def disable(pipe, token):
        handle, atts = token
        for a in atts:
            a.remove()
        handle.remove()

    def summary(token):
        _, atts = token
        out = {}
        for a in atts:
            sm = a.summary()
            out[a.controller.transformer_name] = {k: sm.get(k) for k in ("compute_fraction", "peak_cached_bytes",
                                                                        "peak_branch_bytes", "stream_bytes")}
        return out

    return Method(name, "ours", enable, disable, "schedule", summary)


def build_methods(s: RunSettings, guard: dict[str, int]) -> dict[str, Method]:
    """Every available method by name (cache-dit only when importable)."""
    big_cap = dict(guard, max_consecutive_reuse=s.steps)
    methods: dict[str, Method] = {
        "fixed": _ours("fixed", big_cap, lambda p: dict(schedule=p)),
        "taylor": _ours("taylor", big_cap, lambda p: dict(schedule=p, order=1)),
        "procache": _ours("procache", guard, lambda p: dict(schedule_file=p, selective_blocks=1)),
        "procache_dp": _ours("procache", guard, lambda p: dict(schedule_file=p, selective_blocks=1)),
        "taylor_out": _ours("taylor", big_cap, lambda p: dict(schedule=p, order=1, target="output")),
        "procache_out": _ours("procache", guard, lambda p: dict(schedule_file=p, selective_blocks=0, target="output")),
        "procache_tok": _ours("procache", guard, lambda p: dict(schedule_file=p, selective_blocks=0)),
    }
    methods["procache_tok"].name = "procache_tok"
    # Threshold-driven methods get no cap on consecutive reuse: their threshold alone is tuned to the
    # target fraction (with a cap, a 1-block probe on a 6-block model cannot go below ~40 % compute).
    probe = _ours("probe", big_cap, lambda p: dict(threshold=p, head_blocks=1))
    probe.search = "bisect"
    methods["probe"] = probe
    methods["procache_dp"].name = "procache_dp"

    def diffusers_method(name: str, make_config: Callable[[Any], Any], search: str) -> Method:
        def enable(pipe, param):
            pipe.transformer.enable_cache(make_config(param))
            return None

        def disable(pipe, token):
            pipe.transformer.disable_cache()

        return Method(name, "diffusers", enable, disable, search)

    from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    methods["diffusers_fbc"] = diffusers_method("diffusers_fbc", lambda t: FirstBlockCacheConfig(threshold=t), "bisect")
    methods["diffusers_taylorseer"] = diffusers_method(
        "diffusers_taylorseer",
        lambda n: TaylorSeerCacheConfig(cache_interval=n, disable_cache_before_step=guard["warmup_steps"], max_order=1,
                                        use_lite_mode=True, taylor_factors_dtype=None),
        "interval",
    )
    ratios_box: dict[str, list[float]] = {}

    def mag_config(threshold):
        return MagCacheConfig(threshold=threshold, max_skip_steps=s.steps,
                              retention_ratio=guard["warmup_steps"] / s.steps, num_inference_steps=s.steps,
                              mag_ratios=ratios_box["ratios"])

    mag = diffusers_method("diffusers_magcache", mag_config, "bisect")
    base_enable = mag.enable

    def mag_enable(pipe, param):
        if "ratios" not in ratios_box:
            ratios_box["ratios"] = calibrate_mag_ratios(pipe, s)
        return base_enable(pipe, param)

    mag.enable = mag_enable
    methods["diffusers_magcache"] = mag

    try:
        import cache_dit
    except Exception as exc:  # not installed, or its imports fail here: leave it out, say why
        cache_dit = None
        IMPORT_ERRORS["cache_dit"] = f"{type(exc).__name__}: {exc}"
    if cache_dit is not None:
        def cd_enable(pipe, threshold, calibrator=None):
            adapter = cache_dit.BlockAdapter(
                pipe=pipe, transformer=pipe.transformer, blocks=pipe.transformer.blocks,
                forward_pattern=cache_dit.ForwardPattern.Pattern_2, has_separate_cfg=True, check_forward_pattern=True,
            )
            config = cache_dit.DBCacheConfig(
                Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=threshold,
                max_warmup_steps=guard["warmup_steps"], max_continuous_cached_steps=-1,
                num_inference_steps=s.steps,
            )
            with contextlib.redirect_stdout(io.StringIO()):
                cache_dit.enable_cache(adapter, cache_config=config, calibrator_config=calibrator)
            return None

        def cd_disable(pipe, token):
            with contextlib.redirect_stdout(io.StringIO()):
                cache_dit.disable_cache(pipe)

        methods["cachedit_dbcache"] = Method("cachedit_dbcache", "cache-dit", cd_enable, cd_disable, "bisect")
        methods["cachedit_dbcache_ts"] = Method(
            "cachedit_dbcache_ts", "cache-dit",
            lambda pipe, t: cd_enable(pipe, t, cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1)), cd_disable, "bisect")
    return methods


def calibrate_mag_ratios(pipe: Any, s: RunSettings) -> list[float]:
    """diffusers' MagCache calibration (``calibrate=True``) on one tuning prompt; parses the printed ratios."""
    from diffusers import MagCacheConfig

    pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=s.steps))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        generate(pipe, captions_for_testbed(1, offset=500)[0], 12345, s)
    pipe.transformer.disable_cache()
    lists = re.findall(r"\[([-+0-9.eE, ]+)\]", buf.getvalue())
    if not lists:
        raise RuntimeError("MagCache calibration printed no ratios")
    return [float(v) for v in lists[0].split(",")]


# --- tuning ---------------------------------------------------------------------------------------------
_FRACTIONS: dict[tuple[str, Any], float] = {}


def measure_fraction(pipe, method: Method, param: Any, prompts: list[str], s: RunSettings, counter: BlockCounter) -> float:
    """Measured compute fraction of ``method`` at ``param`` on the tuning prompts (memoised)."""
    key = (method.name, param)
    if key in _FRACTIONS:
        return _FRACTIONS[key]
    _FRACTIONS[key] = _measure_fraction(pipe, method, param, prompts, s, counter)
    return _FRACTIONS[key]


def _measure_fraction(pipe, method: Method, param: Any, prompts: list[str], s: RunSettings, counter: BlockCounter) -> float:
    token = method.enable(pipe, param)
    counter.reset()
    try:
        for i, p in enumerate(prompts):
            generate(pipe, p, 777 + i, s)
    finally:
        method.disable(pipe, token)
    return counter.fraction


def tune(pipe, method: Method, target: float, prompts: list[str], s: RunSettings, counter: BlockCounter,
         iterations: int) -> tuple[Any, float]:
    """Parameter whose measured fraction is closest to ``target`` (bisection on log threshold / interval scan)."""
    if method.search == "interval":
        best = None
        for n in range(2, 9):
            f = measure_fraction(pipe, method, n, prompts, s, counter)
            if best is None or abs(f - target) < abs(best[1] - target):
                best = (n, f)
        return best
    lo, hi = math.log(1e-4), math.log(4.0)
    best = None
    for _ in range(iterations):
        mid = (lo + hi) / 2
        f = measure_fraction(pipe, method, math.exp(mid), prompts, s, counter)
        if best is None or abs(f - target) < abs(best[1] - target):
            best = (math.exp(mid), f)
        if f > target:
            lo = mid  # too much compute: raise the threshold
        else:
            hi = mid
    return best


# --- SVG plot --------------------------------------------------------------------------------------------
def write_svg(results: list[dict[str, Any]], path: Path) -> None:
    """PSNR vs measured compute fraction, one colour per method (dependency-free SVG)."""
    w, h, m = 640, 420, 60
    pts = [r for r in results if r.get("psnr_mean") is not None]
    if not pts:
        return
    xs = [r["measured_fraction"] for r in pts]
    ys = [min(r["psnr_mean"], 60.0) for r in pts]
    x0, x1 = min(xs + [0.2]) - 0.02, max(xs + [0.7]) + 0.02
    y0, y1 = min(ys) - 1, max(ys) + 1
    names = sorted({r["method"] for r in pts})
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]

    def sx(x):
        return m + (x - x0) / (x1 - x0) * (w - 2 * m)

    def sy(y):
        return h - m - (y - y0) / (y1 - y0) * (h - 2 * m)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w + 180}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<rect width="{w + 180}" height="{h}" fill="white"/>',
           f'<line x1="{m}" y1="{h - m}" x2="{w - m}" y2="{h - m}" stroke="black"/>',
           f'<line x1="{m}" y1="{m}" x2="{m}" y2="{h - m}" stroke="black"/>',
           f'<text x="{w / 2}" y="{h - 20}" text-anchor="middle">compute fraction (block evaluations)</text>',
           f'<text x="15" y="{h / 2}" transform="rotate(-90 15 {h / 2})" text-anchor="middle">PSNR vs dense (dB)</text>']
    for i in range(6):
        xv = x0 + i * (x1 - x0) / 5
        yv = y0 + i * (y1 - y0) / 5
        out.append(f'<text x="{sx(xv):.1f}" y="{h - m + 15}" text-anchor="middle">{xv:.2f}</text>')
        out.append(f'<text x="{m - 5}" y="{sy(yv):.1f}" text-anchor="end">{yv:.1f}</text>')
    for k, name in enumerate(names):
        c = colours[k % len(colours)]
        series = sorted((r for r in pts if r["method"] == name), key=lambda r: r["measured_fraction"])
        coords = " ".join(f"{sx(r['measured_fraction']):.1f},{sy(min(r['psnr_mean'], 60.0)):.1f}" for r in series)
        out.append(f'<polyline points="{coords}" fill="none" stroke="{c}"/>')
        for r in series:
            out.append(f'<circle cx="{sx(r["measured_fraction"]):.1f}" cy="{sy(min(r["psnr_mean"], 60.0)):.1f}" r="4" fill="{c}"/>')
        out.append(f'<rect x="{w - 10}" y="{m + 18 * k - 9}" width="10" height="10" fill="{c}"/>')
        out.append(f'<text x="{w + 5}" y="{m + 18 * k}">{name}</text>')
    out.append("</svg>")
    path.write_text("\n".join(out))


# --- main -------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="random tiny testbed on CPU (smoke run)")
    p.add_argument("--num-prompts", type=int, default=None, help="evaluation prompts (default 16; tiny 2)")
    p.add_argument("--calib-prompts", type=int, default=None, help="calibration/tuning prompts (default 4; tiny 1)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 20; tiny 8)")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.35])
    p.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--warmup-steps", type=int, default=None, help="default 2; tiny 1")
    p.add_argument("--max-consecutive-reuse", type=int, default=3)
    p.add_argument("--final-steps", type=int, default=0,
                   help="last steps always computed by our schedulers (default 0, as the peers: none forces them)")
    p.add_argument("--tune-iterations", type=int, default=None, help="bisection steps (default 8; tiny 3)")
    p.add_argument("--refine", type=int, default=None, help="procache candidates evaluated by real runs (default 16; tiny 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/caching_compare[_tiny].json)")
    p.add_argument("--schedule-dir", type=Path, default=None,
                   help="where calibrated schedule files go (default: next to --out); rows embed the schedules")
    p.add_argument("--append", action="store_true",
                   help="merge into an existing --out: rows of the same (method, fraction) are replaced, others kept "
                        "(to split the full comparison over several GPU calls)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    tiny = args.tiny
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = {"auto": torch.bfloat16 if device == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    steps = args.steps or (8 if tiny else 20)
    s = RunSettings(steps=steps, height=args.height or (16 if tiny else 256), width=args.width or (16 if tiny else 256),
                    frames=args.frames or (4 if tiny else 16), guidance=args.guidance, device=device)
    n_eval = args.num_prompts or (2 if tiny else 16)
    n_calib = args.calib_prompts or (1 if tiny else 4)
    iterations = args.tune_iterations or (3 if tiny else 8)
    refine = args.refine if args.refine is not None else (2 if tiny else 16)
    warmup = args.warmup_steps if args.warmup_steps is not None else (1 if tiny else 2)
    guard = dict(warmup_steps=warmup, final_steps=args.final_steps, max_consecutive_reuse=args.max_consecutive_reuse)
    out_path = args.out or ROOT / "benchmarks" / "results" / ("caching_compare_tiny.json" if tiny else "caching_compare.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)

    if tiny:
        pipe = tiny_testbed_pipeline(args.seed).to(device, dtype)
    else:
        from dit_accel.testbed import load_testbed_pipeline

        pipe = load_testbed_pipeline(device=device, dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
    eval_prompts = captions_for_testbed(n_eval, offset=100)
    calib_prompts = captions_for_testbed(n_calib, offset=0)
    counter = BlockCounter(pipe)

    cuda = device == "cuda"
    start_alloc = _reset_peak() if cuda else 0
    dense, dense_times = [], []
    for i, p in enumerate(eval_prompts):
        video, t = generate(pipe, p, args.seed + i, s)
        dense.append(video)
        dense_times.append(t)
    dense_latency = statistics.median(dense_times[1:] if len(dense_times) > 2 else dense_times)
    dense_peak = torch.cuda.max_memory_allocated() - start_alloc if cuda else None

    schedule_dir = args.schedule_dir or out_path.parent / (out_path.stem + "_schedules")
    calib_cache: dict[tuple[float, float, str, float], str] = {}

    def calib(fraction: float, share: float, target: str = "span", tokens: float = 0.0) -> str:
        key = (fraction, share, target, tokens)
        if key not in calib_cache:
            schedule_dir.mkdir(parents=True, exist_ok=True)
            path = schedule_dir / f"procache_f{fraction:.2f}_s{share:.2f}_{target}{'_t%.2f' % tokens if tokens else ''}.json"
            # The same number of computed steps as the uniform schedules (round, not floor).
            budget = max(1, round(fraction * steps)) / steps
            calibrate(pipe, calib_prompts, num_steps=steps, budget=budget, out=path, model_id="testbed-tiny" if tiny else "testbed",
                      selective_blocks=0 if tokens else 1, selective_share=share, selective_tokens=tokens, target=target,
                      refine=refine, call_kwargs=dict(num_frames=s.frames, height=s.height, width=s.width, guidance_scale=s.guidance),
                      **guard)
            calib_cache[key] = str(path)
        return calib_cache[key]

    methods = build_methods(s, guard)
    previous: dict[str, Any] | None = None
    if args.append and out_path.exists():
        previous = json.loads(out_path.read_text())
        if previous.get("settings", {}).get("steps") != steps or previous.get("settings", {}).get("tiny") != tiny:
            raise ValueError(f"{out_path} was written with other settings; cannot --append")
    results: list[dict[str, Any]] = []
    jobs = [(f, n) for n in args.methods for f in args.fractions]  # method-major: a time limit cuts whole methods
    if "fixed" in args.methods:
        # Our hooks computing every step: must equal dense; its latency is the hooks' overhead.
        jobs.insert(0, (1.0, "fixed"))

    import diffusers

    def write() -> dict[str, Any]:
        rows = list(results)
        if previous is not None:
            done = {(r["method"], r["target_fraction"]) for r in rows}
            rows = [r for r in previous["results"] if (r["method"], r["target_fraction"]) not in done] + rows
        report = {
            "benchmark": "caching_compare",
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
                         "triton": _version("triton"), "cache_dit": _version("cache_dit")},
            "settings": {"tiny": tiny, "steps": steps, "height": s.height, "width": s.width, "frames": s.frames,
                         "guidance": s.guidance, "dtype": str(dtype), "eval_prompts": eval_prompts,
                         "calib_prompts": calib_prompts, "guardrails": guard, "seed": args.seed,
                         "tune_iterations": iterations, "refine": refine},
            "dense_latency_s_median": dense_latency,
            "dense_peak_memory_bytes": dense_peak,
            "import_errors": dict(IMPORT_ERRORS),
            "results": rows,
            "note": "compute fraction = executed blocks / (transformer calls x blocks), measured per run (a block run on "
                    "a token subset counts as that share); PSNR/SSIM vs the dense video of the same seed; latency ratio "
                    "measured in the same process; peak memory = torch.cuda.max_memory_allocated over the method's "
                    "evaluation runs minus the memory allocated when they started (after gc; the method's hooks "
                    "installed), i.e. activations + caches; dense_peak_memory_bytes: the same for the dense runs",
        }
        out_path.write_text(json.dumps(report, indent=1))
        return report

    for fraction, name in jobs:
        if name not in methods:
            results.append({"method": name, "target_fraction": fraction, "skipped": "not importable",
                            "error": IMPORT_ERRORS.get(name.split("_")[0].replace("cachedit", "cache_dit"))})
            write()
            continue
        method = methods[name]
        row: dict[str, Any] = {"method": name, "family": method.family, "target_fraction": fraction}
        try:
            if name in ("fixed", "taylor", "taylor_out"):
                param, tuned = uniform_schedule(steps, fraction, warmup, args.final_steps), None
            elif name == "procache_out":
                param, tuned = calib(fraction, 0.0, "output"), None
            elif name == "procache":
                param, tuned = calib(fraction, 0.25), None
            elif name == "procache_tok":
                param, tuned = calib(fraction, 0.25, tokens=0.25), None
            elif name == "procache_dp":
                param, tuned = calib(fraction, 0.0), None
            else:
                param, tuned = tune(pipe, method, fraction, calib_prompts, s, counter, iterations)
            token = method.enable(pipe, param)
            counter.reset()
            psnrs, ssims, times = [], [], []
            start_alloc = _reset_peak() if cuda else 0
            try:
                for i, p in enumerate(eval_prompts):
                    video, t = generate(pipe, p, args.seed + i, s)
                    psnrs.append(psnr(video, dense[i]))
                    ssims.append(ssim(video, dense[i]))
                    times.append(t)
                own = method.summary(token) if method.summary is not None else None
            finally:
                method.disable(pipe, token)
        except Exception as exc:  # a peer that cannot run on this model: record the error text
            row["error"] = f"{type(exc).__name__}: {exc}"
            with contextlib.suppress(Exception):  # leave the pipeline clean for the next method
                method.disable(pipe, None)
            results.append(row)
            print(f"[{fraction:.2f}] {name:22s} ERROR {row['error']}", flush=True)
            write()
            continue
        latency = statistics.median(times[1:] if len(times) > 2 else times)
        peak = torch.cuda.max_memory_allocated() - start_alloc if cuda else None
        schedule = None
        if isinstance(param, str):
            schedule = json.loads(Path(param).read_text())["schedule"]
        row.update({
            "measured_fraction": counter.fraction, "tuning_fraction": tuned,
            "param": param if not isinstance(param, str) else Path(param).name, "schedule": schedule,
            "psnr_mean": statistics.fmean(psnrs), "psnr_std": statistics.pstdev(psnrs),
            "ssim_mean": statistics.fmean(ssims), "latency_s_median": latency,
            "speedup_vs_dense": dense_latency / latency if latency > 0 else None,
            "peak_memory_bytes": peak, "peak_memory_over_dense_bytes": (peak - dense_peak) if peak is not None else None,
            "own_cache_stats": own,
            "psnr_per_prompt": psnrs,
            "off_target": abs(counter.fraction - fraction) > 0.03,
        })
        results.append(row)
        print(f"[{fraction:.2f}] {name:22s} fraction {row['measured_fraction']:.3f}  PSNR {row['psnr_mean']:6.2f}  "
              f"SSIM {row['ssim_mean']:.4f}  speedup {row['speedup_vs_dense']:.2f}x"
              + (f"  peak +{row['peak_memory_over_dense_bytes'] / 2**20:.0f} MiB" if peak is not None else ""), flush=True)
        write()
    counter.remove()
    report = write()
    write_svg(report["results"], out_path.with_suffix(".svg"))
    print(f"wrote {out_path} and {out_path.with_suffix('.svg')}")
    return report


def _reset_peak() -> int:
    """Collect garbage, reset CUDA's peak counter; returns the bytes allocated now."""
    import gc

    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:
        return None


if __name__ == "__main__":
    main()
