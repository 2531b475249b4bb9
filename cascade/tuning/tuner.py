"""``tune()``: choose, check against single rungs, report, and measure under shift."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from cascade.config import CascadeConfig
from cascade.errors import ConfigError
from cascade.suite.outcomes import OutcomeTable
from cascade.tuning.choose import Choice, choose, choose_budget, dominating_rung
from cascade.tuning.guard import DELTA, MAX_DROP
from cascade.tuning.guard import rivals as rival_rungs
from cascade.tuning.output import to_config
from cascade.tuning.report import build_report, cost_frontier, drift_rates
from cascade.tuning.setting import Setting
from cascade.tuning.shift import shift_breaks, shift_check
from cascade.tuning.simulate import simulate

__all__ = ["TuneResult", "tune"]


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



def tune(table: OutcomeTable, *, max_accuracy_drop: float | None = MAX_DROP,
         max_cost_usd: float | None = None, delta: float = DELTA, seed: int = 0,
         shift: bool = True, bootstrap: int = 1000,
         agreement: str = "off", shift_guard: bool = False) -> TuneResult:
    """Tune ``table``; see the module docstring for the method.

    ``max_accuracy_drop`` (default) asks for the cheapest setting whose net accuracy change,
    less ``z(1 - delta)`` standard errors, stays above minus that drop; ``max_cost_usd``
    instead asks for the most accurate point of the cost frontier whose mean cost per case on
    the suite stays under it (in-sample: the report says so).

    ``shift_guard``: when tuning with some of the suite's groups held out broke the promise on
    the others (the shift check), recommend the reference rung alone instead of the cascade:
    for traffic whose mix may move to groups the suite holds few of. It costs the saving
    wherever the check fails (``bench/tuning_shift.py``).
    """
    if table.n == 0:
        raise ConfigError("the outcome table is empty")
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    drop = MAX_DROP if max_accuracy_drop is None else max_accuracy_drop
    sh: dict[str, Any] | None = None
    if max_cost_usd is not None:
        choice, ref = choose_budget(table, max_cost=max_cost_usd)
    else:
        choice, ref, _sel, _cal = choose(table, max_drop=drop, delta=delta,
                                         agreement=agreement)
        if shift or shift_guard:
            sh = shift_check(table, max_drop=drop, delta=delta, seed=seed,
                             agreement=agreement)
    refused = False
    if shift_guard and sh is not None:
        guarded, ref = _guard_shift(table, choice, ref, sh, drop, delta)
        refused, choice = guarded is not choice, guarded
    setting = choice.setting
    notes: list[str] = []
    if not choice.passed:
        notes.append(f"No cascade is recommended: {choice.reason}. Use "
                     f"{table.rungs[setting.chain[0]].label} alone.")
    right, cost, exit_pos = simulate(table, setting)
    dom = dominating_rung(table, right, cost, np.asarray(setting.chain, dtype=np.int64)[exit_pos])
    if dom is not None and len(setting.chain) > 1:
        notes.append(f"The tuned cascade was dearer and no more accurate than "
                     f"{table.rungs[dom].label} alone on the suite; recommending that rung.")
        setting = Setting((dom,))
        right, cost, exit_pos = simulate(table, setting)
    took = time.perf_counter() - t0

    report = build_report(table, setting, ref, right, cost, exit_pos, choice, rng, notes,
                          max_accuracy_drop=drop, max_cost_usd=max_cost_usd,
                          delta=delta, bootstrap=bootstrap)
    report["timing_s"] = round(took, 4)
    if sh is not None:
        if sh.get("available"):
            iid = report["expected"]["accuracy_change"]["interval_90"]
            worst = sh["accuracy_change_worst"]
            sh["accuracy_change_interval_90_under_shift"] = [min(iid[0], worst), iid[1]]
            if worst < -drop and not shift_guard:
                report["notes"].append(
                    f"Under a shift of the question mix ({sh['by']}s held out), the accuracy "
                    f"change reached {worst:+.3f} on one fold: the promise holds for questions "
                    "like the suite's; watch production with a shadow check of the top rung.")
        report["shift"] = sh
    if shift_guard:
        report["shift_guard"] = {"refused_cascade": refused}
    frontier = cost_frontier(table)
    report["frontier"] = frontier
    drift = {setting.chain[p]: d["max"] for p, d in drift_rates(table, setting, exit_pos).items()}
    return TuneResult(setting=setting, config=to_config(table, setting, drift=drift),
                      report=report, frontier=frontier)


def _guard_shift(table: OutcomeTable, choice: Choice, ref: int, sh: dict[str, Any],
                 drop: float, delta: float) -> tuple[Choice, int]:
    """The fallback when the shift check breaks the promise (or cannot run): the dearest rung
    that could be the best, alone, as when nothing passes the guard (the rung a refused cascade
    ends at may be a cheaper rival, which alone need not pass the guard against the others)."""
    if len(choice.setting.chain) == 1 or not shift_breaks(sh):
        return choice, ref
    if not sh.get("available"):
        why = f"the shift guard needs the shift check, and {sh.get('reason')}"
    else:
        why = (f"the shift guard refused the cascade: tuned with some {sh['by']}s held out, "
               f"the accuracy change on them reached {sh['accuracy_change_worst'] * 100:+.1f} "
               f"pts, more than a standard error beyond the promise (-{drop * 100:g}) on "
               f"{sh['folds_broken']} of {sh['folds']} folds; without --shift-guard the "
               f"cascade {choice.setting.describe(table)} is recommended")
    fallback = rival_rungs(table, delta).ref
    return replace(choice, setting=Setting((fallback,)), passed=False, reason=why), fallback
