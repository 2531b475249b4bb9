"""Replay suites through a config and report what it would have done (``cascade eval``).

The climb is simulated from the recordings: at each rung of the config, the answer is accepted
when every verifier of that rung passes (score >= the configured threshold, or the verifier's
own recorded verdict where no threshold is set); the last rung's answer is returned either way
(unverified when rejected). This is the engine's policy applied to recorded verdicts, so it is
exact for everything but cost when a short-circuit would have skipped an expensive verifier
(here every recorded verifier call is charged: the reported cost is an upper bound).

The ``agreement`` verifier in mode ``previous`` is replayed from the climb, not from a
recording: its verdict depends on which rung answered before it in *this* config (the
previous rung of the config, not of the recorded ladder), so it is recomputed from the
suite's answer texts; at the first rung it abstains (passes) as the engine's does.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cascade.config import CascadeConfig, VerifierConfig
from cascade.errors import ConfigError
from cascade.suite import OutcomeTable

__all__ = ["evaluate", "format_report"]


def _columns(table: OutcomeTable, config: CascadeConfig) -> list[int]:
    by_label = {r.label: j for j, r in enumerate(table.rungs)}
    by_model = {r.model: j for j, r in enumerate(table.rungs)}
    cols = []
    for i, rung in enumerate(config.rungs):
        j = by_label.get(rung.label, by_model.get(rung.model))
        if j is None:
            raise ConfigError(f"rung {rung.label!r} was not recorded in the suite; recorded: "
                              f"{', '.join(by_label)}", source=config.source,
                              key=f"rungs[{i}]")
        cols.append(j)
    return cols


def _is_previous_agreement(vc: VerifierConfig) -> bool:
    return vc.name == "agreement" and vc.settings.get("mode", "previous") == "previous"


def _agreement(table: OutcomeTable, config: CascadeConfig, vc: VerifierConfig,
               cols: list[int], p: int, th: float | None) -> npt.NDArray[np.bool_]:
    """The agreement verifier's verdict at config position ``p``, as the engine reaches it."""
    if p == 0:  # nothing answered before: abstain (pass) or fail, as configured
        return np.full(table.n, vc.settings.get("no_previous", "abstain") != "fail")
    norm = str(vc.settings.get("normaliser", "normalised"))
    tol = float(vc.settings.get("tolerance", 1e-6))
    agree = table.agrees(cols[p], cols[p - 1], norm)
    if agree is None or (norm == "numeric" and tol != 1e-6):
        raise ConfigError(f"verifier {vc.key!r}: the suite holds no {norm!r} agreement of its "
                          "answers (built-in normalisers, default tolerance only)",
                          source=config.source, key="verifiers")
    if th is None:
        return agree
    return np.where(agree, 1.0, 0.0) >= th


def _accepts(table: OutcomeTable, config: CascadeConfig, cols: list[int]
             ) -> npt.NDArray[np.bool_]:
    acc = np.ones((table.n, len(cols)), dtype=bool)
    for p, (rung, j) in enumerate(zip(config.rungs, cols, strict=True)):
        for vc in config.verifiers_for(rung):
            key = vc.key
            th = config.threshold(rung, vc)
            if _is_previous_agreement(vc):
                acc[:, p] &= _agreement(table, config, vc, cols, p, th)
            elif key in table.scores:
                s = table.scores[key][:, j]
                if th is not None:
                    with np.errstate(invalid="ignore"):
                        acc[:, p] &= s >= th
                elif key in table.own_passed:
                    acc[:, p] &= table.own_passed[key][:, j]
                elif p == len(cols) - 1:
                    continue  # the last rung answers anyway; only "verified" is unknown
                else:
                    raise ConfigError(f"verifier {key!r} has no threshold for rung "
                                      f"{rung.label!r} and the suite holds only its scores; "
                                      "set one", source=config.source, key="thresholds")
            elif key in table.passed:
                acc[:, p] &= table.passed[key][:, j]
            elif p < len(cols) - 1:
                # Taken as passing everything, it would replay a ladder that exits early where
                # the real one may escalate.
                raise ConfigError(f"verifier {key!r} of rung {rung.label!r} was not recorded "
                                  "with the suite: record it (cascade record --config with "
                                  "this verifier) or drop it from the config",
                                  source=config.source, key="verifiers")
    return acc


