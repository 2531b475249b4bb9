"""The choice: the cheapest guarded setting on the loss model's frontier (or under a budget)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cascade.suite.outcomes import OutcomeTable
from cascade.tuning.candidates import candidates, reference_rung, rung_accuracy, rung_chains
from cascade.tuning.guard import (
    DELTA,
    PSEUDO,
    PSEUDO_GATE,
    cases_needed,
    model_frontier,
    paired_bound,
    z_value,
)
from cascade.tuning.guard import rivals as rival_rungs
from cascade.tuning.loss import LossModel, risk_path
from cascade.tuning.setting import BoolArray, FloatArray, IntArray, Setting, prune, scoring_keys
from cascade.tuning.simulate import mesh_stats, outcome_of, simulate, simulate_many

__all__ = [
    "Choice",
    "Frontier",
    "budget_points",
    "choose",
    "choose_budget",
    "dominating_rung",
    "guarded_frontier",
    "select",
]

@dataclass(frozen=True, kw_only=True)
class Choice:
    """What the tuner chose and the evidence the report shows for it."""

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
    against: int = -1
    """The rung whose bound binds (the lowest among the rivals)."""
    rivals: tuple[int, ...] = ()
    """Every rung that could be the best on new questions (the guard holds against each)."""
    looks_best: int = -1
    """The rung most accurate on the suite."""
    cases_needed: int | None = None
    """When nothing passed: about how many cases the most promising setting would need."""



@dataclass(frozen=True, kw_only=True)
class Frontier:
    """The loss model's frontier of one table with what the guard needs of each setting. Each
    setting ends at one of the ``rivals`` (the rungs that could be the best on new questions)
    and is guarded against all of them; ``ref`` is the dearest rival, the fallback."""

    ref: int
    looks_best: int
    rivals: tuple[int, ...]
    n: int
    z: float
    settings: list[Setting]
    cost: FloatArray
    better: FloatArray
    """Per setting: cases known better than the rung it ends at (see
    :func:`~cascade.tuning.simulate.versus`)."""
    worse: FloatArray
    zs: FloatArray
    pseudo: FloatArray
    candidates: int = 0
    reason: str = ""
    """Why there is no frontier (empty ``settings``)."""

    def bounds(self, table: OutcomeTable, floor: float = -math.inf
               ) -> tuple[FloatArray, FloatArray, FloatArray, IntArray]:
        """Per setting: change, standard error and lower bound against the rival whose bound
        is lowest, and that rival. Settings already below ``floor`` against the rung they end
        at are not compared with the other rivals (they fail either way)."""
        change, se, lower = paired_bound(self.better, self.worse, self.n, self.zs, self.pseudo)
        against = np.array([st.chain[-1] for st in self.settings], dtype=np.int64)
        for g, st in enumerate(self.settings):
            others = [c for c in self.rivals if c != st.chain[-1]]
            if not others or lower[g] < floor:
                continue
            ex = simulate(table, st)[2]
            for c in others:
                b, w = outcome_of(table, st, c, ex)
                ch, s_, lo = paired_bound(np.array([float(b.sum())]), np.array([float(w.sum())]),
                                          self.n, float(self.zs[g]), float(self.pseudo[g]))
                if lo[0] < lower[g]:
                    change[g], se[g], lower[g], against[g] = ch[0], s_[0], lo[0], c
        return change, se, lower, against


def _anchor_frontier(table: OutcomeTable, anchor: int, keys: tuple[str, ...], *, z: float,
                     delta: float, agreement: str, z_gate: float | None
                     ) -> tuple[list[Setting], list[FloatArray], int]:
    """The model frontier of the cascades ending at ``anchor``: settings and their (cost,
    better, worse, z, pseudo) against ``anchor``, and how many candidates were ranked."""
    mean_cost = table.cost.mean(axis=0)
    norm = table.agreement_normaliser or ""
    gate = agreement != "off" and norm in table.agreement
    any_ = agreement == "any"
    cost_order = [int(j) for j in np.argsort(mean_cost, kind="stable")]
    chains = [c for c in rung_chains(cost_order, anchor, mean_cost) if len(c) > 1]
    if not chains:
        return [], [np.zeros(0)] * 5, 0
    families = sum(2 ** max(len(c) - 2, 0) - 1 for c in chains)
    zg = z_value(delta / max(families, 1)) if z_gate is None else z_gate
    model = LossModel(table, keys, anchor, norm if gate else "")
    blocks = []
    for chain in chains:
        th, ag = candidates(table, chain, keys, gate=gate and len(chain) > 2, any_=any_)
        risk = model.columns(chain)
        blocks.append((chain, th, ag,
                       mesh_stats(table, chain, keys, th, anchor, ag, norm, any_, risk)))
    # every candidate of every chain in one row; ``start`` maps a row back to its chain
    cost, better, worse, loss = (np.concatenate([b[3][k] for b in blocks]) for k in range(4))
    used: BoolArray = np.concatenate([b[2].any(axis=1) for b in blocks])
    start = np.cumsum([0] + [b[1].shape[0] for b in blocks])

    def setting_of(i: int) -> Setting:
        k = int(np.searchsorted(start, i, side="right")) - 1
        chain, th, ag, _stats = blocks[k]
        r = i - int(start[k])
        return Setting(chain, keys, tuple(tuple(float(t) for t in rw) for rw in th[r]),
                       tuple(bool(x) for x in ag[r]) if used[i] else (),
                       norm if used[i] else "", "any" if any_ and used[i] else "all")

    front = np.concatenate([np.nonzero(used == fam)[0][
        model_frontier(loss[used == fam], cost[used == fam], float(mean_cost[anchor]))]
        for fam in (False, True)])
    return ([setting_of(int(i)) for i in front],
            [cost[front], better[front], worse[front],
             np.where(used[front], zg, z).astype(float),
             np.where(used[front], PSEUDO_GATE, PSEUDO).astype(float)], int(cost.size))


def _cases_needed_all(table: OutcomeTable, f: Frontier, g: int, max_drop: float) -> int | None:
    """How many cases like these setting ``g`` would need to pass against *every* rival (the
    most any one of them needs; None when one never would)."""
    st = f.settings[g]
    ex = simulate(table, st)[2]
    most = 0
    for c in f.rivals:
        if c == st.chain[-1]:
            b, w = float(f.better[g]), float(f.worse[g])
        else:
            bc, wc = outcome_of(table, st, c, ex)
            b, w = float(bc.sum()), float(wc.sum())
        m = cases_needed(b, w, f.n, float(f.zs[g]), max_drop, float(f.pseudo[g]))
        if m is None:
            return None
        most = max(most, m)
    return most


def guarded_frontier(table: OutcomeTable, *, delta: float, agreement: str = "off",
                     z_gate: float | None = None) -> Frontier:
    """The settings :func:`choose` picks from (see it for ``agreement`` and ``z_gate``): the
    model frontiers of the cascades ending at each rival, and each rival but the dearest
    alone (the dearest alone is the fallback)."""
    n = table.n
    mean_cost = table.cost.mean(axis=0)
    z = z_value(delta)
    looks_best, rivals, ref = rival_rungs(table, delta)
    keys = scoring_keys(table)
    settings: list[Setting] = []
    cols: list[list[FloatArray]] = []
    ranked = 0
    for a in rivals:
        if keys:
            st, arrays, m = _anchor_frontier(table, a, keys, z=z, delta=delta,
                                             agreement=agreement, z_gate=z_gate)
            settings += st
            cols.append(arrays)
            ranked += m
        if a != ref:
            settings.append(Setting((a,)))
            cols.append([np.array([float(mean_cost[a])]), np.zeros(1), np.zeros(1),
                         np.array([z]), np.array([PSEUDO])])
            ranked += 1
    arr = [np.concatenate([c[k] for c in cols]) if cols else np.zeros(0) for k in range(5)]
    reason = ("" if settings else "no rung is cheap enough to cascade from" if keys
              else "the suite records no confidence or other score (all null), so there is "
              "no threshold to tune (a router, learned from the prompts, may still pay)"
              if table.scores
              else "no scoring verifier to tune")
    return Frontier(ref=ref, looks_best=looks_best, rivals=tuple(rivals), n=n, z=z,
                    settings=settings, cost=arr[0], better=arr[1], worse=arr[2], zs=arr[3],
                    pseudo=arr[4], candidates=ranked, reason=reason)


def choose(table: OutcomeTable, *, max_drop: float, delta: float, agreement: str = "off",
           z_gate: float | None = None) -> tuple[Choice, int, IntArray, IntArray]:
    """The cheapest setting on the model's frontier whose guarded net accuracy change, against
    every rung that could be the best (:func:`~cascade.tuning.guard.plausible_best`), stays
    above ``-max_drop``; the dearest of those rungs alone when none does. It uses every case
    and draws nothing at random.

    ``agreement``: ``"off"`` (scores only), ``"all"`` (a rung may also have to agree with the
    previous one: runnable by the engine) or ``"any"`` (scores pass *or* it agrees: for
    measurement). Gated settings form their own frontier, held to ``z_gate`` standard errors.

    Returns the choice, the rung it ends at (the reference of the report), and the cases used
    to choose and (none) held apart.
    """
    f = guarded_frontier(table, delta=delta, agreement=agreement, z_gate=z_gate)
    every = np.arange(table.n, dtype=np.int64)
    none = np.zeros(0, dtype=np.int64)
    if not f.settings:
        return (Choice(setting=Setting((f.ref,)), passed=False, tested=0,
                       reason=f.reason or "no setting on the frontier",
                       rivals=f.rivals, looks_best=f.looks_best),
                f.ref, every, none)
    change, se, lower, against = f.bounds(table, floor=-max_drop - 1e-12)
    ok: BoolArray = lower >= -max_drop - 1e-12
    ref_cost = float(table.cost[:, f.ref].mean())
    if not ok.any():
        need = [_cases_needed_all(table, f, g, max_drop)
                for g in range(len(f.settings)) if f.cost[g] < ref_cost]
        needed = min((x for x in need if x is not None), default=None)
        more = (f"; the most promising setting would need about {needed:,} cases like these "
                "(labelled, or unlabelled answers that agree with the reference) to pass"
                if needed is not None else "")
        why = (f"no cascade setting kept the guarded accuracy change (estimate - {f.z:.2f} "
               f"standard errors) above -{max_drop:g} on {f.n} cases{more}"
               if (f.cost < ref_cost).any() else  # free rungs, or priced alike
               f"no setting costs less than {table.rungs[f.ref].label} alone on the suite "
               f"(${ref_cost:.3g}/case): nothing to save")
        return (Choice(setting=Setting((f.ref,)), passed=False, tested=len(f.settings),
                       candidates=f.candidates, cases_needed=needed, reason=why,
                       rivals=f.rivals, looks_best=f.looks_best),
                f.ref, every, none)
    g = int(np.lexsort((-lower, np.where(ok, f.cost, math.inf)))[0])
    chosen = prune(f.settings[g])
    return (Choice(setting=chosen, passed=True, tested=len(f.settings),
                   candidates=f.candidates, reason="passed",
                   change=float(change[g]), stderr=float(se[g]), lower=float(lower[g]),
                   z=float(f.zs[g]), against=int(against[g]),
                   rivals=f.rivals, looks_best=f.looks_best),
            int(chosen.chain[-1]), every, none)


def budget_points(table: OutcomeTable, max_points: int = 24
                  ) -> list[tuple[float, float, Setting]]:
    """(accuracy on the labelled cases, mean cost, setting) of every single rung and of the
    isotonic risk path of every rung subset ending at each rung: the candidates the cost
    frontier is drawn from and the budget objective chooses among (the same list, so the
    choice is a point of the frontier it reports)."""
    keys = scoring_keys(table)
    mc = table.cost.mean(axis=0)
    lab = table.is_labelled
    order = [int(j) for j in np.argsort(mc, kind="stable")]
    acc = rung_accuracy(table)
    pts = [(float(acc[j]), float(mc[j]), Setting((j,))) for j in order]
    if not keys:
        return pts
    for top in order:
        for chain in rung_chains(order, top, mc):
            if len(chain) == 1:
                continue
            th = risk_path(table, chain, top, keys, max_points=max_points)
            right, cost, _ = simulate_many(table, chain, keys, th)
            for g in range(1, th.shape[0]):
                st = prune(Setting(chain, keys, tuple(tuple(float(t) for t in row)
                                                      for row in th[g])))
                pts.append((float(right[g][lab].mean()), float(cost[g].mean()), st))
    return pts


def choose_budget(table: OutcomeTable, *, max_cost: float) -> tuple[Choice, int]:
    """The most accurate point of the cost frontier whose mean cost on the suite is at most
    ``max_cost`` (the cheaper on a tie): the same candidates, costs and accuracies the report's
    frontier lists, so it never passes over a listed setting under the cap."""
    ref = reference_rung(table)
    under = [(a, c, s) for a, c, s in budget_points(table) if c <= max_cost * (1 + 1e-12)]
    if not under:
        cheapest = int(np.argmin(table.cost.mean(axis=0)))
        return (Choice(setting=Setting((cheapest,)), passed=False, tested=0,
                       reason=f"nothing costs under ${max_cost:g} per case; the cheapest "
                              "rung is recommended"), ref)
    _a, _c, best = max(under, key=lambda x: (x[0], -x[1]))
    return (Choice(setting=best, passed=True, tested=len(under),
                   reason="the most accurate setting under the cap"), ref)


def dominating_rung(table: OutcomeTable, right: BoolArray, cost: FloatArray,
                    answered: IntArray | None = None) -> int | None:
    """A single rung at least as accurate and no dearer than the cascade (one strictly).

    "At least as accurate" is paired and exact: on the labelled cases, from the grades; on an
    unlabelled case, the rung ties with the cascade only where its answer equals the one the
    cascade gave (``answered``: per case, the rung whose answer that was) under the case's
    normaliser, and counts as a loss elsewhere (:func:`~cascade.tuning.simulate.versus`'s
    rule). Without that rule a rung that matched the cascade on the few labelled cases but
    differed from it on every unlabelled one replaced a guarded cascade unguarded."""
    lab = table.is_labelled
    unl = ~lab
    r = np.asarray(right, dtype=bool)
    c = float(cost.mean())
    # per case and rung: its grade is not known to equal the cascade's answer's
    unknown = np.zeros(table.correct.shape, dtype=bool)
    if unl.any():
        unknown[unl] = True
        if answered is not None:
            for e in np.unique(answered[unl]):
                rows = unl & (answered == e)
                unknown[rows, int(e)] = False
                same = table.same_answer(int(e))
                if same is not None:
                    unknown[rows] &= ~same[rows]
    cl = table.correct
    mc = table.cost.mean(axis=0)
    best: int | None = None
    for j in range(len(table.rungs)):
        net = (int(np.sum(lab & cl[:, j] & ~r)) - int(np.sum(lab & ~cl[:, j] & r))
               - int(unknown[:, j].sum()))
        dominates = net >= 0 and mc[j] <= c and (net > 0 or mc[j] < c)
        if dominates and (best is None or mc[j] < mc[best]):
            best = j
    return best



def select(table: OutcomeTable, *, max_accuracy_drop: float = 0.01, delta: float = DELTA,
           agreement: str = "off", z_gate: float | None = None) -> tuple[Setting, int]:
    """Only the choice of :func:`tune` (setting, reference rung index), for cross-validation.
    Deterministic: it uses every case and no randomness."""
    choice, ref, _s, _c = choose(table, max_drop=max_accuracy_drop, delta=delta,
                                  agreement=agreement, z_gate=z_gate)
    setting = choice.setting
    if len(setting.chain) > 1:
        right, cost, ex = simulate(table, setting)
        dom = dominating_rung(table, right, cost, np.asarray(setting.chain, dtype=np.int64)[ex])
        if dom is not None:
            setting = Setting((dom,))
    return setting, ref

