"""diffusers' own transformer tests of the supported families, run stock and with dit-accel on every model.

Runs the test files below twice with pytest (in a diffusers source checkout, against the *installed* diffusers):
once stock, once with ``benchmarks/diffusers_peer_plugin.py`` applying ``dit_accel.apply(model,
attention=<method>)`` to every transformer the tests build. Writes per test the stock and the dit-accel outcome
(``passed``, ``failed``, ``error``, ``skipped``) and a summary whose ``regressions`` are the tests that pass stock
and fail with dit-accel (the goal: none). Tests diffusers skips on CPU (accelerator-only, ``@slow``) are skipped
here too.

The diffusers test files are not part of this repository: check out the diffusers source of the installed
version into a folder outside the repo and pass it, e.g.::

    git clone https://github.com/huggingface/diffusers /tmp/diffusers-src
    git -C /tmp/diffusers-src checkout v0.42.1          # the pinned version (pip show diffusers)
    python benchmarks/diffusers_peer_suite.py --diffusers-src /tmp/diffusers-src --workers 2

(``--source-label`` records which commit the tests came from when the folder is not a git checkout.)
``PYTHONPATH`` is passed on to pytest, e.g. with a folder holding ``peft`` so the LoRA tests run instead of
skipping. ``models_patched`` in the result counts the models dit-accel was applied to in the second run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = Path(__file__).resolve().parent
DEFAULT_OUT = BENCHMARKS / "results" / "diffusers_peer_suite.json"

TEST_FILES = {
    "wan": "tests/models/transformers/test_models_transformer_wan.py",
    "hunyuan_video": "tests/models/transformers/test_models_transformer_hunyuan_video.py",
    "cogvideox": "tests/models/transformers/test_models_transformer_cogvideox.py",
    "ltx_video": "tests/models/transformers/test_models_transformer_ltx.py",
    "flux": "tests/models/transformers/test_models_transformer_flux.py",
    "pixart": "tests/models/transformers/test_models_pixart_transformer2d.py",
    "sd3": "tests/models/transformers/test_models_transformer_sd3.py",
}
"""diffusers test file of each family's transformer."""


def _outcome(case: ET.Element) -> tuple[str, str | None]:
    """``(outcome, first line of the message)`` of one JUnit ``testcase``."""
    for tag in ("failure", "error", "skipped"):
        node = case.find(tag)
        if node is not None:
            message = (node.get("message") or node.text or "").strip().splitlines()
            outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
            return outcome, (message[0][:300] if message else None)
    return "passed", None


def parse_junit(path: Path) -> dict[str, dict[str, Any]]:
    """Test id (``file::Class::name``) -> ``{"outcome", "message", "seconds"}`` from a JUnit XML report."""
    out: dict[str, dict[str, Any]] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        classname = case.get("classname", "")
        parts = classname.split(".")
        module = next((i for i, p in enumerate(parts) if p.startswith("test_")), len(parts) - 1)
        test_id = "/".join(parts[: module + 1]) + ".py::" + "::".join(parts[module + 1 :] + [case.get("name", "")])
        outcome, message = _outcome(case)
        # a teardown error after a pass is reported as a second entry; the worse outcome wins
        previous = out.get(test_id)
        if previous is not None and previous["outcome"] in ("failed", "error"):
            continue
        out[test_id] = {"outcome": outcome, "message": message, "seconds": round(float(case.get("time", 0.0)), 2)}
    return out


def run_suite(src: Path, files: list[str], method: str | None, workers: int, timeout: int, junit: Path) -> tuple[float, int]:
    """One pytest run in ``src``; dit-accel applied to every transformer when ``method`` is set.
    Returns the seconds it took and the number of models dit-accel was applied to."""
    count_file = junit.with_suffix(".count")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(BENCHMARKS), env.get("PYTHONPATH", "")])
    env["HF_HUB_OFFLINE"] = "1"
    env["DIT_ACCEL_PEER_METHOD"] = method or ""
    env["DIT_ACCEL_PEER_COUNT_FILE"] = str(count_file)
    cmd = [sys.executable, "-m", "pytest", *files, "-p", "diffusers_peer_plugin", f"--junitxml={junit}",
           "-q", "-p", "no:cacheprovider", f"--timeout={timeout}", "-o", "junit_family=xunit1"]
    if workers > 1:
        cmd += ["-n", str(workers)]
    start = time.time()
    subprocess.run(cmd, cwd=src, env=env, check=False)
    seconds = time.time() - start
    patched = sum(int(line) for line in count_file.read_text().split()) if count_file.exists() else 0
    return seconds, patched


