"""Candidate settings, fixed in advance and never fitted to labels, and the reference rung."""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import combinations

import numpy as np

from cascade.errors import ConfigError
from cascade.suite.outcomes import OutcomeTable
from cascade.tuning.setting import BoolArray, FloatArray

__all__ = ["ALL_SUBSETS_UP_TO", "CHEAPER", "MAX_EARLY", "candidates", "mesh", "reference_rung",
           "rung_chains"]

CHEAPER = 0.5
_LEVELS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)
"""Candidate thresholds of a [0, 1] score (a confidence), fixed in advance: not fitted to labels,
so the candidate set itself carries no over-fit; they are also coarse, so there are few."""
_GATED_LEVELS = (0.0, 0.5, 0.7, 0.9, 0.99)
"""Candidate thresholds of a confidence on a rung that must also agree with the previous one."""
_QUANTILES = (0.0, 0.2, 0.35, 0.5, 0.65, 0.8, 0.9, 0.95, 0.99)
"""For scores outside [0, 1]: thresholds at these quantiles of the scores (labels unused)."""
_MAX_SETTINGS = 6561
"""Per rung subset: 9 levels for 4 early rungs; more dimensions get coarser levels."""


def rung_accuracy(table: OutcomeTable) -> FloatArray:
    """Each rung's accuracy on the labelled cases (the others carry no grades)."""
    lab = table.is_labelled
    if not lab.any():
        raise ConfigError("no case of the suite is labelled: label some (`cascade label` names "
                          "the ones that matter) before tuning", source=table.source)
    return np.asarray(table.correct[lab].mean(axis=0), dtype=float)


def reference_rung(table: OutcomeTable) -> int:
    """The rung that looks best: the most accurate on the suite's labelled cases, the cheaper on
    a tie. The guard also protects every rung that could be the best (see
    :func:`cascade.tuning.guard.plausible_best`)."""
    return int(np.lexsort((table.cost.mean(axis=0), -rung_accuracy(table)))[0])


MAX_EARLY = 4
"""On a ladder with more than :data:`ALL_SUBSETS_UP_TO` rungs cheaper than the reference, the
most rungs a cascade tries before it: the subsets grow as 2^rungs (a 12-rung ladder took over
3 minutes and 1.3 GB to tune), and a long climb rarely saves more than a short one."""
ALL_SUBSETS_UP_TO = 7
"""Rungs cheaper than the reference up to which every subset is a candidate chain (ladders of
up to 8 rungs: both shared ladders and the issues' 6-rung one are searched in full)."""


def rung_chains(order: Sequence[int], ref: int, mean_cost: FloatArray) -> list[tuple[int, ...]]:
    """Every subset of the rungs clearly cheaper than the reference (at most half its mean cost:
    a rung nearly as dear cannot save much), in cost order, ending at the reference; of at
    most :data:`MAX_EARLY` of them on a long ladder."""
    cheaper = [j for j in order if j != ref and mean_cost[j] <= CHEAPER * mean_cost[ref]]
    longest = len(cheaper) if len(cheaper) <= ALL_SUBSETS_UP_TO else MAX_EARLY
    out: list[tuple[int, ...]] = []
    for r in range(longest + 1):
        for sub in combinations(cheaper, r):
            out.append((*sub, ref))
    return out



def _levels(scores: FloatArray) -> FloatArray:
    """Candidate thresholds of one verifier at one rung, chosen without looking at labels."""
    fin = scores[np.isfinite(scores)]
    if fin.size == 0:
        # +inf everywhere: the verifier does not judge this rung (no threshold applies);
        # NaN everywhere: it never scores here, so the rung could never accept on it.
        return np.array([-math.inf if np.all(np.isposinf(scores)) else math.inf])
    if fin.min() >= 0.0 and fin.max() <= 1.0:
        return np.array(_LEVELS)
    return np.unique(np.quantile(fin, _QUANTILES))


def _gated_levels(scores: FloatArray) -> FloatArray:
    """Candidate thresholds of a score when the rung must also agree with the previous one:
    agreement already screens out many errors, so lower thresholds (0: agreement alone) are
    worth trying; fewer of them, to keep the candidate set small."""
    lv = _levels(scores)
    if lv.size == 1:
        return lv
    if np.array_equal(lv, np.array(_LEVELS)):
        return np.array(_GATED_LEVELS)
    return lv[:: max(1, lv.size // 4)]


def _subsample(x: FloatArray, g: int) -> FloatArray:
    return x if x.size <= g else x[np.unique(np.linspace(0, x.size - 1, g).round().astype(int))]


def candidates(table: OutcomeTable, chain: Sequence[int], keys: Sequence[str],
                gate: bool = False, max_settings: int = _MAX_SETTINGS, any_: bool = False
                ) -> tuple[FloatArray, BoolArray]:
    """Every combination of candidate thresholds of ``chain``'s early rungs, each rung after
    the first either on its own or also gated on agreeing with the previous one (``gate``).

    Returns thresholds (m, k-1, V) and gates (m, k-1). Levels never come from labels.
    """
    early = list(chain[:-1])
    k1, nv = len(early), len(keys)
    plain = [[_levels(table.scores[key][:, j]) for key in keys] for j in early]
    gated = [[(np.append(_levels(table.scores[key][:, j]), math.inf) if any_ else
                _gated_levels(table.scores[key][:, j])) for key in keys] if gate and p else None
             for p, j in enumerate(early)]
    if gate:  # a rung that never accepts may still be the witness the next rung agrees with
        for p in range(k1 - 1):
            plain[p] = [np.append(d, math.inf) if np.isfinite(d).any() else d for d in plain[p]]

    def count(g: int) -> int:
        total = 1
        for p in range(k1):
            o = math.prod(min(d.size, g) for d in plain[p])
            gp = gated[p]
            if gp is not None:
                o += math.prod(min(d.size, g) for d in gp)
            total *= o
        return total

    g = max(d.size for row in plain for d in row) if k1 and nv else 1
    while g > 2 and count(g) > max_settings:
        g -= 1
    per_pos: list[tuple[FloatArray, BoolArray]] = []
    for p in range(k1):
        opts = [np.stack(np.meshgrid(*[_subsample(d, g) for d in plain[p]], indexing="ij"),
                         axis=-1).reshape(-1, nv)]
        flags = [np.zeros(opts[0].shape[0], dtype=bool)]
        gp = gated[p]
        if gp is not None:
            go = np.stack(np.meshgrid(*[_subsample(d, g) for d in gp], indexing="ij"),
                          axis=-1).reshape(-1, nv)
            opts.append(go)
            flags.append(np.ones(go.shape[0], dtype=bool))
        per_pos.append((np.concatenate(opts), np.concatenate(flags)))
    if k1 == 0:
        return np.zeros((1, 0, nv)), np.zeros((1, 0), dtype=bool)
    idx = np.stack(np.meshgrid(*[np.arange(o.shape[0]) for o, _ in per_pos], indexing="ij"),
                   axis=-1).reshape(-1, k1)
    th = np.stack([per_pos[p][0][idx[:, p]] for p in range(k1)], axis=1)
    ag = np.stack([per_pos[p][1][idx[:, p]] for p in range(k1)], axis=1)
    return th, ag


def mesh(table: OutcomeTable, chain: Sequence[int], keys: Sequence[str]) -> FloatArray:
    """Every combination of candidate thresholds of ``chain``'s early rungs: (m, k-1, V)."""
    return candidates(table, chain, keys)[0]

