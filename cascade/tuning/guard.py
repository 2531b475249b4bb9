"""The guard: a one-sided bound on the net accuracy change of a setting against a rung."""

from __future__ import annotations

from statistics import NormalDist

import numpy as np

from cascade.tuning.setting import FloatArray, IntArray

__all__ = ["PSEUDO", "PSEUDO_GATE", "model_frontier", "paired_bound", "z_value"]

PSEUDO = 1.0
PSEUDO_GATE = 2.0
"""Settings that use the agreement gate are held to a stricter guard: two pseudo-discordant
cases (zero observed disagreements with the reference can then not pass on a few hundred
cases) and a Bonferroni z over the gate patterns examined (see :func:`_choose`)."""



def z_value(delta: float) -> float:
    """The one-sided normal quantile for a ``1 - delta`` bound."""
    return NormalDist().inv_cdf(1.0 - min(max(delta, 1e-9), 0.5))



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

