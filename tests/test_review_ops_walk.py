"""Defects found by a black-box walk of the service's operations (reload, workers, audit,
metrics, client keys), each pinned by a test that failed on the code before its fix: a key
pasted where a variable's name goes was echoed into errors, the log and ``/healthz``, ..."""

from __future__ import annotations

import functools
import json
import threading
from pathlib import Path
from typing import Any

import pytest

from cascade.config import parse_config
from cascade.errors import ConfigError
from cascade.messages import Message
from cascade.serve.config import parse_server
from cascade.store.config import parse_store
from tests.loopback import LoopbackServer, RecordedRequest, Reply, openai_chat

pytestmark = pytest.mark.anyio

PASTED = "sk-proj-PASTEDsecretVALUE0123456789abcdef"
RUNG = {"model": "m", "provider": "openai-compatible", "base_url": "http://127.0.0.1:9/v1",
        "price": "unknown"}


def _server(clients: list[dict[str, Any]]) -> None:
    parse_server(parse_config({"rungs": [RUNG], "server": {"clients": clients}}))


@pytest.mark.parametrize(("parse", "key"), [
    (lambda: _server([{"name": "team", "key_env": PASTED}]), "server.clients[0].key_env"),
    (lambda: parse_store({"url": "redis://127.0.0.1:6379/0", "password_env": PASTED}),
     "store.password_env"),
    (lambda: parse_store({"url": "redis://127.0.0.1:6379/0", "cache_secret_env": PASTED}),
     "store.cache_secret_env"),
])
def test_a_key_pasted_where_its_variables_name_goes_is_refused_without_showing_it(
        parse: Any, key: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse()
    assert ei.value.key == key and "NAME of an environment variable" in str(ei.value)
    assert "PASTEDsecret" not in str(ei.value) and "PASTEDsecret" not in repr(ei.value)


def test_a_key_in_an_http_base_urls_query_is_refused_without_showing_it() -> None:
    """The SDKs append the path after a query (``/v1?api-key=K/chat/completions``), and the
    key was shown in traces and audit lines."""
    for rungs in ([{**RUNG, "base_url": "http://127.0.0.1:9/v1?api-key=URLSECRET123"}],
                  [{**RUNG, "fallbacks": [{"base_url": "http://h/v1?api-key=URLSECRET123"}]}]):
        with pytest.raises(ConfigError) as ei:
            parse_config({"rungs": rungs})
        assert "base_url" in (ei.value.key or "") and "api_key_env" in str(ei.value)
        assert "URLSECRET" not in str(ei.value)


async def test_a_basic_auth_proxys_password_in_base_url_stays_out_of_traces(
        tmp_path: Path) -> None:
    from cascade.engine import Cascade
    from cascade.testing import Script

    s = Script({"m": ["Paris"]})
    cfg = {"rungs": [{**RUNG, "base_url": "http://proxyuser:URLSECRET123@127.0.0.1:9/v1"}],
           "cache": {"enabled": False}}
    log = tmp_path / "audit.jsonl"
    async with Cascade.from_dict(cfg, provider_factory=s.factory, audit_log=log) as c:
        ans = await c.aanswer("Capital of France?")
    assert ans.attempts[0].endpoint == "http://***@127.0.0.1:9/v1"
    assert "URLSECRET" not in json.dumps(ans.to_dict()) and "URLSECRET" not in log.read_text()


async def test_credentials_in_a_plugin_providers_base_url_stay_out_of_traces_and_audit_lines(
        tmp_path: Path) -> None:
    """A provider kind of one's own may take any ``base_url``; what the trace and the audit
    log show of it is masked, as ``/healthz`` masks it."""
    from cascade.engine import Cascade
    from cascade.providers import register_provider
    from cascade.testing import Script

    s = Script({"m": ["Paris"]})
    register_provider("walk-ops-keyed", s.factory)
    cfg = {"rungs": [{"model": "m", "provider": "walk-ops-keyed", "price": "unknown",
                      "base_url": "https://gen.example/v1?key=URLSECRET123"}],
           "cache": {"enabled": False}}
    log = tmp_path / "audit.jsonl"
    async with Cascade.from_dict(cfg, audit_log=log) as c:
        ans = await c.aanswer("Capital of France?")
    assert ans.attempts[0].endpoint == "https://gen.example/v1?key=***"
    assert "URLSECRET" not in json.dumps(ans.to_dict())
    text = log.read_text()
    assert ans.request_id in text and "URLSECRET" not in text


async def test_a_climb_cancelled_mid_rung_is_audited_with_its_trace_and_cost(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    """A shutdown (or a client gone) cancelling a request whose first rung was paid for and
    rejected: the audit line said cost 0 with no trace, while the budget had charged it."""
    import anyio

    from cascade.budget import InMemoryBudgetStore
    from cascade.engine import Cascade

    big_asked = threading.Event()

    def handler(req: RecordedRequest) -> Reply:
        if req.json["model"] == "small":
            return Reply(json=openai_chat("I'm sorry, but I can't help with that."))
        big_asked.set()
        return Reply(json=openai_chat("Canberra"), delay_s=10.0)

    openai_server.script(handler)
    rungs = [{"model": m, "provider": "openai-compatible", "base_url": openai_server.base_url,
              "input_usd_per_mtok": 0.0, "output_usd_per_mtok": p, "max_tokens": 10,
              "max_retries": 0} for m, p in (("small", 1000.0), ("big", 10000.0))]
    cfg = {"rungs": rungs, "cache": {"enabled": False}, "budget": {"limit_usd": 1.0},
           "verifiers": [{"name": "refusal"}]}
    log, store = tmp_path / "audit.jsonl", InMemoryBudgetStore()
    async with (Cascade.from_dict(cfg, audit_log=log, budget_store=store) as c,
                anyio.create_task_group() as tg):
        tg.start_soon(functools.partial(c.aanswer, "Capital of Australia?"))
        assert await anyio.to_thread.run_sync(big_asked.wait, 10)
        tg.cancel_scope.cancel()  # as a shutdown's drain timeout does
    [line] = [json.loads(x) for x in log.read_text().splitlines()
              if json.loads(x).get("kind", "request") == "request"]
    trace = line["trace"]

    assert [(a["model"], a["status"]) for a in trace["attempts"]] == [
        ("small", "rejected"), ("big", "error")]
    assert trace["attempts"][1]["error_type"] == "Cancelled"
    small = trace["attempts"][0]["cost_usd"]
    assert small > 0 and line["cost_usd"] == pytest.approx(small)
    # what the budget holds: the rejected call, and the cut-off one at its estimate
    assert store.spent("default", 86400.0) == pytest.approx(small + 0.1)


def test_refusals_on_every_endpoint_are_counted(tmp_path: Path,
                                                openai_server: LoopbackServer,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """``cascade_refused_requests_total`` (auth, rate limit, bad input) counted only the chat
    endpoints: a bad key on ``/v1/models`` or ``/v1/feedback`` was never seen."""
    import httpx2 as httpx

    from cascade.serve import create_app
    from tests.serve_kit import echo_handler, ladder, serving

    monkeypatch.setenv("WALK_CLIENT_KEY", "sk-walk-client-0123456789")
    openai_server.script(echo_handler(refuse=()))
    cfg = ladder(tmp_path, openai_server.base_url, server={
        "clients": [{"name": "app", "key_env": "WALK_CLIENT_KEY"}],
        "audit_log": str(tmp_path / "audit.jsonl")})
    good = {"authorization": "Bearer sk-walk-client-0123456789"}
    with serving(create_app(cfg)) as url:
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/v1/models/cascade", headers={
            "authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{url}/v1/models/other", headers=good).status_code == 404
        assert httpx.post(f"{url}/v1/feedback", json={"request_id": "x", "correct": True}
                          ).status_code == 401
        assert httpx.post(f"{url}/v1/feedback", headers=good,
                          json={"correct": "maybe"}).status_code == 400
        assert httpx.post(f"{url}/v1/feedback", headers=good,
                          json={"request_id": "x", "correct": True}).status_code == 200
        metrics = httpx.get(f"{url}/metrics").text
    counts = {line.split('outcome="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
              for line in metrics.splitlines()
              if line.startswith("cascade_refused_requests_total{")}
    assert counts == {"unauthorised": 3.0, "unknown_model": 1.0, "bad_request": 1.0}, counts


def _sigterm_during(proc: Any, url: str, model: LoopbackServer, run: Any, *,
                    requests: int = 1, settle_s: float = 0.0) -> None:
    """Once ``cascade serve`` is ready, run ``run`` in a thread and SIGTERM the service when
    the model server has seen ``requests`` calls (and ``settle_s`` more); wait for both. A
    service that outlives that is killed."""
    import signal
    import time

    from tests.serve_kit import wait_ready

    try:
        wait_ready(url, proc)
        t = threading.Thread(target=run)
        t.start()
        deadline = time.monotonic() + 10
        while len(model.requests) < requests and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(settle_s)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
        t.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("wire", ["chat", "messages"])
def test_a_request_cut_by_the_drain_timeout_is_a_503_with_its_cost_not_a_bare_500(
        tmp_path: Path, openai_server: LoopbackServer, wire: str) -> None:
    """SIGTERM while a request waits on a slow model past ``shutdown_timeout_s``: uvicorn's
    own answer was a plain-text 500, which the SDKs retry (paying again), and the audit line
    had no trace and cost 0."""

    import httpx2 as httpx

    from tests.loopback import free_port
    from tests.serve_kit import echo_handler, one_rung_toml, start_serve

    openai_server.script(echo_handler(refuse=(), delay_s=8.0))
    port, log = free_port(), tmp_path / "audit.jsonl"
    url = f"http://127.0.0.1:{port}"
    cfg = one_rung_toml(tmp_path / "cascade.toml", openai_server.base_url,
                        server=f'audit_log = "{log}"\nshutdown_timeout_s = 0.5\n')
    proc = start_serve(cfg, port)
    result: dict[str, httpx.Response] = {}

    def slow() -> None:
        result["r"] = httpx.post(
            f"{url}/v1/{'chat/completions' if wire == 'chat' else 'messages'}", timeout=20,
            json={"model": "cascade", "max_tokens": 100,
                  "messages": [{"role": "user", "content": "slow one"}]})

    _sigterm_during(proc, url, openai_server, slow)
    r = result["r"]
    assert r.status_code == 503, r.text
    assert r.headers["x-should-retry"] == "false"
    body = r.json()
    if wire == "messages":  # Anthropic's error shape on its endpoint
        assert body["type"] == "error" and "shut down" in body["error"]["message"], body
    else:
        assert body["error"]["code"] == "server_shutting_down"
    assert [a["status"] for a in body["error"]["cascade"]["attempts"]] == ["error"]
    rid = r.headers["x-cascade-request-id"]
    [line] = [json.loads(x) for x in log.read_text().splitlines() if rid in x]
    assert line["trace"]["attempts"][0]["error_type"] == "Cancelled"


def test_a_stream_cut_by_the_drain_timeout_ends_with_an_error_event_not_a_broken_read(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    """A stream already begun (its first rung escalated) when ``shutdown_timeout_s`` runs out
    on the slow second rung: the connection was closed mid-body, and the SDK raised a bare
    transport error (``incomplete chunked read``), which reads as a network fault to retry."""

    import openai

    from tests.loopback import free_port
    from tests.serve_kit import echo_handler, start_serve

    slow = echo_handler(refuse=("small",), delay_s=8.0)
    fast = echo_handler(refuse=("small",))
    openai_server.script(lambda req: (slow if req.json["model"] == "big" else fast)(req))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cfg = tmp_path / "cascade.toml"
    cfg.write_text("".join(f"""
[[rungs]]
model = "{m}"
provider = "openai-compatible"
base_url = "{openai_server.base_url}"
timeout_s = 20
input_usd_per_mtok = 0.1
output_usd_per_mtok = 0.2
""" for m in ("small", "big")) + """
[[verifiers]]
name = "refusal"

[cache]
enabled = false

[server]
shutdown_timeout_s = 0.5
""")
    proc = start_serve(cfg, port)
    seen: dict[str, Any] = {}
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

    def read() -> None:
        try:
            for chunk in client.chat.completions.create(
                    model="cascade", stream=True,
                    messages=[{"role": "user", "content": "slow one"}]):
                seen.setdefault("chunks", []).append(chunk)
        except Exception as e:
            seen["error"] = e

    # the stream has begun once rung 1 is called: rung 0's progress comment went out
    _sigterm_during(proc, url, openai_server, read, requests=2, settle_s=0.2)
    error = seen.get("error")
    assert isinstance(error, openai.APIError), repr(error)
    assert not isinstance(error, openai.APIConnectionError)
    assert "shut down before the answer" in error.message
    assert "chunks" not in seen  # no text of the refused rung, nor any other


def test_a_request_in_flight_across_a_rename_is_counted_under_its_own_ladder(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    """Requests finish on the config they started on, but their metrics were labelled with the
    ladder name a reload had swapped in meanwhile."""
    import signal
    import time

    import httpx2 as httpx

    from tests.loopback import free_port
    from tests.serve_kit import (
        ask,
        config_health,
        echo_handler,
        one_rung_toml,
        start_serve,
        stop,
        wait_ready,
    )

    openai_server.script(echo_handler(refuse=(), delay_s=1.5))
    cfg, port = tmp_path / "cascade.toml", free_port()
    url = f"http://127.0.0.1:{port}"
    one_rung_toml(cfg, openai_server.base_url, server="reload_poll_s = 0")
    proc = start_serve(cfg, port)
    try:
        wait_ready(url, proc)
        result: dict[str, Any] = {}
        slow = threading.Thread(target=lambda: result.update(r=ask(url, "slow one")))
        slow.start()
        deadline = time.monotonic() + 10
        while not openai_server.requests and time.monotonic() < deadline:
            time.sleep(0.02)
        one_rung_toml(cfg, openai_server.base_url, server='reload_poll_s = 0\nname = "renamed"')
        proc.send_signal(signal.SIGHUP)
        while config_health(url)["reloads"] != 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        slow.join(20)
        metrics = httpx.get(f"{url}/metrics", timeout=5).text
    finally:
        stop(proc)
    assert result["r"].choices[0].message.content == "small says: slow one"
    served = [line for line in metrics.splitlines()
              if line.startswith("cascade_requests_total{")]
    assert len(served) == 1 and 'ladder="cascade"' in served[0], served
    assert not [line for line in metrics.splitlines()
                if 'ladder="renamed"' in line and not line.startswith("cascade_in_flight")
                and not line.endswith(" 0.0") and "_created" not in line], metrics


def test_a_set_variable_whose_name_has_a_dot_or_dash_is_still_a_name(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Kubernetes allows ``.`` and ``-`` in variable names; such a name that is set is taken
    (a pasted key is never one), one that is not set is refused without being shown."""
    monkeypatch.setenv("team-a.key", "sk-team-a-0123456789")
    [client] = parse_server(parse_config({"rungs": [RUNG], "server": {"clients": [
        {"name": "team", "key_env": "team-a.key"}]}})).clients
    assert client.key_env == "team-a.key"
    with pytest.raises(ConfigError) as ei:
        _server([{"name": "team", "key_env": "team-b.key"}])
    assert "team-b.key" not in str(ei.value)


def test_a_basic_auth_base_url_is_sent_by_the_transport_that_can(
        openai_server: LoopbackServer) -> None:
    """aiohttp (``auto``'s choice on asyncio) refused user info beside the SDK's Authorization
    header on every call; ``auto`` now takes httpx for such a URL, and an explicit
    ``transport = "aiohttp"`` is refused at load."""
    import asyncio

    from cascade.config import RungConfig
    from cascade.providers import make_provider
    from cascade.providers.base import rung_call

    openai_server.script(lambda req: Reply(json=openai_chat("Paris", model="m")))
    base = openai_server.base_url.replace("http://", "http://proxyuser:pw@")
    cfg = parse_config({"rungs": [{**RUNG, "base_url": base}]})

    async def call(rung: RungConfig) -> str:
        p = make_provider(rung)
        try:
            return (await p.complete(rung_call(rung, (Message("user", "hi"),)))).text
        finally:
            await p.aclose()

    assert asyncio.run(call(cfg.rungs[0])) == "Paris"
    assert openai_server.requests[-1].headers["authorization"].startswith("Basic ")
    with pytest.raises(ConfigError) as ei:
        parse_config({"rungs": [{**RUNG, "base_url": base, "transport": "aiohttp"}]})
    assert ei.value.key == "rungs[0].transport" and "pw@" not in str(ei.value)


def test_a_failed_shadow_check_is_not_counted_as_a_check(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    """README: a shadow that fails changes nothing but its own record. It was counted in
    ``cascade_shadow_checks_total``, so disagreements over checks read low."""
    import httpx2 as httpx

    from cascade.serve import create_app
    from tests.loopback import openai_error, openai_reply
    from tests.serve_kit import ladder, serving

    def handle(req: RecordedRequest) -> Reply:
        if req.json["model"] == "big":
            return openai_error(500, "down", type="server_error")
        return openai_reply("fine", model="small")

    openai_server.script(handle)
    app = create_app(ladder(tmp_path, openai_server.base_url, policy={"shadow_rate": 1.0}))
    with serving(app) as url:
        for i in range(3):
            assert httpx.post(f"{url}/v1/chat/completions", json={
                "model": "cascade", "messages": [{"role": "user", "content": f"q{i}"}]}
                ).status_code == 200
        assert app.state.service.cascade.drain_shadows(10)
        metrics = httpx.get(f"{url}/metrics").text
    assert any(r.json["model"] == "big" for r in openai_server.requests)  # the checks ran
    assert not [line for line in metrics.splitlines()
                if line.startswith("cascade_shadow_checks_total{")], metrics
