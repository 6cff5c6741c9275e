"""Schedule files: the JSON that ``dit-accel calibrate`` writes and the ``fixed``/``procache`` schedulers read.

Format (``format: "dit-accel-cache-schedule"``, ``version: 1``)::

    {
      "format": "dit-accel-cache-schedule", "version": 1,
      "model": "testbed", "num_steps": 20, "budget": 0.5, "num_blocks": 6,
      "schedule": [1, 1, 0, 1, 0, 2, ...],      # 1 compute, 0 reuse, 2 selective (deep blocks)
      "selective_blocks": 1, "guardrails": {...}, "compute_fraction": 0.5,
      "errors": {"step_change": [...], "reuse_error": [[...]], "expected_cost": 0.12, ...},
      "created": "2026-11-22T07:00:00Z", ...
    }
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

SCHEDULE_FORMAT = "dit-accel-cache-schedule"
"""Value of the ``format`` key of a schedule file."""
SCHEDULE_VERSION = 1
"""Current schedule file version."""


def resample_schedule(schedule: list[int], num_steps: int) -> list[int]:
    """Nearest-neighbour resampling of a per-step schedule to ``num_steps`` steps (first and last kept)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    n = len(schedule)
    if n == num_steps:
        return list(schedule)
    if num_steps == 1:
        return [schedule[-1]]
    scale = (n - 1) / (num_steps - 1)
    return [schedule[int(i * scale + 0.5)] for i in range(num_steps)]


def validate_schedule_data(data: Any, source: str = "schedule") -> dict[str, Any]:
    """Check a loaded schedule dict; raises ``ValueError`` naming what is wrong."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
    if data.get("format") != SCHEDULE_FORMAT:
        raise ValueError(f"{source}: 'format' must be {SCHEDULE_FORMAT!r}, got {data.get('format')!r}")
    if data.get("version") != SCHEDULE_VERSION:
        raise ValueError(f"{source}: unsupported version {data.get('version')!r}; supported: {SCHEDULE_VERSION}")
    schedule = data.get("schedule")
    if not isinstance(schedule, list) or not schedule or any(v not in (0, 1, 2) or isinstance(v, bool) for v in schedule):
        raise ValueError(f"{source}: 'schedule' must be a non-empty list of 0/1/2, got {schedule!r}")
    if data.get("num_steps") != len(schedule):
        raise ValueError(f"{source}: 'num_steps' {data.get('num_steps')!r} != len(schedule) {len(schedule)}")
    return data


def load_schedule(path: str | Path) -> dict[str, Any]:
    """Read and validate a schedule file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"schedule file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    return validate_schedule_data(data, str(path))


def save_schedule(data: dict[str, Any], path: str | Path) -> Path:
    """Validate and write a schedule file atomically; returns the path."""
    validate_schedule_data(data)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
