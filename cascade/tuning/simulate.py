"""The engine's policy replayed on an outcome table, vectorised.

For a setting, each case exits at the first rung whose every verifier passes (score >=
threshold), the last rung of the cascade accepting everything. :func:`mesh_stats` does the same
for thousands of settings at once by blocks and matrix products.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cascade.errors import ConfigError
from cascade.suite.outcomes import OutcomeTable
from cascade.tuning.setting import BoolArray, FloatArray, IntArray, Setting

__all__ = ["agree_cols", "gate_flags", "mesh_stats", "outcome_of", "simulate", "simulate_many",
           "versus"]

_CELLS = 4_000_000
"""Settings × cases per vectorised block (bounds memory)."""


def versus(table: OutcomeTable, ref: int) -> tuple[BoolArray, BoolArray]:
    """Per case and rung: is its answer known ``better`` than rung ``ref``'s (right where
    ``ref`` is wrong) or possibly ``worse`` (wrong where ``ref`` is right)?

    On a labelled case, from the grades. On an unlabelled one, exact where it can be: an answer
    equal to ``ref``'s under the case's normaliser (the one that matches its grader) gets the
    same grade, so it is neither; any other answer counts as worse (never as free accuracy, and
    never as a gain). ``ref`` against itself is neither.
    """
    c = table.correct
    lab = table.is_labelled
    rr = c[:, ref]
    better = c & ~rr[:, None] & lab[:, None]
    worse = ~c & rr[:, None] & lab[:, None]
    if not lab.all():
        same = table.same_answer(ref)
        if same is None:
            same = np.zeros(c.shape, dtype=bool)
        same[:, ref] = True
        worse |= ~lab[:, None] & ~same
    return better, worse


def outcome_of(table: OutcomeTable, setting: Setting, ref: int,
               exit_pos: IntArray | None = None) -> tuple[BoolArray, BoolArray]:
    """Per case, whether ``setting``'s answer is known better / possibly worse than ``ref``'s
    (see :func:`versus`)."""
    if exit_pos is None:
        exit_pos = simulate(table, setting)[2]
    b, w = versus(table, ref)
    col = np.asarray(setting.chain, dtype=np.int64)[exit_pos]
    rows = np.arange(table.n)
    return b[rows, col], w[rows, col]


def gate_flags(table: OutcomeTable, chain: Sequence[int]) -> BoolArray:
    """Where the non-scoring verifiers pass, per case and early rung of ``chain``."""
    early = list(chain[:-1])
    g = np.ones((table.n, len(early)), dtype=bool)
    for flags in table.passed.values():
        g &= flags[:, early]
    return g


def agree_cols(table: OutcomeTable, chain: Sequence[int], normaliser: str) -> BoolArray:
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


def simulate_many(table: OutcomeTable, chain: Sequence[int], keys: Sequence[str],
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
        agree = agree_cols(table, ch, normaliser)[None]
        on = ag[:, None, :]
        sc = (sc | (on & agree)) if any_ else (sc & (~on | agree))
    acc = gate_flags(table, ch)[None] & sc
    acc = np.concatenate([acc, np.ones((m, n, 1), dtype=bool)], axis=2)
    exit_pos = np.argmax(acc, axis=2).astype(np.int64)
    right = table.correct[:, ch][np.arange(n)[None, :], exit_pos]
    cost = cum[np.arange(n)[None, :], exit_pos]
    return right, cost, exit_pos



def simulate(table: OutcomeTable, setting: Setting) -> tuple[BoolArray, FloatArray, IntArray]:
    """Per case: was the cascade's answer right, what did it cost, at which chain position it
    stopped."""
    k1 = len(setting.chain) - 1
    th = np.array(setting.thresholds, dtype=float).reshape(1, k1, len(setting.keys))
    ag = (np.array([[setting.gated(p) for p in range(k1)]], dtype=bool)
          if setting.agree else None)
    right, cost, ex = simulate_many(table, setting.chain, setting.keys, th, ag,
                                     setting.normaliser, setting.accept == "any")
    return right[0], cost[0], ex[0]



def mesh_stats(table: OutcomeTable, chain: Sequence[int], keys: Sequence[str], th: FloatArray,
                ref: int, ag: BoolArray | None = None, normaliser: str = "",
                any_: bool = False, risk: tuple[FloatArray, FloatArray] | None = None
                ) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """Mean cost, the counts of cases the cascade gets right where the reference is wrong
    (``better``) and wrong where it is right (``worse``, see :func:`versus` for unlabelled
    cases), and the model's expected net loss
    (the sum of ``risk`` at each case's exit, over n; zeros without ``risk``), for each of
    ``m`` settings. ``risk`` is (plain, gated): per case and chain position, the expected loss
    of accepting there on the rung's own verdicts, and when gated on agreement.

    Same semantics as :func:`simulate`, but by blocks of settings and matrix products, so that
    thousands of settings over 10,000 cases take a second.
    """
    ch = list(chain)
    n, m, k1 = table.n, th.shape[0], len(ch) - 1
    cum = np.cumsum(table.cost[:, ch], axis=1)
    vb, vw = versus(table, ref)
    good, bad = vb[:, ch].astype(float), vw[:, ch].astype(float)
    gates = gate_flags(table, ch)
    use_ag = ag is not None and bool(ag.any())
    agree = agree_cols(table, ch, normaliser) if use_ag else np.ones((n, k1), dtype=bool)
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

