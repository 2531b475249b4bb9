"""The audit log on its own: line types, rotation by size, a full queue counted and never
waited on, secrets cut from every line, shadow lines; and the spans of :mod:`cascade.telemetry`
checked with the OpenTelemetry SDK's in-memory exporter."""

from __future__ import annotations

import fcntl
import gc
import json
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cascade import Answer, Attempt, Cascade, NoAnswerError, Verdict
from cascade.audit import AuditLog
from cascade.messages import Request, normalise_messages
from cascade.serve import create_app
from cascade.telemetry import COST_ATTRIBUTE, Telemetry
from cascade.testing import Script
from tests.loopback import LoopbackServer, openai_reply
from tests.serve_kit import echo_handler, ladder, serving


def _request(text: str = "hello", request_id: str = "", **meta: Any) -> Request:
    return Request(messages=normalise_messages(text), metadata=meta, id=request_id)


def _answer(rid: str = "r1", text: str = "hi") -> Answer:
    a = Attempt(rung=0, model="small", provider="openai", status="accepted", text=text,
                input_tokens=5, output_tokens=2, cost_usd=0.001, latency_ms=12.5,
                started_at=1_700_000_000.0, finish_reason="stop",
                verdicts=[Verdict(passed=True, reason="fine", score=0.9, verifier="confidence")])
    return Answer(text=text, model="small", verified=True, attempts=[a], cost_usd=0.001,
                  latency_ms=13.0, request_id=rid)


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_lines_of_each_type_are_keyed_by_request_id(tmp_path: Path) -> None:
    with AuditLog(tmp_path / "a.jsonl", ladder="lad") as log:
        req = _request(client="c1")
        ans = _answer("r1")
        log.on_answer(req, ans, None)
        err = NoAnswerError("every rung failed", Answer(text="", model="", verified=False,
                                                        attempts=[], request_id="r2"))
        log.on_answer(_request(), None, err)
        log.on_shadow(_request(request_id="r1"), ans.attempts[0],
                      Attempt(rung=1, model="big", provider="openai", status="shadow",
                              text="hello"), False)
        log.feedback("r1", True, expected="hi", client="c1")
    lines = _lines(tmp_path / "a.jsonl")
    assert [(x["type"], x["request_id"]) for x in lines] == [
        ("answer", "r1"), ("answer", "r2"), ("shadow", "r1"), ("feedback", "r1")]
    assert lines[0]["trace"] == ans.to_dict() and lines[0]["ladder"] == "lad"
    assert lines[0]["client"] == "c1" and lines[0]["answer"] == "hi"
    assert lines[1]["error"] == {"type": "NoAnswerError", "message": "every rung failed"}
    assert lines[2]["agreed"] is False and lines[2]["shadow"]["model"] == "big"
    assert lines[3]["correct"] is True and lines[3]["expected"] == "hi"


