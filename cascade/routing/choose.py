"""Tuning the router's setting: where a request starts and which rungs it skips, chosen jointly
with the rungs' confidence thresholds under the tuner's guard, and off when it does not pay.

Two families of candidates, both judged by the tuner's guard (net accuracy change against
**every rung that could be the best** on new questions, as :func:`cascade.tuning.guard.
plausible_best` finds them, minus z standard errors, with its pseudo-discordant case, must stay
above minus the allowed drop) on the router's *cross-fitted* scores (each case scored by a model
fitted without it):

- **route**: one cheap rung, then one of those rivals; the cheap rung is tried only when the
  router's P(right) reaches its ``skip_below``, and a tried rung's answer is accepted (no
  verifier decides: this is the family for ladders without a confidence signal);
- **skip**: the tuner's own recommendation, with a ``skip_below`` on each early rung: a rung
  predicted to fail is not paid for, and the climb goes on as tuned.

Only each family's frontier under the router's own expected loss (mean over cases of P(the
reference is right) - P(the answer given is right), from the cross-fitted scores) reaches the
guard, with z at ``delta / 2`` for the two families and two pseudo-disagreeing cases (as the
tuner's agreement gate). The cheapest candidate that passes wins
over the tuner's recommendation without a router only when it saves at least ``min_gain`` of
the reference's cost. Measured (``bench/router.py``, a ladder's five benchmarks pooled): with
the skip family unfiltered and z at ``delta`` the llama ladder's tuned climb plus router lost
1.08 points on held-out folds (the tuner alone 0.54); with this guard 0.94. Without
confidences the qwen/OpenAI pool lost 1.08 points with up to three cheap rungs in a route,
0.40 with one (see ``_MAX_EARLY`` and the README).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations, product
from typing import Any

import numpy as np
import numpy.typing as npt

from cascade.errors import ConfigError
from cascade.suite import OutcomeTable
from cascade.tuning.candidates import CHEAPER as _CHEAPER
from cascade.tuning.choose import select
from cascade.tuning.guard import DELTA, z_value
from cascade.tuning.guard import PSEUDO_GATE as _PSEUDO_GATE
from cascade.tuning.guard import model_frontier as _frontier_of_model
from cascade.tuning.guard import paired_bound as _guard
from cascade.tuning.guard import rivals as rival_rungs
from cascade.tuning.setting import Setting
from cascade.tuning.simulate import simulate, versus

__all__ = ["ROUTE_LEVELS", "RouteSetting", "choose_route_setting", "simulate_routed"]

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]

ROUTE_LEVELS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.99)
"""Candidate ``skip_below`` values, fixed in advance (never fitted to the labels)."""
_MAX_EARLY = 1
"""Route-family chains hold at most this many early rungs. The candidates grow as 10^k, and the
cheapest passing one is a selection the guard does not cover: without confidences the
qwen/OpenAI pool lost 1.08 points held out with three early rungs, 0.88 with two, 0.40 with
one, at a larger saving (57.9% against 51.6%; ``bench/router.py quality``)."""
_BLOCK_ELEMS = 1 << 21
"""Cases × columns per block of :func:`_sums` (16 MB of float64)."""


@dataclass(frozen=True)
class RouteSetting:
    """A cascade over rungs ``chain`` of a table with a router in front.

    ``skip_below[p]``: the rung at position ``p`` is tried only when the router's P(right) for
    it reaches this (0: always; the last rung always). ``keys``/``thresholds`` are the
    confidence thresholds of the early rungs as in :class:`cascade.tuning.setting.Setting`;
    with no keys a tried early rung's answer is accepted.
    """

    chain: tuple[int, ...]
    skip_below: tuple[float, ...]
    keys: tuple[str, ...] = ()
    thresholds: tuple[tuple[float, ...], ...] = ()

    @property
    def routed(self) -> bool:
        return any(u > 0 for u in self.skip_below[:-1])

    @property
    def setting(self) -> Setting:
        """The tuner's setting the climb runs once routed (thresholds only)."""
        k1 = len(self.chain) - 1
        return Setting(self.chain, self.keys,
                       self.thresholds if self.keys else tuple(() for _ in range(k1)))

    def describe(self, table: OutcomeTable) -> str:
        parts = []
        for p, j in enumerate(self.chain):
            label = table.rungs[j].label
            bits = []
            if p < len(self.chain) - 1:
                if self.skip_below[p] > 0:
                    bits.append(f"router P>={self.skip_below[p]:.3g}")
                if self.keys:
                    bits += [f"{k}>={t:.3g}" for k, t in zip(self.keys, self.thresholds[p],
                                                             strict=True) if math.isfinite(t)]
                else:
                    bits.append("accepts when tried")
            parts.append(label + (f" [{', '.join(bits)}]" if bits else ""))
        return " → ".join(parts)


