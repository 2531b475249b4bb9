"""Defects found reviewing the label → tune → eval → route → drift loop (each test failed on the
code before its fix)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cascade.cli import main
from cascade.config import RungConfig, VerifierConfig, parse_config
from cascade.errors import ConfigError
from cascade.suite import OutcomeTable, agreement_arrays, load_outcome_table, load_shared_outcomes
from cascade.tuning.label import needed_labels
from tests.test_label import _letters, _shared, _unlabel

# ---------------------------------------------------------------- shared outcome files


def _rows(n: int = 40) -> list[dict[str, Any]]:
    """A small, valid shared-format suite of two rungs."""
    out = []
    for i in range(n):
        out.append({"id": f"q{i}", "messages": [{"role": "user", "content": f"question {i}?"}],
                    "outcomes": {
                        "s": {"text": "A", "correct": i % 3 != 0, "confidence": 0.5 + i / 100,
                              "confidence_source": "answer_logprob", "cost_usd": 0.001},
                        "l": {"text": "A", "correct": True, "confidence": 0.9,
                              "confidence_source": "answer_logprob", "cost_usd": 0.01}}})
    return out


def _write(tmp_path: Path, rows: list[dict[str, Any]], name: str = "mmlu_toy_train.jsonl"
           ) -> Path:
    (tmp_path / "ladder-toy.json").write_text(json.dumps({"ladder": [
        {"model": "s", "input_usd_per_mtok": 0.1, "output_usd_per_mtok": 0.1},
        {"model": "l", "input_usd_per_mtok": 1.0, "output_usd_per_mtok": 1.0}]}))
    f = tmp_path / name
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return f


@pytest.mark.parametrize("field, value, match", [
    ("cost_usd", math.nan, "cost_usd"),
    ("cost_usd", math.inf, "cost_usd"),
    ("cost_usd", -0.5, "cost_usd"),
    ("cost_usd", "0.01", "cost_usd"),
    ("cost_usd", None, "cost_usd"),
    ("confidence", math.nan, "confidence"),
    ("confidence", 5.0, "confidence"),
    ("confidence", -0.1, "confidence"),
    ("confidence", "high", "confidence"),
    ("correct", "false", "correct"),
    ("correct", 1, "correct"),
])
def test_bad_numbers_in_a_shared_file_are_config_errors_naming_case_and_field(
        tmp_path: Path, field: str, value: Any, match: str) -> None:
    """A NaN cost made the top rung's mean cost NaN and silently changed which rung was the
    reference; the string "false" read as True; a confidence of 5 passed every threshold."""
    rows = _rows()
    rows[3]["outcomes"]["l"][field] = value
    f = _write(tmp_path, rows)
    with pytest.raises(ConfigError, match=rf"'q3'.*{match}"):
        load_shared_outcomes([f])


def test_a_missing_cost_or_a_non_object_outcome_is_a_config_error(tmp_path: Path) -> None:
    rows = _rows()
    del rows[2]["outcomes"]["s"]["cost_usd"]
    with pytest.raises(ConfigError, match=r"'q2'.*cost_usd"):
        load_shared_outcomes([_write(tmp_path, rows)])
    rows = _rows()
    rows[5]["outcomes"]["s"] = "A"
    with pytest.raises(ConfigError, match="'q5'"):
        load_shared_outcomes([_write(tmp_path, rows)])


def test_cli_tune_on_a_file_without_cost_exits_2_not_a_traceback(tmp_path: Path) -> None:
    rows = _rows()
    del rows[0]["outcomes"]["l"]["cost_usd"]
    f = _write(tmp_path, rows)
    assert main(["tune", str(f), "--out", str(tmp_path / "T.toml")]) == 2


def test_a_null_confidence_is_still_no_score(tmp_path: Path) -> None:
    rows = _rows()
    rows[1]["outcomes"]["s"]["confidence"] = None
    t = load_shared_outcomes([_write(tmp_path, rows)])
    assert math.isnan(t.scores["confidence"][1, 0])


def test_bad_recorded_cost_is_a_config_error(tmp_path: Path) -> None:
    from tests.test_suite import FREE, _recorded_suite

    suite = _recorded_suite(tmp_path)
    rec = suite / "recordings.jsonl"
    lines = [json.loads(x) for x in rec.read_text().splitlines()]
    lines[0]["cost_usd"] = -3.0
    rec.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    cfg = parse_config({"rungs": [{"model": "small", **FREE}, {"model": "big", **FREE}],
                        "verifiers": [{"name": "confidence"}]})
    with pytest.raises(ConfigError, match="cost"):
        load_outcome_table([suite], cfg)


def test_a_case_id_twice_is_a_config_error(tmp_path: Path) -> None:
    """Labels are keyed by id, and the same file given twice doubled every case: the guard then
    saw twice the evidence it has."""
    rows = _rows()
    rows[7]["id"] = "q1"
    with pytest.raises(ConfigError, match=r"'q1'.*repeats"):
        load_shared_outcomes([_write(tmp_path, rows)])
    f = _write(tmp_path, _rows())
    with pytest.raises(ConfigError, match="repeats"):
        load_shared_outcomes([f, f])


# ---------------------------------------------------------------- cascade label --max


def test_max_zero_names_nothing_and_negative_max_is_refused(tmp_path: Path) -> None:
    """``--max 0`` named one case (and 300 with nothing labelled yet): ``max_n or 300`` and
    a length check made only after appending."""
    t, _gold = _letters(600, 3)
    u = _unlabel(t, np.arange(t.n) >= 150)
    assert needed_labels(u, max_n=1) and len(needed_labels(u, max_n=1)) == 1
    assert needed_labels(u, max_n=0) == []
    none = _unlabel(t, np.ones(t.n, dtype=bool))
    assert needed_labels(none, max_n=0) == []
    assert len(needed_labels(none, max_n=7)) == 7
    f = _shared(tmp_path, t, np.arange(t.n) >= 150)
    out = tmp_path / "NEEDS.jsonl"
    assert main(["label", str(f), "--max", "0", "--out", str(out)]) == 0
    assert out.read_text() == ""
    assert main(["label", str(f), "--max", "-1", "--out", str(out)]) == 2


# ---------------------------------------------------------------- --labels files


def _labels_file(tmp_path: Path, rows: list[dict[str, Any]]) -> Path:
    f = tmp_path / "DONE.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


@pytest.mark.parametrize("correct", [
    {"s": True, "l": None},            # half filled in
    {"s": "yes", "l": True},           # not a boolean
    True,                              # one grade for the case: which rung?
])
def test_a_label_line_filled_in_wrongly_is_an_error_not_silently_unlabelled(
        tmp_path: Path, correct: Any) -> None:
    """A line whose ``correct`` was filled in but not as ``{rung: true|false}`` for every rung
    was dropped without a word: the user believed the case labelled."""
    t, _gold = _letters(300, 3)
    f = _shared(tmp_path, t, np.arange(t.n) >= 100)
    lab = _labels_file(tmp_path, [{"id": "q200", "correct": correct}])
    assert main(["tune", str(f), "--labels", str(lab), "--out", str(tmp_path / "T.toml"),
                 "--router", "off"]) == 2


def test_a_label_for_a_case_the_suite_lacks_is_said_and_not_used(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Labels kept from a wider or older recording (logs rotate) are fine to pass, but never
    a silent no-op: the command says how many it could not use."""
    t, _gold = _letters(300, 3)
    f = _shared(tmp_path, t, np.arange(t.n) >= 100)
    lab = _labels_file(tmp_path, [{"id": "nope", "correct": {"s": True, "l": True}},
                                  {"id": "q200", "why": "asked, not yet answered"}])
    assert main(["label", str(f), "--labels", str(lab), "--out", str(tmp_path / "N")]) == 0
    assert "1 label(s) name cases the suite does not hold (e.g. 'nope')" in capsys.readouterr().err


