"""The evaluation harness: dense and accelerated generation with the same seeds, then every metric.

    from dit_accel.eval import EvalSettings, evaluate, parse_config, builtin_prompts
    report = evaluate(pipe, builtin_prompts(8), [parse_config("attention:draft"), parse_config("cache:probe")],
                      EvalSettings(height=128, width=128, num_frames=8, num_inference_steps=20))
    write_report(report, "eval_out/")       # dit_accel.eval.report: JSON, markdown, PNG plots

Flow: the ``dense`` configuration (the pipeline with nothing applied) runs first and is kept as the
reference; then each configuration is applied, generates the same prompts with the same seeds (prompt ``i``
uses seed ``settings.seed + i`` on a CPU ``torch.Generator``, so the initial noise is identical on every
device), and is removed again. Videos are processed one at a time (reference metrics against the dense
video, VBench-style dimensions, features) and only the features are kept, so memory stays at one
configuration's dense reference.

Timing: wall-clock of each ``pipe(...)`` call (CUDA synchronised) and of each denoising step (the time
between consecutive returns of ``pipe.scheduler.step``, which every diffusers pipeline calls once per step;
the first step counts from the call's start, so it includes text encoding); ``settings.warmup`` untimed generations per
configuration come first (Triton compilation, autotuning, allocator warm-up). Speed-up = dense mean
seconds / configuration mean seconds, both measured in this run.
"""

from __future__ import annotations

import inspect
import platform
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Sequence

import torch

from . import metrics as M
from . import video as V
from .configs import DENSE, EvalConfig, parse_config
from .features import TestbedClassifierFeatures, VideoFeatures

__all__ = ["EvalSettings", "METRIC_GROUPS", "builtin_prompts", "distribution_metrics", "evaluate", "environment", "model_info", "SCHEMA"]

SCHEMA = "dit-accel-eval/1"
"""Version tag of the report layout."""

METRIC_GROUPS: tuple[str, ...] = ("reference", "distribution", "video")
"""``reference``: PSNR/SSIM/feature distance/LPIPS vs dense; ``distribution``: FID/KID;
``video``: VBench-style dimensions and prompt adherence."""

TILE = 128
"""Tile side (tokens) used to turn a density into a tile count (the kernel's block size)."""


