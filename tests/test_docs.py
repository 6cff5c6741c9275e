"""The generated docs: committed docs and README tables equal what benchmarks/make_docs.py makes from the
committed results; sections of studies without results say so; the placeholder sections render their files."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("make_docs", REPO / "benchmarks" / "make_docs.py")
make_docs = importlib.util.module_from_spec(_spec)
sys.modules["make_docs"] = make_docs  # dataclasses look their module up while the class is built
_spec.loader.exec_module(make_docs)


def test_committed_docs_and_readme_tables_are_up_to_date() -> None:
    stale = make_docs.check()
    assert not stale, f"regenerate with `python benchmarks/make_docs.py`: {stale}"


def test_output_is_deterministic_and_every_figure_names_its_file() -> None:
    first = make_docs.generated_files()
    assert first == make_docs.generated_files()
    for doc in ("performance", "quality"):
        text = first[make_docs.DOCS / f"{doc}.md"]
        for section in (s for s in make_docs.SECTIONS if s.doc == doc):
            body = text.split(f"## {section.title}\n", 1)[1].split("\n## ", 1)[0]
            present = (make_docs.RESULTS / section.files[0]).is_file()
            assert ("Source: [`benchmarks/results/" in body) == present, section.title
            assert ("Not measured yet" in body) != present, section.title


def _write(folder: Path, name: str, data: dict) -> None:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_missing_results_say_not_measured_yet(tmp_path: Path) -> None:
    performance = make_docs.render_doc("performance", tmp_path)
    assert performance.count("Not measured yet") == sum(s.doc == "performance" for s in make_docs.SECTIONS)
    assert "`bash benchmarks/gpu_run.sh attention_kernel`" in performance
    assert "| `balanced@" in make_docs.readme_presets(tmp_path)  # the presets are listed without any result


def test_placeholder_sections_render_their_files(tmp_path: Path) -> None:
    env = {"device": "NVIDIA H200", "versions": {}, "date": "2027-01-02T03:04:05+00:00"}
    _write(tmp_path, "bench.json", env | {"argv": [], "models": {
        "wan2.1-1.3b": {"shape": [81, 480, 832], "runs": {"stock": {"speedup_vs_stock": 1.0, "seconds": 24.0, "peak_gib": 4.4},
                                                         "balanced": {"speedup_vs_stock": 1.85, "seconds": 13.0, "peak_gib": 4.9}}},
        "flux": {"shape": [1024, 1024], "runs": [{"config": "stock", "speedup_vs_stock": 1.0},
                                                 {"config": "balanced", "error": "OutOfMemoryError"}]}}})
    _write(tmp_path, "attention_kernel_fp8.json", env | {"rows": [
        {"heads": 12, "head_dim": 128, "tokens": 32760, "density": 1.0, "cudnn_ms": 10.0,
         "kernels": {"bf16": {"ms": 11.2, "rel_l2": 0.004, "cosine": 1.0}, "fp8": {"ms": 6.5, "rel_l2": 0.021, "cosine": 0.9998}}}]})
    _write(tmp_path, "presets_testbed.json", env | {
        "settings": {"tiny": False, "prompts": 16, "height": 256, "width": 256, "frames": 16, "steps": None},
        "weights_dit_steps": make_docs._shipped_dit_steps(),
        "presets": {"balanced": {"tag": "balanced@4", "speedup_vs_stock": 1.64, "psnr": 30.4, "ssim": 0.96,
                                 "mean_density": 0.41, "cache_compute_fraction": 0.6}}})
    _write(tmp_path, "calibration_testbed.json", env | {"target_psnr": 30, "runs": [
        {"seed": 0, "speedup_vs_stock": 1.7, "psnr_db_calibration": 30.8, "psnr_db_heldout": 30.2, "file_sha256": "ab" * 32}],
        "heldout": {"psnr_mean": 30.2, "psnr_min": 27.5, "speedup_vs_stock": 1.8, "balanced_speedup_vs_stock": 1.6,
                    "balanced_psnr_mean": 31.0}, "same_file_but_timing": True})
    performance = make_docs.render_doc("performance", tmp_path)
    assert "| configuration | wan2.1-1.3b | flux |" in performance
    assert "| `stock` | 1.00x | 1.00x |" in performance and "| `balanced` | 1.85x | error |" in performance
    assert "| 12 | 128 | 32,760 | 1.00 | 10.00 | 1.12 (err 0.004) | 0.65 (err 0.021) |" in performance
    assert "NVIDIA H200, 2027-01-02" in performance
    _write(tmp_path, "cache_resample_cpu.json", env | {
        "settings": {"height": 128, "width": 128, "frames": 8, "prompts": 4, "guidance": 1.0}, "complete": False,
        "rows": [{"steps": 8, "preset": "quality@4", "resampling": "density", "compute_fraction": 0.625,
                  "psnr_mean": 44.3, "psnr_min": 40.1}]})
    quality = make_docs.render_doc("quality", tmp_path)
    assert "| 8 | quality@4 | density | 0.62 | 44.3 dB | 40.1 dB |" in quality and "cut short" in quality
    assert "| balanced@4 | 1.64x | 30.4 dB | 0.960 | 0.41 | 0.60 |" in quality and "(the shipped weights)" in quality
    assert "| 0 | 1.70x | 30.8 dB | 30.2 dB | abababababab |" in quality
    assert "calibrated preset 1.80x at 30.2 dB mean (lowest prompt 27.5 dB)" in quality and "timing fields aside): yes." in quality
    # The README's presets table takes the calibrated presets file once it exists.
    readme = make_docs.readme_presets(tmp_path)
    assert "| `balanced@" in readme and "1.64x | 30.4 dB" in readme and "presets_testbed.json" in readme


def test_fp8_accuracy_section_renders_its_files(tmp_path: Path) -> None:
    def row(src: str, mask: str, density: float, recipe: str, err: float, kernel: float | None = None) -> dict:
        r = {"source": src, "mask": mask, "density_requested": density, "recipe": recipe, "rel_l2": err,
             "cosine": 1 - err ** 2 / 2}
        return r if kernel is None else r | {"kernel": {"rel_l2": kernel, "rel_l2_vs_torch_reference": 0.002}}

    settings = {"shapes": ["12x4096x64"], "testbed": {"height": 256, "width": 256, "frames": 16, "num_steps": 10,
                                                     "steps": [0, 9], "layers": [0, 5], "query_blocks": 16}}
    rows = [row("random", "dense", 1.0, "fp8/fp8", 0.054), row("random", "dense", 1.0, "int8/16bit", 0.013),
            row("testbed", "dense", 1.0, "fp8/fp8", 0.031), row("testbed", "dense", 1.0, "fp8/fp8", 0.046),
            row("testbed", "pooled", 0.25, "int8/16bit", 0.009)]
    base = {"device": "cpu (2 threads)", "versions": {}, "date": "2027-01-02T03:04:05+00:00", "argv": [],
            "target_rel_l2": 0.03, "settings": settings, "complete": True}
    _write(tmp_path, "fp8_accuracy_cpu.json", base | {"rows": rows})
    quality = make_docs.render_doc("quality", tmp_path)
    body = quality.split("## FP8 accuracy\n", 1)[1].split("\n## ", 1)[0]
    assert "| source | mask | density | fp8/fp8 | int8/16bit |" in body
    assert "| random | dense | 1.00 | 0.0540 no | 0.0130 yes |" in body
    assert "| testbed | dense | 1.00 | 0.0460 no | - |" in body  # the worst of the two captures
    assert "| testbed | pooled | 0.25 | - | 0.0090 yes |" in body
    assert "256x256 px x 16 frames" in body and "16 random query blocks" in body and "12x4096x64" in body
    assert "Source: [`benchmarks/results/fp8_accuracy_cpu.json`]" in body and "Triton" not in body
    assert "Largest LSE error" not in body  # no row has it
    # The GPU file adds the kernel's table.
    gpu = [row("random", "dense", 1.0, "fp8/fp8", 0.054, kernel=0.055) | {"lse_max_abs_err": 0.25}]
    _write(tmp_path, "fp8_accuracy.json", base | {"device": "NVIDIA H200", "rows": gpu, "complete": False})
    body = make_docs.render_doc("quality", tmp_path).split("## FP8 accuracy\n", 1)[1].split("\n## ", 1)[0]
    assert "The Triton kernels (largest distance to the torch reference of the same arithmetic: 0.0020)" in body
    assert "| random | dense | 1.00 | 0.0550 no |" in body and "NVIDIA H200, 2027-01-02" in body
    assert "cut short" in body and "Largest LSE error (natural log units) over all rows: `fp8/fp8` 0.250." in body


def test_readme_blocks_are_replaced_between_markers(tmp_path: Path) -> None:
    text = "intro\n<!-- generated:presets -->\nstale table\n<!-- /generated -->\noutro\n"
    out = make_docs.render_readme(text, tmp_path)
    assert out.startswith("intro\n<!-- generated:presets -->\n| preset |") and out.endswith("<!-- /generated -->\noutro\n")
    assert "stale table" not in out and make_docs.render_readme(out, tmp_path) == out
    with pytest.raises(ValueError, match="no renderer"):
        make_docs.render_readme("<!-- generated:nope -->x<!-- /generated -->", tmp_path)
    with pytest.raises(ValueError, match="closing"):
        make_docs.render_readme("<!-- generated:presets -->x", tmp_path)


def test_check_reports_a_stale_doc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    readme = tmp_path / "README.md"
    shutil.copy(make_docs.README, readme)
    for doc in make_docs.DOC_TITLES:
        shutil.copy(make_docs.DOCS / f"{doc}.md", docs / f"{doc}.md")
    monkeypatch.setattr(make_docs, "DOCS", docs)
    monkeypatch.setattr(make_docs, "README", readme)
    monkeypatch.setattr(make_docs, "REPO", tmp_path)
    assert make_docs.check() == []
    (docs / "quality.md").write_text((docs / "quality.md").read_text() + "hand edit\n")
    assert make_docs.check() == ["docs/quality.md"]
