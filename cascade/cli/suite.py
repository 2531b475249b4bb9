"""``cascade suite from-log``: turn audit logs of served traffic into a recorded suite."""

from __future__ import annotations

import argparse
import json
import sys

from cascade.cli._args import int_in

__all__ = ["add_arguments", "run"]

_GRADERS = ("exact", "normalised", "contains", "numeric", "choice")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``cascade suite from-log AUDIT.jsonl... --out SUITE_DIR [--since ...] [--sample N]``."""
    sub = parser.add_subparsers(dest="suite_command", required=True, metavar="from-log")
    p = sub.add_parser(
        "from-log", help="build a recorded suite (cases + recordings) from audit logs",
        description="Build a recorded suite from audit logs: the prompts, every rung answer the "
                    "climb saw, the top rung's shadow answers, and feedback as labels. Then "
                    "`cascade label` names the cases worth labelling and `cascade tune` retunes.")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="log progress (INFO) to standard error")
    p.add_argument("logs", nargs="+", metavar="AUDIT.jsonl",
                   help="audit log files (rotated ones too: AUDIT.jsonl.1 ...)")
    p.add_argument("--out", required=True, metavar="SUITE_DIR",
                   help="folder to write cases.jsonl and recordings.jsonl into")
    p.add_argument("--since", help="only requests at or after this time: Unix seconds or an "
                                   "ISO date/time (UTC unless a zone is given)")
    p.add_argument("--sample", type=int, metavar="N",
                   help="keep N distinct prompts, drawn at random (deterministic with --seed)")
    p.add_argument("--seed", type=int_in(0), default=0, help="seed of --sample (default 0)")
    p.add_argument("--config", help="the ladder that served the traffic: recordings get its "
                                    "rungs' exact call keys (else model + messages keys, which "
                                    "replay and tune also match)")
    p.add_argument("--grader", choices=_GRADERS, default="normalised",
                   help="how the cases' labels are compared with answers (default normalised)")
    p.add_argument("--force", action="store_true", help="replace a suite already in SUITE_DIR")
    p.add_argument("--json", action="store_true", help="print the counts as JSON")


def run(ns: argparse.Namespace) -> int:
    """Build and write the suite; print what was kept and skipped."""
    from cascade.config import load_config
    from cascade.suite.fromlog import build_suite, parse_since, write_suite

    config = load_config(ns.config) if ns.config else None
    since = parse_since(ns.since) if ns.since is not None else None
    suite = build_suite(ns.logs, since=since, sample=ns.sample, seed=ns.seed, config=config,
                        grader=ns.grader)
    out = write_suite(ns.out, suite, force=ns.force)
    st = suite.stats
    if ns.json:
        print(json.dumps({**st.to_dict(), "out": str(out)}))
        return 0
    print(f"{st.cases} cases ({st.labelled} labelled) and {st.recordings} recordings from "
          f"{st.requests} logged requests → {out}")
    skipped = {"redacted (no messages)": st.redacted, "before --since": st.before_since,
               "unreadable lines": st.bad_lines, "feedback without its request":
               st.feedback_unmatched, "feedback from another client than the request's":
               st.feedback_other_client, "attempts of rungs not in --config": st.unknown_rungs,
               "lines read twice (overlapping logs)": st.duplicate_lines}
    for what, n in skipped.items():
        if n:
            print(f"skipped {n} {what}", file=sys.stderr)
    if st.secrets_cut:
        print(f"cut {st.secrets_cut} occurrence(s) of a key from the logs' text",
              file=sys.stderr)
    if st.cases > st.labelled:
        print(f"{st.cases - st.labelled} cases have no label: `cascade label {out}` names the "
              "ones that matter", file=sys.stderr)
    return 0
