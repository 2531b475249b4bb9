"""Review of the command line against what the README tells users to run: every flag the README
names exists, every config key the parsers accept is documented, files named on the command line
that cannot be read or written are a one-line error (exit 2, no traceback), and ``--json`` is
strict JSON on standard output."""

from __future__ import annotations

import argparse
import io
import json
import math
import re
import shutil
import tomllib
from pathlib import Path
from typing import Any

import pytest

from cascade.cli import COMMANDS, build_parser, main
from cascade.config import parse_config
from cascade.settings import (
    BreakerConfig,
    BudgetConfig,
    CacheConfig,
    PolicyConfig,
    RetryConfig,
    RungConfig,
)

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
SUITE = REPO / "fixtures" / "suite"
UNREADABLE = Path("/proc/self/mem")  # a regular file whose read fails (EIO), even for root


def _run(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(args, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def _strict_json(text: str) -> Any:
    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def _one_line_error(code: int, out: str, err: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    assert out == "", out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cascade: "), err


def _audit_log(tmp_path: Path) -> Path:
    from cascade import Cascade
    from cascade.testing import FunctionProvider, completion

    log = tmp_path / "audit.jsonl"
    with Cascade.from_dict(
        {"rungs": [{"model": "a", "price": "unknown"}], "verifiers": [{"name": "refusal"}],
         "cache": {"enabled": False}},
        provider_factory=FunctionProvider(lambda call: completion("Paris.", call)).factory,
        audit_log=log,
    ) as c:
        c.answer("capital of France?")
    return log


# ------------------------------------------------------------------ README against the parser


def _readme_commands() -> list[list[str]]:
    """Every ``cascade ...`` command line of the README's code blocks and inline code."""
    lines: list[str] = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", README, re.MULTILINE | re.DOTALL):
        joined = block.replace("\\\n", " ")
        lines += [ln.strip().removeprefix("$ ") for ln in joined.splitlines()]
    lines += re.findall(r"`(cascade [^`]+)`", README.replace("\n", " "))
    return [ln.split("#", 1)[0].split() for ln in lines if ln.startswith("cascade ")]


def _flags(command: str) -> set[str]:
    parser = build_parser([command])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sp = sub.choices[command]
    found = {o for a in sp._actions for o in a.option_strings}
    for a in sp._actions:  # `suite from-log` has a level of its own
        if isinstance(a, argparse._SubParsersAction):
            for p in a.choices.values():
                found |= {o for b in p._actions for o in b.option_strings}
    return found


def test_every_flag_the_readme_names_exists() -> None:
    commands = _readme_commands()
    assert len(commands) > 20
    for words in commands:
        if len(words) < 2 or words[1] not in COMMANDS:
            continue
        known = _flags(words[1])
        for w in words[2:]:
            flag = re.match(r"\[?(--[a-z][a-z-]*)", w)
            if flag:
                assert flag.group(1) in known, (words, flag.group(1))


def test_every_readme_toml_config_parses() -> None:
    base = {"rungs": [{"model": "m", "provider": "openai-compatible",
                       "base_url": "http://127.0.0.1:9/v1", "price": "unknown"}]}
    blocks = re.findall(r"^```toml\n(.*?)^```", README, re.MULTILINE | re.DOTALL)
    checked = 0
    for text in blocks:
        data = tomllib.loads(text)
        if "project" in data:  # a package's pyproject.toml, not a config
            continue
        cfg = parse_config(data if "rungs" in data else {**base, **data}, source="README")
        if cfg.store:
            from cascade.store.config import parse_store

            parse_store(cfg.store, source="README")
        checked += 1
    assert checked >= 4


def test_every_config_key_the_parsers_accept_is_in_the_readme() -> None:
    from cascade.routing.runtime import _KEYS as ROUTER_KEYS
    from cascade.serve.config import _CLIENT_KEYS, _SERVER_KEYS
    from cascade.store.config import _KEYS as STORE_KEYS

    tables: dict[str, set[str]] = {
        "rungs": set(RungConfig.__dataclass_fields__),
        "policy": set(PolicyConfig.__dataclass_fields__),
        "cache": set(CacheConfig.__dataclass_fields__),
        "retry": set(RetryConfig.__dataclass_fields__),
        "budget": set(BudgetConfig.__dataclass_fields__),
        "breaker": set(BreakerConfig.__dataclass_fields__),
        "store": set(STORE_KEYS),
        "server": set(_SERVER_KEYS) | set(_CLIENT_KEYS),
        "router": set(ROUTER_KEYS),
    }
    missing = {t: sorted(k for k in keys if not re.search(rf"\b{k}\b", README))
               for t, keys in tables.items()}
    assert not any(missing.values()), missing


def test_every_suite_grader_is_in_the_readme() -> None:
    from cascade.suite.grading import GRADERS

    para = README[README.index("Graders:"):README.index("(called with `(text, case)`)")]
    assert all(f"`{g}`" in para for g in GRADERS), (GRADERS, para)


def test_readme_exit_codes_say_what_record_returns() -> None:
    para = README[README.index("Exit codes: `0`"):]
    para = para[:para.index("\n\n")]
    assert "`cascade record`" in para and "cannot be read or written" in para, para


# ------------------------------------------------------------------ files that cannot be used


def test_output_paths_that_cannot_be_written_are_one_line_errors(tmp_path: Path) -> None:
    """`--out` naming a folder, or a path under a missing folder, used to end in a traceback
    with exit 1 after the work was done."""
    (tmp_path / "afile").write_text("x")
    log = _audit_log(tmp_path)
    cases = [
        ["label", str(SUITE), "--out", str(tmp_path)],
        ["label", str(SUITE), "--out", str(tmp_path / "missing" / "needs.jsonl")],
        ["suite", "from-log", str(log), "--out", str(tmp_path / "afile" / "suite")],
    ]
    for args in cases:
        code, out, err = _run(args)
        _one_line_error(code, out, err)
        assert str(tmp_path) in err, err


def test_tune_out_into_a_missing_folder_is_a_one_line_error(tmp_path: Path) -> None:
    code, out, err = _run(["tune", str(SUITE), "--router", "off",
                           "--out", str(tmp_path / "missing" / "TUNED.toml")])
    _one_line_error(code, out, err)
    assert "No such file or directory" in err and "missing" in err, err


@pytest.mark.skipif(not UNREADABLE.is_file(), reason="needs Linux /proc")
@pytest.mark.parametrize("args", [
    ["tune", str(UNREADABLE), "--out", "never.toml"],
    ["label", str(UNREADABLE), "--out", "never.jsonl"],
    ["eval", str(UNREADABLE), "--config", str(REPO / "fixtures" / "never.toml")],
    ["suite", "from-log", str(UNREADABLE), "--out", "never"],
], ids=["tune", "label", "eval", "from-log"])
def test_an_unreadable_input_file_is_a_one_line_error(args: list[str], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    if args[0] == "eval":  # a config that loads, so the suite is what fails
        cfg = tmp_path / "ladder.toml"
        cfg.write_text('[[rungs]]\nmodel = "m"\nprovider = "openai-compatible"\n'
                       'base_url = "http://127.0.0.1:9/v1"\nprice = "unknown"\n')
        args = [*args[:-1], str(cfg)]
    code, out, err = _run(args)
    _one_line_error(code, out, err)
    assert "Input/output error" in err, err
    assert not any(tmp_path.glob("never*"))


def test_a_closed_stdout_is_still_141_not_a_file_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """The OSError catch must leave BrokenPipeError to main's 141."""
    import cascade.cli.cache as cache_cli

    def broken(ns: argparse.Namespace) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cache_cli, "run", broken)
    code, _out, err = _run(["cache", "stats"])
    assert code == 141 and err == "", err


# ------------------------------------------------------------------ --json is JSON


def test_cache_clear_json_prints_json(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    assert _run(["cache", "stats", "--cache-dir", str(cache_dir)])[0] == 0
    code, out, err = _run(["cache", "clear", "--cache-dir", str(cache_dir), "--json"])
    assert code == 0, err
    assert _strict_json(out) == {"cleared": 0, "directory": str(cache_dir)}
    code, out, _err = _run(["cache", "clear", "--cache-dir", str(cache_dir)])
    assert code == 0 and out.startswith("cleared 0 entries from "), out


def test_eval_json_is_strict_json_when_no_case_is_graded(tmp_path: Path) -> None:
    """An unlabelled suite has no accuracy: the report said NaN, which no JSON reader takes."""
    suite = tmp_path / "unlabelled"
    suite.mkdir()
    shutil.copy(SUITE / "recordings.jsonl", suite / "recordings.jsonl")
    with (SUITE / "cases.jsonl").open(encoding="utf-8") as f, \
            (suite / "cases.jsonl").open("w", encoding="utf-8") as g:
        for line in f:
            if line.strip():
                case = json.loads(line)
                case.pop("expected", None)
                case.pop("grader", None)
                g.write(json.dumps(case) + "\n")
    from cascade.defaults import default_config
    from cascade.tuning import to_toml

    ladder = tmp_path / "ladder.toml"
    ladder.write_text(to_toml(default_config()), encoding="utf-8")
    code, out, err = _run(["eval", str(suite), "--config", str(ladder), "--json"])
    assert code == 0, err
    rep = _strict_json(out)
    assert rep["accuracy"] is None
    assert rep["verified_rate"] is not None and math.isfinite(rep["verified_rate"])


@pytest.mark.parametrize(("flag", "args"), [
    ("--port", ["serve", "--config", "x.toml", "--port", "99999"]),  # wrapped round to 34463
    ("--port", ["serve", "--config", "x.toml", "--port", "-1"]),
    ("--seed", ["tune", "--seed", "-1", "--out", "T.toml", "suite"]),  # a numpy traceback
    ("--seed", ["suite", "from-log", "audit.jsonl", "--out", "s", "--seed", "-3"]),
    ("--concurrency", ["record", "suite", "--concurrency", "0"]),  # quietly taken as 1
    ("--timeout", ["health", "--probe", "--timeout", "nan"]),
    ("--max-cost-usd", ["answer", "x", "--max-cost-usd", "-1"]),  # a config error, no flag
    ("--max-cost-usd", ["answer", "x", "--max-cost-usd", "inf"]),
    ("--timeout", ["answer", "x", "--timeout", "nan"]),
    ("--timeout", ["answer", "x", "--timeout", "0"]),
])
def test_numbers_out_of_range_are_usage_errors_naming_the_flag(flag: str, args: list[str]
                                                               ) -> None:
    code, _out, err = _run(args)
    assert code == 2 and f"argument {flag}" in err and "Traceback" not in err, err


def test_answer_json_prints_the_error_object_for_a_budget_refusal_too(tmp_path: Path) -> None:
    """``cascade answer --json`` printed an error object when no rung answered (exit 3) but
    nothing on stdout when the cap refused the request (exit 4): one shape for both now."""
    cfg = tmp_path / "cascade.toml"
    cfg.write_text('[[rungs]]\nmodel = "m"\nprovider = "openai-compatible"\n'
                   'base_url = "http://127.0.0.1:9/v1"\ninput_usd_per_mtok = 1000.0\n'
                   'output_usd_per_mtok = 1000.0\nmax_tokens = 512\n'
                   f'[cache]\ndirectory = "{tmp_path / "cache"}"\n')
    code, out, err = _run(["answer", "Capital of Australia?", "--config", str(cfg),
                           "--max-cost-usd", "0.000001", "--json"])
    assert code == 4, err
    doc = json.loads(out)
    assert doc["error_type"] == "BudgetExceeded" and "cap" in doc["error"].lower()


def test_label_checks_its_judge_config_even_when_nothing_needs_a_label(tmp_path: Path) -> None:
    """A missing --judge file went unnoticed (exit 0) whenever no case needed a label."""
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "cascades"
    src = shared / "mmlu_llama_train.jsonl"
    if not src.is_file():
        pytest.skip("needs ../shared/data/cascades")
    code, _out, err = _run(["label", str(src), "--judge", str(tmp_path / "missing.toml"),
                            "--out", str(tmp_path / "NEEDS.jsonl")])
    assert code == 2 and "missing.toml" in err, err


def _one_case_suite(tmp_path: Path) -> Path:
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "cases.jsonl").write_text('{"id": "q1", "messages": [{"role": "user", '
                                      '"content": "Capital of France?"}]}\n')
    return suite


@pytest.mark.parametrize("where", ["a folder", "under a file"])
def test_record_to_an_unwritable_out_is_a_usage_error_before_any_call(
        tmp_path: Path, where: str, openai_server: Any) -> None:
    """``record --out`` a folder (or a path under a file) made every call, paid, then died in
    an ExceptionGroup traceback (exit 1) at the first write."""
    cfg = tmp_path / "cascade.toml"
    cfg.write_text(f'[[rungs]]\nmodel = "m"\nprovider = "openai-compatible"\n'
                   f'base_url = "{openai_server.base_url}"\nprice = "unknown"\n')
    (tmp_path / "afile").write_text("x")
    out = tmp_path if where == "a folder" else tmp_path / "afile" / "rec.jsonl"
    code, _out, err = _run(["record", str(_one_case_suite(tmp_path)), "--config", str(cfg),
                            "--out", str(out), "--no-progress"])
    assert code == 2, err
    assert "Traceback" not in err and "ExceptionGroup" not in err
    assert str(out if where == "a folder" else out.parent) in err
    assert openai_server.requests == []


def test_record_with_a_bad_key_setting_is_one_config_error_not_a_traceback(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WALK_RECORD_KEY", "sk-abc\x01def")
    cfg = tmp_path / "cascade.toml"
    cfg.write_text('[[rungs]]\nmodel = "m"\nprovider = "openai-compatible"\n'
                   'base_url = "http://127.0.0.1:9/v1"\napi_key_env = "WALK_RECORD_KEY"\n'
                   'price = "unknown"\n')
    code, _out, err = _run(["record", str(_one_case_suite(tmp_path)), "--config", str(cfg),
                            "--out", str(tmp_path / "rec.jsonl"), "--no-progress"])
    assert code == 2, err  # a configuration error, not 1 ("some calls failed, re-run")
    assert "Traceback" not in err and "ExceptionGroup" not in err
    assert "WALK_RECORD_KEY" in err and "sk-abc" not in err


def test_a_verifier_added_after_recording_is_filled_in_not_read_as_rejecting(
        tmp_path: Path) -> None:
    """A verifier configured after the suite was recorded had no verdict, read as a rejection
    of every answer: tune said no rung was cheap enough, eval said 0% verified, and
    ``cascade record`` said everything was already there."""
    import anyio

    from cascade.errors import ConfigError
    from cascade.record import record
    from cascade.suite import RecordingStore, load_cases
    from cascade.suite.outcomes import table_from_recordings
    from cascade.testing import Script

    suite = _one_case_suite(tmp_path)
    cases = load_cases(suite)
    rung = {"model": "m", "provider": "openai-compatible", "base_url": "http://m/v1",
            "price": "unknown"}
    before = parse_config({"rungs": [rung], "verifiers": [{"name": "refusal"}]})
    after = parse_config({"rungs": [rung], "verifiers": [{"name": "refusal"},
                                                         {"name": "schema"}]})
    script = Script({"m": ['{"city": "Paris"}']})
    store = RecordingStore.for_suite(suite)
    anyio.run(lambda: record(cases, before, store, factory=script.factory, progress=False))
    assert script.count("m") == 1
    with pytest.raises(ConfigError, match=r"verifier 'schema'.*record"):
        table_from_recordings(cases, RecordingStore.for_suite(suite), after)
    counts = anyio.run(lambda: record(cases, after, RecordingStore.for_suite(suite),
                                      factory=script.factory, progress=False))
    assert counts["recorded"] == 1 and script.count("m") == 1  # no new model call
    table = table_from_recordings(cases, RecordingStore.for_suite(suite), after)
    assert bool(table.passed["schema"][0, 0]) and bool(table.passed["refusal"][0, 0])


def test_a_price_changed_after_recording_is_the_price_tune_and_eval_report(
        tmp_path: Path) -> None:
    """tune and eval priced each answer at the recorded cost while TUNED.toml carried the new
    prices: a saving of 82.7% reported, about -175% paid (the walk's measurement)."""
    import anyio

    from cascade.record import record
    from cascade.suite import RecordingStore, load_cases
    from cascade.suite.outcomes import table_from_recordings
    from cascade.testing import Script

    suite = _one_case_suite(tmp_path)
    cases = load_cases(suite)

    def ladder(price: float) -> Any:
        return parse_config({"rungs": [{"model": "m", "provider": "openai-compatible",
                                        "base_url": "http://m/v1", "input_usd_per_mtok": price,
                                        "output_usd_per_mtok": price}]})

    script = Script({"m": ["Paris"]})
    anyio.run(lambda: record(cases, ladder(1.0), RecordingStore.for_suite(suite),
                             factory=script.factory, progress=False))
    store = RecordingStore.for_suite(suite)
    [rec] = list(store)
    old = table_from_recordings(cases, store, ladder(1.0)).cost[0, 0]
    new = table_from_recordings(cases, store, ladder(50.0)).cost[0, 0]
    assert old == pytest.approx(rec.cost_usd) and old > 0
    assert new == pytest.approx(50 * old)


def test_a_suite_given_twice_is_refused_not_counted_twice(tmp_path: Path) -> None:
    """``cascade tune A B`` with B a copy of A took 400 cases for 200, shrank the guard's
    standard error and recommended a more aggressive setting."""
    from cascade.errors import ConfigError
    from cascade.suite.outcomes import load_outcome_table

    a = _one_case_suite(tmp_path)
    b = tmp_path / "copy"
    shutil.copytree(a, b)
    cfg = parse_config({"rungs": [{"model": "m", "provider": "openai-compatible",
                                   "base_url": "http://m/v1", "price": "unknown"}]})
    with pytest.raises(ConfigError, match="repeats"):
        load_outcome_table([a, b], cfg)


def test_a_suite_grader_beside_the_suite_is_found(tmp_path: Path) -> None:
    """The README's ``my_graders:shouty`` was importable only through PYTHONPATH: the suite's
    folder was never searched, as a config's is for its verifiers."""
    from cascade.suite import grade, load_cases

    suite = tmp_path / "graded"
    suite.mkdir()
    (suite / "walk26_graders.py").write_text(
        "import cascade\n\n\n@cascade.grader\ndef shouty(text, case):\n"
        "    return text.isupper()\n")
    (suite / "cases.jsonl").write_text(json.dumps({
        "id": "q1", "messages": [{"role": "user", "content": "shout"}], "expected": "x",
        "grader": "walk26_graders:shouty"}) + "\n")
    [case] = load_cases(suite)
    assert grade(case, "HELLO") and not grade(case, "hello")


@pytest.mark.parametrize("typo", ["expectd", "grade"])
def test_a_misspelt_case_key_is_refused_naming_file_and_line(tmp_path: Path,
                                                             typo: str) -> None:
    """``"expectd"`` silently left the case unlabelled and ``"grade"`` silently took the
    default grader."""
    from cascade.errors import ConfigError
    from cascade.suite import load_cases

    f = tmp_path / "cases.jsonl"
    f.write_text(json.dumps({"id": "q1", "messages": [{"role": "user", "content": "1+1?"}],
                             "expected": "2"}) + "\n" + json.dumps({
        "id": "q2", "messages": [{"role": "user", "content": "2+2?"}], typo: "4"}) + "\n")
    with pytest.raises(ConfigError) as ei:
        load_cases(f)
    assert ei.value.key == typo and f"{f}:2" in str(ei.value)


def test_tune_out_elsewhere_warns_when_a_verifier_beside_the_config_would_not_load(
        tmp_path: Path) -> None:
    """TUNED.toml written to another folder named a verifier module that sat beside the
    original config: replay passed, and the file failed to load where it was."""
    import anyio

    from cascade.config import load_config
    from cascade.record import record
    from cascade.suite import RecordingStore, load_cases
    from cascade.testing import Script

    here = tmp_path / "ladder"
    here.mkdir()
    (here / "walk26_checks.py").write_text(
        "import cascade\n\n\n@cascade.verifier\ndef says_paris(ctx):\n"
        "    return 'Paris' in ctx.candidate.text\n")
    cfg = here / "cascade.toml"
    cfg.write_text('[[rungs]]\nmodel = "m"\nprovider = "openai-compatible"\n'
                   'base_url = "http://m/v1"\nprice = "unknown"\n\n'
                   '[[verifiers]]\nname = "walk26_checks:says_paris"\n')
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "cases.jsonl").write_text("".join(json.dumps({
        "id": f"q{i}", "messages": [{"role": "user", "content": f"Capital of France ({i})?"}],
        "expected": "Paris"}) + "\n" for i in range(3)))
    script = Script({"m": ["Paris"]})
    anyio.run(lambda: record(load_cases(suite), load_config(cfg), RecordingStore.for_suite(suite),
                             factory=script.factory, progress=False))
    beside, away = here / "TUNED.toml", tmp_path / "elsewhere" / "TUNED.toml"
    away.parent.mkdir()
    code, _out, err = _run(["tune", str(suite), "--config", str(cfg), "--router", "off",
                            "--out", str(beside)])
    assert code == 0 and "warning" not in err, err
    code, _out, err = _run(["tune", str(suite), "--config", str(cfg), "--router", "off",
                            "--out", str(away)])
    assert code == 0 and "warning" in err and "walk26_checks:says_paris" in err, err


@pytest.mark.parametrize(("grader", "expected"), [("numeric", "forty"), ("choice", 12),
                                                  ("numeric", ["7", "seven"]),
                                                  ("choice", ["B", ["C"]])])
def test_an_expected_the_grader_can_never_match_is_refused(tmp_path: Path, grader: str,
                                                           expected: Any) -> None:
    """``"forty"`` under ``numeric`` graded every rung's answer wrong, silently."""
    from cascade.errors import ConfigError
    from cascade.suite import grade, load_cases

    f = tmp_path / "cases.jsonl"
    f.write_text(json.dumps({"id": "q1", "messages": [{"role": "user", "content": "?"}],
                             "expected": expected, "grader": grader}) + "\n")
    with pytest.raises(ConfigError) as ei:
        load_cases(f)
    assert ei.value.key == "expected" and f"{f}:1" in str(ei.value)
    ok = tmp_path / "ok.jsonl"  # what these graders read is still taken
    ok.write_text(json.dumps({"id": "n", "messages": [{"role": "user", "content": "?"}],
                              "expected": ["1,234", 42], "grader": "numeric"}) + "\n" +
                  json.dumps({"id": "c", "messages": [{"role": "user", "content": "?"}],
                              "expected": "(c)", "grader": "choice"}) + "\n")
    n, c = load_cases(ok)
    assert grade(n, "It is 1234.") and grade(c, "C")
