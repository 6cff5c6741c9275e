"""Quality of the sparse attention methods on the trained testbed, against dense with the same seeds.

    python benchmarks/sparse_quality.py --out benchmarks/results                      # GPU, evaluation size
    python benchmarks/sparse_quality.py --append --methods draft,permuted --out benchmarks/results   # split over calls
    python benchmarks/sparse_quality.py --tiny --out /tmp                             # CPU smoke test (random tiny model)
    python benchmarks/sparse_quality.py --device cpu --side 128 --frames 8 --prompts 4 --steps 10 \
        --name sparse_quality_cpu                                                     # reduced CPU-size measurement

For every held-out prompt (``dit_accel.testbed.data``, split ``heldout``) the dense video is generated once;
then each method at each setting of its knob (:data:`SWEEPS`) generates the same prompts with the same
seeds. Reported per (method, setting):

* ``density``: mean fraction of 128x128 tiles computed over ALL self-attention calls (dense warm-up
  steps, the dense first layer and the dense last step count 1.0), from the run's statistics records;
* ``psnr`` (dB, per video over all frames, averaged) and ``ssim`` (per frame, averaged) vs dense
  (torchmetrics, data range 1);
* ``accuracy``: prompt-attribute accuracy of the shipped classifier (``classifier.attribute_accuracy``,
  ``mean`` of shape/color/motion/background), and the dense videos' accuracy as reference;
* planning time per generation and the temporal-skip counters (refresh share, skipped tiles);
* with ``--coverage``: a selector study on q/k captured from one dense generation: the share of the
  true attention mass that oracle, draft and window keep at equal tile density, raster vs 3D-tile order;
* with ``--probe``: quantiles of the blocks' self-similarity per layer (q and k, raster and tile order),
  to calibrate ``similarity_threshold``.

The safety valves are the same for every method (``--warmup`` fraction of dense steps, first layer
dense, last step dense), so points compare at equal dense overhead. Targets reported: at equal density
(linear interpolation on the yardstick's curve) within 1.5 dB of ``oracle`` and >= 3 dB above
``window``; ``combo`` at >= 30 dB at the lowest density it reaches. Writes ``<name>.json`` (+ ``.png``
PSNR-vs-density plot when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dit_accel  # noqa: E402
from dit_accel.testbed import WEIGHTS_DIR, data, load_testbed_pipeline  # noqa: E402
from dit_accel.testbed.pipeline import generate_videos  # noqa: E402
from dit_accel.testbed.classifier import AttributeClassifier, ClassifierConfig, attribute_accuracy, load_classifier  # noqa: E402

TOP_P = (0.97, 0.9, 0.8, 0.65, 0.5)

SWEEPS: dict[str, list[dict]] = {
    "draft": [{"top_p": p} for p in TOP_P],
    # the original draft (one pooled query per block, no temperature) at two points, for comparison
    "draft_v1": [{"top_p": p, "query_pool": 128, "temperature": 1.0} for p in (0.97, 0.8)],
    "permuted": [{"top_p": p, "order": "tile"} for p in (0.9, 0.8, 0.65)],
    "permuted_kmeans": [{"top_p": p, "order": "kmeans"} for p in (0.9, 0.65)],
    "temporal_skip": [{"top_p": p} for p in (0.9, 0.8, 0.65)],
    "combo": [{"top_p": p} for p in TOP_P],
    # the presets' setting (v2): combo planning on refresh calls only (no drift check, no tile statistics)
    "combo_reuse": [{"quality": q, "drift_check": False, "skip_threshold": float("-inf")} for q in (0.8, 0.6, 0.4, 0.2)],
    "oracle": [{"top_p": p} for p in (0.97, 0.9, 0.75, 0.55)],
    # Radii are token distances between the nearest tokens of two block boxes; with 2x8x8 tiles the distances
    # that occur are 0/1/3/5.. frames and 0/1/9/17.. tokens, so these values give distinct windows.
    "window": [{"frame_radius": f, "space_radius": s} for f, s in ((0, 1), (1, 1), (1, 9), (3, 9), (3, 17), (5, 25))],
}
"""Settings of each method's knob. The draft family sweeps ``top_p`` (its other thresholds stay at the
default ``quality`` level, ``balanced``), so :data:`dit_accel.attention.quality.QUALITY_ANCHORS` can be fitted from the
curve; oracle: ``top_p``; window: radii. ``permuted_kmeans`` is ``permuted`` with the k-means order,
``draft_v1`` is ``draft`` as it was before the query sub-pooling and temperature."""

LABEL_METHOD = {"permuted_kmeans": "permuted", "draft_v1": "draft", "combo_reuse": "combo"}
"""Sweep labels that run another registered method."""

TINY_SWEEPS: dict[str, list[dict]] = {k: v[:: max(1, len(v) // 2)][:2] for k, v in SWEEPS.items()}
"""Two settings per method for the ``--tiny`` smoke test."""


def environment(device: torch.device) -> dict:
    """Device, versions and date for the record."""
    import diffusers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return {"device": name, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def tiny_setup(device: torch.device):
    """A random-weight tiny testbed pipeline and classifier (smoke test: numbers carry no meaning)."""
    from dit_accel.testbed import captions
    from dit_accel.testbed import pipeline as pipeline_module
    from dit_accel.testbed.model import transformer_config

    torch.manual_seed(0)
    pipe = pipeline_module.build_pipeline(
        captions.VOCAB,
        transformer_config=transformer_config(num_layers=3, num_heads=2, head_dim=64, text_dim=32, in_channels=4),
        autoencoder_config={"z_dim": 4, "block_channels": (8, 16, 16), "norm_groups": 4},
        text_encoder_config={"width": 32, "num_heads": 2, "ffn_dim": 64, "num_layers": 1},
    )
    with torch.no_grad():
        for lin in (pipe.transformer.proj_out, pipe.transformer.condition_embedder.time_proj):
            lin.weight.normal_(std=0.05)
    clf = AttributeClassifier(ClassifierConfig(width=8, feature_dim=32)).eval()
    return pipe.to(device), clf.to(device)


def generate(pipe, captions: list[str], *, frames: int, side: int, steps: int, guidance: float, seed: int,
             batch: int) -> tuple[torch.Tensor, float]:
    """Videos ``(B, T, 3, H, W)`` in [0, 1] on CPU (one seed per prompt: ``seed + index``) and seconds."""
    return generate_videos(pipe, captions, frames=frames, side=side, steps=steps, guidance=guidance, seed=seed,
                           batch=batch)


def video_metrics(video: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """PSNR (per video, averaged) and SSIM (per frame, averaged) of ``video`` vs ``reference``, both (B, T, 3, H, W) in [0, 1]."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    psnr = [float(peak_signal_noise_ratio(v, r, data_range=1.0)) for v, r in zip(video, reference)]
    ssim = float(structural_similarity_index_measure(video.flatten(0, 1), reference.flatten(0, 1), data_range=1.0))
    return {"psnr": sum(psnr) / len(psnr), "psnr_min": min(psnr), "ssim": ssim}


