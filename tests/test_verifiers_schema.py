"""The schema verifier: JSON found in messy replies, validated, and left for answer.parsed."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from cascade.errors import ConfigError
from tests.verifier_kit import completion, make_ctx
from verifiers.schema import SchemaVerifier

CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "population": {"type": "integer", "minimum": 0},
        "districts": {"type": "array", "items": {"type": "object",
                                                 "properties": {"area": {"type": "number"}}}},
    },
    "required": ["city", "population"],
    "additionalProperties": False,
}


class City(BaseModel):
    city: str
    population: int


def test_valid_json_in_a_code_fence_with_prose_passes_and_is_shared() -> None:
    ctx = make_ctx('Here you go:\n```json\n{"city": "Canberra", "population": 456692}\n```\n'
                   "Anything else?")
    v = SchemaVerifier(schema=CITY).verify(ctx)
    assert v.passed, v.reason
    assert ctx.shared["parsed"] == {"city": "Canberra", "population": 456692}


def test_reason_names_the_failing_json_path() -> None:
    text = '{"city": "Canberra", "population": 5, "districts": [{"area": 1}, {"area": "big"}]}'
    ctx = make_ctx(text)
    v = SchemaVerifier(schema=CITY).verify(ctx)
    assert not v.passed
    assert "$.districts[1].area" in v.reason
    assert "'big' is not of type 'number'" in v.reason
    assert "parsed" not in ctx.shared


def test_missing_required_key_and_extra_key_are_reported() -> None:
    v = SchemaVerifier(schema=CITY).verify(make_ctx('{"city": "X", "mayor": "Y"}'))
    assert not v.passed
    assert "more error" in v.reason


def test_text_that_is_not_json_fails_with_why() -> None:
    v = SchemaVerifier(schema=CITY).verify(make_ctx("The capital of Australia is Canberra."))
    assert not v.passed
    assert v.reason.startswith("not JSON")


def test_pydantic_model_setting_by_dotted_path_builds_the_instance() -> None:
    verifier = SchemaVerifier(model="tests.test_verifiers_schema:City")
    ctx = make_ctx('Result: {"city": "Canberra", "population": "456692"}')
    assert verifier.verify(ctx).passed
    parsed = ctx.shared["parsed"]
    assert type(parsed).__name__ == "City"
    assert parsed.model_dump() == {"city": "Canberra", "population": 456692}
    bad = verifier.verify(make_ctx('{"city": "Canberra", "population": "many"}'))
    assert not bad.passed
    assert "City at $.population" in bad.reason


def test_request_schema_or_output_type_is_used_when_no_setting() -> None:
    v = SchemaVerifier()
    assert not v.verify(make_ctx('{"city": 3}', schema=CITY)).passed
    ctx = make_ctx('{"city": "Perth", "population": 1}', output_type=City)
    assert v.verify(ctx).passed
    assert isinstance(ctx.shared["parsed"], City)
    assert v.verify(make_ctx("[1, 2]")).passed  # no schema anywhere: well-formed JSON suffices


def test_structured_output_already_parsed_is_accepted() -> None:
    parsed = City(city="Hobart", population=250000)
    ctx = make_ctx("", comp=completion("", parsed=parsed))
    v = SchemaVerifier().verify(ctx)
    assert v.passed
    assert ctx.shared["parsed"] is parsed


def test_structured_output_is_still_checked_against_an_explicit_schema() -> None:
    parsed = City(city="Hobart", population=-1)
    v = SchemaVerifier(schema=CITY).verify(make_ctx("", comp=completion("", parsed=parsed)))
    assert not v.passed
    assert "$.population" in v.reason


def test_parse_error_from_structured_output_fails_with_it() -> None:
    comp = completion('{"city": 1}', parse_error="city: Input should be a valid string")
    v = SchemaVerifier().verify(make_ctx('{"city": 1}', comp=comp))
    assert not v.passed
    assert "Input should be a valid string" in v.reason


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"schema": {"type": "no-such-type"}}, "schema"),
    ({"model": "tests.test_verifiers_schema:CITY"}, "model"),
    ({"model": "no_such_module_xyz:Model"}, "model"),
    ({"schema": CITY, "model": "tests.test_verifiers_schema:City"}, "schema"),
])
def test_bad_settings_are_config_errors(kwargs: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        SchemaVerifier(**kwargs)
    assert info.value.key == key


def test_a_dotted_model_must_be_a_pydantic_model_of_that_module() -> None:
    """``model`` names a class to validate with, so it may name only a pydantic model class
    defined in that module (or an allowed module): never a function to call."""
    with pytest.raises(ConfigError, match="standard library") as info:
        SchemaVerifier(model="subprocess:run")
    assert info.value.key == "model"
    with pytest.raises(ConfigError, match="not a model"):
        SchemaVerifier(model="tests.test_verifiers_schema:test_a_dotted_model_must_be_a_"
                             "pydantic_model_of_that_module")
    with pytest.raises(ConfigError, match="not a model"):
        SchemaVerifier(model="tests.test_verifiers_schema:BaseModel")  # imported, not defined