def test_rotates_by_size_and_keeps_every_line(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    with AuditLog(path, max_bytes=2000, backups=50) as log:
        for i in range(60):
            log.on_answer(_request(f"question {i}"), _answer(f"r{i}"), None)
            log.flush()
    files = sorted(tmp_path.glob("a.jsonl*"))
    assert len(files) > 3
    assert all(f.stat().st_size <= 2000 for f in files if f.suffix != ".lock")
    ids = {x["request_id"] for f in files if not f.name.endswith(".lock") for x in _lines(f)}
    assert ids == {f"r{i}" for i in range(60)}
    # the newest lines are in the live file, the oldest in the highest backup
    assert _lines(path)[-1]["request_id"] == "r59"


def test_a_full_queue_drops_and_counts_instead_of_waiting(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    log = AuditLog(path, queue_size=5)
    with open(f"{path}.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another "worker" holds the file: the writer waits
        for i in range(50):
            log.on_answer(_request(), _answer(f"r{i}"), None)  # returns at once
        assert log.dropped >= 40
        fcntl.flock(held, fcntl.LOCK_UN)
    log.flush()
    log.on_answer(_request(), _answer("after"), None)
    log.close()
    lines = _lines(path)
    dropped = [x for x in lines if x["type"] == "dropped"]
    assert dropped and dropped[-1]["dropped_total"] == log.dropped
    assert len([x for x in lines if x["type"] == "answer"]) == 50 - log.dropped + 1


def test_secret_values_never_reach_the_file(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    secret = 'sk-"quoted"-ünï-secret'
    monkeypatch.setenv("SOME_API_KEY", secret)
    path = tmp_path / "a.jsonl"
    with AuditLog(path, secret_envs=["SOME_API_KEY", "NOT_SET_ANYWHERE"]) as log:
        log.on_answer(_request(f"my key is {secret}"), _answer(text=f"echo {secret}"), None)
    raw = path.read_bytes().decode()
    assert secret not in raw and json.dumps(secret)[1:-1] not in raw
    assert json.dumps(secret, ensure_ascii=True)[1:-1] not in raw
    assert "[redacted]" in raw



def test_shadow_checks_reach_the_log_and_metrics(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    openai_server.script(echo_handler(refuse=(), replies={"big": "something else"}))
    log = tmp_path / "audit.jsonl"
    app = create_app(ladder(tmp_path, openai_server.base_url,
                            policy={"shadow_rate": 1.0}, server={"audit_log": str(log)}))
    with serving(app) as url:
        r = httpx.post(f"{url}/v1/chat/completions", json={
            "model": "cascade", "messages": [{"role": "user", "content": "q"}]})
        assert app.state.service.cascade.drain_shadows(10)
        app.state.service.audit.flush()
        metrics = httpx.get(f"{url}/metrics").text
    assert r.json()["choices"][0]["message"]["content"] == "small says: q"
    shadow = [x for x in _lines(log) if x["type"] == "shadow"]
    assert len(shadow) == 1 and shadow[0]["agreed"] is False
    assert shadow[0]["accepted"]["text"] == "small says: q"
    assert shadow[0]["request_id"] == r.headers["x-cascade-request-id"]  # joins its answer
    assert 'cascade_shadow_disagreements_total{ladder="cascade",rung="small"} 1.0' in metrics
    del app
    gc.collect()


# ---------------------------------------------------------------- spans


@pytest.fixture
def spans() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def test_service_emits_a_request_span_with_a_child_per_rung(
        tmp_path: Path, openai_server: LoopbackServer,
        spans: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    provider, exporter = spans
    openai_server.script(echo_handler(refuse=("small",)))
    app = create_app(ladder(tmp_path, openai_server.base_url), tracer_provider=provider)
    with serving(app) as url:
        r = httpx.post(f"{url}/v1/chat/completions", json={
            "model": "cascade", "messages": [{"role": "user", "content": "q"}]})
    done = {s.name: s for s in exporter.get_finished_spans()}
    root, small, big = done["chat cascade"], done["chat small"], done["chat big"]
    assert small.parent is not None and small.parent.span_id == root.context.span_id
    assert big.parent is not None and big.parent.span_id == root.context.span_id
    assert root.attributes is not None and big.attributes is not None
    assert root.attributes["gen_ai.operation.name"] == "chat"
    assert root.attributes["gen_ai.response.model"] == "big"
    assert root.attributes["cascade.request_id"] == r.headers["x-cascade-request-id"]
    assert root.attributes[COST_ATTRIBUTE] == pytest.approx(r.json()["cascade"]["cost_usd"])
    assert big.attributes["gen_ai.request.model"] == "big"
    assert (big.attributes["gen_ai.usage.input_tokens"],
            big.attributes["gen_ai.usage.output_tokens"]) == (7, 3)
    assert tuple(big.attributes["gen_ai.response.finish_reasons"]) == ("stop",)  # type: ignore[arg-type]
    [event] = small.events
    assert event.name == "cascade.verdict" and event.attributes is not None
    assert event.attributes["cascade.verifier"] == "refusal"
    assert event.attributes["cascade.verdict.passed"] is False
    assert root.start_time is not None and small.start_time is not None
    assert root.start_time <= small.start_time and root.end_time >= big.end_time  # type: ignore[operator]


@pytest.mark.parametrize("stream", [False, True])
def test_a_callers_traceparent_is_the_request_spans_parent(
        tmp_path: Path, openai_server: LoopbackServer,
        spans: tuple[TracerProvider, InMemorySpanExporter], stream: bool) -> None:
    provider, exporter = spans
    openai_server.script(echo_handler(refuse=()))
    app = create_app(ladder(tmp_path, openai_server.base_url), tracer_provider=provider)
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    with serving(app) as url, openai.OpenAI(base_url=f"{url}/v1", api_key="x",
                                            max_retries=0) as client:
        ask = {"model": "cascade", "messages": [{"role": "user", "content": "q"}],
               "extra_headers": {"traceparent": f"00-{trace_id}-{parent_id}-01"}}
        if stream:
            assert "".join(c.choices[0].delta.content or "" for c in
                           client.chat.completions.create(stream=True, **ask) if c.choices)
        else:
            assert client.chat.completions.create(**ask).choices[0].message.content
        client.chat.completions.create(model="cascade",  # no header: a trace of its own
                                       messages=[{"role": "user", "content": "other"}])
    roots = [s for s in exporter.get_finished_spans() if s.name == "chat cascade"]
    assert len(roots) == 2
    joined, alone = roots
    assert f"{joined.context.trace_id:032x}" == trace_id
    assert joined.parent is not None and f"{joined.parent.span_id:016x}" == parent_id
    assert alone.parent is None and f"{alone.context.trace_id:032x}" != trace_id


@pytest.mark.anyio
async def test_library_users_get_the_same_spans(
        tmp_path: Path, spans: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    provider, exporter = spans
    s = Script({"small": ["fine answer"]})
    c = Cascade(ladder(tmp_path, "http://x/v1", models=("small",), verifiers=[]),
                provider_factory=s.factory, observers=[Telemetry(tracer_provider=provider)])
    await c.aanswer("q")
    names = sorted(sp.name for sp in exporter.get_finished_spans())
    assert names == ["chat cascade", "chat small"]


def test_a_drifted_rung_shows_in_metrics_and_healthz(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    # the cheap rung's answers always differ from the top rung's: far above the tolerated 5%
    openai_server.script(echo_handler(refuse=(), replies={"big": "something else"}))
    app = create_app(ladder(tmp_path, openai_server.base_url, policy={
        "shadow_rate": 1.0, "drift_max_disagreement": 0.05}))
    with serving(app) as url:
        before = httpx.get(f"{url}/metrics").text
        for i in range(25):
            httpx.post(f"{url}/v1/chat/completions", json={
                "model": "cascade", "messages": [{"role": "user", "content": f"q{i}"}]})
            assert app.state.service.cascade.drain_shadows(10)
        metrics = httpx.get(f"{url}/metrics").text
        health = httpx.get(f"{url}/healthz").json()
    assert 'cascade_drift_alarm{rung="small"} 1.0' not in before
    assert 'cascade_drift_alarm{rung="small"} 1.0' in metrics
    assert health["drift_alarms"] == ["small"] and health["drift"]["small"]["alarm"] is True
    del app
    gc.collect()


def test_under_a_server_span_of_the_apps_own_the_request_span_nests_in_it(
        tmp_path: Path, openai_server: LoopbackServer,
        spans: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    """With FastAPI's instrumentation (or an APM middleware) the request already has a server
    span, continued from the caller's ``traceparent``; ours attached the caller's context over
    it, so ``chat cascade`` came out the server span's sibling instead of its child."""
    from opentelemetry import propagate
    from opentelemetry import trace as otel_trace
    from starlette.types import ASGIApp, Receive, Scope, Send

    provider, exporter = spans
    tracer = provider.get_tracer("test-server")

    class ServerSpan:  # what an instrumentation middleware does
        def __init__(self, app: ASGIApp) -> None:
            self.app = app

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await self.app(scope, receive, send)
                return
            carrier = {k.decode(): v.decode() for k, v in scope["headers"]}
            with tracer.start_as_current_span("POST", context=propagate.extract(carrier),
                                              kind=otel_trace.SpanKind.SERVER):
                await self.app(scope, receive, send)

    openai_server.script(echo_handler(refuse=()))
    app = create_app(ladder(tmp_path, openai_server.base_url), tracer_provider=provider)
    app.add_middleware(ServerSpan)
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    with serving(app) as url:
        r = httpx.post(f"{url}/v1/chat/completions", json={
            "model": "cascade", "messages": [{"role": "user", "content": "q"}]},
            headers={"traceparent": f"00-{trace_id}-{parent_id}-01"})
        assert r.status_code == 200
    done = {s.name: s for s in exporter.get_finished_spans()}
    server, root = done["POST"], done["chat cascade"]
    assert server.parent is not None and f"{server.parent.span_id:016x}" == parent_id
    assert root.parent is not None and root.parent.span_id == server.context.span_id
    assert f"{root.context.trace_id:032x}" == trace_id


def test_response_model_is_on_each_answered_attempt_and_never_empty(
        tmp_path: Path, openai_server: LoopbackServer,
        spans: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    """GenAI's ``gen_ai.response.model`` was missing on the attempt spans, and ``""`` on a
    request span whose climb gave no answer."""
    from tests.loopback import openai_error

    provider, exporter = spans
    openai_server.script(lambda req: openai_reply("Paris", model=req.json["model"])
                         if req.json["messages"][-1]["content"] == "ok" else openai_error(500))
    cfg = ladder(tmp_path, openai_server.base_url, models=("small",), verifiers=[])
    app = create_app(cfg, tracer_provider=provider)
    with serving(app) as url:
        for q in ("ok", "fail"):
            httpx.post(f"{url}/v1/chat/completions", json={
                "model": "cascade", "messages": [{"role": "user", "content": q}]})
    rungs = [s for s in exporter.get_finished_spans() if s.name == "chat small"]
    roots = [s for s in exporter.get_finished_spans() if s.name == "chat cascade"]
    assert [dict(s.attributes or {}).get("gen_ai.response.model") for s in rungs] == [
        "small", None]
    assert [dict(s.attributes or {}).get("gen_ai.response.model") for s in roots] == [
        "small", None]
