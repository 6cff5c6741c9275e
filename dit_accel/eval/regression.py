"""Quality-regression baselines: every shipped configuration on the testbed at a tiny CPU size.

    python -m dit_accel.eval.regression            # compare with tests/baselines/regression_testbed.json
    python -m dit_accel.eval.regression --update   # regenerate the baselines (review the diff, commit it)

What runs: the shipped testbed pipeline (``load_testbed_pipeline``) at :data:`SIZE` (64x64 px, 8 frames,
6 steps, guidance 1) on :data:`NUM_PROMPTS` built-in prompts; ``dense`` once per prompt, shared by all
configurations. The configurations (:func:`shipped_configs`) come from the live registries: every
attention method except the references in :data:`YARDSTICKS` (with :data:`SPARSE_OPTIONS`), every cache
scheduler (defaults, except :data:`CACHE_OPTIONS`), one combination (``combo`` or the first sparse method,
plus ``probe``), and every preset.

Tracked numbers per configuration (:data:`TOLERANCES`): PSNR and SSIM against dense, mean attention
density and mean cache compute fraction. The classifier-based metrics are left out on purpose: the gate
guards the acceleration code, and must not move when the testbed's feature network is retrained.
A check fails when ``|current - baseline| > abs + rel * |baseline|`` for any tracked number; both directions count, because
a method that silently became dense (higher PSNR, density 1) is a regression too. PSNR is clipped at
:data:`PSNR_CLIP` dB before comparing (above it the output equals dense up to float noise). The baseline
file also stores a fingerprint of the testbed pipeline weights: new weights need ``--update``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

__all__ = [
    "SIZE",
    "YARDSTICKS",
    "NUM_PROMPTS",
    "TOLERANCES",
    "PSNR_CLIP",
    "Tolerance",
    "BASELINE_PATH",
    "shipped_configs",
    "tracked_metrics",
    "compare",
    "run_regression",
    "weights_fingerprint",
    "load_baselines",
    "main",
]

SIZE: dict[str, Any] = {"height": 64, "width": 64, "num_frames": 8, "num_inference_steps": 6, "guidance_scale": 1.0}
"""Generation settings of the regression runs: 512 tokens (4 kernel blocks of 128); guidance 1 runs one
branch per step, which halves the CPU time (per-branch cache and sparse state is covered by unit tests)."""

YARDSTICKS: tuple[str, ...] = ("dense", "full", "oracle", "window")
"""Registered attention methods that are references, not shipped speed-ups: no baseline for them."""

NUM_PROMPTS: int = 2
"""Built-in prompts per configuration (seeds 0 and 1)."""

PSNR_CLIP: float = 50.0
"""PSNR values are clipped to this before comparing (dB)."""


@dataclass(frozen=True)
class Tolerance:
    """Allowed drift of one tracked number: ``|current - baseline| <= abs + rel * |baseline|``."""

    abs: float
    """Absolute part of the allowed drift."""
    rel: float = 0.0
    """Part of the allowed drift proportional to the baseline value."""

    def allowed(self, baseline: float) -> float:
        """The allowed drift around ``baseline``."""
        return self.abs + self.rel * abs(baseline)


TOLERANCES: dict[str, Tolerance] = {
    "psnr": Tolerance(abs=1.0),
    "ssim": Tolerance(abs=0.01),
    "density": Tolerance(abs=0.02),
    "compute_fraction": Tolerance(abs=0.02),
}
"""Tracked numbers and their allowed drift (CPU float differences between machines stay far below)."""

BASELINE_PATH = Path(__file__).resolve().parents[2] / "tests" / "baselines" / "regression_testbed.json"
"""Default baseline file (in the source tree)."""

SPARSE_OPTIONS = "min_seq_len=0,quality=0.0,dense_above=None"
"""Options of every sparse method in the regression: ``min_seq_len=0`` because at 512 tokens every method
would otherwise run dense, the lowest quality knob so the sparse path really drops tiles (at the
default knob the tiny size keeps almost every tile, and PSNR sits above :data:`PSNR_CLIP`), and no break-even
routing (at 512 tokens the cost model sends most heads dense), so these rows guard the kernel path; the
presets' rows run the routing as shipped."""

CACHE_OPTIONS: dict[str, str] = {"probe": "threshold=0.3"}
"""Cache options that differ from the defaults in the regression: at 6 steps the default probe threshold
never reuses, which would leave its reuse path unguarded."""

COMBINATION_CACHE = "probe"
"""Cache scheduler of the shipped attention + cache combination."""


def _cache_spec(name: str) -> str:
    options = CACHE_OPTIONS.get(name)
    return f"cache:{name}" + (f"({options})" if options else "")


def shipped_configs() -> list[str]:
    """Specs of every shipped configuration (see the module docstring)."""
    from dit_accel import api
    from dit_accel.attention.registry import available_methods
    from dit_accel.presets import preset_names

    sparse = [m for m in available_methods() if m not in YARDSTICKS]
    specs = [f"attention:{m}({SPARSE_OPTIONS})" for m in sparse]
    specs += [_cache_spec(c) for c in api.available_caches()]
    if sparse and COMBINATION_CACHE in api.available_caches():
        first = "combo" if "combo" in sparse else sparse[0]
        specs.append(f"attention:{first}({SPARSE_OPTIONS})+{_cache_spec(COMBINATION_CACHE)}")
    specs += [f"preset:{p}" for p in preset_names()]
    return specs


