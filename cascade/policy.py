"""The accept/escalate policy: when a rung's answer exits early, when a rung is not even tried,
and what a climb that found nothing ends as.

Everything here is a pure function of what the climb knows, so the rules can be read (and
tested) in one place: the climb asks, the policy answers, the trace records why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Literal

from cascade.trace import Status, Verdict

__all__ = [
    "Outcome",
    "Skip",
    "SkipKind",
    "Status",
    "accepts",
    "cap_gate",
    "deadline_gate",
    "drift_verdict",
    "held_by_drift",
    "no_answer_outcome",
    "rejection_reason",
]

SkipKind = Literal["budget", "cap", "deadline", "circuit", "router"]


@dataclass(frozen=True)
class Skip:
    """Why a rung was not called."""

    kind: SkipKind
    detail: str


class Outcome(Enum):
    """How a climb ends when no rung's answer came back."""

    DEADLINE = "deadline"
    BUDGET = "budget"
    NO_ANSWER = "no_answer"


def accepts(verdicts: Sequence[Verdict]) -> bool:
    """Early exit only when every verifier that ran passed; no verifiers means accept."""
    return all(v.passed for v in verdicts)


def rejection_reason(verdicts: Sequence[Verdict]) -> str:
    """One line naming the verifiers that said no, for logs and errors."""
    failed = [f"{v.verifier}: {v.reason}" for v in verdicts if not v.passed and not v.skipped]
    return "; ".join(failed) or "accepted"


def deadline_gate(remaining_s: float | None, expected_s: float | None) -> Skip | None:
    """Skip a rung that usually takes longer than the time left."""
    if remaining_s is None or expected_s is None or expected_s <= remaining_s:
        return None
    return Skip("deadline", f"{remaining_s:.2f}s left, this rung usually takes {expected_s:.2f}s")


def cap_gate(max_cost_usd: float | None, committed_usd: float, estimate_usd: float
             ) -> Skip | None:
    """Skip a call whose estimate would break the request's ``max_cost_usd``.

    ``committed_usd`` is what was spent plus what is reserved for calls in flight.
    """
    if max_cost_usd is None or committed_usd + estimate_usd <= max_cost_usd:
        return None
    return Skip("cap", f"estimated cost ${estimate_usd:.6f} exceeds the "
                       f"${max(0.0, max_cost_usd - committed_usd):.6f} left of "
                       f"max_cost_usd=${max_cost_usd:g}")


def drift_verdict(rung_label: str, why: str) -> Verdict:
    """The verdict that keeps a drifted rung from exiting early (safe mode): it escalates."""
    return Verdict(passed=False, verifier="drift",
                   reason=f"drift alarm on {rung_label}: {why}; escalating (safe mode)")


def held_by_drift(verdicts: Sequence[Verdict]) -> bool:
    """Whether only the drift alarm kept this answer from exiting early."""
    return any(v.verifier == "drift" and not v.passed for v in verdicts) and all(
        v.passed for v in verdicts if v.verifier != "drift")


def no_answer_outcome(skips: Sequence[Skip], *, deadline_hit: bool, any_error: bool) -> Outcome:
    """Deadline first, when it ran out or when, no call having failed, the deadline gate kept
    rungs from starting (the time left was too short for them: the deadline stopped the climb
    before it ran out); then budget when money (cap or per-key budget) alone stopped every
    rung."""
    if deadline_hit or (not any_error and any(s.kind == "deadline" for s in skips)):
        return Outcome.DEADLINE
    if not any_error and any(s.kind in ("budget", "cap") for s in skips):
        return Outcome.BUDGET
    return Outcome.NO_ANSWER
