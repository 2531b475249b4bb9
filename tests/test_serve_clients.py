"""Client keys, per-client budgets, caps and rate limits, the ``[server]`` table's errors, and
the audit log as the service writes it (one line per request, shadow and feedback; no key)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest

from cascade import ConfigError
from cascade.serve import create_app, parse_server
from tests.loopback import LoopbackServer
from tests.serve_kit import echo_handler, ladder, serving

MESSAGES: Any = [{"role": "user", "content": "What is the capital of France?"}]
KEY_A = "sk-client-a-0123456789abcdef"
KEY_B = "sk-client-b-fedcba9876543210"
RUNG_KEY = "sk-rung-secret-42424242"


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIENT_A_KEY", KEY_A)
    monkeypatch.setenv("CLIENT_B_KEY", KEY_B)


def _clients(**a: Any) -> list[dict[str, Any]]:
    return [{"name": "app-a", "key_env": "CLIENT_A_KEY", "budget_key": "team-a", **a},
            {"name": "app-b", "key_env": "CLIENT_B_KEY", "budget_key": "team-b"}]


def _post(url: str, key: str | None, **body: Any) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key is not None else {}
    return httpx.post(f"{url}/v1/chat/completions", headers=headers,
                      json={"model": "cascade", "messages": MESSAGES, **body})


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_keys_are_required_once_clients_are_configured(
        tmp_path: Path, openai_server: LoopbackServer, keys: None) -> None:
    openai_server.script(echo_handler(refuse=()))
    app = create_app(ladder(tmp_path, openai_server.base_url, server={"clients": _clients()}))
    with serving(app) as url:
        missing = _post(url, None)
        wrong = _post(url, KEY_A[:-1] + "x")
        basic = httpx.post(f"{url}/v1/chat/completions", auth=("u", KEY_A),
                           json={"model": "cascade", "messages": MESSAGES})
        models = httpx.get(f"{url}/v1/models")
        with openai.OpenAI(base_url=f"{url}/v1", api_key=KEY_B, max_retries=0) as sdk:
            ok = sdk.chat.completions.create(model="cascade", messages=MESSAGES)
        with pytest.raises(openai.AuthenticationError), openai.OpenAI(
                base_url=f"{url}/v1", api_key="sk-nope", max_retries=0) as nope:
            nope.models.list()
        health = httpx.get(f"{url}/healthz")
    for r in (missing, wrong, basic, models):
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert KEY_A not in r.text and KEY_A[:-1] not in r.text
    assert ok.choices[0].message.content == "small says: What is the capital of France?"
    assert health.status_code == 200
    assert len(openai_server.requests) == 1


def test_each_client_draws_on_its_own_budget_and_cap(
        tmp_path: Path, openai_server: LoopbackServer, keys: None) -> None:
    openai_server.script(echo_handler(refuse=()))
    clients = _clients()
    for c in clients:  # budget keys of this test only (the default budget store is global)
        c["budget_key"] += "-" + tmp_path.name
    # each call reserves ~1.03 m$ (full max_tokens of output) and spends 13 µ$: a 1.1 m$
    # budget admits a few calls, then refuses the client; the other client is unaffected
    cfg = ladder(tmp_path, openai_server.base_url, models=("small",),
                 server={"clients": clients}, budget={"limit_usd": 0.0011})
    with serving(create_app(cfg)) as url:
        codes: list[int] = []
        while 429 not in codes and len(codes) < 30:
            codes.append(_post(url, KEY_A).status_code)
        refused = _post(url, KEY_A)
        other = _post(url, KEY_B)
    assert codes[0] == 200 and codes[-1] == 429 and set(codes) == {200, 429}
    assert refused.json()["error"]["type"] == "budget_exceeded"
    assert other.status_code == 200
    cfg = ladder(tmp_path, openai_server.base_url, models=("small",),
                 server={"clients": _clients(max_cost_usd=1e-9)})
    with serving(create_app(cfg)) as url:
        capped = _post(url, KEY_A)
        free = _post(url, KEY_B)
    assert capped.status_code == 429 and capped.json()["error"]["type"] == "budget_exceeded"
    assert free.status_code == 200


def test_rate_limit_is_a_429_with_retry_after(
        tmp_path: Path, openai_server: LoopbackServer, keys: None) -> None:
    openai_server.script(echo_handler(refuse=()))
    cfg = ladder(tmp_path, openai_server.base_url,
                 server={"clients": _clients(rate_limit_rpm=2)})
    with serving(create_app(cfg)) as url:
        codes = [_post(url, KEY_A).status_code for _ in range(3)]
        limited = _post(url, KEY_A)
        other = _post(url, KEY_B)
    assert codes == [200, 200, 429]
    assert limited.json()["error"]["type"] == "rate_limit_exceeded"
    assert int(limited.headers["retry-after"]) >= 1
    assert other.status_code == 200


def test_the_rate_limit_counts_answers_not_model_listings_or_feedback(
        tmp_path: Path, openai_server: LoopbackServer, keys: None) -> None:
    """A client that lists the models at start and sends feedback on each answer got a third
    of the answers a minute it was given: every endpoint took from one bucket."""
    openai_server.script(echo_handler(refuse=()))
    cfg = ladder(tmp_path, openai_server.base_url,
                 server={"clients": _clients(rate_limit_rpm=2),
                         "audit_log": str(tmp_path / "audit.jsonl")})
    auth = {"authorization": f"Bearer {KEY_A}"}
    with serving(create_app(cfg)) as url:
        codes = []
        for _ in range(2):
            assert httpx.get(f"{url}/v1/models", headers=auth).status_code == 200
            answer = _post(url, KEY_A)
            codes.append(answer.status_code)
            feedback = httpx.post(f"{url}/v1/feedback", headers=auth, json={
                "request_id": answer.headers["x-cascade-request-id"], "correct": True})
            assert feedback.status_code == 200
        codes.append(_post(url, KEY_A).status_code)
        wrong = httpx.get(f"{url}/v1/models", headers={"authorization": "Bearer wrong"})
        # feedback has a bucket of its own (each is an audit line: a flood would rotate the
        # log's request lines away)
        flood = httpx.post(f"{url}/v1/feedback", headers=auth, json={
            "request_id": answer.headers["x-cascade-request-id"], "correct": False})
    assert codes == [200, 200, 429]
    assert wrong.status_code == 401  # the key is still checked
    assert flood.status_code == 429


@pytest.mark.parametrize(("server", "key", "fragment"), [
    ({"nmae": "x"}, "server.nmae", "unknown key"),
    ({"name": 3}, "server.name", "must be a string"),
    ({"audit_redact": "yes"}, "server.audit_redact", "true or false"),
    ({"clients": [{"name": "a"}]}, "server.clients[0].key_env", "required"),
    ({"clients": [{"name": "a", "key_env": "UNSET_VAR_FOR_TEST"}]},
     "server.clients[0].key_env", "UNSET_VAR_FOR_TEST is not set"),
    ({"clients": [{"name": "a", "key_env": "CLIENT_A_KEY", "max_cost_usd": -1}]},
     "server.clients[0].max_cost_usd", "> 0"),
    ({"clients": [{"name": "a", "key_env": "CLIENT_A_KEY"},
                  {"name": "a", "key_env": "CLIENT_B_KEY"}]}, "server.clients[1].name",
     "duplicate"),
    ({"clients": [{"name": "a", "key_env": "CLIENT_A_KEY"},
                  {"name": "b", "key_env": "CLIENT_A_KEY"}]}, "server.clients", "same"),
])
def test_server_table_errors_name_the_key_and_file(
        tmp_path: Path, keys: None, server: dict[str, Any], key: str, fragment: str) -> None:
    cfg = ladder(tmp_path, "http://127.0.0.1:9/v1", server=server)
    with pytest.raises(ConfigError) as ei:
        parse_server(cfg)
    assert ei.value.key == key and fragment in str(ei.value)
    assert str(tmp_path / "cascade.toml") in str(ei.value)
    assert KEY_A not in str(ei.value)


def test_audit_log_has_one_line_per_request_and_never_a_key(
        tmp_path: Path, openai_server: LoopbackServer, keys: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNG_API_KEY", RUNG_KEY)
    openai_server.script(echo_handler(refuse=("small",)))
    log = tmp_path / "audit.jsonl"
    cfg = ladder(tmp_path, openai_server.base_url, server={
        "clients": _clients(), "audit_log": str(log)})
    cfg = cfg.replace(rungs=tuple(replace(r, api_key_env="RUNG_API_KEY") for r in cfg.rungs))
    app = create_app(cfg)
    with serving(app) as url:
        ok = _post(url, KEY_A)
        # a prompt that happens to contain a key is logged without it
        leak = httpx.post(f"{url}/v1/chat/completions",
                          headers={"authorization": f"Bearer {KEY_B}"},
                          json={"model": "cascade", "messages": [
                              {"role": "user", "content": f"is {KEY_A} or {RUNG_KEY} a key?"}]})
        fb = httpx.post(f"{url}/v1/feedback", headers={"authorization": f"Bearer {KEY_A}"},
                        json={"request_id": ok.headers["x-cascade-request-id"],
                              "correct": False, "expected": "Paris"})
        bad_fb = httpx.post(f"{url}/v1/feedback", headers={"authorization": f"Bearer {KEY_A}"},
                            json={"request_id": "x", "correct": "perhaps"})
        app.state.service.audit.flush()
    assert ok.status_code == 200 and leak.status_code == 200 and fb.status_code == 200
    assert bad_fb.status_code == 400 and bad_fb.json()["error"]["param"] == "correct"
    text = log.read_text()
    for secret in (KEY_A, KEY_B, RUNG_KEY):
        assert secret not in text
    lines = _lines(log)
    assert [x["type"] for x in lines] == ["answer", "answer", "feedback"]
    first = lines[0]
    assert first["request_id"] == ok.headers["x-cascade-request-id"]
    assert (first["client"], first["ladder"], first["verified"]) == ("app-a", "cascade", True)
    assert first["messages"] == MESSAGES
    assert first["answer"] == "big says: What is the capital of France?"
    assert [a["status"] for a in first["trace"]["attempts"]] == ["rejected", "accepted"]
    assert first["trace"]["attempts"][0]["text"].startswith("I'm sorry")
    assert first["cost_usd"] == pytest.approx(ok.json()["cascade"]["cost_usd"])
    assert first["latency_ms"] > 0 and first["timestamp"].endswith("Z")
    assert lines[1]["client"] == "app-b" and "[redacted]" in lines[1]["messages"][0]["content"]
    assert lines[2] == {**lines[2], "request_id": first["request_id"], "correct": False,
                        "expected": "Paris", "client": "app-a"}


def test_redacted_audit_log_keeps_a_hash_of_the_messages(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    openai_server.script(echo_handler(refuse=()))
    log = tmp_path / "audit.jsonl"
    app = create_app(ladder(tmp_path, openai_server.base_url,
                            server={"audit_log": str(log), "audit_redact": True}))
    with serving(app) as url:
        for _ in range(2):
            _post(url, None)
        app.state.service.audit.flush()
    a, b = _lines(log)
    assert "messages" not in a and a["messages_sha256"].startswith("sha256:")
    assert a["messages_sha256"] == b["messages_sha256"]
    assert "capital of France?" not in json.dumps(a["messages_sha256"])


def test_feedback_without_an_audit_log_says_where_to_set_one(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    with serving(create_app(ladder(tmp_path, openai_server.base_url))) as url:
        r = httpx.post(f"{url}/v1/feedback", json={"request_id": "abc", "correct": True})
    assert r.status_code == 400 and "audit_log" in r.json()["error"]["message"]


def test_served_traffic_and_feedback_become_a_suite(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    from cascade.suite.fromlog import build_suite

    openai_server.script(echo_handler(refuse=("small",)))
    log = tmp_path / "audit.jsonl"
    cfg = ladder(tmp_path, openai_server.base_url, server={"audit_log": str(log)})
    app = create_app(cfg)
    with serving(app) as url:
        r = _post(url, None)
        fb = httpx.post(f"{url}/v1/feedback", json={
            "request_id": r.headers["x-cascade-request-id"], "correct": False,
            "expected": "Paris"})
        app.state.service.audit.flush()
    assert fb.status_code == 200
    suite = build_suite([log], config=cfg)
    [case] = suite.cases
    assert case["messages"] == MESSAGES and case["expected"] == "Paris"
    assert case["metadata"]["request_ids"] == [r.headers["x-cascade-request-id"]]
    assert {rec.to_dict()["model"] for rec in suite.recordings} >= {"small", "big"}
