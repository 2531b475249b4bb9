"""The judge verifier: a (usually stronger) model grades the candidate against a rubric.

The judge is its own endpoint, configured like a rung (``model``, ``provider``, prices...), and
every call goes through ``ctx.call_model``, so its tokens and cost appear in the verdict.
Judges do not always follow the requested format: the reply is read as JSON when it is JSON, else
from "Score: 7/10"-style text; a reply with no readable score fails the verdict, quoting it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from cascade.config import parse_rung
from cascade.messages import Message
from cascade.providers.base import ModelCall
from cascade.trace import Verdict
from cascade.verify import VerifyContext
from verifiers._text import JSONExtractError, extract_json

__all__ = ["DEFAULT_RUBRIC", "JudgeVerifier", "parse_grade"]

DEFAULT_RUBRIC = (
    "Grade the candidate answer for correctness and completeness with respect to the question. "
    "An answer that is wrong, evasive, refuses, or contradicts the reference gets a low score, "
    "however well written. Do not reward length."
)

_SYSTEM = "You are a strict, impartial grader of answers. You never answer the question yourself."

_TEMPLATE = """{rubric}

<question>
{question}
</question>
{reference_block}
<candidate_answer>
{answer}
</candidate_answer>

Reply with only a JSON object: {{"score": <integer 0-10>, "reason": "<one sentence>"}}"""

_SCORE_KEYS = ("score", "grade", "rating", "overall")
_REASON_KEYS = ("reason", "explanation", "rationale", "justification", "feedback")
_TEXT_SCORE = re.compile(
    r"(?i:score|grade|rating)\W{0,4}(?:is\W{0,3})?(\d+(?:\.\d+)?)\s*(?:(/|out of)\s*(\d+))?"
)
_FRACTION = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)\s*(?:/|out of)\s*(10|100|5|1)(?!\w|\.\d)")


def _scale(value: float, *, denominator: float | None, decimal: bool) -> float | None:
    """A grade in [0, 1]: explicit denominators win; "0.8" is already a fraction; "8" is of 10."""
    if denominator is not None:
        return value / denominator if denominator > 0 and 0 <= value <= denominator else None
    if decimal and 0.0 <= value <= 1.0:
        return value
    if 0.0 <= value <= 10.0:
        return value / 10.0
    if 10.0 < value <= 100.0:
        return value / 100.0
    return None


def parse_grade(reply: str) -> tuple[float, str] | None:
    """(score in [0, 1], reason) from a judge's reply, or None when there is no readable score."""
    try:
        data = extract_json(reply)
    except JSONExtractError:
        data = None
    if isinstance(data, Mapping):
        lowered = {str(k).casefold(): v for k, v in data.items()}
        raw = next((lowered[k] for k in _SCORE_KEYS if k in lowered), None)
        reason = next((str(lowered[k]) for k in _REASON_KEYS if k in lowered), "")
        score = _json_score(raw)
        if score is not None:
            return score, reason
    m = _TEXT_SCORE.search(reply) or _FRACTION.search(reply)
    if m is None:
        return None
    number = m.group(1)
    denominator = m.group(m.lastindex) if m.lastindex and m.lastindex >= 2 else None
    if denominator is not None and not denominator.isdigit():
        denominator = None
    score = _scale(float(number), denominator=float(denominator) if denominator else None,
                   decimal="." in number)
    if score is None:
        return None
    reason = _text_reason(reply)
    return score, reason


def _json_score(raw: Any) -> float | None:
    if isinstance(raw, bool) or raw is None:
        return None
    if isinstance(raw, (int, float)):
        return _scale(float(raw), denominator=None, decimal=isinstance(raw, float))
    if isinstance(raw, str):
        m = _FRACTION.fullmatch(raw.strip())
        if m:
            return _scale(float(m.group(1)), denominator=float(m.group(2)), decimal=False)
        try:
            return _scale(float(raw), denominator=None, decimal="." in raw)
        except ValueError:
            return None
    return None


def _text_reason(reply: str) -> str:
    m = re.search(r"(?i:reason|explanation|rationale)\W{0,4}(.+)", reply)
    text = m.group(1) if m else reply
    return " ".join(text.split())[:300]


class JudgeVerifier:
    """Asks a judge model for a 0-10 grade; passes at ``threshold`` (default 0.5) and above."""

    expensive = True

    def __init__(
        self,
        model: str,
        provider: str = "openai",
        base_url: str | None = None,
        api_key_env: str | None = None,
        input_usd_per_mtok: float | None = None,
        output_usd_per_mtok: float | None = None,
        rubric: str = DEFAULT_RUBRIC,
        threshold: float = 0.5,
        reference: str | None = None,
        *,
        max_tokens: int = 256,
        timeout_s: float = 60.0,
        extra: Mapping[str, Any] | None = None,
        name: str = "judge",
    ) -> None:
        spec: dict[str, Any] = {"model": model, "provider": provider, "max_tokens": max_tokens,
                                "temperature": 0.0, "timeout_s": timeout_s}
        for key, value in (("base_url", base_url), ("api_key_env", api_key_env),
                           ("input_usd_per_mtok", input_usd_per_mtok),
                           ("output_usd_per_mtok", output_usd_per_mtok), ("extra", extra)):
            if value is not None:
                spec[key] = value
        self.rung = parse_rung(spec, source=f"verifier {name!r}", prefix="")
        self.name = name
        self.rubric = rubric
        self.threshold = threshold
        self.reference = reference

    def build_call(self, ctx: VerifyContext) -> ModelCall:
        reference = self.reference or ctx.request.metadata.get("reference")
        block = (f"\n<reference_answer>\n{reference}\n</reference_answer>\n"
                 if reference else "")
        user = _TEMPLATE.format(rubric=self.rubric, question=_question(ctx),
                                reference_block=block, answer=ctx.candidate.text)
        return ModelCall(
            model=self.rung.model,
            messages=(Message("system", _SYSTEM), Message("user", user)),
            max_tokens=self.rung.max_tokens,
            temperature=self.rung.temperature,
            timeout_s=self.rung.timeout_s,
            extra=self.rung.extra,
        )

    async def verify(self, ctx: VerifyContext) -> Verdict:
        reply = await ctx.call_model(self.build_call(ctx), self.rung)
        grade = parse_grade(reply.text)
        if grade is None:
            excerpt = " ".join(reply.text.split())[:200]
            return Verdict(passed=False, reason=f"judge reply has no readable score: {excerpt!r}")
        score, reason = grade
        threshold = ctx.threshold if ctx.threshold is not None else self.threshold
        passed = score >= threshold
        return Verdict(passed=passed, score=score,
                       reason=f"judge {self.rung.model} gave {score * 10:.1f}/10"
                              + (f": {reason}" if reason else ""))


def _question(ctx: VerifyContext) -> str:
    """The conversation as the judge should see it: system turns and the last user turn."""
    system = ctx.request.system
    question = ctx.request.last_user
    return f"{system}\n\n{question}" if system else question

