"""The tuner: the cheapest rungs and thresholds whose accuracy holds on questions it never saw.

Why not a plain grid search: choosing the cheapest of thousands of threshold settings whose
accuracy *on the suite* is within the allowed drop picks the setting that was luckiest on those
few hundred cases, and its accuracy drops on new ones (on the shared recorded data it broke a
1-point promise on 6 of 10 benchmarks, see ``bench/tuning.py``).

What we do instead:

1. The best single rung (``reference``) is the most accurate rung on the suite (ties: cheaper).
   A cascade ends at it and may start at any subset of the rungs that cost at most half as much.
2. Candidate thresholds are fixed in advance and never fitted to labels: for a confidence in
   [0, 1], ``0.5 … 0.999, 1.0``; for other scores, quantiles of the scores. Every rung subset ×
   every combination of its rungs' levels is one candidate (coarser levels when that would
   exceed a few thousand per subset).
3. A model ranks them: per rung, the expected net loss against the reference of accepting its
   answer, as a non-increasing step function of its score (isotonic, fitted on every case).
   Summed over the cases a candidate accepts early, that is its expected loss; only the
   model's frontier (from the safest up, each candidate cheaper than every safer one: some
   tens of the thousands) goes on. A handful of steps per rung stand in for one noisy count
   per candidate, so a candidate that only looks good because of a few lucky cases does not
   reach the frontier.
4. Each frontier candidate gets its *net* accuracy change against the reference on the suite,
   ``(better - worse) / n`` (cases it gets right where the reference is wrong offset those it
   gets wrong where the reference is right: cheap rungs are often right where the top one is
   not), and that change's paired standard error. The guard: ``change - z(1 - delta) × se >=
   -max_accuracy_drop``. The cheapest frontier candidate that passes is recommended; when none
   does, the reference alone is, and the report says so.
5. With ``agreement="all"`` (off by default) a rung after the first may also be *gated on
   agreement*: it accepts only when its confidence passes AND its normalised answer agrees with
   the previous rung's in the chain (the engine's ``agreement`` verifier, mode ``previous``;
   TUNED.toml lists it on that rung). A rung that never accepts may stay as the witness the
   next rung agrees with. Gated candidates have their own frontier (the model fitted on the
   cases that agree) and a stricter guard: two pseudo-discordant cases instead of one, and z
   at ``delta / F`` where F counts the gate patterns examined.

What the promise means: an *estimate*, not a guarantee. The guard is a one-sided ``1 - delta``
normal-approximation bound for the one setting chosen, not a family-wise guarantee over the
selection; choosing the cheapest of the frontier still makes the in-sample estimate somewhat
optimistic, and the margin (z standard errors plus pseudo-cases) is sized to absorb that, which
cross-validation on the shared recorded data checks (``bench/tuning.py``: the promise held on
10 of 10 benchmarks at 1, 2 and 3 points, on two independent sets of folds). What is exact:
the simulated accuracy and cost of a setting on the suite (the engine's policy replayed), and
that the recommendation is never dearer and no more accurate than a single rung on the suite.
What is not covered: questions unlike the suite's (the report's ``shift`` section measures
held-out groups), and suites of a few hundred cases cannot certify settings whose only evidence
is zero observed disagreement with the reference; such suites get small savings or the
reference alone. Measured, not shipped (same cross-validation): choosing among *all* candidates
rather than the frontier saved a little more but broke a 2-point promise on mmlu_llama (-2.3 to
-2.9 points); the agreement gate, even on its own frontier and guard, broke it there too
(llama models agree on the same wrong letter); fixed-sequence testing along a label-free path
ordered by the rungs' own confidences held everywhere but stopped at the first noisy step
(median saving 3%); an OR rule (confidence OR agreement, which the engine's all-verdicts policy
cannot run) saved less than AND.

Simulation is vectorised: for a setting, each case exits at the first rung whose every
verifier passes (score >= threshold), the last rung of the cascade accepting everything.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import combinations
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import numpy.typing as npt

from cascade.config import (
    CascadeConfig,
    RungConfig,
    VerifierConfig,
    load_config,
    parse_config,
)
from cascade.errors import ConfigError
from cascade.suite import OutcomeTable, load_outcome_table

__all__ = [
    "Setting",
    "TuneResult",
    "add_arguments",
    "grid_search_baseline",
    "group_folds",
    "reference_rung",
    "run",
    "select",
    "simulate",
    "to_config",
    "to_toml",
    "tune",
]

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]

Z90 = 1.6448536269514722


# ---------------------------------------------------------------- settings and simulation


@dataclass(frozen=True)
class Setting:
    """A cascade over some rungs of a table: thresholds for every rung but the last.

    ``thresholds[p][v]`` is the threshold of scoring verifier ``keys[v]`` at ``chain[p]``;
    ``agree[p]`` (when given) also requires ``chain[p]``'s answer to agree with
    ``chain[p - 1]``'s under ``normaliser`` (the engine's ``agreement`` verifier in mode
    ``previous``: the previous rung that answered in this climb). With ``accept = "any"`` a
    gated rung accepts when its scores pass *or* it agrees: measured for comparison only, the
    engine's policy needs every verdict to pass.
    """

    chain: tuple[int, ...]
    keys: tuple[str, ...] = ()
    thresholds: tuple[tuple[float, ...], ...] = ()
    agree: tuple[bool, ...] = ()
    normaliser: str = ""
    accept: str = "all"

    def gated(self, p: int) -> bool:
        """Whether early position ``p`` uses the agreement gate (never the first rung)."""
        return 0 < p < len(self.agree) and self.agree[p]

    def describe(self, table: OutcomeTable) -> str:
        parts = []
        for p, j in enumerate(self.chain):
            label = table.rungs[j].label
            if p < len(self.thresholds):
                th = ", ".join(f"{k}>={t:.3g}" for k, t in zip(self.keys, self.thresholds[p],
                                                              strict=True)
                               if math.isfinite(t) and not (self.gated(p) and t <= 0.0))
                if self.thresholds[p] and all(t == math.inf for t in self.thresholds[p]):
                    th = "never accepts"
                if self.gated(p):
                    prev = table.rungs[self.chain[p - 1]].label
                    joint = " or " if self.accept == "any" else ", "
                    th = (th + joint if th and th != "never accepts" else "") + \
                        f"agrees with {prev}"
                label += f" [{th or 'never accepts'}]"
            parts.append(label)
        return " → ".join(parts)


def _scoring_keys(table: OutcomeTable) -> tuple[str, ...]:
    return tuple(sorted(table.scores))


def _gates(table: OutcomeTable, chain: Sequence[int]) -> BoolArray:
    """Where the non-scoring verifiers pass, per case and early rung of ``chain``."""
    early = list(chain[:-1])
    g = np.ones((table.n, len(early)), dtype=bool)
    for flags in table.passed.values():
        g &= flags[:, early]
    return g


def _agree_cols(table: OutcomeTable, chain: Sequence[int], normaliser: str) -> BoolArray:
    """Per case and early position p of ``chain``: does ``chain[p]`` agree with ``chain[p-1]``
    (True at p = 0, where the engine's agreement verifier abstains)."""
    early = list(chain[:-1])
    out = np.ones((table.n, len(early)), dtype=bool)
    for p in range(1, len(early)):
        a = table.agrees(chain[p], chain[p - 1], normaliser)
        if a is None:
            raise ConfigError(f"the suite holds no {normaliser!r} agreement of its answers")
        out[:, p] = a
    return out


def _simulate_many(table: OutcomeTable, chain: Sequence[int], keys: Sequence[str],
                   th: FloatArray, ag: BoolArray | None = None, normaliser: str = "",
                   any_: bool = False) -> tuple[BoolArray, FloatArray, IntArray]:
    """Right/cost/exit position of ``m`` settings of one chain; ``th`` is (m, k-1, V), ``ag``
    (m, k-1) the agreement gates."""
    ch = list(chain)
    m, k = th.shape[0], len(ch)
    n = table.n
    cum = np.cumsum(table.cost[:, ch], axis=1)
    if k == 1:
        right = np.broadcast_to(table.correct[:, ch[0]], (m, n)).copy()
        return right, np.broadcast_to(cum[:, 0], (m, n)).copy(), np.zeros((m, n), np.int64)
    sc = np.ones((m, n, k - 1), dtype=bool)
    for v, key in enumerate(keys):
        s = table.scores[key][:, ch[:-1]]  # (n, k-1); NaN compares False: no score, no accept
        with np.errstate(invalid="ignore"):
            sc &= s[None, :, :] >= th[:, None, :, v]
    if ag is not None and ag.any():
        agree = _agree_cols(table, ch, normaliser)[None]
        on = ag[:, None, :]
        sc = (sc | (on & agree)) if any_ else (sc & (~on | agree))
    acc = _gates(table, ch)[None] & sc
    acc = np.concatenate([acc, np.ones((m, n, 1), dtype=bool)], axis=2)
    exit_pos = np.argmax(acc, axis=2).astype(np.int64)
    right = table.correct[:, ch][np.arange(n)[None, :], exit_pos]
    cost = cum[np.arange(n)[None, :], exit_pos]
    return right, cost, exit_pos


def _prune(setting: Setting) -> Setting:
    """Drop early rungs that can never accept: they would only add cost. A rung whose answer
    the next rung's agreement gate compares with is a witness and stays."""
    rows = setting.thresholds
    keep = [p for p, row in enumerate(rows)
            if not any(t == math.inf for t in row) or setting.gated(p + 1)]
    agree = tuple(setting.gated(p) and p - 1 in keep for p in keep) if setting.agree else ()
    return replace(setting, chain=tuple(setting.chain[p] for p in keep) + setting.chain[-1:],
                   thresholds=tuple(rows[p] for p in keep),
                   agree=agree if any(agree) else ())


def simulate(table: OutcomeTable, setting: Setting) -> tuple[BoolArray, FloatArray, IntArray]:
    """Per case: was the cascade's answer right, what did it cost, at which chain position it
    stopped."""
    k1 = len(setting.chain) - 1
    th = np.array(setting.thresholds, dtype=float).reshape(1, k1, len(setting.keys))
    ag = (np.array([[setting.gated(p) for p in range(k1)]], dtype=bool)
          if setting.agree else None)
    right, cost, ex = _simulate_many(table, setting.chain, setting.keys, th, ag,
                                     setting.normaliser, setting.accept == "any")
    return right[0], cost[0], ex[0]


# ---------------------------------------------------------------- the path


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


class _LossModel:
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
        self._ref_right = table.correct[:, ref].astype(float)
        self._plain: dict[int, FloatArray] = {}
        self._gated: dict[tuple[int, int], FloatArray] = {}

    def _fit(self, j: int, agree: BoolArray | None) -> FloatArray:
        d = self._ref_right - self._table.correct[:, j]
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


def _path(table: OutcomeTable, chain: Sequence[int], ref: int, keys: Sequence[str],
          max_points: int = 64) -> FloatArray:
    """Threshold settings of one chain, conservative first, learnt from ``table``'s labels.

    Returns (m, k-1, V); row 0 accepts nothing early.
    """
    early = list(chain[:-1])
    k1, nv = len(early), len(keys)
    d = table.correct[:, ref].astype(float)
    curves: list[list[_RiskCurve | None]] = []
    rhos: list[float] = []
    for j in early:
        row: list[_RiskCurve | None] = []
        for key in keys:
            s = table.scores[key][:, j]
            c = None if np.all(np.isinf(s)) else _risk_curve(s, d - table.correct[:, j])
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


def reference_rung(table: OutcomeTable) -> int:
    """The best single rung: the most accurate on the suite, the cheaper on a tie. Every promise
    the tuner makes is measured against it."""
    return int(np.lexsort((table.cost.mean(axis=0), -table.correct.mean(axis=0)))[0])


def _chains(order: Sequence[int], ref: int, mean_cost: FloatArray) -> list[tuple[int, ...]]:
    """Every subset of the rungs clearly cheaper than the reference (at most half its mean cost:
    a rung nearly as dear cannot save much), in cost order, ending at the reference."""
    cheaper = [j for j in order if j != ref and mean_cost[j] <= _CHEAPER * mean_cost[ref]]
    out: list[tuple[int, ...]] = []
    for r in range(len(cheaper) + 1):
        for sub in combinations(cheaper, r):
            out.append((*sub, ref))
    return out


# ---------------------------------------------------------------- results


@dataclass
class TuneResult:
    """The recommendation, the config that carries it, and the report behind it."""

    setting: Setting
    config: CascadeConfig
    report: dict[str, Any]
    frontier: list[dict[str, Any]] = field(default_factory=list)

    @property
    def is_cascade(self) -> bool:
        return len(self.setting.chain) > 1


def _interval(samples: FloatArray) -> list[float]:
    lo, hi = np.quantile(samples, [0.05, 0.95])
    return [float(lo), float(hi)]


def _bootstrap_stats(right: BoolArray, cost: FloatArray, ref_right: BoolArray,
                     ref_cost: FloatArray, rng: np.random.Generator, b: int = 1000
                     ) -> dict[str, list[float]]:
    n = right.size
    chunk = max(1, min(b, 4_000_000 // max(n, 1)))
    acc, cst, dacc, save = [], [], [], []
    for start in range(0, b, chunk):
        idx = rng.integers(0, n, size=(min(chunk, b - start), n))
        a = right[idx].mean(1)
        c = cost[idx].mean(1)
        ra = ref_right[idx].mean(1)
        rc = ref_cost[idx].mean(1)
        acc.append(a)
        cst.append(c)
        dacc.append(a - ra)
        save.append(1 - c / np.where(rc > 0, rc, np.nan))
    return {
        "accuracy": _interval(np.concatenate(acc)),
        "mean_cost_usd": _interval(np.concatenate(cst)),
        "accuracy_change": _interval(np.concatenate(dacc)),
        "cost_saving": _interval(np.nan_to_num(np.concatenate(save))),
    }


def _pareto(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    pts = sorted(points, key=lambda p: (p["mean_cost_usd"], -p["accuracy"]))
    out: list[dict[str, Any]] = []
    best = -1.0
    for p in pts:
        if p["accuracy"] > best + 1e-12:
            out.append(p)
            best = p["accuracy"]
    return out


# ---------------------------------------------------------------- the tuner


@dataclass(frozen=True, kw_only=True)
class _Choice:
    setting: Setting
    passed: bool
    tested: int
    """Settings the guard judged (the model's frontier)."""
    reason: str
    candidates: int = 0
    """Settings the model ranked."""
    change: float = 0.0
    """Net accuracy change against the reference on the suite (estimate)."""
    stderr: float = 0.0
    """Its estimated standard error (paired, with one pseudo-discordant case)."""
    lower: float = 0.0
    """The guard's bound: ``change - z * stderr``."""
    z: float = 0.0
    """The guard's z for this setting (larger for settings that use the agreement gate)."""


_CHEAPER = 0.5
_LEVELS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)
"""Candidate thresholds of a [0, 1] score (a confidence), fixed in advance: not fitted to labels,
so the candidate set itself carries no over-fit; they are also coarse, so there are few."""
_GATED_LEVELS = (0.0, 0.5, 0.7, 0.9, 0.99)
"""Candidate thresholds of a confidence on a rung that must also agree with the previous one."""
_QUANTILES = (0.0, 0.2, 0.35, 0.5, 0.65, 0.8, 0.9, 0.95, 0.99)
"""For scores outside [0, 1]: thresholds at these quantiles of the scores (labels unused)."""
_MAX_SETTINGS = 6561
"""Per rung subset: 9 levels for 4 early rungs; more dimensions get coarser levels."""
_CELLS = 4_000_000
"""Settings × cases per vectorised block (bounds memory)."""
_PSEUDO = 1.0
_PSEUDO_GATE = 2.0
"""Settings that use the agreement gate are held to a stricter guard: two pseudo-discordant
cases (zero observed disagreements with the reference can then not pass on a few hundred
cases) and a Bonferroni z over the gate patterns examined (see :func:`_choose`)."""


def z_value(delta: float) -> float:
    """The one-sided normal quantile for a ``1 - delta`` bound."""
    return NormalDist().inv_cdf(1.0 - min(max(delta, 1e-9), 0.5))


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


def _candidates(table: OutcomeTable, chain: Sequence[int], keys: Sequence[str],
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


def _mesh(table: OutcomeTable, chain: Sequence[int], keys: Sequence[str]) -> FloatArray:
    """Every combination of candidate thresholds of ``chain``'s early rungs: (m, k-1, V)."""
    return _candidates(table, chain, keys)[0]


def _mesh_stats(table: OutcomeTable, chain: Sequence[int], keys: Sequence[str], th: FloatArray,
                ref: int, ag: BoolArray | None = None, normaliser: str = "",
                any_: bool = False, risk: tuple[FloatArray, FloatArray] | None = None
                ) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """Mean cost, the counts of cases the cascade gets right where the reference is wrong
    (``better``) and wrong where it is right (``worse``), and the model's expected net loss
    (the sum of ``risk`` at each case's exit, over n; zeros without ``risk``), for each of
    ``m`` settings. ``risk`` is (plain, gated): per case and chain position, the expected loss
    of accepting there on the rung's own verdicts, and when gated on agreement.

    Same semantics as :func:`simulate`, but by blocks of settings and matrix products, so that
    thousands of settings over 10,000 cases take a second.
    """
    ch = list(chain)
    n, m, k1 = table.n, th.shape[0], len(ch) - 1
    rr = table.correct[:, ref]
    cum = np.cumsum(table.cost[:, ch], axis=1)
    good = (table.correct[:, ch] & ~rr[:, None]).astype(float)
    bad = (~table.correct[:, ch] & rr[:, None]).astype(float)
    gates = _gates(table, ch)
    use_ag = ag is not None and bool(ag.any())
    agree = _agree_cols(table, ch, normaliser) if use_ag else np.ones((n, k1), dtype=bool)
    # Whether a case is accepted at position p depends only on which candidate thresholds its
    # score reaches: replace each score by that level and each threshold by its rank, then merge
    # cases with the same levels, gates and agreement into one weighted row. Exactly the same
    # sums, over far fewer rows.
    levels = np.zeros((n, k1, len(keys)), dtype=np.int64)
    ranks = np.zeros(th.shape, dtype=np.int64)
    for p in range(k1):
        for v, key in enumerate(keys):
            s = table.scores[key][:, ch[p]]
            grid = np.unique(th[:, p, v][~np.isnan(th[:, p, v])])
            lv = np.searchsorted(grid, s, side="right")
            lv[np.isnan(s)] = 0
            levels[:, p, v] = lv
            # s >= t  <=>  level(s) >= rank(t) + 1; a NaN threshold accepts nothing.
            rk = np.searchsorted(grid, th[:, p, v], side="left") + 1
            rk[np.isnan(th[:, p, v])] = np.iinfo(np.int64).max
            ranks[:, p, v] = rk
    key_rows = np.concatenate([levels.reshape(n, -1), gates.astype(np.int64),
                               agree.astype(np.int64)], axis=1)
    rows, inverse = np.unique(key_rows, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    g = rows.shape[0]

    def pool(x: FloatArray) -> FloatArray:
        out = np.zeros((g, x.shape[1]))
        np.add.at(out, inverse, x)
        return out

    plain_risk, gated_risk = risk if risk is not None else (np.zeros((n, k1 + 1)),) * 2
    cum_g, good_g, bad_g = pool(cum), pool(good), pool(bad)
    risk_g, risk_gated_g = pool(plain_risk), pool(gated_risk)
    lev_g = rows[:, : k1 * len(keys)].reshape(g, k1, len(keys))
    gates_g = rows[:, k1 * len(keys): k1 * len(keys) + k1].astype(bool)
    agree_g = rows[:, k1 * len(keys) + k1:].astype(bool)
    cost = np.empty(m)
    better = np.empty(m)
    worse = np.empty(m)
    loss = np.empty(m)
    step = max(1, _CELLS // max(g, 1))
    for a in range(0, m, step):
        r = ranks[a:a + step]
        reach = np.ones((r.shape[0], g), dtype=bool)
        c = np.zeros(r.shape[0])
        b = np.zeros(r.shape[0])
        w = np.zeros(r.shape[0])
        lo = np.zeros(r.shape[0])
        for p in range(k1):
            acc = np.ones(reach.shape, dtype=bool)
            for v in range(len(keys)):
                acc &= lev_g[None, :, p, v] >= r[:, p, v][:, None]
            if use_ag and ag is not None and p > 0:
                on = ag[a:a + step, p][:, None]
                acc = (acc | (on & agree_g[None, :, p])) if any_ else (
                    acc & (~on | agree_g[None, :, p]))
            acc &= gates_g[None, :, p]
            out = reach & acc
            reach &= ~acc
            f = out.astype(float)
            c += f @ cum_g[:, p]
            b += f @ good_g[:, p]
            w += f @ bad_g[:, p]
            if use_ag and ag is not None and p > 0:
                lo += np.where(ag[a:a + step, p], f @ risk_gated_g[:, p], f @ risk_g[:, p])
            else:
                lo += f @ risk_g[:, p]
        f = reach.astype(float)
        c += f @ cum_g[:, k1]
        b += f @ good_g[:, k1]
        w += f @ bad_g[:, k1]
        lo += f @ risk_g[:, k1]
        nn = max(n, 1)
        cost[a:a + step], better[a:a + step], worse[a:a + step] = c / nn, b, w
        loss[a:a + step] = lo / nn
    return cost, better, worse, loss


def _guard(better: FloatArray, worse: FloatArray, n: int, z: float | FloatArray,
           pseudo: float | FloatArray = _PSEUDO) -> tuple[FloatArray, FloatArray, FloatArray]:
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


def _frontier_of_model(loss: FloatArray, cost: FloatArray, ref_cost: float) -> IntArray:
    """Indices of the settings on the model's frontier: from the lowest expected loss up, each
    one strictly cheaper than every setting the model rated safer."""
    order = np.lexsort((cost, loss))
    cheapest = np.minimum.accumulate(np.concatenate([[ref_cost], cost[order]]))
    return order[cost[order] < cheapest[:-1]]


def _choose(table: OutcomeTable, *, max_drop: float, delta: float, agreement: str = "off",
            z_gate: float | None = None) -> tuple[_Choice, int, IntArray, IntArray]:
    """The cheapest setting on the model's frontier whose guarded net accuracy change stays
    above ``-max_drop``; the reference alone when none does. It uses every case and draws
    nothing at random.

    ``agreement``: ``"off"`` (scores only), ``"all"`` (a rung may also have to agree with the
    previous one: runnable by the engine) or ``"any"`` (scores pass *or* it agrees: for
    measurement). Gated settings form their own frontier, held to ``z_gate`` standard errors.

    Returns the choice, the reference, and the cases used to choose and (none) held apart.
    """
    n = table.n
    mean_cost = table.cost.mean(axis=0)
    ref = reference_rung(table)
    keys = _scoring_keys(table)
    every = np.arange(n, dtype=np.int64)
    none = np.zeros(0, dtype=np.int64)
    alone = Setting((ref,))
    if not keys:
        return (_Choice(setting=alone, passed=False, tested=0,
                        reason="no scoring verifier to tune"), ref, every, none)
    z = z_value(delta)
    norm = table.agreement_normaliser or ""
    gate = agreement != "off" and norm in table.agreement
    any_ = agreement == "any"
    cost_order = [int(j) for j in np.argsort(mean_cost, kind="stable")]
    chains = [c for c in _chains(cost_order, ref, mean_cost) if len(c) > 1]
    families = sum(2 ** max(len(c) - 2, 0) - 1 for c in chains)
    zg = z_value(delta / max(families, 1)) if z_gate is None else z_gate
    ref_cost = float(mean_cost[ref])
    model = _LossModel(table, keys, ref, norm if gate else "")
    blocks = []
    for chain in chains:
        th, ag = _candidates(table, chain, keys, gate=gate and len(chain) > 2, any_=any_)
        risk = model.columns(chain)
        blocks.append((chain, th, ag,
                       _mesh_stats(table, chain, keys, th, ref, ag, norm, any_, risk)))
    if not blocks:
        return (_Choice(setting=alone, passed=False, tested=0,
                        reason="no rung is cheap enough to cascade from"), ref, every, none)
    # every candidate of every chain in one row; ``start`` maps a row back to its chain
    cost, better, worse, loss = (np.concatenate([b[3][k] for b in blocks]) for k in range(4))
    used: BoolArray = np.concatenate([b[2].any(axis=1) for b in blocks])
    start = np.cumsum([0] + [b[1].shape[0] for b in blocks])
    front = np.concatenate([np.nonzero(used == fam)[0][
        _frontier_of_model(loss[used == fam], cost[used == fam], ref_cost)]
        for fam in (False, True)])
    change, se, lower = _guard(better[front], worse[front], n, np.where(used[front], zg, z),
                               np.where(used[front], _PSEUDO_GATE, _PSEUDO))
    ok: BoolArray = lower >= -max_drop - 1e-12
    if not ok.any():
        return (_Choice(setting=alone, passed=False, tested=int(front.size),
                        candidates=int(cost.size),
                        reason=f"no cascade setting kept the guarded accuracy change (estimate "
                               f"- {z:.2f} standard errors) above -{max_drop:g} on "
                               f"{n} cases"), ref, every, none)
    g = int(np.lexsort((-lower, np.where(ok, cost[front], math.inf)))[0])
    i = int(front[g])
    k = int(np.searchsorted(start, i, side="right")) - 1
    chain, th, ag, _stats = blocks[k]
    r = i - int(start[k])
    chosen = _prune(Setting(chain, keys, tuple(tuple(float(t) for t in rw) for rw in th[r]),
                            tuple(bool(x) for x in ag[r]) if used[i] else (),
                            norm if used[i] else "", "any" if any_ and used[i] else "all"))
    return (_Choice(setting=chosen, passed=True, tested=int(front.size),
                    candidates=int(cost.size), reason="passed",
                    change=float(change[g]), stderr=float(se[g]), lower=float(lower[g]),
                    z=float(zg if used[i] else z)), ref, every, none)


def _choose_budget(table: OutcomeTable, *, max_cost: float, select_frac: float,
                   rng: np.random.Generator) -> tuple[_Choice, int, IntArray, IntArray]:
    """The most accurate setting whose mean cost stays under ``max_cost`` (90% upper bound)."""
    n = table.n
    mean_cost = table.cost.mean(axis=0)
    ref = reference_rung(table)
    keys = _scoring_keys(table)
    perm = rng.permutation(n)
    n_sel = round(n * select_frac)
    sel, cal = np.sort(perm[:n_sel]), np.sort(perm[n_sel:])
    ts, tc = table.take(sel), table.take(cal)
    best: tuple[float, float, Setting] | None = None
    order = [int(j) for j in np.argsort(mean_cost, kind="stable")]
    for top in order:
        for chain in _chains(order, top, mean_cost):
            if len(chain) > 1 and not keys:
                continue
            th = (_path(ts, chain, top, keys) if len(chain) > 1
                  else np.zeros((1, 0, len(keys))))
            _, cost_all, _ = _simulate_many(table, chain, keys, th)
            right_c, _, _ = _simulate_many(tc, chain, keys, th)
            ucb = cost_all.mean(1) + Z90 * cost_all.std(1) / math.sqrt(n)
            for g in np.nonzero(ucb <= max_cost)[0]:
                a, c = float(right_c[g].mean()), float(cost_all[g].mean())
                if best is None or (a, -c) > (best[0], -best[1]):
                    s = _prune(Setting(chain, keys if len(chain) > 1 else (),
                                       tuple(tuple(float(t) for t in row) for row in th[g])))
                    best = (a, c, s)
    if best is None:
        cheapest = int(np.argmin(mean_cost))
        return (_Choice(setting=Setting((cheapest,)), passed=False, tested=0,
                        reason=f"nothing costs under ${max_cost:g} per case; the cheapest "
                               "rung is recommended"), ref, sel, cal)
    return _Choice(setting=best[2], passed=True, tested=0, reason="fits the budget"), ref, sel, cal


def _dominating_rung(table: OutcomeTable, right: BoolArray, cost: FloatArray) -> int | None:
    """A single rung at least as accurate and no dearer than the cascade (one strictly)."""
    a, c = float(right.mean()), float(cost.mean())
    acc = table.correct.mean(axis=0)
    mc = table.cost.mean(axis=0)
    best: int | None = None
    for j in range(len(table.rungs)):
        dominates = acc[j] >= a and mc[j] <= c and (acc[j] > a or mc[j] < c)
        if dominates and (best is None or mc[j] < mc[best]):
            best = j
    return best


def group_folds(groups: Sequence[str], folds: int, seed: int) -> IntArray:
    """Each case's fold when whole groups are dealt into ``folds`` at random: held-out folds
    then hold groups the tuning never saw."""
    names = sorted(set(groups))
    order = np.random.default_rng(seed).permutation(names).tolist()
    fold_of = {g: i % folds for i, g in enumerate(order)}
    return np.array([fold_of[g] for g in groups], dtype=np.int64)


def _shift(table: OutcomeTable, *, max_drop: float, delta: float, seed: int,
           folds: int = 5) -> dict[str, Any]:
    """Tune on some groups of cases, evaluate on the others: how the promise holds up when the
    mix of questions changes (subjects, benchmarks, or the first tag of each case)."""
    top = [g.split("/")[0] for g in table.groups]
    groups = top if len(set(top)) >= 3 else list(table.groups)
    names = sorted(set(groups))
    if len(names) < 3:
        return {"available": False,
                "reason": "the cases carry fewer than 3 groups; tag them (first tag = group) "
                          "to measure how tuning holds on an unseen mix"}
    k = min(folds, len(names))
    gi = group_folds(groups, k, seed)
    changes: list[float] = []
    savings: list[float] = []
    held: list[bool] = []
    for f in range(k):
        tr, te = np.nonzero(gi != f)[0], np.nonzero(gi == f)[0]
        if tr.size < 20 or te.size < 5:
            continue
        ttr, tte = table.take(tr), table.take(te)
        choice, ref, _s, _c = _choose(ttr, max_drop=max_drop, delta=delta)
        right, cost, _ = simulate(tte, choice.setting)
        ch = float(right.mean() - tte.correct[:, ref].mean())
        rc = float(tte.cost[:, ref].mean())
        changes.append(ch)
        savings.append(1 - float(cost.mean()) / rc if rc > 0 else 0.0)
        held.append(ch >= -max_drop)
    if not changes:
        return {"available": False, "reason": "groups too small to hold any out"}
    arr = np.array(changes)
    return {
        "available": True,
        "by": "benchmark" if groups is top else "group",
        "folds": len(changes),
        "groups": len(names),
        "accuracy_change_by_fold": [round(x, 4) for x in changes],
        "cost_saving_by_fold": [round(x, 4) for x in savings],
        "accuracy_change_mean": float(arr.mean()),
        "accuracy_change_worst": float(arr.min()),
        "promise_held_fraction": float(np.mean(held)),
    }


def select(table: OutcomeTable, *, max_accuracy_drop: float = 0.01, delta: float = 0.1,
           agreement: str = "off", z_gate: float | None = None) -> tuple[Setting, int]:
    """Only the choice of :func:`tune` (setting, reference rung index), for cross-validation.
    Deterministic: it uses every case and no randomness."""
    choice, ref, _s, _c = _choose(table, max_drop=max_accuracy_drop, delta=delta,
                                  agreement=agreement, z_gate=z_gate)
    setting = choice.setting
    if len(setting.chain) > 1:
        right, cost, _ = simulate(table, setting)
        dom = _dominating_rung(table, right, cost)
        if dom is not None:
            setting = Setting((dom,))
    return setting, ref


def tune(table: OutcomeTable, *, max_accuracy_drop: float | None = 0.01,
         max_cost_usd: float | None = None, delta: float = 0.1, select_frac: float = 0.4,
         seed: int = 0, shift: bool = True, bootstrap: int = 1000,
         agreement: str = "off") -> TuneResult:
    """Tune ``table``; see the module docstring for the method.

    ``max_accuracy_drop`` (default) asks for the cheapest setting whose net accuracy change,
    less ``z(1 - delta)`` standard errors, stays above minus that drop; ``max_cost_usd``
    instead asks for the most accurate setting whose mean cost per case stays under it (on a
    ``select_frac`` selection split, measured on the rest).
    """
    if table.n == 0:
        raise ConfigError("the outcome table is empty")
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    if max_cost_usd is not None:
        choice, ref, _sel, cal = _choose_budget(table, max_cost=max_cost_usd,
                                               select_frac=select_frac, rng=rng)
    else:
        drop = 0.01 if max_accuracy_drop is None else max_accuracy_drop
        choice, ref, _sel, cal = _choose(table, max_drop=drop, delta=delta,
                                         agreement=agreement)
    setting = choice.setting
    notes: list[str] = []
    if not choice.passed:
        notes.append(f"No cascade is recommended: {choice.reason}. Use "
                     f"{table.rungs[setting.chain[0]].label} alone.")
    right, cost, exit_pos = simulate(table, setting)
    dom = _dominating_rung(table, right, cost)
    if dom is not None and len(setting.chain) > 1:
        notes.append(f"The tuned cascade was dearer and no more accurate than "
                     f"{table.rungs[dom].label} alone on the suite; recommending that rung.")
        setting = Setting((dom,))
        right, cost, exit_pos = simulate(table, setting)
    took = time.perf_counter() - t0

    report = _report(table, setting, ref, right, cost, exit_pos, cal, choice, rng, notes,
                     max_accuracy_drop=max_accuracy_drop, max_cost_usd=max_cost_usd,
                     delta=delta, bootstrap=bootstrap)
    report["timing_s"] = round(took, 4)
    if shift and max_cost_usd is None:
        drop = 0.01 if max_accuracy_drop is None else max_accuracy_drop
        sh = _shift(table, max_drop=drop, delta=delta, seed=seed)
        if sh.get("available"):
            iid = report["expected"]["accuracy_change"]["interval_90"]
            worst = sh["accuracy_change_worst"]
            sh["accuracy_change_interval_90_under_shift"] = [min(iid[0], worst), iid[1]]
            if worst < -drop:
                report["notes"].append(
                    f"Under a shift of the question mix ({sh['by']}s held out), the accuracy "
                    f"change reached {worst:+.3f} on one fold: the promise holds for questions "
                    "like the suite's; watch production with a shadow check of the top rung.")
        report["shift"] = sh
    frontier = _frontier(table, ref)
    report["frontier"] = frontier
    return TuneResult(setting=setting, config=to_config(table, setting), report=report,
                      frontier=frontier)


def _report(table: OutcomeTable, setting: Setting, ref: int, right: BoolArray,
            cost: FloatArray, exit_pos: IntArray, cal: IntArray, choice: _Choice,
            rng: np.random.Generator, notes: list[str], *, max_accuracy_drop: float | None,
            max_cost_usd: float | None, delta: float, bootstrap: int) -> dict[str, Any]:
    ref_right = table.correct[:, ref]
    ref_cost = table.cost[:, ref]
    # With a calibration split (the budget objective), accuracy is measured where the path was
    # not learnt; the accuracy objective chooses on every case and says how it guards that.
    ci = _bootstrap_stats(right[cal], cost[cal], ref_right[cal], ref_cost[cal], rng,
                          b=bootstrap) if cal.size else _bootstrap_stats(
        right, cost, ref_right, ref_cost, rng, b=bootstrap)
    cost_ci = _bootstrap_stats(right, cost, ref_right, ref_cost, rng, b=bootstrap)
    on = cal if cal.size else np.arange(table.n)
    change = float((right[on].astype(float) - ref_right[on]).mean()) if on.size else 0.0
    is_cascade = len(setting.chain) > 1
    z = z_value(delta)
    if max_cost_usd is None and is_cascade:
        worse = float(np.sum(ref_right & ~right))
        better = float(np.sum(~ref_right & right))
        if setting.agree:
            z = choice.z or z
        g_change, g_se, g_lower = (float(x[0]) for x in _guard(
            np.array([better]), np.array([worse]), table.n, z,
            _PSEUDO_GATE if setting.agree else _PSEUDO))
    else:
        g_change, g_se, g_lower = change, 0.0, change
    chain_labels = [table.rungs[j].label for j in setting.chain]
    rc = float(ref_cost.mean())
    exits = np.bincount(exit_pos, minlength=len(setting.chain)) / max(table.n, 1)
    acc = table.correct.mean(axis=0)
    mc = table.cost.mean(axis=0)
    oracle_pos = np.where(table.correct.any(axis=1),
                          np.argmax(table.correct[:, np.argsort(mc, kind="stable")], axis=1), -1)
    order = np.argsort(mc, kind="stable")
    ocost = np.where(oracle_pos >= 0,
                     table.cost[np.arange(table.n), order[np.maximum(oracle_pos, 0)]],
                     table.cost[:, order[-1]])
    return {
        "source": table.source,
        "cases": table.n,
        "rungs": list(table.labels),
        "objective": ({"max_cost_usd": max_cost_usd} if max_cost_usd is not None else
                      {"max_accuracy_drop": max_accuracy_drop, "delta": delta}),
        "method": ("most accurate setting under the cost cap: isotonic risk path on a selection "
                   "split, accuracy measured on a calibration split" if max_cost_usd is not None
                   else "cheapest setting on the frontier of an isotonic loss model over a "
                        "fixed label-free grid of per-rung thresholds (optionally gated on "
                        "agreeing with the previous rung) whose net accuracy change minus z "
                        "paired standard errors stays above -max_accuracy_drop"),
        "split": {"selection": int(table.n - cal.size), "calibration": int(cal.size)},
        "reference": {"rung": table.rungs[ref].label, "accuracy": float(acc[ref]),
                      "mean_cost_usd": float(mc[ref])},
        "recommendation": {
            "kind": "cascade" if len(setting.chain) > 1 else "single_rung",
            "rungs": chain_labels,
            "thresholds": {table.rungs[j].label: {k: float(t) for k, t in
                                                  zip(setting.keys, setting.thresholds[p],
                                                      strict=True) if math.isfinite(t)}
                           for p, j in enumerate(setting.chain[:-1])},
            "describe": setting.describe(table),
            "exit_rate": {lab: float(x) for lab, x in zip(chain_labels, exits, strict=True)},
            "tested_settings": choice.tested,
            "candidate_settings": choice.candidates,
            "passed_test": choice.passed,
        },
        "expected": {
            "confidence": 0.9,
            "accuracy": {"estimate": float(right[cal].mean() if cal.size else right.mean()),
                         "interval_90": ci["accuracy"]},
            "mean_cost_usd": {"estimate": float(cost.mean()),
                              "interval_90": cost_ci["mean_cost_usd"]},
            "accuracy_change": {"estimate": change, "interval_90": ci["accuracy_change"]},
            "cost_saving": {"estimate": 1 - float(cost.mean()) / rc if rc > 0 else 0.0,
                            "interval_90": cost_ci["cost_saving"]},
            "certified_max_drop": max(0.0, -g_lower) if is_cascade else 0.0,
            "guard": {
                "z": z, "accuracy_change": g_change, "standard_error": g_se,
                "lower_bound": g_lower,
                "meaning": "an estimate, not a guarantee: the drop on new questions of the "
                           "suite's mix is at most certified_max_drop at about 1 - delta "
                           "confidence by a normal approximation for this one setting; choosing "
                           "it among the frontier makes the in-sample estimate optimistic, which "
                           "the margin is sized to absorb (checked by cross-validation in "
                           "bench/tuning.py)"},
        },
        "single_rungs": [{"rung": r.label, "accuracy": float(acc[j]),
                          "mean_cost_usd": float(mc[j])} for j, r in enumerate(table.rungs)],
        "oracle": {"accuracy": float(table.correct.any(axis=1).mean()),
                   "mean_cost_usd": float(ocost.mean())},
        "notes": notes,
    }


def _frontier(table: OutcomeTable, ref: int, max_chains: int = 64) -> list[dict[str, Any]]:
    """In-sample cost/accuracy frontier of cascades ending at the reference, with every single
    rung and the oracle for scale. In-sample: it shows the room, not a promise."""
    keys = _scoring_keys(table)
    mc = table.cost.mean(axis=0)
    order = [int(j) for j in np.argsort(mc, kind="stable")]
    pts: list[dict[str, Any]] = []
    if keys:
        for chain in _chains(order, ref, mc)[:max_chains]:
            if len(chain) == 1:
                continue
            th = _path(table, chain, ref, keys, max_points=24)
            right, cost, _ = _simulate_many(table, chain, keys, th)
            for g in range(1, th.shape[0]):
                pts.append({"kind": "cascade", "rungs": [table.rungs[j].label for j in chain],
                            "accuracy": float(right[g].mean()),
                            "mean_cost_usd": float(cost[g].mean())})
    out = _pareto(pts)
    for j, r in enumerate(table.rungs):
        out.append({"kind": "single_rung", "rungs": [r.label],
                    "accuracy": float(table.correct[:, j].mean()), "mean_cost_usd": float(mc[j])})
    o_acc = float(table.correct.any(axis=1).mean())
    pos = np.argmax(table.correct[:, order], axis=1)
    cost = np.where(table.correct.any(axis=1),
                    table.cost[np.arange(table.n), np.array(order)[pos]], table.cost[:, order[-1]])
    out.append({"kind": "oracle", "rungs": [], "accuracy": o_acc,
                "mean_cost_usd": float(cost.mean())})
    return sorted(out, key=lambda p: p["mean_cost_usd"])


# ---------------------------------------------------------------- the plain baseline


def grid_search_baseline(table: OutcomeTable, *, max_drop: float = 0.01,
                         grid: Sequence[float] = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
                         ) -> Setting:
    """What everyone does: every rung subset × a grid of per-rung thresholds; keep those whose
    accuracy on the suite is within ``max_drop`` of the best rung, take the cheapest.
    Only the first scoring verifier is tuned. For comparison in benchmarks, not for use."""
    keys = _scoring_keys(table)[:1]
    mc = table.cost.mean(axis=0)
    acc = table.correct.mean(axis=0)
    ref = reference_rung(table)
    best = Setting((ref,))
    best_cost = float(mc[ref])
    if not keys:
        return best
    order = [int(j) for j in np.argsort(mc, kind="stable")]
    g = np.array(grid, dtype=float)
    for chain in _chains(order, ref, mc):
        k1 = len(chain) - 1
        if k1 == 0:
            continue
        mesh = np.stack(np.meshgrid(*([g] * k1), indexing="ij"), axis=-1).reshape(-1, k1, 1)
        right, cost, _ = _simulate_many(table, chain, keys, mesh)
        ok = right.mean(1) >= acc[ref] - max_drop - 1e-12
        if ok.any():
            c = cost.mean(1)
            c[~ok] = np.inf
            i = int(np.argmin(c))
            if c[i] < best_cost:
                best_cost = float(c[i])
                best = Setting(chain, keys, tuple((float(t),) for t in mesh[i, :, 0]))
    return best


# ---------------------------------------------------------------- output


_WITNESS = 2.0
"""Written for a threshold of +inf: no verifier score (all are in [0, 1]) reaches it, so the
rung never accepts and only answers for the next rung's agreement check."""


def to_config(table: OutcomeTable, setting: Setting) -> CascadeConfig:
    """A complete cascade config for ``setting``: the chosen rungs with their thresholds, and an
    ``agreement`` verifier (mode ``previous``) on the rungs that must agree with the one before.
    """
    base = table.base
    verifiers = base.verifiers if base is not None else table.verifiers
    k1 = len(setting.thresholds)
    gated = [setting.gated(p) for p in range(k1)]
    agree_id = ""
    if any(gated):
        taken = {v.key for v in verifiers}
        agree_id = next(x for x in ("agreement", "agreement_previous", "agreement_tuned")
                        if x not in taken)
        verifiers = (*verifiers, VerifierConfig(
            name="agreement", id=agree_id,
            settings={"mode": "previous", "normaliser": setting.normaliser}))
    rungs: list[RungConfig] = []
    for p, j in enumerate(setting.chain):
        r = table.rungs[j]
        th = dict(r.thresholds)
        if p < k1:
            for k, t in zip(setting.keys, setting.thresholds[p], strict=True):
                if math.isfinite(t):
                    th[k] = t
                elif t == math.inf:
                    th[k] = _WITNESS
        own = r.verifiers
        if agree_id:
            ids = tuple(own) if own is not None else tuple(v.key for v in verifiers
                                                            if v.key != agree_id)
            own = (*ids, agree_id) if p < k1 and gated[p] else ids
        rungs.append(replace(r, thresholds=th, fallbacks=(), verifiers=own))
    if base is not None:
        return base.replace(rungs=tuple(rungs), verifiers=verifiers)
    return CascadeConfig(rungs=tuple(rungs), verifiers=verifiers, source="<tuned>")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isinf(v) or math.isnan(v):
            raise ValueError("TOML cannot hold inf/nan here")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, Mapping):
        inner = ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items())
        return "{ " + inner + " }" if inner else "{}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _toml_key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else json.dumps(k)


def _rung_table(r: RungConfig) -> dict[str, Any]:
    d: dict[str, Any] = {"model": r.model, "provider": r.provider}
    if r.name:
        d["name"] = r.name
    for k in ("base_url", "api_key_env", "max_retries"):
        if getattr(r, k) is not None:
            d[k] = getattr(r, k)
    d.update(input_usd_per_mtok=r.input_usd_per_mtok, output_usd_per_mtok=r.output_usd_per_mtok,
             max_tokens=r.max_tokens, temperature=r.temperature, timeout_s=r.timeout_s,
             logprobs=r.logprobs)
    if r.verifiers is not None:
        d["verifiers"] = list(r.verifiers)
    if r.thresholds:
        d["thresholds"] = dict(r.thresholds)
    if r.extra:
        d["extra"] = dict(r.extra)
    return d


def to_toml(config: CascadeConfig, *, header: str = "") -> str:
    """Write a config as TOML that :func:`cascade.config.load_config` reads back the same."""
    lines = [f"# {h}" for h in header.splitlines()]
    if config.max_cost_usd is not None:
        lines.append(f"max_cost_usd = {_toml_value(config.max_cost_usd)}")
    if config.timeout_s is not None:
        lines.append(f"timeout_s = {_toml_value(config.timeout_s)}")
    for r in config.rungs:
        lines += ["", "[[rungs]]"]
        lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in _rung_table(r).items()]
    for v in config.verifiers:
        lines += ["", "[[verifiers]]", f"name = {_toml_value(v.name)}"]
        if v.id:
            lines.append(f"id = {_toml_value(v.id)}")
        if v.threshold is not None:
            lines.append(f"threshold = {_toml_value(v.threshold)}")
        lines.append(f"timeout_s = {_toml_value(v.timeout_s)}")
        lines += [f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.settings.items()]
    for name in ("policy", "cache", "retry", "breaker", "budget"):
        section = getattr(config, name)
        default = type(section)()
        items = {k: getattr(section, k) for k in type(section).__dataclass_fields__
                 if getattr(section, k) != getattr(default, k) and getattr(section, k) is not None}
        if items:
            lines += ["", f"[{name}]"] + [f"{k} = {_toml_value(x)}" for k, x in items.items()]
    return "\n".join(lines).lstrip("\n") + "\n"


def plot_frontier(frontier: Sequence[Mapping[str, Any]], report: Mapping[str, Any],
                  path: str | Path) -> bool:
    """Draw the frontier to a PNG; False (and nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, style in (("cascade", "-o"), ("single_rung", "s"), ("oracle", "*")):
        pts = [p for p in frontier if p["kind"] == kind]
        if pts:
            ax.plot([p["mean_cost_usd"] for p in pts], [p["accuracy"] for p in pts], style,
                    label=kind.replace("_", " "), markersize=5)
        if kind == "single_rung":
            for p in pts:
                ax.annotate(p["rungs"][0], (p["mean_cost_usd"], p["accuracy"]), fontsize=7)
    exp = report.get("expected", {})
    if exp:
        ax.plot([exp["mean_cost_usd"]["estimate"]], [exp["accuracy"]["estimate"]], "rX",
                markersize=10, label="recommended")
    ax.set_xscale("log")
    ax.set_xlabel("mean cost per case (USD)")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def format_report(report: Mapping[str, Any]) -> str:
    """The human summary printed by ``cascade tune``."""
    e = report["expected"]
    rec = report["recommendation"]
    ref = report["reference"]

    def iv(x: Mapping[str, Any], pct: bool = False, usd: bool = False) -> str:
        lo, hi = x["interval_90"]
        if pct:
            return f"{x['estimate'] * 100:+.1f} pts (90%: {lo * 100:+.1f} … {hi * 100:+.1f})"
        if usd:
            return f"${x['estimate']:.3g} (90%: ${lo:.3g} … ${hi:.3g})"
        return f"{x['estimate'] * 100:.1f}% (90%: {lo * 100:.1f} … {hi * 100:.1f})"

    lines = [
        f"cases: {report['cases']}   best single rung: {ref['rung']} "
        f"({ref['accuracy'] * 100:.1f}%, ${ref['mean_cost_usd']:.3g}/case)",
        f"recommended: {rec['describe']}",
        f"  accuracy        {iv(e['accuracy'])}",
        f"  accuracy change {iv(e['accuracy_change'], pct=True)}",
        f"  mean cost       {iv(e['mean_cost_usd'], usd=True)}",
        f"  cost saving     {e['cost_saving']['estimate'] * 100:.1f}% (90%: "
        f"{e['cost_saving']['interval_90'][0] * 100:.1f} … "
        f"{e['cost_saving']['interval_90'][1] * 100:.1f})",
    ]
    if rec.get("candidate_settings"):
        lines.append(f"  chosen among {rec['tested_settings']} settings on the loss model's "
                     f"frontier, of {rec['candidate_settings']} candidates")
    if rec["kind"] == "cascade" and "delta" in report["objective"]:
        g = e["guard"]
        lines.append(f"  guard: estimated change {g['accuracy_change'] * 100:+.2f} pts, "
                     f"standard error {g['standard_error'] * 100:.2f}; drop on new questions "
                     f"of this mix at most {e['certified_max_drop'] * 100:.2f} pts at about "
                     f"{100 * (1 - report['objective']['delta']):.0f}% confidence (an estimate, "
                     "not a guarantee)")
    sh = report.get("shift")
    if sh and sh.get("available"):
        lines.append(f"  under shift ({sh['folds']} held-out {sh['by']} folds): accuracy change "
                     f"mean {sh['accuracy_change_mean'] * 100:+.1f} pts, worst "
                     f"{sh['accuracy_change_worst'] * 100:+.1f} pts")
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``cascade tune SUITE... [--config FILE] [--max-accuracy-drop X | --max-cost-usd X]``."""
    parser.add_argument("suites", nargs="+", metavar="SUITE",
                        help="recorded suite folders/files, or shared outcome JSONL files")
    parser.add_argument("--config", help="the ladder the suites were recorded with (not needed "
                                         "for shared outcome files)")
    goal = parser.add_mutually_exclusive_group()
    goal.add_argument("--max-accuracy-drop", type=float, default=None,
                      help="cheapest setting within this accuracy of the best rung (default "
                           "0.01)")
    goal.add_argument("--max-cost-usd", type=float, default=None,
                      help="most accurate setting under this mean cost per case")
    parser.add_argument("--delta", type=float, default=0.1,
                        help="the guard's one-sided level: the margin is z(1 - delta) standard "
                             "errors of the accuracy change (default 0.1)")
    parser.add_argument("--agreement", choices=("off", "all"), default="off",
                        help="all: a rung may also have to agree with the previous one (the "
                             "agreement gate; riskier on small suites, see the README)")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed of the bootstrap and the shift folds (default 0)")
    parser.add_argument("--out", required=True, help="where to write TUNED.toml")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--plot", help="write the frontier as a PNG (needs matplotlib)")


def run(ns: argparse.Namespace) -> int:
    """Tune, write TUNED.toml, print the report."""
    config = load_config(ns.config) if ns.config else None
    table = load_outcome_table(ns.suites, config)
    result = tune(table, max_accuracy_drop=ns.max_accuracy_drop, max_cost_usd=ns.max_cost_usd,
                  delta=ns.delta, seed=ns.seed, agreement=ns.agreement)
    header = (f"Tuned by `cascade tune` on {table.n} cases ({table.source}).\n"
              f"Recommendation: {result.report['recommendation']['describe']}")
    text = to_toml(result.config, header=header)
    parse_config(__import__("tomllib").loads(text), source=ns.out)  # never write what won't load
    Path(ns.out).write_text(text, encoding="utf-8")
    if ns.plot and not plot_frontier(result.frontier, result.report, ns.plot):
        print("cascade: --plot needs matplotlib (pip install 'verified-cascade[plot]'); "
              "skipped", file=sys.stderr)
    if ns.json:
        print(json.dumps(result.report, indent=2))
    else:
        print(format_report(result.report))
        print(f"wrote {ns.out}")
    return 0

