"""The router: features as scikit-learn computes them, the file format and its checks, routes
and their reasons, cross-fitting, and the choice of its setting under the tuner's guard."""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from cascade.config import RungConfig, VerifierConfig
from cascade.errors import ConfigError
from cascade.messages import Message, normalise_messages
from cascade.routing import (
    Router,
    RouteSetting,
    choose_route_setting,
    fit_router,
    load_router,
    read_model,
    replay_routes,
    route_cases,
    router_toml,
    simulate_routed,
    tune_router,
    write_router,
)
from cascade.routing.choose import ROUTE_LEVELS
from cascade.routing.features import Featurizer, analyze, prompt_messages
from cascade.routing.model import cross_fit, fit_model
from cascade.suite import OutcomeTable, load_shared_outcomes, messages_text

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cascades"

EASY = ["What is the capital city of {}?", "Name the capital of {} in one word."]
HARD = ["Evaluate the integral of x^{} sin(x) dx from 0 to pi, show the steps.",
        "Prove that the series sum 1/n^{} converges and bound its tail."]
WORDS = ["France", "Peru", "Kenya", "Chile", "Japan", "Norway", "Egypt", "Spain", "Ghana", "Fiji"]


def _prompts(n: int, rng: np.random.Generator) -> tuple[list[str], np.ndarray]:
    hard = rng.random(n) < 0.5
    out = []
    for i in range(n):
        tpl = (HARD if hard[i] else EASY)[i % 2]
        arg = str(i % 7 + 2) if hard[i] else WORDS[i % len(WORDS)]
        msgs = normalise_messages(messages=[{"role": "system", "content": "Answer briefly."},
                                            {"role": "user", "content": tpl.format(arg)}])
        out.append(messages_text(msgs))
    return out, hard


def _table(n: int = 400, seed: int = 0, signal: bool = True,
           confidence: bool = False) -> OutcomeTable:
    rng = np.random.default_rng(seed)
    prompts, hard = _prompts(n, rng)
    if not signal:
        hard = rng.random(n) < 0.5  # difficulty unrelated to the text
    correct = np.zeros((n, 2), dtype=bool)
    correct[:, 0] = np.where(hard, rng.random(n) < 0.1, rng.random(n) < 0.99)
    correct[:, 1] = rng.random(n) < 0.97
    conf = np.where(correct[:, 0], 0.9, 0.6)[:, None] * np.ones((1, 2)) if confidence else \
        np.full((n, 2), math.nan)
    return OutcomeTable(
        case_ids=tuple(f"c{i}" for i in range(n)),
        rungs=(RungConfig(model="small", input_usd_per_mtok=0.1),
               RungConfig(model="big", input_usd_per_mtok=1.0)),
        correct=correct, cost=np.tile([1.0, 10.0], (n, 1)),
        scores={"confidence": conf}, passed={}, groups=("",) * n,
        verifiers=(VerifierConfig(name="confidence", id="confidence"),),
        source="synthetic", prompts=tuple(prompts))


def _docs(t: OutcomeTable) -> list[tuple[Message, ...]]:
    return [prompt_messages(p) for p in t.prompts]


# ---------------------------------------------------------------- features and model


def test_runtime_features_and_scores_equal_scikit_learn() -> None:
    t = _table(200)
    docs = _docs(t)
    vec = TfidfVectorizer(analyzer=analyze, min_df=2, sublinear_tf=True)
    x = vec.fit_transform(docs)
    model = fit_model(docs, t.correct, t.labels)
    assert model.featurizer.vocabulary() == vec.get_feature_names_out().tolist()
    for i in range(len(docs)):
        idx, vals = model.featurizer.transform(docs[i])
        dense = np.zeros(len(model.featurizer))
        dense[idx] = vals
        np.testing.assert_allclose(dense, x[i].toarray()[0], atol=1e-12)
    lr = LogisticRegression(C=4.0, max_iter=2000).fit(x, t.correct[:, 0])
    np.testing.assert_allclose(model.scores(docs[3])[0], lr.predict_proba(x[3])[0, 1],
                               atol=1e-6)