@dataclass
class EvalSettings:
    """What every generation of an evaluation uses (``None``: the pipeline's own default)."""

    height: int | None = None
    """Frame height in pixels."""
    width: int | None = None
    """Frame width in pixels."""
    num_frames: int | None = None
    """Frames per video (video pipelines only)."""
    num_inference_steps: int | None = None
    """Denoising steps."""
    guidance_scale: float | None = None
    """Classifier-free guidance scale."""
    seed: int = 0
    """Prompt ``i`` is generated with seed ``seed + i``."""
    warmup: int = 0
    """Untimed generations (of the first prompt) per configuration before the timed ones."""
    flow: str = "auto"
    """Optical-flow backend for ``dynamic_degree`` (``auto``, ``farneback``, ``block``)."""
    metrics: tuple[str, ...] = METRIC_GROUPS
    """Metric groups to compute (subset of :data:`METRIC_GROUPS`)."""
    real_videos: bool = True
    """On testbed prompts, also render the prompts' ground-truth videos and report FID/KID against them."""
    min_distribution_videos: int = 256
    """FID/KID are reported only from this many videos per configuration up (fewer give noise, not a measurement)."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.metrics) - set(METRIC_GROUPS))
        if unknown:
            raise ValueError(f"unknown metric group(s) {unknown}; allowed: {list(METRIC_GROUPS)}")
        V.flow_backend(self.flow)  # raises on unknown names
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.min_distribution_videos < 4:
            raise ValueError(f"min_distribution_videos must be >= 4 (two halves of two), got {self.min_distribution_videos}")


def builtin_prompts(count: int = 8, seed: int = 0) -> list[str]:
    """The built-in prompt set: ``count`` captions of held-out testbed scenes (never seen in training)."""
    from dit_accel.testbed.data import make_batch

    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    # Rendering at the smallest size is cheap; only the captions are used.
    return make_batch(count, 1, 8, 8, seed=seed, split="heldout").captions


def model_info(pipe: Any) -> dict[str, Any]:
    """Which weights ran: the pipeline's folder or hub id and, for a testbed folder, its DiT's training steps
    (from ``training_info.json``), so a report says which state of the testbed it measured."""
    import json
    from pathlib import Path

    path = getattr(pipe, "name_or_path", None)
    info: dict[str, Any] = {"name_or_path": None if path is None else str(path)}
    training_info = Path(str(path)) / "training_info.json" if path else None
    if training_info is not None and training_info.is_file():
        info["testbed_dit_steps"] = json.loads(training_info.read_text()).get("dit", {}).get("step")
    return info


def environment(device: torch.device | str) -> dict[str, Any]:
    """Device name and library versions, recorded in every report."""
    import diffusers
    import torchmetrics

    device = torch.device(device)
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "torchmetrics": torchmetrics.__version__,
    }
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine() or "cpu")
    return {
        "device": name,
        "device_type": device.type,
        "cpu_threads": torch.get_num_threads(),
        "versions": versions,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# ------------------------------------------------------------------------------------------ generation


def _pipeline_device(pipe: Any) -> torch.device:
    device = getattr(pipe, "_execution_device", None) or getattr(pipe, "device", None)
    return torch.device(device) if device is not None else torch.device("cpu")


def _call_kwargs(pipe: Any, prompt: str, settings: EvalSettings) -> dict[str, Any]:
    params = inspect.signature(pipe.__call__).parameters
    wanted = {
        "height": settings.height,
        "width": settings.width,
        "num_frames": settings.num_frames,
        "num_inference_steps": settings.num_inference_steps,
        "guidance_scale": settings.guidance_scale,
    }
    kwargs: dict[str, Any] = {"prompt": prompt}
    for name, value in wanted.items():
        if value is None:
            continue
        if name not in params:
            raise ValueError(f"{type(pipe).__name__} takes no {name!r} argument; leave that setting unset")
        kwargs[name] = value
    if "output_type" in params:
        kwargs["output_type"] = "np"
    return kwargs


def _frames(output: Any) -> torch.Tensor:
    if hasattr(output, "frames"):
        return M.to_video_tensor(output.frames[0])
    if hasattr(output, "images"):
        return M.to_video_tensor(output.images[0])
    raise ValueError(f"pipeline output {type(output).__name__} has neither .frames nor .images")


@dataclass
class _Generation:
    prompt: str
    seed: int
    frames: torch.Tensor
    seconds: float
    step_seconds: list[float]
    attention_records: list[dict[str, Any]] = field(default_factory=list)
    cache_records: list[dict[str, Any]] = field(default_factory=list)


def _generate(pipe: Any, prompt: str, seed: int, settings: EvalSettings, handle: Any) -> _Generation:
    device = _pipeline_device(pipe)
    kwargs = _call_kwargs(pipe, prompt, settings)
    kwargs["generator"] = torch.Generator(device="cpu").manual_seed(seed)
    # Step times: every diffusers pipeline calls scheduler.step once per denoising step, so timing
    # its returns works for all of them (callback_on_step_end is not taken by every pipeline).
    scheduler = getattr(pipe, "scheduler", None)
    marks: list[float] = []
    original_step = getattr(scheduler, "step", None)
    if original_step is not None:

        def timed_step(*args: Any, **kw: Any) -> Any:
            out = original_step(*args, **kw)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            marks.append(time.perf_counter())
            return out

        scheduler.step = timed_step
    # Records accumulate on the handle over the configuration's generations (its summaries cover all
    # of them); this generation's records are the new ones.
    n_attn = len(handle.stats()) if handle is not None else 0
    n_cache = len(handle.cache_stats()) if handle is not None else 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    try:
        start = time.perf_counter()
        with torch.inference_mode():
            output = pipe(**kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    finally:
        if original_step is not None:
            del scheduler.step  # back to the class method
    steps = [b - a for a, b in zip([start] + marks[:-1], marks)]
    gen = _Generation(prompt, seed, _frames(output), seconds, steps)
    if handle is not None:
        gen.attention_records = handle.stats()[n_attn:]
        gen.cache_records = handle.cache_stats()[n_cache:]
    return gen


def _per_step(gens: list[_Generation]) -> dict[str, list[float | None]]:
    """Per-step curves averaged over the generations: attention density, skipped tiles, cache reuse."""
    attn: dict[int, list[dict[str, Any]]] = {}
    cache: dict[int, list[dict[str, Any]]] = {}
    for g in gens:
        for r in g.attention_records:
            attn.setdefault(int(r["step"]), []).append(r)
        for r in g.cache_records:
            cache.setdefault(int(r["step"]), []).append(r)
    n_steps = max([len(g.step_seconds) for g in gens] + [max(attn, default=-1) + 1, max(cache, default=-1) + 1])
    density: list[float | None] = []
    skipped: list[float | None] = []
    reuse: list[float | None] = []
    compute: list[float | None] = []
    for s in range(n_steps):
        rows = attn.get(s, [])
        density.append(sum(r["density"] for r in rows) / len(rows) if rows else None)
        if rows:
            tiles = sum((1.0 - r["density"]) * (-(-int(r["seq_len"]) // TILE)) ** 2 for r in rows)
            skipped.append(tiles / len(gens))
        else:
            skipped.append(None)
        crow = cache.get(s, [])
        reuse.append(sum(r["decision"] != "compute" for r in crow) / len(crow) if crow else None)
        total = sum(r["blocks_total"] for r in crow)
        compute.append(sum(r["blocks_computed"] for r in crow) / total if total else None)
    step_s: list[float | None] = []
    for s in range(n_steps):
        vals = [g.step_seconds[s] for g in gens if s < len(g.step_seconds)]
        step_s.append(sum(vals) / len(vals) if vals else None)
    return {
        "step_seconds": step_s,
        "density": density,
        "skipped_tiles": skipped,
        "cache_reuse": reuse,
        "compute_fraction": compute,
    }


# ---------------------------------------------------------------------------------------------- metrics


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(sum(vals) / len(vals)) if vals else None


def _testbed_labels(prompts: Sequence[str]) -> dict[str, torch.Tensor] | None:
    """Attribute labels if every prompt follows the testbed grammar, else ``None``."""
    from dit_accel.testbed.captions import caption_labels

    try:
        return caption_labels(list(prompts))
    except ValueError:
        return None


def _real_videos(labels: dict[str, torch.Tensor], shape: tuple[int, ...], seeds: list[int]) -> torch.Tensor:
    """Ground-truth testbed videos ``(N, T, 3, H, W)`` in [0, 1] of the prompts' attributes."""
    from dit_accel.testbed.data import render_from_labels

    t, _, h, w = shape
    out = []
    for i, seed in enumerate(seeds):
        one = {k: v[i : i + 1] for k, v in labels.items()}
        vid = render_from_labels(one, t, h, w, seed=seed)[0]  # (3, T, H, W) in [-1, 1]
        out.append(((vid + 1) / 2).permute(1, 0, 2, 3))
    return torch.stack(out)


