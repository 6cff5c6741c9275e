"""Validation of option values: one set of checks, so that every config rejects a bad value alike.

Each check raises ``ValueError`` naming the option, the bad value and what is allowed, e.g.
``top_p must be in (0.0, 1.0], got 1.5`` or ``interval must be an int >= 1, got 0``.
"""

from __future__ import annotations

import math
from typing import Any, Iterable


def check_number(name: str, value: Any, lo: float, hi: float | None = None, *, lo_open: bool = False,
                 hi_open: bool = False, integer: bool = False, allow_none: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a number (an int when ``integer``) in the range from ``lo`` to
    ``hi`` (``None``: no upper bound), each end included unless ``lo_open`` / ``hi_open``.

    bools and NaN are refused; ``None`` passes when ``allow_none``. A range with only a lower bound reads
    ``>= lo`` (``an int >= lo`` for ints); a two-sided range names the interval.
    """
    if value is None and allow_none:
        return
    kind = "an int" if integer else "a number"
    if hi is None:
        bound = f"> {lo}" if lo_open else f">= {lo}"
    else:
        bound = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    bad_type = (isinstance(value, bool) or not isinstance(value, (int, float))
                or (integer and not isinstance(value, int)) or (isinstance(value, float) and math.isnan(value)))
    if bad_type:
        raise ValueError(f"{name} must be {kind} {bound}, got {value!r}")
    below = value <= lo if lo_open else value < lo
    above = hi is not None and (value >= hi if hi_open else value > hi)
    if below or above:
        # one-sided int ranges say "an int": "must be >= 1" alone would read as if 1.5 were allowed
        raise ValueError(f"{name} must be {kind + ' ' if integer and hi is None else ''}{bound}, got {value!r}")


def check_choice(name: str, value: Any, choices: Iterable[Any], *, spelled: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices`` (a bool never stands for 0 or 1).

    The message lists the choices as a tuple (``must be one of ('tile', 'kmeans')``) or, with ``spelled``, as
    words (``must be 0, 1 or 2``), which reads better for two or three short values.
    """
    choices = tuple(choices)
    if (isinstance(value, bool) and not any(isinstance(c, bool) for c in choices)) or value not in choices:
        if spelled and len(choices) > 1:
            allowed = ", ".join(repr(c) for c in choices[:-1]) + f" or {choices[-1]!r}"
        else:
            allowed = f"one of {choices}"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is a bool."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")


def check_options(owner: str, options: Iterable[str], allowed: Iterable[str]) -> None:
    """Raise ``ValueError`` naming the options of ``options`` that ``owner`` (e.g. ``attention method 'draft'``)
    does not take, and the ones it does."""
    allowed = sorted(allowed)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {owner}; allowed options: {allowed}")
