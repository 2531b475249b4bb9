"""The guard: a one-sided bound on the net accuracy change of a setting against every rung that
could be the best on new questions.

Why every such rung: the promise is "within X points of the best single rung", and which rung
is best is itself estimated from the suite. Guarding only against the rung that looks best broke
the promise where a near-tie on the suite was not one on new questions (mmlu_qwen_oai: the suite
preferred qwen2.5-72b, new questions gpt-4o by 2.5 points). :func:`plausible_best` keeps every
rung not credibly worse than the one that looks best; a cascade ends at the dearest of them (the
prior favourite when the suite cannot tell) and must pass the bound against each.

The levels, both one-sided at the user's ``delta``: a rung is dropped from the rivals only when
its paired accuracy change against the favourite, plus ``z(1 - delta / (K - 1))`` standard
errors, is below zero (Bonferroni over the K - 1 comparisons: the truly best rung survives all
of them with probability at least ``1 - delta``, whichever rung looks best); the guard's bound
against each rival is at ``1 - delta`` with no correction, since only the bound against the
truly best rung matters. The promise can then fail with probability at most about ``2 delta``
for a setting fixed in advance (the choice of the cheapest passing setting is not covered).
"""

from __future__ import annotations

from statistics import NormalDist
from typing import NamedTuple

import numpy as np

from cascade.suite.outcomes import OutcomeTable
from cascade.tuning.candidates import reference_rung
from cascade.tuning.setting import FloatArray, IntArray

__all__ = ["DELTA", "MAX_DROP", "PSEUDO", "PSEUDO_GATE", "Rivals", "cases_needed", "model_frontier",
           "paired_bound", "plausible_best", "rival_z", "rivals", "z_value"]

DELTA = 0.05
"""The default one-sided level of the guard and of the rival test. Measured on the shared data
(``bench/tuning_shift.py``): 0.05 held on 10 of 14 shifted sets (0.1 on 9; 0.02 also on 10, at
lower savings); every remaining break is a benchmark the tuning never saw, which no level fixes."""
MAX_DROP = 0.01
"""The default promise: within 1 point of the best single rung."""

PSEUDO = 1.0
PSEUDO_GATE = 2.0
"""Settings that use the agreement gate are held to a stricter guard: two pseudo-discordant
cases (zero observed disagreements with the reference can then not pass on a few hundred
cases) and a Bonferroni z over the gate patterns examined
(see :func:`cascade.tuning.choose.choose`)."""


def z_value(delta: float) -> float:
    """The one-sided normal quantile for a ``1 - delta`` bound."""
    return NormalDist().inv_cdf(1.0 - min(max(delta, 1e-9), 0.5))


def rival_z(delta: float, rungs: int) -> float:
    """The z of the rival test: one-sided ``1 - delta`` with Bonferroni over the ``rungs - 1``
    comparisons with the favourite (see the module docstring)."""
    return z_value(delta / max(rungs - 1, 1))


def paired_bound(better: FloatArray, worse: FloatArray, n: int, z: float | FloatArray,
           pseudo: float | FloatArray = PSEUDO) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Net accuracy change, its standard error and the guard's lower bound, per setting.

    The change is (better - worse) / n: gains where the cascade is right and the reference is
    wrong offset losses. The paired variance is (better + worse) / n - change²; one
    pseudo-discordant case keeps it above zero, so that a setting seen to disagree with the
    reference nowhere on a small suite is not taken for a sure thing.
    """
    nn = max(n, 1)
    change = (better - worse) / nn
    var = np.maximum((better + worse + pseudo) / nn - change**2, 0.0)
    se = np.sqrt(var / nn)
    return change, se, change - z * se


def model_frontier(loss: FloatArray, cost: FloatArray, ref_cost: float) -> IntArray:
    """Indices of the settings on the model's frontier: from the lowest expected loss up, each
    one strictly cheaper than every setting the model rated safer."""
    order = np.lexsort((cost, loss))
    cheapest = np.minimum.accumulate(np.concatenate([[ref_cost], cost[order]]))
    return order[cost[order] < cheapest[:-1]]



def plausible_best(table: OutcomeTable, ref: int, z: float) -> list[int]:
    """The rungs that could be the best on new questions: ``ref`` (the one that looks best)
    and every rung whose paired accuracy change against it, plus ``z`` standard errors, is not
    below zero on the labelled cases. In cost order. Pass :func:`rival_z` for a test whose
    level covers the comparisons with every rung."""
    lab = table.is_labelled
    c = table.correct[lab]
    out = []
    for j in np.argsort(table.cost.mean(axis=0), kind="stable"):
        b = np.array([float(np.sum(c[:, j] & ~c[:, ref]))])
        w = np.array([float(np.sum(~c[:, j] & c[:, ref]))])
        change, se, _ = paired_bound(b, w, int(lab.sum()), z)
        if j == ref or float(change[0] + z * se[0]) >= 0.0:
            out.append(int(j))
    return out


class Rivals(NamedTuple):
    """Which rung is best, with its uncertainty: the one that ``looks_best`` on the suite, every
    rung that could be the best (``rungs``, in cost order) and the dearest of them (``ref``:
    what savings are counted against, and the fallback)."""

    looks_best: int
    rungs: list[int]
    ref: int


def rivals(table: OutcomeTable, delta: float) -> Rivals:
    """The rivals settings are guarded against, at the rival test of level ``delta``."""
    looks_best = reference_rung(table)
    rungs = plausible_best(table, looks_best, rival_z(delta, len(table.rungs)))
    mean_cost = table.cost.mean(axis=0)
    ref = max(rungs, key=lambda j: (float(mean_cost[j]), j == looks_best))
    return Rivals(looks_best, rungs, ref)


def cases_needed(better: float, worse: float, n: int, z: float, max_drop: float,
                 pseudo: float = PSEUDO, limit: int = 10_000_000) -> int | None:
    """How many cases, with the same rates of gains and losses as these ``n``, the guard would
    need to pass (None: it never would, the estimate itself is below ``-max_drop``)."""
    nn = max(n, 1)
    if (better - worse) / nn < -max_drop:
        return None

    def ok(m: int) -> bool:
        s = m / nn
        _, _, low = paired_bound(np.array([better * s]), np.array([worse * s]), m, z, pseudo)
        return bool(low[0] >= -max_drop - 1e-12)

    hi = nn
    while not ok(hi):
        hi *= 2
        if hi > limit:
            return None
    lo = hi // 2 if hi > nn else 1
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi
