"""The report behind a recommendation: intervals, the guard, single rungs, the frontier."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from cascade.suite.outcomes import OutcomeTable
from cascade.tuning.candidates import rung_accuracy
from cascade.tuning.choose import Choice, budget_points
from cascade.tuning.guard import PSEUDO, PSEUDO_GATE, paired_bound, z_value
from cascade.tuning.setting import BoolArray, FloatArray, IntArray, Setting
from cascade.tuning.simulate import outcome_of

__all__ = ["budget_points", "build_report", "cost_frontier", "drift_rates", "format_report"]


def _interval(samples: FloatArray) -> list[float]:
    lo, hi = np.quantile(samples, [0.05, 0.95])
    return [float(lo), float(hi)]


def _resampled_means(rng: np.random.Generator, b: int, *arrays: FloatArray | BoolArray
                     ) -> list[FloatArray]:
    """The means of ``b`` bootstrap resamples of the cases, one array of them per input (the
    same resampled cases for every input), drawn in chunks to bound the index matrix."""
    n = arrays[0].size
    chunk = max(1, min(b, 4_000_000 // max(n, 1)))
    out: list[list[FloatArray]] = [[] for _ in arrays]
    for start in range(0, b, chunk):
        idx = rng.integers(0, n, size=(min(chunk, b - start), n))
        for means, x in zip(out, arrays, strict=True):
            means.append(x[idx].mean(1))
    return [np.concatenate(means) for means in out]


def _bootstrap_stats(right: BoolArray, cost: FloatArray, ref_right: BoolArray,
                     ref_cost: FloatArray, rng: np.random.Generator, b: int = 1000
                     ) -> dict[str, list[float]]:
    a, c, ra, rc = _resampled_means(rng, b, right, cost, ref_right, ref_cost)
    return {
        "accuracy": _interval(a),
        "mean_cost_usd": _interval(c),
        "accuracy_change": _interval(a - ra),
        "cost_saving": _interval(np.nan_to_num(1 - c / np.where(rc > 0, rc, np.nan))),
    }


def _mean_interval(x: FloatArray, rng: np.random.Generator, b: int = 1000) -> list[float]:
    """The bootstrap 90% interval of ``x``'s mean."""
    return _interval(_resampled_means(rng, b, x)[0]) if x.size else [0.0, 0.0]


