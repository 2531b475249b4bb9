"""Review of ``cascade label``, ``cascade tune`` and ``cascade eval`` on shared outcome files, as
a user walks them: bad bytes and missing ids are typed errors naming file and line, a failing
judge keeps the verdicts it gave, ``--max`` says how many were needed in all, contradicting or
foreign labels are said, ``--config`` takes the shared ladder JSON (and a TOML's rungs), and
``--out -`` means standard output (or is refused)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cascade.cli import main
from cascade.cli.label import apply_labels
from cascade.suite import load_shared_outcomes
from tests.loopback import (
    LoopbackServer,
    RecordedRequest,
    Reply,
    free_port,
    openai_error,
    openai_reply,
    reap,
)

ROOT = Path(__file__).resolve().parents[1]
LETTERS = "ABCD"
MODELS = ("s", "m", "l")
PRICES = {"s": 0.1, "m": 0.3, "l": 1.0}


def _run(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(args, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def _rows(n: int, seed: int, hidden_from: int) -> list[dict[str, Any]]:
    """Multiple-choice answers of three rungs (the cheap one right with probability = its
    confidence); the cases from ``hidden_from`` on are unlabelled."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        gold = LETTERS[int(rng.integers(0, 4))]
        outs = {}
        for j, model in enumerate(MODELS):
            conf = float(rng.random())
            right = bool(rng.random() < (conf if j == 0 else 0.75 if j == 1 else 0.88))
            text = gold if right else LETTERS[(LETTERS.index(gold) + 1 + (i + j) % 3) % 4]
            outs[model] = {"text": text, "correct": None if i >= hidden_from else right,
                           "confidence": conf, "confidence_source": "answer_logprob",
                           "cost_usd": [0.05, 0.2, 1.0][j] / 1000}
        rows.append({"id": f"q{i}", "messages": [{"role": "user", "content": f"question {i}?"}],
                     "gold": gold, "outcomes": outs})
    return rows


def _write(folder: Path, rows: list[dict[str, Any]], name: str = "mmlu_toy_train.jsonl"
           ) -> Path:
    (folder / "ladder-toy.json").write_text(json.dumps({"chain": "toy", "ladder": [
        {"model": m, "provider": "openai", "input_usd_per_mtok": p, "output_usd_per_mtok": p}
        for m, p in PRICES.items()]}))
    f = folder / name
    f.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "gold"}) + "\n"
                         for r in rows))
    return f


@pytest.fixture
def suite(tmp_path: Path) -> Path:
    return _write(tmp_path, _rows(500, 3, 150))


def _tuned(tmp_path: Path, suite: Path) -> Path:
    tuned = tmp_path / "TUNED.toml"
    assert main(["tune", str(suite), "--router", "off", "--out", str(tuned)],
                out=io.StringIO(), err=io.StringIO()) == 0
    return tuned


# ---------------------------------------------------------------- 1. bytes that are not UTF-8


@pytest.mark.parametrize("line", [1, 3])
@pytest.mark.parametrize("command", ["tune", "label", "eval"])
def test_a_byte_that_is_not_utf8_is_a_config_error_naming_file_and_line(
        tmp_path: Path, suite: Path, command: str, line: int) -> None:
    tuned = _tuned(tmp_path, suite) if command == "eval" else None
    lines = suite.read_bytes().splitlines(keepends=True)
    lines[line - 1] = lines[line - 1].replace(b"question", b"qu\xffestion", 1)
    suite.write_bytes(b"".join(lines))
    args = {"tune": ["tune", str(suite), "--out", str(tmp_path / "T.toml")],
            "label": ["label", str(suite), "--out", str(tmp_path / "N.jsonl")],
            "eval": ["eval", str(suite), "--config", str(tuned)]}[command]
    code, _out, err = _run(args)
    assert code == 2, err
    assert "configuration error" in err and str(suite) in err and f"line {line}" in err
    assert "UTF-8" in err and "Traceback" not in err


