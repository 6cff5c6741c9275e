"""The dit-accel command line: argument validation, media writing, the run log, --compare, info, import cost,
load errors, and the README contract."""

from __future__ import annotations

import json
import re
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest

from dit_accel import cli, media
from dit_accel.presets import get_preset

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


def test_png_output_of_a_video_is_refused_before_generating(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    import dit_accel.generate as generate
    import dit_accel.loading

    def no_generation(*args: object, **kwargs: object) -> None:
        raise AssertionError("generated although the .png could not hold the frames")

    monkeypatch.setattr(generate, "_generate_once", no_generation)
    base = ["generate", "--prompt", "a red circle moving left on a plain background", "--height", "64", "--width", "64",
            "--steps", "2", "--output", str(tmp_path / "x.png")]
    real_load = dit_accel.loading.load_pipeline
    monkeypatch.setattr(dit_accel.loading, "load_pipeline", lambda *a: pytest.fail("loaded although --frames said 4"))
    assert cli.main(base + ["--frames", "4"]) == 2  # refused by the parser's check, before loading
    assert "a .png output holds one image, but --frames makes 4 frames: write .mp4, or pass --frames 1" in capsys.readouterr().err
    monkeypatch.setattr(dit_accel.loading, "load_pipeline", real_load)
    assert cli.main(base) == 2  # the testbed's default of 8 frames, read from its signature once loaded
    assert "but TestbedPipeline by default makes 8 frames" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_planned_frames_reads_the_pipeline_signature() -> None:
    from dit_accel.generate import planned_frames

    class Image:
        def __call__(self, prompt: str) -> None: ...

    class Video:
        def __call__(self, prompt: str, num_frames: int = 81) -> None: ...

    class VideoDecidingLater:
        def __call__(self, prompt: str, num_frames: int | None = None) -> None: ...

    assert planned_frames(Image(), None) == 1
    assert planned_frames(Video(), None) == 81 and planned_frames(Video(), 1) == 1
    assert planned_frames(VideoDecidingLater(), None) is None


def test_write_media_mp4_and_png_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    # A smooth pattern survives lossy H.264 well enough to check the content, not only the shape.
    y, x = np.mgrid[0:32, 0:48] / 48.0
    frames = np.stack([np.stack([x, y, (x + y + t / 8) % 1.0], axis=-1) for t in range(5)]).astype(np.float32)
    mp4 = media.write_media(frames, tmp_path / "sub" / "v.mp4", fps=8)
    read = np.stack(list(imageio.get_reader(str(mp4), format="FFMPEG").iter_data()))
    assert read.shape == (5, 32, 48, 3)
    assert np.abs(read.astype(np.float32) / 255.0 - frames).mean() < 0.05
    png = media.write_media(frames[:1] + 0 * rng.random(1), tmp_path / "i.png", fps=8)
    assert imageio.imread(png).shape == (32, 48, 3)
    assert not list(tmp_path.glob("**/.tmp-*")), "temporary files must not be left behind"


def test_png_refuses_a_video(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="one image"):
        media.write_media(np.zeros((3, 8, 8, 3), np.float32) + 0.5, tmp_path / "x.png", fps=8)
    assert not (tmp_path / "x.png").exists()
    assert (tmp_path / "x.frames.npy").exists(), "frames must be kept when writing fails"


def test_generate_end_to_end_on_the_shipped_testbed(tmp_path: Path) -> None:
    """`generate` at a tiny size: an mp4 and one run-log line with the acceleration's numbers."""
    out = tmp_path / "v.mp4"
    argv = ["generate", "--model", "testbed", "--preset", "balanced", "--prompt", "a small red circle moving left on a striped background",
            "--height", "64", "--width", "64", "--frames", "4", "--steps", "8", "--output", str(out)]
    assert cli.main(argv) == 0
    frames = np.stack(list(imageio.get_reader(str(out), format="FFMPEG").iter_data()))
    assert frames.shape == (4, 64, 64, 3)
    (record,) = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert record["acceleration"]["preset"] == get_preset("balanced").tag
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


def _modules_after(code: str) -> set[str]:
    """Names in ``sys.modules`` after running ``code`` in a fresh interpreter (this worktree first on the path)."""
    import subprocess
    import sys

    probe = code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True, cwd=REPO)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_cli_import_help_and_presets_do_not_import_torch() -> None:
    """`dit-accel --help` and `dit-accel presets` must answer at once: no torch or diffusers on their path."""
    heavy = {"torch", "diffusers", "transformers", "triton", "numpy"}
    assert not heavy & _modules_after("import dit_accel.cli")
    assert not heavy & _modules_after("import dit_accel.cli as c, contextlib, io\n"
                                      "with contextlib.redirect_stdout(io.StringIO()): c.main(['presets'])")
    assert not heavy & _modules_after("import dit_accel.cli as c, contextlib, io\n"
                                      "with contextlib.redirect_stdout(io.StringIO()):\n"
                                      "    try: c.main(['--help'])\n"
                                      "    except SystemExit: pass")
    # The package's public names still resolve (lazily).
    assert "torch" in _modules_after("import dit_accel\nassert callable(dit_accel.apply)")