def _git_commit(path: Path) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def summarize(stock: dict[str, dict[str, Any]], ours: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Counts per outcome and the tests whose outcome changed (regressions: passed stock, failed with dit-accel)."""
    ids = sorted(set(stock) | set(ours))
    bad = ("failed", "error")

    def outcome(results: dict, test_id: str) -> str:
        return results.get(test_id, {}).get("outcome", "missing")

    def counts(results: dict) -> dict[str, int]:
        out: dict[str, int] = {}
        for test_id in ids:
            o = outcome(results, test_id)
            out[o] = out.get(o, 0) + 1
        return out

    return {
        "tests": len(ids),
        "stock": counts(stock),
        "ours": counts(ours),
        "regressions": [t for t in ids if outcome(stock, t) == "passed" and outcome(ours, t) in bad + ("missing",)],
        "fixed": [t for t in ids if outcome(stock, t) in bad and outcome(ours, t) == "passed"],
        "changed": [t for t in ids if outcome(stock, t) != outcome(ours, t)],
    }


def main(argv: list[str] | None = None) -> int:
    """Run both suites and write the JSON result; exit status 1 when there are regressions."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--diffusers-src", type=Path, required=True, help="diffusers source checkout holding tests/")
    parser.add_argument("--source-label", default=None, help="where the test files came from (default: its git commit)")
    parser.add_argument("--families", nargs="+", default=list(TEST_FILES), choices=list(TEST_FILES))
    parser.add_argument("--method", default="full", help="dit-accel attention method applied in the second run")
    parser.add_argument("--workers", type=int, default=2, help="pytest-xdist workers (1: no xdist)")
    parser.add_argument("--timeout", type=int, default=600, help="per-test timeout in seconds (pytest-timeout)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    import diffusers
    import torch

    src = args.diffusers_src.resolve()
    files = [TEST_FILES[f] for f in args.families]
    missing = [f for f in files if not (src / f).is_file()]
    if missing:
        parser.error(f"not in {src}: {missing}")
    with tempfile.TemporaryDirectory() as tmp:
        stock_s, _ = run_suite(src, files, None, args.workers, args.timeout, Path(tmp) / "stock.xml")
        ours_s, patched = run_suite(src, files, args.method, args.workers, args.timeout, Path(tmp) / "ours.xml")
        stock = parse_junit(Path(tmp) / "stock.xml")
        ours = parse_junit(Path(tmp) / "ours.xml")

    summary = summarize(stock, ours)
    tests = {
        t: {"stock": stock.get(t, {}).get("outcome", "missing"), "ours": ours.get(t, {}).get("outcome", "missing"),
            **({"ours_message": ours[t]["message"]} if t in ours and ours[t]["outcome"] in ("failed", "error") else {}),
            **({"stock_message": stock[t]["message"]} if t in stock and stock[t]["outcome"] in ("failed", "error") else {})}
        for t in sorted(set(stock) | set(ours))
    }
    result = {
        "what": "diffusers' own transformer tests of the supported families, stock vs dit_accel.apply on every model",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"cpu ({platform.machine()})",
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__},
        "dit_accel_commit": _git_commit(REPO),
        "diffusers_tests_source": args.source_label or _git_commit(src) or str(src),
        "files": files,
        "method": f"{args.method} (min_seq_len=0)",
        "workers": args.workers,
        "timeout_s": args.timeout,
        "seconds": {"stock": round(stock_s, 1), "ours": round(ours_s, 1)},
        "models_patched": patched,
        "summary": summary,
        "tests": tests,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "changed"} | {"changed": len(summary["changed"])}, indent=1))
    return 1 if summary["regressions"] else 0


if __name__ == "__main__":
    sys.exit(main())