def test_a_recorded_suite_with_a_bad_byte_is_a_config_error(tmp_path: Path) -> None:
    f = tmp_path / "cases.jsonl"
    f.write_bytes(b'{"id": "a", "messages": [{"role": "user", "content": "hi"}]}\n'
                  b'{"id": "b", "messages": [{"role": "user", "content": "h\xe9"}]}\n')
    code, _out, err = _run(["label", str(f), "--out", str(tmp_path / "N.jsonl")])
    assert code == 2 and str(f) in err and "line 2" in err and "UTF-8" in err


def test_a_labels_file_with_a_bad_byte_is_a_config_error(tmp_path: Path, suite: Path) -> None:
    labels = tmp_path / "labels.jsonl"
    labels.write_bytes(b'{"id": "q200", "why": "\xff"}\n')
    code, _out, err = _run(["label", str(suite), "--labels", str(labels),
                            "--out", str(tmp_path / "N.jsonl")])
    assert code == 2 and str(labels) in err and "line 1" in err and "UTF-8" in err


def test_a_line_separator_inside_a_json_string_does_not_split_the_line(tmp_path: Path) -> None:
    """JSON allows U+2028 and U+0085 raw in a string (``ensure_ascii=False`` writes them so);
    ``str.splitlines`` broke the line there and the case read as invalid JSON."""
    rows = _rows(40, 2, 40)
    rows[0]["messages"][0]["content"] = "question 0?\u2028more\x85text"
    f = tmp_path / "mmlu_toy_train.jsonl"
    _write(tmp_path, rows)
    f.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "gold"},
                                    ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    table = load_shared_outcomes([f])
    assert table.n == 40 and table.prompts[0] == "question 0?\u2028more\x85text"


# ---------------------------------------------------------------- 2. a case without "id"


@pytest.mark.parametrize("command", ["tune", "label"])
def test_a_shared_case_without_id_names_file_line_and_field(tmp_path: Path, command: str
                                                            ) -> None:
    rows = _rows(50, 1, 50)
    del rows[1]["id"]
    f = _write(tmp_path, rows)
    code, _out, err = _run([command, str(f), "--out", str(tmp_path / "OUT")])
    assert code == 2, err
    assert str(f) in err and "line 2" in err and "'id'" in err and "KeyError" not in err


# ---------------------------------------------------------------- 3. a judge that fails


def _judge_toml(tmp_path: Path, base_url: str) -> Path:
    judge = tmp_path / "judge.toml"
    judge.write_text(f'[[rungs]]\nmodel = "judge"\nprovider = "openai-compatible"\n'
                     f'base_url = "{base_url}"\ninput_usd_per_mtok = 2.0\n'
                     'output_usd_per_mtok = 8.0\nmax_retries = 0\n')
    return judge


