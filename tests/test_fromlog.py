"""``cascade suite from-log``: audit lines (written here by hand, in the audit log's shape) become
a recorded suite that load_cases, the replay provider and the tuner read."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from cascade.cli import main
from cascade.config import parse_config
from cascade.engine import Cascade
from cascade.errors import ConfigError
from cascade.providers.replay import ReplayProvider
from cascade.suite import RecordingStore, answer_call, load_cases, request_hash
from cascade.suite.fromlog import build_suite, parse_since

T0 = 1_764_000_000.0  # 2025-11-24T16:00:00Z
LADDER = {"rungs": [
    {"model": "small", "input_usd_per_mtok": 0.1, "output_usd_per_mtok": 0.4,
     "max_tokens": 64},
    {"model": "mid", "input_usd_per_mtok": 1.0, "output_usd_per_mtok": 2.0},
    {"model": "big", "input_usd_per_mtok": 5.0, "output_usd_per_mtok": 15.0},
]}


def _attempt(rung: int, model: str, text: str | None, status: str, *,
             score: float | None = None, cost: float = 0.001,
             verdicts: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    vs = verdicts if verdicts is not None else (
        [] if score is None else
        [{"passed": status == "accepted", "reason": f"confidence {score}", "score": score,
          "verifier": "confidence", "cost_usd": 0.0, "input_tokens": 0, "output_tokens": 0,
          "skipped": False}])
    return {"rung": rung, "model": model, "provider": "openai", "name": model, "endpoint": "",
            "status": status, "text": text, "verdicts": vs, "input_tokens": 12,
            "output_tokens": 3, "cost_usd": cost, "latency_ms": 40.0, "error": None,
            "error_type": None, "tries": 1, "finish_reason": "stop", "note": None,
            "started_at": 0.0}


def _answer(rid: str, ts: float, question: str, attempts: list[dict[str, Any]], *,
            cache_hit: bool = False, redacted: bool = False) -> dict[str, Any]:
    chosen = attempts[-1]
    answer = {"text": chosen["text"], "parsed": None, "model": chosen["model"],
              "verified": chosen["status"] == "accepted", "cost_usd": 0.0 if cache_hit else
              sum(a["cost_usd"] for a in attempts), "cache_hit": cache_hit, "latency_ms": 90.0,
              "input_tokens": 0, "output_tokens": 0, "cache_key": None, "metadata": {},
              "request_id": rid, "warnings": [], "attempts": attempts}
    line: dict[str, Any] = {"type": "answer", "request_id": rid, "timestamp": ts,
                            "client": "acme", "ladder": "prod", "answer": answer,
                            "cost_usd": answer["cost_usd"], "latency_ms": 90.0}
    msgs = [{"role": "user", "content": question}]
    if redacted:
        line["messages_sha256"] = "sha256:" + "0" * 64
    else:
        line["messages"] = msgs
    return line


def _shadow(rid: str, ts: float, accepted: dict[str, Any], text: str,
            agreed: bool) -> dict[str, Any]:
    return {"type": "shadow", "request_id": rid, "timestamp": ts, "accepted": accepted,
            "shadow": {**_attempt(2, "big", text, "shadow", cost=0.02), "verdicts": [
                {"passed": agreed, "reason": "agreement", "score": None, "verifier": "shadow",
                 "cost_usd": 0.0, "input_tokens": 0, "output_tokens": 0, "skipped": False}]},
            "agreed": agreed}


def _feedback(rid: str, ts: float, correct: bool, expected: str | None = None
              ) -> dict[str, Any]:
    return {"type": "feedback", "request_id": rid, "timestamp": ts, "correct": correct,
            "expected": expected, "client": "acme"}


def _log() -> list[dict[str, Any]]:
    """A day of traffic over a three-rung ladder."""
    a_small = _attempt(0, "small", "Paris", "accepted", score=0.95)
    return [
        # r1: accepted at small, shadowed by big (agreeing)
        _answer("r1", T0, "Capital of France?", [a_small]),
        _shadow("r1", T0 + 1, a_small, "Paris", True),
        # r2: small rejected, mid rejected, big accepted
        _answer("r2", T0 + 10, "What is 17*23?", [
            _attempt(0, "small", "381", "rejected", score=0.3),
            _attempt(1, "mid", "389", "rejected", score=0.4),
            _attempt(2, "big", "391", "accepted", score=0.99)]),
        # r3: redacted
        _answer("r3", T0 + 20, "secret question", [a_small], redacted=True),
        # r4: the same prompt as r1, later, small answered differently (the freshest wins)
        _answer("r4", T0 + 30, "Capital of France?",
                [_attempt(0, "small", "paris.", "accepted", score=0.9)]),
        # r5: a cache hit of r2's prompt: its carried trace must not replace r2's fresh one
        _answer("r5", T0 + 40, "What is 17*23?", [
            _attempt(0, "small", "STALE", "rejected", score=0.1),
            _attempt(2, "big", "STALE", "accepted", score=0.99)], cache_hit=True),
        # r6: a cache hit whose original climb is not in the log: its trace is all there is
        _answer("r6", T0 + 50, "Largest planet?", [
            _attempt(0, "small", "Jupiter", "accepted", score=0.97)], cache_hit=True),
        # r7: a wrong answer reported without the right one
        _answer("r7", T0 + 60, "Author of Hamlet?",
                [_attempt(0, "small", "Marlowe", "accepted", score=0.92)]),
        _feedback("r1", T0 + 100, True, "Paris"),
        _feedback("r2", T0 + 110, True),  # the answer r2 got (391) is the label
        _feedback("r7", T0 + 120, False),
        _feedback("nope", T0 + 130, True, "x"),  # unknown request
    ]


def _write(path: Path, lines: list[dict[str, Any]], tail: str = "") -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + tail, encoding="utf-8")
    return path


def _by_question(cases_dir: Path) -> dict[str, Any]:
    return {c.messages[-1].content: c for c in load_cases(cases_dir)}


def test_from_log_builds_cases_recordings_and_labels(tmp_path: Path) -> None:
    log = _write(tmp_path / "audit.jsonl", _log(), tail='{"type": "answer", "request_')
    out = io.StringIO()
    err = io.StringIO()
    assert main(["suite", "from-log", str(log), "--out", str(tmp_path / "s"), "--json"],
                out=out, err=err) == 0
    stats = json.loads(out.getvalue())
    assert stats["redacted"] == 1 and stats["bad_lines"] == 1  # the line cut short
    assert stats["cache_hits"] == 2 and stats["cache_hit_traces_used"] == 1
    assert stats["feedback_unmatched"] == 1 and stats["shadows"] == 1
    cases = _by_question(tmp_path / "s")
    assert set(cases) == {"Capital of France?", "What is 17*23?", "Largest planet?",
                          "Author of Hamlet?"}
    france = cases["Capital of France?"]
    assert france.expected == "Paris" and france.metadata["requests"] == 2
    assert france.metadata["request_ids"] == ["r1", "r4"]
    assert cases["What is 17*23?"].expected == "391"  # correct=true: the answer it got
    hamlet = cases["Author of Hamlet?"]
    assert hamlet.expected is None and hamlet.metadata["wrong_answers"] == ["Marlowe"]
    raw = (tmp_path / "s" / "cases.jsonl").read_text()
    assert '"expected"' in raw and raw.count('"expected"') == 2  # an unlabelled case has none

    store = RecordingStore.for_suite(tmp_path / "s")
    cfg = parse_config(LADDER, source="<test>")
    small, mid, big = cfg.rungs

    def text(rung: Any, q: str) -> str | None:
        rec = store.get(answer_call(rung, cases[q].messages))
        return None if rec is None else rec.text

    assert text(small, "Capital of France?") == "paris."  # the freshest climb
    assert text(big, "Capital of France?") == "Paris"  # the shadow's answer
    assert text(mid, "Capital of France?") is None  # the climb never got there
    assert [text(r, "What is 17*23?") for r in (small, mid, big)] == ["381", "389", "391"]
    assert text(small, "Largest planet?") == "Jupiter"
    rec = store.get(answer_call(small, cases["What is 17*23?"].messages))
    assert rec is not None and rec.case_id == cases["What is 17*23?"].id
    assert [(v.verifier, v.score) for v in rec.verdicts] == [("confidence", 0.3)]
    shadow = store.get(answer_call(big, cases["Capital of France?"].messages))
    assert shadow is not None and shadow.verdicts == ()  # the shadow's agreement is not big's


def test_with_config_recordings_get_the_exact_call_keys(tmp_path: Path) -> None:
    log = _write(tmp_path / "audit.jsonl", _log())
    ladder = tmp_path / "ladder.toml"
    ladder.write_text("\n".join(
        f'[[rungs]]\nmodel = "{r["model"]}"\nmax_tokens = {r.get("max_tokens", 512)}\n'
        'price = "unknown"\n'
        for r in LADDER["rungs"]))
    assert main(["suite", "from-log", str(log), "--out", str(tmp_path / "s"), "--config",
                 str(ladder)], out=io.StringIO(), err=io.StringIO()) == 0
    cfg = parse_config(LADDER, source="<test>")
    cases = _by_question(tmp_path / "s")
    keys = {json.loads(line)["key"]
            for line in (tmp_path / "s" / "recordings.jsonl").read_text().splitlines()}
    assert request_hash(answer_call(cfg.rungs[0], cases["What is 17*23?"].messages)) in keys


def test_the_replay_provider_serves_the_logged_answers(tmp_path: Path) -> None:
    log = _write(tmp_path / "audit.jsonl", _log())
    assert main(["suite", "from-log", str(log), "--out", str(tmp_path / "s")],
                out=io.StringIO(), err=io.StringIO()) == 0
    cfg = parse_config({"rungs": [{**r, "provider": "replay", "base_url": str(tmp_path / "s")}
                                  for r in LADDER["rungs"]]}, source="<test>")
    replay = ReplayProvider(RecordingStore.for_suite(tmp_path / "s"))
    with Cascade(cfg, provider_factory=lambda rung: replay) as c:
        ans = c.answer("What is 17*23?", cache=False)
    assert [a.text for a in ans.attempts] == ["381"]  # no verifiers: small's answer stands


def test_since_accepts_iso_and_unix_time(tmp_path: Path) -> None:
    log = _write(tmp_path / "audit.jsonl", _log())
    iso = "2025-11-24T16:00:45Z"  # T0 + 45
    assert parse_since(iso) == T0 + 45 == parse_since(str(T0 + 45))
    assert parse_since("2025-11-24") == T0 - 16 * 3600  # a date is midnight UTC
    for since in (iso, str(int(T0 + 45))):
        s = build_suite([log], since=parse_since(since))
        assert [c["messages"][0]["content"] for c in s.cases] == ["Largest planet?",
                                                                  "Author of Hamlet?"]
        assert s.stats.before_since == 5
        # r1's feedback came after --since but its request did not: not a label here
        assert s.stats.feedback_unmatched == 3
    err = io.StringIO()
    assert main(["suite", "from-log", str(log), "--out", str(tmp_path / "x"), "--since",
                 "yesterday"], out=io.StringIO(), err=err) == 2
    assert "--since 'yesterday'" in err.getvalue()


def test_sample_keeps_n_prompts_deterministically(tmp_path: Path) -> None:
    lines = [_answer(f"q{i}", T0 + i, f"question {i}?",
                     [_attempt(0, "small", str(i), "accepted", score=0.9)]) for i in range(40)]
    log = _write(tmp_path / "audit.jsonl", lines + lines[:5])  # 5 prompts asked twice
    def ids(seed: int) -> list[str]:
        return [c["id"] for c in build_suite([log], sample=10, seed=seed).cases]

    assert len(ids(0)) == 10 and ids(0) == ids(0)
    assert ids(0) != ids(1)
    assert len(build_suite([log]).cases) == 40
    assert len(build_suite([log], sample=100).cases) == 40
    with pytest.raises(ConfigError, match="--sample"):
        build_suite([log], sample=0)


def test_no_key_from_the_environment_reaches_the_suite(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    key = "sk-live-abcdef0123456789"
    odd = 'pw"with\\quotes-9876543210'
    monkeypatch.setenv("OPENAI_API_KEY", key)
    monkeypatch.setenv("LADDER_CRED", odd)  # not named like a key: the config names it
    line = _answer("k1", T0, f"my key is {key}, and {odd}",
                   [_attempt(0, "small", f"you said {key}", "accepted", score=0.9)])
    line["headers"] = {"authorization": f"Bearer {key}"}
    line["client"] = key
    fb = _feedback("k1", T0 + 1, True, f"{key}!")
    log = _write(tmp_path / "audit.jsonl", [line, fb])
    ladder = tmp_path / "ladder.toml"
    ladder.write_text('[[rungs]]\nmodel = "small"\nprovider = "openai-compatible"\n'
                      'base_url = "http://127.0.0.1:9/v1"\napi_key_env = "LADDER_CRED"\n'
                      'price = "unknown"\n')
    err = io.StringIO()
    assert main(["suite", "from-log", str(log), "--out", str(tmp_path / "s"), "--config",
                 str(ladder)], out=io.StringIO(), err=err) == 0
    assert "cut 7 occurrence" in err.getvalue()  # 6 of the key, 1 of the other
    for f in (tmp_path / "s").iterdir():
        text = f.read_text()
        for secret in (key, odd, json.dumps(odd)[1:-1]):
            assert secret not in text, f.name
    [case] = load_cases(tmp_path / "s")
    assert case.messages[0].content == "my key is [redacted], and [redacted]"
    assert "acme" not in (tmp_path / "s" / "cases.jsonl").read_text()


def test_an_existing_suite_is_kept_without_force(tmp_path: Path) -> None:
    log = _write(tmp_path / "audit.jsonl", _log())
    out = tmp_path / "s"
    assert main(["suite", "from-log", str(log), "--out", str(out)], out=io.StringIO(),
                err=io.StringIO()) == 0
    (out / "cases.jsonl").write_text("labelled by hand\n")
    err = io.StringIO()
    assert main(["suite", "from-log", str(log), "--out", str(out)], out=io.StringIO(),
                err=err) == 2
    assert "--force" in err.getvalue()
    assert (out / "cases.jsonl").read_text() == "labelled by hand\n"
    assert main(["suite", "from-log", str(log), "--out", str(out), "--force"],
                out=io.StringIO(), err=io.StringIO()) == 0
    assert len(load_cases(out)) == 4


def test_a_log_of_only_redacted_lines_is_a_clear_error(tmp_path: Path) -> None:
    log = _write(tmp_path / "audit.jsonl", [
        _answer("r", T0, "q", [_attempt(0, "small", "a", "accepted")], redacted=True)])
    with pytest.raises(ConfigError, match="1 redacted"):
        build_suite([log])
    with pytest.raises(ConfigError, match="cannot read"):
        build_suite([tmp_path / "missing.jsonl"])


def _h4_shape(line: dict[str, Any]) -> dict[str, Any]:
    """The same line as ``cascade.audit`` in the serve branch writes it: ISO timestamps, the
    trace under ``trace`` and the answer's text under ``answer``."""
    out = {**line, "timestamp": datetime.fromtimestamp(line["timestamp"], UTC).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")}
    if line["type"] == "answer":
        out.update(trace=line["answer"], answer=line["answer"]["text"], verified=True,
                   error=None)
    return out


def test_the_serve_branch_line_shape_reads_the_same(tmp_path: Path) -> None:
    brief = build_suite([_write(tmp_path / "a.jsonl", _log())])
    other = build_suite([_write(tmp_path / "b.jsonl", [_h4_shape(x) for x in _log()])])
    assert other.cases == brief.cases
    assert [r.to_dict() for r in other.recordings] == [r.to_dict() for r in brief.recordings]
    assert other.stats == brief.stats


def test_the_command_reports_what_it_skipped(tmp_path: Path) -> None:
    log = _write(tmp_path / "audit.jsonl", _log())
    out, err = io.StringIO(), io.StringIO()
    assert main(["suite", "from-log", str(log), "--out", str(tmp_path / "s"), "-v"],
                out=out, err=err) == 0
    assert out.getvalue().startswith("4 cases (2 labelled) and 7 recordings from 7 logged")
    assert "skipped 1 redacted" in err.getvalue()
    assert "2 cases have no label: `cascade label" in err.getvalue()


def test_feedback_from_another_client_than_the_requests_is_not_a_label(tmp_path: Path) -> None:
    """``POST /v1/feedback`` takes any request id (a worker cannot know another's requests),
    so a client that learned another's id could label its traffic. The audit lines name both
    clients: feedback from another one than the request's is counted and not used."""
    lines = [_answer("r1", T0, "Capital of France?", [_attempt(0, "small", "Paris", "accepted")]),
             {**_feedback("r1", T0 + 5, False, "Lyon"), "client": "mallory"},
             _answer("r2", T0 + 10, "Largest planet?",
                     [_attempt(0, "small", "Jupiter", "accepted")]),
             _feedback("r2", T0 + 15, True),
             _answer("r3", T0 + 20, "Author of Hamlet?",
                     [_attempt(0, "small", "Shakespeare", "accepted")]),
             # the library's Cascade.feedback(request_id, correct) names no client
             {**_feedback("r3", T0 + 25, True), "client": None}]
    log = _write(tmp_path / "audit.jsonl", lines)
    out, err = io.StringIO(), io.StringIO()
    assert main(["suite", "from-log", str(log), "--out", str(tmp_path / "s")],
                out=out, err=err) == 0
    assert "skipped 1 feedback from another client than the request's" in err.getvalue()
    cases = _by_question(tmp_path / "s")
    assert cases["Capital of France?"].expected is None
    assert cases["Largest planet?"].expected == "Jupiter"
    assert cases["Author of Hamlet?"].expected == "Shakespeare"
