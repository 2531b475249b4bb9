"""Observers: what watches answers without standing in their way (audit log, metrics, spans).

An observer is told once per request, after the answer is final, and once per shadow check that
finished off the response path. It must not block: anything slow (a file, a network exporter)
is queued and done elsewhere. The engine (``Cascade(observers=[...], audit_log=...)``) calls
every observer and keeps one observer's bug from reaching the request or the other observers.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from cascade.messages import Request
from cascade.trace import Answer, Attempt

__all__ = ["Observer"]


@runtime_checkable
class Observer(Protocol):
    """Told about every answer and every shadow check; never blocks, never raises on purpose."""

    def on_answer(self, request: Request, answer: Answer | None,
                  error: BaseException | None) -> None:
        """Once per request after the answer is final: ``answer`` (possibly unverified), or
        ``error`` when none came back (its ``answer`` attribute may still hold the trace)."""

    def on_shadow(self, request: Request, accepted: Attempt, shadow: Attempt,
                  agreed: bool | None) -> None:
        """A shadow check of ``accepted`` by the top rung finished; ``agreed`` is None when
        the shadow call itself failed."""
