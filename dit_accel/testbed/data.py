"""Procedural captioned videos for the testbed: moving anti-aliased shapes on textured, panning backgrounds.

Everything is rendered with tensor ops on coordinate grids (signed-distance shapes, a ~1 px smooth step at
edges), so a batch is generated on the GPU in a few milliseconds. All random numbers are drawn from one
``torch.Generator`` (on its own device, CPU by default) before rendering, so a seed gives the same scenes on
any device.

Geometry is in units of the shorter frame side ``S = min(H, W)``: object radii are 5-14 % of it, so the
shapes stay small relative to the frame at every size. Motions are given per frame (the same speed whatever
the clip length); straight moves are placed so that they never touch a wall within the clip, ``bouncing``
objects reflect off the walls at least once, ``pulsing`` ones stay in place and grow and shrink. About half
of the non-round objects also rotate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .captions import (
    ATTRIBUTES,
    DIRECTIONS,
    MAX_OBJECTS,
    OBJECT_ATTRIBUTES,
    heldout_table,
    make_caption,
    scenes_from_labels,
)

__all__ = ["VideoBatch", "make_batch", "sample_labels", "render_from_labels", "SPLITS"]

SPLITS: tuple[str, ...] = ("train", "heldout")
"""``train``: no object has a held-out combination; ``heldout``: the first object has one."""

COUNT_PROBS: tuple[float, float, float] = (0.4, 0.35, 0.25)
"""Probability of one, two and three objects in a scene."""

SIZE_RADIUS: tuple[float, float, float] = (0.06, 0.09, 0.12)
"""Object radius (fraction of the shorter frame side) for small, medium, large; jittered by +-8 %."""

COLOR_RGB: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.10, 0.10),
    "green": (0.10, 0.78, 0.20),
    "blue": (0.18, 0.38, 1.00),
    "yellow": (0.98, 0.90, 0.15),
    "cyan": (0.10, 0.88, 0.92),
    "magenta": (0.92, 0.18, 0.88),
    "orange": (1.00, 0.55, 0.05),
    "white": (0.97, 0.97, 0.97),
}
"""Object colours in [0, 1] RGB; backgrounds are darker and desaturated so every colour stands out."""

STRAIGHT_SPEED: tuple[float, float] = (0.022, 0.038)
"""Speed range of straight moves, in frame sides per frame (16 frames cross 35-60 % of the frame)."""

BOUNCE_SPEED: tuple[float, float] = (0.05, 0.075)
"""Speed range of bouncing objects, in frame sides per frame."""

PAN_SPEED_MAX: float = 0.012
"""Largest background panning speed (frame sides per frame); well below object speeds."""


@dataclass
class VideoBatch:
    """A batch of captioned videos."""

    video: torch.Tensor
    """(B, 3, T, H, W) float32 in [-1, 1]."""
    captions: list[str]
    """One grammar caption per video (see ``captions.make_caption``)."""
    labels: dict[str, torch.Tensor]
    """``shape``/``color``/``size``/``motion``: LongTensor (B, MAX_OBJECTS), -1 where no object (caption order);
    ``background``/``count``: LongTensor (B,). On the batch's device."""
    object_mask: torch.Tensor | None = None
    """(B, 1, T, H, W) float32 in [0, 1]: per pixel, the largest anti-aliased coverage of any object (0 on pure
    background). Read by training's validation and direction-contrastive term and by the text probe (losses on
    object pixels); ``None`` only for hand-built batches."""


# --------------------------------------------------------------------------------------------- randomness


