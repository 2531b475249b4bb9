"""From a suite to a tuned router: fit on the recorded outcomes, choose its setting on
cross-fitted scores, write the router file and the ``[router]`` table, and replay it.

``cascade tune`` calls :func:`tune_router` after the tuner, then :func:`write_router` next to
TUNED.toml and appends :func:`router_toml`'s table; ``cascade eval`` calls :func:`route_cases`
to know where each recorded case starts and which rungs it skips, and :func:`replay_routes` to
climb the recorded verdicts along those routes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cascade.config import CascadeConfig, RungConfig
from cascade.errors import ConfigError
from cascade.messages import Message
from cascade.routing.choose import RouteChoice, choose_route_setting, routed_exits
from cascade.routing.features import prompt_messages
from cascade.routing.model import (
    RouterModel,
    fit_and_cross_fit,
    fit_model,
    prompt_groups,
    score_many,
)
from cascade.routing.runtime import Router
from cascade.suite import OutcomeTable
from cascade.tuning.guard import DELTA
from cascade.tuning.output import to_config
from cascade.tuning.report import drift_rates
from cascade.tuning.setting import Setting

__all__ = ["FittedRouter", "RoutedCases", "RouterTuning", "fit_router", "replay_routes",
           "route_cases", "router_toml", "tune_router", "write_router"]

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]


def _docs(table: OutcomeTable) -> list[tuple[Message, ...]]:
    if len(table.messages) == table.n and all(table.messages):
        return list(table.messages)
    if len(table.prompts) != table.n:
        raise ConfigError("the suite's outcome table carries no prompts to learn a router from",
                          source=table.source)
    return [prompt_messages(p) for p in table.prompts]


@dataclass(frozen=True)
class FittedRouter:
    """A model fitted on every case, and each case's score from a model fitted without it."""

    model: RouterModel
    scores: FloatArray
    """Cross-fitted P(right), cases × the table's rungs."""


def fit_router(table: OutcomeTable, *, folds: int = 5, seed: int = 0) -> FittedRouter:
    """Per rung of ``table``, a calibrated P(its answer is right) from the prompt.

    Fitted on the labelled cases only: an unlabelled case's ``correct`` is a placeholder
    (False for every rung), not a grade. Labelled cases get cross-fitted scores (copies of a
    request in one fold); unlabelled ones the score of the model fitted on every labelled case
    (which never saw them), or, when a labelled case asked the same, that case's."""
    docs = _docs(table)
    lab = np.nonzero(table.is_labelled)[0]
    if lab.size == 0:
        raise ConfigError("the router needs labelled cases; none of the suite's is",
                          source=table.source)
    if lab.size == table.n:
        model, scores = fit_and_cross_fit(docs, table.correct, table.labels, folds=folds,
                                          seed=seed)
        return FittedRouter(model, scores)
    ldocs = [docs[int(i)] for i in lab]
    if lab.size < 2:  # one labelled case has no fold to be scored out of (no guard passes)
        model = fit_model(ldocs, table.correct[lab], table.labels)
        return FittedRouter(model, score_many(model, docs))
    model, oof = fit_and_cross_fit(ldocs, table.correct[lab], table.labels, folds=folds,
                                   seed=seed)
    scores = score_many(model, docs)
    scores[lab] = oof
    # an unlabelled copy of a labelled request: the full model has seen its copy's grade, so
    # it gets the copy's out-of-fold score
    groups = prompt_groups(docs)
    scored = dict(zip(groups[lab].tolist(), lab.tolist(), strict=True))
    for i in np.nonzero(~table.is_labelled)[0]:
        j = scored.get(int(groups[i]))
        if j is not None:
            scores[i] = scores[j]
    return FittedRouter(model, scores)


@dataclass(frozen=True)
class RouterTuning:
    """The routed recommendation: its choice, the config the climb runs, and the router (None
    when the router is off)."""

    choice: RouteChoice
    config: CascadeConfig
    router: Router | None


def _config(table: OutcomeTable, choice: RouteChoice, scores: FloatArray) -> CascadeConfig:
    """The config the routed climb runs, with each early rung's tolerated disagreement with
    the top rung (``drift_max_disagreement``) measured on the cases the route lets it answer:
    without it, the drift alarm of a router-accepted rung never acts."""
    s = choice.setting
    if choice.on:
        exits = routed_exits(table, scores, s)
        drift = {s.chain[p]: d["max"] for p, d in drift_rates(table, s.setting, exits).items()}
        cfg = to_config(table, s.setting, drift=drift)
    else:
        cfg = to_config(table, choice.base)
    if choice.on and not s.keys:  # tried early rungs accept: no scoring verifier decides
        # there. The top rung keeps its own: they decide whether its answer is verified,
        # which the tuner never chooses (it answers whatever they say).
        drop = set(table.scores)
        every = tuple(v.key for v in cfg.verifiers)
        top = cfg.rungs[-1]
        kept = set(top.verifiers if top.verifiers is not None else every)

        def early(r: RungConfig) -> RungConfig:
            ids = tuple(x for x in (r.verifiers if r.verifiers is not None else every)
                        if x not in drop)
            th = {k: t for k, t in r.thresholds.items() if k not in drop}
            return replace(r, thresholds=th, verifiers=ids, fallbacks=tuple(
                replace(fb, thresholds=th, verifiers=ids) for fb in r.fallbacks))

        cfg = cfg.replace(
            verifiers=tuple(v for v in cfg.verifiers if v.key not in drop or v.key in kept),
            rungs=(*(early(r) for r in cfg.rungs[:-1]), top))
    return cfg


