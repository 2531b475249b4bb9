"""The answer and its trace: every rung tried, each verdict with its reason, tokens, cost, time.

These are plain data, serialisable to JSON and back, so a cache hit can return the original trace.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["Answer", "Attempt", "Status", "Verdict"]

Status = Literal["running", "accepted", "rejected", "error", "skipped", "routed", "shadow"]
"""An attempt's status: ``accepted`` (every verdict passed), ``rejected`` (a verifier, or the
drift alarm, said no), ``error`` (the call failed after retries and failover), ``skipped``
(budget, cap, deadline or an open circuit: not called; ``error`` says why), ``routed`` (the
router started the climb above it or skipped it; ``note`` says why), ``shadow`` (a top-rung
check of an early-accepted answer, off the response path), ``running`` (in progress)."""


@dataclass(frozen=True, kw_only=True)
class Verdict:
    """A verifier's judgement of one candidate answer.

    ``score`` is in [0, 1] where the verifier has one (a confidence, a judge grade); the policy
    compares it with the configured threshold. Verifiers that call a model report what it cost.
    """

    passed: bool
    reason: str
    score: float | None = None
    verifier: str = ""
    cost_usd: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    skipped: bool = False
    """Not run: a cheaper verifier had already rejected the candidate."""

    def to_dict(self) -> dict[str, Any]:
        # Every field is a scalar: a shallow read, not asdict's recursive deep copy (this runs
        # for every verdict of every cached, audited or served answer).
        return {k: getattr(self, k) for k in _VERDICT_FIELDS}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Verdict:
        return cls(**{k: d[k] for k in _VERDICT_FIELDS if k in d})


@dataclass(kw_only=True)
class Attempt:
    """One rung of the climb: the call, its verdicts, and what it cost.

    ``status`` is one of :data:`Status`.
    """

    rung: int
    model: str
    provider: str
    name: str = ""
    """The rung's label (``name`` in config, else the model)."""
    endpoint: str = ""
    status: Status = "rejected"
    text: str | None = None
    verdicts: list[Verdict] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    """The model call plus every verifier call made for this rung."""
    latency_ms: float = 0.0
    error: str | None = None
    error_type: str | None = None
    tries: int = 0
    """Model calls made for this rung, retries and failover included."""
    finish_reason: str | None = None
    stop_sequence: str | None = None
    """Which of the request's stop sequences ended the answer, when the provider said."""
    note: str | None = None
    """Why the climb went this way here: the router's reason, a load-aware endpoint choice."""
    started_at: float = 0.0
    """Wall-clock time (Unix seconds) the rung started: spans and audit lines are placed by it."""
    response_model: str | None = None
    """The model the server said answered (e.g. a dated snapshot of ``model``), when it said."""

    def to_dict(self) -> dict[str, Any]:
        return {k: [v.to_dict() for v in self.verdicts] if k == "verdicts" else getattr(self, k)
                for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Attempt:
        kw = {k: d[k] for k in _ATTEMPT_FIELDS if k in d}
        kw["verdicts"] = [Verdict.from_dict(v) for v in d.get("verdicts", [])]
        return cls(**kw)


@dataclass(kw_only=True)
class Answer:
    """What ``cascade.answer`` returns: the chosen text, whether it was verified, and the trace."""

    text: str
    model: str
    verified: bool
    attempts: list[Attempt]
    parsed: Any = None
    cost_usd: float = 0.0
    """Everything this request spent: every rung climbed and every paid verifier call."""
    cache_hit: bool = False
    latency_ms: float = 0.0
    cache_key: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    request_id: str = ""
    """Unique per request (a cache hit gets its own); audit lines and feedback refer to it."""
    warnings: list[str] = field(default_factory=list)
    """Things that went wrong without costing the answer (e.g. the cache store failed)."""
    route: Mapping[str, Any] | None = None
    """The router's decision when the ladder has one: ``start`` (rung index), ``skipped``
    (rung labels), ``scores`` (per rung label, P(its answer is right)) and ``reason``."""

    @property
    def input_tokens(self) -> int:
        """Input tokens of every call made for this request: each rung's and each paid
        verifier's (a judge); 0 on a cache hit, which called nothing."""
        if self.cache_hit:
            return 0
        return sum(a.input_tokens + sum(v.input_tokens for v in a.verdicts)
                   for a in self.attempts)

    @property
    def output_tokens(self) -> int:
        """Output tokens, counted as :attr:`input_tokens` are."""
        if self.cache_hit:
            return 0
        return sum(a.output_tokens + sum(v.output_tokens for v in a.verdicts)
                   for a in self.attempts)

    def to_dict(self) -> dict[str, Any]:
        parsed = self.parsed
        if hasattr(parsed, "model_dump"):
            parsed = parsed.model_dump(mode="json")
        return {
            "text": self.text,
            "parsed": parsed,
            "model": self.model,
            "verified": self.verified,
            "cost_usd": self.cost_usd,
            "cache_hit": self.cache_hit,
            "latency_ms": self.latency_ms,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cache_key": self.cache_key,
            "metadata": dict(self.metadata),
            "request_id": self.request_id,
            "warnings": list(self.warnings),
            "route": None if self.route is None else dict(self.route),
            "attempts": [a.to_dict() for a in self.attempts],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Answer:
        return cls(
            text=d["text"],
            model=d["model"],
            verified=bool(d["verified"]),
            attempts=[Attempt.from_dict(a) for a in d.get("attempts", [])],
            parsed=d.get("parsed"),
            cost_usd=float(d.get("cost_usd", 0.0)),
            cache_hit=bool(d.get("cache_hit", False)),
            latency_ms=float(d.get("latency_ms", 0.0)),
            cache_key=d.get("cache_key"),
            metadata=d.get("metadata") or {},
            request_id=str(d.get("request_id", "")),
            warnings=list(d.get("warnings") or []),
            route=d.get("route"),
        )


_VERDICT_FIELDS = tuple(Verdict.__dataclass_fields__)
_ATTEMPT_FIELDS = tuple(k for k in Attempt.__dataclass_fields__ if k != "verdicts")