def _pareto(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    pts = sorted(points, key=lambda p: (p["mean_cost_usd"], -p["accuracy"]))
    out: list[dict[str, Any]] = []
    best = -1.0
    for p in pts:
        if p["accuracy"] > best + 1e-12:
            out.append(p)
            best = p["accuracy"]
    return out



def drift_rates(table: OutcomeTable, setting: Setting, exit_pos: IntArray,
                confidence: float = 0.9) -> dict[int, dict[str, float]]:
    """Per accepting rung of ``setting`` (chain position): how often, among the cases it
    accepted on the suite, its answer disagreed with the top rung's under the suite's
    normaliser: the rate the shadow check compares production with. ``max`` is its one-sided
    Wilson upper bound at ``confidence`` (what TUNED.toml's ``drift_max_disagreement`` holds):
    a rate seen on few accepted cases is not taken for exact."""
    norm = table.agreement_normaliser or ""
    if norm not in table.agreement or len(setting.chain) < 2:
        return {}
    top = setting.chain[-1]
    z = z_value(1.0 - confidence)
    out: dict[int, dict[str, float]] = {}
    for p, j in enumerate(setting.chain[:-1]):
        here = exit_pos == p
        m = int(here.sum())
        if m == 0:
            continue
        rate = float(1.0 - table.agreement[norm][here, j, top].mean())
        den = 1 + z * z / m
        centre = (rate + z * z / (2 * m)) / den
        half = z * math.sqrt(rate * (1 - rate) / m + z * z / (4 * m * m)) / den
        out[p] = {"rate": rate, "max": min(1.0, centre + half), "accepted": float(m)}
    return out


def build_report(table: OutcomeTable, setting: Setting, ref: int, right: BoolArray,
                 cost: FloatArray, exit_pos: IntArray, choice: Choice,
                 rng: np.random.Generator, notes: list[str], *, max_accuracy_drop: float | None,
                 max_cost_usd: float | None, delta: float, bootstrap: int) -> dict[str, Any]:
    """The report ``cascade tune --json`` prints (see the README for its fields)."""
    lab = np.nonzero(table.is_labelled)[0]
    ref_right = table.correct[:, ref]
    ref_cost = table.cost[:, ref]
    # accuracy on the labelled cases; cost on all
    ci = _bootstrap_stats(right[lab], cost[lab], ref_right[lab], ref_cost[lab], rng,
                          b=bootstrap)
    cost_ci = _bootstrap_stats(right, cost, ref_right, ref_cost, rng, b=bootstrap)
    better, worse = outcome_of(table, setting, ref, exit_pos)
    net = better.astype(float) - worse  # per case, over every case (as the guard's)
    change = float(net.mean())
    is_cascade = len(setting.chain) > 1
    z = z_value(delta)
    if max_cost_usd is None and is_cascade and choice.passed:
        g_change, g_se, g_lower, z = choice.change, choice.stderr, choice.lower, choice.z or z
    elif max_cost_usd is None and is_cascade:
        g_change, g_se, g_lower = (float(x[0]) for x in paired_bound(
            np.array([float(better.sum())]), np.array([float(worse.sum())]), table.n, z,
            PSEUDO_GATE if setting.agree else PSEUDO))
    else:
        g_change, g_se, g_lower = change, 0.0, change
    chain_labels = [table.rungs[j].label for j in setting.chain]
    rc = float(ref_cost.mean())
    exits = np.bincount(exit_pos, minlength=len(setting.chain)) / max(table.n, 1)
    acc = rung_accuracy(table)
    mc = table.cost.mean(axis=0)
    order = np.argsort(mc, kind="stable")
    cl = table.correct[lab]
    oracle_pos = np.where(cl.any(axis=1), np.argmax(cl[:, order], axis=1), -1)
    ocost = np.where(oracle_pos >= 0,
                     table.cost[lab, order[np.maximum(oracle_pos, 0)]], table.cost[lab, order[-1]])
    drift = drift_rates(table, setting, exit_pos)
    rivals = [table.rungs[j].label for j in choice.rivals]
    return {
        "source": table.source,
        "cases": table.n,
        "labelled_cases": int(lab.size),
        "rungs": list(table.labels),
        "objective": ({"max_cost_usd": max_cost_usd} if max_cost_usd is not None else
                      {"max_accuracy_drop": max_accuracy_drop, "delta": delta}),
        "method": ("most accurate setting on the cost frontier (an isotonic risk path per rung "
                   "subset) whose mean cost on the suite is under the cap; in-sample"
                   if max_cost_usd is not None
                   else "cheapest setting on the frontier of an isotonic loss model over a "
                        "fixed label-free grid of per-rung thresholds (optionally gated on "
                        "agreeing with the previous rung) whose net accuracy change minus z "
                        "paired standard errors stays above -max_accuracy_drop against every "
                        "rung that could be the best"),
        "reference": {"rung": table.rungs[ref].label, "accuracy": float(acc[ref]),
                      "mean_cost_usd": float(mc[ref]),
                      "looks_best": (table.rungs[choice.looks_best].label
                                     if choice.looks_best >= 0 else table.rungs[ref].label),
                      "could_be_best": rivals or [table.rungs[ref].label]},
        "recommendation": {
            "kind": "cascade" if len(setting.chain) > 1 else "single_rung",
            "rungs": chain_labels,
            "thresholds": {table.rungs[j].label: {k: float(t) for k, t in
                                                  zip(setting.keys, setting.thresholds[p],
                                                      strict=True) if math.isfinite(t)}
                           for p, j in enumerate(setting.chain[:-1])},
            "describe": setting.describe(table),
            "exit_rate": {lab_: float(x) for lab_, x in zip(chain_labels, exits, strict=True)},
            "tested_settings": choice.tested,
            "candidate_settings": choice.candidates,
            "passed_test": choice.passed,
            "cases_needed": choice.cases_needed,
            "drift_max_disagreement": {chain_labels[p]: d["max"] for p, d in drift.items()},
            "disagreement_with_top": {chain_labels[p]: d["rate"] for p, d in drift.items()},
        },
        "expected": {
            "confidence": 0.9,
            "accuracy": {"estimate": float(right[lab].mean()), "interval_90": ci["accuracy"]},
            "mean_cost_usd": {"estimate": float(cost.mean()),
                              "interval_90": cost_ci["mean_cost_usd"]},
            # the interval of the same quantity as the estimate: with unlabelled cases the
            # labelled subset's accuracy difference is another one (cascade label picks the
            # cases where rungs disagree, so it is biased)
            "accuracy_change": {"estimate": change,
                                "interval_90": (ci["accuracy_change"] if lab.size == table.n
                                                else _mean_interval(net, rng, bootstrap))},
            "cost_saving": {"estimate": 1 - float(cost.mean()) / rc if rc > 0 else 0.0,
                            "interval_90": cost_ci["cost_saving"]},
            "certified_max_drop": max(0.0, -g_lower) if is_cascade else 0.0,
            "guard": {
                "z": z, "accuracy_change": g_change, "standard_error": g_se,
                "lower_bound": g_lower,
                "against": (table.rungs[choice.against].label if choice.against >= 0
                            else table.rungs[ref].label),
                "meaning": "an estimate, not a guarantee: the drop on new questions of the "
                           "suite's mix, against every rung that could be the best, is at most "
                           "certified_max_drop at about 1 - delta confidence by a normal "
                           "approximation for this one setting; choosing it among the frontier "
                           "makes the in-sample estimate optimistic, which the margin is sized "
                           "to absorb (checked by cross-validation in bench/tuning.py)"},
        },
        "against_most_accurate": _against_most_accurate(table, setting, ref, cost, exit_pos,
                                                        choice.looks_best, acc, mc),
        "single_rungs": [{"rung": r.label, "accuracy": float(acc[j]),
                          "mean_cost_usd": float(mc[j])} for j, r in enumerate(table.rungs)],
        "oracle": {"accuracy": float(cl.any(axis=1).mean()),
                   "mean_cost_usd": float(ocost.mean())},
        "notes": notes,
    }


def _against_most_accurate(table: OutcomeTable, setting: Setting, ref: int, cost: FloatArray,
                           exit_pos: IntArray, looks_best: int, acc: FloatArray,
                           mc: FloatArray) -> dict[str, Any] | None:
    """The change and saving against the suite's most accurate rung, when the reference (the
    rung the setting ends at, one that could be the best) is another: the figures above are
    against the reference, which may flatter them (a cheaper, less accurate rung)."""
    if looks_best < 0 or looks_best == ref or not acc[looks_best] > acc[ref]:
        return None  # a tie (the cheaper rung "looks best") says nothing the line above doesn't
    better, worse = outcome_of(table, setting, looks_best, exit_pos)
    return {"rung": table.rungs[looks_best].label, "accuracy": float(acc[looks_best]),
            "accuracy_change": float((better.astype(float) - worse).mean()),
            "cost_saving": 1 - float(cost.mean()) / float(mc[looks_best])
            if mc[looks_best] > 0 else 0.0}


def cost_frontier(table: OutcomeTable) -> list[dict[str, Any]]:
    """In-sample cost/accuracy frontier of cascades (from :func:`budget_points`), with every
    single rung (once, at its accuracy on the suite) and the oracle for scale. In-sample: it
    shows the room, not a promise."""
    points = budget_points(table)
    pts = [{"kind": "cascade", "rungs": [table.rungs[j].label for j in st.chain],
            "accuracy": a, "mean_cost_usd": c} for a, c, st in points if len(st.chain) > 1]
    out = _pareto(pts)
    for a, c, st in points:
        if len(st.chain) == 1:
            out.append({"kind": "single_rung", "rungs": [table.rungs[st.chain[0]].label],
                        "accuracy": a, "mean_cost_usd": c})
    lab = table.is_labelled
    cl = table.correct[lab]
    mc = table.cost.mean(axis=0)
    order = np.argsort(mc, kind="stable")
    pos = np.argmax(cl[:, order], axis=1)
    cost = np.where(cl.any(axis=1), table.cost[lab][np.arange(cl.shape[0]), order[pos]],
                    table.cost[lab][:, order[-1]])
    out.append({"kind": "oracle", "rungs": [], "accuracy": float(cl.any(axis=1).mean()),
                "mean_cost_usd": float(cost.mean())})
    return sorted(out, key=lambda p: p["mean_cost_usd"])


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

    labelled = report.get("labelled_cases", report["cases"])
    cases = (f"{report['cases']}" if labelled == report["cases"]
             else f"{report['cases']} ({labelled} labelled)")
    lines = [
        f"cases: {cases}   best single rung: {ref['rung']} "
        f"({ref['accuracy'] * 100:.1f}%, ${ref['mean_cost_usd']:.3g}/case)",
        *([f"rungs that could be the best on new questions: {', '.join(ref['could_be_best'])} "
           "(the guard holds against each)"] if len(ref.get("could_be_best", ())) > 1 else []),
        f"recommended: {rec['describe']}",
        f"  accuracy        {iv(e['accuracy'])}",
        f"  accuracy change {iv(e['accuracy_change'], pct=True)}",
        f"  mean cost       {iv(e['mean_cost_usd'], usd=True)}",
        f"  cost saving     {e['cost_saving']['estimate'] * 100:.1f}% (90%: "
        f"{e['cost_saving']['interval_90'][0] * 100:.1f} … "
        f"{e['cost_saving']['interval_90'][1] * 100:.1f})",
    ]
    most = report.get("against_most_accurate")
    if most:
        lines.append(f"  against {most['rung']} (the suite's most accurate rung, "
                     f"{most['accuracy'] * 100:.1f}%): accuracy change "
                     f"{most['accuracy_change'] * 100:+.1f} pts, cost saving "
                     f"{most['cost_saving'] * 100:.1f}%")
    if rec.get("candidate_settings"):
        lines.append(f"  chosen among {rec['tested_settings']} settings on the loss model's "
                     f"frontier, of {rec['candidate_settings']} candidates")
    if rec["kind"] == "cascade" and "delta" in report["objective"]:
        g = e["guard"]
        lines.append(f"  guard (binding against {g.get('against', ref['rung'])}): estimated "
                     f"change {g['accuracy_change'] * 100:+.2f} pts, "
                     f"standard error {g['standard_error'] * 100:.2f}; drop on new questions "
                     f"of this mix at most {e['certified_max_drop'] * 100:.2f} pts at about "
                     f"{100 * (1 - report['objective']['delta']):.0f}% confidence (an estimate, "
                     "not a guarantee)")
    sh = report.get("shift")
    if sh and sh.get("available"):
        lines.append(f"  under shift ({sh['folds']} held-out {sh['by']} folds): accuracy change "
                     f"mean {sh['accuracy_change_mean'] * 100:+.1f} pts, worst "
                     f"{sh['accuracy_change_worst'] * 100:+.1f} pts")
    if sh and not sh.get("available") and report.get("shift_guard") is not None:
        # asked for, and unable to act: said, not only in --json
        lines.append(f"  shift guard: not applied ({sh.get('reason', 'no groups to hold out')})")
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)

