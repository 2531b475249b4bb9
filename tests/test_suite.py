"""Suites, graders, recordings and the outcome tables built from them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cascade.config import RungConfig, parse_config
from cascade.errors import ConfigError
from cascade.messages import Message
from cascade.providers.base import Completion, ModelCall, TokenLogprob
from cascade.suite import (
    Case,
    Recording,
    RecordingStore,
    answer_call,
    grade,
    is_shared_outcomes,
    load_cases,
    load_outcome_table,
    load_shared_outcomes,
    table_from_recordings,
)
from cascade.trace import Verdict

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data" / "cascades"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(),
                                  reason=f"shared recorded outcomes not found at {SHARED}")


FREE = {"price": "unknown"}  # recorded costs, not rung prices, are what counts here


def _case(grader: str, expected: object, cid: str = "c") -> Case:
    return Case(id=cid, messages=(Message("user", "q?"),), expected=expected, grader=grader)


@pytest.mark.parametrize(("grader", "expected", "text", "ok"), [
    ("numeric", 20, "so he buys 60 / 3 = 20 dolls.\n#### 20", True),
    ("numeric", 20, "#### 15", False),
    ("numeric", "1234.5", "It costs $1,234.50.", True),
    ("choice", "B", "The answer is (B).", True),
    ("choice", "B", "A", False),
    ("normalised", ["Pacific", "Pacific Ocean"], "The Pacific ocean.", True),
    ("normalised", "Paris", "Lyon", False),
    ("exact", "Au", " Au ", True),
    ("exact", "Au", "au", False),
])
def test_graders(grader: str, expected: object, text: str, ok: bool) -> None:
    assert grade(_case(grader, expected), text) is ok


def test_json_schema_grader() -> None:
    schema = {"type": "object", "required": ["x"], "properties": {"x": {"type": "number"}}}
    c = _case("json_schema", schema)
    assert grade(c, 'Here: ```json\n{"x": 3}\n```')
    assert not grade(c, '{"y": 3}')
    assert not grade(c, "no json at all")


def test_dotted_grader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mygrader.py").write_text(
        "import cascade\n\n@cascade.grader\n"
        "def shouty(text, case):\n    return text.isupper() and case.id == 'c'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert grade(_case("mygrader:shouty", None), "YES")
    assert not grade(_case("mygrader:shouty", None), "yes")
    with pytest.raises(ConfigError, match="cannot be imported"):
        grade(_case("mygrader:missing", None), "YES")


def test_load_cases_folder_skips_recordings_and_checks(tmp_path: Path) -> None:
    lines = [{"id": "a", "messages": [{"role": "user", "content": "2+2?"}], "expected": 4,
              "grader": "numeric", "tags": ["arith"]},
             {"id": "b", "messages": [{"role": "user", "content": "Capital of France?"}],
              "expected": "Paris"}]
    (tmp_path / "cases.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    (tmp_path / "recordings.jsonl").write_text('{"not": "a case"}\n')
    cases = load_cases(tmp_path)
    assert [c.id for c in cases] == ["a", "b"]
    assert cases[0].group == "arith" and cases[1].grader == "normalised"
    (tmp_path / "more.jsonl").write_text(json.dumps(lines[0]) + "\n")
    with pytest.raises(ConfigError, match="repeats"):
        load_cases(tmp_path)


@pytest.mark.parametrize(("obj", "match"), [
    ({"id": "x", "messages": [{"role": "user", "content": "q"}], "grader": "fuzzy"}, "grader"),
    ({"id": "x"}, "messages"),
    ({"id": "x", "messages": [{"role": "user", "content": "q"}], "grader": "json_schema",
      "expected": "not a schema"}, "schema"),
    ({"id": "x", "messages": [{"role": "robot", "content": "q"}]}, "role"),
])
def test_bad_cases_are_named(tmp_path: Path, obj: dict[str, object], match: str) -> None:
    f = tmp_path / "s.jsonl"
    f.write_text(json.dumps(obj) + "\n")
    with pytest.raises(ConfigError, match=match) as e:
        load_cases(f)
    assert "s.jsonl:1" in str(e.value)


def test_our_fixture_suite_loads_and_grades_its_own_answers() -> None:
    cases = load_cases(REPO / "fixtures" / "suite")
    assert 80 <= len(cases) <= 150  # the 51 earlier cases and 40 plain questions (#18)
    assert {c.grader for c in cases} >= {"numeric", "contains", "choice", "json_schema"}
    for c in cases:
        if c.grader in ("numeric", "contains", "choice"):
            exp = c.expected[0] if isinstance(c.expected, list) else c.expected
            assert grade(c, str(exp)), c.id
            assert grade(c, f"I think the answer is {exp}."), c.id


@pytest.mark.parametrize(("text", "ok"), [
    ("The capital of Australia is Canberra.", True),
    ("canberra", True),
    ("Canberrans live there.", False),  # whole words only
    ("Sydney", False),
])
def test_contains_grader(text: str, ok: bool) -> None:
    from cascade.suite import Case

    case = Case(id="c", messages=(Message("user", "Capital of Australia?"),),
                expected=["Canberra"], grader="contains")
    assert grade(case, text) is ok


def test_recording_store_round_trip(tmp_path: Path) -> None:
    rung = RungConfig(model="m1", logprobs=True)
    msgs = (Message("user", "2+2?"),)
    call = answer_call(rung, msgs)
    comp = Completion(text="4", model="m1", input_tokens=5, output_tokens=1,
                      logprobs=(TokenLogprob("4", -0.1, {"4": -0.1, "5": -3.0}),),
                      latency_ms=12.0, finish_reason="stop")
    store = RecordingStore(tmp_path / "recordings.jsonl")
    store.add(Recording.of(call, comp, case_id="a", kind="answer", cost_usd=1e-6,
                           verdicts=[Verdict(passed=True, reason="ok", score=0.9,
                                             verifier="confidence")]))
    again = RecordingStore.for_suite(tmp_path)
    rec = again.get(call)
    assert rec is not None and rec.text == "4" and rec.verdicts[0].score == 0.9
    assert rec.completion().logprobs == comp.logprobs
    assert again.case_for(msgs) == "a"
    # same model and messages but other sampling settings: the loose match still serves it
    assert again.get(ModelCall(model="m1", messages=msgs, max_tokens=7)) is not None
    assert again.get(ModelCall(model="m2", messages=msgs)) is None


def _recorded_suite(tmp_path: Path, *, skip: tuple[str, str] | None = None) -> Path:
    cases = [{"id": f"q{i}", "messages": [{"role": "user", "content": f"{i}+{i}?"}],
              "expected": 2 * i, "grader": "numeric", "tags": ["arith"]} for i in range(4)]
    (tmp_path / "cases.jsonl").write_text("\n".join(json.dumps(c) for c in cases) + "\n")
    cfg = parse_config({"rungs": [{"model": "small", **FREE}, {"model": "big", **FREE}],
                        "verifiers": [{"name": "confidence"}]})
    store = RecordingStore(tmp_path / "recordings.jsonl")
    for c in load_cases(tmp_path):
        i = int(c.id[1:])
        for rung in cfg.rungs:
            if skip == (c.id, rung.model):
                continue
            right = rung.model == "big" or i % 2 == 0
            text = str(2 * i) if right else "wrong"
            score = 0.9 if right else 0.2
            store.add(Recording.of(
                answer_call(rung, c.messages),
                Completion(text=text, model=rung.model, input_tokens=10, output_tokens=2),
                case_id=c.id, kind="answer", cost_usd=0.001 if rung.model == "small" else 0.01,
                verdicts=[Verdict(passed=score > 0.5, reason="", score=score,
                                  verifier="confidence", cost_usd=0.0005)]))
    return tmp_path


def test_table_from_recordings(tmp_path: Path) -> None:
    suite = _recorded_suite(tmp_path)
    cfg = parse_config({"rungs": [{"model": "small", **FREE}, {"model": "big", **FREE}],
                        "verifiers": [{"name": "confidence"}]})
    t = load_outcome_table([suite], cfg)
    assert t.n == 4 and t.labels == ("small", "big")
    assert t.correct[:, 0].tolist() == [True, False, True, False]
    assert t.correct[:, 1].all()
    assert t.scores["confidence"][:, 0].tolist() == [0.9, 0.2, 0.9, 0.2]
    assert np.allclose(t.cost[:, 0], 0.0015)  # answer plus the verifier's call
    assert t.own_passed["confidence"][:, 0].tolist() == [True, False, True, False]


def test_missing_recording_names_case_and_model(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    suite = _recorded_suite(tmp_path, skip=("q2", "big"))
    cfg = parse_config({"rungs": [{"model": "small", **FREE}, {"model": "big", **FREE}]})
    with pytest.raises(ConfigError, match=r"case 'q2' × model 'big'"):
        table_from_recordings(load_cases(suite), RecordingStore.for_suite(suite), cfg)
    # without a config, the ladder is the one `cascade record` would have used: the embedded one
    monkeypatch.delenv("CASCADE_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"model 'smollm2-135m"):
        load_outcome_table([suite])


@needs_shared
def test_shared_outcomes_loader() -> None:
    f = SHARED / "mmlu_qwen_oai_train.jsonl"
    assert is_shared_outcomes(f)
    t = load_shared_outcomes([f])
    assert t.n == 285 and len(t.rungs) == 4
    mc = t.cost.mean(axis=0)
    assert np.all(np.diff(mc) >= 0), "rungs must be ordered by mean cost"
    assert t.rungs[0].model == "gpt-4o-mini" and t.rungs[-1].model == "gpt-4o"
    assert t.rungs[1].provider == "openai-compatible" and t.rungs[1].base_url
    assert 0.7 < t.correct[:, 0].mean() < 0.76
    assert t.groups[0].startswith("mmlu/") and len(set(t.groups)) == 57
    assert t.verifiers[0].settings["source"] == "logprobs" and t.rungs[0].logprobs
    with pytest.raises(ConfigError, match="different ladders"):
        load_shared_outcomes([f, SHARED / "mmlu_llama_train.jsonl"])


def test_agreement_arrays_follow_the_agreement_verifier() -> None:
    from cascade.suite import agreement_arrays

    texts: list[list[str | None]] = [["The answer is (B).", "B", "C", None],
                                     ["#### 1,000", "so 1000.0000001", "999", "no number"]]
    a = agreement_arrays(texts)
    assert a["choice"][0, 0, 1] and not a["choice"][0, 0, 2] and not a["choice"][0, 0, 3]
    assert a["choice"][0, 1, 0]  # symmetric
    assert not a["choice"][0, 3, 3]  # no answer: agrees with nothing, itself included
    assert a["numeric"][1, 0, 1] and not a["numeric"][1, 0, 2]  # within 1e-6, not 999
    assert not a["numeric"][1, 3, 3]
    assert a["normalised"].shape == (2, 4, 4) and not a["normalised"][0, 0, 1]


@needs_shared
def test_shared_outcomes_carry_agreement() -> None:
    t = load_shared_outcomes([SHARED / "gsm8k_qwen_oai_train.jsonl"])
    assert t.agreement_normaliser == "numeric"
    ag = t.agrees(0, 3)
    assert ag is not None and 0.5 < ag.mean() < 1.0
    # answers that agree with the strongest rung are right more often than those that do not
    assert t.correct[ag, 0].mean() > t.correct[~ag, 0].mean()
    sub = t.take([5, 5, 7])
    assert sub.agreement["numeric"].shape == (3, 4, 4)


def test_replay_side_of_the_suite_package_needs_no_numpy() -> None:
    """The replay provider imports cases and recordings; the outcome table (numpy) loads only
    when one of its names is asked for."""
    import subprocess
    import sys

    code = ("import sys, cascade.suite, cascade.suite.recordings, cascade.providers.replay\n"
            "assert 'numpy' not in sys.modules, 'numpy was imported'\n"
            "from cascade.suite import OutcomeTable\n"
            "assert 'numpy' in sys.modules and OutcomeTable.__module__ == "
            "'cascade.suite.outcomes'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def _shared_file(tmp_path: Path, rows: list[dict[str, object]]) -> Path:
    """A tiny file of the shared outcomes format with its ladder beside it."""
    (tmp_path / "ladder-toy.json").write_text(json.dumps({"ladder": [
        {"model": "s", "input_usd_per_mtok": 0.1, "output_usd_per_mtok": 0.1},
        {"model": "l", "input_usd_per_mtok": 1.0, "output_usd_per_mtok": 1.0}]}))
    f = tmp_path / "mmlu_toy_train.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return f


def _row(i: int, s: str, big: str, correct: tuple[object, object]) -> dict[str, object]:
    return {"id": f"r{i}", "messages": [{"role": "system", "content": "Letters only."},
                                        {"role": "user", "content": f"question {i}?"}],
            "outcomes": {"s": {"text": s, "correct": correct[0], "confidence": 0.9,
                               "cost_usd": 0.001, "confidence_source": "answer_logprob"},
                         "l": {"text": big, "correct": correct[1], "confidence": 0.8,
                               "cost_usd": 0.01, "confidence_source": "answer_logprob"}}}


def test_shared_outcomes_without_labels_and_prompts(tmp_path: Path) -> None:
    """``"correct": null`` in every outcome of a case: recorded, not labelled. Prompts (the
    last user message) and answer texts ride along, in the table's rung order."""
    f = _shared_file(tmp_path, [_row(0, "A", "B", (False, True)), _row(1, "C", "C", (None, None))])
    t = load_shared_outcomes([f])
    assert t.labelled is not None and t.labelled.tolist() == [True, False]
    assert t.n_labelled == 1
    assert t.prompts == ("question 0?", "question 1?")
    assert t.answers == (("A", "B"), ("C", "C"))
    assert t.case_normalisers == ("choice", "choice")  # mmlu: letters
    assert t.take([1, 1]).labelled.tolist() == [False, False]  # type: ignore[union-attr]
    labelled = t.with_labels({"r1": {"s": True, "l": True}})
    assert labelled.labelled is None and labelled.correct[1].tolist() == [True, True]


