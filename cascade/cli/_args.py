"""Argument types the commands share: a number out of range is a usage error (exit 2) naming
the flag's rule, never a traceback later or a value silently bent into range."""

from __future__ import annotations

import argparse
from collections.abc import Callable

__all__ = ["int_in", "seconds"]


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
