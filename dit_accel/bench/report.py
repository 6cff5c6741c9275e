"""The benchmark's output: ``bench.json`` (written atomically after every run), a PNG grid of speed-ups beside it,
and a markdown table for the terminal (and for generated docs)."""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch

SCHEMA = "dit-accel-bench/1"
"""Version tag of the ``bench.json`` layout."""

OPTIONAL_MODULES = ("diffusers", "triton", "cache_dit", "sageattention", "xformers", "transformers")
"""Libraries whose versions every report records (``None`` when not importable)."""


def versions() -> dict[str, str | None]:
    """Python, torch (+ CUDA, cuDNN) and library versions."""
    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__,
                                  "cuda": torch.version.cuda,
                                  "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None}
    from importlib import metadata

    for name in OPTIONAL_MODULES:
        try:
            module = __import__(name)
        except Exception:  # an optional library: absent or broken here, recorded as None
            out[name] = None
            continue
        version = getattr(module, "__version__", None)
        if version is None:
            try:
                version = metadata.version(name.replace("_", "-"))
            except metadata.PackageNotFoundError:
                version = "unknown"
        out[name] = str(version)
    return out


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become ``None`` (JSON has no NaN/inf), tuples become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """Write ``data`` to ``path`` atomically (a kill mid-write leaves the previous file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(_clean(data), f, indent=1, allow_nan=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _run_columns(report: dict[str, Any]) -> list[str]:
    seen: list[str] = []
    for model in report.get("models", {}).values():
        for key in model.get("runs", {}):
            if key not in seen:
                seen.append(key)
    return seen


def _cell(run: dict[str, Any]) -> str:
    if "error" in run:
        return "error"
    if "skipped" in run:
        return "skip"
    s = run.get("speedup_vs_stock")
    return "-" if s is None else f"{s:.2f}x"


def markdown_table(report: dict[str, Any]) -> str:
    """Speed-up vs stock per model (rows) and configuration (columns)."""
    columns = _run_columns(report)
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, model in report.get("models", {}).items():
        runs = model.get("runs", {})
        cells = [_cell(runs[c]) if c in runs else "" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _colour(speedup: float | None) -> tuple[int, int, int]:
    if speedup is None or not math.isfinite(speedup):
        return (235, 235, 235)
    # green above 1x, red below, saturating at 2x / 0.5x
    t = max(-1.0, min(1.0, math.log2(speedup)))
    if t >= 0:
        return (int(255 - 120 * t), 255, int(255 - 120 * t))
    return (255, int(255 + 120 * t), int(255 + 120 * t))


def speedup_png(path: Path, report: dict[str, Any]) -> Path:
    """A grid of speed-ups vs stock (models x configurations), coloured green above 1x and red below."""
    from PIL import Image, ImageDraw

    columns = _run_columns(report)
    models = list(report.get("models", {}).items())
    label_w, cell_w, cell_h, head_h = 190, 74, 26, 150
    width = label_w + cell_w * max(1, len(columns)) + 10
    height = head_h + cell_h * max(1, len(models)) + 40
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font, small = _font(13), _font(11)
    title = f"speed-up vs stock, {report.get('device', '?')} ({report.get('clock', '?')})"
    draw.text((8, 8), title, fill="black", font=font)
    for j, column in enumerate(columns):
        label = Image.new("RGB", (head_h - 34, cell_w), "white")
        ImageDraw.Draw(label).text((4, cell_w / 2), column, fill="black", font=small, anchor="lm")
        img.paste(label.rotate(90, expand=True), (label_w + j * cell_w, 30))
    for i, (name, model) in enumerate(models):
        y = head_h + i * cell_h
        draw.text((8, y + cell_h / 2), name, fill="black", font=small, anchor="lm")
        runs = model.get("runs", {})
        for j, column in enumerate(columns):
            run = runs.get(column, {})
            x = label_w + j * cell_w
            speedup = run.get("speedup_vs_stock") if isinstance(run.get("speedup_vs_stock"), (int, float)) else None
            draw.rectangle([x, y, x + cell_w - 2, y + cell_h - 2], fill=_colour(speedup), outline=(200, 200, 200))
            draw.text((x + cell_w / 2, y + cell_h / 2), _cell(run) if run else "", fill="black", font=small, anchor="mm")
    draw.text((8, height - 24), "per-layer ratios of reduced-depth models (see each model's 'layers' in the JSON)",
              fill="black", font=small)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
