"""How much does the flow-matching loss reward knowing an object's direction? A property of the data alone.

    python training/direction_value.py   # CPU, seconds; writes training/results/direction_value.json

At sigma -> 1 the best possible prediction of the clean video is its mean given the caption, E[x0 | caption].
For one object on a plain background, this script estimates by Monte Carlo the mean video of "moving left"
and of "moving right" (same shape, colour, size), then the mean squared error of fresh "left" videos against
the "left" mean (direction known) and against the "right" mean (direction wrong). The relative gap is what the
loss pays, in the prior-only limit, for ignoring the direction word: small where objects are small, because
a small object's mean track is a faint smear whichever way it goes. Over the whole frame and on object
pixels alone; per object size.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit_accel.testbed import data  # noqa: E402
from dit_accel.testbed.captions import caption_labels  # noqa: E402


def render(caption: str, n: int, frames: int, side: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` videos of one caption (positions, speeds, shades random) and their object coverage."""
    return data.render_from_labels(caption_labels([caption] * n), frames, side, side, seed=seed, return_mask=True)


def direction_gap(size: str, n: int, frames: int, side: int) -> dict[str, float]:
    """MSE of held-out "left" videos against the "left" and the "right" mean videos (whole frame, objects)."""
    left = f"a {size} red square moving left on a plain background".replace("a medium ", "a ")
    right = left.replace("left", "right")
    vl, _ = render(left, n, frames, side, seed=1)
    vr, _ = render(right, n, frames, side, seed=2)
    test, mask = render(left, n, frames, side, seed=3)
    mean_l, mean_r = vl.mean(0), vr.mean(0)
    err_l, err_r = (test - mean_l) ** 2, (test - mean_r) ** 2
    m = mask.expand_as(test)
    out = {"mse_known": err_l.mean().item(), "mse_reversed": err_r.mean().item(),
           "object_mse_known": ((err_l * m).sum() / m.sum()).item(),
           "object_mse_reversed": ((err_r * m).sum() / m.sum()).item()}
    out["increase"] = out["mse_reversed"] / out["mse_known"] - 1.0
    out["object_increase"] = out["object_mse_reversed"] / out["object_mse_known"] - 1.0
    return {k: round(v, 5) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=400, help="videos per mean and for the test set")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--side", type=int, default=64, help="pixels (geometry is in frame units, so size-free)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "direction_value.json")
    args = parser.parse_args()
    rows = {size: direction_gap(size, args.videos, args.frames, args.side) for size in ("small", "medium", "large")}
    for size, row in rows.items():
        print(size, row, flush=True)
    args.out.write_text(json.dumps({
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": "cpu", "torch": torch.__version__,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "what": "prior-only (sigma -> 1) MSE of 'moving left' videos against the mean 'left' and the mean 'right' video",
        "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
