"""OpenTelemetry spans, from a black-box walk of the GenAI span contract: a shadow check is part
of its request's trace, the request span covers the request (and only it), its tokens are the
wire's ``usage``, a request refused before any call can still be found by its id, and a rung
span names the model the server said answered."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cascade import Answer, Attempt, Cascade, Verdict
from cascade.messages import Request, normalise_messages
from cascade.serve import create_app
from cascade.telemetry import COST_ATTRIBUTE, Telemetry
from tests.loopback import LoopbackServer, RecordedRequest, Reply, openai_reply
from tests.serve_kit import echo_handler, ladder, serving

Spans = tuple[TracerProvider, InMemorySpanExporter]


@pytest.fixture
def spans() -> Spans:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def _attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def _ask(url: str, **extra: Any) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json={
        "model": "cascade", "messages": [{"role": "user", "content": "q"}], **extra})


def test_a_shadow_checks_span_is_a_child_of_its_requests_span(
        tmp_path: Path, openai_server: LoopbackServer, spans: Spans) -> None:
    """It was the root of a trace of its own, with no request id: paid for and charged to the
    request, it could not be found from it."""
    provider, exporter = spans
    openai_server.script(echo_handler(refuse=()))
    app = create_app(ladder(tmp_path, openai_server.base_url, policy={"shadow_rate": 1.0}),
                     tracer_provider=provider)
    with serving(app) as url:
        r = _ask(url)
        assert app.state.service.cascade.drain_shadows(10)
    rid = r.headers["x-cascade-request-id"]
    done = exporter.get_finished_spans()
    [root] = [s for s in done if s.name == "chat cascade"]
    [shadow] = [s for s in done if _attrs(s).get("cascade.status") == "shadow"]
    assert shadow.name == "chat big"
    assert shadow.context.trace_id == root.context.trace_id
    assert shadow.parent is not None and shadow.parent.span_id == root.context.span_id
    assert _attrs(shadow)["cascade.request_id"] == rid == _attrs(root)["cascade.request_id"]


@pytest.mark.anyio
async def test_the_request_span_covers_the_request_and_ends_with_it(
        tmp_path: Path, openai_server: LoopbackServer, spans: Spans) -> None:
    """It began at the first rung's start and lasted the whole request's latency, so on a first
    request (building the providers comes first) it ended most of a second after the caller's
    own span had."""
    provider, exporter = spans
    openai_server.script(echo_handler(refuse=("small",)))
    c = Cascade(ladder(tmp_path, openai_server.base_url),
                observers=[Telemetry(tracer_provider=provider)])
    try:
        for i in range(2):
            exporter.clear()
            with provider.get_tracer("caller").start_as_current_span("caller"):
                await c.aanswer(f"q{i}")
            done = {s.name: s for s in exporter.get_finished_spans()}
            caller, root = done["caller"], done["chat cascade"]
            children = [done["chat small"], done["chat big"]]
            assert caller.start_time is not None and caller.end_time is not None
            assert root.start_time is not None and root.end_time is not None
            assert caller.start_time <= root.start_time
            assert root.end_time <= caller.end_time, f"request {i}"
            for child in children:
                assert child.start_time is not None and child.end_time is not None
                assert root.start_time <= child.start_time
                assert child.end_time <= root.end_time
    finally:
        await c.aclose()


def test_a_cache_hits_span_counts_no_tokens(
        tmp_path: Path, openai_server: LoopbackServer, spans: Spans) -> None:
    """The wire's usage of a hit is 0 (nothing was called); its span said the first climb's
    tokens, so a dashboard summing GenAI tokens counted cached answers again."""
    provider, exporter = spans
    openai_server.script(echo_handler(refuse=()))
    cfg = ladder(tmp_path, openai_server.base_url,
                 cache={"enabled": True, "directory": str(tmp_path / "cache")})
    with serving(create_app(cfg, tracer_provider=provider)) as url:
        first, hit = _ask(url), _ask(url)
    assert hit.headers["x-cascade-cache-hit"] == "true"
    assert hit.json()["usage"]["prompt_tokens"] == 0
    roots = [_attrs(s) for s in exporter.get_finished_spans() if s.name == "chat cascade"]
    assert [r["cascade.cache_hit"] for r in roots] == [False, True]
    assert roots[0]["gen_ai.usage.input_tokens"] == first.json()["usage"]["prompt_tokens"] > 0
    assert (roots[1]["gen_ai.usage.input_tokens"], roots[1]["gen_ai.usage.output_tokens"]) == (0, 0)


def test_a_request_refused_before_any_call_has_its_request_id_on_its_span(
        tmp_path: Path, openai_server: LoopbackServer, spans: Spans) -> None:
    """A 429 from an exhausted budget carries ``x-cascade-request-id``; its span had neither
    the id nor a cost, so it could not be joined to the response or the audit line."""
    provider, exporter = spans
    openai_server.script(echo_handler(refuse=()))
    cfg = ladder(tmp_path, openai_server.base_url, budget={"limit_usd": 1e-9})
    with serving(create_app(cfg, tracer_provider=provider)) as url:
        r = _ask(url)
    assert r.status_code == 429 and not openai_server.requests
    [root] = [s for s in exporter.get_finished_spans() if s.name == "chat cascade"]
    attrs = _attrs(root)
    assert attrs["cascade.request_id"] == r.headers["x-cascade-request-id"]
    assert attrs[COST_ATTRIBUTE] == 0.0 and attrs["cascade.verified"] is False
    assert attrs["error.type"] == "BudgetExceeded"


def test_the_request_spans_tokens_count_paid_verifier_calls_as_the_wire_usage_does(
        spans: Spans) -> None:
    """A judge's call was in the wire's ``usage`` and the span's cost but not its tokens."""
    provider, exporter = spans
    judged = Verdict(verifier="judge", passed=True, reason="graded 9/10", input_tokens=100,
                     output_tokens=20, cost_usd=0.00012)
    attempt = Attempt(rung=0, model="small", provider="openai-compatible", status="accepted",
                      text="hi", input_tokens=7, output_tokens=3, cost_usd=0.000133,
                      verdicts=[judged], started_at=1.0, latency_ms=5.0)
    answer = Answer(text="hi", model="small", verified=True, attempts=[attempt],
                    cost_usd=0.000133, latency_ms=6.0, request_id="r1")
    request = Request(messages=normalise_messages("q"), id="r1")
    Telemetry(tracer_provider=provider).on_answer(request, answer, None)
    done = {s.name: _attrs(s) for s in exporter.get_finished_spans()}
    assert (done["chat cascade"]["gen_ai.usage.input_tokens"],
            done["chat cascade"]["gen_ai.usage.output_tokens"]) == (107, 23)
    # the rung's span is its own call's
    assert (done["chat small"]["gen_ai.usage.input_tokens"],
            done["chat small"]["gen_ai.usage.output_tokens"]) == (7, 3)


