"""The GPU driver of the testbed's calibration and fp8 checks (benchmarks/adaptive_testbed.py) in its --tiny CPU mode: both
sections write their JSON, the two calibrations agree but for timing, and fp8 on CPU runs the reference."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_run_writes_both_results(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import adaptive_testbed
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert adaptive_testbed.main(["--tiny", "--out-dir", str(tmp_path), "--no-progress"]) == 0
    cal = json.loads((tmp_path / "calibration_testbed.json").read_text())
    assert cal["device"] == "cpu" and cal["target_psnr"] == 30.0 and "CPU-size" in cal["size_note"]
    assert len(cal["runs"]) == 2 and cal["same_file_but_timing"] and cal["differing_fields"] == []
    assert cal["runs"][0]["file_sha256"] == cal["runs"][1]["file_sha256"]
    assert len(cal["heldout"]["psnr_per_prompt"]) == 2 and cal["heldout"]["stock_s"] > 0
    fp8 = json.loads((tmp_path / "fp8_testbed.json").read_text())
    assert fp8["fp8_support"][0] and fp8["precision_that_runs"] == "fp8"  # CPU: the torch reference of 8 bits
    assert set(fp8["presets"]) == {"quality", "balanced", "fast", "turbo"}
    assert 0 < fp8["full_density_fp8_vs_stock"]["psnr_mean"] < 100  # fp8 really ran (not bit-equal to stock)
    # the generated docs read both files as written
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import make_docs
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    doc = make_docs.Section("fp8", "quality", ("fp8_testbed.json",), "", make_docs._fp8_testbed_renderer("fp8_testbed.json"))
    text = make_docs.render_section(doc, tmp_path)
    assert "8-bit path that ran: `fp8`" in text and "CPU-size evidence" in text
    for name, p in fp8["presets"].items():
        assert f"| {name} | {make_docs._db(p['psnr_bf16'])} | {make_docs._db(p['psnr_fp8'])} |" in text
    cal_doc = make_docs.Section("cal", "quality", ("calibration_testbed.json",), "",
                                make_docs._calibration_renderer("calibration_testbed.json"))
    cal_text = make_docs.render_section(cal_doc, tmp_path)
    assert cal["runs"][0]["file_sha256"][:12] in cal_text and "timing fields aside): yes." in cal_text
