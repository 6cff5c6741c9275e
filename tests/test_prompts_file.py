"""``dit-accel generate --prompts-file``: one process, and two processes under torchrun (gloo on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest

from dit_accel import cli
from dit_accel.prompts_file import indexed_output, read_prompts

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "a small red circle moving left on a striped background",
    "a large blue square moving up on a plain background",
    "a small green star moving right on a striped background",
]
SIZE = ["--model", "testbed", "--height", "32", "--width", "32", "--frames", "1", "--steps", "2"]
"""The shipped testbed at its smallest size; the probe cache makes each process decide per step."""


def _prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    # blank and indented lines: skipped and stripped
    path.write_text(f"{PROMPTS[0]}\n\n  {PROMPTS[1]}  \n{PROMPTS[2]}\n", encoding="utf-8")
    return path


def _log(path: Path) -> tuple[list[dict], dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return lines[:-1], lines[-1]


def _frames(path: Path) -> np.ndarray:
    return np.stack(list(imageio.get_reader(str(path), format="FFMPEG").iter_data()))


def test_read_prompts_and_indexed_output(tmp_path: Path) -> None:
    assert read_prompts(_prompts_file(tmp_path)) == PROMPTS
    assert indexed_output(Path("out/clip.mp4"), 7) == Path("out/clip_0007.mp4")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(cli.CLIError, match="holds no prompt"):
        read_prompts(tmp_path / "empty.txt")
    with pytest.raises(cli.CLIError, match="cannot read"):
        read_prompts(tmp_path / "missing.txt")


def test_prompt_and_prompts_file_are_exclusive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["generate", "--prompt", "x", "--prompts-file", str(tmp_path / "p.txt")])
    assert "not allowed with argument" in capsys.readouterr().err


def test_one_process_then_two_under_torchrun_write_the_same_files(tmp_path: Path) -> None:
    prompts = _prompts_file(tmp_path)
    single = tmp_path / "single" / "clip.mp4"
    assert cli.main(["generate", *SIZE, "--cache", "probe", "--prompts-file", str(prompts), "-o", str(single)]) == 0
    records, summary = _log(single.with_suffix(".jsonl"))
    assert [(r["index"], r["seed"], r["prompt"], r["output"]) for r in records] == [
        (i, i, p, str(indexed_output(single, i))) for i, p in enumerate(PROMPTS)]
    assert summary["event"] == "generate_prompts" and summary["processes"] == 1 and summary["failed"] == []
    # an existing output is refused before anything runs
    assert cli.main(["generate", *SIZE, "--prompts-file", str(prompts), "-o", str(single)]) == 2

    two = tmp_path / "two" / "clip.mp4"
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "dit_accel.cli",
         "generate", *SIZE, "--cache", "probe", "--prompts-file", str(prompts), "-o", str(two)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    records, summary = _log(two.with_suffix(".jsonl"))  # one log, written by rank 0 only
    # every prompt exactly once, in prompt order; rank 0 took two, rank 1 one
    assert [(r["index"], r["rank"], r["seed"]) for r in records] == [(0, 0, 0), (1, 0, 1), (2, 1, 2)]
    assert summary["processes"] == 2 and summary["prompts_per_process"] == {"0": 2, "1": 1}
    assert run.stdout.count("wrote 3 of 3 prompt(s) on 2 process(es)") == 1
    assert sorted(p.name for p in two.parent.iterdir()) == ["clip.jsonl", "clip_0000.mp4", "clip_0001.mp4", "clip_0002.mp4"]
    # seeds follow the prompt index, not the rank: the same videos as the single process
    for i in range(len(PROMPTS)):
        assert np.array_equal(_frames(indexed_output(two, i)), _frames(indexed_output(single, i)))