def accuracy(clf, video: torch.Tensor, labels: dict) -> dict[str, float] | None:
    """Attribute accuracy of (B, T, 3, H, W) [0, 1] videos (classifier input: (B, 3, T, H, W) in [-1, 1]);
    ``None`` without a classifier."""
    if clf is None:
        return None
    acc = attribute_accuracy(clf, video.permute(0, 2, 1, 3, 4) * 2 - 1, labels)
    return {k: round(float(v), 4) for k, v in acc.items()}


def run_stats(handle) -> dict:
    """Density over all self-attention calls and the methods' own counters, from the statistics records."""
    rows = handle.stats()
    summary = handle.stats_summary()
    sparse = [r for r in rows if r["dense_reason"] is None]
    out = {"density": summary["mean_density"], "attention_calls": len(rows), "sparse_calls": len(sparse),
           "sparse_call_density": (sum(r["density"] for r in sparse) / len(sparse)) if sparse else None,
           "plan_ms_total": summary["plan_ms_total"]}
    refresh = [r["refresh"] for r in sparse if "refresh" in r]
    if refresh:
        out["refresh_share"] = sum(refresh) / len(refresh)
        out["skipped_tiles"] = sum(r.get("skipped_tiles", 0) for r in sparse)
        out["drift_rows"] = sum(r.get("drift_rows", 0) for r in sparse)
    dense_rows = [r.get("dense_rows") for r in sparse if r.get("dense_rows") is not None]
    if dense_rows:
        out["similarity_dense_rows_per_call"] = sum(dense_rows) / len(dense_rows)
    return out