def tracked_metrics(entry: dict[str, Any]) -> dict[str, float | None]:
    """The tracked numbers of one configuration entry of an evaluation report."""
    m = entry["metrics"]
    attn = entry.get("attention_summary") or {}
    caches = entry.get("cache_summary") or {}
    fractions = [c["compute_fraction"] for c in caches.values() if c.get("compute_fraction") is not None]
    return {
        "psnr": m.get("psnr"),
        "ssim": m.get("ssim"),
        "density": attn.get("mean_density"),
        "compute_fraction": (sum(fractions) / len(fractions)) if fractions else None,
    }


def compare(current: dict[str, float | None], baseline: dict[str, float | None], tolerances: dict[str, Tolerance] | None = None) -> list[str]:
    """Failures (one line each) of ``current`` against ``baseline``; empty when within tolerance."""
    tolerances = TOLERANCES if tolerances is None else tolerances
    failures = []
    for key, tol in tolerances.items():
        base, cur = baseline.get(key), current.get(key)
        if base is None and cur is None:
            continue
        if base is None or cur is None:
            failures.append(f"{key}: baseline {base!r}, now {cur!r} (one of them is missing)")
            continue
        if key == "psnr":
            base, cur = min(base, PSNR_CLIP), min(cur, PSNR_CLIP)
        allowed = tol.allowed(base)
        if abs(cur - base) > allowed:
            failures.append(f"{key}: baseline {base:.6g}, now {cur:.6g} (drift {cur - base:+.3g}, allowed +-{allowed:.3g})")
    return failures


def weights_fingerprint(folder: str | Path | None = None) -> str:
    """SHA-256 (first 16 hex digits) of the testbed pipeline's weight files (safetensors and JSON, in path
    order; the attribute classifier and training notes excluded: the regression does not use them)."""
    from dit_accel.testbed import WEIGHTS_DIR

    root = Path(folder) if folder is not None else WEIGHTS_DIR
    digest = hashlib.sha256()
    files = sorted(
        p for p in root.rglob("*")
        if p.is_file() and p.suffix in (".safetensors", ".json") and p.name != "training_info.json"
        and "classifier" not in p.relative_to(root).parts
    )
    if not files:
        raise FileNotFoundError(f"no testbed weights under {root}")
    for path in files:
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def run_regression(configs: Sequence[str] | None = None, *, progress: bool = False, pipe: Any = None) -> dict[str, Any]:
    """Evaluate ``configs`` (default: :func:`shipped_configs`) at the regression size.

    Returns ``{"report": <evaluate() report>, "metrics": {label: tracked numbers}}``. ``pipe`` defaults to
    the shipped testbed pipeline.
    """
    import torch

    from .harness import EvalSettings, builtin_prompts, evaluate

    torch.manual_seed(0)
    if pipe is None:
        from dit_accel.testbed import load_testbed_pipeline

        pipe = load_testbed_pipeline("cpu")
    settings = EvalSettings(seed=0, warmup=0, flow="block", metrics=("reference",), real_videos=False, **SIZE)
    specs = list(configs) if configs is not None else shipped_configs()
    report = evaluate(pipe, builtin_prompts(NUM_PROMPTS), specs, settings, progress=progress, model_name="testbed")
    metrics = {e["label"]: tracked_metrics(e) for e in report["configs"] if e["label"] != "dense"}
    return {"report": report, "metrics": metrics}


def load_baselines(path: str | Path = BASELINE_PATH) -> dict[str, Any]:
    """The stored baseline file (raises ``FileNotFoundError`` naming the command that writes it)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no baselines at {path}; write them with `python -m dit_accel.eval.regression --update`")
    return json.loads(path.read_text())


def _baseline_document(result: dict[str, Any]) -> dict[str, Any]:
    report = result["report"]
    return {
        "about": "dit-accel quality-regression baselines (dit_accel/eval/regression.py); regenerate with "
        "`python -m dit_accel.eval.regression --update` and review the diff",
        "weights_fingerprint": weights_fingerprint(),
        "settings": SIZE | {"num_prompts": NUM_PROMPTS, "seed": 0},
        "prompts": report["prompts"],
        "tolerances": {k: asdict(v) for k, v in TOLERANCES.items()},
        "psnr_clip": PSNR_CLIP,
        "environment": report["environment"],
        "configs": result["metrics"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Check against (or with ``--update`` rewrite) the baseline file; exit 1 on any drift."""
    parser = argparse.ArgumentParser(prog="python -m dit_accel.eval.regression", description=__doc__.split("\n\n")[0])
    parser.add_argument("--update", action="store_true", help="regenerate the baseline file")
    parser.add_argument("--baselines", type=Path, default=BASELINE_PATH, help=f"baseline JSON (default {BASELINE_PATH})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    result = run_regression(progress=not args.no_progress)
    if args.update:
        from .report import clean_json

        args.baselines.parent.mkdir(parents=True, exist_ok=True)
        args.baselines.write_text(json.dumps(clean_json(_baseline_document(result)), indent=1, sort_keys=False) + "\n")
        print(f"wrote {len(result['metrics'])} baselines to {args.baselines}")
        return 0
    baselines = load_baselines(args.baselines)
    status = 0
    if baselines.get("weights_fingerprint") != weights_fingerprint():
        print("testbed weights differ from the ones the baselines were made with: run with --update and review")
        status = 1
    for label, current in result["metrics"].items():
        base = baselines["configs"].get(label)
        failures = ["no baseline (run --update)"] if base is None else compare(current, base)
        print(f"{'FAIL' if failures else 'ok  '} {label}" + "".join(f"\n     {f}" for f in failures))
        status = status or int(bool(failures))
    return status


if __name__ == "__main__":
    sys.exit(main())
