"""argparse value types shared by the `dit-accel` subcommands, so every command rejects bad numbers alike."""

from __future__ import annotations

import argparse
from typing import Callable


def _number(kind: type, minimum: float, strict: bool, what: str) -> Callable[[str], float]:
    def parse(text: str):  # type: ignore[no-untyped-def]
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


positive_int = _number(int, 0, True, "a positive integer")
"""An integer > 0."""
non_negative_int = _number(int, 0, False, "an integer >= 0")
"""An integer >= 0."""
non_negative_float = _number(float, 0.0, False, "a number >= 0")
"""A float >= 0."""


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum`` (its message names the bound)."""
    return _number(int, minimum, False, f"an integer >= {minimum}")  # type: ignore[return-value]
