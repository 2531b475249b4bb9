"""``tune()``: choose, check against single rungs, report, and measure under shift."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cascade.config import CascadeConfig
from cascade.errors import ConfigError
from cascade.suite.outcomes import OutcomeTable
from cascade.tuning.choose import choose, choose_budget, dominating_rung
from cascade.tuning.guard import DELTA
from cascade.tuning.output import to_config
from cascade.tuning.report import build_report, cost_frontier, drift_rates
from cascade.tuning.setting import Setting
from cascade.tuning.shift import shift_check
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



def tune(table: OutcomeTable, *, max_accuracy_drop: float | None = 0.01,
         max_cost_usd: float | None = None, delta: float = DELTA, seed: int = 0,
         shift: bool = True, bootstrap: int = 1000,
         agreement: str = "off") -> TuneResult:
    """Tune ``table``; see the module docstring for the method.

    ``max_accuracy_drop`` (default) asks for the cheapest setting whose net accuracy change,
    less ``z(1 - delta)`` standard errors, stays above minus that drop; ``max_cost_usd``
    instead asks for the most accurate point of the cost frontier whose mean cost per case on
    the suite stays under it (in-sample: the report says so).
    """
    if table.n == 0:
        raise ConfigError("the outcome table is empty")
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    if max_cost_usd is not None:
        choice, ref = choose_budget(table, max_cost=max_cost_usd)
    else:
        drop = 0.01 if max_accuracy_drop is None else max_accuracy_drop
        choice, ref, _sel, _cal = choose(table, max_drop=drop, delta=delta,
                                         agreement=agreement)
    setting = choice.setting
    notes: list[str] = []
    if not choice.passed:
        notes.append(f"No cascade is recommended: {choice.reason}. Use "
                     f"{table.rungs[setting.chain[0]].label} alone.")
    right, cost, exit_pos = simulate(table, setting)
    dom = dominating_rung(table, right, cost)
    if dom is not None and len(setting.chain) > 1:
        notes.append(f"The tuned cascade was dearer and no more accurate than "
                     f"{table.rungs[dom].label} alone on the suite; recommending that rung.")
        setting = Setting((dom,))
        right, cost, exit_pos = simulate(table, setting)
    took = time.perf_counter() - t0

    report = build_report(table, setting, ref, right, cost, exit_pos, choice, rng, notes,
                          max_accuracy_drop=max_accuracy_drop, max_cost_usd=max_cost_usd,
                          delta=delta, bootstrap=bootstrap)
    report["timing_s"] = round(took, 4)
    if shift and max_cost_usd is None:
        drop = 0.01 if max_accuracy_drop is None else max_accuracy_drop
        sh = shift_check(table, max_drop=drop, delta=delta, seed=seed)
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
    frontier = cost_frontier(table)
    report["frontier"] = frontier
    drift = {setting.chain[p]: d["max"] for p, d in drift_rates(table, setting, exit_pos).items()}
    return TuneResult(setting=setting, config=to_config(table, setting, drift=drift),
                      report=report, frontier=frontier)

