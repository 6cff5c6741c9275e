"""The dit-accel command line: argument validation, media writing, the run log, and the README contract."""

from __future__ import annotations

import re
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest

from dit_accel import cli

REPO = Path(__file__).resolve().parents[1]


def test_readme_test_command_is_what_ci_runs() -> None:
    """The README's test command and .ci/run must be the same line, so CI proves what the README says."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    ci_lines = [ln for ln in (REPO / ".ci" / "run").read_text().splitlines() if ln and not ln.startswith(("#", "set ", "cd "))]
    assert len(ci_lines) == 1, ci_lines
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, flags=re.S)
    commands = [ln.strip() for block in blocks for ln in block.splitlines() if ln.strip() and not ln.startswith("#")]
    assert ci_lines[0] in commands


def test_presets_command_lists_dense(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["presets"]) == 0
    assert "dense@1" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--prompt", "x", "--steps", "0"], "positive integer"),
        (["generate", "--prompt", "x", "--guidance", "-1"], ">= 0"),
        (["generate", "--prompt", "x", "--device", "tpu"], "invalid choice"),
    ],
)
def test_bad_arguments_are_rejected_by_the_parser(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_output_suffix_and_existing_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["generate", "--prompt", "x", "--output", str(tmp_path / "a.gif")]) == 2
    assert ".mp4" in capsys.readouterr().err
    existing = tmp_path / "b.mp4"
    existing.write_bytes(b"keep me")
    assert cli.main(["generate", "--prompt", "x", "--output", str(existing)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert existing.read_bytes() == b"keep me"


def test_write_media_mp4_and_png_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    # A smooth pattern survives lossy H.264 well enough to check the content, not only the shape.
    y, x = np.mgrid[0:32, 0:48] / 48.0
    frames = np.stack([np.stack([x, y, (x + y + t / 8) % 1.0], axis=-1) for t in range(5)]).astype(np.float32)
    mp4 = cli.write_media(frames, tmp_path / "sub" / "v.mp4", fps=8)
    read = np.stack(list(imageio.get_reader(str(mp4), format="FFMPEG").iter_data()))
    assert read.shape == (5, 32, 48, 3)
    assert np.abs(read.astype(np.float32) / 255.0 - frames).mean() < 0.05
    png = cli.write_media(frames[:1] + 0 * rng.random(1), tmp_path / "i.png", fps=8)
    assert imageio.imread(png).shape == (32, 48, 3)
    assert not list(tmp_path.glob("**/.tmp-*")), "temporary files must not be left behind"


def test_png_refuses_a_video(tmp_path: Path) -> None:
    with pytest.raises(cli.CLIError, match="one image"):
        cli.write_media(np.zeros((3, 8, 8, 3), np.float32) + 0.5, tmp_path / "x.png", fps=8)
    assert not (tmp_path / "x.png").exists()
    assert (tmp_path / "x.frames.npy").exists(), "frames must be kept when writing fails"


def test_generate_end_to_end_on_the_shipped_testbed(tmp_path: Path) -> None:
    """The README's main command at a tiny size: an mp4 and one run-log line with the acceleration's numbers."""
    import json

    out = tmp_path / "v.mp4"
    argv = ["generate", "--model", "testbed", "--preset", "balanced", "--prompt", "a small red circle moving left on a striped background",
            "--height", "64", "--width", "64", "--frames", "4", "--steps", "8", "--output", str(out)]
    assert cli.main(argv) == 0
    frames = np.stack(list(imageio.get_reader(str(out), format="FFMPEG").iter_data()))
    assert frames.shape == (4, 64, 64, 3)
    (record,) = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert record["acceleration"]["preset"] == "balanced@3"
    assert record["acceleration"]["attention"] == "combo" and record["acceleration"]["cache"] is not None
    # combo plans in tile order on a Wan transformer: "auto" permutes once per forward.
    assert record["acceleration"]["token_order"] == {"transformer": "forward"}
    assert len(record["step_s"]) == 8
    # 512 tokens is below the sparse methods' min_seq_len: attention stays dense and says why.
    assert record["attention_stats"]["dense_reasons"] == {"short_sequence": record["attention_stats"]["attention_calls"]}
    # ProCache's 20-step schedule resampled to 8 steps: some block evaluations are saved.
    assert 0.5 <= record["cache_stats"]["transformer"]["compute_fraction"] < 1.0


def test_generate_rejects_unknown_preset_and_words(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["generate", "--model", "testbed", "--height", "64", "--width", "64", "--frames", "4", "--steps", "2"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(base + ["--prompt", "a red circle", "--token-order", "sideways", "--output", str(tmp_path / "t.mp4")])
    assert exit_info.value.code == 2
    assert "invalid choice: 'sideways'" in capsys.readouterr().err
    assert cli.main(base + ["--prompt", "a red circle", "--preset", "warp", "--output", str(tmp_path / "a.mp4")]) == 2
    assert "unknown preset 'warp'" in capsys.readouterr().err
    assert cli.main(base + ["--prompt", "a purple circle moving left on a plain background", "--output", str(tmp_path / "b.mp4")]) == 2
    assert "purple" in capsys.readouterr().err
    assert not (tmp_path / "a.mp4").exists() and not (tmp_path / "b.mp4").exists()
