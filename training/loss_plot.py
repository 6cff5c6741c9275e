"""Draw the testbed DiT's loss curve from the committed training log (no matplotlib needed).

    python training/loss_plot.py   # reads training/results/loss_log.jsonl, writes training/results/loss.png

Grey: training loss per log line (25 steps, mixed sizes, so noisy); blue: its moving mean over 20 lines;
red dots: the validation loss at the end of each training call (held-out captions at 256x256x16, fixed noise). Log scale.
Dashed lines: where a training call changed the sigma distribution (`high_sigma_share` of the `dit_session` lines, 0 when
absent): the training loss averages over other noise levels from there on, so its level is not comparable
across such a line; the validation loss is (same batch, same sigmas).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from PIL import Image, ImageDraw

RESULTS = Path(__file__).resolve().parent / "results"


def read_log(path: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, training loss) of the DiT log lines, (end step, validation loss) of the `dit_session` lines, and
    (first step, new share) of each call whose `high_sigma_share` differs from the call before it."""
    train, val, changes = [], [], []
    share = 0.0
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row.get("stage") == "dit":
            train.append((int(row["step"]), float(row["loss"])))
        elif row.get("stage") == "dit_session":
            val.append((int(row["end_step"]), float(row["val_loss"])))
            new = float(row.get("high_sigma_share", 0.0))
            if new != share:
                changes.append((int(row["end_step"]) - int(row["steps"]), new))
                share = new
    train.sort()
    return train, val, changes


def draw(train: list[tuple[int, float]], val: list[tuple[int, float]], out: Path,
         changes: tuple[tuple[int, float], ...] = (), size: tuple[int, int] = (900, 500)) -> None:
    """Write the PNG: steps on x, log10 loss on y, a dashed line at each recipe change."""
    w, h = size
    left, right, top, bottom = 70, 20, 30, 50
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    max_step = max(s for s, _ in train + val)
    losses = [v for _, v in train + val]
    lo, hi = math.log10(min(losses)) - 0.05, math.log10(max(losses)) + 0.05

    def xy(step: float, loss: float) -> tuple[float, float]:
        x = left + (w - left - right) * step / max_step
        y = top + (h - top - bottom) * (hi - math.log10(loss)) / (hi - lo)
        return x, y

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for exp in range(math.floor(lo), math.ceil(hi) + 1):
        for mant in (1, 2, 5):
            v = mant * 10.0 ** exp
            if lo <= math.log10(v) <= hi:
                _, y = xy(0, v)
                d.line([left, y, w - right, y], fill=(225, 225, 225))
                d.text((5, y - 6), f"{v:g}", fill="black")
    for k in range(0, max_step + 1, 2000):
        x, _ = xy(k, 10 ** lo)
        d.text((x - 12, h - bottom + 5), str(k), fill="black")
    d.text((w // 2 - 20, h - 20), "step", fill="black")
    d.text((left, 8), "testbed DiT: training loss (grey, blue = moving mean) and validation loss (red)", fill="black")
    d.line([xy(s, v) for s, v in train], fill=(170, 170, 170), width=1)
    window = 20
    smooth = [(train[i][0], sum(v for _, v in train[max(0, i - window + 1): i + 1]) / len(train[max(0, i - window + 1): i + 1]))
              for i in range(len(train))]
    d.line([xy(s, v) for s, v in smooth], fill=(30, 90, 200), width=2)
    for i, (step, share) in enumerate(changes):
        x, _ = xy(step, 10 ** hi)
        for y0 in range(top, h - bottom, 8):
            d.line([x, y0, x, min(y0 + 4, h - bottom)], fill=(120, 120, 120))
        d.text((x + 4, top + 4 + 14 * i), f"high-noise share {share:g}", fill=(90, 90, 90))
    for s, v in val:
        x, y = xy(s, v)
        d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(210, 40, 40))
        d.text((x - 20, y + 6), f"{v:.4f}", fill=(210, 40, 40))
    img.save(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log", type=Path, default=RESULTS / "loss_log.jsonl", help="training log (JSONL)")
    parser.add_argument("--out", type=Path, default=RESULTS / "loss.png", help="PNG to write")
    args = parser.parse_args()
    train, val, changes = read_log(args.log)
    if not train:
        raise SystemExit(f"no DiT training lines in {args.log}")
    draw(train, val, args.out, tuple(changes))
    print(f"wrote {args.out} ({len(train)} training lines, {len(val)} validation points)")


if __name__ == "__main__":
    main()
