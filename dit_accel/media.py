"""Frames to files: the mp4/png writer of ``dit-accel generate``, the labelled side-by-side of
``--compare``, and the PSNR it prints.

Frames are float arrays ``(T, H, W, 3)`` in ``[0, 1]``, as diffusers pipelines return them with
``output_type="np"``. numpy, Pillow and imageio are imported inside the functions.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

logger = logging.getLogger("dit_accel")

SEPARATOR_PX = 2
"""Width of the white bar between the panels of a side-by-side."""


def write_media(frames: Any, path: Path, fps: int) -> Path:
    """Write frames (T, H, W, 3) in [0, 1] to ``path`` (.mp4 or .png) atomically; return the written path.

    If encoding fails, the frames are kept as ``.npy`` beside ``path`` and the error is re-raised, so a
    finished generation is never lost. A ``.png`` takes one frame only (ValueError otherwise).
    """
    import imageio.v2 as imageio
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    uint8 = (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        if path.suffix.lower() == ".png":
            if uint8.shape[0] != 1:
                raise ValueError(f"a .png output holds one image; this model made {uint8.shape[0]} frames: use .mp4")
            imageio.imwrite(tmp_name, uint8[0], format="png")
        else:
            # macro_block_size=1 keeps the exact size (the testbed's 128 px frames are fine either way).
            with imageio.get_writer(tmp_name, format="FFMPEG", fps=fps, codec="libx264", quality=8, macro_block_size=1) as w:
                for frame in uint8:
                    w.append_data(frame)
        # mkstemp creates the file 0600; give the output the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_name, 0o666 & ~umask)
        os.replace(tmp_name, path)
    except Exception:
        Path(tmp_name).unlink(missing_ok=True)
        rescue = path.with_suffix(".frames.npy")
        np.save(rescue, uint8)
        logger.error("could not write %s; the frames are saved in %s", path, rescue)
        raise
    return path


def psnr_db(reference: Any, other: Any) -> float:
    """PSNR in dB of ``other`` against ``reference`` over the whole video (data range 1); ``inf`` when equal."""
    import numpy as np

    ref = np.asarray(reference, dtype=np.float64)
    out = np.asarray(other, dtype=np.float64)
    if ref.shape != out.shape:
        raise ValueError(f"PSNR needs frames of one shape, got {ref.shape} and {out.shape}")
    mse = float(np.mean((ref - out) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(1.0 / mse)


def _label_strip(width: int, lines: Sequence[str], line_px: int) -> Any:
    """A black strip ``(len(lines) * line_px, width, 3)`` float32 with white text, cut to fit the width."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (width, line_px * len(lines)), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    try:
        font: Any = ImageFont.load_default(size=max(line_px - 3, 6))
    except TypeError:  # Pillow < 10.1: one bitmap size
        font = ImageFont.load_default()
    for i, line in enumerate(lines):
        text = line
        while text and draw.textlength(text, font=font) > width - 4:
            text = text[:-1]
        draw.text((2, i * line_px + 1), text, fill=(255, 255, 255), font=font)
    return np.asarray(image, dtype=np.float32) / 255.0


def side_by_side(left: Any, right: Any, left_label: Sequence[str], right_label: Sequence[str]) -> Any:
    """Two videos (T, H, W, 3) of one shape as one (T, H', 2W + 2, 3) video, each panel under its label lines.

    The result has even height and width (H.264 in yuv420p needs both even).
    """
    import numpy as np

    left = np.asarray(left, dtype=np.float32)
    right = np.asarray(right, dtype=np.float32)
    if left.shape != right.shape or left.ndim != 4:
        raise ValueError(f"side_by_side needs two (T, H, W, 3) videos of one shape, got {left.shape} and {right.shape}")
    frames, height, width, _ = left.shape
    line_px = max(12, width // 10)
    rows = max(len(left_label), len(right_label))
    panels = []
    for video, label in ((left, left_label), (right, right_label)):
        strip = _label_strip(width, list(label) + [""] * (rows - len(label)), line_px)
        panels.append(np.concatenate([np.broadcast_to(strip, (frames, *strip.shape)), video], axis=1))
    bar = np.ones((frames, panels[0].shape[1], SEPARATOR_PX, 3), dtype=np.float32)
    out = np.concatenate([panels[0], bar, panels[1]], axis=2)
    pad_h, pad_w = out.shape[1] % 2, out.shape[2] % 2
    if pad_h or pad_w:
        out = np.pad(out, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    return out
