"""``dit-accel eval``: dense vs accelerated generation over a prompt set, metrics, report.

    dit-accel eval --model testbed --config attention:draft --config cache:probe \\
        --config attention:draft+cache:probe --config preset:balanced --output eval_out/

Wiring into the main CLI (``dit_accel/cli.py``)::

    ev = sub.add_parser("eval", help="evaluate quality and speed of configurations against dense")
    eval_cli.add_arguments(ev)                  # from dit_accel.eval import cli as eval_cli
    ...
    if ns.command == "eval": return eval_cli.run(ns)

Also runnable alone: ``python -m dit_accel.eval --config ...``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

__all__ = ["add_arguments", "run", "main", "read_prompt_file"]

from dit_accel.argtypes import non_negative_int, positive_int

logger = logging.getLogger("dit_accel")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``eval`` options to ``parser`` (a subparser of ``dit-accel``)."""
    from dit_accel.loading import DEVICES, DTYPES, TESTBED_MODEL

    from .harness import METRIC_GROUPS
    from .video import FLOW_BACKENDS

    parser.add_argument("--model", default=TESTBED_MODEL, help="'testbed' (default), a local diffusers folder, or a hub id")
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="SPEC",
        help="a configuration to evaluate, repeatable: 'dense', 'preset:NAME', 'attention:NAME(key=value,...)', "
        "'cache:NAME(key=value,...)', or parts joined by '+' (e.g. attention:draft+cache:probe); "
        "'dense' (nothing applied) is always run first as the reference. --list-configs shows the names",
    )
    parser.add_argument("--list-configs", action="store_true", help="print the valid preset/attention/cache names and exit")
    parser.add_argument("--prompts", type=Path, default=None, help="text file, one prompt per line ('#' comments); default: built-in set")
    parser.add_argument("--num-prompts", type=positive_int, default=8, help="size of the built-in prompt set (held-out testbed captions; default 8)")
    parser.add_argument("--height", type=positive_int, default=None, help="pixels (default: the pipeline's)")
    parser.add_argument("--width", type=positive_int, default=None, help="pixels (default: the pipeline's)")
    parser.add_argument("--frames", type=positive_int, default=None, help="frames per video (default: the pipeline's)")
    parser.add_argument("--steps", type=positive_int, default=None, help="denoising steps (default: the pipeline's)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the pipeline's)")
    parser.add_argument("--seed", type=int, default=0, help="prompt i uses seed SEED + i (default 0)")
    parser.add_argument("--warmup", type=non_negative_int, default=1, help="untimed generations per configuration first (default 1)")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--output", "-o", type=Path, default=None, help="report folder (default eval_results/<UTC time>)")
    parser.add_argument(
        "--feature-net",
        choices=("auto", "testbed", "inception", "none"),
        default="auto",
        help="features for FID/KID, feature distance, consistency, prompt adherence: 'testbed' (shipped classifier), "
        "'inception' (needs --feature-weights FILE and torch-fidelity), 'none'; 'auto' = testbed when its weights exist",
    )
    parser.add_argument("--feature-weights", type=Path, default=None, help="testbed classifier folder or Inception weights file")
    parser.add_argument("--lpips", choices=("alex", "vgg", "squeeze"), default=None, help="also compute LPIPS (needs torchvision and backbone weights on disk)")
    parser.add_argument("--lpips-torch-home", type=Path, default=None, help="folder with hub/checkpoints/<backbone>.pth (default $TORCH_HOME)")
    parser.add_argument("--flow", choices=FLOW_BACKENDS, default="auto", help="optical flow for dynamic degree (default: OpenCV Farneback if installed, else block matching)")
    parser.add_argument("--metrics", default=",".join(METRIC_GROUPS), help=f"comma-separated metric groups (default {','.join(METRIC_GROUPS)})")
    parser.add_argument("--no-real-videos", action="store_true", help="skip FID/KID against rendered ground-truth testbed videos")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def read_prompt_file(path: Path) -> list[str]:
    """Prompts of a text file: one per line, blank lines and lines starting with '#' skipped."""
    if not path.is_file():
        raise ValueError(f"prompt file {str(path)!r} not found")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"prompt file {str(path)!r} holds no prompts")
    return prompts


def _feature_net(choice: str, weights: Path | None, device: Any) -> Any:
    from dit_accel.testbed import WEIGHTS_DIR

    from .features import InceptionFeatures, load_testbed_features

    if choice == "none":
        return None
    if choice == "inception":
        if weights is None:
            raise ValueError("--feature-net inception needs --feature-weights pointing to the Inception weights file")
        return InceptionFeatures(weights).to(device)
    folder = weights or WEIGHTS_DIR / "classifier"
    try:
        return load_testbed_features(folder, device=device)
    except (FileNotFoundError, RuntimeError) as err:
        if choice == "testbed":
            raise ValueError(f"cannot load the testbed classifier from {folder}: {err}") from err
        # auto: the report is still useful without feature metrics
        print(f"dit-accel eval: note: no usable testbed classifier at {folder} ({str(err).splitlines()[0]}); "
              "feature metrics skipped", file=sys.stderr)
        return None


def run(args: argparse.Namespace) -> int:
    """Run ``dit-accel eval`` with parsed ``args``; returns the exit code (2 on user errors)."""
    from dit_accel.loading import load_pipeline, resolve_device_dtype

    from .configs import parse_config, valid_names
    from .harness import EvalSettings, builtin_prompts, evaluate
    from .metrics import LPIPSScorer
    from .report import write_report

    try:
        if args.list_configs:
            for kind, names in valid_names().items():
                print(f"{kind}: {', '.join(names)}")
            return 0
        if not args.config:
            raise ValueError("give at least one --config SPEC (e.g. --config attention:draft); --list-configs shows the names")
        configs = [parse_config(spec) for spec in args.config]
        prompts = read_prompt_file(args.prompts) if args.prompts is not None else builtin_prompts(args.num_prompts)
        metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
        settings = EvalSettings(
            height=args.height, width=args.width, num_frames=args.frames, num_inference_steps=args.steps,
            guidance_scale=args.guidance, seed=args.seed, warmup=args.warmup, flow=args.flow, metrics=metrics,
            real_videos=not args.no_real_videos,
        )
        output = args.output or Path("eval_results") / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        device, dtype = resolve_device_dtype(args.device, args.dtype)
        feature_net = _feature_net(args.feature_net, args.feature_weights, device)
        lpips = LPIPSScorer(args.lpips, args.lpips_torch_home) if args.lpips else None
        pipe = load_pipeline(args.model, device, dtype)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"dit-accel eval: error: {err}", file=sys.stderr)
        return 2
    report = evaluate(
        pipe, prompts, configs, settings, feature_net=feature_net, lpips=lpips,
        progress=not args.no_progress, model_name=args.model,
    )
    paths = write_report(report, output)
    print(Path(paths["markdown"]).read_text())
    print(f"report written to {output}/ ({', '.join(p.name for p in paths.values())})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dit_accel.eval``: the ``eval`` subcommand on its own."""
    parser = argparse.ArgumentParser(prog="python -m dit_accel.eval", description="dit-accel evaluation: quality and speed vs dense")
    add_arguments(parser)
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    return run(ns)
