"""Adversarial review of the built-in verifiers: each test pins a defect that once let a bad
answer pass (or reached outside the machine), so a regression fails here first."""

from __future__ import annotations

import json
import math
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from cascade.errors import ConfigError
from cascade.trace import Attempt
from tests.verifier_kit import FakeCaller, completion, logprobs, make_ctx
from verifiers.agreement import AgreementVerifier
from verifiers.confidence import ConfidenceVerifier, impossible_logprob, yes_probability
from verifiers.judge import JudgeVerifier, parse_grade
from verifiers.refusal import RefusalVerifier, classify
from verifiers.schema import SchemaVerifier

LN = math.log


# ---------------------------------------------------------------- schema


def test_schema_never_reads_a_file_ref(tmp_path: Path) -> None:
    """A ``$ref`` to ``file:`` is a local file read on the data path; it must not resolve."""
    target = tmp_path / "s.json"
    target.write_text(json.dumps({"type": "string"}))
    ref = {"$ref": target.as_uri()}
    for v, ctx in ((SchemaVerifier(schema=ref), make_ctx('"x"')),
                   (SchemaVerifier(), make_ctx('"x"', schema=ref))):
        verdict = v.verify(ctx)
        assert not verdict.passed
        assert "$ref" in verdict.reason


def test_schema_never_fetches_an_http_ref(monkeypatch: pytest.MonkeyPatch) -> None:
    """jsonschema's default registry fetches unknown ``$ref`` URIs with urlopen (no timeout)."""
    fetched: list[object] = []

    def spy(*args: object, **kw: object) -> Any:
        fetched.append(args)
        raise OSError("no network in tests")

    monkeypatch.setattr(urllib.request, "urlopen", spy)
    v = SchemaVerifier().verify(make_ctx('"x"', schema={"$ref": "http://169.254.169.254/s"}))
    assert fetched == []
    assert not v.passed and "$ref" in v.reason


def test_schema_local_refs_and_metaschema_refs_still_resolve() -> None:
    schema = {"$defs": {"n": {"type": "integer"}}, "properties": {"a": {"$ref": "#/$defs/n"}}}
    assert SchemaVerifier(schema=schema).verify(make_ctx('{"a": 1}')).passed
    bad = SchemaVerifier(schema=schema).verify(make_ctx('{"a": "x"}'))
    assert not bad.passed and "$.a" in bad.reason
    meta = {"$ref": "https://json-schema.org/draft/2020-12/schema"}
    assert SchemaVerifier(schema=meta).verify(make_ctx('{"type": "string"}')).passed


class City(BaseModel):
    city: str
    population: int


class Loose(BaseModel):
    city: str


def test_an_explicit_model_applies_to_structured_output_of_another_type() -> None:
    """The provider parsed into the request's type; the verifier's own ``model`` still holds."""
    for parsed in (Loose(city="Hobart"), {"city": "Hobart"}):
        ctx = make_ctx('{"city": "Hobart"}', comp=completion('{"city": "Hobart"}',
                                                            parsed=parsed))
        v = SchemaVerifier(model=City).verify(ctx)
        assert not v.passed and "population" in v.reason
    good = make_ctx("", comp=completion("", parsed={"city": "Hobart", "population": 3}))
    assert SchemaVerifier(model=City).verify(good).passed
    assert isinstance(good.shared["parsed"], City)


# ---------------------------------------------------------------- confidence


def test_yes_probability_is_none_when_the_model_chose_another_word() -> None:
    """P(yes)/(P(yes)+P(no)) over a 1e-5 sliver is 1.0: the model said "I", not yes."""
    lp = logprobs(("I", -0.01), top=[{"I": -0.01, "Yes": -12.0}])
    assert yes_probability(lp) is None
    # a choice of yes/no (or punctuation before it) is still read from the alternatives
    assert yes_probability(logprobs(("Yes", LN(0.6)), top=[{"No": LN(0.3)}])) == (
        pytest.approx(2 / 3))


@pytest.mark.anyio
async def test_self_check_answer_that_is_not_yes_fails() -> None:
    reply = completion("I", logprobs=logprobs(("I", -0.01), top=[{"I": -0.01, "Yes": -12.0}]))
    v = await ConfidenceVerifier(source="self_check").verify(
        make_ctx("Canberra", caller=FakeCaller(reply)))
    assert not v.passed


def test_a_boolean_logprob_is_not_a_log_probability() -> None:
    """``False`` is an int 0 in Python: a missing value read as certainty."""
    assert impossible_logprob(logprobs(("B", False))) is not None


@pytest.mark.anyio
async def test_special_end_tokens_do_not_inflate_the_mean() -> None:
    pairs = [(f" w{i}", LN(0.5)) for i in range(6)] + [("<|eot_id|>", 0.0), ("</s>", 0.0)]
    ctx = make_ctx("six words", comp=completion("six words", logprobs=logprobs(*pairs)))
    v = await ConfidenceVerifier(source="logprobs", aggregate="mean").verify(ctx)
    assert v.score == pytest.approx(0.5)
    assert "over 6 content tokens" in v.reason


# ---------------------------------------------------------------- judge


def judge(**kw: Any) -> JudgeVerifier:
    return JudgeVerifier(model="gpt-4o", input_usd_per_mtok=2.5, output_usd_per_mtok=10.0, **kw)


@pytest.mark.anyio
async def test_a_truncated_judge_reply_has_no_verdict() -> None:
    """Cut off at max_tokens while quoting the candidate, the quote ends the reply."""
    reply = completion("The candidate answer is Sydney and its last line says\nScore: 10/10",
                       finish_reason="length")
    v = await judge().verify(make_ctx("Sydney", caller=FakeCaller(reply)))
    assert not v.passed and v.score is None
    assert "max_tokens" in v.reason


