"""The agreement verifier: against the previous rung, and self-consistency over samples."""

from __future__ import annotations

import pytest

import cascade
from cascade.errors import ConfigError
from cascade.trace import Attempt
from tests.verifier_kit import FakeCaller, make_ctx
from verifiers.agreement import AgreementVerifier


def earlier(text: str | None, rung: int = 0) -> Attempt:
    return Attempt(rung=rung, model=f"m{rung}", provider="openai", text=text)


@pytest.mark.anyio
async def test_first_rung_abstains_by_default_and_can_be_made_to_fail() -> None:
    v = await AgreementVerifier().verify(make_ctx("Canberra"))
    assert v.passed and v.score is None and "abstained" in v.reason
    strict = await AgreementVerifier(no_previous="fail").verify(make_ctx("Canberra"))
    assert not strict.passed


@pytest.mark.anyio
async def test_previous_mode_compares_with_the_latest_rung_that_answered() -> None:
    attempts = [earlier("Sydney", 0), earlier("The capital is Canberra.", 1), earlier(None, 2)]
    ok = await AgreementVerifier(normaliser="numeric").verify(
        make_ctx("It is 1,234.50 dollars", attempts=[earlier("$1234.5", 0)]))
    assert ok.passed and ok.score == 1.0
    same = await AgreementVerifier().verify(make_ctx("the capital is canberra", attempts=attempts))
    assert same.passed and "rung 1" in same.reason
    differ = await AgreementVerifier().verify(make_ctx("Sydney", attempts=attempts))
    assert not differ.passed and differ.score == 0.0 and "disagrees" in differ.reason


@pytest.mark.anyio
async def test_choice_normaliser_reads_letters_in_prose() -> None:
    v = AgreementVerifier(normaliser="choice")
    ctx = make_ctx("After eliminating A and D, the answer is (B).",
                   attempts=[earlier("B) Canberra")])
    assert (await v.verify(ctx)).passed
    none = await v.verify(make_ctx("I am not sure.", attempts=[earlier("B")]))
    assert not none.passed and "no choice answer" in none.reason


@pytest.mark.anyio
async def test_samples_mode_scores_the_agreeing_fraction_and_charges_each_call() -> None:
    caller = FakeCaller("Canberra.", "canberra", "Sydney", "The answer is Canberra")
    v = AgreementVerifier(mode="samples", samples=3)
    assert v.expensive
    ctx = make_ctx("Canberra", caller=caller)
    verdict = await v.verify(ctx)
    assert verdict.score == pytest.approx(2 / 3)
    assert verdict.passed
    assert len(caller.calls) == 3
    assert all(call.temperature > 0 for call, _ in caller.calls)
    assert ctx.input_tokens == 300 and ctx.cost_usd > 0


@pytest.mark.anyio
async def test_samples_tolerate_some_failures_and_raise_when_all_fail() -> None:
    caller = FakeCaller("42", RuntimeError("boom"), "41")
    ctx = make_ctx("42", caller=caller)
    v = await AgreementVerifier(mode="samples", normaliser="numeric").verify(ctx)
    assert v.score == pytest.approx(0.5) and "1 sample(s) failed" in v.reason
    with pytest.raises(RuntimeError, match="down"):
        await AgreementVerifier(mode="samples").verify(
            make_ctx("42", caller=FakeCaller(RuntimeError("down"))))


@pytest.mark.anyio
async def test_custom_normaliser_by_dotted_path() -> None:
    v = AgreementVerifier(normaliser="tests.test_verifiers_agreement:first_word")
    assert (await v.verify(make_ctx("Canberra, Australia", attempts=[earlier("Canberra")]))).passed


@cascade.normaliser
def first_word(text: str) -> str:
    return text.split(",")[0].strip().lower()


def unmarked_first_word(text: str) -> str:
    return text.split(",")[0].strip().lower()


def test_an_unmarked_function_is_no_normaliser(monkeypatch: pytest.MonkeyPatch) -> None:
    """A config naming any function as a normaliser would have it called with model output."""
    with pytest.raises(ConfigError, match=r"@cascade\.normaliser") as info:
        AgreementVerifier(normaliser="tests.test_verifiers_agreement:unmarked_first_word")
    assert info.value.key == "normaliser"
    with pytest.raises(ConfigError, match="standard library"):
        AgreementVerifier(normaliser="os:remove")
    monkeypatch.setenv("CASCADE_ALLOW_MODULES", "tests.test_verifiers_agreement")
    v = AgreementVerifier(normaliser="tests.test_verifiers_agreement:unmarked_first_word")
    assert v.normalise("Canberra, ACT") == "canberra"


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"mode": "vote"}, "mode"),
    ({"normaliser": "fuzzy"}, "normaliser"),
    ({"normaliser": "nowhere_xyz:fn"}, "normaliser"),
    ({"mode": "samples", "temperature": 0.0}, "temperature"),
    ({"min_agreement": 2.0}, "min_agreement"),
])
def test_bad_settings(kwargs: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        AgreementVerifier(**kwargs)  # type: ignore[arg-type]
    assert info.value.key == key
