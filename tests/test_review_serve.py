"""Adversarial review of ``cascade serve``: each test pins a defect a production client would
hit (a field dropped silently, a wrong status, a budget bypass, an unbounded body, a reload
that unlocks a public port), against real loopback servers and the real SDKs / httpx."""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest

from cascade.serve import create_app
from tests.loopback import (
    LoopbackServer,
    RecordedRequest,
    Reply,
    free_port,
    openai_error,
    openai_reply,
)
from tests.serve_kit import (
    echo_handler,
    ladder,
    one_rung_toml,
    opened,
    serving,
    start_serve,
    stop,
    wait_ready,
)

MESSAGES: Any = [{"role": "user", "content": "What is the capital of France?"}]


def _post(url: str, body: dict[str, Any], **kw: Any) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=20, **kw)


def _sample(metrics: str, prefix: str) -> float | None:
    """The value of the first Prometheus sample line starting with ``prefix`` (None: none)."""
    for line in metrics.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    return None


# ---------------------------------------------------------------- fields never dropped


@pytest.mark.parametrize(("message", "param"), [
    ({"role": "user", "content": "hi", "name": "bob"}, "messages[0].name"),
    ({"role": "user", "content": [{"type": "text", "text": "hi", "extra": 1}]},
     "messages[0].content[0].extra"),
])
def test_unsupported_keys_inside_messages_are_a_400_naming_them(
        tmp_path: Path, openai_server: LoopbackServer, message: dict[str, Any],
        param: str) -> None:
    """A message's ``name`` (or a part's unknown key) changes what the model sees; dropping it
    silently answers another question than the one asked."""
    openai_server.script(echo_handler(refuse=()))
    with serving(create_app(ladder(tmp_path, openai_server.base_url))) as url:
        r = _post(url, {"model": "cascade", "messages": [message]})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert openai_server.requests == []


# ---------------------------------------------------------------- statuses of a stream


def test_a_stream_refused_by_the_cost_cap_is_a_429_like_without_streaming(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    """Every rung skipped by the request's cap: no rung escalated, so the stream must not have
    started; the SDK must see the same 429 budget_exceeded as without streaming."""
    openai_server.script(echo_handler(refuse=()))
    cfg = ladder(tmp_path, openai_server.base_url, max_cost_usd=1e-9)
    with serving(create_app(cfg)) as url:
        plain = _post(url, {"model": "cascade", "messages": MESSAGES})
        streamed = _post(url, {"model": "cascade", "messages": MESSAGES, "stream": True})
        client = opened(openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0))
        with pytest.raises(openai.RateLimitError) as ei:
            list(client.chat.completions.create(model="cascade", messages=MESSAGES,
                                                stream=True))
    assert plain.status_code == 429
    assert streamed.status_code == 429, streamed.text
    assert streamed.json()["error"]["type"] == "budget_exceeded"
    assert streamed.headers["x-should-retry"] == "false"
    assert ei.value.body["type"] == "budget_exceeded"  # type: ignore[index]
    assert openai_server.requests == []


