"""Quality beside speed: the shipped presets on the testbed (the one trained model), against the stock pipeline.

``dit-accel bench --testbed-quality`` runs :func:`dit_accel.eval.evaluate` with the stock pipeline (nothing
applied) as the reference and every shipped preset, at 256x256 x 16 frames on 16 held-out prompts by default,
reference metrics only (PSNR, SSIM and the testbed classifier's feature distance vs the stock video of the same
seed), and writes ``presets_testbed.json``: per preset the speed-up vs the stock pipeline timed in the same run,
the metrics, the mean attention density and the cache compute fraction. FID/KID are not reported: the harness
computes them only from 256 videos up (``EvalSettings.min_distribution_videos``), against the stock model's own
seed-to-seed spread.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from dit_accel.bench import report as R

TESTBED_SCHEMA = "dit-accel-presets-testbed/1"
"""Version tag of the ``presets_testbed.json`` layout."""


def tiny_testbed() -> tuple[Any, Any]:
    """A random-weight testbed pipeline and classifier at CPU-test size (``--tiny``)."""
    from dit_accel.eval.features import TestbedClassifierFeatures
    from dit_accel.testbed import captions
    from dit_accel.testbed import pipeline as pipeline_module
    from dit_accel.testbed.classifier import AttributeClassifier, ClassifierConfig
    from dit_accel.testbed.model import transformer_config

    torch.manual_seed(0)
    pipe = pipeline_module.build_pipeline(
        captions.VOCAB,
        transformer_config=transformer_config(num_layers=2, num_heads=2, head_dim=64, text_dim=32, in_channels=4),
        autoencoder_config={"z_dim": 4, "block_channels": (8, 16, 16), "norm_groups": 4},
        text_encoder_config={"width": 32, "num_heads": 2, "ffn_dim": 64, "num_layers": 1},
    )
    with torch.no_grad():  # the training init zeroes these; random values make the outputs depend on the input
        for lin in (pipe.transformer.proj_out, pipe.transformer.condition_embedder.time_proj):
            lin.weight.normal_(std=0.05)
    features = TestbedClassifierFeatures(AttributeClassifier(ClassifierConfig(width=8, feature_dim=32, input_size=32)))
    return pipe, features


def run_testbed_quality(out: Path, *, device: torch.device, tiny: bool = False, num_prompts: int = 16,
                        height: int = 256, width: int = 256, frames: int = 16, steps: int | None = None,
                        warmup: int = 1, seed: int = 0, argv: list[str] | None = None,
                        print_fn: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluate every shipped preset on the testbed against the stock pipeline; write and return the report."""
    from dit_accel.eval import EvalSettings, builtin_prompts, evaluate
    from dit_accel.eval.harness import model_info
    from dit_accel.presets import get_preset, preset_names

    if tiny:
        pipe, features = tiny_testbed()
        pipe = pipe.to(device)
        features = features.to(device)
    else:
        from dit_accel.eval.features import load_testbed_features
        from dit_accel.testbed import WEIGHTS_DIR, load_testbed_pipeline

        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        pipe = load_testbed_pipeline(device=device, dtype=dtype)
        features = load_testbed_features(WEIGHTS_DIR / "classifier", device=device)
    prompts = builtin_prompts(num_prompts, seed=seed)
    settings = EvalSettings(height=height, width=width, num_frames=frames, num_inference_steps=steps, seed=seed,
                            warmup=warmup, metrics=("reference",))
    configs = [f"preset:{name}" for name in preset_names()]
    threads = torch.get_num_threads()
    if tiny and device.type == "cpu":
        torch.set_num_threads(1)  # tiny shapes: two threads contending for the CPU run slower than one
    data: dict[str, Any] = {
        "schema": TESTBED_SCHEMA,
        "device": R.device_name(device),
        "versions": R.versions(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": list(argv or []),
        "settings": {"tiny": tiny, "prompts": len(prompts), "height": height, "width": width, "frames": frames,
                     "steps": steps, "warmup_generations": warmup, "seed": seed},
        "reference": "the stock testbed pipeline (nothing applied), same prompts and seeds, timed in the same run",
        "timing": "host wall clock of each pipe(...) call with CUDA synchronised (dit_accel.eval harness); "
                  "speed-up = stock mean seconds / preset mean seconds",
        "distribution_metrics": f"FID/KID omitted: {len(prompts)} videos per configuration; the harness reports them "
                                "from 256 videos up, against the stock model's own seed-to-seed spread",
        "weights_dit_steps": None if tiny else model_info(pipe).get("testbed_dit_steps"),
        "stock": None,
        "presets": {},
    }
    out.parent.mkdir(parents=True, exist_ok=True)

    def on_done(entry: dict[str, Any]) -> None:
        speed, metrics = entry["speed"], entry["metrics"]
        steps_s = speed.get("step_s_mean")
        if entry["label"] == "dense":
            data["stock"] = {"seconds_mean": speed["generate_s_mean"], "seconds_per_step": steps_s}
        else:
            name = entry["label"].split(":", 1)[1]
            attention = entry.get("attention_summary") or {}
            caches = entry.get("cache_summary") or {}
            cache = next(iter(caches.values()), {}) if caches else {}
            data["presets"][name] = {
                "tag": get_preset(name).tag,
                "speedup_vs_stock": speed["speedup_vs_dense"],
                "seconds_mean": speed["generate_s_mean"], "seconds_per_step": steps_s,
                "psnr": metrics.get("psnr"), "ssim": metrics.get("ssim"),
                "feature_distance": metrics.get("feature_distance"),
                "mean_density": attention.get("mean_density"),
                "sparse_calls": attention.get("sparse_calls"), "attention_calls": attention.get("attention_calls"),
                "cache_compute_fraction": cache.get("compute_fraction"),
            }
            p = data["presets"][name]
            print_fn(f"testbed {name}: {p['speedup_vs_stock']:.2f}x, PSNR {p['psnr']:.2f} dB, SSIM {p['ssim']:.4f}")
        R.write_json(out, data)

    try:
        evaluate(pipe, prompts, configs, settings, feature_net=features, progress=False, model_name="testbed",
                 on_config_done=on_done)
    finally:
        torch.set_num_threads(threads)
    R.write_json(out, data)
    print_fn(f"wrote {out}")
    return data
