"""benchmarks/scale_2gpu.py in its CPU mode: two gloo ranks under torchrun, tiny model, both configurations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_mode_times_both_configurations_and_matches_one_process(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(ROOT / "benchmarks" / "scale_2gpu.py"), "--tiny", "--device", "cpu", "--steps", "3", "--output", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["complete"] and result["world_size"] == 2
    assert result["settings"]["tokens"] == 192 and result["settings"]["ulysses_degree"] == 2
    assert set(result["results"]) == {"dense", "balanced"}
    for name, row in result["results"].items():
        assert len(row["1gpu"]["step_s"]) == 3 and len(row["2gpu"]["step_s"]) == 3
        assert row["speedup"] == row["1gpu"]["mean_step_s"] / row["2gpu"]["mean_step_s"]
        assert len(row["2gpu"]["per_rank"]) == 2
        # Ulysses splits the heads, not what a head computes: the latents of one and two processes agree
        assert row["outputs"]["finite"] and row["outputs"]["max_abs_diff"] <= 1e-4, name
    balanced = result["results"]["balanced"]
    assert balanced["2gpu"]["acceleration"]["preset"].startswith("balanced@")
    assert balanced["2gpu"]["token_order_summary"]["transformer"]["forwards"] == {"context_parallel": 6}
    assert balanced["1gpu"]["cache"]["transformer"]["compute_fraction"] == balanced["2gpu"]["cache"]["transformer"]["compute_fraction"]
