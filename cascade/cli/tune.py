"""``cascade tune``: tune rungs and thresholds on recorded suites and write TUNED.toml."""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path

from cascade.cli._args import int_in
from cascade.cli._suites import check_out_path, load_table, refuse_stdout
from cascade.cli.label import CONFIG_HELP, apply_labels, check_promise
from cascade.config import CascadeConfig, parse_config
from cascade.tuning import format_report, to_toml, tune
from cascade.tuning.guard import DELTA, MAX_DROP
from cascade.tuning.plot import plot_frontier

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``cascade tune SUITE... [--config FILE] [--max-accuracy-drop X | --max-cost-usd X]``."""
    parser.add_argument("suites", nargs="+", metavar="SUITE",
                        help="recorded suite folders/files, or shared outcome JSONL files")
    parser.add_argument("--config", help=CONFIG_HELP)
    goal = parser.add_mutually_exclusive_group()
    goal.add_argument("--max-accuracy-drop", type=float, default=None,
                      help="cheapest setting within this accuracy of the best rung (default "
                           f"{MAX_DROP})")
    goal.add_argument("--max-cost-usd", type=float, default=None,
                      help="most accurate setting under this mean cost per case")
    parser.add_argument("--delta", type=float, default=DELTA,
                        help="the guard's one-sided level: the margin is z(1 - delta) standard "
                             f"errors of the accuracy change (default {DELTA:g})")
    parser.add_argument("--agreement", choices=("off", "all"), default="off",
                        help="all: a rung may also have to agree with the previous one (the "
                             "agreement gate; riskier on small suites, see the README)")
    parser.add_argument("--labels", action="append", default=[], metavar="FILE",
                        help="labels for unlabelled cases (cascade label's NEEDS.jsonl with "
                             "\"correct\" filled, e.g. by --judge); repeat")
    parser.add_argument("--shift-guard", action="store_true",
                        help="recommend the reference rung alone when tuning with some of the "
                             "suite's groups (benchmarks, subjects, first tags) held out broke "
                             "the promise on them; off by default (it costs the saving there)")
    parser.add_argument("--seed", type=int_in(0), default=0,
                        help="seed of the bootstrap and the shift folds (default 0)")
    parser.add_argument("--router", choices=("auto", "off"), default="auto",
                        help="auto: also learn a pre-generation router from the cases' prompts "
                             "and keep it only when it saves under the same guard (default); "
                             "off: never")
    parser.add_argument("--out", required=True,
                        help="where to write TUNED.toml (a file: a router is written beside "
                             "it)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--plot", help="write the frontier as a PNG (needs matplotlib)")


def _warn_unreachable_verifiers(written: CascadeConfig, base: CascadeConfig | None,
                                out: str) -> None:
    """Say so when a verifier's module sits beside the original config but TUNED.toml was
    written to another folder: a config's folder is where its modules are looked for, so the
    file would fail to load where it is (replay builds no verifier, so nothing else shows it)."""
    from cascade.dotted import config_folder

    here = config_folder(base.source) if base is not None else None
    there = config_folder(out)
    if here is None or there is None or here == there:
        return
    for vc in written.verifiers:
        top = vc.name.partition(":")[0].split(".")[0]
        if ":" in vc.name and any((here / f).exists() for f in (f"{top}.py", top)) and not any(
                (there / f).exists() for f in (f"{top}.py", top)):
            print(f"cascade: warning: {out} names verifier {vc.name!r}, whose module {top!r} "
                  f"is beside {base.source if base else ''}, not beside it: write TUNED.toml "
                  "there, or copy the module beside it", file=sys.stderr)


def run(ns: argparse.Namespace) -> int:
    """Tune, write TUNED.toml, print the report."""
    check_promise(ns.max_accuracy_drop, ns.delta, ns.max_cost_usd)
    refuse_stdout("--out", ns.out, "standard output carries the report, and a router is "
                  "written to a file beside TUNED.toml")
    refuse_stdout("--plot", ns.plot, "the frontier is a PNG image")
    check_out_path("--out", ns.out)
    check_out_path("--plot", ns.plot)
    sources: dict[str, int] = {}
    table = apply_labels(load_table(ns.suites, ns.config), ns.labels, sources)
    result = tune(table, max_accuracy_drop=ns.max_accuracy_drop, max_cost_usd=ns.max_cost_usd,
                  delta=ns.delta, seed=ns.seed, agreement=ns.agreement,
                  shift_guard=ns.shift_guard)
    judged = {k.split(":", 1)[1]: v for k, v in sources.items() if k.startswith("judge:")}
    if sources:  # labels a judge model gave are said to be the judge's, never passed as given
        result.report["labels_from_files"] = {"given": sources.get("given", 0),
                                              "judge": judged}
        if judged:
            result.report["notes"].append(
                f"{sum(judged.values())} of the {table.n_labelled} labels are a judge model's "
                f"({', '.join(f'{m}: {v}' for m, v in judged.items())}), not checked by "
                "people: the promise is only as good as the judge.")
    header = (f"Tuned by `cascade tune` on {table.n} cases ({table.source}).\n"
              f"Recommendation: {result.report['recommendation']['describe']}")
    config_out, router_text = result.config, ""
    # a router is not checked under shift: when the shift guard refused the cascade, none
    refused = result.report.get("shift_guard", {}).get("refused_cascade", False)
    if ns.router == "auto" and ns.max_cost_usd is None and table.messages and not refused:
        from cascade.routing import router_toml, tune_router, write_router

        drop = result.report["objective"]["max_accuracy_drop"]  # the promise tune was held to
        routed = tune_router(table, max_accuracy_drop=drop,
                             delta=ns.delta, base=result.setting, seed=ns.seed)
        result.report["router"] = {"on": routed.choice.on, "reason": routed.choice.reason,
                                   **routed.choice.report}
        if routed.router is not None:
            config_out = routed.config
            result.report["router"]["drift_max_disagreement"] = {
                r.label: r.drift_max_disagreement for r in routed.config.rungs
                if r.drift_max_disagreement is not None}
            router_text = router_toml(write_router(routed, ns.out))
            routed_as = routed.choice.report.get("with_router", {})
            header = (f"Tuned by `cascade tune` on {table.n} cases ({table.source}).\n"
                      f"Recommendation (with the router): {routed_as.get('setting', '')}")
    text = to_toml(config_out, header=header) + router_text
    written = parse_config(tomllib.loads(text), source=ns.out)  # never write what won't load
    Path(ns.out).write_text(text, encoding="utf-8")
    _warn_unreachable_verifiers(written, table.base, ns.out)
    if ns.plot and not plot_frontier(result.frontier, result.report, ns.plot):
        print("cascade: --plot needs matplotlib (pip install 'verified-cascade[plot]'); "
              "skipped", file=sys.stderr)
    if ns.json:
        print(json.dumps(result.report, indent=2))
    else:
        print(format_report(result.report))
        if refused and ns.router == "auto":
            print("router: off (not learned: the shift guard refused the cascade)")
        if "router" in result.report:
            r = result.report["router"]
            if r["on"]:
                w = r.get("with_router", {})
                print(f"router: on — {w.get('setting')}: saving {w.get('cost_saving', 0):.1%}, "
                      f"guard's lower bound {w.get('lower', 0) * 100:+.2f} pts; this replaces "
                      "the recommendation above in the written config")
            else:
                print(f"router: off ({r['reason']})")
        print(f"wrote {ns.out}")
    return 0

