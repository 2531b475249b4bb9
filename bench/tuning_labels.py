"""Labels and savings: the learning curve, and labelling only where ``cascade label`` asks.

Shared by ``bench/tuning.py --labels`` (i.i.d. draws from a ladder's five files pooled) and
``bench/tuning_shift.py --labels`` (tuned on four benchmarks, judged on the fifth). Every figure
is measured on held-out cases the tuning never saw, against the best single rung on them.

* **learning curve**: tune on N labelled cases, judge on the rest: held rate and median saving
  against N, past the 300 of one file by pooling a ladder's files.
* **labelling**: a small labelled part plus a larger unlabelled pool of the same traffic; labels
  are revealed (from the recorded grades) only for the cases :func:`needed_labels` names, in
  rounds, until it names none; compared with the labelled part alone and with every pool case
  labelled.
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cascade.suite import OutcomeTable
from cascade.tuning import Setting, select
from cascade.tuning.label import needed_labels
from cascade.tuning.setting import IntArray
from cascade.tuning.simulate import simulate

__all__ = ["Outcome", "judge", "label_loop", "learning_curve", "summarise"]


@dataclass(frozen=True)
class Outcome:
    """One tuning judged on held-out cases."""

    change: float
    saving: float
    se: float = 0.0
    """The held-out change's own standard error (paired, over the test cases): a break by less
    than this is what the test set's noise alone gives."""
    labels: int = 0
    """Labels used: the labelled part plus those asked for."""
    asked: int = 0
    pool: int = 0


def judge(test: OutcomeTable, setting: Setting) -> tuple[float, float, float]:
    """Held-out accuracy change, saving and the change's standard error, against the best
    single rung on ``test``."""
    right, cost, _ = simulate(test, setting)
    acc = test.correct.mean(axis=0)
    mc = test.cost.mean(axis=0)
    best = int(np.lexsort((mc, -acc))[0])
    diff = right.astype(float) - test.correct[:, best].astype(float)
    se = float(diff.std(ddof=1) / np.sqrt(test.n)) if test.n > 1 else 0.0
    return float(right.mean() - acc[best]), 1.0 - float(cost.mean()) / float(mc[best]), se


def label_loop(table: OutcomeTable, known: IntArray, pool: IntArray, *, drop: float,
               delta: float, batch: int = 50, rounds: int = 10) -> tuple[Setting, int]:
    """Tune on ``known`` (labelled) plus ``pool`` (unlabelled), revealing the recorded grades of
    only the cases ``needed_labels`` names, ``batch`` at a time; returns the final choice and
    how many pool labels were asked for."""
    idx = np.concatenate([known, pool])
    full = table.take(idx)
    lab = np.zeros(idx.size, dtype=bool)
    lab[: known.size] = True
    sub = replace(full, labelled=lab, correct=np.where(lab[:, None], full.correct, False))
    asked = 0
    for _ in range(rounds):
        needs = needed_labels(sub, max_drop=drop, delta=delta, max_n=batch)
        if not needs:
            break
        asked += len(needs)
        sub = sub.with_labels({n.case_id: {r.label: bool(full.correct[n.index, j])
                                            for j, r in enumerate(full.rungs)} for n in needs})
    return select(sub, max_accuracy_drop=drop, delta=delta)[0], asked


def learning_curve(table: OutcomeTable, test: OutcomeTable | None, sizes: list[int],
                   draws: int, *, drop: float, delta: float, seed: int = 0
                   ) -> dict[int, list[Outcome]]:
    """Per size N: tune on N labelled cases drawn from ``table``; judge on ``test`` (or on the
    cases of ``table`` not drawn)."""
    out: dict[int, list[Outcome]] = {}
    for n in sizes:
        if n >= table.n:
            continue
        res = []
        for d in range(draws):
            perm = np.random.default_rng(seed + 1000 * d + n).permutation(table.n)
            st, _ = select(table.take(perm[:n]), max_accuracy_drop=drop, delta=delta)
            res.append(Outcome(*judge(test if test is not None else table.take(perm[n:]), st),
                               labels=n))
        out[n] = res
    return out


def labelling(table: OutcomeTable, test: OutcomeTable | None, n_known: int, n_pool: int,
              draws: int, *, drop: float, delta: float, seed: int = 0
              ) -> dict[str, list[Outcome]]:
    """Labelled part only / label where asked / every pool case labelled, over ``draws``."""
    out: dict[str, list[Outcome]] = {"labelled part only": [], "labels where asked": [],
                                     "pool fully labelled": []}
    for d in range(draws):
        perm = np.random.default_rng(seed + 7919 * d).permutation(table.n)
        known, pool = perm[:n_known], perm[n_known:n_known + n_pool]
        te = test if test is not None else table.take(perm[n_known + n_pool:])
        st, _ = select(table.take(known), max_accuracy_drop=drop, delta=delta)
        out["labelled part only"].append(Outcome(*judge(te, st), labels=known.size))
        st, asked = label_loop(table, known, pool, drop=drop, delta=delta)
        out["labels where asked"].append(Outcome(*judge(te, st), labels=known.size + asked,
                                                 asked=asked, pool=pool.size))
        st, _ = select(table.take(np.concatenate([known, pool])), max_accuracy_drop=drop,
                       delta=delta)
        out["pool fully labelled"].append(Outcome(*judge(te, st),
                                                  labels=known.size + pool.size))
    return out


def summarise(res: list[Outcome], drop: float) -> str:
    """held k/n (and how many breaks were beyond the test set's own standard error), median
    saving, worst change, labels (and share of the pool asked)."""
    held = sum(r.change >= -drop - 1e-9 for r in res)
    beyond = sum(r.change + r.se < -drop - 1e-9 for r in res)
    med = statistics.median(r.saving for r in res)
    worst = min(r.change for r in res)
    labels = statistics.median(r.labels for r in res)
    asked = ""
    if any(r.pool for r in res):
        asked = f", asked {statistics.median(r.asked / r.pool for r in res if r.pool):.0%} of pool"
    se = statistics.median(r.se for r in res)
    return (f"held {held}/{len(res)} ({beyond} beyond SE)  median saving {med * 100:5.1f}%  "
            f"worst {worst * 100:+.2f} pts  SE {se * 100:.2f}  labels {labels:.0f}{asked}")