def _run(table: OutcomeTable, p: FloatArray, chain: Sequence[int], keys: Sequence[str],
         u: FloatArray, th: FloatArray | None
         ) -> tuple[BoolArray, FloatArray, FloatArray, IntArray]:
    """Right, cost, the router's P(right) of the answer given and the table column that gave
    it, (m, n), of ``m`` routed settings of one chain: ``u`` (m, k-1) skip levels, ``th``
    (m, k-1, V) confidence thresholds or None (a tried early rung accepts)."""
    ch = list(chain)
    n, k = table.n, len(ch)
    m = u.shape[0]
    if k == 1:
        return (np.broadcast_to(table.correct[:, ch[0]], (m, n)).copy(),
                np.broadcast_to(table.cost[:, ch[0]], (m, n)).copy(),
                np.broadcast_to(p[:, ch[0]], (m, n)).copy(),
                np.full((m, n), ch[0], dtype=np.int64))
    act = p[None, :, ch[:-1]] >= u[:, None, :]  # (m, n, k-1)
    acc = act.copy()
    if th is not None:
        for v, key in enumerate(keys):
            s = table.scores[key][:, ch[:-1]]
            with np.errstate(invalid="ignore"):
                acc &= s[None] >= th[:, None, :, v]
    for flags in table.passed.values():
        acc &= flags[None][:, :, ch[:-1]]
    ones = np.ones((m, n, 1), dtype=bool)
    acc = np.concatenate([acc, ones], axis=2)
    act = np.concatenate([act, ones], axis=2)
    ex = np.argmax(acc, axis=2)
    rows = np.arange(n)[None, :]
    right = table.correct[:, ch][rows, ex]
    paid = np.cumsum(np.where(act, table.cost[:, ch][None], 0.0), axis=2)
    cost = np.take_along_axis(paid, ex[:, :, None], axis=2)[:, :, 0]
    return right, cost, p[:, ch][rows, ex], np.asarray(ch, dtype=np.int64)[ex]


def _run_one(table: OutcomeTable, scores: FloatArray, setting: RouteSetting
             ) -> tuple[BoolArray, FloatArray, IntArray]:
    k1 = len(setting.chain) - 1
    u = np.array([setting.skip_below[:k1]], dtype=float).reshape(1, k1)
    th = (np.array([setting.thresholds], dtype=float).reshape(1, k1, len(setting.keys))
          if setting.keys else None)
    right, cost, _p, col = _run(table, scores, setting.chain, setting.keys, u, th)
    return right[0], cost[0], col[0]


def simulate_routed(table: OutcomeTable, scores: FloatArray, setting: RouteSetting
                    ) -> tuple[BoolArray, FloatArray]:
    """Per case: was the routed cascade's answer right, and what did it cost. ``scores`` are
    the router's P(right), cases × the table's rungs."""
    right, cost, _col = _run_one(table, scores, setting)
    return right, cost


def routed_exits(table: OutcomeTable, scores: FloatArray, setting: RouteSetting) -> IntArray:
    """Per case, the chain position whose answer the routed cascade gives (as
    :func:`cascade.tuning.simulate.simulate`'s exit positions, for the drift rates)."""
    col = _run_one(table, scores, setting)[2]
    where = {int(j): p for p, j in enumerate(setting.chain)}
    return np.array([where[int(c)] for c in col], dtype=np.int64)