class _Draw:
    """All random draws of one batch, from one generator on its own device, returned on CPU."""

    def __init__(self, generator: torch.Generator):
        self.g = generator

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=self.g, device=self.g.device).cpu()

    def uniform(self, low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * self.rand(*shape)

    def randint(self, high: int, *shape: int) -> torch.Tensor:
        return torch.randint(high, shape, generator=self.g, device=self.g.device).cpu()


def _resolve_generator(generator: torch.Generator | None, seed: int | None) -> torch.Generator:
    if generator is not None and seed is not None:
        raise ValueError("pass either generator or seed, not both")
    if generator is not None:
        return generator
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    return torch.Generator().manual_seed(int(seed))


# ------------------------------------------------------------------------------------------------- labels


def sample_labels(
    batch_size: int, *, generator: torch.Generator | None = None, seed: int | None = None, split: str = "train"
) -> dict[str, torch.Tensor]:
    """Random scene labels (CPU tensors, layout of ``VideoBatch.labels``) for ``split`` (see :data:`SPLITS`)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {SPLITS}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    draw = _Draw(_resolve_generator(generator, seed))
    b, n = batch_size, MAX_OBJECTS
    sizes = {a: len(ATTRIBUTES[a]) for a in ATTRIBUTES}
    u = draw.rand(b)
    count = 1 + (u > COUNT_PROBS[0]).long() + (u > COUNT_PROBS[0] + COUNT_PROBS[1]).long()
    labels = {a: draw.randint(sizes[a], b, n) for a in OBJECT_ATTRIBUTES}
    labels["background"] = draw.randint(sizes["background"], b)
    table = heldout_table()
    fixed = torch.zeros(b, n, dtype=torch.bool)  # slots whose combination must not be resampled
    if split == "heldout":
        combos = table.nonzero()  # (K, 4): shape, color, motion, background
        pick = combos[draw.randint(combos.shape[0], b)]
        labels["shape"][:, 0], labels["color"][:, 0], labels["motion"][:, 0] = pick[:, 0], pick[:, 1], pick[:, 2]
        labels["background"] = pick[:, 3].clone()
        fixed[:, 0] = True
    # Rejection sampling of held-out combinations, vectorised; ~10 % are redrawn per round.
    for _ in range(200):
        bad = table[labels["shape"], labels["color"], labels["motion"], labels["background"][:, None]] & ~fixed
        if not bad.any():
            break
        for a in ("shape", "color", "motion"):
            labels[a] = torch.where(bad, draw.randint(sizes[a], b, n), labels[a])
    else:  # pragma: no cover - needs ~200 consecutive failures
        raise RuntimeError("could not sample training labels outside the held-out split")
    absent = torch.arange(n)[None, :] >= count[:, None]
    for a in OBJECT_ATTRIBUTES:
        labels[a] = labels[a].masked_fill(absent, -1)
    labels["count"] = count
    return labels


# ----------------------------------------------------------------------------------------------- geometry


def _fold(p: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Reflect a free path ``p`` into ``[lo, hi]`` (a ball bouncing between two walls)."""
    length = (hi - lo).clamp_min(1e-6)
    u = torch.remainder(p - lo, 2 * length)
    return lo + length - (u - length).abs()


_DIRECTION_VECTORS = torch.tensor(
    [[-1, 0], [1, 0], [0, -1], [0, 1], [-1, -1], [1, -1], [-1, 1], [1, 1]], dtype=torch.float32
)
_DIRECTION_VECTORS = _DIRECTION_VECTORS / _DIRECTION_VECTORS.norm(dim=1, keepdim=True)
_MOTION_BOUNCE = ATTRIBUTES["motion"].index("bouncing")
_MOTION_PULSE = ATTRIBUTES["motion"].index("pulsing")
_ROUND_SHAPES = tuple(ATTRIBUTES["shape"].index(s) for s in ("circle", "ring"))
assert DIRECTIONS == ATTRIBUTES["motion"][:8]


@dataclass
class _Geometry:
    cx: torch.Tensor  # (B, N, T) centre x, frame-side units
    cy: torch.Tensor  # (B, N, T)
    radius: torch.Tensor  # (B, N, T) radius including pulsing scale
    angle: torch.Tensor  # (B, N, T) rotation, radians
    rgb: torch.Tensor  # (B, N, 3) in [0, 1]


def _sample_geometry(labels: dict[str, torch.Tensor], frames: int, ext_x: float, ext_y: float, draw: _Draw) -> _Geometry:
    b, n = labels["shape"].shape
    t = torch.arange(frames, dtype=torch.float32)  # (T,)
    shape = labels["shape"].clamp_min(0)
    motion = labels["motion"].clamp_min(0)
    size = labels["size"].clamp_min(0)
    radius = torch.tensor(SIZE_RADIUS)[size] * draw.uniform(0.92, 1.08, b, n)

    pulsing = motion == _MOTION_PULSE
    bouncing = motion == _MOTION_BOUNCE
    straight = ~(pulsing | bouncing)
    # Margin from the walls: the shape's extent (<= 1.2 radii), more for the pulsing peak.
    extent = radius * torch.where(pulsing, 1.2 * 1.3, 1.2)
    lo_x, hi_x = extent, ext_x - extent
    lo_y, hi_y = extent, ext_y - extent
    span_x, span_y = hi_x - lo_x, hi_y - lo_y

    # Straight moves: pick a start so the whole path stays inside the walls.
    direction = _DIRECTION_VECTORS[motion.clamp_max(7)]  # (B, N, 2)
    speed = draw.uniform(*STRAIGHT_SPEED, b, n)
    travel = max(frames - 1, 1)
    dx, dy = direction[..., 0] * speed * travel, direction[..., 1] * speed * travel
    fit = torch.minimum(0.95 * span_x / dx.abs().clamp_min(1e-6), 0.95 * span_y / dy.abs().clamp_min(1e-6))
    shrink = fit.clamp(max=1.0)
    dx, dy, speed = dx * shrink, dy * shrink, speed * shrink
    sx0 = lo_x + (-dx).clamp_min(0) + draw.rand(b, n) * (span_x - dx.abs())
    sy0 = lo_y + (-dy).clamp_min(0) + draw.rand(b, n) * (span_y - dy.abs())
    svx, svy = direction[..., 0] * speed, direction[..., 1] * speed

    # Bouncing: a fast oblique move that hits a vertical wall within the first half of the clip.
    bspeed = draw.uniform(*BOUNCE_SPEED, b, n)
    bangle = draw.uniform(0.35, 1.22, b, n)
    sign_x = torch.where(draw.rand(b, n) < 0.5, -1.0, 1.0)
    sign_y = torch.where(draw.rand(b, n) < 0.5, -1.0, 1.0)
    bvx, bvy = sign_x * bspeed * torch.cos(bangle), sign_y * bspeed * torch.sin(bangle)
    t_hit = draw.uniform(1.0, max(1.5, (frames - 1) / 2), b, n)
    bx0 = torch.where(bvx > 0, hi_x - bvx * t_hit, lo_x - bvx * t_hit)
    bx0 = torch.maximum(torch.minimum(bx0, hi_x), lo_x)
    by0 = lo_y + draw.rand(b, n) * span_y

    # Pulsing: in place, radius x (1 +- 0.3) with a period of 6-10 frames.
    px0 = lo_x + draw.rand(b, n) * span_x
    py0 = lo_y + draw.rand(b, n) * span_y
    period = draw.uniform(6.0, 10.0, b, n)
    phase = draw.uniform(0.0, 2 * math.pi, b, n)

    x0 = torch.where(straight, sx0, torch.where(bouncing, bx0, px0))
    y0 = torch.where(straight, sy0, torch.where(bouncing, by0, py0))
    vx = torch.where(straight, svx, torch.where(bouncing, bvx, 0.0))
    vy = torch.where(straight, svy, torch.where(bouncing, bvy, 0.0))
    cx = _fold(x0[..., None] + vx[..., None] * t, lo_x[..., None], hi_x[..., None])
    cy = _fold(y0[..., None] + vy[..., None] * t, lo_y[..., None], hi_y[..., None])
    scale = 1.0 + 0.3 * torch.sin(2 * math.pi * t / period[..., None] + phase[..., None])
    scale = torch.where(pulsing[..., None], scale, torch.ones_like(scale))

    # Half of the non-round objects rotate; the others keep the upright pose.
    round_shape = torch.zeros_like(shape, dtype=torch.bool)
    for s in _ROUND_SHAPES:
        round_shape |= shape == s
    rotating = (draw.rand(b, n) < 0.5) & ~round_shape
    omega = draw.uniform(0.05, 0.14, b, n) * torch.where(draw.rand(b, n) < 0.5, -1.0, 1.0)
    theta0 = draw.uniform(0.0, 2 * math.pi, b, n)
    angle = torch.where(rotating[..., None], theta0[..., None] + omega[..., None] * t, torch.zeros_like(cx))

    color = torch.tensor([COLOR_RGB[c] for c in ATTRIBUTES["color"]])[labels["color"].clamp_min(0)]
    rgb = (color + draw.uniform(-0.04, 0.04, b, n, 3)).clamp(0.0, 1.0)
    return _Geometry(cx=cx, cy=cy, radius=radius[..., None] * scale, angle=angle, rgb=rgb)


PLACEMENT_CANDIDATES: int = 4
"""Candidate paths drawn per object; each later object keeps the one farthest from the earlier objects."""


def _place_objects(
    labels: dict[str, torch.Tensor], frames: int, ext_x: float, ext_y: float, draw: _Draw
) -> _Geometry:
    """Geometry of every object, limiting overlaps: object ``j`` takes, among ``PLACEMENT_CANDIDATES`` random
    paths, the one whose smallest gap (centre distance minus radii, over the clip) to objects ``< j`` is largest."""
    cands = [_sample_geometry(labels, frames, ext_x, ext_y, draw) for _ in range(PLACEMENT_CANDIDATES)]
    stack = {f: torch.stack([getattr(c, f) for c in cands], dim=1) for f in ("cx", "cy", "radius", "angle", "rgb")}
    b, n = labels["shape"].shape
    chosen = torch.zeros(b, n, dtype=torch.long)
    rows = torch.arange(b)
    for j in range(1, n):
        gap = torch.full((b, PLACEMENT_CANDIDATES), float("inf"))
        for i in range(j):
            ci = chosen[:, i]
            cx_i = stack["cx"][rows, ci, i][:, None]  # (B, 1, T)
            cy_i = stack["cy"][rows, ci, i][:, None]
            r_i = stack["radius"][rows, ci, i][:, None]
            dist = torch.sqrt((stack["cx"][:, :, j] - cx_i) ** 2 + (stack["cy"][:, :, j] - cy_i) ** 2)
            gap = torch.minimum(gap, (dist - stack["radius"][:, :, j] - r_i).amin(dim=-1))
        chosen[:, j] = gap.argmax(dim=1)
    pick = {f: v[rows[:, None], chosen, torch.arange(n)[None, :]] for f, v in stack.items()}
    return _Geometry(**pick)


# ------------------------------------------------------------------------------------------ shape SDFs


def _length(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(x * x + y * y)


def _sd_box(x: torch.Tensor, y: torch.Tensor, hx: float, hy: float) -> torch.Tensor:
    qx, qy = x.abs() - hx, y.abs() - hy
    return _length(qx.clamp_min(0), qy.clamp_min(0)) + torch.maximum(qx, qy).clamp_max(0)


def _sd_star(x: torch.Tensor, y: torch.Tensor, r: float, n: int, m: float) -> torch.Tensor:
    """Regular star with ``n`` points (``m = 2``: regular polygon), a vertex pointing up (+y); after I. Quilez."""
    an, en = math.pi / n, math.pi / m
    acx, acy = math.cos(an), math.sin(an)
    ecx, ecy = math.cos(en), math.sin(en)
    x = x.abs()
    bn = torch.remainder(torch.atan2(x, y), 2 * an) - an
    length = _length(x, y)
    px, py = length * torch.cos(bn) - r * acx, length * torch.sin(bn).abs() - r * acy
    h = (-(px * ecx + py * ecy)).clamp(0.0, r * acy / ecy)
    px, py = px + ecx * h, py + ecy * h
    return _length(px, py) * torch.sign(px)


def _sd_heart(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Heart with its tip at the origin and its top near y = 1 (+y up); after I. Quilez."""
    x = x.abs()
    upper = _length(x - 0.25, y - 0.75) - math.sqrt(2.0) / 4.0
    m = 0.5 * (x + y).clamp_min(0.0)
    lower = torch.sqrt(torch.minimum((x * x + (y - 1.0) ** 2), (x - m) ** 2 + (y - m) ** 2)) * torch.sign(x - y)
    return torch.where(x + y > 1.0, upper, lower)


def _shape_sdf(kind: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Signed distance (in radii, negative inside) of a unit-radius shape; ``y`` points up."""
    if kind == "circle":
        return _length(x, y) - 1.0
    if kind == "square":
        return _sd_box(x, y, 0.82, 0.82)
    if kind == "triangle":
        return _sd_star(x, y + 0.2, 1.2, 3, 2.0)
    if kind == "star":
        return _sd_star(x, y, 1.2, 5, 3.0)
    if kind == "ring":
        return (_length(x, y) - 0.72).abs() - 0.28
    if kind == "cross":
        return torch.minimum(_sd_box(x, y, 1.0, 0.3), _sd_box(x, y, 0.3, 1.0))
    if kind == "heart":
        k = 1.75
        return _sd_heart(x / k, y / k + 0.55) * k
    if kind == "moon":
        return torch.maximum(_length(x, y) - 1.0, -(_length(x - 0.55, y - 0.2) - 0.85))
    raise ValueError(f"unknown shape {kind!r}; allowed: {ATTRIBUTES['shape']}")


def _coverage(d_px: torch.Tensor) -> torch.Tensor:
    """Anti-aliased coverage: a smooth step over the 1 px band around the edge."""
    a = (0.5 - d_px).clamp(0.0, 1.0)
    return a * a * (3.0 - 2.0 * a)


# ------------------------------------------------------------------------------------------ backgrounds


def _sample_background(labels: dict[str, torch.Tensor], draw: _Draw) -> dict[str, torch.Tensor]:
    b = labels["background"].shape[0]
    gray = draw.uniform(0.05, 0.26, b, 1)
    base = (gray + 0.07 * (draw.rand(b, 3) - 0.5)).clamp(0.0, 1.0)
    contrast = draw.uniform(0.10, 0.20, b, 1)
    gradient = labels["background"] == ATTRIBUTES["background"].index("gradient")
    contrast = torch.where(gradient[:, None], contrast * 1.4, contrast)
    second = (base + contrast * (1.0 + 0.5 * (draw.rand(b, 3) - 0.5))).clamp(0.0, 1.0)
    pan_speed = draw.uniform(0.0, PAN_SPEED_MAX, b) * (draw.rand(b) > 0.3).float()
    pan_angle = draw.uniform(0.0, 2 * math.pi, b)
    return {
        "base": base,
        "second": second,
        "pan_x": pan_speed * torch.cos(pan_angle),
        "pan_y": pan_speed * torch.sin(pan_angle),
        "angle": draw.uniform(0.0, math.pi, b),
        "period": draw.rand(b),  # mapped to a per-kind range in _texture
        "phase": draw.uniform(0.0, 2 * math.pi, b),
        "wave_freq": draw.uniform(1.0, 3.5, b, 6),
        "wave_angle": draw.uniform(0.0, 2 * math.pi, b, 6),
        "wave_phase": draw.uniform(0.0, 2 * math.pi, b, 6),
        "wave_amp": draw.uniform(0.5, 1.0, b, 6),
    }


def _texture(kind: str, x: torch.Tensor, y: torch.Tensor, p: dict[str, torch.Tensor], px: float) -> torch.Tensor:
    """Blend weight in [0, 1] between the two background colours; ``x``, ``y`` (n, T, H, W) already panned.

    ``px`` is one pixel in frame-side units, for ~1 px anti-aliased pattern edges.
    """
    def col(v: torch.Tensor) -> torch.Tensor:
        return v[:, None, None, None]

    ca, sa = torch.cos(col(p["angle"])), torch.sin(col(p["angle"]))
    u, v = x * ca + y * sa, -x * sa + y * ca
    if kind == "plain":
        return torch.zeros_like(x)
    if kind in ("striped", "checkered"):
        period = col(0.08 + 0.08 * p["period"])
        s = torch.sin(2 * math.pi * u / period)
        if kind == "checkered":
            s = s * torch.sin(2 * math.pi * v / period)
        # Slope of s at a zero crossing is 2*pi/period per frame side: edges ~1.5 px wide.
        return (0.5 + s * period / (2 * math.pi * 1.5 * px)).clamp(0.0, 1.0)
    if kind == "gradient":
        period = col(1.2 + 1.3 * p["period"])
        return 0.5 + 0.5 * torch.sin(2 * math.pi * u / period + col(p["phase"]))
    if kind == "cloudy":
        total = torch.zeros_like(x)
        for k in range(p["wave_freq"].shape[1]):
            f, a = col(p["wave_freq"][:, k]), col(p["wave_angle"][:, k])
            total = total + col(p["wave_amp"][:, k]) * torch.sin(
                2 * math.pi * f * (x * torch.cos(a) + y * torch.sin(a)) + col(p["wave_phase"][:, k])
            )
        norm = col(p["wave_amp"].sum(dim=1))
        return (0.5 + 1.2 * total / norm).clamp(0.0, 1.0)
    if kind == "dotted":
        period = col(0.10 + 0.08 * p["period"])
        qu = torch.remainder(u / period, 1.0) - 0.5
        qv = torch.remainder(v / period, 1.0) - 0.5
        d = _length(qu, qv) * period - 0.25 * period
        return (0.5 - d / px).clamp(0.0, 1.0)
    raise ValueError(f"unknown background {kind!r}; allowed: {ATTRIBUTES['background']}")


# ---------------------------------------------------------------------------------------------- render


def _check_size(frames: int, height: int, width: int) -> None:
    for name, value, low in (("frames", frames, 1), ("height", height, 8), ("width", width, 8)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def render_from_labels(
    labels: dict[str, torch.Tensor],
    frames: int,
    height: int,
    width: int,
    *,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    device: str | torch.device = "cpu",
    return_mask: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Render scenes with the given labels (layout of ``VideoBatch.labels``); positions, speeds, textures and
    colour shades are drawn from ``generator``/``seed``. Returns (B, 3, T, H, W) float32 in [-1, 1], and with
    ``return_mask`` also the objects' coverage (B, 1, T, H, W) in [0, 1] (see ``VideoBatch.object_mask``)."""
    _check_size(frames, height, width)
    draw = _Draw(_resolve_generator(generator, seed))
    labels = {k: v.detach().cpu().long() for k, v in labels.items()}
    side = min(height, width)
    geo = _place_objects(labels, frames, width / side, height / side, draw)
    bg = _sample_background(labels, draw)
    device = torch.device(device)
    b, n = labels["shape"].shape

    xs = ((torch.arange(width, device=device, dtype=torch.float32) + 0.5) / side).view(1, 1, 1, width)
    ys = ((torch.arange(height, device=device, dtype=torch.float32) + 0.5) / side).view(1, 1, height, 1)
    ts = torch.arange(frames, device=device, dtype=torch.float32).view(1, frames, 1, 1)
    px = 1.0 / side

    # Background: two colours blended by a per-kind texture that pans with the frame index.
    weight = torch.zeros(b, frames, height, width, device=device)
    for k, kind in enumerate(ATTRIBUTES["background"]):
        idx = (labels["background"] == k).nonzero().flatten()
        if idx.numel() == 0:
            continue
        p = {key: val[idx].to(device) for key, val in bg.items()}
        x = xs - p["pan_x"].view(-1, 1, 1, 1) * ts
        y = ys - p["pan_y"].view(-1, 1, 1, 1) * ts
        weight[idx.to(device)] = _texture(kind, x, y, p, px)
    base = bg["base"].to(device).view(b, 3, 1, 1, 1)
    second = bg["second"].to(device).view(b, 3, 1, 1, 1)
    video = base + weight[:, None] * (second - base)

    # Objects, last first so the first-mentioned one is on top.
    coverage = torch.zeros(b, frames, height, width, device=device) if return_mask else None
    for j in reversed(range(n)):
        alpha = torch.zeros(b, frames, height, width, device=device)
        for k, kind in enumerate(ATTRIBUTES["shape"]):
            idx = (labels["shape"][:, j] == k).nonzero().flatten()
            if idx.numel() == 0:
                continue
            cx = geo.cx[idx, j].to(device)[..., None, None]  # (m, T, 1, 1)
            cy = geo.cy[idx, j].to(device)[..., None, None]
            r = geo.radius[idx, j].to(device)[..., None, None]
            c, s = torch.cos(geo.angle[idx, j]).to(device), torch.sin(geo.angle[idx, j]).to(device)
            c, s = c[..., None, None], s[..., None, None]
            dx, dy = xs - cx, ys - cy
            # Local frame in radii, y up (image rows grow downwards).
            lx = (dx * c + dy * s) / r
            ly = -(-dx * s + dy * c) / r
            d_px = _shape_sdf(kind, lx, ly) * r / px
            alpha[idx.to(device)] = _coverage(d_px)
        rgb = geo.rgb[:, j].to(device).view(b, 3, 1, 1, 1)
        video = video + alpha[:, None] * (rgb - video)
        if coverage is not None:
            coverage = torch.maximum(coverage, alpha)
    video = (video * 2.0 - 1.0).clamp(-1.0, 1.0)
    return (video, coverage[:, None]) if coverage is not None else video


def make_batch(
    batch_size: int,
    frames: int,
    height: int,
    width: int,
    *,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    split: str = "train",
    device: str | torch.device = "cpu",
) -> VideoBatch:
    """A batch of random captioned videos from ``split`` (``"train"`` or ``"heldout"``).

    Deterministic for a given ``seed`` (or generator state): labels and all scene parameters are drawn from
    the generator on its own device, then rendered on ``device``. Pass at most one of ``generator`` and
    ``seed``; with neither, the scenes are random.
    """
    _check_size(frames, height, width)
    g = _resolve_generator(generator, seed)
    labels = sample_labels(batch_size, generator=g, split=split)
    video, mask = render_from_labels(labels, frames, height, width, generator=g, device=device, return_mask=True)
    captions = [make_caption(s) for s in scenes_from_labels(labels)]
    device = torch.device(device)
    return VideoBatch(video=video, captions=captions, labels={k: v.to(device) for k, v in labels.items()},
                      object_mask=mask)
