"""``GET /metrics``: Prometheus text, every series named ``cascade_*``; the metrics observer.

Labels are few and bounded (ladder, rung, verified, cache_hit, outcome, client name from the
config): never a prompt, a key or a request id. With several workers, set
``PROMETHEUS_MULTIPROC_DIR`` (``cascade serve --workers N`` does) and every worker's counts
are summed into each scrape, whichever worker answers it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from cascade.messages import Request as CascadeRequest
from cascade.trace import Answer, Attempt

__all__ = ["Metrics", "router"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

_OUTCOMES = {
    "BudgetExceeded": "budget_exceeded", "DeadlineExceeded": "deadline_exceeded",
    "NoAnswerError": "no_answer", "UnverifiedAnswerError": "unverified",
    "EndpointConfigError": "config_error", "ConfigError": "bad_request",
}


def outcome_of(answer: Answer | None, error: BaseException | None) -> str:
    """A bounded name for how a request ended."""
    if error is not None:
        for cls in type(error).__mro__:
            if cls.__name__ in _OUTCOMES:
                return _OUTCOMES[cls.__name__]
        return "error"
    assert answer is not None
    return "verified" if answer.verified else "unverified"


class Metrics:
    """Counts answers, rungs, refusals and shadow checks into a registry of its own."""

    def __init__(self, ladder: str, *, audit_dropped: Callable[[], int] | None = None) -> None:
        self.ladder = ladder
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        lr = ["ladder", "rung"]
        self.requests = Counter("cascade_requests", "Requests by accepting rung and outcome",
                                ["ladder", "rung", "verified", "cache_hit", "outcome"],
                                registry=r)
        self.latency = Histogram("cascade_request_latency_seconds", "Request latency",
                                 ["ladder", "outcome"], buckets=_LATENCY_BUCKETS, registry=r)
        self.first_token = Histogram(
            "cascade_stream_first_token_seconds",
            "Streamed requests: time to the first content chunk (the verified answer's)",
            ["ladder"], buckets=_LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("cascade_requests_in_flight", "Requests being answered",
                               ["ladder"], registry=r, multiprocess_mode="livesum")
        self.rung_calls = Counter("cascade_rung_calls", "Rung attempts that called a model",
                                  lr, registry=r)
        self.rung_errors = Counter("cascade_rung_errors", "Rung attempts whose call failed",
                                   lr, registry=r)
        self.rung_skips = Counter("cascade_rung_skips",
                                  "Rungs skipped (budget, deadline, open circuit)", lr,
                                  registry=r)
        self.escalations = Counter("cascade_escalations",
                                   "Rungs whose answer was rejected or whose call failed, "
                                   "the climb going on to a later rung",
                                   lr, registry=r)
        self.rung_latency = Histogram("cascade_rung_latency_seconds",
                                      "Rung attempt latency (call and verifiers)", lr,
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self.cost = Counter("cascade_cost_usd", "Money spent, by rung (verifier calls included)",
                            lr, registry=r)
        self.budget_refusals = Counter("cascade_budget_refusals",
                                       "Requests refused because a budget would be exceeded",
                                       ["ladder"], registry=r)
        self.refused = Counter("cascade_refused_requests",
                               "Requests refused before the climb (auth, rate limit, bad input)",
                               ["ladder", "outcome"], registry=r)
        self.shadows = Counter("cascade_shadow_checks", "Shadow checks by the top rung",
                               lr, registry=r)
        self.shadow_disagreements = Counter("cascade_shadow_disagreements",
                                            "Shadow checks where the top rung disagreed", lr,
                                            registry=r)
        self.drift_alarm = Gauge("cascade_drift_alarm", "1 while a rung's drift alarm is up "
                                 "(its answers escalate)", ["rung"], registry=r,
                                 multiprocess_mode="mostrecent")
        self.store_reachable = Gauge("cascade_store_reachable",
                                     "1 while the shared store (Redis) answers, 0 while it is "
                                     "down (the answering worker's view)", ["store"], registry=r,
                                     multiprocess_mode="mostrecent")
        self.store_unsettled = Gauge("cascade_store_unsettled",
                                     "Settles waiting for the shared store, in memory and "
                                     "journal (the answering worker's)", ["store"], registry=r,
                                     multiprocess_mode="mostrecent")
        self.config_reloads = Counter("cascade_config_reloads",
                                      "Config reloads (SIGHUP or a changed file) by outcome: "
                                      "ok, or error (the old config kept serving)", ["outcome"],
                                      registry=r)
        self._audit_dropped = audit_dropped
        self._dropped_seen = 0
        self._dropped_lock = threading.Lock()  # answers may end on more than one thread
        # A counter of its own (not read at scrape time), so that with --workers N each
        # worker's count is in its multiprocess file and every scrape shows their sum.
        self.audit_dropped = Counter(
            "cascade_audit_dropped", "Audit lines dropped because the writer could not keep up",
            registry=r) if audit_dropped is not None else None
        self._drift_rungs: set[str] = set()

    # ------------------------------------------------------------------ observer

    def on_answer(self, request: CascadeRequest, answer: Answer | None,
                  error: BaseException | None) -> None:
        traced = answer if answer is not None else getattr(error, "answer", None)
        ladder = self._ladder_of(request)
        outcome = outcome_of(answer, error)
        accepted = ""
        if answer is not None:
            accepted = next((a.name or a.model for a in reversed(answer.attempts)
                             if a.status == "accepted"), "")
        cache_hit = isinstance(traced, Answer) and traced.cache_hit
        self.requests.labels(ladder, accepted, str(answer is not None and answer.verified)
                             .lower(), str(cache_hit).lower(), outcome).inc()
        if isinstance(traced, Answer):
            self.latency.labels(ladder, outcome).observe(traced.latency_ms / 1000)
            if not cache_hit:
                tried = [i for i, a in enumerate(traced.attempts)
                         if a.status in ("accepted", "rejected", "error")]
                for i, a in enumerate(traced.attempts):
                    # an escalation: the answer was not taken and a later rung was tried
                    self._attempt(a, ladder, escalated=bool(tried) and i < tried[-1])
        if outcome == "budget_exceeded":
            self.budget_refusals.labels(ladder).inc()
        self.sync_audit_dropped()

    def sync_audit_dropped(self) -> None:
        """Bring ``cascade_audit_dropped_total`` up to the audit log's own count."""
        if self._audit_dropped is None or self.audit_dropped is None:
            return
        with self._dropped_lock:
            now = self._audit_dropped()
            if now > self._dropped_seen:
                self.audit_dropped.inc(now - self._dropped_seen)
                self._dropped_seen = now

    def _attempt(self, a: Attempt, ladder: str, *, escalated: bool) -> None:
        rung = a.name or a.model
        if a.status == "skipped":
            self.rung_skips.labels(ladder, rung).inc()
            return
        if a.status == "shadow":
            return  # counted by on_shadow
        self.rung_calls.labels(ladder, rung).inc()
        self.rung_latency.labels(ladder, rung).observe(a.latency_ms / 1000)
        if a.cost_usd:
            self.cost.labels(ladder, rung).inc(a.cost_usd)
        if a.status == "error":
            self.rung_errors.labels(ladder, rung).inc()
        if escalated and a.status in ("rejected", "error"):
            self.escalations.labels(ladder, rung).inc()

    def on_shadow(self, request: CascadeRequest, accepted: Attempt, shadow: Attempt,
                  agreed: bool | None) -> None:
        rung, ladder = accepted.name or accepted.model, self._ladder_of(request)
        if shadow.error_type == "Skipped":  # over the cap or budget: no check was made
            return
        if agreed is not None:  # a check that failed compared nothing: not in the ratio
            self.shadows.labels(ladder, rung).inc()
        if agreed is False:
            self.shadow_disagreements.labels(ladder, rung).inc()
        if shadow.cost_usd:
            self.cost.labels(ladder, shadow.name or shadow.model).inc(shadow.cost_usd)

    def _ladder_of(self, request: CascadeRequest) -> str:
        """The ladder the request was served by (the service puts it in the metadata): one
        in flight across a reload that renamed the ladder is counted under its own name."""
        name = request.metadata.get("ladder")
        return name if isinstance(name, str) and name else self.ladder

    def refusal(self, outcome: str) -> None:
        """A request turned away before the climb (``unauthorised``, ``rate_limited``,
        ``bad_request``, ``unknown_model``)."""
        self.refused.labels(self.ladder, outcome).inc()
        if outcome == "budget_exceeded":
            self.budget_refusals.labels(self.ladder).inc()

    def set_drift(self, drift: Mapping[str, Mapping[str, Any]]) -> None:
        """The alarms now; a rung no longer watched (a reload removed it or its threshold)
        is no longer alarmed, whatever it last showed."""
        for rung in self._drift_rungs - set(drift):
            if _multiprocess():
                self.drift_alarm.labels(rung).set(0)  # its value lives in the worker's file
            else:
                self.drift_alarm.remove(rung)
        self._drift_rungs = set(drift)
        for rung, state in drift.items():
            self.drift_alarm.labels(rung).set(1 if state.get("alarm") else 0)

    def set_store(self, status: Mapping[str, Any]) -> None:
        """Only a shared store has these series (labelled with its URL, never a password)."""
        if status.get("shared"):
            url = str(status.get("url", ""))
            self.store_reachable.labels(url).set(1 if status.get("reachable") else 0)
            self.store_unsettled.labels(url).set(int(status.get("unsettled", 0)))

    def render(self) -> bytes:
        self.sync_audit_dropped()
        if _multiprocess():
            merged = CollectorRegistry()
            MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
            return generate_latest(merged)
        return generate_latest(self.registry)


def _multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    service = request.app.state.service
    health = await service.health()
    service.metrics.set_drift(health.get("drift", {}))
    service.metrics.set_store(health.get("store", {}))
    return Response(service.metrics.render(), media_type=CONTENT_TYPE)
