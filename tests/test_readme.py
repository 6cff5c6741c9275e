"""The README is a user's guide that stays true: its Python snippet runs as written, it stays short and free of
history, and the benchmarks index names every file under benchmarks/."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def _section(text: str, heading: str) -> str:
    return text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def test_python_snippet_runs_as_written(capsys: pytest.CaptureFixture[str]) -> None:
    (snippet,) = re.findall(r"```python\n(.*?)```", _section(README, "Use it from Python"), flags=re.S)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    video = namespace["video"]
    assert video.shape == (8, 128, 128, 3)
    printed = capsys.readouterr().out
    assert "(8, 128, 128, 3)" in printed and "compute_fraction" in printed
    import dit_accel

    assert dit_accel.get_handle(namespace["pipe"]) is None, "the snippet's remove() must restore the pipeline"


def test_readme_is_short_and_has_no_history() -> None:
    assert len(README.split()) <= 1000
    assert not re.search(r"\bsessions?\b|\bHistory\b|\bpreviously\b", README, flags=re.I)
    assert "TIME_" not in README, "the measured times must be filled in"


def test_benchmarks_index_names_every_file() -> None:
    index = (REPO / "benchmarks" / "README.md").read_text(encoding="utf-8")
    tracked = subprocess.run(["git", "ls-files", "benchmarks"], cwd=REPO, capture_output=True, text=True)
    files = tracked.stdout.split() if tracked.returncode == 0 and tracked.stdout else [
        str(p.relative_to(REPO)) for p in (REPO / "benchmarks").rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    missing = []
    for path in files:
        relative = path.removeprefix("benchmarks/")
        if relative == "README.md":
            continue
        folder, _, name = relative.rpartition("/")
        # a file is named by its path, or (in a table row of its folder) by the folder and its own name
        if f"`{relative}`" not in index and not (folder and f"`{folder}/`" in index and f"`{name}`" in index):
            suffix_form = f"`.{name.rpartition('.')[2]}`"
            stem = relative.rpartition(".")[0]
            if not any(f"`{stem}.{ext}`" in index for ext in ("json", "md", "py")) or suffix_form not in index:
                missing.append(relative)
    assert not missing, f"benchmarks/README.md does not list: {missing}"
