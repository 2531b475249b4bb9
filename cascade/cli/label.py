"""``cascade label``: name the unlabelled cases whose labels would change the tuning decision.

Writes one JSON object a line (``id``, ``why``, the rungs' answers, ...), best first; an empty
file when no label would change the decision. With ``--judge CONFIG`` a strong model (the
config's last rung) grades them: each line then carries ``"correct": {rung: bool}`` and
``"label_source": "judge"``, and ``cascade tune --labels NEEDS.jsonl`` uses them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from cascade.cli._args import int_in
from cascade.cli._suites import STDOUT, load_ladder, load_table
from cascade.config import CascadeConfig
from cascade.suite import OutcomeTable
from cascade.suite.cases import read_jsonl
from cascade.tuning.guard import DELTA, MAX_DROP

__all__ = ["CONFIG_HELP", "add_arguments", "apply_labels", "check_promise", "run"]

CONFIG_HELP = ("the ladder the suites were recorded with: a TOML config, or a shared ladder "
               "JSON (ladder-<chain>.json). Not needed for shared outcome files (the ladder "
               "beside them is used); given with them, a .json replaces that ladder and a TOML "
               "chooses the rungs (its rungs in its order, matched by model name)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``cascade label SUITE... [--config LADDER] [--max-accuracy-drop X] [--max N]
    [--judge CONFIG] --out NEEDS.jsonl``."""
    parser.add_argument("suites", nargs="+", metavar="SUITE",
                        help="recorded suite folders/files, or shared outcome JSONL files, in "
                             "which some cases carry no label")
    parser.add_argument("--config", help=CONFIG_HELP)
    parser.add_argument("--max-accuracy-drop", type=float, default=MAX_DROP,
                        help=f"the promise the tuning will be asked for (default {MAX_DROP})")
    parser.add_argument("--delta", type=float, default=DELTA,
                        help=f"the guard's one-sided level, as for tune (default {DELTA:g})")
    parser.add_argument("--max", type=int_in(0), default=None, metavar="N",
                        help="name at most N cases (the most useful first)")
    parser.add_argument("--labels", action="append", default=[], metavar="FILE",
                        help="labels given so far (NEEDS.jsonl lines with \"correct\"); repeat")
    parser.add_argument("--judge", metavar="CONFIG",
                        help="grade the needed cases with this config's last rung (a strong "
                             "model); its cost is reported and its verdicts marked as judge "
                             "labels")
    parser.add_argument("--out", required=True,
                        help="where to write NEEDS.jsonl (- for standard output; the summary "
                             "then goes to standard error)")


def check_promise(max_drop: float | None, delta: float, max_cost: float | None = None) -> None:
    """Refuse promise numbers that would bend the guard silently: a delta outside (0, 0.5)
    was clamped (0.7 or 5 to 0.5, a margin of zero standard errors), a NaN made every bound
    NaN (nothing passes and the report blames the suite)."""
    from cascade.errors import ConfigError

    if not (math.isfinite(delta) and 0.0 < delta < 0.5):
        raise ConfigError(f"--delta must be a level in (0, 0.5), e.g. {DELTA:g}; got {delta}")
    if max_drop is not None and not (math.isfinite(max_drop) and 0.0 <= max_drop < 1.0):
        raise ConfigError("--max-accuracy-drop must be an accuracy drop in [0, 1), e.g. 0.01; "
                          f"got {max_drop}")
    if max_cost is not None and not (math.isfinite(max_cost) and max_cost >= 0.0):
        raise ConfigError(f"--max-cost-usd must be a finite cost >= 0; got {max_cost}")


def apply_labels(table: OutcomeTable, files: list[str],
                 sources: dict[str, int] | None = None) -> OutcomeTable:
    """``table`` with the labels of NEEDS.jsonl-style ``files`` applied; ``sources`` (when
    given) is filled with how many came from each judge model (``"judge:<model>"``) and how
    many were given otherwise (``"given"``), so a report can say what its labels rest on."""
    from cascade.errors import ConfigError
    from cascade.tuning.label import read_labels

    rows: list[dict[str, Any]] = []
    ids = set(table.case_ids)
    for f in files:
        mine = [row for _i, row in read_jsonl(Path(f))]
        named = [str(row.get("id")) for row in mine]
        if mine and not ids.intersection(named):  # the labels of another suite: nothing fits
            raise ConfigError(f"no line names a case of the suite (e.g. {named[0]!r}): the "
                              "labels of another suite?", source=f)
        rows.extend(mine)
    labels = read_labels(rows, ", ".join(files))
    known = set(table.labels)
    stray = sorted(cid for cid in labels if cid not in ids)
    if stray:  # labels kept from a wider or older recording: said, never a silent no-op
        print(f"cascade: {len(stray)} label(s) name cases the suite does not hold (e.g. "
              f"{stray[0]!r}); not used", file=sys.stderr)
        labels = {cid: got for cid, got in labels.items() if cid in ids}
    for cid, got in labels.items():
        if set(got) != known:
            raise ConfigError(f"the label of case {cid!r} must grade every rung "
                              f"({', '.join(sorted(known))})", source=", ".join(files))
    if sources is not None:
        for row in rows:
            if str(row.get("id")) in labels and row.get("correct") is not None:
                k = (f"judge:{row.get('judge_model') or 'unknown'}"
                     if row.get("label_source") == "judge" else "given")
                sources[k] = sources.get(k, 0) + 1
    col = {r.label: j for j, r in enumerate(table.rungs)}
    row_of = {cid: i for i, cid in enumerate(table.case_ids)}
    lab = table.is_labelled
    contra = [cid for cid, got in labels.items() if lab[row_of[cid]] and any(
        bool(table.correct[row_of[cid], col[k]]) != v for k, v in got.items())]
    if contra:  # the newest label wins, but replacing a grade is said, never silent
        print(f"cascade: {len(contra)} label(s) contradict the grade the suite holds (e.g. "
              f"{contra[0]!r}); the labels given replace it", file=sys.stderr)
    return table.with_labels(labels)