class _ConfigMetrics:
    """Accumulates one configuration's per-video metrics and features."""

    def __init__(self) -> None:
        self.per_video: list[dict[str, Any]] = []
        self.features: list[torch.Tensor] = []
        self.logits: list[dict[str, torch.Tensor]] = []


def _video_metrics(
    gen: _Generation,
    reference: torch.Tensor | None,
    reference_features: torch.Tensor | None,
    settings: EvalSettings,
    feature_net: VideoFeatures | None,
    lpips: M.LPIPSScorer | None,
    prompt_scorer: V.PromptScorer | None,
    acc: _ConfigMetrics,
) -> None:
    frames = gen.frames
    row: dict[str, Any] = {"prompt": gen.prompt, "seed": gen.seed, "seconds": gen.seconds}
    feats = None
    if feature_net is not None:
        if isinstance(feature_net, TestbedClassifierFeatures):
            with torch.no_grad():
                clip = frames[None]
                feats = feature_net(clip)
                logits = {name: head(feats.to(next(head.parameters()).device)).float().cpu() for name, head in feature_net.classifier.heads.items()}
            acc.logits.append(logits)
        else:
            feats = feature_net(frames[None])
        acc.features.append(feats)
    if "reference" in settings.metrics and reference is not None:
        row["psnr"] = M.psnr(frames, reference)
        row["ssim"] = M.ssim(frames, reference)
        if feats is not None and reference_features is not None:
            row["feature_distance"] = float(M.feature_distance(feats, reference_features)[0])
        if lpips is not None:
            row["lpips"] = lpips(frames, reference)
    if "video" in settings.metrics:
        masks = V.foreground_masks(frames)
        if feature_net is not None:
            row["subject_consistency"] = V.subject_consistency(frames, feature_net.frame_features, masks)
            row["background_consistency"] = V.background_consistency(frames, feature_net.frame_features, masks)
        row["temporal_flickering"] = V.temporal_flickering(frames, masks)
        row["motion_smoothness"] = V.motion_smoothness(frames)
        row["dynamic_degree"] = V.dynamic_degree(frames, settings.flow)
        if prompt_scorer is not None:
            row["prompt_score"] = float(prompt_scorer(frames, gen.prompt))
    acc.per_video.append(row)


