"""The human view of a climb, shared by the commands that print an Answer."""

from __future__ import annotations

from cascade.trace import Answer

__all__ = ["format_climb"]


def format_climb(answer: Answer) -> str:
    """A compact, human view of the climb: rungs, verdicts, tokens, cost, latency."""
    lines = [f"  router: {answer.route['reason']}"] if answer.route else []
    for a in answer.attempts:
        cost = f"${a.cost_usd:.6f}" if a.cost_usd else "$0"
        label = a.model if a.name in ("", a.model) else f"{a.name} [{a.model}]"
        head = (f"  {a.rung + 1}. {label} ({a.provider})  {a.status.upper():8s} "
                f"tokens {a.input_tokens}→{a.output_tokens}  {cost}  {a.latency_ms:.0f} ms")
        if a.tries > 1:
            head += f"  ({a.tries} tries)"
        lines.append(head)
        if a.error:
            lines.append(f"       ! {a.error}")
        if a.note:
            lines.append(f"       · {a.note}")
        for v in a.verdicts:
            mark = "-" if v.skipped else ("✓" if v.passed else "✗")
            score = f" {v.score:.3f}" if v.score is not None else ""
            lines.append(f"       {mark} {v.verifier}{score}: {v.reason}")
    state = "verified" if answer.verified else "NOT verified"
    source = "cache hit (no model called)" if answer.cache_hit else "cache miss"
    lines.append(f"  → {state} by {answer.model or '-'} · ${answer.cost_usd:.6f} · "
                 f"{answer.latency_ms:.0f} ms · {source}")
    return "\n".join(lines)
