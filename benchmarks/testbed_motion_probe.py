"""Does the testbed DiT move an object the way its caption says? A small CPU probe.

    python benchmarks/testbed_motion_probe.py   # writes benchmarks/results/testbed_motion_probe.json

One large red square on a plain background, "moving right/left/up/down", each from the same initial noise
(one generator per caption, same seed); the centroid of the red pixels in every frame (x to the right, y down,
pixels), the net displacement from the first to the last frame where the square is visible, and the
displacement along the prompted direction frame by frame. Real straight moves cover at most 0.038 frame sides
per frame (`data.STRAIGHT_SPEED`); a step of more than three times that between consecutive frames is counted
as a jump (a teleport or a split blob).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit_accel.testbed import load_testbed_pipeline  # noqa: E402
from dit_accel.testbed.data import STRAIGHT_SPEED  # noqa: E402

DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "up": (0, -1), "down": (0, 1)}


def red_centroids(video: np.ndarray) -> list[tuple[float, float] | None]:
    """Centroid of strongly red pixels per frame of a (T, H, W, 3) video in [0, 1] (None: no red pixel)."""
    red = (video[..., 0] > 0.6) & (video[..., 1] < 0.35) & (video[..., 2] < 0.35)
    out: list[tuple[float, float] | None] = []
    for t in range(video.shape[0]):
        ys, xs = np.nonzero(red[t])
        out.append((float(xs.mean()), float(ys.mean())) if len(xs) else None)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "testbed_motion_probe.json")
    args = parser.parse_args()
    pipe = load_testbed_pipeline(device="cpu")
    captions = [f"a large red square moving {d} on a plain background" for d in DIRECTIONS]
    videos = pipe(captions, num_frames=args.frames, height=args.size, width=args.size, num_inference_steps=args.steps,
                  generator=[torch.Generator().manual_seed(args.seed) for _ in captions], output_type="np").frames
    rows = []
    for (name, (ex, ey)), video in zip(DIRECTIONS.items(), videos):
        track = red_centroids(video)
        seen = [c for c in track if c is not None]
        dx, dy = (seen[-1][0] - seen[0][0], seen[-1][1] - seen[0][1]) if len(seen) > 1 else (0.0, 0.0)
        jump_px = 3 * STRAIGHT_SPEED[1] * args.size
        steps = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(track, track[1:]) if a and b]
        jumps = sum(1 for sx, sy in steps if np.hypot(sx, sy) > jump_px)
        along = [round(sx * ex + sy * ey, 1) for sx, sy in steps]
        rows.append({"caption": f"moving {name}", "net_dx": round(dx, 1), "net_dy": round(dy, 1),
                     "along_prompt_px": round(dx * ex + dy * ey, 1), "jumps": jumps, "jump_threshold_px": round(jump_px, 1),
                     "along_prompt_per_frame_px": along,
                     "frames_visible": len(seen), "track": [None if c is None else [round(c[0], 1), round(c[1], 1)] for c in track]})
        print(rows[-1]["caption"], "net", rows[-1]["net_dx"], rows[-1]["net_dy"], "jumps", jumps, "along per frame", along, flush=True)
    args.out.write_text(json.dumps({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": "cpu",
                                    "torch": torch.__version__, "settings": vars(args) | {"out": str(args.out)},
                                    "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