def test_climb_failures_of_a_stream_are_not_counted_as_refused_requests(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    """``cascade_refused_requests_total`` counts auth, rate limit and bad input: a streamed
    budget refusal is not a rate limit, nor a streamed no-answer a bad request."""
    openai_server.script(lambda req: openai_error(500, "down", type="server_error"))
    budget = ladder(tmp_path, openai_server.base_url, models=("small",),
                    budget={"limit_usd": 1e-12, "period_s": 86400.5})
    with serving(create_app(budget)) as url:
        r = _post(url, {"model": "cascade", "messages": MESSAGES, "stream": True})
        metrics = httpx.get(f"{url}/metrics").text
    assert r.status_code == 429
    assert _sample(metrics, 'cascade_refused_requests_total{') is None, metrics
    assert _sample(metrics, 'cascade_budget_refusals_total{ladder="cascade"}') == 1.0
    with serving(create_app(ladder(tmp_path, openai_server.base_url, models=("small",)))) as url:
        r = _post(url, {"model": "cascade", "messages": MESSAGES, "stream": True})
        metrics = httpx.get(f"{url}/metrics").text
    assert r.status_code == 502
    assert _sample(metrics, 'cascade_refused_requests_total{') is None, metrics


# ---------------------------------------------------------------- money


def test_request_metadata_cannot_choose_the_budget_it_draws_on(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    """``[budget] limit_usd`` caps the default key; a request naming another ``budget_key``
    in its metadata must not get a fresh budget (a 400 naming the reserved key)."""
    def expensive(req: RecordedRequest) -> Reply:
        return openai_reply("Paris", model=req.json["model"], completion_tokens=1_000_000)

    openai_server.script(expensive)
    cfg = ladder(tmp_path, openai_server.base_url, models=("small",),
                 budget={"limit_usd": 1.0, "period_s": 86401.25})  # this test's own windows
    with serving(create_app(cfg)) as url:
        first = _post(url, {"model": "cascade", "messages": MESSAGES})  # spends $2
        refused = _post(url, {"model": "cascade", "messages": MESSAGES})
        around = _post(url, {"model": "cascade", "messages": MESSAGES,
                             "metadata": {"budget_key": "somebody-else"}})
    assert first.status_code == 200 and refused.status_code == 429
    assert around.status_code == 400, around.text
    assert around.json()["error"]["param"] == "metadata.budget_key"
    assert len(openai_server.requests) == 1


# ---------------------------------------------------------------- bodies


def test_a_body_over_the_limit_is_a_413_before_it_is_read_whole(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    """An unbounded body is a memory exhaustion anyone who can reach the port can cause; over
    ``[server] max_request_bytes`` it is a 413 (declared length or chunked), both formats."""
    openai_server.script(echo_handler(refuse=()))
    cfg = ladder(tmp_path, openai_server.base_url, server={"max_request_bytes": 4096})
    big = json.dumps({"model": "cascade",
                      "messages": [{"role": "user", "content": "x" * 10_000}]}).encode()

    def chunks() -> Any:
        for i in range(0, len(big), 1000):
            yield big[i:i + 1000]

    with serving(create_app(cfg)) as url:
        declared = httpx.post(f"{url}/v1/chat/completions", content=big)
        chunked = httpx.post(f"{url}/v1/chat/completions", content=chunks())
        anthropic = httpx.post(f"{url}/v1/messages", content=big)
        small = _post(url, {"model": "cascade", "messages": MESSAGES})
    for r in (declared, chunked):
        assert r.status_code == 413, r.text
        assert r.json()["error"]["type"] == "invalid_request_error"
        assert "4096" in r.json()["error"]["message"]
    assert anthropic.status_code == 413
    assert anthropic.json()["error"]["type"] == "request_too_large"
    assert small.status_code == 200
    assert len(openai_server.requests) == 1


def test_max_request_bytes_is_validated(tmp_path: Path, openai_server: LoopbackServer) -> None:
    from cascade import ConfigError

    with pytest.raises(ConfigError) as ei:
        create_app(ladder(tmp_path, openai_server.base_url, server={"max_request_bytes": 0}))
    assert ei.value.key == "server.max_request_bytes"


# ---------------------------------------------------------------- secrets


def test_an_upstream_error_echoing_the_rung_key_never_reaches_the_client_or_the_log(
        tmp_path: Path, openai_server: LoopbackServer, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A provider's 401 body quoting the key it was sent: the 502's trace, the audit line and
    the process log carry the failure, never the key."""
    secret = "sk-review-rung-key-31415926535"
    monkeypatch.setenv("REVIEW_RUNG_KEY", secret)

    def echo_key(req: RecordedRequest) -> Reply:
        sent = req.headers.get("authorization", "")
        return openai_error(401, f"Incorrect API key provided: {sent} ({json.dumps(sent)})",
                            type="invalid_request_error")

    openai_server.script(echo_key)
    log = tmp_path / "audit.jsonl"
    cfg = ladder(tmp_path, openai_server.base_url, models=("small",),
                 server={"audit_log": str(log)})
    from dataclasses import replace

    cfg = replace(cfg, rungs=(replace(cfg.rungs[0], api_key_env="REVIEW_RUNG_KEY"),))
    with caplog.at_level(logging.DEBUG), serving(create_app(cfg)) as url:
        r = _post(url, {"model": "cascade", "messages": MESSAGES})
        s = _post(url, {"model": "cascade", "messages": MESSAGES, "stream": True})
    assert openai_server.requests and secret in openai_server.requests[0].headers[
        "authorization"]
    assert r.status_code == 502 and r.json()["error"]["type"] == "no_answer"
    for text in (r.text, s.text, json.dumps(dict(r.headers)), log.read_text(), caplog.text):
        assert secret not in text
        assert secret[3:] not in text


# ---------------------------------------------------------------- a reload on a public port


def test_a_reload_that_drops_every_client_on_a_public_bind_is_refused(
        tmp_path: Path, openai_server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Binding beyond loopback needs client keys; a reloaded file with none must not open the
    port to anyone (the old config keeps serving, /healthz says why)."""
    openai_server.script(echo_handler(refuse=()))
    monkeypatch.setenv("REVIEW_CLIENT_KEY", "sk-review-client-27182818")
    clients = ('[[server.clients]]\nname = "app"\nkey_env = "REVIEW_CLIENT_KEY"\n'
               f'budget_key = "app-{tmp_path.name}"\n')
    cfg = one_rung_toml(tmp_path / "cascade.toml", openai_server.base_url, server="",
                        extra=clients)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_serve(cfg, port, "--host", "0.0.0.0")
    try:
        wait_ready(url, proc)
        assert _post(url, {"model": "cascade", "messages": MESSAGES}).status_code == 401
        one_rung_toml(cfg, openai_server.base_url, server="reload_poll_s = 0")  # no clients
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while True:
            config = httpx.get(f"{url}/healthz", timeout=5).json()["config"]
            if config.get("last_reload_outcome") is not None:
                break
            assert time.monotonic() < deadline, config
            time.sleep(0.05)
        r = _post(url, {"model": "cascade", "messages": MESSAGES})
    finally:
        stop(proc)
    assert config["last_reload_outcome"] == "error"
    assert "server.clients" in config["last_reload_error"]
    assert r.status_code == 401
    assert openai_server.requests == []


# ---------------------------------------------------------------- wrong types, odd replies


@pytest.mark.parametrize(("field", "value"), [
    ("max_tokens", True),  # was read as max_tokens=1: a cut-off answer, paid escalations
    ("stream", "yes"),
    ("temperature", "0.5"),
    ("n", 1.0),
])
def test_a_field_of_the_wrong_type_is_a_400_not_coerced(
        tmp_path: Path, openai_server: LoopbackServer, field: str, value: Any) -> None:
    openai_server.script(echo_handler(refuse=()))
    with serving(create_app(ladder(tmp_path, openai_server.base_url))) as url:
        r = _post(url, {"model": "cascade", "messages": MESSAGES, field: value})
        a = httpx.post(f"{url}/v1/messages", timeout=20, json={
            "model": "cascade", "max_tokens": True, "messages": MESSAGES})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field
    assert a.status_code == 400 and a.json()["error"]["type"] == "invalid_request_error"
    assert openai_server.requests == []


def test_a_reply_with_a_lone_surrogate_is_still_served_not_a_500(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    """A model server's JSON may carry an unpaired ``\\ud800`` escape (Python's parser takes
    it): the answer was paid for and verified, so it is served (escaped, as a stream sends it),
    in both wire formats."""
    body = json.dumps(openai_reply("bad \ud800 text", model="small").json).encode()
    openai_server.script(lambda req: Reply(body=body))
    cfg = ladder(tmp_path, openai_server.base_url, models=("small",))
    with serving(create_app(cfg)) as url:
        chat = _post(url, {"model": "cascade", "messages": MESSAGES})
        msg = httpx.post(f"{url}/v1/messages", timeout=20, json={
            "model": "cascade", "max_tokens": 64, "messages": MESSAGES})
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"] == "bad \ud800 text"
    assert chat.headers["x-cascade-verified"] == "true"
    assert msg.status_code == 200, msg.text
    assert msg.json()["content"][0]["text"] == "bad \ud800 text"


# ---------------------------------------------------------------- client keys


def test_a_client_key_variable_with_a_trailing_newline_still_admits_its_client(
        tmp_path: Path, openai_server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys mounted from secret files often end in a newline; a bearer token never can, so
    the raw value locked the client out for good."""
    openai_server.script(echo_handler(refuse=()))
    monkeypatch.setenv("REVIEW_NL_KEY", "sk-review-newline-1618033\n")
    cfg = ladder(tmp_path, openai_server.base_url, server={"clients": [
        {"name": "app", "key_env": "REVIEW_NL_KEY", "budget_key": f"nl-{tmp_path.name}"}]})
    with serving(create_app(cfg)) as url:
        client = opened(openai.OpenAI(base_url=f"{url}/v1", api_key="sk-review-newline-1618033",
                                      max_retries=0))
        ok = client.chat.completions.create(model="cascade", messages=MESSAGES)
        wrong = _post(url, {"model": "cascade", "messages": MESSAGES},
                      headers={"authorization": "Bearer sk-review-newline-161803"})
    assert ok.choices[0].message.content == "small says: What is the capital of France?"
    assert wrong.status_code == 401


def test_a_client_key_variable_of_only_white_space_is_a_config_error(
        tmp_path: Path, openai_server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from cascade import ConfigError

    monkeypatch.setenv("REVIEW_BLANK_KEY", " \n")
    with pytest.raises(ConfigError) as ei:
        create_app(ladder(tmp_path, openai_server.base_url, server={"clients": [
            {"name": "app", "key_env": "REVIEW_BLANK_KEY"}]}))
    assert ei.value.key == "server.clients[0].key_env"


def test_an_invalid_json_schema_is_a_400_naming_the_request_field(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    """``param`` names what the client sent (``response_format.json_schema.schema``), not the
    engine's argument (``schema``), streamed or not."""
    body = {"model": "cascade", "messages": MESSAGES, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}}
    with serving(create_app(ladder(tmp_path, openai_server.base_url))) as url:
        plain = _post(url, body)
        streamed = _post(url, {**body, "stream": True})
    for r in (plain, streamed):
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "response_format.json_schema.schema"
    assert openai_server.requests == []


# ---------------------------------------------------------------- one stream, the whole server


class ExitingVerifier:
    """A plugin verifier that calls ``sys.exit`` on prompts saying "boom" (a plugin bug)."""

    name = "exiting"
    expensive = False
    cache_key = "exiting"

    def verify(self, ctx: Any) -> bool:
        if "boom" in ctx.request.last_user:
            raise SystemExit(3)
        return True


def test_a_plugin_raising_system_exit_in_a_stream_does_not_take_the_service_down(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    """Streams climb in the service's task group: a BaseException escaping one climb cancelled
    that group, so every other request and the lifespan went with it."""
    openai_server.script(echo_handler(refuse=()))
    cfg = ladder(tmp_path, openai_server.base_url, models=("small",),
                 verifiers=[{"name": "tests.test_review_serve:ExitingVerifier"}])
    with serving(create_app(cfg)) as url:
        boom = _post(url, {"model": "cascade", "stream": True,
                           "messages": [{"role": "user", "content": "boom"}]})
        plain = _post(url, {"model": "cascade", "messages": [{"role": "user", "content": "boom"}]})
        after = _post(url, {"model": "cascade", "messages": MESSAGES})
        streamed_after = _post(url, {"model": "cascade", "messages": MESSAGES, "stream": True})
    assert boom.status_code == 500 and boom.json()["error"]["type"] == "server_error"
    assert "SystemExit" in boom.json()["error"]["message"]
    assert plain.status_code == 500 and "SystemExit" in plain.json()["error"]["message"]
    assert after.status_code == 200, after.text
    assert streamed_after.status_code == 200 and "small says" in streamed_after.text
