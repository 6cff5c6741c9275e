"""Every ``dit_accel`` module imports on its own, in an interpreter where no other ``dit_accel`` module was
imported before: an import cycle or a module that only works after another one was imported fails here.

One subprocess (this file run as a script) imports the third-party modules ``dit_accel`` names (torch,
diffusers, ...: seconds that would otherwise be paid per module) and byte-compiles the package, then forks a
fresh child per ``dit_accel`` module, two at a time; each child imports its module and nothing else of
``dit_accel``. ``__main__`` modules are
left out: importing one runs its program.
"""

from __future__ import annotations

import ast
import compileall
import importlib
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dit_accel"

HOST_ONLY = {"comfy_api": "dit_accel.comfy.nodes_v3"}
"""Packages that exist only inside a host application, and the one module allowed to need each: ComfyUI's
``comfy_api`` is importable only in a running ComfyUI, where the V3 nodes load."""


def package_modules() -> list[str]:
    """Dotted names of every module of the ``dit_accel`` source tree (``__main__`` modules left out)."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__main__":
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(parts))
    return names


def third_party_imports() -> list[tuple[str, tuple[str, ...]]]:
    """The non-``dit_accel`` imports at the top level of the package's modules: ``(module, names taken from
    it)`` (names matter for lazily loading packages such as diffusers)."""
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    found.setdefault(alias.name, set())
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.setdefault(node.module, set()).update(alias.name for alias in node.names)
    return sorted((m, tuple(sorted(names))) for m, names in found.items()
                  if m.split(".")[0] != "dit_accel" and m != "__future__")


def _import_alone(name: str) -> tuple[str, str | None]:
    """In a forked child: import ``name``; the traceback when it fails."""
    assert not any(m == "dit_accel" or m.startswith("dit_accel.") for m in sys.modules), "parent imported dit_accel"
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as err:
        if HOST_ONLY.get((err.name or "").split(".")[0]) == name:
            return name, None
        return name, traceback.format_exc()
    except BaseException:  # noqa: BLE001 - reported to the parent
        return name, traceback.format_exc()
    return name, None


def _main() -> None:
    for name, attributes in third_party_imports():
        try:
            module = importlib.import_module(name)
            for attribute in attributes:
                getattr(module, attribute, None)
        except ImportError:
            pass  # optional dependencies (the child reports it if a module needs one)
    with tempfile.TemporaryDirectory() as cache:
        # byte-compile the package once (out of the tree), so that no child compiles it again
        sys.pycache_prefix, sys.dont_write_bytecode = cache, False
        compileall.compile_dir(PACKAGE, quiet=1)
        with multiprocessing.get_context("fork").Pool(2, maxtasksperchild=1) as pool:
            results = pool.map(_import_alone, package_modules(), chunksize=1)
    print(json.dumps({name: error for name, error in results}))


def test_every_module_imports_alone() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(Path(__file__))], capture_output=True, text=True, timeout=600,
                          env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(results) == set(package_modules())
    failed = {name: error for name, error in results.items() if error is not None}
    assert not failed, "\n".join(f"{name}:\n{error}" for name, error in failed.items())


if __name__ == "__main__":
    _main()
