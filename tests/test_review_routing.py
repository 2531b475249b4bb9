"""Adversarial review of routing, load-aware endpoint choice, breakers, retries and spans: each
test failed on the code before its fix."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cascade import Cascade, ModelCall, Provider, RungConfig
from cascade.errors import ConfigError
from cascade.messages import Message
from cascade.routing import load_router, read_model
from cascade.routing.model import fit_model
from cascade.telemetry import Telemetry
from cascade.testing import FakeClock, FunctionProvider
from cascade.trace import Answer, Attempt

# ---------------------------------------------------------------- router files and tables


def _router_file(tmp_path: Path) -> Path:
    docs = [(Message("system", "S"), Message("user", f"question number {i} about {w}"))
            for i, w in enumerate(["cats", "dogs", "maths", "cats", "dogs", "maths"])]
    correct = np.array([[i % 2 == 0, True] for i in range(len(docs))])
    path = tmp_path / "router.json"
    fit_model(docs, correct, ("small", "big")).save(path)
    return path


@pytest.mark.parametrize(("edit", "needle"), [
    (lambda d: d.update(trained_on="many"), "trained_on"),
    (lambda d: d.update(trained_on=[3]), "trained_on"),
    (lambda d: d.update(trained_on=1e400), "trained_on"),  # json reads it as inf
    (lambda d: d.update(version=True), "version is True"),
])
def test_a_bad_router_file_is_a_config_error_not_a_crash(
        tmp_path: Path, edit: Callable[[dict[str, Any]], None], needle: str) -> None:
    """``trained_on`` went through int() unchecked (ValueError/TypeError/OverflowError out of
    the Cascade's constructor), and ``version: true`` passed as version 1 (True == 1)."""
    path = _router_file(tmp_path)
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d).replace("Infinity", "1e400"))
    with pytest.raises(ConfigError) as e:
        read_model(path)
    assert needle in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), 1.5, -0.1])