def test_every_option_of_every_subcommand_has_help() -> None:
    parser = cli.build_parser()
    missing = []
    for sub in cli._subparsers(parser):
        for action in sub._actions:
            if not action.help:
                missing.append(f"{sub.prog}: {'/'.join(action.option_strings) or action.dest}")
    assert not missing, missing
    assert set(cli.SUBCOMMANDS) == {"generate", "presets", "info", "calibrate", "eval", "bench"}


def test_token_order_choices_match_the_library() -> None:
    from dit_accel.attention.token_order import TOKEN_ORDERS

    assert cli.TOKEN_ORDER_CHOICES == TOKEN_ORDERS


def test_unknown_words_are_all_named_even_when_a_required_option_is_missing(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate", "--promt", "a red circle", "--sead", "3", "--bogus"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --promt a red circle --sead 3 --bogus" in err
    assert "--promt -> --prompt?" in err and "--sead -> --seed?" in err
    with pytest.raises(SystemExit):
        cli.main(["generate", "--steps", "3"])
    assert "required: --prompt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["presets", "--jsn", "x"])
    assert "unrecognized arguments: --jsn x" in capsys.readouterr().err


def test_presets_json_lists_every_preset(capsys: pytest.CaptureFixture[str]) -> None:
    from dit_accel.presets import preset_names

    assert cli.main(["presets", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == preset_names()
    assert all(r["tag"] == f"{r['name']}@{r['version']}" for r in rows)


def test_info_reports_versions_backend_and_why_the_kernel_is_not_used_on_cpu(capsys: pytest.CaptureFixture[str],
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert cli.main(["info", "--device", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["versions"]["torch"] == torch.__version__
    assert set(report["versions"]) >= {"python", "torch", "diffusers", "triton", "dit_accel"}
    assert report["device"]["type"] == "cpu"
    assert report["dense_backend"]["name"] == "cpu_sdpa" and report["dense_backend"]["why"]
    assert report["triton_kernel"]["usable"] is False and "no CUDA device" in report["triton_kernel"]["why"]
    assert report["fp8"]["usable"] is False and "CPU" in report["fp8"]["why"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert cli.info_report("cpu")["triton_kernel"]["usable"] is True
    assert cli.main(["info", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "dense attention: cpu_sdpa" in text and "Triton block-sparse kernel: usable" in text


@pytest.mark.parametrize(
    "model, expected",
    [
        ("./no-such-folder", "does not exist"),
        ("owner/no-such-model", "not in the local Hugging Face cache"),
        ("not a hub id!", "neither 'testbed', an existing folder, nor a valid hub id"),
    ],
)
def test_bad_model_is_one_clean_line(model: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["generate", "--model", model, "--prompt", "x", "--output", str(tmp_path / "o.mp4")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dit-accel: error: ") and expected in err
    assert "\n" not in err and "stacktrace" not in err and "Traceback" not in err


def test_folder_without_model_index_is_rejected(tmp_path: Path) -> None:
    from dit_accel.loading import load_pipeline

    with pytest.raises(ValueError, match="has no model_index.json"):
        load_pipeline(str(tmp_path), "cpu", "float32")


def test_from_pretrained_gets_dtype_not_the_deprecated_torch_dtype(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """diffusers 0.42 warns on `torch_dtype=`: our own calls pass `dtype=` (the testbed loader too)."""
    import warnings

    import diffusers
    import torch

    from dit_accel.loading import load_pipeline

    seen: dict = {}

    class _Pipe:
        def to(self, device: object) -> "_Pipe":
            return self

    def fake_from_pretrained(name: str, **kwargs: object) -> _Pipe:
        seen.update(kwargs, name=name)
        return _Pipe()

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", staticmethod(fake_from_pretrained))
    (tmp_path / "model_index.json").write_text("{}")
    load_pipeline(str(tmp_path), "cpu", "float32")
    assert seen["dtype"] is torch.float32 and "torch_dtype" not in seen
    monkeypatch.undo()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_pipeline("testbed", "cpu", "float32")
    assert not [w for w in caught if "torch_dtype" in str(w.message)]


def test_side_by_side_and_psnr() -> None:
    rng = np.random.default_rng(0)
    a = rng.random((3, 16, 20, 3)).astype(np.float32)
    b = np.clip(a + 0.01, 0, 1)
    out = media.side_by_side(a, b, ["dense", "1.0 s"], ["balanced@3", "0.5 s, 2.00x"])
    assert out.shape[0] == 3 and out.shape[1] % 2 == 0 and out.shape[2] % 2 == 0
    assert out.shape[2] == 2 * 20 + media.SEPARATOR_PX
    strip = out.shape[1] - 16
    assert strip > 0 and out[:, :strip].max() > 0.5, "labels are drawn above the panels"
    np.testing.assert_array_equal(out[:, strip:, :20], a)
    np.testing.assert_array_equal(out[:, strip:, 20 + media.SEPARATOR_PX:], b)
    assert media.psnr_db(a, a) == float("inf")
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    assert media.psnr_db(a, b) == pytest.approx(10 * np.log10(1 / mse))
    with pytest.raises(ValueError, match="one shape"):
        media.side_by_side(a, b[:2], ["x"], ["y"])


def test_generate_compare_writes_side_by_side_and_reports_speedup_and_psnr(tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cmp.mp4"
    argv = ["generate", "--model", "testbed", "--preset", "balanced", "--compare", "--warmup-steps", "1",
            "--prompt", "a small red circle moving left on a striped background",
            "--height", "64", "--width", "64", "--frames", "4", "--steps", "6", "--output", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "speed-up" in printed and "PSNR" in printed and get_preset("balanced").tag in printed
    frames = np.stack(list(imageio.get_reader(str(out), format="FFMPEG").iter_data()))
    assert frames.shape[0] == 4 and frames.shape[2] == 2 * 64 + media.SEPARATOR_PX and frames.shape[1] > 64
    (record,) = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert record["event"] == "compare" and record["label"] == get_preset("balanced").tag
    assert record["speedup"] == pytest.approx(record["dense_generate_s"] / record["generate_s"], rel=1e-2)
    # The cache reuses blocks on some of the 6 steps: close to dense, not equal.
    assert record["psnr_db"] is not None and 15.0 < record["psnr_db"] < 80.0
    assert len(record["step_s"]) == 6 and len(record["dense_step_s"]) == 6
    assert record["cache_stats"]["transformer"]["compute_fraction"] < 1.0


def test_compare_label_names_the_preset_and_its_overrides(tmp_path: Path) -> None:
    from dit_accel.generate import accelerated_label

    def args(**kw: object) -> cli.GenerateArgs:
        ns = cli.parse_args(["generate", "--prompt", "x", "--output", str(tmp_path / "o.mp4"),
                             *[f"--{k}={v}" for k, v in kw.items()]])
        return cli._to_generate_args(ns)

    assert accelerated_label({"preset": "balanced@3", "attention": "combo", "cache": "procache"},
                             args(preset="balanced")) == "balanced@3"
    assert accelerated_label({"preset": "balanced@3", "attention": "dense", "cache": "procache"},
                             args(preset="balanced", attention="dense")) == "balanced@3, attention dense"
    assert accelerated_label({"preset": None, "attention": "draft", "cache": None},
                             args(attention="draft")) == "attention draft, cache none"
