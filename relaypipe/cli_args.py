"""argparse types shared by the command lines: a bad value is a usage error that says why.

Each is a plain function (argparse calls it with the option's text) named for the help and
error messages (``invalid integer >= 1 value: '0'``).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

__all__ = ["finite_float", "int_at_least", "probability"]


def int_at_least(low: int) -> Callable[[str], int]:
    """An integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def probability(text: str) -> float:
    """A number in [0, 1] (NaN refused)."""
    value = _number(text)
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


probability.__name__ = "number in [0, 1]"


def finite_float(text: str) -> float:
    """A finite number (no inf, no NaN)."""
    value = _number(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


finite_float.__name__ = "finite number"
