"""OpenTelemetry spans for every answer, after the GenAI semantic conventions; an observer.

Only ``opentelemetry-api`` is needed: without an SDK the tracer is a no-op. With one (any
exporter), each request becomes a span ``chat <ladder>`` with one child span per rung attempt
(``chat <model>``), placed in time by the attempt's ``started_at`` and ``latency_ms``, so the
spans are built after the answer is final and cost the climb nothing. Verifier verdicts are
span events named ``cascade.verdict``; cost is the attribute ``cascade.cost_usd``. A rung that
made no call (routed past, skipped for budget, deadline or cap) is no model-call span, which
GenAI dashboards would count as a call: it is an event ``cascade.rung_not_called`` on the
request span. A shadow check's span (status ``shadow``), built when it finishes, is a child of
its request's span.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, SpanKind, Status, StatusCode

from cascade.messages import Request
from cascade.trace import Answer, Attempt

__all__ = ["COST_ATTRIBUTE", "Telemetry"]

COST_ATTRIBUTE = "cascade.cost_usd"
"""The span attribute that carries what a request or an attempt cost, in USD."""

_NOT_CALLED = frozenset({"routed", "skipped"})
"""Attempt statuses of rungs that made no model call."""
_Shadow = tuple[Request, Attempt, Attempt, "bool | None"]
"""A shadow check's ``on_shadow`` arguments, kept until its request's span exists."""
_RECENT_SPANS = 4096
"""Request spans remembered for their shadow checks (a check that finds none is a root)."""


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


class Telemetry:
    """Turns answers and shadow checks into spans on ``tracer_provider`` (default: the global
    one, so whatever SDK the application set up receives them)."""

    def __init__(self, *, ladder: str = "cascade",
                 tracer_provider: trace.TracerProvider | None = None) -> None:
        self.ladder = ladder
        self._tracer = trace.get_tracer("cascade", tracer_provider=tracer_provider)
        self._recent: OrderedDict[str, SpanContext] = OrderedDict()
        self._early: dict[str, list[_Shadow]] = {}
        self._lock = threading.Lock()

    def on_answer(self, request: Request, answer: Answer | None,
                  error: BaseException | None) -> None:
        traced = answer if answer is not None else getattr(error, "answer", None)
        attempts: Sequence[Attempt] = traced.attempts if isinstance(traced, Answer) else ()
        latency_s = (traced.latency_ms / 1000) if isinstance(traced, Answer) else 0.0
        # Called as the answer is final: the request span ends now and began ``latency``
        # ago (building providers, the cache lookup and routing come before the first rung).
        end = time.time()
        cache_hit = isinstance(traced, Answer) and traced.cache_hit
        calls = [] if cache_hit else [a for a in attempts if a.status not in _NOT_CALLED]
        start = min([end - latency_s, *(a.started_at for a in calls if a.started_at)])
        end = max([end, *(a.started_at + a.latency_ms / 1000 for a in calls if a.started_at)])
        ladder = str(request.metadata.get("ladder", self.ladder))
        span = self._tracer.start_span(
            f"chat {ladder}", kind=SpanKind.INTERNAL, start_time=_ns(start),
            attributes={"gen_ai.operation.name": "chat", "gen_ai.request.model": ladder})
        # a request refused before any call still joins its 429 and its audit line
        rid = request.id or (traced.request_id if isinstance(traced, Answer) else "") or str(
            getattr(error, "request_id", None) or "")
        if rid:
            span.set_attribute("cascade.request_id", rid)
        span.set_attributes({COST_ATTRIBUTE: 0.0, "cascade.verified": False})
        if isinstance(traced, Answer):
            if traced.model:  # no answer (an error): no response model, not ""
                accepted = next((a for a in attempts if a.status == "accepted"), None)
                span.set_attribute("gen_ai.response.model", (
                    accepted.response_model if accepted is not None else None) or traced.model)
            span.set_attributes({
                # every call made for it, paid verifiers too: what the wire's usage says
                "gen_ai.usage.input_tokens": traced.input_tokens,
                "gen_ai.usage.output_tokens": traced.output_tokens,
                COST_ATTRIBUTE: traced.cost_usd,
                "cascade.verified": answer is not None and answer.verified,
                "cascade.cache_hit": traced.cache_hit,
            })
        if error is not None:
            span.set_attribute("error.type", type(error).__name__)
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        try:
            if not cache_hit:
                parent = trace.set_span_in_context(span)
                for a in attempts:
                    if a.status in _NOT_CALLED:
                        span.add_event("cascade.rung_not_called", timestamp=_ns(
                            a.started_at or start), attributes={
                            "cascade.rung": a.rung, "cascade.rung.name": a.name or a.model,
                            "cascade.status": a.status,
                            "cascade.reason": a.note or a.error or ""})
                    else:
                        self._attempt_span(a, parent=parent)
        finally:  # a request span left open is never exported
            span.end(end_time=_ns(end))
            if rid:
                for early in self._remember(rid, span.get_span_context()):
                    self._shadow_span(*early)

    def _remember(self, request_id: str, context: SpanContext) -> list[_Shadow]:
        """Keep the request span's context a while, for its shadow checks (which finish later,
        on another thread) to be its children; the oldest are dropped past a bound. Returns the
        checks that finished before it (a fast top rung, or a drift comparison with no call),
        to be built now."""
        with self._lock:
            self._recent[request_id] = context
            while len(self._recent) > _RECENT_SPANS:
                self._recent.popitem(last=False)
            return self._early.pop(request_id, [])

    def on_shadow(self, request: Request, accepted: Attempt, shadow: Attempt,
                  agreed: bool | None) -> None:
        with self._lock:
            if request.id and request.id not in self._recent:
                # before its request's span: built with it (on_answer always follows)
                self._early.setdefault(request.id, []).append((request, accepted, shadow,
                                                               agreed))
                while len(self._early) > _RECENT_SPANS:
                    self._early.pop(next(iter(self._early)))
                return
        self._shadow_span(request, accepted, shadow, agreed)

    def _shadow_span(self, request: Request, accepted: Attempt, shadow: Attempt,
                     agreed: bool | None) -> None:
        with self._lock:
            context = self._recent.get(request.id) if request.id else None
        parent = None if context is None else trace.set_span_in_context(
            NonRecordingSpan(context))
        span = self._attempt_span(shadow, parent=parent, end=False)
        span.set_attribute("cascade.shadow.of_rung", accepted.name or accepted.model)
        if request.id:
            span.set_attribute("cascade.request_id", request.id)
        if agreed is not None:
            span.set_attribute("cascade.shadow.agreed", agreed)
        span.end(end_time=_ns((shadow.started_at or time.time()) + shadow.latency_ms / 1000))

    def _attempt_span(self, a: Attempt, *, parent: Context | None, end: bool = True) -> Span:
        start = a.started_at or time.time()
        span = self._tracer.start_span(
            f"chat {a.model}", kind=SpanKind.CLIENT, start_time=_ns(start),
            context=parent,
            attributes={
                "gen_ai.operation.name": "chat",
                "gen_ai.provider.name": a.provider,
                "gen_ai.request.model": a.model,
                "gen_ai.usage.input_tokens": a.input_tokens,
                "gen_ai.usage.output_tokens": a.output_tokens,
                "gen_ai.response.finish_reasons": [a.finish_reason] if a.finish_reason else [],
                COST_ATTRIBUTE: a.cost_usd,
                "cascade.rung": a.rung,
                "cascade.rung.name": a.name or a.model,
                "cascade.status": a.status,
            })
        if a.status in ("accepted", "rejected", "shadow"):  # a reply came back
            span.set_attribute("gen_ai.response.model", a.response_model or a.model)
        for v in a.verdicts:
            attrs: dict[str, str | bool | float] = {
                "cascade.verifier": v.verifier, "cascade.verdict.passed": v.passed,
                "cascade.verdict.reason": v.reason, "cascade.verdict.skipped": v.skipped}
            if v.score is not None:
                attrs["cascade.verdict.score"] = v.score
            span.add_event("cascade.verdict", attributes=attrs, timestamp=_ns(start))
        if a.status == "error":
            span.set_attribute("error.type", a.error_type or "error")
            span.set_status(Status(StatusCode.ERROR, a.error_type or "error"))
        if end:
            span.end(end_time=_ns(start + a.latency_ms / 1000))
        return span