def test_label_lines_not_yet_answered_are_skipped(tmp_path: Path) -> None:
    """NEEDS.jsonl as written (no ``correct``, or null) is a valid, empty labels file."""
    t, _gold = _letters(300, 3)
    f = _shared(tmp_path, t, np.arange(t.n) >= 100)
    lab = _labels_file(tmp_path, [{"id": "q200", "why": "x"}, {"id": "q201", "correct": None}])
    assert main(["label", str(f), "--labels", str(lab), "--out", str(tmp_path / "N")]) == 0


# ---------------------------------------------------------------- the router and unlabelled cases


def _routing_table(n: int = 600, seed: int = 0) -> tuple[OutcomeTable, np.ndarray, np.ndarray]:
    """Easy prompts the cheap rung gets right 80% of the time (a different letter when wrong),
    hard ones it misses; the top rung is always right. Returns the table, the hard mask, and
    the cases where the cheap rung is wrong on an easy prompt."""
    from tests.test_routing import _prompts

    rng = np.random.default_rng(seed)
    prompts, hard = _prompts(n, rng)
    small_ok = np.where(hard, False, rng.random(n) < 0.8)
    correct = np.stack([small_ok, np.ones(n, dtype=bool)], axis=1)
    texts: list[list[str | None]] = [["A" if ok else "B", "A"] for ok in small_ok]
    t = OutcomeTable(
        case_ids=tuple(f"c{i}" for i in range(n)),
        rungs=(RungConfig(model="small", input_usd_per_mtok=0.1),
               RungConfig(model="big", input_usd_per_mtok=1.0)),
        correct=correct, cost=np.tile([1.0, 10.0], (n, 1)),
        scores={"confidence": np.full((n, 2), math.nan)}, passed={}, groups=("",) * n,
        verifiers=(VerifierConfig(name="confidence", id="confidence"),), source="synthetic",
        prompts=tuple(prompts), agreement=agreement_arrays(texts), agreement_normaliser="choice",
        answers=tuple(tuple(r) for r in texts))
    return t, hard, ~hard & ~small_ok