def test_a_half_labelled_shared_case_is_an_error(tmp_path: Path) -> None:
    f = _shared_file(tmp_path, [_row(0, "A", "B", (None, True))])
    with pytest.raises(ConfigError, match="labels some outcomes and not others"):
        load_shared_outcomes([f])


def test_recorded_case_without_expected_is_unlabelled(tmp_path: Path) -> None:
    """A recorded-suite case without ``expected`` loads as unlabelled (no grade is invented),
    with its prompt; graded cases keep their grades."""
    suite = _recorded_suite(tmp_path)
    lines = (suite / "cases.jsonl").read_text().splitlines()
    first = json.loads(lines[1])
    del first["expected"]
    lines[1] = json.dumps(first)
    (suite / "cases.jsonl").write_text("\n".join(lines) + "\n")
    cfg = parse_config({"rungs": [{"model": "small", **FREE}, {"model": "big", **FREE}],
                        "verifiers": [{"name": "confidence"}]})
    t = load_outcome_table([suite], cfg)
    assert t.labelled is not None and t.labelled.tolist() == [True, False, True, True]
    assert t.correct[1].tolist() == [False, False]  # a placeholder, never a grade
    assert t.correct[3].tolist() == [False, True]
    assert t.prompts[1] == "1+1?"
    assert t.answers[1] == ("wrong", "2")


