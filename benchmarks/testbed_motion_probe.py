"""Does the testbed DiT move an object the way its caption says? A small CPU probe.

    python benchmarks/testbed_motion_probe.py [--weights FOLDER] [--seeds 8]   # writes testbed_motion_probe.json

One large red square on a plain background, "moving right/left/up/down", each from the same initial noise
(one generator per caption, same seed; ``--seeds`` seeds 0, 1, ...); the centroid of the red pixels in every frame (x to the right, y down,
pixels), the net displacement from the first to the last frame where the square is visible, and the
displacement along the prompted direction frame by frame. Real straight moves cover at most 0.038 frame sides
per frame (`data.STRAIGHT_SPEED`); a step of more than three times that between consecutive frames is counted
as a jump (a teleport or a split blob). The summary: the share of (seed, direction) videos whose net displacement
points along the prompt (a DiT that ignores the direction word moves the four captions of a seed alike, so about
half of them; one that follows it, all), the mean net displacement along the prompt and the mean jumps.
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


def track_row(name: str, direction: tuple[int, int], video: np.ndarray, size: int) -> dict:
    """The red square's track in one video and its displacement along the prompted ``direction``."""
    ex, ey = direction
    track = red_centroids(video)
    seen = [c for c in track if c is not None]
    dx, dy = (seen[-1][0] - seen[0][0], seen[-1][1] - seen[0][1]) if len(seen) > 1 else (0.0, 0.0)
    jump_px = 3 * STRAIGHT_SPEED[1] * size
    steps = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(track, track[1:]) if a and b]
    jumps = sum(1 for sx, sy in steps if np.hypot(sx, sy) > jump_px)
    along = [round(sx * ex + sy * ey, 1) for sx, sy in steps]
    return {"caption": f"moving {name}", "net_dx": round(dx, 1), "net_dy": round(dy, 1),
            "along_prompt_px": round(dx * ex + dy * ey, 1), "jumps": jumps, "jump_threshold_px": round(jump_px, 1),
            "along_prompt_per_frame_px": along, "frames_visible": len(seen),
            "track": [None if c is None else [round(c[0], 1), round(c[1], 1)] for c in track]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "testbed_motion_probe.json")
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0 .. N-1 (from --seed on)")
    parser.add_argument("--weights", type=Path, default=None,
                        help="a pipeline folder saved by save_pretrained (default: the shipped weights)")
    args = parser.parse_args()
    pipe = load_testbed_pipeline(device="cpu", folder=args.weights)
    captions = [f"a large red square moving {d} on a plain background" for d in DIRECTIONS]
    rows = []
    for seed in range(args.seed, args.seed + args.seeds):
        videos = pipe(captions, num_frames=args.frames, height=args.size, width=args.size,
                      num_inference_steps=args.steps, generator=[torch.Generator().manual_seed(seed) for _ in captions],
                      output_type="np").frames
        for (name, (ex, ey)), video in zip(DIRECTIONS.items(), videos):
            rows.append(track_row(name, (ex, ey), video, args.size) | {"seed": seed})
            r = rows[-1]
            print(seed, r["caption"], "net", r["net_dx"], r["net_dy"], "jumps", r["jumps"], flush=True)
    followed = [r["along_prompt_px"] > 0 for r in rows if r["frames_visible"] > 1]
    summary = {"videos": len(rows), "tracked": len(followed),
               "share_along_prompt": round(sum(followed) / max(len(followed), 1), 3),
               "mean_along_prompt_px": round(float(np.mean([r["along_prompt_px"] for r in rows])), 2),
               "mean_jumps": round(float(np.mean([r["jumps"] for r in rows])), 2)}
    print("summary", summary)
    args.out.write_text(json.dumps({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": "cpu",
                                    "torch": torch.__version__,
                                    "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                                    "summary": summary, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