class SimilarityProbe(dit_accel.AttentionMethod):
    """Runs dense and records, per self-attention call, quantiles of the blocks' self-similarity (the
    draft's fallback test) for q and k in raster and tile order: what ``similarity_threshold`` should be."""

    name = "sparse_quality_probe"
    QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)

    def __init__(self) -> None:
        super().__init__(min_seq_len=0)
        self.rows: list[dict] = []

    def plan(self, q, k, ctx):
        """Record the similarity quantiles, then decline (dense)."""
        from dit_accel.attention.blocks import Order
        from dit_accel.attention.draft_estimate import block_pool
        from dit_accel.attention.tiling import sequence_order

        qs = torch.tensor(self.QUANTILES, device=q.device)
        row = {"step": ctx.step, "layer": ctx.layer}
        for order in ("raster", "tile"):
            perm = sequence_order(ctx.layout, q.shape[2], q.device) if order == "tile" else None
            for name, x in (("q", q), ("k", k)):
                sim = block_pool(x, perm, None if perm is None else Order(perm).pool(x.dtype))[1]
                row[f"{name}_{order}"] = [round(v, 3) for v in torch.quantile(sim.flatten().float(), qs).tolist()]
        self.rows.append(row)
        return None


def probe_similarity(pipe, captions: list[str], common: dict) -> dict:
    """Similarity quantiles per layer, averaged over steps, from one dense generation of the first prompt."""
    probe = SimilarityProbe()
    dit_accel.apply(pipe, attention=probe)
    try:
        generate(pipe, captions[:1], **common)
    finally:
        dit_accel.remove(pipe)
    out: dict = {"quantiles": list(SimilarityProbe.QUANTILES), "per_layer": {}}
    for layer in sorted({r["layer"] for r in probe.rows}):
        rows = [r for r in probe.rows if r["layer"] == layer]
        out["per_layer"][layer] = {key: [round(sum(r[key][i] for r in rows) / len(rows), 3) for i in range(len(SimilarityProbe.QUANTILES))]
                                   for key in ("q_raster", "k_raster", "q_tile", "k_tile")}
    return out


class QKCapture(dit_accel.AttentionMethod):
    """Runs dense and keeps q and k (first batch row, ``cond`` branch) of every self-attention layer at the
    denoising steps ``steps``."""

    name = "sparse_quality_capture"

    def __init__(self, steps: tuple[int, ...]) -> None:
        super().__init__(min_seq_len=0)
        self.steps = steps
        self.store: list[tuple[int, int, torch.Tensor, torch.Tensor, object]] = []

    def plan(self, q, k, ctx):
        """Keep q and k, then decline (dense)."""
        if ctx.step in self.steps and ctx.branches[0] == "cond":
            self.store.append((ctx.step, ctx.layer, q[:1].detach().clone(), k[:1].detach().clone(), ctx.layout))
        return None


COVERAGE_DENSITIES = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
COVERAGE_TOP_P = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)
COVERAGE_WINDOWS = ((0, 0), (0, 2), (1, 2), (1, 4), (2, 4), (1, 8), (2, 8), (3, 12), (4, 16), (8, 24), (16, 32))


