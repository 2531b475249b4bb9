"""How the promise holds when the question mix shifts: tune on some groups, test on others."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cascade.suite.outcomes import OutcomeTable
from cascade.tuning.choose import choose
from cascade.tuning.guard import paired_bound
from cascade.tuning.setting import IntArray
from cascade.tuning.simulate import simulate

__all__ = ["group_folds", "shift_breaks", "shift_check"]


def group_folds(groups: Sequence[str], folds: int, seed: int) -> IntArray:
    """Each case's fold when whole groups are dealt into ``folds`` at random: held-out folds
    then hold groups the tuning never saw."""
    names = sorted(set(groups))
    order = np.random.default_rng(seed).permutation(names).tolist()
    fold_of = {g: i % folds for i, g in enumerate(order)}
    return np.array([fold_of[g] for g in groups], dtype=np.int64)


def shift_check(table: OutcomeTable, *, max_drop: float, delta: float, seed: int,
           folds: int = 5, agreement: str = "off") -> dict[str, Any]:
    """Tune on some groups of cases, evaluate on the others: how the promise holds up when the
    mix of questions changes (subjects, benchmarks, or the first tag of each case). Each fold
    is tuned as :func:`~cascade.tuning.tune` tunes (``agreement`` included), so the section
    measures the tuner whose recommendation the report shows."""
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
    stderrs: list[float] = []
    savings: list[float] = []
    held: list[bool] = []
    for f in range(k):
        tr, te = np.nonzero(gi != f)[0], np.nonzero(gi == f)[0]
        lab = table.is_labelled
        if int(lab[tr].sum()) < 20 or int(lab[te].sum()) < 5:
            continue
        ttr, tte = table.take(tr), table.take(te)
        choice, ref, _s, _c = choose(ttr, max_drop=max_drop, delta=delta,
                                     agreement=agreement)
        right, cost, _ = simulate(tte, choice.setting)
        on = tte.is_labelled  # grades are known only there
        mine, theirs = right[on].astype(bool), tte.correct[on, ref]
        # the guard's paired change and standard error, without its pseudo-discordant case
        change, se, _low = paired_bound(np.array([float((mine & ~theirs).sum())]),
                                        np.array([float((~mine & theirs).sum())]),
                                        int(on.sum()), 0.0, pseudo=0.0)
        ch = float(change[0])
        stderrs.append(float(se[0]))
        rc = float(tte.cost[:, ref].mean())
        changes.append(ch)
        savings.append(1 - float(cost.mean()) / rc if rc > 0 else 0.0)
        held.append(ch >= -max_drop)
    if not changes:
        return {"available": False, "reason": "groups too small to hold any out"}
    arr = np.array(changes)
    return {
        "available": True,
        # "bench/subject" groups split by their benchmark; plain tags are groups
        "by": "benchmark" if groups is top and any("/" in g for g in table.groups)
              else "group",
        "folds": len(changes),
        "groups": len(names),
        "accuracy_change_by_fold": [round(x, 4) for x in changes],
        "accuracy_change_stderr_by_fold": [round(x, 4) for x in stderrs],
        "folds_broken": sum(c + e < -max_drop for c, e in zip(changes, stderrs, strict=True)),
        "cost_saving_by_fold": [round(x, 4) for x in savings],
        "accuracy_change_mean": float(arr.mean()),
        "accuracy_change_worst": float(arr.min()),
        "promise_held_fraction": float(np.mean(held)),
    }


def shift_breaks(sh: dict[str, Any]) -> bool:
    """Whether a :func:`shift_check` says the promise breaks on groups the tuning did not see:
    on some fold, by more than that fold's own standard error (noise alone is no shift), or it
    could not be measured at all. ``tune(shift_guard=True)`` then keeps the reference alone."""
    return not sh.get("available") or bool(sh["folds_broken"])
