"""Train the dit-accel testbed on one GPU and export the shipped weights folder.

    python training/train_testbed.py --stage smoke,ae,classifier,dit --out .runs/tb \
        --ae-minutes 2 --classifier-minutes 1.5 --minutes 5 --total-minutes 14
    python training/train_testbed.py --stage dit --out .runs/tb --resume .runs/tb --minutes 9

Stages (comma-separated, run in order):
    smoke       a few steps of everything at small sizes + per-bucket step times (a 20-second check)
    ae          train the autoencoder, measure latent statistics, export a pipeline folder (random DiT)
    classifier  train the attribute classifier (`training.classifier.train_classifier`), save into the folder
    dit         train DiT + text encoder (rectified flow, EMA, bf16), checkpoint, export EMA weights

Layout of --out: `export/` (the pipeline folder: save_pretrained layout, fp16 EMA weights in shards
<= 15 MB, `classifier/`, `training_info.json`), `ckpt.pt` (full DiT state: weights, EMA, AdamW, RNG,
progress), `loss_log.jsonl`. `--resume DIR` takes such an out folder (full resume from `ckpt.pt`
when present) or a bare pipeline folder such as dit_accel/testbed/weights (weights-only resume: the
EMA weights become the starting weights, AdamW restarts with a 100-step warm-up).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit_accel.testbed import captions, data  # noqa: E402
from dit_accel.testbed.pipeline import TestbedPipeline, build_pipeline  # noqa: E402
from training.trainer import (  # noqa: E402
    AutoencoderTrainConfig,
    EMA,
    DiTState,
    DiTTrainConfig,
    encode_videos,
    export_pipeline,
    fast_attention,
    flow_matching_loss,
    autocast,
    log_line,
    read_training_info,
    reconstruction_psnr,
    set_latent_stats,
    train_autoencoder,
    train_dit,
)


def environment() -> dict[str, str]:
    """Device and versions for the records."""
    import diffusers
    import triton  # noqa: F401

    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "triton": getattr(sys.modules.get("triton"), "__version__", "n/a"),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def load_pipeline(folder: Path, device: torch.device) -> TestbedPipeline:
    """A pipeline folder in float32 on `device` (weights are stored fp16)."""
    pipe = TestbedPipeline.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True)
    return pipe.to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def stage_smoke(device: torch.device, out: Path) -> None:
    """Every piece for a few steps; times make_batch and a DiT step per bucket."""
    t0 = time.perf_counter()
    pipe = build_pipeline(captions.VOCAB).to(device)
    train_autoencoder(pipe.vae, AutoencoderTrainConfig(seconds=30, max_steps=4, log_every=2), device)
    set_latent_stats(pipe.vae, device, videos=8)
    print(f"smoke: ae ok, recon psnr {reconstruction_psnr(pipe.vae, device):.1f} dB (untrained)", flush=True)
    rows = []
    opt = torch.optim.AdamW(list(pipe.transformer.parameters()) + list(pipe.text_encoder.parameters()), lr=1e-5)
    pipe.transformer.train()
    for side, frames, batch in DiTTrainConfig().buckets:
        times_data, times_step = [], []
        for i in range(3):
            sync(device)
            a = time.perf_counter()
            b = data.make_batch(batch, frames, side, side, seed=i, device=device)
            sync(device)
            m = time.perf_counter()
            lat = encode_videos(pipe.vae, b.video, device)
            sig = torch.rand(batch, device=device)
            with autocast(device), fast_attention(device):
                loss = flow_matching_loss(pipe, lat, b.captions, sig, torch.randn_like(lat))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sync(device)
            e = time.perf_counter()
            if i > 0:
                times_data.append(m - a)
                times_step.append(e - m)
        rows.append({"bucket": f"{side}x{frames}x{batch}", "tokens": batch * frames * (side // 8) ** 2,
                     "make_batch_ms": round(1000 * min(times_data), 1), "step_ms": round(1000 * min(times_step), 1),
                     "loss": round(loss.item(), 4)})
        print(rows[-1], flush=True)
    pipe.transformer.eval()
    from training.classifier import train_classifier

    _, log = train_classifier(steps=3, batch_size=4, device=device)
    print("smoke: classifier ok", log[-1] if log else "", flush=True)
    folder = out / "smoke_export"
    export_pipeline(pipe, None, folder)
    pipe2 = load_pipeline(folder, device)
    frames = pipe2(captions.make_caption(captions.Scene((captions.SceneObject("star", "red", "large", "left"),), "striped")),
                   num_frames=8, height=128, width=128, num_inference_steps=4,
                   generator=torch.Generator(device=device).manual_seed(0)).frames
    print(f"smoke: generated {frames.shape}; total {time.perf_counter() - t0:.1f} s", flush=True)
    (out / "smoke_timings.json").write_text(json.dumps({"env": environment(), "buckets": rows}, indent=2))
    shutil.rmtree(folder)


def stage_ae(device: torch.device, out: Path, minutes: float, log: Path) -> None:
    """Autoencoder training; exports `out/export` with a fresh (random) DiT."""
    pipe = build_pipeline(captions.VOCAB)
    metrics = train_autoencoder(pipe.vae, AutoencoderTrainConfig(seconds=60 * minutes), device, log)
    set_latent_stats(pipe.vae, device)
    metrics["ae_heldout_psnr_db"] = round(reconstruction_psnr(pipe.vae, device), 2)
    metrics["latents_mean"] = pipe.vae.config.latents_mean
    metrics["latents_std"] = pipe.vae.config.latents_std
    log_line(log, {"stage": "ae_done", **metrics})
    export_pipeline(pipe.to("cpu"), None, out / "export", info={"env": environment(), "autoencoder": metrics,
                                                                 "dit": {"step": 0, "elapsed_s": 0.0}})


def stage_classifier(device: torch.device, out: Path, minutes: float, log: Path) -> None:
    """Attribute classifier training for `minutes` (`training.classifier.train_classifier`), saved to export/classifier,
    then its accuracy on the generator's own held-out videos (the ceiling for generated-video scores) at
    256x256x16 and 128x128x8, written to `out/classifier_ceiling.json` and training_info.json."""
    from dit_accel.testbed.classifier import attribute_accuracy, save_classifier
    from training.classifier import train_classifier

    t = time.perf_counter()
    model, clog = train_classifier(steps=10**7, batch_size=16, device=device, max_seconds=60 * minutes, log_every=100)
    steps = clog[-1]["step"] if clog else None
    seconds = time.perf_counter() - t
    for rec in clog:
        log_line(log, {"stage": "classifier", **{k: (v if isinstance(v, (int, float, str)) else str(v)) for k, v in rec.items()}})
    # The classifier's ceiling: its accuracy on the generator's own videos (no DiT involved). Seed 1000 with 64
    # videos are the "real" row of testbed_quality's eval section; the larger sets give tighter figures.
    ceilings = {}
    for key, (n, frames, side, seed, split) in {
        "heldout_real_256x16": (64, 16, 256, 1000, "heldout"),
        "heldout_real_256x16_n256": (256, 16, 256, 5000, "heldout"),
        "heldout_real_128x8_n256": (256, 8, 128, 6000, "heldout"),
        "train_real_256x16_n128": (128, 16, 256, 7000, "train"),
    }.items():
        accs = []
        for start in range(0, n, 64):  # 64 videos at a time keeps the renders small
            real = data.make_batch(min(64, n - start), frames, side, side, seed=seed + start, split=split, device=device)
            with torch.no_grad():
                accs.append((real.video.shape[0], attribute_accuracy(model, real.video, real.labels, batch_size=16)))
        total = sum(c for c, _ in accs)
        ceilings[key] = {k: round(sum(c * a[k] for c, a in accs) / total, 4) for k in accs[0][1]}
        ceilings[key]["videos"] = total
        log_line(log, {"stage": f"classifier_{key}", **ceilings[key]})
        print(key, ceilings[key], flush=True)
    heldout = ceilings["heldout_real_256x16"]
    save_classifier(model.to("cpu"), out / "export" / "classifier", dtype=torch.float16)  # fp16 keeps the package small
    info = read_training_info(out / "export")
    info["classifier"] = {"steps": steps, "seconds": round(seconds, 1), "last": clog[-1] if clog else None,
                          **ceilings}
    (out / "classifier_ceiling.json").write_text(json.dumps({"env": environment(), "steps": steps,
                                                            "seconds": round(seconds, 1), **ceilings}, indent=2))
    (out / "export" / "training_info.json").write_text(json.dumps(info, indent=2, default=str))


def stage_dit(device: torch.device, out: Path, resume: Path | None, minutes: float, total_minutes: float,
              log: Path, high_sigma_share: float = DiTTrainConfig.high_sigma_share,
              direction_contrast: float = DiTTrainConfig.direction_contrast) -> None:
    """One DiT training call; exports EMA weights to `out/export` at every checkpoint and at the end."""
    export = out / "export"
    source = resume if resume is not None else out
    full = (source / "ckpt.pt").is_file()
    folder = source / "export" if (source / "export" / "model_index.json").is_file() else source
    pipe = load_pipeline(folder, "cpu")
    info = read_training_info(folder)
    prev = info.get("dit", {})
    state = DiTState(step=int(prev.get("step", 0)), elapsed_s=float(prev.get("elapsed_s", 0.0)),
                     samples=int(prev.get("samples", 0)), tokens=int(prev.get("tokens", 0)),
                     sessions=list(prev.get("sessions", [])))
    if folder.resolve() != export.resolve():
        if export.exists():
            shutil.rmtree(export)
        shutil.copytree(folder, export)
    cfg = DiTTrainConfig(seconds=60 * minutes, total_seconds=60 * total_minutes, high_sigma_share=high_sigma_share,
                         direction_contrast=direction_contrast)

    def dit_info(state: DiTState) -> dict:
        return {"step": state.step, "elapsed_s": round(state.elapsed_s, 1), "samples": state.samples,
                "tokens": state.tokens, "sessions": state.sessions, "total_planned_s": cfg.total_seconds,
                "config": {k: v for k, v in cfg.__dict__.items() if k not in ("buckets", "curriculum")},
                "buckets": cfg.buckets, "curriculum": cfg.curriculum}

    def on_checkpoint(ema: EMA, state: DiTState) -> None:
        # Keeps a usable export (and its progress record) if the call is cut short.
        info = read_training_info(export)
        info["dit"] = dit_info(state)
        export_pipeline(pipe, ema, export, info=info)

    ckpt = source / "ckpt.pt"
    if resume is not None and full and source.resolve() != out.resolve():
        shutil.copy(ckpt, out / "ckpt.pt")
    state, ema = train_dit(pipe, cfg, device, state=state, checkpoint=out / "ckpt.pt", resume_full=full,
                           log_path=log, on_checkpoint=on_checkpoint)
    info = read_training_info(export)
    info.setdefault("env", environment())
    info["dit"] = dit_info(state)
    export_pipeline(pipe.to("cpu"), ema, export, info=info)
    print(f"exported EMA weights to {export}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", default="smoke,ae,classifier,dit", help="comma-separated stages")
    parser.add_argument("--out", type=Path, default=Path(".runs/testbed"))
    parser.add_argument("--resume", type=Path, default=None, help="out folder or pipeline folder to resume from")
    parser.add_argument("--minutes", type=float, default=5.0, help="DiT training minutes in this call")
    parser.add_argument("--total-minutes", type=float, default=14.0, help="planned DiT minutes over all calls")
    parser.add_argument("--high-sigma-share", type=float, default=DiTTrainConfig.high_sigma_share,
                        help="share of DiT samples with sigma uniform in the high-noise range (0: the logit-normal alone)")
    parser.add_argument("--direction-contrast", type=float, default=DiTTrainConfig.direction_contrast,
                        help="weight of the direction-contrastive term (0: off; see DiTTrainConfig.direction_contrast)")
    parser.add_argument("--ae-minutes", type=float, default=2.0)
    parser.add_argument("--classifier-minutes", type=float, default=1.5)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "loss_log.jsonl"
    stages = [s.strip() for s in args.stage.split(",") if s.strip()]
    allowed = ("smoke", "ae", "classifier", "dit")
    bad = [s for s in stages if s not in allowed]
    if bad:
        parser.error(f"unknown stage(s) {bad}; allowed: {allowed}")
    for stage in stages:
        t = time.perf_counter()
        print(f"=== stage {stage} ===", flush=True)
        if stage == "smoke":
            stage_smoke(device, args.out)
        elif stage == "ae":
            stage_ae(device, args.out, args.ae_minutes, log)
        elif stage == "classifier":
            stage_classifier(device, args.out, args.classifier_minutes, log)
        elif stage == "dit":
            stage_dit(device, args.out, args.resume, args.minutes, args.total_minutes, log, args.high_sigma_share,
                      args.direction_contrast)
        print(f"=== stage {stage} done in {time.perf_counter() - t:.1f} s ===", flush=True)


if __name__ == "__main__":
    main()
