"""Which caption words does the testbed DiT use? Denoising loss with the true caption vs edited captions.

    python training/text_probe.py   # CPU, a few minutes; writes training/results/text_probe.json

Held-out real videos (the generator's, with their captions) are noised at fixed sigmas with fixed noise, and
the rectified-flow loss of the shipped DiT is measured with: the true caption; every direction word reversed
(left <-> right, up <-> down, up-left <-> down-right, ...); every colour word replaced by the next colour;
every shape word replaced by the next shape; the empty caption. A word the model relies on raises the loss
when it is edited; a word it ignores leaves the loss where it is. Each loss is also read on object pixels alone
(latent pixels an object touches, `train.object_weight`), with the objects' share of the whole loss: where the
direction words could matter, and whether the background drowns the objects out.

    python training/text_probe.py --sigmas 0.3 0.5 0.7 0.9 0.95 0.98   # the committed result's sigmas
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit_accel.testbed import WEIGHTS_DIR, captions, data, load_testbed_pipeline  # noqa: E402
from training.trainer import (  # noqa: E402
    encode_videos,
    object_weight,
    read_training_info,
    velocity_error,
    weighted_mean,
)


def shifted(words: tuple[str, ...]) -> dict[str, str]:
    """Each word mapped to the next one of its attribute's vocabulary."""
    return {w: words[(i + 1) % len(words)] for i, w in enumerate(words)}


def edit(caption: str, mapping: dict[str, str]) -> str:
    """The caption with every word found in ``mapping`` replaced."""
    return " ".join(mapping.get(w, w) for w in caption.split())


def pipe_step(folder: Path | None = None) -> int | None:
    """DiT training step of the weights in ``folder`` (default: the shipped ones; from training_info.json)."""
    return read_training_info(folder or WEIGHTS_DIR).get("dit", {}).get("step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--seed", type=int, default=4242)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "text_probe.json")
    parser.add_argument("--weights", type=Path, default=None,
                        help="a pipeline folder saved by save_pretrained (default: the shipped weights)")
    args = parser.parse_args()
    pipe = load_testbed_pipeline(device="cpu", folder=args.weights)
    batch = data.make_batch(args.videos, args.frames, args.size, args.size, seed=args.seed, split="heldout")
    latents = encode_videos(pipe.vae, batch.video, torch.device("cpu"))
    variants = {
        "true": batch.captions,
        "directions_reversed": [captions.reverse_directions(c) for c in batch.captions],
        "colours_shifted": [edit(c, shifted(captions.ATTRIBUTES["color"])) for c in batch.captions],
        "shapes_shifted": [edit(c, shifted(captions.ATTRIBUTES["shape"])) for c in batch.captions],
        "empty": [""] * len(batch.captions),
    }
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(latents.shape, generator=g)
    weight = object_weight(batch.object_mask, batch.video.shape[-1] // latents.shape[-1])
    rows: dict[str, dict[str, float]] = {name: {} for name in variants}
    objects: dict[str, dict[str, float]] = {name: {} for name in variants}
    with torch.no_grad():
        for sigma in args.sigmas:
            sig = torch.full((latents.shape[0],), sigma)
            for name, caps in variants.items():
                err = velocity_error(pipe, latents, caps, sig, noise)
                rows[name][str(sigma)] = round(weighted_mean(err).item(), 5)
                objects[name][str(sigma)] = round(weighted_mean(err, weight).item(), 5)
            print(sigma, {n: (rows[n][str(sigma)], objects[n][str(sigma)]) for n in variants}, flush=True)

    def increase(table: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        return {name: {s: round(v / table["true"][s] - 1.0, 4) for s, v in r.items()} for name, r in table.items()}

    # Objects' share of the whole loss (true captions): object-pixel mean x object-pixel count / total.
    object_fraction = weight.mean().item()
    share = {s: round(objects["true"][s] * object_fraction / rows["true"][s], 4) for s in rows["true"]}
    args.out.write_text(json.dumps({
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": "cpu", "torch": torch.__version__,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "weights_step": pipe_step(args.weights), "captions": variants, "loss": rows, "loss_increase_vs_true": increase(rows),
        "object_pixel_fraction": round(object_fraction, 4), "object_loss": objects,
        "object_loss_increase_vs_true": increase(objects), "object_share_of_loss": share}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