def run(ns: argparse.Namespace) -> int:
    """Find the needed labels (and judge them), write NEEDS.jsonl, print a summary; exit 3
    (a provider failed) when the judge's endpoint failed, 130 when judging was interrupted,
    after writing what it judged. A run that fails leaves no empty --out it created."""
    check_promise(ns.max_accuracy_drop, ns.delta)
    judge = load_ladder(ns.judge) if ns.judge else None  # a bad --judge fails now, not later
    table = apply_labels(load_table(ns.suites, ns.config), ns.labels)
    out = None if ns.out == STDOUT else Path(ns.out)
    made = out is not None and not out.exists()
    if out is not None:  # an unwritable --out fails before the judge is paid, not after
        out.open("a", encoding="utf-8").close()
    try:
        return _label(ns, table, judge, out)
    except BaseException:
        if made and out is not None and out.stat().st_size == 0:
            out.unlink()  # an empty NEEDS.jsonl would read as "no label would change it"
        raise


def _label(ns: argparse.Namespace, table: OutcomeTable, judge: CascadeConfig | None,
           out: Path | None) -> int:
    from cascade.cli import EXIT_INTERRUPTED, EXIT_NO_ANSWER
    from cascade.secrets import mask_credentials
    from cascade.tuning.label import JudgingInterrupted, judge_labels, needed_labels

    needs = needed_labels(table, max_drop=ns.max_accuracy_drop, delta=ns.delta, max_n=ns.max)
    total = len(needs)
    if ns.max is not None:  # the count said is of all the labels needed, not the truncation
        total = max(total, len(needed_labels(table, max_drop=ns.max_accuracy_drop,
                                             delta=ns.delta)))
    rows = [n.to_dict(table) for n in needs]
    unlabelled = table.n - table.n_labelled
    summary = (f"{total} of {unlabelled} unlabelled cases need a label "
               f"({table.n_labelled} of {table.n} labelled)")
    if len(rows) < total:
        summary += f"; the first {len(rows)} written (--max {ns.max})"
    failure, code = "", EXIT_NO_ANSWER
    if judge is not None and needs:
        try:
            res = judge_labels(table, needs, judge)
        except JudgingInterrupted as stopped:  # the verdicts paid for are written, exit 130
            res = stopped.result
        for row in rows:
            got = res.labels.get(row["id"])
            if got is not None:
                row.update(correct=got, label_source="judge", judge_model=res.model)
        cost = (f"${res.cost_usd:.4f}" if res.price_known
                else "cost unknown (the judge rung's price is \"unknown\")")
        summary += (f"; judged by {res.model}: {len(res.labels)} labelled in {res.calls} "
                    f"calls, {cost}")
        if res.unjudged:
            summary += f", {len(res.unjudged)} without a clear verdict"
        if res.interrupted is not None:
            code = EXIT_INTERRUPTED
            failure = (f"cascade: judging interrupted ({res.interrupted} calls in flight were "
                       "cut off, not in the cost); the "
                       f"{len(rows) - len(res.labels)} cases it did not label are written "
                       "without a label (run again to judge them)")
        elif res.error is not None:
            e = res.error
            tries = f" (after {e.tries} tries)" if e.tries > 1 else ""
            where = mask_credentials(res.endpoint)
            failure = (f"cascade: the judge {res.model} at {where} failed{tries}: "
                       f"{type(e).__name__}: {e}; judging stopped, the "
                       f"{len(rows) - len(res.labels)} cases it did not label are written "
                       "without a label (run again to judge them)")
    if out is None:
        for row in rows:
            sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(summary, file=sys.stderr)
    else:
        with out.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(summary)
        print(f"wrote {ns.out}", file=sys.stderr)
    if failure:
        print(failure, file=sys.stderr)
        return code
    return 0
