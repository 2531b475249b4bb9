"""`cascade answer` end to end: a two-rung ladder on a loopback OpenAI-compatible server."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cascade.cli import main
from tests.loopback import LoopbackServer, RecordedRequest, Reply, openai_reply

SECRET = "sk-test-SECRET-value-123"


def _ladder(server: LoopbackServer, tmp_path: Path) -> Path:
    p = tmp_path / "cascade.toml"
    p.write_text(f'''
[[rungs]]
model = "small"
provider = "openai-compatible"
base_url = "{server.base_url}"
api_key_env = "LOOPBACK_KEY"
input_usd_per_mtok = 0.1
output_usd_per_mtok = 0.4

[[rungs]]
model = "big"
provider = "openai-compatible"
base_url = "{server.base_url}"
api_key_env = "LOOPBACK_KEY"
input_usd_per_mtok = 5
output_usd_per_mtok = 15

[[verifiers]]
name = "refusal"

[cache]
directory = "{tmp_path / 'cache'}"
''')
    return p


def _handler(req: RecordedRequest) -> Reply:
    if req.json["model"] == "small":
        return openai_reply("I'm sorry, but I can't help with that.", model="small",
                            prompt_tokens=20, completion_tokens=10)
    return openai_reply("Canberra is the capital of Australia.", model="big",
                        prompt_tokens=20, completion_tokens=7)


def _run(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(args, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_answer_climbs_shows_trace_and_repeats_from_cache(
    openai_server: LoopbackServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOOPBACK_KEY", SECRET)
    openai_server.script(_handler)
    cfg = _ladder(openai_server, tmp_path)
    code, out, err = _run(["answer", "What is the capital of Australia?", "--config", str(cfg),
                           "--json"])
    assert code == 0, err
    ans = json.loads(out)
    assert ans["text"] == "Canberra is the capital of Australia."
    assert ans["model"] == "big" and ans["verified"] and not ans["cache_hit"]
    small, big = ans["attempts"]
    assert small["model"] == "small" and small["status"] == "rejected"
    assert small["verdicts"][0]["verifier"] == "refusal" and not small["verdicts"][0]["passed"]
    assert (small["input_tokens"], small["output_tokens"]) == (20, 10)
    assert big["status"] == "accepted"
    expected = (20 * 0.1 + 10 * 0.4 + 20 * 5 + 7 * 15) / 1e6
    assert ans["cost_usd"] == pytest.approx(expected)
    for a in ans["attempts"]:
        assert set(a) >= {"model", "provider", "verdicts", "input_tokens", "output_tokens",
                          "cost_usd", "latency_ms", "error"}
    sent = openai_server.requests
    assert [r.json["model"] for r in sent] == ["small", "big"]
    assert sent[0].headers["authorization"] == f"Bearer {SECRET}"
    assert SECRET not in out and SECRET not in err

    code, out2, err2 = _run(["answer", "What is the capital of Australia?", "--config",
                             str(cfg)])
    assert code == 0
    assert out2.strip() == "Canberra is the capital of Australia."
    assert "cache hit" in err2 and "REJECTED" in err2 and "refusal" in err2
    assert len(openai_server.requests) == 2  # the repeat called no model
    cache_files = b"".join(p.read_bytes() for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert SECRET.encode() not in cache_files

    code, out3, _ = _run(["cache", "stats", "--config", str(cfg), "--json"])
    assert code == 0 and json.loads(out3)["entries"] == 1
    code, out4, _ = _run(["cache", "clear", "--config", str(cfg)])
    assert code == 0 and "cleared 1" in out4


def test_unverified_answer_exits_1(openai_server: LoopbackServer, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPBACK_KEY", SECRET)
    openai_server.script(lambda req: openai_reply("I cannot help with that request."))
    code, _out, err = _run(["answer", "q", "--config", str(_ladder(openai_server, tmp_path))])
    assert code == 1 and "NOT verified" in err


def test_bad_config_exits_2_with_the_key(tmp_path: Path) -> None:
    p = tmp_path / "cascade.toml"
    p.write_text("[[rungs]]\nmodel = 'm'\nprovider = 'azure'\n")
    code, _out, err = _run(["answer", "q", "--config", str(p)])
    assert code == 2 and "rungs[0].provider" in err and "allowed" in err
    assert "Traceback" not in err


def test_missing_api_key_names_the_variable(openai_server: LoopbackServer, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOOPBACK_KEY", raising=False)
    code, _out, err = _run(["answer", "q", "--config", str(_ladder(openai_server, tmp_path))])
    assert code == 3 and "LOOPBACK_KEY" in err
    assert openai_server.requests == []


def test_console_script_runs(openai_server: LoopbackServer, tmp_path: Path) -> None:
    openai_server.script(_handler)
    env = {**os.environ, "LOOPBACK_KEY": SECRET}
    proc = subprocess.run(
        [sys.executable, "-m", "cascade.cli", "answer", "Capital of Australia?", "--config",
         str(_ladder(openai_server, tmp_path))],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "Canberra is the capital of Australia."


def test_ctrl_c_stops_the_climb_at_once(openai_server: LoopbackServer, tmp_path: Path) -> None:
    import signal
    import time

    openai_server.script(lambda req: openai_reply("late", delay_s=20))
    env = {**os.environ, "LOOPBACK_KEY": SECRET}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cascade.cli", "answer", "q", "--config",
         str(_ladder(openai_server, tmp_path))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    deadline = time.monotonic() + 30
    while not openai_server.requests and time.monotonic() < deadline:
        time.sleep(0.05)
    assert openai_server.requests, "the request never reached the server"
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=15)
    assert proc.returncode == 130 and "interrupted" in err
    assert time.monotonic() - t0 < 5
    from cascade.cache import AnswerCache

    assert AnswerCache(tmp_path / "cache").stats()["entries"] == 0  # nothing half-stored


@pytest.mark.parametrize(("table", "key", "fragment"), [
    ('name = "confidence"\nsourc = "logprobs"', "verifiers[0].sourc", "allowed"),
    ('name = "confidance"', "verifiers[0].name", "known verifiers: agreement, confidence"),
])
def test_bad_verifier_settings_name_file_and_key(tmp_path: Path, table: str, key: str,
                                                 fragment: str) -> None:
    p = tmp_path / "cascade.toml"
    p.write_text('[[rungs]]\nmodel = "m"\nprice = "unknown"\n\n[[verifiers]]\n' + table + "\n")
    code, _out, err = _run(["answer", "q", "--config", str(p)])
    assert code == 2 and str(p) in err and f"key '{key}'" in err and fragment in err, err


def test_tune_shift_guard_writes_the_reference_alone(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """`cascade tune --shift-guard` on a shared-format file whose small group D the cheap rung
    gets confidently wrong: the cascade without the flag, the top rung alone with it."""
    import tomllib

    import numpy as np

    from tests.test_tune import _grouped

    t = _grouped(3, shifted=True)
    f = tmp_path / "traffic.jsonl"
    with f.open("w") as out:
        for i in range(t.n):
            out.write(json.dumps({
                "id": f"c{i}", "reference": {"subject": t.groups[i]},
                "messages": [{"role": "user", "content": f"question {i}"}],
                "outcomes": {m: {"text": "x", "correct": bool(t.correct[i, j]),
                                 "confidence": float(np.nan_to_num(t.scores["confidence"][i, j])),
                                 "confidence_source": "answer_logprob",
                                 "cost_usd": float(t.cost[i, j])}
                             for j, m in enumerate(("cheap", "top"))}}) + "\n")
    rungs = {}
    for flag in ([], ["--shift-guard"]):
        out_toml = tmp_path / f"tuned{len(flag)}.toml"
        assert main(["tune", str(f), "--router", "off", "--out", str(out_toml), *flag]) == 0
        rungs[bool(flag)] = [r["model"] for r in tomllib.loads(out_toml.read_text())["rungs"]]
    assert rungs[False] == ["cheap", "top"] and rungs[True] == ["top"]
    assert "shift guard refused the cascade" in capsys.readouterr().out