def _summarise(
    acc: _ConfigMetrics,
    labels: dict[str, torch.Tensor] | None,
    dense_features: torch.Tensor | None,
    real_features: torch.Tensor | None,
    settings: EvalSettings,
) -> dict[str, Any]:
    keys = ["psnr", "ssim", "feature_distance", "lpips", "subject_consistency", "background_consistency",
            "temporal_flickering", "motion_smoothness", "dynamic_degree", "prompt_score"]
    out: dict[str, Any] = {}
    for key in keys:
        if any(key in r for r in acc.per_video):
            out[key] = _mean([r.get(key) for r in acc.per_video])
    if "video" in settings.metrics and acc.logits and labels is not None:
        from dit_accel.testbed.classifier import accuracy_from_logits

        logits = {k: torch.cat([l[k] for l in acc.logits]) for k in acc.logits[0]}
        heads = accuracy_from_logits(logits, labels)
        out["prompt_adherence"] = heads["mean"]
        out["prompt_adherence_heads"] = heads
    if "distribution" in settings.metrics and acc.features:
        out.update(distribution_metrics(torch.cat(acc.features), dense_features, real_features,
                                        settings.min_distribution_videos))
    return out


def distribution_metrics(
    features: torch.Tensor, dense_features: torch.Tensor | None, real_features: torch.Tensor | None, min_videos: int
) -> dict[str, Any]:
    """FID/KID of one configuration's video features, or a note when there are fewer than ``min_videos``.

    ``*_vs_dense`` compares the configuration's videos of the even-indexed seeds with the dense videos of the
    odd-indexed seeds (disjoint seeds, half the set each); the dense configuration itself (``dense_features``
    ``None``) gets the same number for its own two halves: the seed-to-seed spread the other values are read
    against. ``*_vs_real`` compares all videos with the rendered ground truth of the same prompts.
    """
    n = features.shape[0]
    if n < min_videos:
        return {"distribution_note": f"FID/KID omitted: {n} videos, fewer than {min_videos}; they are noise at "
                                     "this size, not a measurement"}
    out: dict[str, Any] = {}
    reference = features if dense_features is None else dense_features
    pairs = (("dense", features[0::2], reference[1::2]), ("real", features, real_features))
    for name, ours, ref in pairs:
        if ref is None:
            continue
        out[f"fid_vs_{name}"] = M.fid_from_features(ref, ours)
        kid = M.kid_from_features(ref, ours)
        out[f"kid_vs_{name}"] = None if kid is None else kid[0]
        out[f"kid_vs_{name}_std"] = None if kid is None else kid[1]
    return out


# ---------------------------------------------------------------------------------------------- driver