@dataclass
class RouteChoice:
    """The chosen setting, the tuner's recommendation without a router, and the evidence."""

    setting: RouteSetting
    base: Setting
    on: bool
    reason: str
    report: dict[str, Any] = field(default_factory=dict)


def _stats(table: OutcomeTable, cols: IntArray, cost: FloatArray, refs: Sequence[int]
           ) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Per setting and per rung in ``refs``: cases whose answer (from table column ``cols``,
    settings × cases) is known better than the rung's, possibly worse (as the tuner's guard
    counts them, :func:`~cascade.tuning.simulate.versus`: an unlabelled answer that differs
    from the rung's is a loss, never a tie); and the setting's mean cost."""
    rows = np.arange(table.n)[None, :]
    better = np.zeros((cols.shape[0], len(refs)))
    worse = np.zeros((cols.shape[0], len(refs)))
    for k, c in enumerate(refs):
        vb, vw = versus(table, int(c))
        better[:, k] = vb[rows, cols].sum(axis=1)
        worse[:, k] = vw[rows, cols].sum(axis=1)
    return better, worse, cost.mean(axis=1)


_Cand = tuple["RouteSetting", FloatArray, FloatArray, float, float]
"""(setting, better and worse against each rival, mean cost, the router's expected loss)."""


def _rows_product(factors: Sequence[FloatArray], n: int) -> FloatArray:
    """Per case, the outer product of its rows of ``factors``, flattened (C order)."""
    out = np.ones((n, 1))
    for f in factors:
        out = (out[:, :, None] * f[:, None, :]).reshape(n, -1)
    return out


def _sums(factors: Sequence[FloatArray], w: FloatArray) -> FloatArray:
    """``S[l_0, ..., l_q, t] = sum over cases i of factors[0][i, l_0] ... factors[q][i, l_q]
    * w[i, t]``: half the factors' products on each side of one matrix product, in blocks of
    cases. Exact for 0/1 factors and integer weights whose sums stay below 2**53."""
    n, t = w.shape
    h = len(factors) // 2
    shape = (*(f.shape[1] for f in factors), t)
    out = np.zeros((int(np.prod(shape[:h], dtype=np.int64)),
                    int(np.prod(shape[h:], dtype=np.int64))))
    width = max(1, out.shape[1])
    step = max(1, _BLOCK_ELEMS // width)
    for a in range(0, n, step):
        left = _rows_product([f[a:a + step] for f in factors[:h]], min(step, n - a))
        right = _rows_product([f[a:a + step] for f in factors[h:]], min(step, n - a))
        out += left.T @ (right[:, :, None] * w[a:a + step, None, :]).reshape(right.shape[0], -1)
    return out.reshape(shape)


def _as_integers(x: FloatArray, terms: int) -> tuple[FloatArray, float]:
    """``x`` in units of a power of two small enough to keep 15 digits and large enough that
    any sum of ``terms`` of them is an exact integer in float64: sums in any order then agree
    to the last bit, so settings with the same outcomes tie exactly (as the frontier needs)."""
    top = float(np.max(np.abs(x))) if x.size else 0.0
    if not math.isfinite(top) or top == 0.0:  # nothing to scale (or a NaN to pass on)
        return x.astype(float), 1.0
    unit = 2.0 ** math.ceil(math.log2(top * max(terms, 1) / 2.0**52))
    return np.rint(x / unit), unit


def _family(table: OutcomeTable, p: FloatArray, chain: tuple[int, ...], keys: tuple[str, ...],
            th_row: FloatArray | None, levels: Sequence[float], ref: int,
            rivals: Sequence[int]) -> list[_Cand]:
    """Every combination of ``levels`` on the early rungs of ``chain``, with its gains and
    losses against each of ``rivals``, its mean cost and the router's own expected loss
    against ``ref``.

    Why not replay each combination (:func:`_run`): there are ``len(levels) ** (k - 1)`` of
    them, 14,641 for a five-rung climb, and replaying them on 10,000 cases took 25 s and
    2.6 GB. A case's outcome is a product over rungs of whether it is tried and accepted there,
    each of which depends on one rung's level only, so each total is a sum of such products
    over the cases: a few matrix products (:func:`_sums`) on integer-valued weights, which
    give the same counts, and the same costs and losses to 1e-12."""
    ch = list(chain)
    n, k1 = table.n, len(chain) - 1
    lev = np.asarray(levels, dtype=float)
    accepts = np.ones((n, k1), dtype=bool)  # where each early rung would accept, if tried
    if th_row is not None:
        for v, key in enumerate(keys):
            with np.errstate(invalid="ignore"):
                accepts &= table.scores[key][:, ch[:-1]] >= th_row[None, :, v]
    for flags in table.passed.values():
        accepts &= flags[:, ch[:-1]]
    tried = [(p[:, ch[q], None] >= lev[None, :]).astype(float) for q in range(k1)]
    exits = [tried[q] * accepts[:, q, None] for q in range(k1)]
    goes_on = [1.0 - e for e in exits]
    cost, c_unit = _as_integers(table.cost[:, ch], n * len(ch))
    pr, p_unit = _as_integers(p[:, ch], n)
    vs = [versus(table, int(r)) for r in rivals]
    # per rung of the chain, what a case exiting there adds: P(right), then better and worse
    # against each rival
    gain = [np.stack([pr[:, q], *(b[:, ch[q]] for b, _w in vs),
                      *(w[:, ch[q]] for _b, w in vs)], axis=1).astype(float)
            for q in range(len(ch))]
    shape = (len(lev),) * k1
    paid = np.zeros(shape)
    out = np.zeros((*shape, gain[0].shape[1]))
    for q in range(k1):
        pad = (1,) * (k1 - q - 1)
        paid += _sums([*goes_on[:q], tried[q]], cost[:, q:q + 1]).reshape(*shape[:q + 1], *pad)
        out += _sums([*goes_on[:q], exits[q]], gain[q]).reshape(*shape[:q + 1], *pad, -1)
    last = _sums(goes_on, np.concatenate([cost[:, k1:], gain[k1]], axis=1))
    paid += last[..., 0]
    out += last[..., 1:]
    paid = paid.reshape(-1) * c_unit / max(n, 1)
    out = out.reshape(-1, out.shape[-1])
    loss = float(p[:, ref].mean()) - out[:, 0] * p_unit / max(n, 1)
    r = len(rivals)
    better, worse = out[:, 1:1 + r], out[:, 1 + r:]
    thr = () if th_row is None else tuple(tuple(float(x) for x in row) for row in th_row)
    return [(RouteSetting(chain, (*u, 0.0), keys, thr), better[g], worse[g], float(paid[g]),
             float(loss[g]))
            for g, u in enumerate(product([float(x) for x in lev], repeat=k1))]


def choose_route_setting(table: OutcomeTable, scores: FloatArray, *,
                         max_accuracy_drop: float = 0.01, delta: float = DELTA,
                         min_gain: float = 0.01, base: Setting | None = None) -> RouteChoice:
    """The cheapest routed setting that passes the tuner's guard on ``scores`` (the router's
    cross-fitted P(right), cases × the table's rungs), or the tuner's own recommendation
    (``base``, else :func:`cascade.tuning.choose.select`) when no router saves ``min_gain`` of the
    reference's cost."""
    if scores.shape != table.correct.shape:
        raise ConfigError("router scores must be cases × the table's rungs")
    n = table.n
    # Which rung is best is uncertain too: guard against every rung that could be (as the
    # tuner does), and end routes at each of them; the dearest is the reference they save on.
    looks_best, rivals, ref = rival_rungs(table, delta)
    mean_cost = table.cost.mean(axis=0)
    if base is None:
        base, _ref = select(table, max_accuracy_drop=max_accuracy_drop, delta=delta)
    ref_cost = float(mean_cost[ref])
    _b_right, b_cost, b_exit = simulate(table, base)
    b_cols = np.asarray(base.chain, dtype=np.int64)[b_exit][None]
    bb, bw, _bc = _stats(table, b_cols, b_cost[None], [looks_best])
    base_cost = float(b_cost.mean())
    z = z_value(delta / 2)  # two families searched: Bonferroni, as the tuner's agreement gate
    routes: list[_Cand] = []
    order = [int(j) for j in np.argsort(mean_cost, kind="stable")]
    for end in rivals:
        cheaper = [j for j in order if j != end and mean_cost[j] <= _CHEAPER * float(
            mean_cost[end])]
        for r in range(1, min(_MAX_EARLY, len(cheaper)) + 1):
            for sub in combinations(cheaper, r):
                routes += _family(table, scores, (*sub, end), (), None, ROUTE_LEVELS, ref,
                                  rivals)
    skips: list[_Cand] = []
    if len(base.chain) > 1 and not base.agree:
        th_row = np.array(base.thresholds, dtype=float)
        skips = _family(table, scores, base.chain, base.keys, th_row, (0.0, *ROUTE_LEVELS), ref,
                        rivals)
    n_all = len(routes) + len(skips)
    cands: list[_Cand] = []
    for fam in (routes, skips):  # only the router's own frontier per family: its ranking,
        if fam:                  # not the labels', picks what the guard judges
            front = _frontier_of_model(np.array([c[4] for c in fam]),
                                       np.array([c[3] for c in fam]), ref_cost)
            cands += [fam[int(i)] for i in front]
    base_rs = RouteSetting(base.chain, (0.0,) * len(base.chain), base.keys, base.thresholds)
    report: dict[str, Any] = {
        "candidates": n_all, "frontier": len(cands), "z": z,
        "reference": table.rungs[ref].label,
        "rivals": [table.rungs[j].label for j in rivals],
        "without_router": {"setting": base.describe(table),
                           "accuracy_change": float((bb[0, 0] - bw[0, 0]) / max(n, 1)),
                           "cost_saving": 1 - base_cost / ref_cost if ref_cost > 0 else 0.0},
    }
    if not cands:
        return RouteChoice(base_rs, base, False, "no rung is cheap enough to route to", report)
    better = np.array([c[1] for c in cands])  # candidates × rivals
    worse = np.array([c[2] for c in cands])
    cost = np.array([c[3] for c in cands])
    bounds = [_guard(better[:, k], worse[:, k], n, z, _PSEUDO_GATE) for k in range(len(rivals))]
    lows = np.stack([bd[2] for bd in bounds], axis=1)
    binding = np.argmin(lows, axis=1)  # the rival whose bound binds, per candidate
    rows = np.arange(len(cands))
    change = np.stack([bd[0] for bd in bounds], axis=1)[rows, binding]
    se = np.stack([bd[1] for bd in bounds], axis=1)[rows, binding]
    lower = lows[rows, binding]
    ok = lower >= -max_accuracy_drop - 1e-12
    if not ok.any():
        return RouteChoice(base_rs, base, False, "no routed setting passed the guard", report)
    g = int(np.lexsort((-lower, np.where(ok, cost, math.inf)))[0])
    chosen = cands[g][0]
    saving = 1 - cost[g] / ref_cost if ref_cost > 0 else 0.0
    report["with_router"] = {"setting": chosen.describe(table),
                             "accuracy_change": float(change[g]), "stderr": float(se[g]),
                             "lower": float(lower[g]), "cost_saving": float(saving)}
    if not chosen.routed or base_cost - cost[g] < min_gain * ref_cost:
        return RouteChoice(base_rs, base, False,
                           f"the router would save {100 * (base_cost - cost[g]) / ref_cost:.1f}%"
                           f" of the reference's cost over the tuner alone, under the "
                           f"{100 * min_gain:.0f}% it must", report)
    return RouteChoice(chosen, base, True, "passed", report)