def tune_router(table: OutcomeTable, *, max_accuracy_drop: float = 0.01, delta: float = DELTA,
                min_gain: float = 0.01, base: Setting | None = None, folds: int = 5,
                seed: int = 0) -> RouterTuning:
    """Fit the router, choose its setting under the tuner's guard (``base``: the tuner's own
    recommendation, recomputed when not given) and build the config it runs with."""
    fitted = fit_router(table, folds=folds, seed=seed)
    choice = choose_route_setting(table, fitted.scores, max_accuracy_drop=max_accuracy_drop,
                                  delta=delta, min_gain=min_gain, base=base)
    cfg = _config(table, choice, fitted.scores)
    if not choice.on:
        return RouterTuning(choice, cfg, None)
    # unlike the suite: the route family's safe start is the top rung; the skip family's is
    # the tuned climb, skipping nothing
    unfamiliar = len(choice.setting.chain) - 1 if not choice.setting.keys else 0
    router = Router(fitted.model.subset(choice.setting.chain), choice.setting.skip_below,
                    unfamiliar_start=unfamiliar)
    return RouterTuning(choice, cfg, router)


def write_router(tuning: RouterTuning, toml_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Save the router beside ``toml_path`` (``<stem>.router.json``) and return the
    ``[router]`` table that names it (empty when the router is off: nothing is written)."""
    if tuning.router is None:
        return {}
    out = Path(toml_path)
    path = out.with_name(out.stem + ".router.json")
    tuning.router.model.save(path)
    return {"path": path.name, "skip_below": [round(u, 6) for u in tuning.router.skip_below],
            "unfamiliar_start": tuning.router.unfamiliar_start % len(tuning.router.skip_below)}


def router_toml(table: dict[str, Any]) -> str:
    """The ``[router]`` table as TOML, to append to TUNED.toml (empty when there is none)."""
    if not table:
        return ""
    return (f"\n[router]\npath = {json.dumps(table['path'])}\n"
            f"skip_below = [{', '.join(repr(float(u)) for u in table['skip_below'])}]\n"
            f"unfamiliar_start = {int(table['unfamiliar_start'])}\n")


@dataclass(frozen=True)
class RoutedCases:
    """Per recorded case, the route the router gives it; positions are the router's rungs
    (the config's rungs, in climbing order)."""

    start: IntArray
    skip: BoolArray
    """(cases, rungs): True where the climb does not call that rung (before ``start`` too)."""
    scores: FloatArray


def route_cases(router: Router, table: OutcomeTable,
                prompts: Sequence[str] | None = None) -> RoutedCases:
    """The router's route for every case of ``table`` (from ``table.prompts``), exactly as
    :meth:`Router.route` gives it in a live climb, for ``cascade eval`` to replay."""
    docs = [prompt_messages(p) for p in prompts] if prompts is not None else _docs(table)
    k = len(router.labels)
    start = np.zeros(len(docs), dtype=np.int64)
    skip = np.zeros((len(docs), k), dtype=bool)
    scores = np.zeros((len(docs), k))
    for i, d in enumerate(docs):
        r = router.route(d, {})
        start[i] = r.start
        skip[i, :r.start] = True
        skip[i, list(r.skip)] = True
        scores[i] = r.scores
    return RoutedCases(start, skip, scores)


def replay_routes(accepts: BoolArray, cost: FloatArray, routes: RoutedCases
                  ) -> tuple[IntArray, FloatArray]:
    """The climb of each case under its route: ``accepts`` (cases × the config's rungs) is
    where each rung's verifiers would accept, ``cost`` what each rung costs. A skipped rung is
    neither paid for nor accepted; the last rung answers. Returns the exit position and what
    was paid, as the engine would."""
    if accepts.shape != routes.skip.shape or cost.shape != accepts.shape:
        raise ValueError("accepts, cost and routes must all be cases × the config's rungs")
    tried = ~routes.skip
    tried[:, -1] = True
    acc = accepts & tried
    acc[:, -1] = True
    exit_pos = np.argmax(acc, axis=1).astype(np.int64)
    paid = np.cumsum(np.where(tried, cost, 0.0), axis=1)
    return exit_pos, paid[np.arange(len(exit_pos)), exit_pos]
