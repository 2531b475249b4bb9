"""Evaluation: replaying a config over recorded outcomes, and the CLI handlers."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from cascade.cli import eval as evaluate_mod
from cascade.cli import tune as tune_mod
from cascade.config import RungConfig, VerifierConfig, load_config, parse_config
from cascade.errors import ConfigError
from cascade.evaluate import evaluate
from cascade.suite import OutcomeTable, load_outcome_table
from tests.test_suite import _recorded_suite

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cascades"


FREE = {"price": "unknown"}  # these rungs bill nothing here: costs come from the table


def _table() -> OutcomeTable:
    correct = np.array([[1, 1, 1], [0, 1, 1], [1, 0, 0], [0, 0, 1]], dtype=bool)
    scores = np.array([[0.9, 0.9, 0.1], [0.3, 0.95, 0.2], [0.2, 0.1, 0.9], [0.7, 0.2, 0.3]])
    return OutcomeTable(
        case_ids=("a", "b", "c", "d"),
        rungs=(RungConfig(model="s"), RungConfig(model="m"), RungConfig(model="l")),
        correct=correct, cost=np.tile([1.0, 2.0, 4.0], (4, 1)),
        scores={"confidence": scores}, passed={}, groups=("",) * 4,
        verifiers=(VerifierConfig(name="confidence"),), source="hand",
    )


def test_evaluate_hand_computed() -> None:
    cfg = parse_config({
        "rungs": [{"model": "s", **FREE, "thresholds": {"confidence": 0.5}},
                  {"model": "m", **FREE, "thresholds": {"confidence": 0.8}},
                  {"model": "l", **FREE, "thresholds": {"confidence": 0.5}}],
        "verifiers": [{"name": "confidence"}]})
    rep = evaluate(_table(), cfg)
    # a: s accepts (right, $1); b: s rejects, m accepts (right, $3);
    # c: s, m reject, l returns (wrong, $7, verified 0.9>=0.5); d: s accepts 0.7 (wrong, $1)
    assert rep["cases"] == 4
    assert rep["accuracy"] == pytest.approx(0.5)
    assert rep["mean_cost_usd"] == pytest.approx((1 + 3 + 7 + 1) / 4)
    assert rep["verified_rate"] == pytest.approx(1.0)
    s, m, _l = rep["rungs"]
    assert (s["reached"], s["accepted"]) == (4, 2)
    assert s["escalation_rate"] == pytest.approx(0.5)
    assert s["precision"] == pytest.approx(0.5)  # a right, d wrong
    assert s["recall"] == pytest.approx(0.5)     # right at s: a, c; only a accepted
    assert s["rejected_right_rate"] == pytest.approx(0.5)
    assert (m["reached"], m["accepted"], m["precision"]) == (2, 1, 1.0)
    singles = {x["rung"]: x for x in rep["vs_single_rungs"]}
    assert singles["l"]["cost_saving"] == pytest.approx(1 - 3.0 / 4.0)
    assert singles["l"]["accuracy_change"] == pytest.approx(0.5 - 0.75)


def test_unknown_rung_and_missing_threshold_are_errors() -> None:
    with pytest.raises(ConfigError, match="was not recorded"):
        evaluate(_table(), parse_config({"rungs": [{"model": "xl", **FREE}]}))
    with pytest.raises(ConfigError, match="no threshold"):
        evaluate(_table(), parse_config({"rungs": [{"model": "s", **FREE}, {"model": "l", **FREE}],
                                         "verifiers": [{"name": "confidence"}]}))


def test_recorded_suite_without_thresholds_uses_recorded_verdicts(tmp_path: Path) -> None:
    suite = _recorded_suite(tmp_path)
    cfg = parse_config({"rungs": [{"model": "small", **FREE}, {"model": "big", **FREE}],
                        "verifiers": [{"name": "confidence"}]})
    rep = evaluate(load_outcome_table([suite], cfg), cfg)
    # small is right (and confident) on q0, q2; the rest climb to big, which is always right
    assert rep["accuracy"] == 1.0
    assert rep["rungs"][0]["accepted"] == 2
    assert rep["mean_cost_usd"] == pytest.approx((2 * 0.0015 + 2 * (0.0015 + 0.0105)) / 4)


def _ns(module: object, argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    module.add_arguments(p)  # type: ignore[attr-defined]
    return p.parse_args(argv)


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared recorded outcomes not found at {SHARED}")
def test_cli_tune_then_eval_on_shared_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                           ) -> None:
    data = str(SHARED / "mmlu_qwen_oai_train.jsonl")
    out = tmp_path / "TUNED.toml"
    assert tune_mod.run(_ns(tune_mod, [data, "--out", str(out), "--json"])) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["cases"] == 285 and rep["reference"]["rung"] == "qwen2.5-72b-instruct"
    assert rep["shift"]["available"]  # 57 subjects to hold out
    cfg = load_config(out)
    assert cfg.rungs[-1].model == "qwen2.5-72b-instruct"
    assert evaluate_mod.run(_ns(evaluate_mod, [data, "--config", str(out), "--json"])) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["cases"] == 285 and 0.0 <= ev["accuracy"] <= 1.0 and ev["mean_cost_usd"] > 0


def test_agreement_verifier_is_replayed_against_the_previous_rung_of_the_config() -> None:
    t = _table()
    agree = np.zeros((4, 3, 3), dtype=bool)
    agree[:, 0, 2] = agree[:, 2, 0] = [True, True, False, False]   # s and l
    agree[:, 1, 2] = agree[:, 2, 1] = [False, True, False, False]  # m and l
    t = replace(t, agreement={"choice": agree}, agreement_normaliser="choice")
    verifiers = [{"name": "confidence"},
                 {"name": "agreement", "id": "agree", "mode": "previous", "normaliser": "choice"}]
    # s never accepts (witness, threshold 1 is above any score here); l must agree with s, the rung
    # before it in this config (m is not in it), and s abstains-free: it has no predecessor
    cfg = parse_config({"rungs": [{"model": "s", **FREE, "thresholds": {"confidence": 1.0}},
                                  {"model": "l", **FREE, "verifiers": ["confidence", "agree"],
                                   "thresholds": {"confidence": 0.0}}],
                        "verifiers": verifiers})
    rep = evaluate(t, cfg)
    assert rep["verified_rate"] == pytest.approx(0.5)  # l agrees with s on a and b only
    cfg2 = parse_config({"rungs": [{"model": "s", **FREE, "verifiers": ["confidence", "agree"],
                                    "thresholds": {"confidence": 0.5}},
                                   {"model": "m", **FREE, "thresholds": {"confidence": 1.0}},
                                   {"model": "l", **FREE, "verifiers": ["agree"]}],
                         "verifiers": verifiers})
    rep2 = evaluate(t, cfg2)
    # at s the agreement verifier abstains: s accepts on confidence alone (a 0.9, d 0.7)
    assert rep2["rungs"][0]["accepted"] == 2
    # b and c climb to l, which agrees with m (not s) on b only: c is returned unverified
    assert rep2["verified_rate"] == pytest.approx(0.75)
    with pytest.raises(ConfigError, match="no 'numeric' agreement"):
        evaluate(t, parse_config({"rungs": [{"model": "s", **FREE}, {"model": "l", **FREE}],
                                  "verifiers": [{"name": "agreement", "normaliser": "numeric"}]}))


def test_a_verifier_the_suite_never_recorded_is_an_error_not_a_pass() -> None:
    """A tuned config with a verifier the recording lacks (refusal, say) replayed as if that
    verifier passed everything: an early rung then exited on cases the real ladder escalates."""
    cfg = parse_config({
        "rungs": [{"model": "s", **FREE, "thresholds": {"confidence": 0.5}},
                  {"model": "l", **FREE}],
        "verifiers": [{"name": "confidence"}, {"name": "refusal"}]})
    with pytest.raises(ConfigError, match="'refusal' of rung 's' was not recorded"):
        evaluate(_table(), cfg)


def test_the_text_report_of_a_suite_with_no_graded_case_says_so_not_nan() -> None:
    from cascade.evaluate import format_report

    t = _table()
    unlabelled = replace(t, labelled=np.zeros(t.n, dtype=bool))
    cfg = parse_config({"rungs": [{"model": "s", **FREE, "thresholds": {"confidence": 0.5}},
                                  {"model": "l", **FREE}],
                        "verifiers": [{"name": "confidence"}]})
    text = format_report(evaluate(unlabelled, cfg))
    assert "nan" not in text.lower() and "cases 0 graded of 4" in text