def test_routed_settings_count_unlabelled_disagreements_as_losses() -> None:
    """The router's guard compared ``correct`` columns, where an unlabelled case holds False
    for every rung: a routed cheap answer that differs from the top rung's counted as a tie
    (free accuracy), so routing every easy prompt passed although 20% of them are wrong."""
    from cascade.routing.choose import choose_route_setting

    t, hard, wrong_easy = _routing_table()
    u = _unlabel(t, wrong_easy)  # nobody graded exactly the cases where routing loses
    scores = np.stack([np.where(hard, 0.05, 0.95), np.full(t.n, 0.99)], axis=1)
    truth = choose_route_setting(t, scores, max_accuracy_drop=0.01)
    assert not truth.on  # with the grades known, routing easy prompts loses ~10 points
    got = choose_route_setting(u, scores, max_accuracy_drop=0.01)
    assert not got.on, got.report.get("with_router")
    # the without-router figure counts them too: it never reads a placeholder as a grade
    assert got.report["without_router"]["accuracy_change"] <= 0.0


def test_the_router_is_fitted_on_labelled_cases_only() -> None:
    """Placeholders (False for every rung) were fitted as grades: P(right) fell on every
    prompt like the unlabelled ones."""
    from cascade.routing import fit_router

    t, _hard, _w = _routing_table(400)
    hidden = np.arange(t.n) % 2 == 0
    u = _unlabel(t, hidden)
    fitted = fit_router(u)
    assert fitted.model.trained_on == int((~hidden).sum())
    assert fitted.scores.shape == (t.n, 2)
    # the top rung is right on every labelled case: its P(right) must stay high everywhere
    assert float(fitted.scores[:, 1].min()) > 0.9


