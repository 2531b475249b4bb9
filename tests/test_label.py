"""Unlabelled cases in tuning, ``cascade label``, and labelling with a judge model."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from cascade.cli import main
from cascade.config import RungConfig, VerifierConfig, parse_config
from cascade.providers.base import ModelCall
from cascade.suite import OutcomeTable, agreement_arrays, load_shared_outcomes
from cascade.testing import FunctionProvider
from cascade.tuning import Setting, select
from cascade.tuning.label import judge_labels, needed_labels
from cascade.tuning.simulate import outcome_of, simulate
from tests.loopback import LoopbackServer, RecordedRequest, Reply, openai_reply

LETTERS = "ABCD"


def _letters(n: int, seed: int) -> tuple[OutcomeTable, list[str]]:
    """Multiple-choice answers of a cheap rung (right with probability = its confidence) and a
    top rung (right 85%): grades follow from the texts, as with the shared mmlu files."""
    rng = np.random.default_rng(seed)
    gold = [LETTERS[k] for k in rng.integers(0, 4, n)]
    conf = rng.random(n)
    right = np.stack([rng.random(n) < conf, rng.random(n) < 0.85], axis=1)
    texts: list[list[str | None]] = []
    for i in range(n):
        row: list[str | None] = []
        for j in range(2):
            wrong = LETTERS[(LETTERS.index(gold[i]) + 1 + (i + j) % 3) % 4]
            row.append(gold[i] if right[i, j] else wrong)
        texts.append(row)
    correct = np.array([[t == g for t in row] for row, g in zip(texts, gold, strict=True)])
    table = OutcomeTable(
        case_ids=tuple(f"q{i}" for i in range(n)),
        rungs=(RungConfig(model="s", input_usd_per_mtok=0.1),
               RungConfig(model="l", input_usd_per_mtok=1.0)),
        correct=correct, cost=np.tile([0.05, 1.0], (n, 1)),
        scores={"confidence": np.stack([conf, np.zeros(n)], axis=1)}, passed={},
        groups=("",) * n, verifiers=(VerifierConfig(name="confidence", id="confidence"),),
        source="synthetic", agreement=agreement_arrays(texts), agreement_normaliser="choice",
        prompts=tuple(f"question {i}?" for i in range(n)),
        answers=tuple(tuple(r) for r in texts))
    return table, gold


def _unlabel(t: OutcomeTable, mask: np.ndarray) -> OutcomeTable:
    return replace(t, labelled=~mask, correct=np.where(mask[:, None], False, t.correct))


def _truth(t: OutcomeTable, ids: list[str]) -> dict[str, dict[str, bool]]:
    row = {c: i for i, c in enumerate(t.case_ids)}
    return {c: {r.label: bool(t.correct[row[c], j]) for j, r in enumerate(t.rungs)}
            for c in ids}


def test_unlabelled_answers_equal_to_the_reference_count_exactly_others_as_losses() -> None:
    """An unlabelled answer equal to the top rung's (same normalised letter) has the same grade:
    it counts exactly as it would labelled. A different one counts as a loss, never a gain."""
    t, _gold = _letters(2000, 1)
    agree = t.agreement["choice"][:, 0, 1]
    hidden = np.random.default_rng(2).random(t.n) < 0.6
    u = _unlabel(t, hidden)
    st = Setting((0, 1), ("confidence",), ((0.6,),))
    b_true, w_true = outcome_of(t, st, 1)
    b, w = outcome_of(u, st, 1)
    ex = simulate(t, st)[2]
    exact = ~hidden | agree | (ex == 1)
    assert np.array_equal(b[exact], b_true[exact]) and np.array_equal(w[exact], w_true[exact])
    off = hidden & ~agree & (ex == 0)
    assert off.sum() > 20 and w[off].all() and not b[off].any()
    assert b_true[off].any()  # some of those were truly gains: never taken for free


def test_label_names_only_unlabelled_disagreements_that_matter() -> None:
    t, _gold = _letters(600, 3)
    assert needed_labels(t) == []  # everything labelled: nothing to ask
    agree = t.agreement["choice"][:, 0, 1]
    same = _unlabel(t, agree & (np.arange(t.n) >= 200))
    assert needed_labels(same) == []  # unlabelled answers all agree: labels change nothing
    hidden = np.arange(t.n) >= 150
    u = _unlabel(t, hidden)
    needs = needed_labels(u)
    assert needs and len({n.case_id for n in needs}) == len(needs)
    for n in needs:
        assert hidden[n.index] and not agree[n.index]
        assert n.why and n.rungs == ("s",)
    assert len(needed_labels(u, max_n=3)) == 3
    before = float(simulate(u, select(u)[0])[1].mean())
    labelled = u.with_labels(_truth(t, [n.case_id for n in needs]))
    after = float(simulate(labelled, select(labelled)[0])[1].mean())
    assert after < before  # the labels asked for bought a cheaper setting


def _shared(tmp_path: Path, t: OutcomeTable, hidden: np.ndarray) -> Path:
    (tmp_path / "ladder-toy.json").write_text(json.dumps({"ladder": [
        {"model": "s", "input_usd_per_mtok": 0.1, "output_usd_per_mtok": 0.1},
        {"model": "l", "input_usd_per_mtok": 1.0, "output_usd_per_mtok": 1.0}]}))
    rows = []
    for i in range(t.n):
        rows.append(json.dumps({
            "id": t.case_ids[i], "messages": [{"role": "user", "content": t.prompts[i]}],
            "outcomes": {r.label: {"text": t.answers[i][j],
                                   "correct": None if hidden[i] else bool(t.correct[i, j]),
                                   "confidence": float(t.scores["confidence"][i, j]),
                                   "confidence_source": "answer_logprob",
                                   "cost_usd": float(t.cost[i, j])}
                         for j, r in enumerate(t.rungs)}}))
    f = tmp_path / "mmlu_toy_train.jsonl"
    f.write_text("\n".join(rows) + "\n")
    return f


def test_cli_label_writes_needs_and_an_empty_file_when_none(tmp_path: Path) -> None:
    t, _gold = _letters(600, 3)
    f = _shared(tmp_path, t, np.arange(t.n) >= 150)
    out = tmp_path / "NEEDS.jsonl"
    assert main(["label", str(f), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all(r["id"].startswith("q") and r["why"] for r in rows)
    assert {"prompt", "answers"} <= set(rows[0])
    table = load_shared_outcomes([f])
    assert all(not table.is_labelled[table.case_ids.index(r["id"])] for r in rows)
    full = tmp_path / "full"
    full.mkdir()
    g = _shared(full, t, np.zeros(t.n, dtype=bool))
    assert main(["label", str(g), "--out", str(out)]) == 0
    assert out.read_text() == ""


def _judging(gold: dict[str, str]) -> FunctionProvider:
    def fn(call: ModelCall) -> str:
        body = call.messages[-1].content
        question = body.split("\n")[1]
        answer = body.split("=" * 12)[1].strip()
        return "Let me check.\nyes" if answer == gold[question] else "Hmm.\nNo."
    return FunctionProvider(fn)


def test_judge_labels_every_rung_once_per_distinct_answer() -> None:
    t, gold = _letters(200, 5)
    hidden = np.arange(t.n) >= 50
    u = _unlabel(t, hidden)
    needs = needed_labels(u)
    assert needs
    judge = _judging({f"question {i}?": g for i, g in enumerate(gold)})
    cfg = parse_config({"rungs": [{"model": "judge", "input_usd_per_mtok": 2.0,
                                   "output_usd_per_mtok": 8.0}]})
    res = judge_labels(u, needs, cfg, provider_factory=judge.factory)
    assert res.labels == _truth(t, [n.case_id for n in needs])
    assert res.calls == len(judge.calls) == 2 * len(needs)  # the answers all differ
    words = [len(str(judge.fn(c)).split()) for c in judge.calls]
    assert res.cost_usd == pytest.approx(sum(cfg.rungs[0].cost_usd(10, w) for w in words))
    assert res.cost_usd > 0 and res.model == "judge"


def test_cli_judge_against_a_loopback_server(tmp_path: Path, openai_server: LoopbackServer,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """``--judge CONFIG`` grades through the real SDK; verdicts are marked as judge labels, the
    cost is reported, and ``cascade tune --labels`` uses them."""
    t, gold = _letters(400, 3)
    by_q = {f"question {i}?": g for i, g in enumerate(gold)}

    def handle(req: RecordedRequest) -> Reply:
        body = req.json["messages"][-1]["content"]
        answer = body.split("=" * 12)[1].strip()
        verdict = "yes" if answer == by_q[body.split("\n")[1]] else "no"
        return openai_reply(verdict, model="judge", prompt_tokens=50, completion_tokens=1)

    openai_server.script(handle)
    judge = tmp_path / "judge.toml"
    judge.write_text(f'[[rungs]]\nmodel = "judge"\nprovider = "openai-compatible"\n'
                     f'base_url = "{openai_server.base_url}"\ninput_usd_per_mtok = 2.0\n'
                     'output_usd_per_mtok = 8.0\n')
    f = _shared(tmp_path, t, np.arange(t.n) >= 120)
    out = tmp_path / "NEEDS.jsonl"
    assert main(["label", str(f), "--judge", str(judge), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all(r["label_source"] == "judge" and r["judge_model"] == "judge"
                        for r in rows)
    assert {r["id"]: r["correct"] for r in rows} == _truth(t, [r["id"] for r in rows])
    assert len(openai_server.requests) == 2 * len(rows)
    cost = 2 * len(rows) * (50 * 2.0 + 1 * 8.0) / 1e6
    assert f"in {2 * len(rows)} calls, ${cost:.4f}" in capsys.readouterr().out
    tuned = tmp_path / "TUNED.toml"
    assert main(["tune", str(f), "--labels", str(out), "--out", str(tuned), "--json"]) == 0


def test_with_no_label_at_all_tune_says_so_and_label_asks_for_a_spread_sample() -> None:
    """Nothing to tell the rungs apart: ``tune`` is a clear error naming ``cascade label``,
    which asks for a sample spread over the suite first."""
    from cascade.errors import ConfigError
    from cascade.tuning import tune

    t, _gold = _letters(500, 9)
    none = _unlabel(t, np.ones(t.n, dtype=bool))
    with pytest.raises(ConfigError, match="cascade label"):
        tune(none)
    needs = needed_labels(none, max_n=40)
    assert len(needs) == 40 and needs[0].index == 0 and needs[-1].index == t.n - 1
    assert len(needed_labels(none)) == 300


def test_tune_on_a_partly_labelled_suite_reports_on_the_labelled_cases() -> None:
    """Unlabelled placeholders never enter an accuracy: the report's accuracies are the
    labelled cases', and the shift check too."""
    from cascade.tuning import tune

    t, _gold = _letters(1500, 11)
    groups = tuple(f"g{i % 5}" for i in range(t.n))
    t = replace(t, groups=groups)
    hidden = np.arange(t.n) % 3 == 0
    u = _unlabel(t, hidden)
    res = tune(u, bootstrap=100)
    rep = res.report
    assert rep["labelled_cases"] == int((~hidden).sum())
    right, _c, _e = simulate(u, res.setting)
    assert rep["expected"]["accuracy"]["estimate"] == pytest.approx(right[~hidden].mean())
    assert {s["rung"]: s["accuracy"] for s in rep["single_rungs"]} == pytest.approx(
        {"s": t.correct[~hidden, 0].mean(), "l": t.correct[~hidden, 1].mean()})
    assert rep["shift"]["available"]


def test_eval_leaves_unlabelled_cases_out() -> None:
    """``cascade eval`` replays grades; an unlabelled case has none, so it is skipped and
    counted, never scored as wrong."""
    from cascade.evaluate import evaluate

    t, _gold = _letters(400, 13)
    hidden = np.arange(t.n) % 4 == 0
    cfg = parse_config({"rungs": [{"model": "s", "thresholds": {"confidence": 0.7},
                                   "price": "unknown"},
                                  {"model": "l", "price": "unknown"}],
                        "verifiers": ["confidence"]})
    rep = evaluate(_unlabel(t, hidden), cfg)
    full = evaluate(t.take(np.nonzero(~hidden)[0]), cfg)
    assert rep["unlabelled_skipped"] == int(hidden.sum()) and rep["cases"] == full["cases"]
    assert rep["accuracy"] == pytest.approx(full["accuracy"])
