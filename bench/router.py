"""The router: what it adds to a climb, and what it saves on the shared recorded data.

    python bench/router.py overhead [--n 3000]
    python bench/router.py quality [--folds 5] [--seeds 1] [--delta 0.05] [--files mmlu_llama ...]

``overhead``: a 2 kB prompt through a two-rung ladder of instant models
(``cascade.testing.FunctionProvider``), cache off, with and without the router's
``route()`` before the climb, interleaved request by request. The router is the one fitted on
the llama ladder's five shared files (its real vocabulary size). Target: < 0.2 ms p50 added.

``quality``: on ``../shared/data/cascades``, the tuner alone vs the tuner with the router,
both tuned on the training part and judged on the held-out part (the router fitted on the
training part only, its thresholds chosen on cross-fitted scores there):

- *no confidence*: every confidence removed (``null``), where the router is the only signal;
  5-fold cross-validation per file, and benchmarks held out (tuned on a ladder's four other
  benchmarks pooled, judged on the fifth);
- *with confidence*: the recorded confidences kept, cross-validation per file.

Reported per file: held-out accuracy change against the training part's best single rung (pts),
saving against it, and whether the 1-point promise held.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import anyio
import numpy as np
from _common import REPO, machine, percentile, print_table

from cascade.engine import Cascade
from cascade.messages import Message
from cascade.routing import Router, fit_router, replay_routes, route_cases, tune_router
from cascade.routing.choose import RouteSetting
from cascade.suite import OutcomeTable, load_shared_outcomes
from cascade.testing import FunctionProvider
from cascade.tuning.choose import select
from cascade.tuning.guard import DELTA
from cascade.tuning.simulate import simulate

SHARED = REPO.parent / "shared" / "data" / "cascades"
BENCHES = ("mmlu", "medmcqa", "triviaqa", "truthfulqa", "gsm8k")
CHAINS = ("llama", "qwen_oai")
DROP = 0.01
GUARD = {"delta": DELTA}
"""The guard's delta for tuner and router alike (``--delta``; default: the CLI's)."""


# ---------------------------------------------------------------- overhead


def _prompt_2kb(table: OutcomeTable) -> tuple[Message, ...]:
    from cascade.routing.features import prompt_messages

    msgs = list(prompt_messages(table.prompts[0]))
    body = msgs[-1].content
    filler = " ".join(prompt_messages(p)[-1].content for p in table.prompts[1:8])
    text = (body + "\n\n" + filler)[:2000 - sum(len(m.content) for m in msgs[:-1])]
    return (*msgs[:-1], Message("user", text))


async def _overhead(n: int, warmup: int) -> None:
    files = [SHARED / f"{b}_llama_train.jsonl" for b in BENCHES]
    table = load_shared_outcomes(files)
    t0 = time.perf_counter()
    model = fit_router(table, folds=2).model.subset([0, len(table.rungs) - 1])
    print(f"router fitted on {table.n} cases in {time.perf_counter() - t0:.1f} s; "
          f"{len(model.featurizer)} features")
    router = Router(model, (0.6, 0.0))
    msgs = _prompt_2kb(table)
    print(f"prompt: {sum(len(m.content) for m in msgs)} characters")
    fp = FunctionProvider(lambda call: "Paris.")
    free = {"input_usd_per_mtok": 0, "output_usd_per_mtok": 0}  # unlisted models need a price
    cfg = {"rungs": [{"model": "small", **free}, {"model": "big", **free}],
           "cache": {"enabled": False}}
    plain: list[float] = []
    routed: list[float] = []
    route_only: list[float] = []
    with Cascade.from_dict(cfg, provider_factory=fp.factory) as c:
        for i in range(warmup + n):
            t0 = time.perf_counter()
            await c.aanswer(messages=[m.to_dict() for m in msgs])
            t1 = time.perf_counter()
            router.route(msgs, {})
            t2 = time.perf_counter()
            await c.aanswer(messages=[m.to_dict() for m in msgs])
            t3 = time.perf_counter()
            if i >= warmup:
                plain.append(t1 - t0)
                route_only.append(t2 - t1)
                routed.append(t3 - t1)
    ms = [[x * 1000 for x in xs] for xs in (plain, routed, route_only)]
    print(machine())
    print_table(["", "p50 ms", "p99 ms"], [
        ["climb without router", percentile(ms[0], 50), percentile(ms[0], 99)],
        ["route() + climb", percentile(ms[1], 50), percentile(ms[1], 99)],
        ["route() alone", percentile(ms[2], 50), percentile(ms[2], 99)],
    ])
    print(f"added p50: {percentile(ms[1], 50) - percentile(ms[0], 50):.3f} ms "
          f"(target < 0.2 ms)")


# ---------------------------------------------------------------- quality


def _no_conf(t: OutcomeTable) -> OutcomeTable:
    return replace(t, scores={k: np.full_like(v, math.nan) for k, v in t.scores.items()})


def _judge(train: OutcomeTable, test: OutcomeTable) -> tuple[float, float, float, float, bool]:
    """Held-out (change, saving) of the tuner alone and with the router; router on?"""
    ref, r0, c0, r1, c1, on = _judge_cases(train, test)
    ref_right = test.correct[:, ref].mean()
    ref_cost = test.cost[:, ref].mean()
    return (float(r0.mean() - ref_right), float(1 - c0.mean() / ref_cost),
            float(r1.mean() - ref_right), float(1 - c1.mean() / ref_cost), on)


def _judge_cases(train: OutcomeTable, test: OutcomeTable) -> tuple[
        int, np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool]:
    """Per held-out case: right and cost of the tuner alone and with the router."""
    setting, ref = select(train, max_accuracy_drop=DROP, delta=GUARD["delta"])
    r0, c0, _ = simulate(test, setting)
    tuning = tune_router(train, max_accuracy_drop=DROP, delta=GUARD["delta"], base=setting)
    if tuning.router is None:
        r1, c1 = r0, c0
    else:
        rs: RouteSetting = tuning.choice.setting
        cols = list(rs.chain)
        accepts = np.ones((test.n, len(cols)), dtype=bool)  # what cascade eval reads
        for p, row in enumerate(rs.thresholds if rs.keys else ()):
            for key, th in zip(rs.keys, row, strict=True):
                with np.errstate(invalid="ignore"):
                    accepts[:, p] &= test.scores[key][:, cols[p]] >= th
        exit_pos, c1 = replay_routes(accepts, test.cost[:, cols],
                                     route_cases(tuning.router, test))
        r1 = test.correct[:, cols][np.arange(test.n), exit_pos]
    return ref, r0, c0, r1, c1, tuning.router is not None


def _pooled(chain: str, folds: int, strip: bool) -> list[list[object]]:
    """One ladder's five benchmarks pooled into one suite, cross-validated; judged per
    benchmark (each benchmark's held-out cases against the pooled training's best rung)."""
    t = load_shared_outcomes([SHARED / f"{b}_{chain}_train.jsonl" for b in BENCHES])
    t = _no_conf(t) if strip else t
    bench = np.array([g.split("/")[0] for g in t.groups])
    fold = np.random.default_rng(0).permutation(t.n) % folds
    acc: dict[str, list[np.ndarray]] = {b: [] for b in (*BENCHES, "all")}
    on = 0
    for f in range(folds):
        tr, te = np.nonzero(fold != f)[0], np.nonzero(fold == f)[0]
        test = t.take(te)
        ref, r0, c0, r1, c1, o = _judge_cases(t.take(tr), test)
        on += o
        for b in (*BENCHES, "all"):
            m = (bench[te] == b) | (b == "all")
            acc[b].append(np.array([r0[m].mean() - test.correct[m, ref].mean(),
                                    c0[m].sum(), r1[m].mean() - test.correct[m, ref].mean(),
                                    c1[m].sum(), test.cost[m, ref].sum()]))
    rows = []
    for b in (*BENCHES, "all"):
        a = np.array(acc[b])
        ref_cost = a[:, 4].sum()
        rows.append(_row(f"{b}_{chain} (pooled)" if b != "all" else f"{chain}: the whole mix",
                         (a[:, 0].mean(), 1 - a[:, 1].sum() / ref_cost,
                          a[:, 2].mean(), 1 - a[:, 3].sum() / ref_cost, on / folds)))
    return rows


def _cv(t: OutcomeTable, folds: int, seeds: int) -> tuple[float, float, float, float, float]:
    rows = []
    for seed in range(seeds):
        fold = np.random.default_rng(seed).permutation(t.n) % folds
        for f in range(folds):
            tr, te = np.nonzero(fold != f)[0], np.nonzero(fold == f)[0]
            rows.append(_judge(t.take(tr), t.take(te)))
    a = np.array(rows, dtype=float)
    return tuple(float(x) for x in a.mean(axis=0))  # type: ignore[return-value]


def _summary(name: str, rows: list[list[object]]) -> None:
    print(f"\n{name}")
    print_table(["file", "tuner Δacc", "tuner saving", "router Δacc", "router saving",
                 "router on"], rows)
    for col, label in ((1, "tuner"), (3, "router")):
        held = sum(float(str(r[col])) >= -100 * DROP - 1e-9 for r in rows)
        sav = statistics.median(float(str(r[col + 1]).rstrip("%")) for r in rows)
        print(f"  {label}: promise held {held}/{len(rows)}, median saving {sav:.1f}%")


def _row(name: str, x: tuple[float, ...]) -> list[object]:
    return [name, f"{100 * x[0]:+.2f}", f"{100 * x[1]:.1f}%", f"{100 * x[2]:+.2f}",
            f"{100 * x[3]:.1f}%", f"{x[4]:.2f}"]


def _quality(files: list[str], folds: int, seeds: int, parts: set[str]) -> None:
    print(machine())
    t0 = time.perf_counter()
    if "cv" in parts:
        for label, strip in (("no confidence, cross-validation", True),
                             ("with confidence, cross-validation", False)):
            rows = []
            for name in files:
                t = load_shared_outcomes([SHARED / f"{name}_train.jsonl"])
                rows.append(_row(name, _cv(_no_conf(t) if strip else t, folds, seeds)))
            _summary(label, rows)
    if "pooled" in parts:
        for label, strip in (("no confidence", True), ("with confidence", False)):
            rows = [r for chain in CHAINS for r in _pooled(chain, folds, strip)]
            mix = [r for r in rows if "whole mix" in str(r[0])]
            _summary(f"{label}, a ladder's five benchmarks pooled, cross-validation, "
                     "per benchmark", [r for r in rows if r not in mix])
            _summary(f"{label}, pooled: the whole mix", mix)
    if "heldout" in parts:
        rows = []
        for chain in CHAINS:
            tables = {b: load_shared_outcomes([SHARED / f"{b}_{chain}_train.jsonl"])
                      for b in BENCHES}
            for b in BENCHES:
                train = load_shared_outcomes([SHARED / f"{o}_{chain}_train.jsonl"
                                              for o in BENCHES if o != b])
                res = _judge(_no_conf(train), _no_conf(tables[b]))
                rows.append(_row(f"{b}_{chain} held out", res))
        _summary("no confidence, benchmark held out (tuned on the other four pooled)", rows)
    print(f"\ntook {time.perf_counter() - t0:.0f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    o = sub.add_parser("overhead")
    o.add_argument("--n", type=int, default=3000)
    o.add_argument("--warmup", type=int, default=300)
    q = sub.add_parser("quality")
    q.add_argument("--folds", type=int, default=5)
    q.add_argument("--seeds", type=int, default=1)
    q.add_argument("--files", nargs="*", default=[f"{b}_{c}" for c in CHAINS for b in BENCHES])
    q.add_argument("--parts", nargs="*", default=["cv", "pooled", "heldout"])
    q.add_argument("--delta", type=float, default=DELTA,
                   help=f"the guard's delta, as cascade tune --delta (default {DELTA:g})")
    ns = p.parse_args(argv)
    if not SHARED.is_dir():
        print(f"needs {SHARED}", file=sys.stderr)
        return 2
    if ns.what == "overhead":
        anyio.run(_overhead, ns.n, ns.warmup)
    else:
        GUARD["delta"] = ns.delta
        _quality(ns.files, ns.folds, ns.seeds, set(ns.parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
