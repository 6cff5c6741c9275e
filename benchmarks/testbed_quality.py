"""Quality of the trained testbed: attribute accuracy of dense generations from held-out captions.

    python benchmarks/testbed_quality.py --out benchmarks/results            # on a GPU
    python benchmarks/testbed_quality.py --sections cpu_time --device cpu    # CPU generation time

Sections (--sections, comma-separated):
    eval       >= 64 held-out captions generated at the evaluation size 256x256 px x 16 frames (16,384 tokens);
               the shipped attribute classifier scores the prompted attributes (accuracy definition:
               `classifier.attribute_accuracy`). Reference rows: the same classifier on the generator's own
               videos of those captions ("real") and on their autoencoder reconstructions ("autoencoder").
               Writes testbed_samples.png (8 samples x 8 frames) and the captions to the report.
    large      coherence at the GPU speed size 256x256 px x 32 frames (32,768 tokens): the same accuracy on
               16 held-out captions, plus the frame-to-frame change of generated vs real videos.
    cpu_size   64 held-out captions at the CPU size 128x128 px x 8 frames (what the README command makes).
    guidance   accuracy at CPU size for several guidance scales (other seeds than `cpu_size`).
    cpu_time   wall time of one 128x128x8 generation, 20 steps with CFG, on this machine's CPU threads.

Writes testbed_quality.json (+ .md, + PNGs) into --out, with device and versions.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit_accel.testbed import WEIGHTS_DIR, data, load_testbed_pipeline  # noqa: E402
from dit_accel.testbed.classifier import attribute_accuracy, load_classifier  # noqa: E402
from dit_accel.testbed.pipeline import TestbedPipeline, generate_videos  # noqa: E402

TARGET_ATTRIBUTES = ("shape", "color", "motion", "background")


def environment(device: torch.device) -> dict[str, str]:
    """Device and versions for the record."""
    import diffusers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "n/a"
    return {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__, "diffusers": diffusers.__version__, "triton": triton_version,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def to_classifier_video(frames: torch.Tensor) -> torch.Tensor:
    """Pipeline "pt" output (B, T, 3, H, W) in [0, 1] -> classifier input (B, 3, T, H, W) in [-1, 1]."""
    return frames.permute(0, 2, 1, 3, 4).float() * 2 - 1


def generate(pipe: TestbedPipeline, captions_list: list[str], frames: int, side: int, *, steps: int,
             guidance: float, seed: int, batch: int) -> tuple[torch.Tensor, float]:
    """Generate one video per caption (seed + index), return (B, 3, T, H, W) in [-1, 1] on CPU and s/video."""
    video, seconds = generate_videos(pipe, captions_list, frames=frames, side=side, steps=steps, guidance=guidance,
                                     seed=seed, batch=batch)
    return to_classifier_video(video), seconds / len(captions_list)


@torch.no_grad()
def reconstruct(pipe: TestbedPipeline, video: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """Autoencoder round trip of pixel videos (B, 3, T, H, W) in [-1, 1]."""
    device = pipe._execution_device
    out = []
    for i in range(0, video.shape[0], batch):
        v = video[i : i + batch].to(device, pipe.vae.dtype)
        out.append(pipe.vae.decode(pipe.vae.encode(v)).sample.float().clamp(-1, 1).cpu())
    return torch.cat(out)


def rounded(acc: dict[str, float]) -> dict[str, float]:
    """Accuracies rounded to 4 digits."""
    return {k: round(float(v), 4) for k, v in acc.items()}


def frame_change(video: torch.Tensor) -> float:
    """Mean absolute change between consecutive frames (a flicker / temporal coherence indicator)."""
    return float((video[:, :, 1:] - video[:, :, :-1]).abs().mean())


def grid_png(video: torch.Tensor, path: Path, n_videos: int = 8, n_frames: int = 8) -> None:
    """Rows = videos, columns = evenly spaced frames; 2-px white separators."""
    import imageio.v3 as iio

    v = ((video[:n_videos].clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1).numpy()  # B, T, H, W, 3
    t_idx = np.linspace(0, v.shape[1] - 1, min(n_frames, v.shape[1])).round().astype(int)
    h, w = v.shape[2], v.shape[3]
    pad = 2
    canvas = np.ones((len(v) * (h + pad) + pad, len(t_idx) * (w + pad) + pad, 3), dtype=np.float32)
    for r in range(len(v)):
        for c, t in enumerate(t_idx):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            canvas[y : y + h, x : x + w] = v[r, t]
    iio.imwrite(path, (canvas * 255).round().astype(np.uint8))


def section_accuracy(pipe: TestbedPipeline, clf: torch.nn.Module, *, n: int, frames: int, side: int, steps: int,
                     guidance: float, seed: int, batch: int, with_references: bool) -> tuple[dict, torch.Tensor, list[str]]:
    """Accuracy of generations (and optionally references) for n held-out captions at one size."""
    real = data.make_batch(n, frames, side, side, seed=seed, split="heldout", device="cpu")
    labels = {k: v.to(next(clf.parameters()).device) for k, v in real.labels.items()}
    gen, s_per_video = generate(pipe, real.captions, frames, side, steps=steps, guidance=guidance, seed=seed, batch=batch)
    result = {
        "size": {"height": side, "width": side, "frames": frames, "tokens": frames * (side // 8) ** 2},
        "samples": n, "steps": steps, "guidance_scale": guidance, "seconds_per_video": round(s_per_video, 3),
        "generated": rounded(attribute_accuracy(clf, gen, labels)),
        "frame_change_generated": round(frame_change(gen), 4),
        "frame_change_real": round(frame_change(real.video), 4),
    }
    if with_references:
        result["real"] = rounded(attribute_accuracy(clf, real.video, labels))
        result["autoencoder"] = rounded(attribute_accuracy(clf, reconstruct(pipe, real.video), labels))
    return result, gen, real.captions


def cpu_time(weights: Path, threads: int) -> dict:
    """Wall time of loading + one 128x128x8, 20-step CFG generation on the CPU."""
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    pipe = load_testbed_pipeline("cpu", torch.float32, folder=weights)
    pipe.set_progress_bar_config(disable=True)
    t1 = time.perf_counter()
    c1 = time.process_time()
    caption = "a large red star moving right and a small blue circle bouncing on a striped background"
    pipe(caption, num_frames=8, height=128, width=128, num_inference_steps=20, guidance_scale=5.0,
         generator=torch.Generator().manual_seed(0))
    t2 = time.perf_counter()
    c2 = time.process_time()
    import os

    # Other jobs on a shared machine stretch the wall time; process CPU seconds / threads estimates an idle machine.
    return {"threads": threads, "load_s": round(t1 - t0, 2), "generate_s": round(t2 - t1, 2),
            "generate_process_cpu_s": round(c2 - c1, 2), "load_average_1_5_15": list(os.getloadavg()),
            "size": "128x128 px x 8 frames", "steps": 20, "cfg": True, "caption": caption}


def write_report(results: dict, path: Path) -> None:
    """A short markdown summary next to the JSON."""
    lines = ["# Testbed quality", "", f"Device: {results['env']['device']}; torch {results['env']['torch']}, "
             f"diffusers {results['env']['diffusers']}; {results['env']['date']}.", f"Weights: {results['weights']}.", ""]
    for key, title in (("eval", "Evaluation size"), ("large", "GPU speed size (coherence)"), ("cpu_size", "CPU size")):
        if key not in results:
            continue
        r = results[key]
        s = r["size"]
        lines += [f"## {title}: {s['height']}x{s['width']} px x {s['frames']} frames ({s['tokens']} tokens), "
                  f"{r['samples']} held-out captions, {r['steps']} steps, guidance {r['guidance_scale']}", "",
                  "| videos | " + " | ".join(TARGET_ATTRIBUTES) + " | mean | size | count |",
                  "| --- |" + " --- |" * (len(TARGET_ATTRIBUTES) + 3)]
        for row in ("generated", "real", "autoencoder"):
            if row in r:
                a = r[row]
                lines.append(f"| {row} | " + " | ".join(f"{a[k]:.3f}" for k in TARGET_ATTRIBUTES)
                             + f" | {a['mean']:.3f} | {a.get('size', float('nan')):.3f} | {a.get('count', float('nan')):.3f} |")
        lines += ["", f"Frame-to-frame mean |change|: generated {r['frame_change_generated']}, real "
                  f"{r['frame_change_real']}. Seconds per video (batched): {r['seconds_per_video']}.", ""]
    if "guidance" in results:
        lines += ["## Guidance sweep (CPU size)", "", "| guidance | mean | shape | color | motion | background |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for g, a in results["guidance"].items():
            lines.append(f"| {g} | {a['mean']:.3f} | " + " | ".join(f"{a[k]:.3f}" for k in TARGET_ATTRIBUTES) + " |")
        lines.append("")
    if "grid_captions" in results:
        lines += [f"## {results.get('samples_png', 'testbed_samples.png')} (rows, top to bottom; 8 evenly spaced frames of 16)", ""]
        lines += [f"{i + 1}. {c}" for i, c in enumerate(results["grid_captions"])]
        lines.append("")
    if "cpu_time" in results:
        c = results["cpu_time"]
        lines += ["## CPU time", "", f"{c['size']}, {c['steps']} steps with CFG, {c['threads']} threads: "
                  f"load {c['load_s']} s, generate {c['generate_s']} s.", ""]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--sections", default="eval,large,cpu_size,guidance")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--sweep", default="1.0,3.0,5.0,7.0", help="guidance scales of the sweep section")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for cpu_time")
    parser.add_argument("--name", default="testbed_quality", help="basename of the JSON/MD outputs")
    args = parser.parse_args()
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    allowed = ("eval", "large", "cpu_size", "guidance", "cpu_time")
    if any(s not in allowed for s in sections):
        parser.error(f"unknown section in {sections}; allowed: {allowed}")
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    info = args.weights / "training_info.json"
    steps = json.loads(info.read_text()).get("dit", {}).get("step") if info.is_file() else None
    results: dict = {"env": environment(device), "weights": str(args.weights), "weights_dit_steps": steps}
    # PNG grids follow --name: testbed_quality_s2 -> testbed_samples_s2.png
    samples_name = args.name.replace("testbed_quality", "testbed_samples")
    results["samples_png"] = f"{samples_name}.png"
    if "cpu_time" in sections:
        results["cpu_time"] = cpu_time(args.weights, args.threads)
        print(results["cpu_time"], flush=True)
        save(results, args)
    gpu_sections = [s for s in sections if s != "cpu_time"]
    if gpu_sections:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        pipe = load_testbed_pipeline(device, dtype, folder=args.weights)
        pipe.set_progress_bar_config(disable=True)
        clf = load_classifier(args.weights / "classifier", device)
        common = {"steps": args.steps, "batch": args.batch}
        if "eval" in sections:
            r, gen, caps = section_accuracy(pipe, clf, n=args.samples, frames=16, side=256, guidance=args.guidance,
                                            seed=1000, with_references=True, **common)
            results["eval"] = r
            grid_png(gen, args.out / f"{samples_name}.png")
            results["grid_captions"] = caps[:8]
            print("eval", json.dumps(r), flush=True)
            save(results, args)
        if "large" in sections:
            r, gen, caps = section_accuracy(pipe, clf, n=min(16, args.samples), frames=32, side=256, guidance=args.guidance, seed=2000,
                                            with_references=True, **common)
            results["large"] = r
            grid_png(gen, args.out / f"{samples_name}_32f.png", n_videos=4, n_frames=16)
            results["large_grid_captions"] = caps[:4]
            print("large", json.dumps(r), flush=True)
            save(results, args)
        if "cpu_size" in sections:
            r, gen, _ = section_accuracy(pipe, clf, n=args.samples, frames=8, side=128, guidance=args.guidance,
                                         seed=3000, with_references=True, batch=64, steps=args.steps)
            results["cpu_size"] = r
            print("cpu_size", json.dumps(r), flush=True)
            save(results, args)
        if "guidance" in sections:
            results["guidance"] = {}
            for g in [float(x) for x in args.sweep.split(",")]:
                r, _, _ = section_accuracy(pipe, clf, n=args.samples, frames=8, side=128, guidance=g, seed=4000,
                                           with_references=False, batch=64, steps=args.steps)
                results["guidance"][str(g)] = r["generated"]
                print("guidance", g, r["generated"], flush=True)
                save(results, args)
    save(results, args)
    print(f"wrote {args.out / (args.name + '.json')}", flush=True)


def save(results: dict, args: argparse.Namespace) -> None:
    """Write the JSON and the markdown report (called after every section, so a cut-short run keeps its rows)."""
    (args.out / f"{args.name}.json").write_text(json.dumps(results, indent=2))
    write_report(results, args.out / f"{args.name}.md")


if __name__ == "__main__":
    main()
