"""The choice: the cheapest guarded setting on the loss model's frontier (or under a budget)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cascade.suite.outcomes import OutcomeTable
from cascade.tuning.candidates import candidates, reference_rung, rung_chains
from cascade.tuning.guard import PSEUDO, PSEUDO_GATE, model_frontier, paired_bound, z_value
from cascade.tuning.loss import LossModel, risk_path
from cascade.tuning.setting import BoolArray, FloatArray, IntArray, Setting, prune, scoring_keys
from cascade.tuning.simulate import mesh_stats, simulate, simulate_many

__all__ = ["Choice", "choose", "choose_budget", "dominating_rung", "select"]

Z90 = 1.6448536269514722


@dataclass(frozen=True, kw_only=True)
class Choice:
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



def choose(table: OutcomeTable, *, max_drop: float, delta: float, agreement: str = "off",
            z_gate: float | None = None) -> tuple[Choice, int, IntArray, IntArray]:
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
    keys = scoring_keys(table)
    every = np.arange(n, dtype=np.int64)
    none = np.zeros(0, dtype=np.int64)
    alone = Setting((ref,))
    if not keys:
        return (Choice(setting=alone, passed=False, tested=0,
                        reason="no scoring verifier to tune"), ref, every, none)
    z = z_value(delta)
    norm = table.agreement_normaliser or ""
    gate = agreement != "off" and norm in table.agreement
    any_ = agreement == "any"
    cost_order = [int(j) for j in np.argsort(mean_cost, kind="stable")]
    chains = [c for c in rung_chains(cost_order, ref, mean_cost) if len(c) > 1]
    families = sum(2 ** max(len(c) - 2, 0) - 1 for c in chains)
    zg = z_value(delta / max(families, 1)) if z_gate is None else z_gate
    ref_cost = float(mean_cost[ref])
    model = LossModel(table, keys, ref, norm if gate else "")
    blocks = []
    for chain in chains:
        th, ag = candidates(table, chain, keys, gate=gate and len(chain) > 2, any_=any_)
        risk = model.columns(chain)
        blocks.append((chain, th, ag,
                       mesh_stats(table, chain, keys, th, ref, ag, norm, any_, risk)))
    if not blocks:
        return (Choice(setting=alone, passed=False, tested=0,
                        reason="no rung is cheap enough to cascade from"), ref, every, none)
    # every candidate of every chain in one row; ``start`` maps a row back to its chain
    cost, better, worse, loss = (np.concatenate([b[3][k] for b in blocks]) for k in range(4))
    used: BoolArray = np.concatenate([b[2].any(axis=1) for b in blocks])
    start = np.cumsum([0] + [b[1].shape[0] for b in blocks])
    front = np.concatenate([np.nonzero(used == fam)[0][
        model_frontier(loss[used == fam], cost[used == fam], ref_cost)]
        for fam in (False, True)])
    change, se, lower = paired_bound(better[front], worse[front], n, np.where(used[front], zg, z),
                               np.where(used[front], PSEUDO_GATE, PSEUDO))
    ok: BoolArray = lower >= -max_drop - 1e-12
    if not ok.any():
        return (Choice(setting=alone, passed=False, tested=int(front.size),
                        candidates=int(cost.size),
                        reason=f"no cascade setting kept the guarded accuracy change (estimate "
                               f"- {z:.2f} standard errors) above -{max_drop:g} on "
                               f"{n} cases"), ref, every, none)
    g = int(np.lexsort((-lower, np.where(ok, cost[front], math.inf)))[0])
    i = int(front[g])
    k = int(np.searchsorted(start, i, side="right")) - 1
    chain, th, ag, _stats = blocks[k]
    r = i - int(start[k])
    chosen = prune(Setting(chain, keys, tuple(tuple(float(t) for t in rw) for rw in th[r]),
                            tuple(bool(x) for x in ag[r]) if used[i] else (),
                            norm if used[i] else "", "any" if any_ and used[i] else "all"))
    return (Choice(setting=chosen, passed=True, tested=int(front.size),
                    candidates=int(cost.size), reason="passed",
                    change=float(change[g]), stderr=float(se[g]), lower=float(lower[g]),
                    z=float(zg if used[i] else z)), ref, every, none)


def choose_budget(table: OutcomeTable, *, max_cost: float, select_frac: float,
                   rng: np.random.Generator) -> tuple[Choice, int, IntArray, IntArray]:
    """The most accurate setting whose mean cost stays under ``max_cost`` (90% upper bound)."""
    n = table.n
    mean_cost = table.cost.mean(axis=0)
    ref = reference_rung(table)
    keys = scoring_keys(table)
    perm = rng.permutation(n)
    n_sel = round(n * select_frac)
    sel, cal = np.sort(perm[:n_sel]), np.sort(perm[n_sel:])
    ts, tc = table.take(sel), table.take(cal)
    best: tuple[float, float, Setting] | None = None
    order = [int(j) for j in np.argsort(mean_cost, kind="stable")]
    for top in order:
        for chain in rung_chains(order, top, mean_cost):
            if len(chain) > 1 and not keys:
                continue
            th = (risk_path(ts, chain, top, keys) if len(chain) > 1
                  else np.zeros((1, 0, len(keys))))
            _, cost_all, _ = simulate_many(table, chain, keys, th)
            right_c, _, _ = simulate_many(tc, chain, keys, th)
            ucb = cost_all.mean(1) + Z90 * cost_all.std(1) / math.sqrt(n)
            for g in np.nonzero(ucb <= max_cost)[0]:
                a, c = float(right_c[g].mean()), float(cost_all[g].mean())
                if best is None or (a, -c) > (best[0], -best[1]):
                    s = prune(Setting(chain, keys if len(chain) > 1 else (),
                                       tuple(tuple(float(t) for t in row) for row in th[g])))
                    best = (a, c, s)
    if best is None:
        cheapest = int(np.argmin(mean_cost))
        return (Choice(setting=Setting((cheapest,)), passed=False, tested=0,
                        reason=f"nothing costs under ${max_cost:g} per case; the cheapest "
                               "rung is recommended"), ref, sel, cal)
    return Choice(setting=best[2], passed=True, tested=0, reason="fits the budget"), ref, sel, cal


def dominating_rung(table: OutcomeTable, right: BoolArray, cost: FloatArray) -> int | None:
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



def select(table: OutcomeTable, *, max_accuracy_drop: float = 0.01, delta: float = 0.1,
           agreement: str = "off", z_gate: float | None = None) -> tuple[Setting, int]:
    """Only the choice of :func:`tune` (setting, reference rung index), for cross-validation.
    Deterministic: it uses every case and no randomness."""
    choice, ref, _s, _c = choose(table, max_drop=max_accuracy_drop, delta=delta,
                                  agreement=agreement, z_gate=z_gate)
    setting = choice.setting
    if len(setting.chain) > 1:
        right, cost, _ = simulate(table, setting)
        dom = dominating_rung(table, right, cost)
        if dom is not None:
            setting = Setting((dom,))
    return setting, ref

