"""The loss model the frontier is drawn from: isotonic risk of accepting a rung's answer."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cascade.suite.outcomes import OutcomeTable
from cascade.tuning.setting import BoolArray, FloatArray
from cascade.tuning.simulate import versus

__all__ = ["LossModel", "risk_path"]


def _isotonic(x: FloatArray, y: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Non-decreasing least-squares fit of y on x (pool adjacent violators); returns the
    distinct x values and the fitted level at each."""
    order = np.argsort(x, kind="stable")
    xs, ys = x[order], y[order]
    ux, inv = np.unique(xs, return_inverse=True)
    sums = np.bincount(inv, weights=ys)
    wts = np.bincount(inv).astype(float)
    lv: list[float] = []
    lw: list[float] = []
    ln: list[int] = []
    for s, w in zip(sums, wts, strict=True):
        lv.append(s / w)
        lw.append(w)
        ln.append(1)
        while len(lv) > 1 and lv[-2] > lv[-1]:
            w2 = lw[-2] + lw[-1]
            lv[-2] = (lv[-2] * lw[-2] + lv[-1] * lw[-1]) / w2
            lw[-2] = w2
            ln[-2] += ln[-1]
            lv.pop()
            lw.pop()
            ln.pop()
    fitted = np.repeat(np.array(lv), np.array(ln))
    return ux, fitted


@dataclass(frozen=True)
class _RiskCurve:
    """Estimated accuracy risk of accepting rung answers scoring >= x (non-increasing in x)."""

    x: FloatArray
    risk: FloatArray

    def threshold(self, rho: float) -> float:
        ok = np.nonzero(self.risk <= rho)[0]
        return float(self.x[ok[0]]) if ok.size else math.inf


def _risk_curve(scores: FloatArray, d: FloatArray) -> _RiskCurve | None:
    ok = np.isfinite(scores)
    if ok.sum() < 2:
        return None
    ux, fitted = _isotonic(scores[ok], -d[ok])
    return _RiskCurve(ux, -fitted)


def _rung_score(table: OutcomeTable, keys: Sequence[str], j: int) -> FloatArray:
    """One score per case for rung ``j``: its scoring verifier's, or with several the lowest
    of their empirical quantiles (labels unused; a case passes only where all of them pass).
    A verifier that does not judge the rung (+inf) constrains nothing."""
    cols = [table.scores[k][:, j] for k in keys]
    if len(cols) == 1:
        return cols[0]
    qs = []
    for c in cols:
        fin = np.sort(c[np.isfinite(c)])
        q = np.where(np.isposinf(c), 1.0, np.nan)
        ok = np.isfinite(c)
        q[ok] = np.searchsorted(fin, c[ok], side="right") / max(fin.size, 1)
        qs.append(q)
    return np.asarray(np.min(np.stack(qs), axis=0), dtype=float)


def _loss_at(curve: _RiskCurve | None, s: FloatArray, fallback: float) -> FloatArray:
    if curve is None:
        return np.full(s.shape, fallback)
    idx = np.searchsorted(curve.x, s, side="right") - 1
    return np.asarray(curve.risk[np.clip(idx, 0, None)], dtype=float)


class LossModel:
    """The model the frontier is drawn from: per case and chain position, the expected net
    accuracy loss against the reference of accepting that rung's answer, a non-increasing
    step function of its score fitted on every case (isotonic). A handful of steps per rung
    stand in for one noisy count per setting, so settings that only look good by luck on
    these cases do not reach the frontier. With a ``normaliser`` it also fits, on the cases
    that agree with the previous rung, the loss of a gated acceptance. A rung's fit does not
    depend on the chain, so each is made once and shared by every chain it appears in."""

    def __init__(self, table: OutcomeTable, keys: Sequence[str], ref: int,
                 normaliser: str = "") -> None:
        self._table, self._keys, self._ref, self._norm = table, keys, ref, normaliser
        better, worse = versus(table, ref)
        self._net = worse.astype(float) - better
        self._plain: dict[int, FloatArray] = {}
        self._gated: dict[tuple[int, int], FloatArray] = {}

    def _fit(self, j: int, agree: BoolArray | None) -> FloatArray:
        d = self._net[:, j]
        s = _rung_score(self._table, self._keys, j)
        if agree is None:
            return _loss_at(_risk_curve(s, d), s, float(d.mean()))
        fallback = float(d[agree].mean()) if agree.any() else 1.0
        return _loss_at(_risk_curve(np.where(agree, s, np.nan), d), s, fallback)

    def columns(self, chain: Sequence[int]) -> tuple[FloatArray, FloatArray]:
        """(plain, gated), each (n, len(chain)): the loss of accepting at each position on the
        rung's own verdicts, and when gated on agreeing with the position before."""
        n = self._table.n
        plain = np.zeros((n, len(chain)))
        gated = np.zeros((n, len(chain)))
        for p, j in enumerate(chain):
            if j == self._ref:
                continue
            if j not in self._plain:
                self._plain[j] = self._fit(j, None)
            plain[:, p] = self._plain[j]
            if not (self._norm and p > 0):
                continue
            pair = (j, chain[p - 1])
            if pair not in self._gated:
                agree = self._table.agrees(j, chain[p - 1], self._norm)
                if agree is None:
                    continue
                self._gated[pair] = self._fit(j, agree)
            gated[:, p] = self._gated[pair]
        return plain, gated


def risk_path(table: OutcomeTable, chain: Sequence[int], ref: int, keys: Sequence[str],
          max_points: int = 64) -> FloatArray:
    """Threshold settings of one chain, conservative first, learnt from ``table``'s labels.

    Returns (m, k-1, V); row 0 accepts nothing early.
    """
    early = list(chain[:-1])
    k1, nv = len(early), len(keys)
    better, worse = versus(table, ref)
    net = worse.astype(float) - better
    curves: list[list[_RiskCurve | None]] = []
    rhos: list[float] = []
    for j in early:
        row: list[_RiskCurve | None] = []
        for key in keys:
            s = table.scores[key][:, j]
            c = None if np.all(np.isinf(s)) else _risk_curve(s, net[:, j])
            row.append(c)
            if c is not None:
                rhos.extend(c.risk.tolist())
        curves.append(row)
    grid = np.unique(np.array(rhos)) if rhos else np.array([0.0])
    if grid.size > max_points:
        grid = np.unique(np.quantile(grid, np.linspace(0, 1, max_points)))
    out = np.full((grid.size + 1, k1, nv), math.inf)
    for g, rho in enumerate(grid, 1):
        for p in range(k1):
            for v, key in enumerate(keys):
                c = curves[p][v]
                if c is not None:
                    out[g, p, v] = c.threshold(float(rho))
                elif np.all(np.isinf(table.scores[key][:, early[p]])):
                    out[g, p, v] = -math.inf  # this verifier does not judge this rung
    return out