def test_a_rung_spans_response_model_is_the_one_the_server_named(
        tmp_path: Path, openai_server: LoopbackServer, spans: Spans) -> None:
    """GenAI's ``gen_ai.response.model`` is the model that answered (a dated snapshot, here);
    it was the configured name."""
    provider, exporter = spans

    def dated(req: RecordedRequest) -> Reply:
        return openai_reply("fine", model=f"{req.json['model']}-2024-07-18")

    openai_server.script(dated)
    cfg = ladder(tmp_path, openai_server.base_url, models=("small",), verifiers=[])
    with serving(create_app(cfg, tracer_provider=provider)) as url:
        assert _ask(url).status_code == 200
    done = {s.name: _attrs(s) for s in exporter.get_finished_spans()}
    assert done["chat small"]["gen_ai.request.model"] == "small"
    assert done["chat small"]["gen_ai.response.model"] == "small-2024-07-18"
    assert done["chat cascade"]["gen_ai.response.model"] == "small-2024-07-18"


def test_a_shadow_check_that_finishes_before_its_requests_span_is_still_its_child(
        spans: Spans) -> None:
    """The shadow is sampled inside the climb, the request's span is built after it, by the
    observers: a fast top rung (or a drift comparison, which makes no call) finished first,
    found no parent, and became the root of a trace of its own (16 of 20 in a review's run)."""
    provider, exporter = spans
    telemetry = Telemetry(tracer_provider=provider)
    request = Request(messages=normalise_messages("q"), id="r-early")
    accepted = Attempt(rung=0, model="small", provider="openai-compatible", status="accepted",
                       text="hi", started_at=1.0, latency_ms=5.0)
    shadow = Attempt(rung=1, model="big", provider="openai-compatible", status="shadow",
                     text="hi", started_at=1.001, latency_ms=3.0)
    telemetry.on_shadow(request, accepted, shadow, True)
    assert not exporter.get_finished_spans()  # kept until its request's span exists
    answer = Answer(text="hi", model="small", verified=True, attempts=[accepted],
                    latency_ms=6.0, request_id="r-early")
    telemetry.on_answer(request, answer, None)
    done = exporter.get_finished_spans()
    [root] = [s for s in done if s.name == "chat cascade"]
    [check] = [s for s in done if _attrs(s).get("cascade.status") == "shadow"]
    assert check.parent is not None and check.parent.span_id == root.context.span_id
    assert _attrs(check)["cascade.shadow.agreed"] is True
