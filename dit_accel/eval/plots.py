"""Small PNG charts drawn with Pillow (matplotlib is not a dependency of dit-accel).

Two chart kinds are enough for the reports: a labelled scatter (speed-up vs quality, one point per
configuration) and line charts (per-step curves, one line per configuration), each with axes, ticks,
a title and a legend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

__all__ = ["Series", "scatter_chart", "line_chart", "nice_ticks", "PALETTE"]

PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)
"""Line/point colours, cycled."""


@dataclass
class Series:
    """One named sequence of points; ``None`` y values leave a gap."""

    name: str
    """Legend label."""
    x: Sequence[float]
    """x coordinates."""
    y: Sequence[float | None]
    """y coordinates (``None``: no point)."""


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering ``[lo, hi]``."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0]
    if hi <= lo:
        hi = lo + (abs(lo) * 0.1 or 1.0)
    raw = (hi - lo) / max(1, count)
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    ticks = [round(i * step, 10) for i in range(first, last + 1)]
    return ticks


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"


class _Axes:
    def __init__(self, title: str, xlabel: str, ylabel: str, xs: list[float], ys: list[float], size=(1000, 560)):
        self.img = Image.new("RGB", size, "white")
        self.draw = ImageDraw.Draw(self.img)
        self.font, self.small, self.big = _font(14), _font(12), _font(17)
        self.left, self.right, self.top, self.bottom = 80, size[0] - 340, 46, size[1] - 60
        self.xticks = nice_ticks(min(xs), max(xs)) if xs else [0.0, 1.0]
        self.yticks = nice_ticks(min(ys), max(ys)) if ys else [0.0, 1.0]
        self.x0, self.x1 = self.xticks[0], self.xticks[-1] if self.xticks[-1] > self.xticks[0] else self.xticks[0] + 1
        self.y0, self.y1 = self.yticks[0], self.yticks[-1] if self.yticks[-1] > self.yticks[0] else self.yticks[0] + 1
        d = self.draw
        d.text((self.left, 12), title, fill="black", font=self.big)
        d.rectangle([self.left, self.top, self.right, self.bottom], outline="black")
        for t in self.xticks:
            px = self.px(t, self.y0)[0]
            d.line([px, self.bottom, px, self.bottom + 5], fill="black")
            d.line([px, self.top, px, self.bottom], fill=(232, 232, 232))
            d.text((px, self.bottom + 8), _fmt(t), fill="black", font=self.small, anchor="ma")
        for t in self.yticks:
            py = self.px(self.x0, t)[1]
            d.line([self.left - 5, py, self.left, py], fill="black")
            d.line([self.left, py, self.right, py], fill=(232, 232, 232))
            d.text((self.left - 8, py), _fmt(t), fill="black", font=self.small, anchor="rm")
        d.rectangle([self.left, self.top, self.right, self.bottom], outline="black")
        d.text(((self.left + self.right) / 2, size[1] - 26), xlabel, fill="black", font=self.font, anchor="ma")
        label = Image.new("RGB", (self.bottom - self.top, 20), "white")
        ImageDraw.Draw(label).text(((self.bottom - self.top) / 2, 2), ylabel, fill="black", font=self.font, anchor="ma")
        self.img.paste(label.rotate(90, expand=True), (8, self.top))
        self.legend_y = self.top

    def px(self, x: float, y: float) -> tuple[float, float]:
        fx = (x - self.x0) / (self.x1 - self.x0)
        fy = (y - self.y0) / (self.y1 - self.y0)
        return self.left + fx * (self.right - self.left), self.bottom - fy * (self.bottom - self.top)

    def legend(self, name: str, color: tuple[int, int, int]) -> None:
        x = self.right + 14
        self.draw.rectangle([x, self.legend_y + 3, x + 12, self.legend_y + 15], fill=color)
        text = name if len(name) <= 50 else name[:24] + "…" + name[-25:]
        self.draw.text((x + 18, self.legend_y + 1), text, fill="black", font=self.small)
        self.legend_y += 20


def scatter_chart(path: str | Path, points: Sequence[tuple[str, float, float]], *, title: str, xlabel: str, ylabel: str) -> Path:
    """Labelled points ``(name, x, y)`` (non-finite ones are skipped) saved as a PNG at ``path``."""
    pts = [(n, x, y) for n, x, y in points if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)]
    ax = _Axes(title, xlabel, ylabel, [p[1] for p in pts], [p[2] for p in pts])
    for i, (name, x, y) in enumerate(pts):
        color = PALETTE[i % len(PALETTE)]
        cx, cy = ax.px(x, y)
        ax.draw.ellipse([cx - 6, cy - 6, cx + 6, cy + 6], fill=color, outline="black")
        ax.legend(name, color)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ax.img.save(path)
    return path


def line_chart(path: str | Path, series: Sequence[Series], *, title: str, xlabel: str, ylabel: str) -> Path:
    """Lines (gaps at ``None``) with point markers, saved as a PNG at ``path``."""
    xs = [x for s in series for x, y in zip(s.x, s.y) if y is not None]
    ys = [y for s in series for y in s.y if y is not None]
    ax = _Axes(title, xlabel, ylabel, xs, ys)
    for i, s in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        prev = None
        for x, y in zip(s.x, s.y):
            if y is None:
                prev = None
                continue
            p = ax.px(x, y)
            if prev is not None:
                ax.draw.line([prev, p], fill=color, width=2)
            ax.draw.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=color)
            prev = p
        ax.legend(s.name, color)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ax.img.save(path)
    return path
