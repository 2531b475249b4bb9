"""Does the drift alarm catch a shifted mix in production, and what does acting on it buy?

On ``../shared/data/cascades``, per ladder: tune on four benchmarks pooled (the suite), then
stream the fifth as traffic (the "unseen benchmark" shift of ``bench/tuning_shift.py``):
``--requests`` requests drawn with replacement from its cases (no cache: each is a fresh climb).
Each request climbs the tuned chain as the table says (a rung accepts where its recorded
confidence passes its tuned threshold); an answer accepted below the top rung is shadow-checked
against the top rung at ``--shadow-rate``, the check (do the two answers agree under the suite's
normaliser) going into a real :class:`cascade.drift.DriftMonitor` on
:class:`cascade.store.local.LocalCounters`, with each rung's tolerated rate ``D`` the one-sided
90% Wilson upper bound of its disagreement rate on the suite (what the tuner writes as
``drift_max_disagreement``; taken from the tuned config when it carries one).

Safe mode: while a rung's alarm is up its answers escalate (it is still called and paid for);
when the climb then reaches the top rung, the drifted rung's answer is compared with the top's
for free and goes to the monitor too, so the alarm can clear. Compared: the same stream with the
alarm acting and with it only watching (shadows paid, nothing acts). A control streams the
suite's own cases (the mix the tuner saw): alarms there are false alarms.

Printed per stream: accuracy change against the top rung alone (points), total cost including
shadows as a share of the top rung alone, requests before the first alarm (median over seeds),
share of requests served in safe mode.

    python bench/drift_replay.py [--requests 3000] [--shadow-rate 0.05] [--seeds 3]
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import anyio
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cascade.config import PolicyConfig
from cascade.drift import DriftMonitor
from cascade.store.local import LocalCounters
from cascade.suite import OutcomeTable, load_shared_outcomes
from cascade.tuning import tune
from cascade.tuning.guard import z_value
from cascade.tuning.setting import IntArray, Setting
from cascade.tuning.simulate import simulate

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cascades"
NORMALISER = {"mmlu": "choice", "medmcqa": "choice", "gsm8k": "numeric",
              "triviaqa": "normalised", "truthfulqa": "normalised"}
"""The shadow comparison's normaliser per benchmark (the one matching its grader): a shadow
compares answers the way the question is graded, so a numeric answer in a sentence still agrees
with the bare number."""


def agreement(table: OutcomeTable) -> np.ndarray:
    """Cases × rungs × rungs: do two rungs' answers agree under the case's own normaliser."""
    out = np.zeros_like(table.agreement["normalised"])
    for i, g in enumerate(table.groups):
        out[i] = table.agreement[NORMALISER.get(g.split("/")[0], "normalised")][i]
    return out


MODES = ("watch", "act", "skip")
ALPHA = PolicyConfig().drift_alpha
"""The alarm's false-alarm rate: the engine's default ``[policy] drift_alpha``."""


@dataclass(frozen=True)
class Cascade:
    """A tuned chain, replayable on any table of the same ladder."""

    setting: Setting
    labels: tuple[str, ...]
    tolerated: dict[str, float]


@dataclass
class Run:
    accuracy_change: float
    cost_share: float
    first_alarm: int | None
    safe_share: float
    shadows: int


def _wilson_upper(rate: float, m: int, confidence: float = 0.9) -> float:
    z = z_value(1.0 - confidence)
    den = 1 + z * z / m
    centre = (rate + z * z / (2 * m)) / den
    return min(1.0, centre + z * math.sqrt(rate * (1 - rate) / m + z * z / (4 * m * m)) / den)


def tuned_cascade(suite: OutcomeTable, drop: float) -> Cascade:
    result = tune(suite, max_accuracy_drop=drop, shift=False, bootstrap=200)
    setting = result.setting
    chain = setting.chain
    labels = tuple(suite.rungs[j].label for j in chain)
    agree = agreement(suite)
    exit_pos = simulate(suite, setting)[2]
    tolerated: dict[str, float] = {}
    for p, j in enumerate(chain[:-1]):
        own = result.config.rungs[p].drift_max_disagreement
        here = exit_pos == p
        if own is not None:
            tolerated[labels[p]] = own
        elif here.any():
            rate = float(1.0 - agree[here, j, chain[-1]].mean())
            tolerated[labels[p]] = _wilson_upper(rate, int(here.sum()))
    return Cascade(setting, labels, tolerated)


def accepts(table: OutcomeTable, c: Cascade) -> np.ndarray:
    """Per case and early chain position: would that rung's verifiers accept its answer (the
    engine's policy, from :func:`cascade.tuning.simulate.simulate` on the rung alone)."""
    s = c.setting
    cols = []
    for p in range(len(s.chain) - 1):
        alone = Setting((s.chain[p], s.chain[-1]), s.keys, (s.thresholds[p],))
        cols.append(simulate(table, alone)[2] == 0)
    return np.stack(cols, axis=1) if cols else np.zeros((table.n, 0), dtype=bool)