def test_tune_passes_a_zero_drop_to_the_router(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """``--max-accuracy-drop 0`` reached the router as 0.01 (``0 or 0.01``): the router was
    guarded at a looser promise than the user asked for."""
    import cascade.routing as routing

    seen: list[float] = []
    real = routing.tune_router

    def spy(*a: Any, **kw: Any) -> Any:
        seen.append(kw["max_accuracy_drop"])
        return real(*a, **kw)

    monkeypatch.setattr(routing, "tune_router", spy)
    t, _gold = _letters(300, 3)
    f = _shared(tmp_path, t, np.zeros(t.n, dtype=bool))
    assert main(["tune", str(f), "--max-accuracy-drop", "0", "--out",
                 str(tmp_path / "T.toml")]) == 0
    assert seen == [0.0]


# ---------------------------------------------------------------- eval replays the tuner


def test_eval_replays_the_tuners_cost_on_a_suite_with_unlabelled_cases(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The tuner reports accuracy on the labelled cases and cost on every case (cost needs no
    grade); ``cascade eval`` dropped the unlabelled cases from the cost too, so TUNED.toml did
    not replay the cost ``cascade tune`` printed."""
    t, _gold = _letters(1500, 3)
    rng = np.random.default_rng(4)
    t = replace(t, cost=np.stack([0.05 + 0.05 * rng.random(t.n), 1.0 + rng.random(t.n)], 1))
    hidden = np.arange(t.n) % 4 == 0
    hidden[t.cost[:, 1] > 1.8] = True  # many unlabelled cases are dear ones
    f = _shared(tmp_path, t, hidden)
    tuned = tmp_path / "TUNED.toml"
    assert main(["tune", str(f), "--out", str(tuned), "--json", "--router", "off"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["recommendation"]["kind"] == "cascade"
    assert main(["eval", str(f), "--config", str(tuned), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["accuracy"] == pytest.approx(rep["expected"]["accuracy"]["estimate"])
    assert ev["mean_cost_usd"] == pytest.approx(rep["expected"]["mean_cost_usd"]["estimate"])
    assert ev["unlabelled_skipped"] == int(hidden.sum())
    singles = {s["rung"]: s for s in ev["vs_single_rungs"]}
    assert singles["l"]["cost_saving"] == pytest.approx(
        rep["expected"]["cost_saving"]["estimate"])


# ---------------------------------------------------------------- the judge's cost


def test_a_judge_of_unknown_price_reports_its_cost_as_unknown_not_zero(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A judge rung with ``price = "unknown"`` was reported as costing $0.0000."""
    import cascade.providers as providers
    from tests.test_label import _judging

    t, gold = _letters(400, 3)
    judge = _judging({f"question {i}?": g for i, g in enumerate(gold)})
    monkeypatch.setattr(providers, "make_provider", judge.factory)
    cfg = tmp_path / "judge.toml"
    cfg.write_text('[[rungs]]\nmodel = "judge"\nprovider = "openai"\nprice = "unknown"\n')
    f = _shared(tmp_path, t, np.arange(t.n) >= 120)
    out = tmp_path / "NEEDS.jsonl"
    assert main(["label", str(f), "--judge", str(cfg), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert judge.calls and "cost unknown" in said and "$0.0000" not in said
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows and all(r["label_source"] == "judge" for r in rows)


# ---------------------------------------------------------------- the promise's numbers


@pytest.mark.parametrize("command", ["tune", "label"])
@pytest.mark.parametrize("flag, value", [
    ("--delta", "nan"), ("--delta", "0.7"), ("--delta", "5"), ("--delta", "0"),
    ("--max-accuracy-drop", "nan"), ("--max-accuracy-drop", "-0.01"),
    ("--max-accuracy-drop", "inf"),
])
def test_a_meaningless_promise_is_refused_not_silently_bent(
        tmp_path: Path, command: str, flag: str, value: str) -> None:
    """``--delta 5`` (or 0.7) was clamped to 0.5, a guard of zero standard errors: no margin at
    all; ``--delta nan`` and ``--max-accuracy-drop nan`` made every bound NaN, so nothing ever
    passed and the report blamed the suite."""
    t, _gold = _letters(300, 3)
    f = _shared(tmp_path, t, np.zeros(t.n, dtype=bool))
    out = tmp_path / ("T.toml" if command == "tune" else "N.jsonl")
    assert main([command, str(f), flag, value, "--out", str(out)]) == 2
    assert not out.exists()


def test_tune_says_which_labels_a_judge_gave(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Judge labels passed to ``cascade tune --labels`` were used as if people had given them:
    the report now counts them per judge model and a note says so."""
    t, _gold = _letters(400, 3)
    f = _shared(tmp_path, t, np.arange(t.n) >= 120)
    truth = {t.case_ids[i]: {r.label: bool(t.correct[i, j]) for j, r in enumerate(t.rungs)}
             for i in range(120, 130)}
    rows = [{"id": cid, "correct": c, "label_source": "judge", "judge_model": "big-judge"}
            for cid, c in list(truth.items())[:6]]
    rows += [{"id": cid, "correct": c} for cid, c in list(truth.items())[6:]]
    lab = _labels_file(tmp_path, rows)
    assert main(["tune", str(f), "--labels", str(lab), "--out", str(tmp_path / "T.toml"),
                 "--router", "off", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["labels_from_files"] == {"given": 4, "judge": {"big-judge": 6}}
    assert rep["labelled_cases"] == 130
    assert any("judge model" in n for n in rep["notes"])