def test_analyzer_reads_system_prompt_length_and_turns() -> None:
    toks = analyze((Message("system", "Be terse"), Message("user", "Capital of France")))
    assert {"s:be", "s:terse", "capital", "capital of", "of france", "turns:1"} <= set(toks)
    assert "be" not in toks and any(t.startswith("len:") for t in toks)


def test_prompt_messages_reads_canonical_json_and_plain_text() -> None:
    msgs = (Message("system", "S"), Message("user", "Q?"))
    assert prompt_messages(messages_text(msgs)) == msgs
    assert prompt_messages("just a question") == (Message("user", "just a question"),)


def test_featurizer_ignores_unknown_tokens() -> None:
    f = Featurizer(["capital"], [1.5])
    idx, vals = f.transform((Message("user", "zebra capital capital"),))
    assert idx.tolist() == [0] and vals.tolist() == [1.0]  # l2-normalised single feature
    idx, vals = f.transform((Message("user", "zebra"),))
    assert idx.size == 0


def test_router_learns_which_prompts_the_cheap_rung_gets_right() -> None:
    t = _table(300)
    model = fit_model(_docs(t), t.correct, t.labels)
    easy = (Message("system", "Answer briefly."),
            Message("user", "What is the capital city of Chile?"))
    hard = (Message("system", "Answer briefly."),
            Message("user", "Evaluate the integral of x^3 sin(x) dx from 0 to pi, show it."))
    assert model.scores(easy)[0] > 0.8 > 0.3 > model.scores(hard)[0]


def test_cross_fit_scores_do_not_see_their_own_label() -> None:
    t = _table(120)
    docs = _docs(t)
    a = cross_fit(docs, t.correct, t.labels, folds=4, seed=1)
    flipped = t.correct.copy()
    flipped[7, 0] = not flipped[7, 0]
    b = cross_fit(docs, flipped, t.labels, folds=4, seed=1)
    assert a[7, 0] == b[7, 0]  # case 7's score comes from a model fitted without case 7
    changed = np.abs(a[:, 0] - b[:, 0]) > 0
    assert changed.any()  # ... while the models that did see it moved


def test_constant_rung_gets_its_smoothed_rate() -> None:
    t = _table(50)
    correct = t.correct.copy()
    correct[:, 1] = True
    m = fit_model(_docs(t), correct, t.labels)
    assert m.scores(_docs(t)[0])[1] == pytest.approx(50.5 / 51)


# ---------------------------------------------------------------- file and table


def _router_file(tmp_path: Path) -> tuple[Path, Router]:
    t = _table(200)
    model = fit_model(_docs(t), t.correct, t.labels)
    path = tmp_path / "router.json"
    model.save(path)
    return path, Router(model, (0.6, 0.0))


def test_file_round_trip_scores_the_same(tmp_path: Path) -> None:
    path, router = _router_file(tmp_path)
    loaded = load_router({"path": "router.json", "skip_below": [0.6, 0.0]}, base_dir=tmp_path,
                         labels=["small", "big"])
    doc = prompt_messages(_table(5, seed=3).prompts[0])
    np.testing.assert_allclose(loaded.model.scores(doc), router.model.scores(doc), atol=1e-5)
    assert loaded.skip_below == (0.6, 0.0) and loaded.labels == ("small", "big")
    assert "pickle" not in path.read_text() and json.loads(path.read_text())["version"] == 1


@pytest.mark.parametrize(("edit", "needle"), [
    (lambda d: d.update(version=2), "version is 2"),
    (lambda d: d.update(format="other"), "not a router file"),
    (lambda d: d["features"].update(analyzer="chars/9"), "features.analyzer is 'chars/9'"),
    (lambda d: d["model"]["coef"][0].pop(), "model.coef"),
    (lambda d: d["features"]["idf"].pop(), "features.idf"),
    (lambda d: d["model"].update(intercept=[0.0]), "model.intercept"),
    (lambda d: d["model"]["coef"][1].__setitem__(0, "x"), "must be numbers"),
    (lambda d: d.update(rungs=[]), "'rungs'"),
    (lambda d: d["features"].pop("system_prompts"), "features.system_prompts"),
])
def test_bad_router_files_name_the_file_and_the_defect(tmp_path: Path, edit: object,
                                                        needle: str) -> None:
    path, _ = _router_file(tmp_path)
    d = json.loads(path.read_text())
    edit(d)  # type: ignore[operator]
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError) as e:
        read_model(path)
    assert needle in str(e.value) and str(path) in str(e.value)


