"""OpenTelemetry spans for every answer, after the GenAI semantic conventions; an observer.

Only ``opentelemetry-api`` is needed: without an SDK the tracer is a no-op. With one (any
exporter), each request becomes a span ``chat <ladder>`` with one child span per rung attempt
(``chat <model>``), placed in time by the attempt's ``started_at`` and ``latency_ms``, so the
spans are built after the answer is final and cost the climb nothing. Verifier verdicts are
span events named ``cascade.verdict``; cost is the attribute ``cascade.cost_usd``. A rung that
made no call (routed past, skipped for budget, deadline or cap) is no model-call span, which
GenAI dashboards would count as a call: it is an event ``cascade.rung_not_called`` on the
request span.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from cascade.messages import Request
from cascade.trace import Answer, Attempt

__all__ = ["COST_ATTRIBUTE", "Telemetry"]

COST_ATTRIBUTE = "cascade.cost_usd"
"""The span attribute that carries what a request or an attempt cost, in USD."""

_NOT_CALLED = frozenset({"routed", "skipped"})
"""Attempt statuses of rungs that made no model call."""


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


class Telemetry:
    """Turns answers and shadow checks into spans on ``tracer_provider`` (default: the global
    one, so whatever SDK the application set up receives them)."""

    def __init__(self, *, ladder: str = "cascade",
                 tracer_provider: trace.TracerProvider | None = None) -> None:
        self.ladder = ladder
        self._tracer = trace.get_tracer("cascade", tracer_provider=tracer_provider)

    def on_answer(self, request: Request, answer: Answer | None,
                  error: BaseException | None) -> None:
        traced = answer if answer is not None else getattr(error, "answer", None)
        attempts: Sequence[Attempt] = traced.attempts if isinstance(traced, Answer) else ()
        latency_s = (traced.latency_ms / 1000) if isinstance(traced, Answer) else 0.0
        starts = [a.started_at for a in attempts if a.started_at]
        start = min(starts) if starts and not (traced and traced.cache_hit) \
            else time.time() - latency_s
        ladder = str(request.metadata.get("ladder", self.ladder))
        span = self._tracer.start_span(
            f"chat {ladder}", kind=SpanKind.INTERNAL, start_time=_ns(start),
            attributes={"gen_ai.operation.name": "chat", "gen_ai.request.model": ladder})
        if isinstance(traced, Answer):
            if traced.model:  # no answer (an error): no response model, not ""
                span.set_attribute("gen_ai.response.model", traced.model)
            span.set_attributes({
                "gen_ai.usage.input_tokens": traced.input_tokens,
                "gen_ai.usage.output_tokens": traced.output_tokens,
                COST_ATTRIBUTE: traced.cost_usd,
                "cascade.verified": answer is not None and answer.verified,
                "cascade.cache_hit": traced.cache_hit,
                "cascade.request_id": traced.request_id or str(
                    getattr(error, "request_id", "")),
            })
        if error is not None:
            span.set_attribute("error.type", type(error).__name__)
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        try:
            if not (isinstance(traced, Answer) and traced.cache_hit):
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
            span.end(end_time=_ns(start + latency_s))

    def on_shadow(self, request: Request, accepted: Attempt, shadow: Attempt,
                  agreed: bool | None) -> None:
        span = self._attempt_span(shadow, parent=None, end=False)
        span.set_attribute("cascade.shadow.of_rung", accepted.name or accepted.model)
        rid = request.metadata.get("request_id")
        if isinstance(rid, str):
            span.set_attribute("cascade.request_id", rid)
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
            span.set_attribute("gen_ai.response.model", a.model)
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
