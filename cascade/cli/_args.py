"""Argument types the commands share: a number out of range is a usage error (exit 2) naming
the flag's rule, never a traceback later or a value silently bent into range."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

__all__ = ["finite", "int_in", "seconds"]


def int_in(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An integer from ``lo`` (to ``hi``): ``--port 99999`` wrapped round to another port,
    ``--seed -1`` crashed numpy, ``--concurrency 0`` was quietly taken as 1."""
    what = f"an integer from {lo} to {hi}" if hi is not None else f"an integer >= {lo}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value

    return parse


def seconds(text: str) -> float:
    """A time limit: a number > 0 (NaN broke a deadline with a traceback, and 0 or less failed
    everything, a check that could never pass); inf means no limit of ours."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return value


def finite(what: str, *, zero: bool = False) -> Callable[[str], float]:
    """A finite number > 0 (>= 0 with ``zero``): argparse's ``float`` takes ``nan``, ``inf``
    and ``-1``, which then failed as a configuration error naming no flag."""
    rule = ">= 0" if zero else "> 0"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
            raise argparse.ArgumentTypeError(f"must be {what}, a finite number {rule}, "
                                             f"got {text!r}")
        return value

    return parse
