"""Writing an evaluation report: ``report.json``, ``report.md`` and PNG plots in one folder.

Files (``write_report(report, folder)``):

- ``report.json``: the full report dict of :func:`dit_accel.eval.harness.evaluate` (non-finite numbers as
  ``null``).
- ``report.md``: environment, settings, and one table row per configuration (speed, reference metrics,
  distribution metrics, VBench-style dimensions, density and cache compute fraction).
- ``speed_vs_quality.png``: speed-up vs dense (x) against PSNR vs dense (y), one point per configuration.
- ``per_step_density.png``, ``per_step_skipped_tiles.png``, ``per_step_cache.png``, ``per_step_time.png``:
  per denoising step, one line per configuration (written only when some configuration has that data).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .plots import Series, line_chart, scatter_chart

__all__ = ["write_report", "markdown_summary", "clean_json"]

_TABLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("speedup", "speed-up", "{:.2f}x"),
    ("generate_s", "s/video", "{:.2f}"),
    ("psnr", "PSNR dB", "{:.2f}"),
    ("ssim", "SSIM", "{:.4f}"),
    ("feature_distance", "feat. dist.", "{:.4f}"),
    ("lpips", "LPIPS", "{:.4f}"),
    ("fid_vs_dense", "FID vs dense", "{:.3g}"),
    ("kid_vs_dense", "KID vs dense", "{:.3g}"),
    ("fid_vs_real", "FID vs real", "{:.3g}"),
    ("kid_vs_real", "KID vs real", "{:.3g}"),
    ("subject_consistency", "subject", "{:.4f}"),
    ("background_consistency", "background", "{:.4f}"),
    ("temporal_flickering", "flicker", "{:.4f}"),
    ("motion_smoothness", "smooth", "{:.4f}"),
    ("dynamic_degree", "dynamic", "{:.4f}"),
    ("prompt_adherence", "prompt acc.", "{:.3f}"),
    ("prompt_score", "prompt score", "{:.3f}"),
    ("density", "density", "{:.3f}"),
    ("compute_fraction", "cache compute", "{:.3f}"),
)


def clean_json(value: Any) -> Any:
    """``value`` with non-finite floats replaced by ``None`` (strict JSON), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    return value


def _row(entry: dict[str, Any]) -> dict[str, Any]:
    m = dict(entry["metrics"])
    m["speedup"] = entry["speed"]["speedup_vs_dense"]
    m["generate_s"] = entry["speed"]["generate_s_mean"]
    attn = entry.get("attention_summary") or {}
    m["density"] = attn.get("mean_density")
    caches = entry.get("cache_summary") or {}
    fractions = [c.get("compute_fraction") for c in caches.values() if c.get("compute_fraction") is not None]
    m["compute_fraction"] = sum(fractions) / len(fractions) if fractions else None
    return m


def markdown_summary(report: dict[str, Any]) -> str:
    """The markdown summary of a report (see the module docstring)."""
    env = report["environment"]
    s = report["settings"]
    lines = [
        f"# dit-accel evaluation: {report['model']}",
        "",
        f"- device: {env['device']} ({env['device_type']}, {env['cpu_threads']} CPU threads); date {env['date']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        f"- frames (T, 3, H, W): {s.get('frames_shape')}; steps: {s.get('num_inference_steps')}; guidance: "
        f"{s.get('guidance_scale')}; seeds: {report['seeds'][0]}..{report['seeds'][-1]}; warm-up runs: {s.get('warmup')}",
        f"- prompts: {len(report['prompts'])}; feature network: {report.get('feature_network')}; LPIPS: {report.get('lpips')}; "
        f"optical flow: {s.get('flow_backend')}",
        "- reference metrics compare each configuration with the `dense` output of the same prompt and seed; "
        "speed-up = dense seconds / configuration seconds in this run. Definitions: docs/eval.md.",
        "",
    ]
    rows = [(e["label"], _row(e)) for e in report["configs"]]
    columns = [c for c in _TABLE_COLUMNS if any(r.get(c[0]) is not None for _, r in rows)]
    lines.append("| configuration | " + " | ".join(c[1] for c in columns) + " |")
    lines.append("|---|" + "---:|" * len(columns))
    for label, r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            cells.append("–" if v is None else fmt.format(v))
        lines.append(f"| `{label}` | " + " | ".join(cells) + " |")
    lines += ["", "Plots: speed_vs_quality.png, per_step_*.png.", ""]
    return "\n".join(lines)


def write_report(report: dict[str, Any], folder: str | Path) -> dict[str, Path]:
    """Write the report files into ``folder`` (created); return their paths by name."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    paths["json"] = folder / "report.json"
    paths["json"].write_text(json.dumps(clean_json(report), indent=1) + "\n")
    paths["markdown"] = folder / "report.md"
    paths["markdown"].write_text(markdown_summary(report))

    configs = report["configs"]
    points = [(e["label"], e["speed"]["speedup_vs_dense"], e["metrics"].get("psnr")) for e in configs]
    if any(p[2] is not None for p in points):
        paths["speed_vs_quality"] = scatter_chart(
            folder / "speed_vs_quality.png",
            points,
            title="Speed-up vs quality (PSNR vs dense, same seeds)",
            xlabel="speed-up vs dense (x)",
            ylabel="PSNR vs dense (dB)",
        )
    curves = (
        ("density", "per_step_density.png", "Attention density per step (mean over self-attention calls)", "density"),
        ("skipped_tiles", "per_step_skipped_tiles.png", "Skipped 128x128 tiles per step (per video, all layers)", "tiles"),
        ("compute_fraction", "per_step_cache.png", "Cache: fraction of blocks computed per step", "computed blocks"),
        ("step_seconds", "per_step_time.png", "Wall-clock per denoising step", "seconds"),
    )
    for key, name, title, ylabel in curves:
        series = []
        for e in configs:
            ys = e["per_step"].get(key) or []
            if any(y is not None for y in ys):
                series.append(Series(e["label"], list(range(len(ys))), ys))
        if series:
            paths[key] = line_chart(folder / name, series, title=title, xlabel="denoising step", ylabel=ylabel)
    return paths
