"""The judge verifier: its prompt, robust grade parsing, and its cost in the verdict."""

from __future__ import annotations

import pytest

from cascade.errors import ConfigError
from tests.verifier_kit import FakeCaller, completion, make_ctx
from verifiers.judge import JudgeVerifier, parse_grade


@pytest.mark.parametrize(("reply", "score", "reason"), [
    ('{"score": 7, "reason": "mostly right"}', 0.7, "mostly right"),
    ('```json\n{"Score": 9, "Explanation": "correct"}\n```', 0.9, "correct"),
    ('{"grade": 0.8, "rationale": "fine"}', 0.8, "fine"),
    ('{"score": "6/10", "reason": "partly"}', 0.6, "partly"),
    ("Score: 7/10\nReason: misses the second part", 0.7, "misses the second part"),
    ("**Score:** 8 — accurate and concise.", 0.8, None),
    ("I would rate this answer 3 out of 10.", 0.3, None),
    ("Rating: 85/100", 0.85, None),
    ("Grade: 0.25 (the answer contradicts the reference)", 0.25, None),
    ('{"score": 10}', 1.0, ""),
])
def test_parse_grade(reply: str, score: float, reason: str | None) -> None:
    got = parse_grade(reply)
    assert got is not None
    assert got[0] == pytest.approx(score)
    if reason is not None:
        assert got[1] == reason


@pytest.mark.parametrize("reply", [
    "The answer looks good to me.", '{"verdict": "pass"}', "Score: 15/10", "",
])
def test_unreadable_grades(reply: str) -> None:
    assert parse_grade(reply) is None


def judge(**kw: object) -> JudgeVerifier:
    return JudgeVerifier(model="gpt-4o", input_usd_per_mtok=2.5, output_usd_per_mtok=10.0,
                         **kw)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_judge_prompt_has_question_candidate_reference_and_cost_lands_in_ctx() -> None:
    caller = FakeCaller(completion('{"score": 8, "reason": "correct capital"}', model="gpt-4o",
                                   input_tokens=400, output_tokens=20))
    ctx = make_ctx("Canberra", caller=caller, metadata={"reference": "Canberra"})
    v = await judge().verify(ctx)
    assert v.passed and v.score == pytest.approx(0.8)
    assert "correct capital" in v.reason
    call, rung = caller.calls[0]
    assert rung.model == "gpt-4o" and call.model == "gpt-4o"
    prompt = call.messages[-1].content
    assert "What is the capital of Australia?" in prompt
    assert "<candidate_answer>\nCanberra\n</candidate_answer>" in prompt
    assert "<reference_answer>" in prompt
    assert ctx.cost_usd == pytest.approx((400 * 2.5 + 20 * 10.0) / 1e6)
    assert (ctx.input_tokens, ctx.output_tokens) == (400, 20)


@pytest.mark.anyio
async def test_low_grade_fails_and_threshold_from_ctx_wins() -> None:
    low = await judge().verify(make_ctx("Sydney", caller=FakeCaller("Score: 2/10")))
    assert not low.passed and low.score == pytest.approx(0.2)
    strict = make_ctx("Canberra", caller=FakeCaller("Score: 7/10"), threshold=0.9)
    assert not (await judge().verify(strict)).passed


@pytest.mark.anyio
async def test_unparseable_reply_fails_quoting_it() -> None:
    v = await judge().verify(make_ctx("Canberra", caller=FakeCaller("I think it is fine.")))
    assert not v.passed and v.score is None
    assert "I think it is fine." in v.reason


def test_no_reference_block_without_a_reference() -> None:
    call = judge().build_call(make_ctx("Canberra"))
    assert "<reference_answer>" not in call.messages[-1].content
    call = judge(reference="Canberra, ACT").build_call(make_ctx("Canberra"))
    assert "Canberra, ACT" in call.messages[-1].content


def test_judge_settings_are_validated_like_a_rung() -> None:
    assert JudgeVerifier(model="gpt-4o-mini").rung.input_usd_per_mtok == 0.15  # price table
    with pytest.raises(ConfigError, match="provider"):
        JudgeVerifier(model="x", provider="carrier-pigeon")
    with pytest.raises(ConfigError, match="base_url"):
        JudgeVerifier(model="x", provider="openai-compatible")
