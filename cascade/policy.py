"""The accept/escalate decision for one rung, from its verdicts (thresholds already applied)."""

from __future__ import annotations

from collections.abc import Sequence

from cascade.trace import Verdict

__all__ = ["accepts", "rejection_reason"]


def accepts(verdicts: Sequence[Verdict]) -> bool:
    """Early exit only when every verifier that ran passed; no verifiers means accept."""
    return all(v.passed for v in verdicts)


def rejection_reason(verdicts: Sequence[Verdict]) -> str:
    """One line naming the verifiers that said no, for logs and errors."""
    failed = [f"{v.verifier}: {v.reason}" for v in verdicts if not v.passed and not v.skipped]
    return "; ".join(failed) or "accepted"
