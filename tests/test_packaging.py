"""What the wheel ships: the runtime package only; the testbed's training code stays in training/."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from setuptools import find_packages

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]


def _wheel_packages() -> list[str]:
    """The packages setuptools puts in the wheel, from pyproject's own discovery settings."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    find = config["tool"]["setuptools"]["packages"]["find"]
    return find_packages(where=str(REPO), include=find["include"], exclude=find.get("exclude", ()))


def test_wheel_holds_the_runtime_and_no_training_code() -> None:
    packages = _wheel_packages()
    assert "dit_accel" in packages and "dit_accel.testbed" in packages
    assert all(p == "dit_accel" or p.startswith("dit_accel.") for p in packages), packages
    assert (REPO / "training" / "trainer.py").is_file() and (REPO / "training" / "classifier.py").is_file()
    trainers = []
    for package in packages:
        for path in (REPO / package.replace(".", "/")).glob("*.py"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                    assert not any(n == "training" or n.startswith("training.") for n in names), path
                if isinstance(node, ast.FunctionDef) and node.name in ("train_dit", "train_autoencoder", "train_classifier"):
                    trainers.append(f"{path.relative_to(REPO)}:{node.name}")
    assert not trainers, f"training code in the wheel: {trainers}"