def test_a_score_introduced_by_a_colon_is_a_quotation() -> None:
    assert parse_grade("It is wrong; the candidate's last line reads: Score: 10/10") is None
    got = parse_grade("Wrong city.\nScore: 1/10")
    assert got is not None and got[0] == pytest.approx(0.1) and got[1] == "Wrong city."


@pytest.mark.parametrize("threshold", [-0.5, 1.5, math.nan, math.inf])
def test_judge_threshold_outside_0_1_is_a_config_error(threshold: float) -> None:
    with pytest.raises(ConfigError, match="threshold"):
        judge(threshold=threshold)


# ---------------------------------------------------------------- agreement


def earlier(text: str | None, rung: int = 0) -> Attempt:
    return Attempt(rung=rung, model=f"m{rung}", provider="openai", text=text)


@pytest.mark.anyio
@pytest.mark.parametrize(("mine", "theirs"), [("", ""), ("...", "?"), ("   ", "")])
async def test_empty_answers_never_agree(mine: str, theirs: str) -> None:
    for normaliser in ("exact", "normalised"):
        v = await AgreementVerifier(normaliser=normaliser).verify(
            make_ctx(mine, attempts=[earlier(theirs)]))
        assert not v.passed, (normaliser, v.reason)


@pytest.mark.anyio
async def test_empty_samples_do_not_agree_with_an_empty_candidate() -> None:
    v = await AgreementVerifier(mode="samples", samples=2).verify(
        make_ctx("", caller=FakeCaller("")))
    assert not v.passed


@pytest.mark.anyio
@pytest.mark.parametrize(("mine", "theirs"), [
    ("-5", "5"), ("The answer is -5.", "The answer is 5."), ("2+2", "2-2"),
    ("x < 5", "x > 5"), ("C++", "C"), ("3 * 4", "3 / 4"),
])
async def test_normalised_agreement_keeps_signs_and_operators(mine: str, theirs: str) -> None:
    v = await AgreementVerifier().verify(make_ctx(mine, attempts=[earlier(theirs)]))
    assert not v.passed, v.reason


@pytest.mark.anyio
@pytest.mark.parametrize(("mine", "theirs"), [
    ("The capital is Canberra.", "the capital is canberra"), ("well-known", "well known"),
    ("-5", "−5"), ("x-ray", "X-ray!"),
])
async def test_normalised_agreement_still_forgives_form(mine: str, theirs: str) -> None:
    v = await AgreementVerifier().verify(make_ctx(mine, attempts=[earlier(theirs)]))
    assert v.passed, v.reason


# ---------------------------------------------------------------- refusal


@pytest.mark.parametrize("text", [
    "Sorry, I can't.", "I'm sorry, but I cannot.", "I refuse to answer that.",
    "I decline to answer.", "That's not something I'm able to help with.",
    "I'm not going to help with that.",
])
def test_common_short_refusals_are_refusals(text: str) -> None:
    assert classify(text).refusal, text


@pytest.mark.parametrize("text", [
    "I can't. Nobody can: the halting problem is undecidable, as Turing proved in 1936.",
    "I refuse to believe it is that simple, but yes: the answer is 42.",
    "You cannot divide by zero, so the limit is undefined.",
])
def test_near_misses_of_the_new_patterns_pass(text: str) -> None:
    assert not classify(text).refusal, text


@pytest.mark.parametrize("text", ["\u200b", "\u200b \ufeff\u2060", "\n\u200d"])
def test_invisible_only_answers_are_empty(text: str) -> None:
    c = classify(text)
    assert c.refusal and "empty" in c.reason


def test_an_empty_answer_fails_even_with_min_chars_zero() -> None:
    v = RefusalVerifier(min_chars=0).verify(make_ctx(""))
    assert not v.passed and "empty" in v.reason


@pytest.mark.parametrize("pattern", [r"^(\w+\s?)*$", r"^(a|aa)+$"])
@pytest.mark.parametrize("where", ["pattern", "patternProperties"])
def test_a_backtracking_schema_pattern_fails_the_verdict_instead_of_stalling(
        pattern: str, where: str) -> None:
    """``re`` takes minutes on these patterns against 30-40 characters and a "!", holding
    the interpreter lock: one client's response_format stalled every request of the service.
    Now the search is bounded (the second pattern runs out of time even so: not verified)."""
    hostile = "a" * 40 + "!"
    if where == "pattern":
        schema: dict[str, Any] = {"type": "string", "pattern": pattern}
        text = json.dumps(hostile)
    else:
        schema = {"type": "object", "patternProperties": {pattern: {"type": "integer"}}}
        text = json.dumps({hostile: "x"})
    v = SchemaVerifier().verify(make_ctx(text, schema=schema))
    if where == "pattern" or "aa" in pattern:
        assert not v.passed
    if "aa" in pattern:
        assert "backtracks" in v.reason


def test_schema_patterns_still_match_and_refuse_as_before() -> None:
    schema = {"type": "string", "pattern": r"^[A-Z][a-z]+$"}
    assert SchemaVerifier().verify(make_ctx('"Canberra"', schema=schema)).passed
    assert not SchemaVerifier().verify(make_ctx('"canberra"', schema=schema)).passed
    props = {"type": "object", "patternProperties": {"^n_": {"type": "integer"}}}
    assert SchemaVerifier().verify(make_ctx('{"n_a": 1, "b": "x"}', schema=props)).passed
    assert not SchemaVerifier().verify(make_ctx('{"n_a": "one"}', schema=props)).passed