def evaluate(table: OutcomeTable, config: CascadeConfig) -> dict[str, Any]:
    """Accuracy, mean cost, savings against every single rung, escalation per rung, and each
    rung's verifier precision/recall, for ``config`` replayed on ``table``.

    Unlabelled cases have no grade: accuracy, precision and recall leave them out (``cases``
    counts the graded ones, ``unlabelled_skipped`` the others). Where each case exits and what
    it costs need no grade, so cost, savings, escalation and the verified rate are over every
    case (``cases_replayed``), as ``cascade tune`` reports them: TUNED.toml replays its cost.
    """
    lab = table.is_labelled
    skipped = table.n - table.n_labelled
    cols = _columns(table, config)
    acc = _accepts(table, config, cols)
    k, n = len(cols), table.n
    right_k = table.correct[:, cols]
    rows = np.arange(n)
    skipped_by_router = np.zeros((n, k), dtype=bool)
    if config.router:
        # The router's decisions replayed exactly as the climb takes them: a rung it rules
        # out is neither paid for nor accepted.
        from cascade.routing import load_router, replay_routes, route_cases

        src = config.source
        router = load_router(config.router, labels=[r.label for r in config.rungs], source=src,
                             base_dir=Path(src).parent if not src.startswith("<") else None)
        routes = route_cases(router, table)
        exit_pos, cost = replay_routes(acc, table.cost[:, cols], routes)
        skipped_by_router = routes.skip.copy()
        skipped_by_router[:, -1] = False
    else:
        forced = np.concatenate([acc[:, :-1], np.ones((n, 1), dtype=bool)], axis=1)
        exit_pos = np.argmax(forced, axis=1)
        cost = np.cumsum(table.cost[:, cols], axis=1)[rows, exit_pos]
    right = right_k[rows, exit_pos][lab]
    graded = int(lab.sum())
    # The top rung's answers recorded without a verdict (shadow answers from the audit log):
    # whether they verify is unknown, so they count neither way in the verified figures.
    top_unknown = (table.unjudged[:, cols[-1]] if table.unjudged is not None
                   else np.zeros(n, dtype=bool))
    judged = ~(top_unknown & (exit_pos == k - 1))
    verified = acc[rows, exit_pos][judged]
    mean_cost = float(cost.mean()) if n else 0.0
    per_rung = []
    for p, rung in enumerate(config.rungs):
        reached = (exit_pos >= p) & ~skipped_by_router[:, p]
        n_reached = int(reached.sum())
        if p == k - 1:
            reached &= ~top_unknown  # acceptance unknown there: left out of the rates
        a = acc[reached, p]
        a_lab = acc[reached & lab, p]
        r = right_k[reached & lab, p]
        per_rung.append({
            "rung": rung.label,
            "reached": n_reached,
            "accepted": int(a.sum()),
            "escalation_rate": (float(1 - a.mean()) if p < k - 1 and n_reached else 0.0),
            "unverified_rate": ((float(1 - a.mean()) if a.size else None) if p == k - 1
                                else 0.0),
            "precision": float(r[a_lab].mean()) if a_lab.any() else None,
            "recall": float(a_lab[r].mean()) if r.any() else None,
            "rejected_right_rate": float((~a_lab[r]).mean()) if r.any() else None,
            "accuracy_here": float(r.mean()) if r.size else None,
        })
    accuracy = float(right.mean()) if graded else math.nan
    singles = []
    for j, rj in enumerate(table.rungs):
        mc = float(table.cost[:, j].mean()) if n else 0.0
        aj = float(table.correct[lab, j].mean()) if graded else math.nan
        singles.append({"rung": rj.label, "accuracy": aj, "mean_cost_usd": mc,
                        "cost_saving": (1 - mean_cost / mc) if mc > 0 else None,
                        "accuracy_change": accuracy - aj})
    return {
        "source": table.source,
        "config": config.source,
        "cases": graded,
        "cases_replayed": n,
        "unlabelled_skipped": skipped,
        "accuracy": accuracy,
        "mean_cost_usd": mean_cost,
        "verified_rate": float(verified.mean()) if verified.size else math.nan,
        "verified_unknown": int((~judged).sum()),
        "rungs": per_rung,
        "vs_single_rungs": singles,
        "oracle_accuracy": (float(table.correct[lab].any(axis=1).mean()) if graded
                            else math.nan),
    }


def _pct1(x: float) -> str:
    """A rate as ``12.3%``, or ``-`` when there is none (no graded case: NaN)."""
    return "-" if x is None or math.isnan(x) else f"{x * 100:.1f}%"


def format_report(rep: dict[str, Any]) -> str:
    """A short table for people."""
    lines = [f"cases {rep['cases']} graded of {rep['cases_replayed']}  accuracy "
             f"{_pct1(rep['accuracy'])}  mean cost ${rep['mean_cost_usd']:.3g}  verified "
             f"{_pct1(rep['verified_rate'])}", "",
             f"{'rung':<28} {'reached':>7} {'accept':>6} {'escal.':>6} {'prec.':>6} "
             f"{'recall':>6}"]
    for r in rep["rungs"]:
        def pct(x: float | None) -> str:
            return "-" if x is None else f"{x * 100:.0f}%"
        lines.append(f"{r['rung']:<28} {r['reached']:>7} {r['accepted']:>6} "
                     f"{pct(r['escalation_rate']):>6} {pct(r['precision']):>6} "
                     f"{pct(r['recall']):>6}")
    lines += ["", f"{'vs single rung':<28} {'accuracy':>8} {'Δacc':>7} {'saving':>7}"]
    for s in rep["vs_single_rungs"]:
        save = "-" if s["cost_saving"] is None else f"{s['cost_saving'] * 100:.0f}%"
        change = s["accuracy_change"]
        lines.append(f"{s['rung']:<28} {_pct1(s['accuracy']):>8} "
                     f"{'-' if math.isnan(change) else f'{change * 100:+.1f}':>7} {save:>7}")
    return "\n".join(lines)
