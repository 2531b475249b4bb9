"""``cascade label``: name the unlabelled cases whose labels would change the tuning decision.

Writes one JSON object a line (``id``, ``why``, the rungs' answers, ...), best first; an empty
file when no label would change the decision. With ``--judge CONFIG`` a strong model (the
config's last rung) grades them: each line then carries ``"correct": {rung: bool}`` and
``"label_source": "judge"``, and ``cascade tune --labels NEEDS.jsonl`` uses them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cascade.config import load_config
from cascade.suite import OutcomeTable, load_outcome_table
from cascade.tuning.guard import DELTA

__all__ = ["add_arguments", "apply_labels", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``cascade label SUITE... [--config LADDER] [--max-accuracy-drop X] [--max N]
    [--judge CONFIG] --out NEEDS.jsonl``."""
    parser.add_argument("suites", nargs="+", metavar="SUITE",
                        help="recorded suite folders/files, or shared outcome JSONL files, in "
                             "which some cases carry no label")
    parser.add_argument("--config", help="the ladder the suites were recorded with (not needed "
                                         "for shared outcome files)")
    parser.add_argument("--max-accuracy-drop", type=float, default=0.01,
                        help="the promise the tuning will be asked for (default 0.01)")
    parser.add_argument("--delta", type=float, default=DELTA,
                        help=f"the guard's one-sided level, as for tune (default {DELTA:g})")
    parser.add_argument("--max", type=int, default=None, metavar="N",
                        help="name at most N cases (the most useful first)")
    parser.add_argument("--labels", action="append", default=[], metavar="FILE",
                        help="labels given so far (NEEDS.jsonl lines with \"correct\"); repeat")
    parser.add_argument("--judge", metavar="CONFIG",
                        help="grade the needed cases with this config's last rung (a strong "
                             "model); its cost is reported and its verdicts marked as judge "
                             "labels")
    parser.add_argument("--out", required=True, help="where to write NEEDS.jsonl")


def apply_labels(table: OutcomeTable, files: list[str]) -> OutcomeTable:
    """``table`` with the labels of NEEDS.jsonl-style ``files`` applied."""
    from cascade.errors import ConfigError
    from cascade.tuning.label import read_labels

    rows: list[dict[str, Any]] = []
    for f in files:
        try:
            text = Path(f).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot read: {e.strerror}", source=f) from None
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as e:
                    raise ConfigError(f"line {i} is not valid JSON: {e}", source=f) from None
    labels = read_labels(rows)
    known = set(table.labels)
    for cid, got in labels.items():
        if set(got) != known:
            raise ConfigError(f"the label of case {cid!r} must grade every rung "
                              f"({', '.join(sorted(known))})", source=", ".join(files))
    return table.with_labels(labels)


def run(ns: argparse.Namespace) -> int:
    """Find the needed labels (and judge them), write NEEDS.jsonl, print a summary."""
    from cascade.tuning.label import judge_labels, needed_labels

    config = load_config(ns.config) if ns.config else None
    table = apply_labels(load_outcome_table(ns.suites, config), ns.labels)
    needs = needed_labels(table, max_drop=ns.max_accuracy_drop, delta=ns.delta, max_n=ns.max)
    rows = [n.to_dict(table) for n in needs]
    unlabelled = table.n - table.n_labelled
    summary = (f"{len(rows)} of {unlabelled} unlabelled cases need a label "
               f"({table.n_labelled} of {table.n} labelled)")
    if ns.judge and needs:
        res = judge_labels(table, needs, load_config(ns.judge))
        for row in rows:
            got = res.labels.get(row["id"])
            if got is not None:
                row.update(correct=got, label_source="judge", judge_model=res.model)
        summary += (f"; judged by {res.model}: {len(res.labels)} labelled in {res.calls} "
                    f"calls, ${res.cost_usd:.4f}")
        if res.unjudged:
            summary += f", {len(res.unjudged)} without a clear verdict"
    with Path(ns.out).open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(summary)
    print(f"wrote {ns.out}", file=sys.stderr)
    return 0
