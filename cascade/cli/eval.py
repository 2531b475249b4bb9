"""``cascade eval``: replay suites through a config and report quality and cost."""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from cascade.cli._suites import load_ladder, load_table
from cascade.evaluate import evaluate, format_report
from cascade.suite import load_outcome_table

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``cascade eval SUITE... [--config FILE] [--json]``."""
    parser.add_argument("suites", nargs="+", metavar="SUITE",
                        help="recorded suite folders/files, or shared outcome JSONL files")
    parser.add_argument("--config",
                        help="the cascade to evaluate (TUNED.toml; a shared ladder JSON is "
                             "read as its rungs with no verifier; default: $CASCADE_CONFIG, "
                             "./cascade.toml, else the embedded local ladder)")
    parser.add_argument("--recorded-with",
                        help="the ladder the suites were recorded with, when --config holds "
                             "only some of its rungs (default: --config; for shared outcome "
                             "files, the ladder beside them): a TOML config or a shared ladder "
                             "JSON, as tune's --config")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(ns: argparse.Namespace) -> int:
    """Evaluate and print."""
    if ns.config is None:  # as every command's --config defaults
        from cascade.defaults import resolve_config

        config = resolve_config()
    else:
        config = load_ladder(ns.config)
    if ns.recorded_with:  # read as tune and label read their --config
        table = load_table(ns.suites, ns.recorded_with)
    else:  # shared outcome files keep the ladder beside them
        table = load_outcome_table(ns.suites, config)
    rep = evaluate(table, config)
    print(json.dumps(_json_safe(rep), indent=2, allow_nan=False) if ns.json
          else format_report(rep))
    return 0


def _json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinity (an accuracy over no graded case) as ``null``:
    JSON has no such numbers, and ``NaN`` on standard output breaks every JSON reader."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