def test_unreadable_and_mismatched_files(tmp_path: Path) -> None:
    path, _ = _router_file(tmp_path)
    with pytest.raises(ConfigError, match="do not match the ladder"):
        load_router({"path": str(path)}, labels=["small", "medium", "big"])
    with pytest.raises(ConfigError, match="cannot read"):
        load_router({"path": "absent.json"}, base_dir=tmp_path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_model(path)


def test_bad_router_tables(tmp_path: Path) -> None:
    _router_file(tmp_path)
    with pytest.raises(ConfigError, match="unknown key 'skip'") as e:
        load_router({"path": "router.json", "skip": [0.5]}, base_dir=tmp_path)
    assert e.value.key == "router.skip"
    with pytest.raises(ConfigError, match="list of 2 numbers"):
        load_router({"path": "router.json", "skip_below": [0.5]}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match="router file"):
        load_router({"skip_below": [0.5, 0.0]}, base_dir=tmp_path)


# ---------------------------------------------------------------- routes


def test_route_starts_past_rungs_predicted_to_fail_and_says_why(tmp_path: Path) -> None:
    _path, router = _router_file(tmp_path)
    hard = (Message("system", "Answer briefly."),
            Message("user", "Prove that the series sum 1/n^4 converges and bound its tail."))
    r = router.route(hard, {})
    assert r.start == 1 and r.skip == () and len(r.scores) == 2
    assert r.reason == f"started at rung 1: router P(rung 0 right) = {r.scores[0]:.2f} < 0.60"
    easy = (Message("system", "Answer briefly."), Message("user", "Name the capital of Peru."))
    r = router.route(easy, {"budget_key": "x"})
    assert r.start == 0 and r.reason.startswith("started at rung 0: router P(rung 0 right) = ")


def test_a_system_prompt_the_suite_never_had_is_not_routed(tmp_path: Path) -> None:
    _path, router = _router_file(tmp_path)
    hard = (Message("system", "You are a lawyer."),
            Message("user", "Prove that the series sum 1/n^4 converges and bound its tail."))
    r = router.route(hard, {})
    assert r.start == 1 and r.skip == () and "has not seen this system prompt" in r.reason
    r = replace(router, unfamiliar_start=0).route(hard, {})
    assert r.start == 0 and r.skip == ()
    t = _table(20, seed=2)
    other = tuple(messages_text((Message("system", "You are a lawyer."),
                                 *prompt_messages(p)[1:])) for p in t.prompts)
    assert (route_cases(router, t, other).start == 1).all()
    with pytest.raises(ConfigError, match="rung index from 0 to 1"):
        load_router({"path": "router.json", "unfamiliar_start": 2}, base_dir=tmp_path)


def test_skips_after_the_start_are_listed() -> None:
    t = _table(200)
    three = np.concatenate([t.correct[:, :1], t.correct], axis=1)
    model = fit_model(_docs(t), three, ("a", "b", "c"))
    router = Router(model, (0.0, 0.99, 0.0))
    r = router.route(prompt_messages(t.prompts[0]), {})
    assert r.start == 0 and r.skip == (1,) and "skipped P(rung 1 right)" in r.reason
    assert router.route(prompt_messages(t.prompts[0]), {}).scores[2] == pytest.approx(
        r.scores[2])


def test_route_cases_replays_route_exactly(tmp_path: Path) -> None:
    _path, router = _router_file(tmp_path)
    t = _table(60, seed=5)
    rc = route_cases(router, t)
    for i in range(t.n):
        r = router.route(prompt_messages(t.prompts[i]), {})
        assert rc.start[i] == r.start
        assert tuple(np.nonzero(rc.skip[i, r.start:])[0] + r.start) == r.skip
        assert not rc.skip[i, -1] and rc.skip[i, :r.start].all()


def test_route_cases_needs_prompts(tmp_path: Path) -> None:
    _path, router = _router_file(tmp_path)
    with pytest.raises(ConfigError, match="no prompts"):
        route_cases(router, replace(_table(10), prompts=()))


# ---------------------------------------------------------------- choosing the setting


def test_routed_simulation_pays_only_for_rungs_tried() -> None:
    t = _table(4)
    scores = np.array([[0.9, 0.5], [0.2, 0.5], [0.7, 0.5], [0.5, 0.5]])
    right, cost = simulate_routed(t, scores, RouteSetting((0, 1), (0.6, 0.0)))
    assert cost.tolist() == [1.0, 10.0, 1.0, 10.0]
    assert right.tolist() == [t.correct[0, 0], t.correct[1, 1], t.correct[2, 0], t.correct[3, 1]]
    tc = _table(4, confidence=True)
    right, cost = simulate_routed(tc, scores, RouteSetting((0, 1), (0.6, 0.0), ("confidence",),
                                                            ((0.8,),)))
    for i in (0, 2):  # tried: the confidence decides, and a rejected rung is paid for
        assert cost[i] == (1.0 if tc.correct[i, 0] else 11.0)


def test_router_is_chosen_where_the_text_tells_and_holds_the_guard() -> None:
    t = _table(400)
    fitted = fit_router(t)
    choice = choose_route_setting(t, fitted.scores, max_accuracy_drop=0.01)
    assert choice.on and choice.setting.routed and choice.setting.chain == (0, 1)
    assert choice.report["with_router"]["lower"] >= -0.01
    assert choice.report["with_router"]["cost_saving"] > 0.2
    _right, cost = simulate_routed(t, fitted.scores, choice.setting)
    assert 1 - cost.mean() / 10.0 == pytest.approx(choice.report["with_router"]["cost_saving"])
    fresh = _table(400, seed=9)  # new questions: the promise holds out of sample
    live = np.array([fitted.model.scores(d) for d in _docs(fresh)])
    model_right, _ = simulate_routed(fresh, live, choice.setting)
    assert model_right.mean() >= fresh.correct[:, 1].mean() - 0.03


def test_a_route_chain_tries_one_cheap_rung_before_the_reference() -> None:
    """Two cheap rungs that each get the easy prompts right: a route tries one of them, never
    both (a second early rung multiplied the candidates tenfold, and the cheapest that passed
    broke the promise on a shared pool)."""
    t = _table(400)
    three = np.concatenate([t.correct[:, :1], t.correct], axis=1)
    t3 = replace(t, rungs=(RungConfig(model="tiny", input_usd_per_mtok=0.1), *t.rungs),
                 correct=three, cost=np.tile([1.0, 1.5, 10.0], (t.n, 1)),
                 scores={"confidence": np.full((t.n, 3), math.nan)})
    choice = choose_route_setting(t3, fit_router(t3).scores, max_accuracy_drop=0.01)
    assert choice.on and len(choice.setting.chain) == 2 and choice.setting.chain[-1] == 2
    assert choice.report["candidates"] == 2 * len(ROUTE_LEVELS)


def test_routes_are_guarded_against_every_rung_that_could_be_the_best() -> None:
    """Two dear rungs equally accurate on different cases: either could be the best on new
    questions. A route that hands the cheap rung only what it gets right holds against the one
    it ends at, but loses the other's wins: it must pass against both (as the tuner's settings
    do), so here the router stays off; with only one dear rung the same route is chosen."""
    n = 400
    small = np.arange(n) < 300  # right on the first 300 cases
    big = np.ones(n, dtype=bool)
    big[300:312] = False  # wrong on 12 cases the cheap rung also misses
    huge = np.ones(n, dtype=bool)
    huge[320:332] = False  # as accurate, wrong on 12 others
    scores = np.column_stack([np.where(small, 0.99, 0.01), np.full(n, 0.97), np.full(n, 0.97)])

    def table(correct: np.ndarray, costs: list[float]) -> OutcomeTable:
        r = correct.shape[1]
        return OutcomeTable(
            case_ids=tuple(f"c{i}" for i in range(n)),
            rungs=tuple(RungConfig(model=m) for m in ("small", "big", "huge")[:r]),
            correct=correct, cost=np.tile(costs, (n, 1)), scores={}, passed={},
            groups=("",) * n, source="synthetic", prompts=("q",) * n)

    two = choose_route_setting(table(np.column_stack([small, big]), [1.0, 10.0]),
                               scores[:, :2], max_accuracy_drop=0.01)
    assert two.on and two.setting.chain == (0, 1)
    three = choose_route_setting(table(np.column_stack([small, big, huge]), [1.0, 10.0, 30.0]),
                                 scores, max_accuracy_drop=0.01)
    assert three.report["rivals"] == ["big", "huge"] and three.report["reference"] == "huge"
    assert not three.on and three.reason == "no routed setting passed the guard"


def test_router_is_off_when_the_text_says_nothing() -> None:
    t = _table(300, signal=False)
    choice = choose_route_setting(t, fit_router(t).scores)
    assert not choice.on and choice.setting.chain == (1,)


def test_tune_router_writes_a_file_and_table_the_loader_reads(tmp_path: Path) -> None:
    t = _table(300)
    tuning = tune_router(t)
    assert tuning.router is not None
    assert [r.label for r in tuning.config.rungs] == ["small", "big"]
    # a tried rung accepts: no confidence to threshold there; the top rung keeps its own,
    # which decide whether its answer is verified
    small, big = tuning.config.rungs
    assert small.verifiers == () and not small.thresholds
    assert big.verifiers is None or "confidence" in big.verifiers
    assert [v.key for v in tuning.config.verifiers] == ["confidence"]
    table = write_router(tuning, tmp_path / "TUNED.toml")
    parsed = tomllib.loads(router_toml(table))["router"]
    assert parsed["path"] == "TUNED.router.json"
    r = load_router(parsed, base_dir=tmp_path, labels=[x.label for x in tuning.config.rungs])
    assert r.skip_below == tuning.router.skip_below
    assert r.unfamiliar_start == parsed["unfamiliar_start"] == 1  # route family: the top rung
    off = tune_router(_table(300, signal=False))
    assert off.router is None and write_router(off, tmp_path / "X.toml") == {}
    assert router_toml({}) == ""


def test_with_confidence_the_router_only_adds_skips_to_the_tuned_climb() -> None:
    t = _table(400, confidence=True)
    choice = choose_route_setting(t, fit_router(t).scores)
    base_saving = choice.report["without_router"]["cost_saving"]
    if choice.on:
        assert choice.report["with_router"]["cost_saving"] >= base_saving + 0.01
    else:
        assert choice.setting.chain == choice.base.chain


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data/cascades")
def test_shared_file_without_confidences_gets_a_router(tmp_path: Path) -> None:
    t = load_shared_outcomes([SHARED / "triviaqa_llama_train.jsonl"])
    assert len(t.messages) == t.n and t.messages[0][0].role == "system"
    t = replace(t, scores={k: np.full_like(v, math.nan) for k, v in t.scores.items()})
    tuning = tune_router(t)
    rep = tuning.choice.report
    assert rep["without_router"]["cost_saving"] == 0.0  # no signal: the tuner keeps the top
    if tuning.choice.on:
        assert rep["with_router"]["lower"] >= -0.01


@pytest.mark.parametrize("confidence", [False, True])
def test_eval_replay_of_routes_equals_the_tuned_simulation(confidence: bool) -> None:
    t = _table(300, confidence=confidence)
    tuning = tune_router(t, min_gain=0.0)
    assert tuning.router is not None
    rs = tuning.choice.setting
    fresh = _table(120, seed=4, confidence=confidence)
    routes = route_cases(tuning.router, fresh)
    cols = list(rs.chain)
    accepts = np.ones((fresh.n, len(cols)), dtype=bool)
    if rs.keys:  # what cascade eval reads from the config's thresholds
        for p, row in enumerate(rs.thresholds):
            with np.errstate(invalid="ignore"):
                accepts[:, p] = fresh.scores["confidence"][:, cols[p]] >= row[0]
    exit_pos, paid = replay_routes(accepts, fresh.cost[:, cols], routes)
    scores = np.zeros(fresh.correct.shape)
    scores[:, cols] = routes.scores
    right, cost = simulate_routed(fresh, scores, rs)
    np.testing.assert_allclose(paid, cost)
    assert (fresh.correct[:, cols][np.arange(fresh.n), exit_pos] == right).all()