def evaluate(
    pipe: Any,
    prompts: Sequence[str],
    configs: Sequence[EvalConfig | str],
    settings: EvalSettings | None = None,
    *,
    feature_net: VideoFeatures | None = None,
    lpips: M.LPIPSScorer | None = None,
    prompt_scorer: V.PromptScorer | None = None,
    progress: bool = True,
    model_name: str | None = None,
    on_config_done: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run ``dense`` and every configuration over ``prompts`` and return the report dict.

    ``configs``: :class:`EvalConfig` objects or spec strings (``dense`` is added first when missing and is
    the reference of the reference metrics). ``feature_net``: the feature network for FID/KID, feature
    distance, the consistency scores and (when it is the testbed classifier) prompt adherence; ``None``
    skips those. ``lpips``: an :class:`~dit_accel.eval.metrics.LPIPSScorer`. ``prompt_scorer``:
    ``(video, prompt) -> float`` (e.g. a CLIP score) reported as ``prompt_score``. The pipeline is left as
    it was found (each configuration is removed after its run).
    """
    from tqdm.auto import tqdm

    from dit_accel import api

    settings = settings or EvalSettings()
    if not prompts:
        raise ValueError("no prompts to evaluate")
    parsed = [c if isinstance(c, EvalConfig) else parse_config(c) for c in configs]
    labels_seen = [c.label for c in parsed]
    dupes = sorted({l for l in labels_seen if labels_seen.count(l) > 1})
    if dupes:
        raise ValueError(f"configuration(s) given twice: {dupes}")
    if not any(c.is_dense for c in parsed):
        parsed.insert(0, parse_config(DENSE))
    else:
        parsed.sort(key=lambda c: not c.is_dense)  # dense first: it is the reference
    if api.get_handle(pipe) is not None:
        raise ValueError("dit-accel is already applied to this pipeline; call dit_accel.remove(pipe) first")
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)

    seeds = [settings.seed + i for i in range(len(prompts))]
    labels = _testbed_labels(prompts)
    device = _pipeline_device(pipe)
    total = len(parsed) * (len(prompts) + settings.warmup)
    bar = tqdm(total=total, desc="dit-accel eval", unit="video", disable=not progress)

    dense_frames: list[torch.Tensor] = []
    dense_features: torch.Tensor | None = None
    real_features: torch.Tensor | None = None
    results: list[dict[str, Any]] = []
    dense_seconds: float | None = None
    try:
        for config in parsed:
            bar.set_postfix_str(config.label)
            handle = config.apply(pipe)
            try:
                for _ in range(settings.warmup):
                    _generate(pipe, prompts[0], seeds[0], settings, handle)
                    bar.update()
                if handle is not None:
                    handle.reset_stats()  # summaries cover the timed generations only
                gens: list[_Generation] = []
                acc = _ConfigMetrics()
                for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
                    gen = _generate(pipe, prompt, seed, settings, handle)
                    reference = None if config.is_dense else dense_frames[i]
                    ref_feat = None if (config.is_dense or dense_features is None) else dense_features[i : i + 1]
                    _video_metrics(gen, reference, ref_feat, settings, feature_net, lpips, prompt_scorer, acc)
                    if config.is_dense:
                        dense_frames.append(gen.frames)
                    gen.frames = torch.empty(0)  # keep only metrics and statistics
                    gens.append(gen)
                    bar.update()
                summary = handle.summary() if handle is not None else None
                attention_summary = handle.stats_summary() if handle is not None else None
                cache_summary = handle.cache_summary() if handle is not None else None
            finally:
                if handle is not None:
                    api.remove(pipe)
            if config.is_dense:
                dense_features = torch.cat(acc.features) if acc.features else None
                if (
                    "distribution" in settings.metrics
                    and settings.real_videos
                    and labels is not None
                    and feature_net is not None
                    and dense_frames[0].shape[0] >= 1
                ):
                    real = _real_videos(labels, tuple(dense_frames[0].shape), seeds)
                    real_features = torch.cat([feature_net(real[i : i + 1]) for i in range(real.shape[0])])
            seconds = [g.seconds for g in gens]
            mean_s = sum(seconds) / len(seconds)
            if config.is_dense:
                dense_seconds = mean_s
            entry = {
                "label": config.label,
                "config": config.as_dict(),
                "acceleration": summary,
                "speed": {
                    "generate_s_mean": mean_s,
                    "generate_s": seconds,
                    "step_s_mean": _mean([s for g in gens for s in g.step_seconds]),
                    "speedup_vs_dense": (dense_seconds / mean_s) if dense_seconds else None,
                },
                "metrics": _summarise(
                    acc, labels, None if config.is_dense else dense_features, real_features, settings
                ),
                "per_video": acc.per_video,
                "per_step": _per_step(gens),
                "attention_summary": attention_summary,
                "cache_summary": cache_summary,
            }
            results.append(entry)
            if on_config_done is not None:
                on_config_done(entry)
    finally:
        bar.close()

    shape = list(dense_frames[0].shape) if dense_frames else None
    return {
        "schema": SCHEMA,
        "model": model_name or type(pipe).__name__,
        "model_info": model_info(pipe),
        "environment": environment(device),
        "settings": asdict(settings) | {"frames_shape": shape, "flow_backend": V.flow_backend(settings.flow)},
        "prompts": list(prompts),
        "seeds": seeds,
        "feature_network": None if feature_net is None else {"class": type(feature_net).__name__, "num_features": feature_net.num_features},
        "lpips": None if lpips is None else lpips.net,
        "prompt_scorer": None if prompt_scorer is None else getattr(prompt_scorer, "__name__", type(prompt_scorer).__name__),
        "testbed_labels": labels is not None,
        "configs": results,
    }