def coverage_study(pipe, captions: list[str], common: dict) -> dict:
    """Selector study on captured q/k of one dense generation: share of the TRUE attention mass each selector
    keeps at equal tile density (oracle, draft and window; raster and 3D-tile order), averaged over layers and
    steps. Density here counts the selector's tiles only (no safety valves): it isolates selection quality."""
    from dit_accel.attention.blocks import permute_tokens
    from dit_accel.attention.draft_estimate import draft_estimate, top_p_keep
    from dit_accel.attention.oracle import block_mass
    from dit_accel.attention.tiling import block_boxes, sequence_order, token_coords
    from dit_accel.attention.window import window_keep

    steps = common["steps"]
    capture = QKCapture(tuple(sorted({max(1, steps // 10), steps // 4, steps // 2, (3 * steps) // 4, steps - 2})))
    dit_accel.apply(pipe, attention=capture)
    try:
        generate(pipe, captions[:1], **dict(common, batch=1))
    finally:
        dit_accel.remove(pipe)

    def curve(keeps, mass):
        # (density, mean coverage, 5th percentile of the per-row coverage): PSNR follows the worst rows
        out = []
        for kp in keeps:
            cov = (mass * kp).sum(-1).flatten().float()
            out.append((float(kp.float().mean()), float(cov.mean()), float(torch.quantile(cov, 0.05))))
        return out

    curves: dict[str, list[list[tuple[float, float]]]] = {}
    for step, layer, q, k, layout in capture.store:
        if layer == 0:
            continue
        S = q.shape[2]
        for order in ("raster", "tile"):
            perm = sequence_order(layout, S, q.device) if order == "tile" else None
            if order == "tile" and perm is None:
                continue
            mass = block_mass(permute_tokens(q, perm), permute_tokens(k, perm))
            eye = torch.eye(mass.shape[-1], dtype=torch.bool, device=q.device)
            curves.setdefault(f"oracle/{order}", []).append(curve([top_p_keep(mass, p, 1) | eye for p in COVERAGE_TOP_P], mass))
            est = draft_estimate(q, k, perm=perm, top_p=1.0, min_blocks_fraction=0.0, similarity_threshold=-1.0)
            curves.setdefault(f"draft/{order}", []).append(curve([top_p_keep(est.probs, p, 1) | eye for p in COVERAGE_TOP_P], mass))
            coords = token_coords(layout, S, q.device)
            if coords is not None:
                if perm is not None:
                    coords = coords.index_select(0, perm)
                lo, hi = block_boxes(coords)
                keeps = [window_keep(lo, hi, f, r, "none")[None, None] for f, r in COVERAGE_WINDOWS]
                curves.setdefault(f"window/{order}", []).append(curve(keeps, mass))
    tables: dict = {"coverage_at_density": {}, "row_p5_coverage_at_density": {}}
    for name, per_call in curves.items():
        for column, table in ((1, "coverage_at_density"), (2, "row_p5_coverage_at_density")):
            row = {}
            for d in COVERAGE_DENSITIES:
                vals = [v for v in (interpolate([(c[0], c[column]) for c in call], d) for call in per_call) if v is not None]
                row[str(d)] = round(sum(vals) / len(vals), 4) if vals else None
            tables[table][name] = row
    return {"calls": len(capture.store), "steps": list(capture.steps), **tables,
            "note": "share of the true attention mass kept (mean over query-block rows, and the 5th percentile of "
                    "the rows), interpolated at each tile density, averaged over captured calls"}


def interpolate(curve: list[tuple[float, float]], x: float) -> float | None:
    """Linear interpolation of ``curve`` (density, psnr) at density ``x``; ``None`` outside its range."""
    pts = sorted(p for p in curve if p[1] is not None)
    if not pts or x < pts[0][0] - 1e-9 or x > pts[-1][0] + 1e-9:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[-1][1] if abs(x - pts[-1][0]) < 1e-9 else pts[0][1]


def compare(results: list[dict]) -> dict:
    """Deltas to the yardsticks at equal density and the combo's lowest density at >= 30 dB."""
    curves: dict[str, list[tuple[float, float]]] = {}
    for r in results:
        psnr = min(r["psnr"], 100.0)  # identical videos give inf
        curves.setdefault(r["method"], []).append((r["density"], psnr))
    out: dict = {"vs_oracle_db": {}, "vs_window_db": {}}
    for r in results:
        if r["method"] in ("oracle", "window"):
            continue
        key = f"{r['method']} {json.dumps(r['options'], sort_keys=True)}"
        psnr = min(r["psnr"], 100.0)
        for yard, name in (("oracle", "vs_oracle_db"), ("window", "vs_window_db")):
            ref = interpolate(curves.get(yard, []), r["density"])
            out[name][key] = None if ref is None else round(psnr - ref, 2)
    combo_ok = [r for r in results if r["method"] == "combo" and r["psnr"] >= 30.0]
    best = min(combo_ok, key=lambda r: r["density"]) if combo_ok else None
    out["combo_lowest_density_at_30db"] = None if best is None else {
        "density": best["density"], "psnr": best["psnr"], "options": best["options"]}
    out["targets"] = {"vs_oracle": "within 1.5 dB (delta >= -1.5)", "vs_window": ">= +3 dB",
                      "combo": ">= 30 dB at the lowest density"}
    return out


def plot(results: list[dict], path: Path) -> str | None:
    """PSNR vs density per method; returns why no plot was written, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed"
    fig, ax = plt.subplots(figsize=(7, 5))
    for method in sorted({r["method"] for r in results}):
        pts = sorted((r["density"], min(r["psnr"], 60.0)) for r in results if r["method"] == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method,
                linestyle="--" if method in ("oracle", "window") else "-")
    ax.axhline(30.0, color="grey", linewidth=0.8)
    ax.set_xlabel("mean density over all self-attention calls")
    ax.set_ylabel("PSNR vs dense (dB)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="random tiny model, 2 prompts, 2 settings per method")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--side", type=int, default=256, help="height = width in pixels (evaluation size 256)")
    parser.add_argument("--frames", type=int, default=16, help="frames (evaluation size 16)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=0.15, help="dense warm-up fraction of steps, for every method")
    parser.add_argument("--methods", default=",".join(SWEEPS), help=f"comma list of {list(SWEEPS)}")
    parser.add_argument("--append", action="store_true",
                        help="keep the rows of an existing <name>.json with the same setup and run only the missing settings")
    parser.add_argument("--coverage", action="store_true", help="selector study: true-mass coverage at equal density")
    parser.add_argument("--probe", action="store_true", help="first record block self-similarity quantiles per layer")
    parser.add_argument("--per-method", type=int, default=0, help="evenly spaced subset of N settings per method (0: all)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=2, help="CPU intra-op threads")
    parser.add_argument("--name", default=None, help="basename of the outputs (default sparse_quality[_tiny])")
    parser.add_argument("--classifier-commit", default=None, help="git commit of the classifier weights (recorded)")
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in SWEEPS]
    if bad:
        parser.error(f"unknown method(s) {bad}; allowed: {list(SWEEPS)}")
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    classifier_error = None
    if args.tiny:
        args.prompts, args.side, args.frames, args.steps = 2, 128, 4, 4
        pipe, clf = tiny_setup(device)
        sweeps = TINY_SWEEPS
    else:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        pipe = load_testbed_pipeline(device, dtype, folder=args.weights)
        try:
            clf = load_classifier(args.weights / "classifier", device)
        except (FileNotFoundError, TypeError, RuntimeError, ValueError) as exc:  # weights/code out of step
            clf, classifier_error = None, f"{type(exc).__name__}: {exc}"
        sweeps = SWEEPS
    if args.per_method > 0:
        sweeps = {k: [v[round(i * (len(v) - 1) / max(1, args.per_method - 1))] for i in range(min(args.per_method, len(v)))]
                  for k, v in sweeps.items()}
    pipe.set_progress_bar_config(disable=True)
    name = args.name or ("sparse_quality_tiny" if args.tiny else "sparse_quality")
    args.out.mkdir(parents=True, exist_ok=True)
    tokens = args.frames * (args.side // 8) ** 2
    report: dict = {
        "env": environment(device),
        "label": ("SMOKE TEST: random-weight tiny model; numbers carry no meaning" if args.tiny else
                  f"testbed at {args.side}x{args.side} px x {args.frames} frames ({tokens} tokens)"),
        "setup": {"prompts": args.prompts, "side": args.side, "frames": args.frames, "tokens": tokens,
                  "steps": args.steps, "guidance": args.guidance, "dense_warmup": args.warmup,
                  "dense_first_layers": 1, "dense_last_step": True, "seed": args.seed,
                  "weights": None if args.tiny else str(args.weights)},
        "classifier_commit": args.classifier_commit,
        "results": [],
    }
    if classifier_error:
        report["classifier_error"] = classifier_error  # accuracy columns are then None

    real = data.make_batch(args.prompts, args.frames, args.side, args.side, seed=args.seed, split="heldout", device="cpu")
    captions, labels = real.captions, {k: v.to(device) for k, v in real.labels.items()}
    common = dict(frames=args.frames, side=args.side, steps=args.steps, guidance=args.guidance, seed=args.seed,
                  batch=args.batch)
    dense, seconds = generate(pipe, captions, **common)
    report["dense"] = {"accuracy": accuracy(clf, dense, labels), "seconds": round(seconds, 2)}
    report["captions"] = captions
    print("dense", report["dense"], flush=True)

    out_json = args.out / f"{name}.json"
    done: set[str] = set()
    if args.append and out_json.is_file():
        previous = json.loads(out_json.read_text())
        if previous.get("setup") == report["setup"]:
            report["results"] = previous.get("results", [])
            for key in ("coverage_study", "similarity_probe"):
                if key in previous:
                    report[key] = previous[key]
            done = {f"{r['method']} {json.dumps(r['options'], sort_keys=True)}" for r in report["results"]}
        else:
            print(f"--append: {out_json} has another setup; starting over", flush=True)
    if args.probe:
        report["similarity_probe"] = probe_similarity(pipe, captions, common)
        print("similarity", json.dumps(report["similarity_probe"]["per_layer"]), flush=True)
        out_json.write_text(json.dumps(report, indent=1))
    if args.coverage:
        report["coverage_study"] = coverage_study(pipe, captions, common)
        print("coverage", json.dumps(report["coverage_study"]["coverage_at_density"]), flush=True)
        out_json.write_text(json.dumps(report, indent=1))
    for label in methods:
        method_name = LABEL_METHOD.get(label, label)
        for options in sweeps[label]:
            if f"{label} {json.dumps(options, sort_keys=True)}" in done:
                continue
            opts = dict(options, dense_warmup=args.warmup, dense_first_layers=1, dense_last_step=True, min_seq_len=0)
            handle = dit_accel.apply(pipe, attention=dit_accel.get_method(method_name, **opts))
            try:
                video, seconds = generate(pipe, captions, **common)
                stats = run_stats(handle)
            finally:
                dit_accel.remove(pipe)
            row = {"method": label, "options": options, **stats, **video_metrics(video, dense),
                   "accuracy": accuracy(clf, video, labels), "seconds": round(seconds, 2)}
            report["results"].append(row)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
            report["comparison"] = compare(report["results"])
            out_json.write_text(json.dumps(report, indent=1))  # partial results survive a time limit
    report["comparison"] = compare(report["results"])
    report["plot"] = plot(report["results"], args.out / f"{name}.png") or f"{name}.png"
    out_json.write_text(json.dumps(report, indent=1))
    print(json.dumps(report["comparison"], indent=1), flush=True)
    print(f"wrote {out_json}", flush=True)


if __name__ == "__main__":
    main()
