"""``dit-accel bench``: its options (:func:`add_arguments`), the dry-run estimate, and :func:`run`, which
``dit_accel/cli.py`` calls. Nothing heavy is imported at module level here."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

DEFAULT_OUT = Path("benchmarks/results/bench.json")
"""Where the GPU run writes (the tiny CPU run writes ``bench_tiny.json`` beside it)."""
DEFAULT_TESTBED_OUT = Path("benchmarks/results/presets_testbed.json")
"""Where ``--testbed-quality`` writes."""


def _positive_int(text: str) -> int:
    from dit_accel.argtypes import positive_int

    return positive_int(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value}")
    return value


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


HELP = "time every model family at real size: stock, presets, their parts and the peers (bench.json + PNG)"
"""One line for ``dit-accel --help``."""

DESCRIPTION = ("Random-weight pipelines at their published configs (reduced depth), timed on the device: "
               "stock, stock with cuDNN, each preset, its attention-only and cache-only parts, diffusers' "
               "FirstBlockCache/MagCache/TaylorSeer, cache-dit DBCache, FlexAttention with our masks, "
               "SageAttention. --testbed-quality measures the presets' quality and speed on the testbed instead.")
"""The subcommand's ``--help`` description."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the options of ``dit-accel bench`` to ``p``."""
    p.add_argument("--tiny", action="store_true", help="tiny configs of every family (a CPU run in well under a minute)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="default: cuda if available")
    p.add_argument("--models", type=_names, default=[], metavar="A,B",
                   help="model keys, comma-separated (default: all eight; --dry-run lists them)")
    p.add_argument("--runs", type=_names, default=[], metavar="PATTERNS",
                   help="configuration keys or fnmatch patterns, comma-separated (e.g. 'stock*,balanced*,fbc'); "
                        "stock always runs")
    p.add_argument("--steps", type=_positive_int, default=None, help="denoising steps (default 8; tiny 4)")
    p.add_argument("--layers", type=_positive_int, default=None,
                   help="transformer blocks to build per model, over all its block lists (default: per model, about 40 ms per "
                        "transformer call on an H200, one block per list for the largest); speed-ups are per-layer ratios")
    p.add_argument("--rounds", type=_positive_int, default=1, help="timed rounds after the cold round (default 1)")
    p.add_argument("--time-budget-s", type=_positive_float, default=500.0,
                   help="seconds for everything, builds and compiles included; configurations that do not fit are "
                        "recorded as 'skipped: budget' (default 500)")
    p.add_argument("--compile", action="store_true",
                   help="also run every configuration with the transformer blocks compiled (dynamo counters recorded)")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor on CUDA, eager on CPU)")
    p.add_argument("--peer-preset", default="balanced", help="preset whose cache fraction the cache peers match (default balanced)")
    p.add_argument("--flex-preset", default="balanced", help="preset whose attention masks FlexAttention runs (default balanced)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, embeddings and noise (default 0)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"JSON path (default {DEFAULT_OUT}; --tiny: bench_tiny.json; --testbed-quality: {DEFAULT_TESTBED_OUT.name})")
    p.add_argument("--dry-run", action="store_true", help="print the planned work and its H200 time estimate; run nothing")
    p.add_argument("--testbed-quality", action="store_true",
                   help="the presets on the testbed: speed-up vs the stock pipeline, PSNR, SSIM, feature distance")
    p.add_argument("--num-prompts", type=_positive_int, default=None,
                   help="--testbed-quality: held-out prompts (default 16; tiny 2)")
    p.add_argument("--size", type=_positive_int, nargs=3, default=None, metavar=("H", "W", "FRAMES"),
                   help="--testbed-quality: height, width, frames (default 256 256 16; tiny 32 32 4)")


def _options(ns: argparse.Namespace, argv: list[str]) -> Any:
    from dit_accel.bench.runner import BenchOptions

    out = ns.out or (DEFAULT_OUT.with_name("bench_tiny.json") if ns.tiny else DEFAULT_OUT)
    return BenchOptions(
        out=out, tiny=ns.tiny, device=ns.device, models=tuple(ns.models), runs=tuple(ns.runs), steps=ns.steps,
        layers=ns.layers, rounds=ns.rounds, time_budget_s=ns.time_budget_s, compile=ns.compile,
        compile_backend=ns.compile_backend, peer_preset=ns.peer_preset, flex_preset=ns.flex_preset, seed=ns.seed,
        argv=argv,
    )


def dry_run(options: Any, print_fn: Callable[[str], None] = print) -> dict[str, Any]:
    """The planned work: per model its size, layers and estimated cost, and which configurations the budget admits,
    replayed on a virtual clock with the same admission rule as the real run (estimates for an H200; all optional
    peers assumed importable there). Returns the plan as data."""
    import torch

    from dit_accel.bench import runner as RN
    from dit_accel.bench.runs import dedupe

    cuda = not options.tiny
    device = torch.device("cuda" if cuda else "cpu")
    steps = options.steps or (RN.TINY_STEPS if options.tiny else RN.DEFAULT_STEPS)
    options.steps = steps
    if options.compile and options.compile_backend is None:
        options.compile_backend = "inductor" if cuda else "eager"
    plans = RN.plan_models(options, device)
    runs = RN.all_runs(options, compiled_blocks=lambda ctx: None)  # type: ignore[arg-type,return-value]
    same_as = dedupe(runs)
    needs = [RN.model_need(p, runs, options.rounds, cuda) for p in plans]
    now = [0.0]
    budget = RN.Budget(options.time_budget_s, now=lambda: now[0])
    out: dict[str, Any] = {"time_budget_s": options.time_budget_s, "steps": steps, "rounds_timed": options.rounds,
                           "models": {}}
    print_fn(f"dit-accel bench plan: {len(plans)} models, {len(runs)} configurations each, {steps} steps, "
             f"1 cold + {options.rounds} timed generation(s) per configuration, budget {options.time_budget_s:.0f} s "
             f"({'tiny, CPU' if options.tiny else 'estimates for one H200'})")
    header = f"{'model':<20} {'layers':<9} {'full':<9} {'tokens':>7} {'fwd ms':>7} {'full fwd ms':>11} {'gen s':>6} {'need s':>7} {'share s':>7}  admitted / skipped"
    print_fn(header)
    first_sparse = False
    for i, plan in enumerate(plans):
        share = budget.begin_model(needs[i], sum(needs[i:]))
        now[0] += plan.build_s
        admitted, skipped = [], []
        model_sparse = False
        candidates = [r for r in runs if r.key not in same_as and (cuda or not r.needs_cuda)]
        candidates.sort(key=lambda r: r.runs_last)  # as the real run: runs-last peers after the others

        def cost(run: Any) -> float:
            allowance = RN.cold_allowance(run, cuda, first_sparse, model_sparse)
            return plan.gen_s * (1 + run.extra_generations + options.rounds) + allowance

        for j, run in enumerate(candidates):
            allowance = RN.cold_allowance(run, cuda, first_sparse, model_sparse)
            keep = 0.0 if run.required else sum(cost(r) for r in candidates[j + 1:] if r.required)
            if budget.admit(plan.gen_s * (1 + run.extra_generations) + allowance, plan.gen_s * options.rounds, keep):
                now[0] += plan.gen_s * (1 + run.extra_generations) + allowance
                admitted.append(run)
                if run.kind in RN.SPARSE_KINDS:
                    first_sparse = model_sparse = True
            else:
                skipped.append(run.key)
        now[0] += plan.gen_s * options.rounds * len(admitted)
        d = plan.description
        print_fn(f"{plan.spec.name:<20} {str(list(plan.layers)):<9} {str(list(plan.spec.full_layers)):<9} "
                 f"{d['tokens']:>7} {d['est_forward_ms']:>7.1f} {d['est_full_model_forward_ms']:>11.1f} "
                 f"{plan.gen_s:>6.2f} {needs[i]:>7.1f} {share:>7.1f}  {len(admitted)} / "
                 f"{len(skipped)}{(' (' + ', '.join(skipped) + ')') if skipped else ''}")
        out["models"][plan.spec.name] = {**d, "need_s": round(needs[i], 1), "share_s": round(share, 1),
                                         "admitted": [r.key for r in admitted], "skipped": skipped}
    out["estimated_total_s"] = round(now[0], 1)
    out["configurations"] = [r.key for r in runs if r.key not in same_as]
    out["same_as"] = same_as
    print_fn(f"estimated total {now[0]:.0f} s of {options.time_budget_s:.0f} s (plus process start and installs); "
             f"configurations: {', '.join(out['configurations'])}; same_as: {same_as}")
    return out


def run(ns: argparse.Namespace) -> int:
    """Run ``dit-accel bench`` with parsed arguments; returns the exit code (2 on user errors)."""
    argv = getattr(ns, "argv", None) or ["dit-accel", *sys.argv[1:]]
    try:
        if ns.testbed_quality:
            from dit_accel.bench.runner import resolve_device
            from dit_accel.bench.testbed import run_testbed_quality

            device = resolve_device(ns.device)
            out = ns.out or DEFAULT_TESTBED_OUT.with_name("presets_testbed_tiny.json" if ns.tiny else DEFAULT_TESTBED_OUT.name)
            h, w, f = ns.size or ((32, 32, 4) if ns.tiny else (256, 256, 16))
            num_prompts = ns.num_prompts or (2 if ns.tiny else 16)
            run_testbed_quality(out, device=device, tiny=ns.tiny, num_prompts=num_prompts, height=h, width=w, frames=f,
                                steps=ns.steps if ns.steps is not None else (4 if ns.tiny else None), seed=ns.seed, argv=argv)
            return 0
        options = _options(ns, argv)
        if ns.dry_run:
            dry_run(options)
            return 0
        from dit_accel.bench.runner import run_bench

        start = time.perf_counter()
        run_bench(options)
        print(f"bench finished in {time.perf_counter() - start:.0f} s")
        return 0
    except ValueError as err:
        print(f"dit-accel bench: error: {err}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    """``python -m dit_accel.bench``: the ``bench`` subcommand on its own."""
    parser = argparse.ArgumentParser(prog="python -m dit_accel.bench", description=DESCRIPTION)
    add_arguments(parser)
    args = list(sys.argv[1:] if argv is None else argv)
    ns = parser.parse_args(args)
    ns.argv = ["python -m dit_accel.bench", *args]
    return run(ns)