def test_a_shared_outcomes_file_of_any_name_loads_with_prices_unknown(tmp_path: Path) -> None:
    """Renamed, or without its ladder file: still the shared format (by content), its models
    rungs of unknown price ordered by recorded cost, and a tuned file that says so instead of
    a silent $0 price."""
    from cascade.config import load_config
    from cascade.suite import load_outcome_table
    from cascade.tuning.output import to_toml

    rows = [_row(i, "A", "A", (True, True)) for i in range(3)]
    f = tmp_path / "traffic-week-48.jsonl"
    f.write_text("".join(json.dumps({**r, "outcomes": dict(reversed(r["outcomes"].items()))})
                         + "\n" for r in rows))
    assert is_shared_outcomes(f)
    t = load_outcome_table([f])  # no --config: the file is its own ladder
    assert [r.model for r in t.rungs] == ["s", "l"]  # cheapest first, whatever the key order
    assert all(r.price == "unknown" for r in t.rungs)
    assert t.cost[:, 1].tolist() == [0.01] * 3
    cfg = parse_config({"rungs": [{"model": "l", "price": "unknown"}]})
    out = tmp_path / "TUNED.toml"
    out.write_text(to_toml(cfg))
    assert 'price = "unknown"' in out.read_text() and "usd_per_mtok" not in out.read_text()
    assert load_config(out).rungs[0].price == "unknown"
    (tmp_path / "notes.jsonl").write_text('{"id": "x"}\n')
    assert not is_shared_outcomes(tmp_path / "notes.jsonl")