async def stream(table: OutcomeTable, c: Cascade, order: IntArray, agree: np.ndarray, *,
                 rate: float, mode: str, seed: int) -> Run:
    """Serve ``order`` through the cascade. ``mode``: ``watch`` (shadows, no action), ``act``
    (a drifted rung is still called, its accept escalates: the engine's safe mode) or ``skip``
    (a drifted rung is not called, but for a probe at the shadow rate)."""
    chain = c.setting.chain
    last, top = len(chain) - 1, chain[-1]
    acc = accepts(table, c)
    monitor = DriftMonitor(LocalCounters(), ladder="bench", thresholds=c.tolerated,
                           alpha=ALPHA)
    rng = np.random.default_rng(seed + 7)
    right = spent = 0.0
    first_alarm: int | None = None
    safe = shadows = 0

    async def check(t: int, p: int, i: int) -> None:
        nonlocal first_alarm
        state = await monitor.record(c.labels[p], not bool(agree[i, chain[p], top]))
        if state is not None and state.alarm and first_alarm is None:
            first_alarm = t

    for t, i in enumerate(order):
        exit_p, called, escalated, alarmed = last, [], [], False
        for p in range(last):
            drifted = monitor.is_drifted(c.labels[p]) is not None
            alarmed |= drifted
            if drifted and mode == "skip" and rng.random() >= rate:
                continue  # not called at all
            called.append(p)
            if not acc[i, p]:
                continue
            if drifted and mode != "watch":
                escalated.append(p)
                continue
            exit_p = p
            break
        safe += alarmed and mode != "watch"
        if exit_p == last:
            called.append(last)
        spent += float(table.cost[i, [chain[p] for p in called]].sum())
        right += float(table.correct[i, chain[exit_p]])
        top_seen = exit_p == last
        if not top_seen and rng.random() < rate:
            shadows += 1
            spent += float(table.cost[i, top])
            top_seen = True
            await check(t, exit_p, i)
        if top_seen:  # safe mode: the top rung's answer checks the drifted rungs for free
            for p in escalated:
                await check(t, p, i)
    n = len(order)
    top_right = float(table.correct[order, top].mean())
    top_cost = float(table.cost[order, top].sum())
    return Run(right / n - top_right, spent / top_cost, first_alarm, safe / n, shadows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--shadow-rate", type=float, default=0.05)
    ap.add_argument("--max-accuracy-drop", type=float, default=0.01)
    ap.add_argument("--seeds", type=int, default=3)
    ns = ap.parse_args(argv)
    if not ns.data.is_dir():
        print(f"no shared data at {ns.data}: nothing to benchmark", file=sys.stderr)
        return 0
    t0 = time.perf_counter()
    logging.getLogger("cascade.drift").setLevel(logging.ERROR)  # alarms are counted, not logged
    print(f"{ns.requests} requests a stream, shadow rate {ns.shadow_rate:g}, alarm alpha "
          f"{ALPHA:g}, tuned at max accuracy drop {ns.max_accuracy_drop:g}; medians over "
          f"{ns.seeds} seeds")
    head = (f"{'stream':<28} {'chain':<14} {'D suite→live':<30} {'1st alarm':>9} | "
            f"{'watch: Δacc':>6} {'cost':>5} | {'act: Δacc':>6} {'cost':>5} {'safe':>5} | "
            f"{'skip: Δacc':>6} {'cost':>5} {'safe':>5}")
    print(head)
    print("-" * len(head))
    for ladder in ("llama", "qwen_oai"):
        files = sorted(ns.data.glob(f"*_{ladder}_train.jsonl"))
        if not files:
            continue
        pooled = load_shared_outcomes(files)
        print(f"{ladder}: " + ", ".join(f"r{j} {r.label}" for j, r in enumerate(pooled.rungs)))
        bench = np.array([g.split("/")[0] for g in pooled.groups])
        for out in sorted(set(bench)):
            suite = pooled.take(np.nonzero(bench != out)[0])
            live = pooled.take(np.nonzero(bench == out)[0])
            c = tuned_cascade(suite, ns.max_accuracy_drop)
            for name, table in ((f"{out}_{ladder}", live),
                                ("  control: the suite's mix", suite)):
                _row(name, table, c, ns)
    print("-" * len(head))
    print(f"took {time.perf_counter() - t0:.0f}s")
    return 0


def _row(name: str, table: OutcomeTable, c: Cascade, ns: argparse.Namespace) -> None:
    chain = c.setting
    if len(chain.chain) < 2:
        print(f"{name:<28} {'r' + str(chain.chain[0]):<14} (one rung: nothing to watch)")
        return
    runs: dict[str, list[Run]] = {m: [] for m in MODES}
    acc = accepts(table, c)
    agree = agreement(table)
    exit_live = np.argmax(np.concatenate([acc, np.ones((table.n, 1), bool)], axis=1), axis=1)
    rates = []
    for p, j in enumerate(chain.chain[:-1]):
        here = exit_live == p
        live = (1 - agree[here, j, chain.chain[-1]].mean()
                if here.any() else math.nan)
        rates.append(f"{c.tolerated.get(c.labels[p], math.nan):.2f}→{live:.2f}")
    for seed in range(ns.seeds):
        order = np.random.default_rng(seed).integers(0, table.n, ns.requests)
        for mode in MODES:
            runs[mode].append(anyio.run(partial(stream, table, c, order, agree,
                                                rate=ns.shadow_rate, mode=mode, seed=seed)))

    def med(xs: list[float]) -> float:
        return statistics.median(xs)

    alarms = [r.first_alarm for r in runs["watch"] if r.first_alarm is not None]
    first = (f"{int(statistics.median(alarms))}" if len(alarms) == ns.seeds
             else f"{len(alarms)}/{ns.seeds} runs" if alarms else "none")
    short = " → ".join(f"r{j}" for j in chain.chain)
    cells = " | ".join(f"{med([r.accuracy_change for r in runs[m]]) * 100:>+6.2f} "
                       f"{med([r.cost_share for r in runs[m]]) * 100:>4.0f}%"
                       + ("" if m == "watch" else
                          f" {med([r.safe_share for r in runs[m]]) * 100:>4.0f}%")
                       for m in MODES)
    print(f"{name:<28} {short:<14} {', '.join(rates):<30} {first:>9} | {cells}")


if __name__ == "__main__":
    raise SystemExit(main())
