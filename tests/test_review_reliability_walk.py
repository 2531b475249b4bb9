"""The reliability layer as a user configures it, from a black-box walk of the README's
"Providers" and "Reliability": notes in the trace that must not overwrite each other, and the
module-level ``cascade.answer`` leaving nothing unclosed at exit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cascade import Cascade, parse_config
from tests.loopback import LoopbackServer, RecordedRequest, Reply, openai_reply
from tests.serve_kit import one_rung_toml

ROOT = Path(__file__).resolve().parent.parent


def test_a_kept_estimate_note_goes_beside_the_load_aware_choices_not_over_it(
        tmp_path: Path) -> None:
    """README: the trace's note says when the order of endpoints changed and why, and what a
    try that got no reply kept. With both in one attempt only the second was left."""

    def first(req: RecordedRequest) -> Reply:
        return openai_reply("A", model=req.json["model"])

    def late(req: RecordedRequest) -> Reply:
        return openai_reply("B late", model=req.json["model"], delay_s=2.0)

    with LoopbackServer("openai") as a, LoopbackServer("openai") as b:
        a.script(first)
        b.script(late)
        rung = {"model": "m", "provider": "openai-compatible", "base_url": a.base_url,
                "input_usd_per_mtok": 1.0, "output_usd_per_mtok": 2.0, "timeout_s": 0.5,
                "fallbacks": [{"base_url": b.base_url}]}
        cfg = parse_config({"rungs": [rung], "verifiers": [], "cache": {"enabled": False},
                            "retry": {"max_attempts": 1},
                            "budget": {"limit_usd": 5, "period_s": 86400}},
                           source=str(tmp_path / "cascade.toml"))
        with Cascade(cfg) as c:
            c.answer("warm A", cache=False)  # A has a latency, B none: B is tried first
            answer = c.answer("q", cache=False, metadata={"budget_key": "k"})
    [attempt] = answer.attempts
    assert attempt.text == "A" and b.requests  # B timed out, then A answered
    note = attempt.note or ""
    assert "sent without a reply" in note, note  # what the timed-out try kept
    assert note.startswith(f"load-aware: {b.base_url} first"), note  # and why the order changed


@pytest.mark.parametrize("how", ["env", "config"])
def test_the_module_level_answer_closes_its_connections_at_exit(
        tmp_path: Path, openai_server: LoopbackServer, how: str) -> None:
    """README's one-liner ``cascade.answer(...)`` in a script left aiohttp's sessions for the
    interpreter's exit: "Unclosed client session" on stderr of every such script."""
    openai_server.script(lambda req: openai_reply("Paris", model=req.json["model"]))
    cfg = one_rung_toml(tmp_path / "cascade.toml", openai_server.base_url)
    call = 'cascade.answer("hi").text' if how == "env" else (
        f'cascade.answer("hi", config={str(cfg)!r}).text')
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CASCADE_CONFIG": str(cfg)}
    done = subprocess.run([sys.executable, "-W", "default", "-c",
                           f"import cascade; print({call})"],
                          capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Paris"
    assert "Unclosed" not in done.stderr, done.stderr


_PASSWORD = "hunter2pass"


def _proxied(server: LoopbackServer) -> str:
    """``server``'s URL as behind a basic-auth proxy: credentials in the URL."""
    return server.base_url.replace("http://", f"http://proxyuser:{_PASSWORD}@")


def test_an_open_circuit_never_shows_a_proxys_password(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The circuit-open error named the endpoint by its raw ``base_url``: the password went
    into the trace, the audit line and the raised error (and the HTTP clients' log lines said
    it too); traces show endpoints masked everywhere else."""
    import json
    import logging

    from cascade import NoAnswerError
    from cascade import health as cascade_health

    def down(req: RecordedRequest) -> Reply:
        return Reply(status=503, json={"error": {"message": "down", "type": "server_error"}})

    audit = tmp_path / "audit.jsonl"
    caplog.set_level(logging.DEBUG)
    with LoopbackServer("openai") as s:
        s.script(down)
        cfg = parse_config({"rungs": [{"model": "m", "provider": "openai-compatible",
                                       "base_url": _proxied(s), "price": "unknown"}],
                            "verifiers": [], "cache": {"enabled": False},
                            "retry": {"max_attempts": 1},
                            "breaker": {"failure_threshold": 1, "cooldown_s": 30}},
                           source=str(tmp_path / "cascade.toml"))
        errors = []
        with Cascade(cfg, audit_log=audit) as c:
            for q in ("q1", "q2"):
                with pytest.raises(NoAnswerError) as ei:
                    c.answer(q, cache=False)
                errors.append(ei.value)
        health = cascade_health()
    assert "circuit open" in str(errors[1].answer.attempts[0].error)
    shown = [str(e) for e in errors] + [json.dumps(e.answer.to_dict()) for e in errors]
    shown += [audit.read_text(), json.dumps(health)]
    shown += [r.getMessage() for r in caplog.records]
    assert all(_PASSWORD not in text for text in shown)


@pytest.mark.parametrize("password", ["pw", "pa|ss", "p@ss", "p%40ss"])
def test_an_endpoint_key_carries_no_password_nor_anything_to_test_guesses_on(
        password: str) -> None:
    """The key is shown by ``/healthz`` without a client key. A digest of the real URL beside
    the masked one let anyone test password guesses offline; a password with ``|`` or ``@``
    was shown, whole or in part (and ``|`` split the key in five)."""
    from cascade.config import RungConfig

    a, b = (RungConfig(model="m", provider="openai-compatible",
                       base_url=f"http://{user}:{password}@127.0.0.1:9/v1")
            for user in ("ann", "bob"))
    assert a.endpoint == b.endpoint == "openai-compatible|http://***@127.0.0.1:9/v1|m"
    assert a.endpoint.count("|") == 2


def test_cascade_health_probe_never_prints_a_proxys_password(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    openai_server.script(lambda req: openai_reply("ok", model=req.json["model"]))
    cfg = one_rung_toml(tmp_path / "cascade.toml", _proxied(openai_server), model="m")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for args in (["health", "--probe"], ["health", "--probe", "--json"],
                 ["answer", "hi", "-v", "--no-cache"]):
        done = subprocess.run([sys.executable, "-m", "cascade.cli", *args, "--config", str(cfg)],
                              capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
        assert done.returncode == 0, (args, done.stderr)
        assert "127.0.0.1" in done.stdout + done.stderr  # it still says which endpoint
        assert _PASSWORD not in done.stdout + done.stderr, args


def test_a_fallback_that_cannot_be_built_mid_failover_keeps_what_was_billed(
        tmp_path: Path, openai_server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The primary's 200 broke the protocol but was billed; its fallback's key variable holds
    a control character, a ConfigError raised as it is first built. That error ended the
    request: the next rung was never tried, and the budget kept $0 of the billed reply."""
    from cascade.budget import InMemoryBudgetStore
    from tests.loopback import openai_chat

    def handle(req: RecordedRequest) -> Reply:
        if req.json["model"] == "big":
            return openai_reply("Canberra", model="big", prompt_tokens=10, completion_tokens=2)
        body = openai_chat("x", prompt_tokens=1000, completion_tokens=500)
        body["choices"] = []  # no answer, still billed
        return Reply(json=body)

    monkeypatch.setenv("BROKEN_FALLBACK_KEY", "sk-with-a\x07bell")
    openai_server.script(handle)
    priced = {"provider": "openai-compatible", "base_url": openai_server.base_url,
              "input_usd_per_mtok": 1.0, "output_usd_per_mtok": 1.0, "max_retries": 0}
    cfg = {"rungs": [{**priced, "model": "small", "fallbacks": [
                          {"base_url": openai_server.base_url.replace("127.0.0.1", "localhost"),
                           "api_key_env": "BROKEN_FALLBACK_KEY"}]},
                     {**priced, "model": "big"}],
           "verifiers": [], "cache": {"enabled": False}, "budget": {"limit_usd": 1.0}}
    store = InMemoryBudgetStore()
    with Cascade.from_dict(cfg, budget_store=store) as c:
        answer = c.answer("Capital of Australia?")
    billed = (1000 + 500) / 1e6
    assert answer.text == "Canberra" and answer.model == "big"
    small = answer.attempts[0]
    assert small.status == "error" and "ConfigError" in (small.error or "")
    assert "bell" not in (small.error or "")
    assert small.cost_usd == pytest.approx(billed)
    assert answer.cost_usd == pytest.approx(billed + 12 / 1e6)
    assert store.spent("default", 86400.0) == pytest.approx(billed + 12 / 1e6)


def test_a_broken_fallback_ordered_first_by_latency_never_stops_the_rung(
        tmp_path: Path, openai_server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """An equivalent fallback is never timed (it cannot be built, so it never answers), so
    the load-aware order put it first once the rung had a latency: its ConfigError then ended
    every request, and the working rung was never called again."""
    monkeypatch.setenv("BROKEN_FALLBACK_KEY", "line1\nline2")
    openai_server.script(lambda req: openai_reply("ok", model=req.json["model"]))
    rung = {"model": "m", "provider": "openai-compatible", "base_url": openai_server.base_url,
            "price": "unknown", "max_retries": 0,
            "fallbacks": [{"base_url": openai_server.base_url.replace("127.0.0.1", "localhost"),
                           "api_key_env": "BROKEN_FALLBACK_KEY"}]}
    cfg = {"rungs": [rung], "verifiers": [], "cache": {"enabled": False}}
    with Cascade.from_dict(cfg) as c:
        answers = [c.answer(f"q{i}") for i in range(3)]
    assert [a.text for a in answers] == ["ok"] * 3
    assert all(a.attempts[0].endpoint == openai_server.base_url for a in answers)
    assert "ConfigError" in (answers[2].attempts[0].error or "")  # the fallback said why


def test_the_clis_credential_filter_never_raises_and_is_put_on_once() -> None:
    """A log call with a bad format raised at the call site (the filter formats it), and
    each in-process ``main`` put one more filter on the same handler."""
    import io
    import logging

    from cascade.cli import main
    from cascade.secrets import CredentialFilter

    for _ in range(3):  # gets past the logging set-up, then fails: no such suite
        assert main(["tune", "no-such-suite.jsonl", "--out", "never.toml"],
                    out=io.StringIO(), err=io.StringIO()) == 2
    root = logging.getLogger().handlers
    assert root and all(sum(isinstance(f, CredentialFilter) for f in h.filters) == 1
                        for h in root)
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "%s %s", ("one",), None)
    assert CredentialFilter().filter(record) is True


def test_a_rung_that_cannot_be_built_is_the_services_fault_named_by_its_key(
        tmp_path: Path) -> None:
    """A local rung whose model file is missing: every request was a 400 with param "model",
    counted as the client's bad request, and the CLI's error named neither the file nor the
    rung ("key 'model': model file not found")."""
    import httpx2 as httpx

    from cascade.errors import EndpointConfigError
    from cascade.serve import create_app
    from tests.serve_kit import serving

    missing = tmp_path / "missing.gguf"
    cfg = tmp_path / "cascade.toml"
    cfg.write_text(f'[[rungs]]\nprovider = "local"\nmodel = "{missing}"\n\n'
                   "[cache]\nenabled = false\n")
    with Cascade.from_file(cfg) as c, pytest.raises(EndpointConfigError) as ei:
        c.answer("hi")
    assert ei.value.key == "rungs[0].model" and ei.value.source == str(cfg)
    with serving(create_app(cfg)) as url:
        r = httpx.post(f"{url}/v1/chat/completions", json={
            "model": "cascade", "messages": [{"role": "user", "content": "hi"}]})
        metrics = httpx.get(f"{url}/metrics").text
    assert r.status_code == 500, r.text
    assert r.json()["error"]["code"] == "server_config_error"
    assert "rungs[0].model" in r.json()["error"]["message"]
    assert 'outcome="config_error"' in metrics and 'outcome="bad_request"' not in metrics
