"""Generate docs/performance.md, docs/quality.md and the README's generated tables from the committed results.

    python benchmarks/make_docs.py            # rewrite the docs and the README blocks
    python benchmarks/make_docs.py --check    # exit 1 if any of them differs from what the results give

Every figure comes from a JSON file under ``benchmarks/results/`` and is printed with that file, its device and
its date. A study with no result file yet renders "Not measured yet" and the command that measures it. Output
is deterministic (no clock, sorted inputs), so a re-run on unchanged results is byte-identical; a test runs
``--check`` in CI.

Adding a study is one :class:`Section` in :data:`SECTIONS`: the file(s) it reads, the document it goes to and a
function from the loaded JSON to markdown (``render(data) -> str``). README blocks are the text between
``<!-- generated:NAME -->`` and ``<!-- /generated -->``, rendered by :data:`README_BLOCKS` ``[NAME]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DOCS = REPO / "docs"
README = REPO / "README.md"
TRAINING_INFO = REPO / "dit_accel" / "testbed" / "weights" / "training_info.json"
"""The shipped testbed weights' training record (its DiT step count names "the shipped weights")."""

sys.path.insert(0, str(REPO))

Data = Mapping[str, Any]
"""The loaded JSON of one section: result file name (relative to ``benchmarks/results``) -> its content."""

WEIGHTS_NOTES: dict[str, str] = {
    # Results written before the reports recorded which testbed weights they ran on; the notes written with
    # each run (its NOTES.md / .md) name them.
    "eval_presets_gpu/report.json": "testbed DiT after 16,401 training steps (the shipped weights have 21,716; "
                                    "eval_presets_gpu/NOTES.md)",
    "eval_presets_cpu/report.json": "testbed weights of 2026-11-22, before the shipped weights' last training "
                                    "(steps not recorded)",
    "testbed_quality.json": "the shipped testbed weights (DiT after 21,716 training steps; testbed_quality.md)",
    "testbed_quality_large.json": "the shipped testbed weights (DiT after 21,716 training steps; testbed_quality_large.md)",
}
"""Which testbed weights a result measured, for result files that do not record it themselves."""


# --------------------------------------------------------------------------------------------- formatting


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _db(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} dB"