def test_a_judge_at_a_closed_port_writes_the_needs_and_names_the_endpoint(
        tmp_path: Path, suite: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    out = tmp_path / "NEEDS.jsonl"
    code, _stdout, err = _run(["label", str(suite), "--judge", str(_judge_toml(tmp_path, url)),
                               "--out", str(out)])
    assert code == 3, err  # the documented code for a failed provider, not 1 (unverified)
    assert "Traceback" not in err and "ExceptionGroup" not in err
    assert url in err and "TransportError" in err
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows and all("correct" not in r and r["id"] and r["why"] for r in rows)


def test_a_judge_failing_midway_keeps_the_verdicts_it_gave(tmp_path: Path, suite: Path,
                                                           openai_server: LoopbackServer
                                                           ) -> None:
    plain = tmp_path / "plain.jsonl"
    assert main(["label", str(suite), "--out", str(plain)], out=io.StringIO()) == 0
    needed = [json.loads(x)["id"] for x in plain.read_text().splitlines()]
    assert len(needed) >= 4
    failing = f"question {needed[-1][1:]}?"
    gold = {f"question {i}?": r["gold"] for i, r in enumerate(_rows(500, 3, 150))}

    def handle(req: RecordedRequest) -> Reply:
        body = req.json["messages"][-1]["content"]
        question = body.split("\n")[1]
        if question == failing:
            return openai_error(401, "invalid api key", type="authentication_error")
        answer = body.split("=" * 12)[1].strip()
        return openai_reply("yes" if answer == gold[question] else "no", model="judge",
                            prompt_tokens=50, completion_tokens=1)

    openai_server.script(handle)
    out = tmp_path / "NEEDS.jsonl"
    code, stdout, err = _run(["label", str(suite), "--judge",
                              str(_judge_toml(tmp_path, openai_server.base_url)),
                              "--out", str(out)])
    assert code == 3, err
    assert openai_server.base_url in err and "AuthenticationError" in err
    assert "Traceback" not in err
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert list(rows) == needed
    assert "correct" not in rows[needed[-1]]
    judged = [r for r in rows.values() if "correct" in r]
    assert judged and all(r["label_source"] == "judge" for r in judged)
    truth = {r["id"]: {m: o["correct"] for m, o in r["outcomes"].items()}
             for r in _rows(500, 3, 10**6)}
    assert all(r["correct"] == truth[r["id"]] for r in judged)
    assert f"judged by judge: {len(judged)} labelled" in stdout


def test_ctrl_c_while_judging_writes_the_verdicts_paid_for_and_exits_130(
        tmp_path: Path, suite: Path, openai_server: LoopbackServer) -> None:
    gold = {f"question {i}?": r["gold"] for i, r in enumerate(_rows(500, 3, 150))}
    proc: list[subprocess.Popen[bytes]] = []
    answered = [0]

    def handle(req: RecordedRequest) -> Reply:
        if answered[0] >= 20:  # then Ctrl-C, with the later calls in flight
            if answered[0] == 20:
                answered[0] += 1
                proc[0].send_signal(signal.SIGINT)
            return Reply(json=None, delay_s=30)
        answered[0] += 1
        body = req.json["messages"][-1]["content"]
        answer = body.split("=" * 12)[1].strip()
        return openai_reply("yes" if answer == gold[body.split("\n")[1]] else "no",
                            model="judge", prompt_tokens=50, completion_tokens=1)

    openai_server.script(handle)
    out = tmp_path / "NEEDS.jsonl"
    proc.append(subprocess.Popen(
        [sys.executable, "-m", "cascade.cli", "label", str(suite), "--judge",
         str(_judge_toml(tmp_path, openai_server.base_url)), "--out", str(out)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE))
    try:
        _stdout, err = (b.decode() for b in proc[0].communicate(timeout=25))
    finally:
        reap(proc[0], 5)
    assert proc[0].returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    judged = [r for r in rows if "correct" in r]
    assert 1 <= len(judged) <= 20 and len(rows) > len(judged)  # the rest, without a label
    truth = {r["id"]: {m: o["correct"] for m, o in r["outcomes"].items()}
             for r in _rows(500, 3, 10**6)}
    assert all(r["correct"] == truth[r["id"]] and r["label_source"] == "judge" for r in judged)


def test_a_label_run_that_fails_leaves_no_empty_needs_file(tmp_path: Path) -> None:
    rows = _rows(500, 3, 150)
    for r in rows:  # outcomes recorded without their texts: nothing a judge can grade
        for o in r["outcomes"].values():
            del o["text"]
    suite = _write(tmp_path, rows)
    out = tmp_path / "NEEDS.jsonl"
    code, _stdout, err = _run(["label", str(suite), "--judge",
                               str(_judge_toml(tmp_path, f"http://127.0.0.1:{free_port()}/v1")),
                               "--out", str(out)])
    assert code == 2 and "no answer texts to judge" in err, err  # not every rung "wrong"
    # an empty NEEDS.jsonl means "no label would change the decision": never left by a failure
    assert not out.exists()


def test_a_case_without_answer_texts_is_not_judged_all_wrong(tmp_path: Path) -> None:
    from cascade.config import parse_config
    from cascade.testing import Script
    from cascade.tuning.label import judge_labels, needed_labels

    rows = _rows(500, 3, 150)
    for r in rows[150:]:
        if int(r["id"][1:]) % 2:  # every second unlabelled case recorded without its texts
            for o in r["outcomes"].values():
                del o["text"]
    table = load_shared_outcomes([_write(tmp_path, rows)])
    needs = needed_labels(table)
    textless = {n.case_id for n in needs if all(t is None for t in table.answers[n.index])}
    assert textless and len(textless) < len(needs)
    judge = parse_config({"rungs": [{"model": "judge", "provider": "openai-compatible",
                                     "base_url": "http://127.0.0.1:9/v1",
                                     "price": "unknown"}]})
    script = Script({"judge": ["yes"]})
    res = judge_labels(table, needs, judge, provider_factory=script.factory)
    assert textless <= set(res.unjudged) and not textless & set(res.labels)
    assert res.labels and all(all(v.values()) for v in res.labels.values())  # the judge's "yes"


# ---------------------------------------------------------------- 4. --max in the summary


def test_max_says_how_many_are_needed_in_all_and_how_many_were_written(
        tmp_path: Path, suite: Path) -> None:
    out = tmp_path / "NEEDS.jsonl"
    code, all_out, _err = _run(["label", str(suite), "--out", str(out)])
    total = len(out.read_text().splitlines())
    assert code == 0 and total > 3
    assert all_out.startswith(f"{total} of 350 unlabelled cases need a label")
    for k in (0, 3):
        code, text, _err = _run(["label", str(suite), "--max", str(k), "--out", str(out)])
        lines = out.read_text().splitlines()
        assert code == 0 and len(lines) == k
        assert all(set(json.loads(x)) >= {"id", "why"} for x in lines)
        assert text.startswith(f"{total} of 350 unlabelled cases need a label")
        assert f"the first {k} written (--max {k})" in text


# ---------------------------------------------------------------- 5. labels files


def test_a_label_contradicting_the_suites_grade_applies_and_is_said(
        tmp_path: Path, suite: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = load_shared_outcomes([suite])
    flipped = {m: not bool(table.correct[0, j]) for j, m in enumerate(table.labels)}
    same = {m: bool(table.correct[1, j]) for j, m in enumerate(table.labels)}
    labels = tmp_path / "labels.jsonl"
    labels.write_text(json.dumps({"id": "q0", "correct": flipped}) + "\n"
                      + json.dumps({"id": "q1", "correct": same}) + "\n")
    got = apply_labels(table, [str(labels)])
    assert {m: bool(got.correct[0, j]) for j, m in enumerate(got.labels)} == flipped
    err = capsys.readouterr().err
    assert "1 label(s)" in err and "'q0'" in err and "contradict" in err


def test_a_labels_file_naming_no_case_of_the_suite_is_an_error(tmp_path: Path, suite: Path
                                                               ) -> None:
    labels = tmp_path / "other.jsonl"
    labels.write_text(json.dumps({"id": "elsewhere-1", "correct": {m: True for m in MODELS}})
                      + "\n")
    for command in ("tune", "label"):
        code, _out, err = _run([command, str(suite), "--labels", str(labels),
                                "--out", str(tmp_path / "OUT")])
        assert code == 2, err
        assert str(labels) in err and "elsewhere-1" in err
    labels.write_text(labels.read_text()
                      + json.dumps({"id": "q400", "correct": {m: True for m in MODELS}}) + "\n")
    code, _out, err = _run(["label", str(suite), "--labels", str(labels),
                            "--out", str(tmp_path / "OUT")])
    assert code == 0 and "1 label(s) name cases the suite does not hold" in err


# ---------------------------------------------------------------- 6. --config with shared files


def test_config_accepts_the_shared_ladder_json(tmp_path: Path, suite: Path) -> None:
    other = tmp_path / "prices"
    other.mkdir()
    ladder = other / "my-ladder.json"
    ladder.write_text(json.dumps({"ladder": [
        {"model": m, "provider": "openai", "input_usd_per_mtok": p * 7,
         "output_usd_per_mtok": p * 7} for m, p in PRICES.items()]}))
    code, _out, err = _run(["label", str(suite), "--config", str(ladder),
                            "--out", str(tmp_path / "N.jsonl")])
    assert code == 0, err
    tuned = tmp_path / "T.toml"
    code, _out, err = _run(["tune", str(suite), "--config", str(ladder), "--router", "off",
                            "--out", str(tuned)])
    assert code == 0, err
    rungs = tomllib.loads(tuned.read_text())["rungs"]
    assert {r["model"]: r["input_usd_per_mtok"] for r in rungs} == {
        r["model"]: PRICES[r["model"]] * 7 for r in rungs}  # this ladder's prices, not beside
    code, _out, err = _run(["eval", str(suite), "--config", str(tuned),
                            "--recorded-with", str(ladder)])
    assert code == 0, err
    bad = tmp_path / "bad.json"
    bad.write_text('{"ladder": [{"price": 1}]}')
    code, _out, err = _run(["tune", str(suite), "--config", str(bad),
                            "--out", str(tmp_path / "T2.toml")])
    assert code == 2 and str(bad) in err and "Traceback" not in err


def test_a_toml_config_with_shared_files_chooses_the_rungs(tmp_path: Path, suite: Path
                                                           ) -> None:
    two = tmp_path / "two.toml"
    two.write_text('[[rungs]]\nmodel = "s"\nprovider = "openai"\ninput_usd_per_mtok = 0.1\n'
                   'output_usd_per_mtok = 0.1\n\n'
                   '[[rungs]]\nmodel = "l"\nprovider = "openai"\ninput_usd_per_mtok = 1.0\n'
                   'output_usd_per_mtok = 1.0\n')
    tuned = tmp_path / "T.toml"
    code, out, err = _run(["tune", str(suite), "--config", str(two), "--router", "off",
                           "--json", "--out", str(tuned)])
    assert code == 0, err
    report = json.loads(out)
    assert {r["rung"] for r in report["single_rungs"]} == {"s", "l"}
    assert {r["model"] for r in tomllib.loads(tuned.read_text())["rungs"]} <= {"s", "l"}
    code, out, err = _run(["eval", str(suite), "--config", str(tuned), "--recorded-with",
                           str(two), "--json"])
    assert code == 0, err
    assert {r["rung"] for r in json.loads(out)["vs_single_rungs"]} == {"s", "l"}
    lacking = tmp_path / "lacking.toml"
    lacking.write_text(two.read_text().replace('model = "l"', 'model = "xl"'))
    code, _out, err = _run(["label", str(suite), "--config", str(lacking),
                            "--out", str(tmp_path / "N.jsonl")])
    assert code == 2 and "'xl'" in err and str(lacking) in err


# ---------------------------------------------------------------- 7. --out -


def test_out_dash_is_standard_output_for_label_and_refused_by_tune(
        tmp_path: Path, suite: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(["label", str(suite), "--max", "2", "--out", "-"])
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 2 and all(set(json.loads(x)) >= {"id", "why"} for x in lines)
    assert "need a label" in err
    code, _out, err = _run(["tune", str(suite), "--out", "-"])
    assert code == 2 and "--out -" in err
    assert not (tmp_path / "-").exists()


def test_judging_no_needs_is_an_empty_result_not_an_error(tmp_path: Path, suite: Path) -> None:
    from cascade.config import parse_config
    from cascade.testing import Script
    from cascade.tuning.label import judge_labels

    table = load_shared_outcomes([suite])
    judge = parse_config({"rungs": [{"model": "judge", "provider": "openai-compatible",
                                     "base_url": "http://127.0.0.1:9/v1",
                                     "price": "unknown"}]})
    script = Script({"judge": ["yes"]})
    res = judge_labels(table, [], judge, provider_factory=script.factory)
    assert res.labels == {} and res.calls == 0 and not script.calls


def test_record_cuts_the_configs_keys_from_the_call_errors_it_prints(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A provider plugin whose error quotes its key: the trace cut it, ``cascade record``'s
    stderr summary did not."""
    from cascade.config import RungConfig
    from cascade.errors import ServerError
    from cascade.providers import register_provider
    from cascade.providers.base import Completion, ModelCall, Provider

    key = "sk-record-walk-0123456789"
    monkeypatch.setenv("WALK_REC_KEY", key)

    class Quoting(Provider):
        name = "walk-quoting"

        def __init__(self, rung: RungConfig) -> None:
            self.rung = rung

        async def complete(self, call: ModelCall) -> Completion:
            raise ServerError(f"HTTP 503 from https://gen.example/v1?key={key}")

    register_provider("walk-quoting", Quoting)
    cfg = tmp_path / "cascade.toml"
    cfg.write_text('[[rungs]]\nmodel = "m"\nprovider = "walk-quoting"\n'
                   'api_key_env = "WALK_REC_KEY"\nprice = "unknown"\nmax_retries = 0\n')
    cases = tmp_path / "suite"
    cases.mkdir()
    (cases / "cases.jsonl").write_text(
        '{"id": "q1", "messages": [{"role": "user", "content": "hi"}]}\n')
    code, _out, err = _run(["record", str(cases), "--config", str(cfg), "--no-progress"])
    assert code == 1 and "HTTP 503" in err, err
    assert "record-walk" not in err


def test_the_accuracy_change_interval_is_of_the_estimate_it_stands_beside(
        tmp_path: Path) -> None:
    """With unlabelled cases the estimate was the net change over every case, its interval the
    labelled subset's accuracy difference (another, biased quantity): the estimate sat at the
    interval's edge (-2.3 pts in [-2.5, +0.5] on this file)."""
    from cascade.tuning import tune

    src = ROOT.parent / "shared" / "data" / "cascades" / "medmcqa_llama_train.jsonl"
    if not src.is_file():
        pytest.skip("needs ../shared/data/cascades")
    rows = [json.loads(x) for x in src.read_text().splitlines() if x.strip()]
    for i, r in enumerate(rows):
        if i % 3 == 0:  # a third recorded, not labelled
            for o in r["outcomes"].values():
                o["correct"] = None
    f = tmp_path / src.name
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = tune(load_shared_outcomes([f]), max_accuracy_drop=0.05, seed=0)
    assert "→" in res.report["recommendation"]["describe"]  # a cascade, not one rung
    change = res.report["expected"]["accuracy_change"]
    lo, hi = change["interval_90"]
    assert lo < change["estimate"] < hi
    assert abs((lo + hi) / 2 - change["estimate"]) < 0.25 * (hi - lo)


def test_a_labels_line_with_expected_instead_of_correct_is_refused(tmp_path: Path,
                                                                   suite: Path) -> None:
    """A person filling NEEDS.jsonl with ``"expected": "B"`` (a suite case's key) had the line
    skipped as "not labelled yet", silently."""
    labels = tmp_path / "NEEDS.jsonl"
    labels.write_text(json.dumps({"id": "q200", "expected": "B"}) + "\n")
    code, _out, err = _run(["tune", str(suite), "--labels", str(labels), "--router", "off",
                            "--out", str(tmp_path / "TUNED.toml")])
    assert code == 2 and "q200" in err and '"correct"' in err, err