def test_skip_below_must_be_a_probability(tmp_path: Path, bad: float) -> None:
    """NaN was refused but inf (TOML's ``inf``) or 1.5 passed: a threshold no probability can
    meet silently skips the rung on every request."""
    _router_file(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_router({"path": "router.json", "skip_below": [bad, 0.0]}, base_dir=tmp_path)
    assert e.value.key == "router.skip_below"


# ---------------------------------------------------------------- load-aware endpoint choice


def _timed(clock: FakeClock, seconds: dict[str, list[float]], calls: list[str]
           ) -> Callable[[RungConfig], Provider]:
    """Providers that take (in fake time) the next of ``seconds[base_url]`` per call."""
    def factory(rung: RungConfig) -> Provider:
        url = rung.base_url or ""

        def answer(call: ModelCall) -> str:
            calls.append(url)
            todo = seconds[url]
            clock.advance(todo.pop(0) if len(todo) > 1 else todo[0])
            return "Canberra"
        return FunctionProvider(answer)
    return factory


def _urls(n: int) -> list[str]:
    tag = uuid.uuid4().hex[:8]  # latency figures are process-wide: endpoints of this test only
    return [f"http://ep{i}-{tag}/v1" for i in range(n)]


@pytest.mark.anyio
async def test_a_dearer_fallback_of_the_same_model_is_not_equivalent() -> None:
    """The same model behind a fallback with its own (dearer) price, or other settings, is
    not interchangeable: load-aware choice sent the second request to the untimed dearer one."""
    a, b = _urls(2)
    clock, calls = FakeClock(), list[str]()
    cfg = {"rungs": [{"model": "m", "provider": "openai-compatible", "base_url": a,
                      "input_usd_per_mtok": 1.0, "output_usd_per_mtok": 1.0,
                      "fallbacks": [{"base_url": b, "input_usd_per_mtok": 10.0}]}],
           "cache": {"enabled": False}}
    c = Cascade.from_dict(cfg, provider_factory=_timed(clock, {a: [0.5], b: [0.1]}, calls),
                          clock=clock)
    for _ in range(3):
        ans = await c.aanswer("q")
        assert ans.attempts[0].note is None
    assert calls == [a, a, a]


@pytest.mark.anyio
async def test_a_slow_endpoint_is_measured_again_later() -> None:
    """Once an equivalent endpoint was seen slow it was never called again, so it could never
    be seen to have recovered: now it is re-measured once it has not been tried for a while."""
    a, b = _urls(2)
    clock, calls = FakeClock(), list[str]()
    cfg = {"rungs": [{"model": "m", "provider": "openai-compatible", "base_url": a,
                      "price": "unknown", "fallbacks": [{"base_url": b}]}],
           "cache": {"enabled": False}}
    c = Cascade.from_dict(cfg, provider_factory=_timed(clock, {a: [0.2], b: [3.0, 0.01]},
                                                       calls), clock=clock)
    for _ in range(3):
        await c.aanswer("q")
    assert calls == [a, b, a]  # b untimed gets its chance, then is slower
    for _ in range(5):  # steady traffic, 10 s apart
        clock.advance(10.0)
        await c.aanswer("q")
    assert b not in calls[3:]  # not re-measured on every request
    clock.advance(20.0)
    ans = await c.aanswer("q")
    assert calls[-1] == b and "re-measuring" in (ans.attempts[0].note or "")
    clock.advance(10.0)
    await c.aanswer("q")
    assert calls[-1] == a  # measured again (fast now, but its mean is still above a's)


# ---------------------------------------------------------------- breakers and deadlines


def _breaker_cascade(url: str, answer: Any, clock: FakeClock) -> Cascade:
    """One rung at ``url`` answered by ``answer``, a breaker that opens after 2 failures, no
    retries, in ``clock``'s fake time."""
    cfg = {"rungs": [{"model": "m", "provider": "openai-compatible", "base_url": url,
                      "price": "unknown", "timeout_s": 30.0}],
           "breaker": {"failure_threshold": 2, "cooldown_s": 60.0},
           "retry": {"max_attempts": 1}, "cache": {"enabled": False}}
    return Cascade.from_dict(cfg, provider_factory=FunctionProvider(answer).factory, clock=clock)


@pytest.mark.anyio
async def test_calls_cut_short_by_the_requests_deadline_do_not_open_the_circuit() -> None:
    """A healthy endpoint (1 to 1.5 s a call, timeout 30 s) asked by clients with tight
    deadlines (1.2 s, above its mean, so the deadline gate lets the call start): each slower
    call is cut to what the request has left and times out. That is the caller's limit, not
    the endpoint failing, yet two such requests opened its circuit for everyone (a request with
    all the time it needs then got CircuitOpen)."""
    from cascade.errors import ProviderTimeout

    (a,) = _urls(1)
    clock = FakeClock()
    takes = [1.0, 1.5]

    def answer(call: ModelCall) -> str:
        need = takes.pop(0) if len(takes) > 1 else takes[0]
        if call.timeout_s < need:  # the SDK's own timeout fires, in fake time
            clock.advance(call.timeout_s)
            raise ProviderTimeout("read timed out", provider="openai-compatible", model="m")
        clock.advance(need)
        return "Canberra"

    c = _breaker_cascade(a, answer, clock)
    assert (await c.aanswer("q")).text == "Canberra"  # timed: about 1 s a call
    for _ in range(3):
        with pytest.raises(Exception, match="ProviderTimeout"):
            await c.aanswer("q", timeout_s=1.2)
    ans = await c.aanswer("q")
    assert ans.text == "Canberra" and ans.attempts[0].status == "accepted"


@pytest.mark.anyio
async def test_a_hung_endpoint_still_opens_its_circuit_under_tight_deadlines() -> None:
    """The other side of the rule above: a call given twice the endpoint's usual time that
    still timed out counts against it, so a hung endpoint is skipped after the threshold."""
    from cascade.errors import ProviderTimeout

    (a,) = _urls(1)
    clock = FakeClock()
    hung = [False]

    def answer(call: ModelCall) -> str:
        if hung[0]:
            clock.advance(call.timeout_s)
            raise ProviderTimeout("read timed out", provider="openai-compatible", model="m")
        clock.advance(1.0)
        return "Canberra"

    c = _breaker_cascade(a, answer, clock)
    await c.aanswer("q")
    hung[0] = True
    for _ in range(2):
        with pytest.raises(Exception, match="ProviderTimeout"):
            await c.aanswer("q", timeout_s=5.0)
    with pytest.raises(Exception, match="CircuitOpen"):
        await c.aanswer("q", timeout_s=5.0)


# ---------------------------------------------------------------- spans


def _spans() -> tuple[Telemetry, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Telemetry(tracer_provider=provider), exporter


def test_rungs_never_called_are_no_model_call_spans() -> None:
    """A rung the router ruled out, or one skipped for budget or deadline, made no call, yet
    each became a CLIENT span ``chat <model>`` with zero tokens: GenAI dashboards counted
    calls (and their latency) that never happened. They are events on the request span."""
    from cascade.messages import Request

    tel, exporter = _spans()
    attempts = [
        Attempt(rung=0, model="small", provider="openai", status="routed", started_at=100.0,
                note="started at rung 2: router P(rung 0 right) = 0.10 < 0.50"),
        Attempt(rung=1, model="mid", provider="openai", status="skipped", started_at=100.0,
                error="budget: would exceed max_cost_usd"),
        Attempt(rung=2, model="big", provider="openai", status="accepted", started_at=100.0,
                latency_ms=500.0, input_tokens=7, output_tokens=3, finish_reason="stop"),
    ]
    ans = Answer(text="x", model="big", verified=True, attempts=attempts, latency_ms=600.0,
                 request_id="r1")
    tel.on_answer(Request(messages=(Message("user", "q"),)), ans, None)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert sorted(spans) == ["chat big", "chat cascade"]
    events = [(e.name, dict(e.attributes or {})) for e in spans["chat cascade"].events]
    assert [(n, a["cascade.rung"], a["cascade.status"]) for n, a in events] == [
        ("cascade.rung_not_called", 0, "routed"), ("cascade.rung_not_called", 1, "skipped")]
    assert "router P(rung 0 right)" in str(events[0][1]["cascade.reason"])


# ---------------------------------------------------------------- features


def test_the_same_text_in_another_unicode_form_scores_the_same() -> None:
    """Suites are mostly NFC; a client on macOS may send NFD ("é" as "e" + a combining
    accent). ``\\w`` splits at the accent, so "régime" became "gime" (and "r" dropped), and the
    system prompt's hash differed, so the request was "unfamiliar" and not routed at all."""
    import unicodedata

    system = "Réponds brièvement."
    docs = [(Message("system", system), Message("user", f"{w} question {i} générale"))
            for i, w in enumerate(["régime", "café", "élève", "théâtre"] * 3)]
    correct = np.array([[i % 2 == 0, True] for i in range(len(docs))])
    model = fit_model(docs, correct, ("small", "big"))
    from cascade.routing import Router

    router = Router(model, (0.5, 0.0))
    nfd = tuple(Message(m.role, unicodedata.normalize("NFD", m.content)) for m in docs[0])
    assert nfd != docs[0]
    r, want = router.route(nfd, {}), router.route(docs[0], {})
    assert "not seen this system prompt" not in r.reason
    np.testing.assert_allclose(r.scores, want.scores)