def _ms(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def device_and_date(data: Any) -> tuple[str, str]:
    """The device and the date (YYYY-MM-DD) a result file records, wherever its writer put them."""
    for holder in (data, data.get("env", {}), data.get("meta", {}), data.get("environment", {})):
        if isinstance(holder, dict) and "device" in holder:
            return str(holder["device"]), str(holder.get("date", data.get("date", "?")))[:10]
    return "?", str(data.get("date", "?"))[:10]


def source(name: str, data: Any, prefix: str = "../") -> str:
    """One line naming the result file, its device and date (``prefix``: the link's path to the repo root)."""
    device, date = device_and_date(data)
    return f"Source: [`benchmarks/results/{name}`]({prefix}benchmarks/results/{name}), {device}, {date}."


def weights_label(name: str, data: Any) -> str:
    """Which testbed weights a result measured: its own record, else :data:`WEIGHTS_NOTES`, else 'not recorded'."""
    recorded = data.get("model_info", {}).get("testbed_dit_steps") if isinstance(data.get("model_info"), dict) else None
    if recorded is None:
        recorded = data.get("weights_dit_steps")
    if recorded is not None:
        shipped = _shipped_dit_steps()
        return (f"testbed DiT after {recorded:,} training steps"
                + (" (the shipped weights)" if recorded == shipped else f" (the shipped weights have {shipped:,})"))
    return WEIGHTS_NOTES.get(name, "testbed weights not recorded in the result file")


def _shipped_dit_steps() -> int:
    info = json.loads(TRAINING_INFO.read_text())
    return int(info["dit"]["step"])


# ----------------------------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class Section:
    """One study's part of a generated document."""

    title: str
    """The section heading."""
    doc: str
    """``performance`` or ``quality``: the document it goes to."""
    files: tuple[str, ...]
    """Result files it reads, relative to ``benchmarks/results`` (the first is required, the others optional)."""
    how: str
    """What writes the first file (shown while it is missing), e.g. ``bash benchmarks/gpu_run.sh STUDY``."""
    render: Callable[[Data], str]
    """Markdown body from the loaded files (only the present ones are in the mapping)."""


def render_attention_kernel(data: Data) -> str:
    """Our block-sparse kernel's time relative to cuDNN SDPA in the same run, per shape and density, beside
    compiled FlexAttention (same masks), FlashAttention-2 SDPA and SageAttention."""
    run = data["attention_kernel.json"]
    rows = [r for r in run["full"] if "backend" in r and not r.get("summary")]
    shapes = sorted({(r["H"], r["S"], r["D"]) for r in rows}, key=lambda s: (s[2], s[0], s[1]))
    columns = [("ours", 1.0), ("ours", 0.5), ("ours", 0.25), ("ours", 0.1), ("flex", 1.0), ("flex", 0.25),
               ("fa2", 1.0), ("sage", 1.0)]
    body = []
    for h, s, d in shapes:
        at = {(r["backend"], r.get("nominal_density", r.get("density"))): r["ms"] for r in rows
              if (r["H"], r["S"], r["D"]) == (h, s, d)}
        cudnn = at.get(("cudnn", 1.0))
        cells = [f"{h}", f"{s:,}", f"{d}", _ms(cudnn)]
        for backend, density in columns:
            ms = at.get((backend, density))
            cells.append("-" if ms is None or not cudnn else f"{ms / cudnn:.2f}")
        body.append(cells)
    header = ["heads", "tokens", "head dim", "cuDNN ms", "ours 1.0", "ours 0.5", "ours 0.25", "ours 0.1",
              "Flex 1.0", "Flex 0.25", "FA2", "Sage"]
    return "\n\n".join([
        "Time relative to cuDNN SDPA (lower is faster); the number after a kernel is the share of key blocks "
        "computed (random blocks, diagonal kept). B=1, bf16, non-causal. FA2 and SageAttention run dense.",
        _table(header, body),
        source("attention_kernel.json", run),
    ])


def _preset_rows(run: Any) -> dict[str, dict[str, Any]]:
    return {r["preset"]: r for r in run["rows"] if r["row"] == "preset"}


def render_sparse_speed(data: Data) -> str:
    """Each shipped preset's sparse attention call at Wan shapes (plan amortised, tokens in tile order) against
    cuDNN dense in the same run, and the planning share of the sparse call."""
    parts = []
    runs = [(name, data[name]) for name in ("sparse_speed_presets_wan13b.json", "sparse_speed_presets_wan14b.json")
            if name in data]
    presets: dict[str, dict[str, dict[str, Any]]] = {}
    shapes = []
    for name, run in runs:
        for tag, row in _preset_rows(run).items():
            presets.setdefault(tag, {})[row["shape"]] = row
            if row["shape"] not in shapes:
                shapes.append(row["shape"])
    header = ["preset", "density (testbed sparse calls)"] + [f"{s}: speed-up vs cuDNN" for s in shapes]
    body = []
    for tag, by_shape in presets.items():
        first = next(iter(by_shape.values()))
        body.append([tag, _f(first["target_density"])] + [_x(by_shape.get(s, {}).get("speedup_vs_dense")) for s in shapes])
    parts.append("One sparse self-attention call per preset at the density its plans reach in the testbed's sparse "
                 "calls (the safety valves keep a third of the testbed's calls dense; those are not in these rows), "
                 "plan cost amortised as the preset reuses it, tokens in tile order once per forward, against cuDNN "
                 "SDPA dense timed in the same process. Random q/k/v with smooth structure, bf16.")
    parts.append(_table(header, body))
    parts += [source(name, run) for name, run in runs]
    tune = data.get("draft_map_tune_sparse_speed.json")
    if tune is not None:
        plan_rows = []
        for r in tune["rows"]:
            if r["row"] == "method":
                what = f"{r['label']}, {'every call' if r['phase'] == 'plan' else r['phase'] + ' call'}"
                plan_rows.append([r["shape"], what, _ms(r["plan_ms"], 3), _pct(r.get("plan_share"))])
            elif r["row"] == "amortised":
                what = f"{r['label']}, amortised (refresh every {r['refresh_period']} calls, 50 steps)"
                plan_rows.append([r["shape"], what, _ms(r["plan_ms_per_call_50_steps"], 3), _pct(r.get("plan_share_50_steps"))])
        parts.append("Planning cost (draft map and top-p selection kernels writing the BlockMask rows) as a share of "
                     "the sparse attention call it plans:")
        parts.append(_table(["shape", "plan", "plan ms", "share of the call"], plan_rows))
        parts.append(source("draft_map_tune_sparse_speed.json", tune))
    return "\n\n".join(parts)


def render_caching_compare(data: Data) -> str:
    """Feature-cache schedulers at equal compute (share of block evaluations, counted), ours and the peers."""
    run = data["caching_compare.json"]
    settings = run.get("settings", {})
    parts = [f"Testbed at {settings.get('height')}x{settings.get('width')} px x {settings.get('frames')} frames, "
             f"{settings.get('steps')} steps, {len(settings.get('eval_prompts', []))} prompts; PSNR/SSIM against the "
             "dense video of the same seed; speed-up of the whole generation against dense in the same process. "
             "Each method is tuned to the target share of block evaluations; 'measured' is what it ran."]
    fractions = sorted({r["target_fraction"] for r in run["results"] if r["target_fraction"] < 1.0}, reverse=True)
    for fraction in fractions:
        rows = sorted((r for r in run["results"] if r["target_fraction"] == fraction), key=lambda r: -r["psnr_mean"])
        body = [[r["method"], r["family"], _f(r["measured_fraction"]) + (" (off target)" if r.get("off_target") else ""),
                 _db(r["psnr_mean"]), _f(r["ssim_mean"], 3), _x(r["speedup_vs_dense"])] for r in rows]
        parts.append(f"Target: {fraction:.0%} of the block evaluations.")
        parts.append(_table(["method", "from", "measured share", "PSNR", "SSIM", "speed-up"], body))
    parts.append(source("caching_compare.json", run))
    return "\n\n".join(parts)


def _eval_rows(report: Any) -> list[list[str]]:
    body = []
    for config in report["configs"]:
        metrics = config.get("metrics", {})
        attention = config.get("attention_summary") or {}
        cache = config.get("cache_summary") or {}
        fraction = next(iter(cache.values()), {}).get("compute_fraction") if cache else None
        psnr = metrics.get("psnr")
        body.append([
            config["label"] if config.get("acceleration") is None else config["acceleration"].get("preset") or config["label"],
            _x(config["speed"]["speedup_vs_dense"]),
            "reference" if config["label"] == "dense" else _db(psnr),
            "-" if config["label"] == "dense" else _f(metrics.get("ssim"), 3),
            _f(attention.get("mean_density")),
            _f(fraction),
            _f(metrics.get("prompt_adherence")),
        ])
    return body


def render_presets_eval(data: Data) -> str:
    """Each preset as a whole on the testbed: whole-generation speed-up and quality against dense, same seeds."""
    parts = []
    for name, where in (("eval_presets_gpu/report.json", "GPU"), ("eval_presets_cpu/report.json", "CPU")):
        report = data.get(name)
        if report is None:
            continue
        s = report["settings"]
        parts.append(f"**{where}**, {s['height']}x{s['width']} px x {s['num_frames']} frames, {s['num_inference_steps']} steps, "
                     f"{len(report['prompts'])} prompts, {weights_label(name, report)}. Dense = the stock pipeline."
                     + (" On CPU sparse attention runs a torch reference: the speed column is not a claim." if where == "CPU" else ""))
        parts.append(_table(["configuration", "speed-up", "PSNR vs dense", "SSIM", "attention density",
                             "block compute share", "prompt adherence"], _eval_rows(report)))
        parts.append(source(name, report))
    return "\n\n".join(parts)


def render_testbed_quality(data: Data) -> str:
    """How well the shipped testbed follows its prompts: the attribute classifier on dense generations,
    beside its score on the generator's own videos (the ceiling)."""
    parts = []
    for name, key in (("testbed_quality.json", "eval"), ("testbed_quality_large.json", "large")):
        run = data.get(name)
        if run is None or key not in run:
            continue
        section = run[key]
        size = section["size"]
        parts.append(f"{size['height']}x{size['width']} px x {size['frames']} frames, {section['samples']} held-out "
                     f"captions, {section['steps']} steps, guidance {section['guidance_scale']}; {weights_label(name, run)}. "
                     "Share of videos where the classifier finds the prompted attribute.")
        attributes = ["shape", "color", "motion", "background", "size", "count", "mean"]
        body = [[who] + [_f(section[who].get(a)) for a in attributes] for who in ("generated", "real", "autoencoder")
                if who in section]
        parts.append(_table(["videos"] + attributes, body))
        parts.append(source(name, run))
    return "\n\n".join(parts)


FP8_RECIPES = ("bf16", "fp8/fp8", "fp8/16bit", "int8/fp8", "int8/16bit")
"""Column order of the FP8 accuracy tables (``qk/pv`` formats)."""


def public_fp8_recipe() -> str:
    """The ``qk/pv`` name of the recipe ``precision="fp8"`` runs."""
    from dit_accel.kernels.fp8_common import RECIPES

    return f"{RECIPES['fp8'].qk}/{RECIPES['fp8'].pv}"


def _fp8_accuracy_table(rows: list[dict[str, Any]], target: float, pick: Callable[[dict[str, Any]], float | None]) -> str:
    groups: dict[tuple[str, str, float], dict[str, list[float]]] = {}
    for r in rows:
        value = pick(r)
        if value is not None:
            key = (r["source"], r["mask"], r["density_requested"])
            groups.setdefault(key, {}).setdefault(r["recipe"], []).append(value)
    recipes = [name for name in FP8_RECIPES if any(name in g for g in groups.values())]
    recipes += sorted({name for g in groups.values() for name in g} - set(recipes))
    body = []
    for (src, mask, density), by_recipe in groups.items():
        cells = [src, mask, _f(density)]
        for name in recipes:
            errs = by_recipe.get(name)
            cells.append("-" if not errs else f"{max(errs):.4f} {'yes' if max(errs) <= target else 'no'}")
        body.append(cells)
    return _table(["source", "mask", "density", *recipes], body)


def render_fp8_accuracy(data: Data) -> str:
    """The 8-bit path's error against float32 attention on random and captured testbed q/k/v
    (``fp8_accuracy_cpu.json``: torch reference of the kernel's arithmetic; ``fp8_accuracy.json``: GPU, with the
    Triton kernel).

    Shape: ``{"device", "versions", "date", "argv", "target_rel_l2", "settings": {"shapes", "testbed": {"height",
    "width", "frames", "num_steps", "steps", "layers", "query_blocks"}}, "complete", "rows": [{"source", "mask",
    "density_requested", "recipe", "rel_l2", "cosine", "lse_max_abs_err"?, "kernel"?: {"rel_l2",
    "rel_l2_vs_torch_reference"}}]}``.
    """
    parts = []
    for name in ("fp8_accuracy_cpu.json", "fp8_accuracy.json"):
        run = data.get(name)
        if run is None:
            continue
        s, target = run["settings"], run["target_rel_l2"]
        tb = s.get("testbed", {})
        sources = {r["source"] for r in run["rows"]}
        what = []
        if "random" in sources:
            what.append(f"random normal q, k, v at {', '.join(s['shapes'])} (heads x tokens x head dim)")
        if "testbed" in sources:
            blocks = f"{tb['query_blocks']} random query blocks of 128 rows" if tb.get("query_blocks") else "all rows"
            what.append(f"self-attention q, k, v of the shipped testbed generating at {tb['height']}x{tb['width']} px x "
                        f"{tb['frames']} frames ({tb['num_steps']} steps; steps {tb['steps']}, layers {tb['layers']}; "
                        f"{blocks} against all keys)")
        public = public_fp8_recipe()
        cosine = min((r["cosine"] for r in run["rows"] if r["recipe"] == public), default=None)
        parts.append(
            f"Relative L2 error of the attention output against float32 attention on the same bfloat16 inputs and "
            f"mask: {'; '.join(what)}. Cell: the largest error over shapes and captures, `yes` where it is at most "
            f"the target {target}. Columns: Q.K / P.V formats (`{public}` is `precision='fp8'`; `bf16` the 16-bit "
            f"path, whose torch reference rounds only its output). Masks: dense; `random`: random key blocks per query block; `pooled`: top key blocks of "
            f"mean-pooled q.k plus the diagonal (density: the requested share of key blocks). Lowest cosine "
            f"similarity of `{public}`: {_f(cosine, 5)}; per-row cosine, max absolute and LSE errors are in the file."
            + ("" if run.get("complete", True) else " The run was cut short: not every planned row is in the file."))
        parts.append("Torch reference of the kernel's 8-bit arithmetic (`dit_accel/kernels/fp8_reference.py`):")
        parts.append(_fp8_accuracy_table(run["rows"], target, lambda r: r["rel_l2"]))
        lse: dict[str, float] = {}
        for r in run["rows"]:
            if "lse_max_abs_err" in r:
                lse[r["recipe"]] = max(lse.get(r["recipe"], 0.0), r["lse_max_abs_err"])
        if lse:
            parts.append("Largest LSE error (natural log units) over all rows: "
                         + ", ".join(f"`{name}` {err:.3f}" for name, err in lse.items()) + ".")
        if any("kernel" in r for r in run["rows"]):
            gap = max(r["kernel"].get("rel_l2_vs_torch_reference", 0.0) for r in run["rows"] if "kernel" in r)
            parts.append(f"The Triton kernels (largest distance to the torch reference of the same arithmetic: {gap:.4f}):")
            parts.append(_fp8_accuracy_table(run["rows"], target, lambda r: r.get("kernel", {}).get("rel_l2")))
        parts.append(source(name, run))
    return "\n\n".join(parts)


# Placeholder sections: their result files do not exist yet; each renders from the file once it is committed.


def bench_runs(run: Any) -> dict[str, dict[str, Any]]:
    """``{model: {run key: run record}}`` of a ``bench.json`` (runs as a mapping or as a list with ``config`` keys)."""
    out: dict[str, dict[str, Any]] = {}
    for model, entry in run["models"].items():
        runs = entry["runs"]
        out[model] = dict(runs.items() if isinstance(runs, dict) else ((r["config"], r) for r in runs))
    return out


def bench_speedup(runs: dict[str, Any], key: str) -> float | None:
    """A run's speed-up against the stock pipeline, following ``same_as`` to the identical run that ran instead."""
    r = runs.get(key)
    if r is not None and "same_as" in r:
        r = runs.get(r["same_as"])
    return None if r is None else r.get("speedup_vs_stock")


def _bench_cell(runs: dict[str, Any], key: str) -> str:
    r = runs.get(key)
    if r is None:
        return "-"
    if "error" in r:
        return "error"
    if "skipped" in r and "same_as" not in r:
        return "skipped"
    return _x(bench_speedup(runs, key))


def render_bench(data: Data) -> str:
    """``dit-accel bench`` (``benchmarks/results/bench.json``): speed-up of each configuration against the stock
    pipeline, per model at its real size (one row per configuration, one column per model).

    Shape: ``{"device", "versions", "date", "argv", "models": {MODEL: {"runs": RUNS}}}`` with ``RUNS`` either
    ``{KEY: {"speedup_vs_stock", ...} or {"error"} or {"skipped"} or {"same_as": KEY}}`` or a list of such dicts
    each with a ``"config"`` key.
    """
    run = data["bench.json"]
    per_model = bench_runs(run)
    configs: list[str] = []
    for runs in per_model.values():
        configs += [c for c in runs if c not in configs]
    body = [[f"`{config}`"] + [_bench_cell(runs, config) for runs in per_model.values()] for config in configs]
    return "\n\n".join([
        "Speed-up of the whole generation against the stock pipeline (diffusers' default attention) timed in the "
        "same process, random weights at each model's published size and shape; `skipped`: not run (time budget or "
        "missing dependency, see the file).",
        _table(["configuration"] + list(per_model), body),
        source("bench.json", run),
    ])


def render_attention_kernel_fp8(data: Data) -> str:
    """FP8 path of the kernel beside bf16 and cuDNN (``attention_kernel_fp8.json``).

    Expected shape: ``{"device", "versions", "date", "rows": [{"heads", "head_dim", "tokens", "density",
    "cudnn_ms", "kernels": {NAME: {"ms", "rel_l2", "cosine"}}}]}`` (NAME e.g. ``bf16``, ``fp8``).
    """
    run = data["attention_kernel_fp8.json"]
    kernels: list[str] = []
    for row in run["rows"]:
        kernels += [k for k in row["kernels"] if k not in kernels]
    body = []
    for row in run["rows"]:
        cells = [str(row["heads"]), str(row["head_dim"]), f"{row['tokens']:,}", _f(row["density"]), _ms(row["cudnn_ms"])]
        for k in kernels:
            r = row["kernels"].get(k)
            cells.append("-" if r is None else f"{r['ms'] / row['cudnn_ms']:.2f} (err {r.get('rel_l2', float('nan')):.3f})")
        body.append(cells)
    return "\n\n".join([
        "Time relative to cuDNN SDPA in the same run (lower is faster) and relative L2 error against an fp32 reference.",
        _table(["heads", "head dim", "tokens", "density", "cuDNN ms"] + kernels, body),
        source("attention_kernel_fp8.json", run),
    ])


def render_presets_testbed(data: Data) -> str:
    """The shipped presets on the testbed (``presets_testbed.json``, written by ``dit-accel bench --testbed-quality``).

    Shape: ``{"device", "versions", "date", "settings": {"tiny", "prompts", "height", "width", "frames", "steps"},
    "weights_dit_steps"?, "stock": {"seconds_mean"}, "presets": {NAME: {"tag", "speedup_vs_stock", "psnr", "ssim",
    "mean_density", "cache_compute_fraction"}}}``.
    """
    run = data["presets_testbed.json"]
    s = run["settings"]
    body = [[p.get("tag", name), _x(p.get("speedup_vs_stock")), _db(p.get("psnr")), _f(p.get("ssim"), 3),
             _f(p.get("mean_density")), _f(p.get("cache_compute_fraction"))] for name, p in run["presets"].items()]
    steps = "the pipeline's default steps" if s.get("steps") is None else f"{s['steps']} steps"
    model = "a random-weight tiny testbed (`--tiny`)" if s.get("tiny") else weights_label("presets_testbed.json", run)
    return "\n\n".join([
        f"{s['height']}x{s['width']} px x {s['frames']} frames, {s['prompts']} prompts, {steps}, {model}; against the "
        "stock pipeline, same seeds (PSNR 100 dB: identical output). Density: mean share of attention tiles computed; "
        "compute: share of block evaluations the cache ran.",
        _table(["preset", "speed-up", "PSNR", "SSIM", "density", "compute"], body),
        source("presets_testbed.json", run),
    ])


def _calibration_renderer(name: str) -> Callable[[Data], str]:
    """Renderer of one ``dit-accel calibrate --target-psnr`` study on the testbed (``name``).

    Shape: ``{"device", "versions", "date", "target_psnr", "settings"?: {"height", "width", "frames", "steps"},
    "size_note"?, "runs": [{"seed", "speedup_vs_stock", "psnr_db_calibration", "psnr_db_heldout", "file_sha256"}],
    "heldout"?: {"psnr_mean", "psnr_min", "speedup_vs_stock", "balanced_speedup_vs_stock", "balanced_psnr_mean"},
    "same_file_but_timing"?}``.
    """

    def render(data: Data) -> str:
        run = data[name]
        s = run.get("settings") or {}
        size = (f"{s['height']}x{s['width']} px x {s['frames']} frames, {s['steps']} steps; "
                if {"height", "width", "frames", "steps"} <= set(s) else "")
        lines = [f"{size}target {run['target_psnr']} dB; PSNR on the calibration prompts and on held-out prompts; "
                 "speed-up: the preset file's own timing against the stock pipeline on its first prompts."
                 + (f" {run['size_note']}." if run.get("size_note") else "")]
        body = [[str(r.get("seed")), _x(r.get("speedup_vs_stock")), _db(r.get("psnr_db_calibration")),
                 _db(r.get("psnr_db_heldout")), str(r.get("file_sha256", "-"))[:12]] for r in run["runs"]]
        lines.append(_table(["seed", "speed-up", "PSNR (calibration)", "PSNR (held out)", "preset file sha256"], body))
        held = run.get("heldout")
        if held:
            lines.append(f"Held out, timed against the stock pipeline in the same run: calibrated preset "
                         f"{_x(held.get('speedup_vs_stock'))} at {_db(held.get('psnr_mean'))} mean "
                         f"(lowest prompt {_db(held.get('psnr_min'))}); the shipped balanced preset "
                         f"{_x(held.get('balanced_speedup_vs_stock'))} at {_db(held.get('balanced_psnr_mean'))}.")
        if "same_file_but_timing" in run:
            lines.append("Repeated calibrations wrote the same preset file (timing fields aside): "
                         + ("yes." if run["same_file_but_timing"] else f"no ({', '.join(run.get('differing_fields', []))})."))
        lines.append(source(name, run))
        return "\n\n".join(lines)

    return render


def _fp8_testbed_renderer(name: str) -> Callable[[Data], str]:
    """Renderer of one fp8-vs-bf16 study on the testbed (``benchmarks/adaptive_testbed.py --sections fp8``).

    Shape: ``{"device", "versions", "date", "settings": {"height", "width", "frames", "steps", "heldout"},
    "size_note"?, "fp8_support": [ok, reason], "precision_that_runs", "full_density_fp8_vs_stock": {"psnr_mean",
    "psnr_min", "criterion", "met"}, "presets": {NAME: {"psnr_bf16", "psnr_fp8", "delta_db", "within_0_5_db",
    "fp8_vs_bf16_psnr"}}}``.
    """

    def render(data: Data) -> str:
        run = data[name]
        s = run["settings"]
        full = run["full_density_fp8_vs_stock"]
        support = run.get("fp8_support") or [None, ""]
        body = [[p_name, _db(p.get("psnr_bf16")), _db(p.get("psnr_fp8")), f"{p.get('delta_db', 0.0):+.2f} dB",
                 _db(p.get("fp8_vs_bf16_psnr")), "yes" if p.get("within_0_5_db") else "no"]
                for p_name, p in run["presets"].items()]
        return "\n\n".join([
            f"{s['height']}x{s['width']} px x {s['frames']} frames, {s['steps']} steps, {s['heldout']} held-out prompts; "
            f"PSNR against the stock pipeline, same seeds (100 dB: identical output; a preset whose fp8 output is "
            f"identical to its bf16 one ran no call through the kernel). 8-bit path that ran: `{run['precision_that_runs']}` "
            f"({support[1]})." + (f" {run['size_note']}." if run.get("size_note") else ""),
            f"Every call through the sparse kernel at full density (`combo`, `top_p` 1, `dense_above` off) in fp8: "
            f"{_db(full.get('psnr_mean'))} mean, lowest prompt {_db(full.get('psnr_min'))} (criterion "
            f"{full.get('criterion')}: {'met' if full.get('met') else 'not met'}).",
            _table(["preset", "bf16", "fp8", "fp8 - bf16", "fp8 vs bf16 output", "within 0.5 dB"], body),
            source(name, run),
        ])

    return render


def render_cache_resample(data: Data) -> str:
    """The presets' cache schedules resampled from 20 steps to other step counts (``cache_resample_cpu.json``).

    Shape: ``{"device", "versions", "date", "settings": {"height", "width", "frames", "prompts", "guidance"},
    "complete", "rows": [{"steps", "preset", "resampling", "compute_fraction", "psnr_mean", "psnr_min"}]}``.
    """
    run = data["cache_resample_cpu.json"]
    s = run["settings"]
    body = [[str(r["steps"]), r["preset"], r["resampling"], _f(r["compute_fraction"]), _db(r["psnr_mean"]),
             _db(r["psnr_min"])] for r in run["rows"]]
    return "\n\n".join([
        f"Each preset's cache schedule (searched at 20 steps) alone, attention dense, on the shipped testbed at "
        f"{s['height']}x{s['width']} px x {s['frames']} frames, guidance {s['guidance']}, {s['prompts']} prompts; "
        "`nearest`: nearest-neighbour picking of the 20 values, `density`: the shipped resampling (it follows the "
        "local compute density); compute: the share of block evaluations the run made; PSNR against the stock "
        "pipeline, same prompt and seed." + ("" if run.get("complete", True) else " The run was cut short."),
        _table(["steps", "preset", "resampling", "compute", "PSNR mean", "PSNR lowest"], body),
        source("cache_resample_cpu.json", run),
    ])


SECTIONS: tuple[Section, ...] = (
    Section("Whole pipelines: `dit-accel bench`", "performance", ("bench.json",),
            "`dit-accel bench` on a GPU", render_bench),
    Section("Attention kernel against cuDNN, FlexAttention, FlashAttention-2 and SageAttention", "performance",
            ("attention_kernel.json",), "`bash benchmarks/gpu_run.sh attention_kernel`", render_attention_kernel),
    Section("FP8 attention kernel", "performance", ("attention_kernel_fp8.json",),
            "the kernel benchmark's fp8 rows on a GPU", render_attention_kernel_fp8),
    Section("Sparse attention calls at Wan shapes", "performance",
            ("sparse_speed_presets_wan13b.json", "sparse_speed_presets_wan14b.json", "draft_map_tune_sparse_speed.json"),
            "`bash benchmarks/gpu_run.sh sparse_speed`", render_sparse_speed),
    Section("Feature caching against diffusers and cache-dit", "quality", ("caching_compare.json",),
            "`bash benchmarks/gpu_run.sh caching_compare`", render_caching_compare),
    Section("Presets on the testbed (calibrated)", "quality", ("presets_testbed.json",),
            "the presets' testbed benchmark on a GPU", render_presets_testbed),
    Section("Presets on the testbed (dit-accel eval)", "quality", ("eval_presets_gpu/report.json", "eval_presets_cpu/report.json"),
            "`bash benchmarks/gpu_run.sh eval_presets`", render_presets_eval),
    Section("Calibration to a PSNR target", "quality", ("calibration_testbed.json",),
            "`bash benchmarks/gpu_run.sh adaptive_testbed`", _calibration_renderer("calibration_testbed.json")),
    Section("Calibration to a PSNR target at CPU size", "quality", ("calibration_testbed_cpu.json",),
            "`python benchmarks/adaptive_testbed.py --device cpu` (see benchmarks/README.md)",
            _calibration_renderer("calibration_testbed_cpu.json")),
    Section("FP8 accuracy", "quality", ("fp8_accuracy_cpu.json", "fp8_accuracy.json"),
            "`python benchmarks/fp8_accuracy.py --device cpu`", render_fp8_accuracy),
    Section("FP8 against bf16 on the testbed", "quality", ("fp8_testbed.json",),
            "`bash benchmarks/gpu_run.sh adaptive_testbed`", _fp8_testbed_renderer("fp8_testbed.json")),
    Section("FP8 against bf16 on the testbed at CPU size", "quality", ("fp8_testbed_cpu.json",),
            "`python benchmarks/adaptive_testbed.py --sections fp8 --device cpu` (see benchmarks/README.md)",
            _fp8_testbed_renderer("fp8_testbed_cpu.json")),
    Section("Cache schedules at other step counts", "quality", ("cache_resample_cpu.json",),
            "`python benchmarks/cache_resample.py` (CPU)", render_cache_resample),
    Section("The testbed model itself", "quality", ("testbed_quality.json", "testbed_quality_large.json"),
            "`bash benchmarks/gpu_run.sh testbed_quality`", render_testbed_quality),
)
"""Every generated section, in document order."""

DOC_TITLES: dict[str, tuple[str, str]] = {
    "performance": ("Performance", "Speed figures, each a ratio against a baseline measured in the same run."),
    "quality": ("Quality", "Quality against dense generation from the same seeds, and of the testbed model itself."),
}
"""Per document: its title and the sentence under it."""


def load(results: Path, names: tuple[str, ...]) -> dict[str, Any]:
    """The present files of ``names`` under ``results``, loaded."""
    return {name: json.loads((results / name).read_text(encoding="utf-8")) for name in names if (results / name).is_file()}


def render_section(section: Section, results: Path) -> str:
    """``## title`` and the section's body, or the "not measured yet" line when its first file is missing."""
    data = load(results, section.files)
    head = f"## {section.title}\n\n"
    if section.files[0] not in data:
        return head + f"Not measured yet (`benchmarks/results/{section.files[0]}`, written by {section.how}).\n"
    return head + section.render(data).rstrip() + "\n"


def render_doc(doc: str, results: Path = RESULTS) -> str:
    """A whole generated document."""
    title, blurb = DOC_TITLES[doc]
    parts = [f"# {title}\n\n<!-- generated by benchmarks/make_docs.py from benchmarks/results/; do not edit -->\n\n"
             f"{blurb} How each study is run: [benchmarks/README.md](../benchmarks/README.md).\n"]
    parts += [render_section(s, results) for s in SECTIONS if s.doc == doc]
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------ README


def readme_presets(results: Path = RESULTS) -> str:
    """The README's presets table: what each preset runs, and its latest measured speed-up and PSNR."""
    from dit_accel.presets import get_preset, preset_names

    calibrated = load(results, ("presets_testbed.json",)).get("presets_testbed.json")
    quality: dict[str, tuple[str, str]] = {}
    measured_tag: dict[str, str] = {}
    if calibrated is not None:
        quality = {name: (_x(p.get("speedup_vs_stock")), _db(p.get("psnr"))) for name, p in calibrated["presets"].items()}
        measured_tag = {name: p.get("tag", name) for name, p in calibrated["presets"].items()}
        quality_source = ("presets_testbed.json", calibrated)
    else:
        report = load(results, ("eval_presets_gpu/report.json",)).get("eval_presets_gpu/report.json")
        quality_source = ("eval_presets_gpu/report.json", report) if report is not None else None
        for config in (report or {}).get("configs", []):
            preset = (config.get("config") or {}).get("preset")
            if preset:
                quality[preset] = (_x(config["speed"]["speedup_vs_dense"]), _db(config["metrics"].get("psnr")))
                tag = (config.get("acceleration") or {}).get("preset")
                if tag:
                    measured_tag[preset] = tag
    bench = load(results, ("bench.json",)).get("bench.json")
    real: dict[str, str] = {}
    if bench is not None:
        per_model = bench_runs(bench)
        for name in preset_names():
            values = [v for runs in per_model.values() if (v := bench_speedup(runs, name)) is not None]
            real[name] = f"{min(values):.2f}-{max(values):.2f}x ({len(values)} models)" if values else "-"
    speed_files = ("sparse_speed_presets_wan13b.json", "sparse_speed_presets_wan14b.json")
    speed_runs = load(results, speed_files)
    attention_speed: dict[str, list[str]] = {}
    for name in speed_files:
        for tag, row in _preset_rows(speed_runs[name]).items() if name in speed_runs else ():
            attention_speed.setdefault(tag.split("@")[0], []).append(_x(row.get("speedup_vs_dense")))
            measured_tag.setdefault(tag.split("@")[0], tag)
    body = []
    for name in preset_names():
        p = get_preset(name)
        parts = [p.attention or "stock"] + ([p.cache] if p.cache else [])
        speed, psnr = quality.get(name, ("-", "-"))
        older = measured_tag.get(name)
        # figures measured with an earlier version of the preset say which
        label = f"`{p.tag}`" if older in (None, p.tag) else f"`{p.tag}` (figures: `{older}`)"
        body.append([label, " + ".join(parts), real.get(name, "-"), speed, psnr,
                     " / ".join(attention_speed.get(name, [])) or "-"])
    lines = [_table(["preset", "attention + cache", "real shapes: speed-up", "testbed: speed-up",
                     "testbed: PSNR vs dense", "attention call: speed-up at Wan2.1 1.3B 480p / 14B 720p"], body)]
    if bench is not None:
        device, date = device_and_date(bench)
        lines.append(f"Real shapes: whole generation vs stock at each model's published shape (reduced depth, "
                     f"random weights), lowest-highest over the models of "
                     f"[`bench.json`](benchmarks/results/bench.json) (per model: "
                     f"[docs/performance.md](docs/performance.md)), {device}, {date}.")
    else:
        lines.append("Real shapes: not measured yet (`bash benchmarks/gpu_run.sh bench`).")
    if quality_source is not None:
        name, data = quality_source
        device, date = device_and_date(data)
        lines.append(f"Testbed: whole generation vs stock, {weights_label(name, data)}; "
                     f"[`{name}`](benchmarks/results/{name}), {device}, {date}.")
    if speed_runs:
        links = " and ".join(f"[`{n}`](benchmarks/results/{n})" for n in speed_runs)
        device, date = device_and_date(next(iter(speed_runs.values())))
        lines.append(f"Attention call: at the preset's testbed density vs cuDNN, random inputs at real shapes; "
                     f"{links}, {device}, {date}.")
    return "\n\n".join(lines) + "\n"


README_BLOCKS: dict[str, Callable[[Path], str]] = {"presets": readme_presets}
"""README blocks by marker name: ``<!-- generated:NAME -->`` ... ``<!-- /generated -->``."""


def render_readme(text: str, results: Path = RESULTS) -> str:
    """``text`` with every generated block replaced by its current rendering; ValueError on a bad marker."""
    out: list[str] = []
    rest = text
    while "<!-- generated:" in rest:
        before, _, after = rest.partition("<!-- generated:")
        name, _, after = after.partition(" -->")
        if name not in README_BLOCKS:
            raise ValueError(f"README block {name!r} has no renderer; known blocks: {sorted(README_BLOCKS)}")
        if "<!-- /generated -->" not in after:
            raise ValueError(f"README block {name!r} has no closing <!-- /generated --> marker")
        _, _, rest = after.partition("<!-- /generated -->")
        out += [before, f"<!-- generated:{name} -->\n", README_BLOCKS[name](results), "<!-- /generated -->"]
    out.append(rest)
    return "".join(out)


# -------------------------------------------------------------------------------------------------- main


def generated_files(results: Path = RESULTS, readme_text: str | None = None) -> dict[Path, str]:
    """Every generated file's path and expected content."""
    files = {DOCS / f"{doc}.md": render_doc(doc, results) for doc in DOC_TITLES}
    files[README] = render_readme(README.read_text(encoding="utf-8") if readme_text is None else readme_text, results)
    return files


def check(results: Path = RESULTS) -> list[str]:
    """Paths whose committed content differs from what the results generate (empty: all up to date)."""
    return [str(path.relative_to(REPO)) for path, text in generated_files(results).items()
            if not path.is_file() or path.read_text(encoding="utf-8") != text]


def main(argv: list[str] | None = None) -> int:
    """Write the generated files, or with ``--check`` report the stale ones (exit 1)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if a generated file is out of date")
    args = parser.parse_args(argv)
    if args.check:
        stale = check()
        for path in stale:
            print(f"out of date: {path} (run: python benchmarks/make_docs.py)")
        return 1 if stale else 0
    for path, text in generated_files().items():
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
