"""The plain grid search every tuner is compared with (benchmarks and tests; not for use).

Every rung subset × a grid of per-rung thresholds; keep the settings whose accuracy on the suite
is within the allowed drop of the best rung, take the cheapest. It over-fits: the cheapest of
thousands of settings is the luckiest on the suite (see ``bench/tuning.py``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cascade.suite import OutcomeTable
from cascade.tuning import Setting, reference_rung
from cascade.tuning.candidates import rung_chains
from cascade.tuning.setting import scoring_keys
from cascade.tuning.simulate import simulate_many

__all__ = ["grid_search_baseline"]


def grid_search_baseline(table: OutcomeTable, *, max_drop: float = 0.01,
                         grid: Sequence[float] = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
                         ) -> Setting:
    """What everyone does: every rung subset × a grid of per-rung thresholds; keep those whose
    accuracy on the suite is within ``max_drop`` of the best rung, take the cheapest.
    Only the first scoring verifier is tuned. For comparison in benchmarks, not for use."""
    keys = scoring_keys(table)[:1]
    mc = table.cost.mean(axis=0)
    acc = table.correct.mean(axis=0)
    ref = reference_rung(table)
    best = Setting((ref,))
    best_cost = float(mc[ref])
    if not keys:
        return best
    order = [int(j) for j in np.argsort(mc, kind="stable")]
    g = np.array(grid, dtype=float)
    for chain in rung_chains(order, ref, mc):
        k1 = len(chain) - 1
        if k1 == 0:
            continue
        mesh = np.stack(np.meshgrid(*([g] * k1), indexing="ij"), axis=-1).reshape(-1, k1, 1)
        right, cost, _ = simulate_many(table, chain, keys, mesh)
        ok = right.mean(1) >= acc[ref] - max_drop - 1e-12
        if ok.any():
            c = cost.mean(1)
            c[~ok] = np.inf
            i = int(np.argmin(c))
            if c[i] < best_cost:
                best_cost = float(c[i])
                best = Setting(chain, keys, tuple((float(t),) for t in mesh[i, :, 0]))
    return best

