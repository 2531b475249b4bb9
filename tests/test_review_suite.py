"""Review of the suite, the tuner's output and the disk cache: each test failed on the code it
was written against (TUNED.toml that did not load or loaded back different, a schema grader that
crashed mid-grading, a cache that accepted an empty secret)."""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import tomllib
from pathlib import Path
from typing import Any

import pytest

from cascade.cache import SECRET_FILE, AnswerCache, cache_key
from cascade.config import CascadeConfig, parse_config
from cascade.errors import CacheError, ConfigError
from cascade.messages import Message
from cascade.suite import Case, grade
from cascade.suite.cases import parse_case
from cascade.trace import Answer, Attempt, Verdict
from cascade.tuning import to_toml

FREE = {"input_usd_per_mtok": 0.0, "output_usd_per_mtok": 0.0}


def _round_trip(data: dict[str, Any], header: str = "") -> tuple[CascadeConfig, CascadeConfig]:
    """A config, and the config its TUNED.toml loads back as."""
    cfg = parse_config(data)
    return cfg, parse_config(tomllib.loads(to_toml(cfg, header=header)))


# ------------------------------------------------------------------ TUNED.toml round trips


def test_a_non_ascii_key_is_quoted_in_tuned_toml() -> None:
    """``str.isalnum`` is true for 'é' and '²', but a TOML bare key is ASCII only: a request
    field or verifier id like that made TUNED.toml invalid."""
    cfg, back = _round_trip({
        "rungs": [{"model": "m", **FREE, "extra": {"café": 1, "x²": 2},
                   "thresholds": {"confiança": 0.8}}],
        "verifiers": [{"name": "confidence", "id": "confiança"}]})
    assert back.rungs == cfg.rungs


def test_a_delete_character_in_a_string_round_trips() -> None:
    """JSON leaves U+007F unescaped; TOML forbids it raw in a string (a model name or stop
    sequence from a shared file holding one made TUNED.toml unloadable)."""
    cfg, back = _round_trip({"rungs": [{"model": "m\x7fx", **FREE, "stop": ["\x7f", "é\"\\\n"]}]})
    assert back.rungs == cfg.rungs


def test_infinite_and_nan_floats_round_trip() -> None:
    """TOML holds inf and nan; refusing them made a ladder with such an ``extra`` untunable."""
    _cfg, back = _round_trip({"rungs": [{"model": "m", **FREE,
                                         "extra": {"floor": -math.inf, "cap": math.inf,
                                                   "odd": math.nan, "tiny": 1e-7}}]})
    extra = back.rungs[0].extra
    assert extra["floor"] == -math.inf and extra["cap"] == math.inf
    assert math.isnan(extra["odd"]) and extra["tiny"] == 1e-7


def test_a_header_with_control_characters_still_loads() -> None:
    """The header quotes the suite's path and rung labels; a control character in a comment is
    invalid TOML, and `cascade tune` then crashed with a TOMLDecodeError traceback."""
    _cfg, back = _round_trip({"rungs": [{"model": "m", **FREE}]},
                             header="suite a\x01b\x7f.jsonl\nm\x1f → big")
    assert back.rungs[0].model == "m"


def test_a_fallback_elsewhere_keeps_its_own_key_variable() -> None:
    """A fallback at another endpoint that names the same key variable as its rung: the value
    equals the rung's, so it was not written, and the loader then gave it no key at all (a
    fallback elsewhere does not inherit the rung's key)."""
    cfg, back = _round_trip({"rungs": [{
        "model": "m", **FREE, "provider": "openai-compatible", "base_url": "http://a.test/v1",
        "api_key_env": "LAB_KEY",
        "fallbacks": [{"base_url": "http://b.test/v1", "api_key_env": "LAB_KEY"}]}]})
    assert cfg.rungs[0].fallbacks[0].api_key_env == "LAB_KEY"
    assert back.rungs == cfg.rungs


def test_a_fallback_of_another_kind_keeps_the_same_base_url() -> None:
    """A fallback of another provider kind at the rung's own URL (a proxy speaking both): the
    URL equals the rung's, so it was not written, and the loader dropped it."""
    cfg, back = _round_trip({"rungs": [{
        "model": "m", **FREE, "provider": "openai-compatible", "base_url": "http://proxy.test",
        "fallbacks": [{"provider": "anthropic", "base_url": "http://proxy.test"}]}]})
    assert cfg.rungs[0].fallbacks[0].base_url == "http://proxy.test"
    assert back.rungs == cfg.rungs


def test_a_fallback_priced_like_its_rung_keeps_that_price() -> None:
    """A fallback naming another model the price table knows, given the rung's price
    explicitly: the price equals the rung's, so it was not written, and the loader priced it
    from the table instead (gpt-4o at 16x)."""
    cfg, back = _round_trip({"rungs": [{
        "model": "gpt-4o-mini", "input_usd_per_mtok": 0.15, "output_usd_per_mtok": 0.6,
        "fallbacks": [{"model": "gpt-4o", "input_usd_per_mtok": 0.15,
                       "output_usd_per_mtok": 0.6}]}]})
    assert cfg.rungs[0].fallbacks[0].input_usd_per_mtok == 0.15
    assert back.rungs == cfg.rungs


def test_a_witness_rung_of_an_agreement_gate_loads() -> None:
    """A rung that never accepts (it answers for the next rung's agreement gate) was written
    with threshold 2.0, which the loader refuses: `cascade tune --agreement all` wrote a
    TUNED.toml that did not load. It is written and read as inf now."""
    from cascade.tuning import Setting
    from cascade.tuning.output import to_config
    from tests.test_tune import _witness_table

    t = _witness_table(200, 0)
    s = Setting((0, 1, 2), ("confidence",), ((math.inf,), (0.0,)), (False, True), "choice")
    cfg = parse_config(tomllib.loads(to_toml(to_config(t, s))))
    assert cfg.rungs[0].thresholds["confidence"] == math.inf


# ------------------------------------------------------------------ the json_schema grader


_MSG = [{"role": "user", "content": "a number, as JSON"}]


@pytest.mark.parametrize("schema", [{"type": "nope"}, {"type": "number", "minimum": "x"},
                                    {"pattern": "("}])
def test_an_invalid_schema_is_refused_when_the_suite_loads(schema: dict[str, Any]) -> None:
    """It crashed grading (UnknownType, TypeError) after every rung had been recorded."""
    with pytest.raises(ConfigError, match="not a valid JSON Schema"):
        parse_case({"id": "c", "messages": _MSG, "expected": schema,
                    "grader": "json_schema"}, "cases.jsonl:1")


def test_an_unresolvable_schema_reference_is_a_config_error() -> None:
    """A ``$ref`` nothing resolves (a URL: never fetched) raised referencing's own error."""
    case = Case(id="c", messages=(Message("user", "x"),), grader="json_schema",
                expected={"$ref": "http://127.0.0.1:9/number.json"})
    with pytest.raises(ConfigError, match="reference"):
        grade(case, "5")


# ------------------------------------------------------------------ the disk cache


def _answer(text: str) -> Answer:
    a = Attempt(rung=0, model="m", provider="openai", status="accepted", text=text,
                verdicts=[Verdict(passed=True, reason="ok", verifier="refusal")],
                input_tokens=5, output_tokens=1, cost_usd=1e-6)
    return Answer(text=text, model="m", verified=True, attempts=[a], cost_usd=1e-6)


def test_an_empty_secret_is_refused_not_used_as_the_hmac_key(tmp_path: Path) -> None:
    """An empty (or truncated) ``cascade-secret`` was read as the key b"": anyone could forge
    an entry with the public empty key and have it served as verified."""
    import diskcache

    (tmp_path / SECRET_FILE).write_text("")
    k = cache_key({"q": "capital of Australia"})
    body = json.dumps({**_answer("Sydney").to_dict(), "cache_hit": False, "metadata": {}},
                      sort_keys=True, separators=(",", ":"))
    forged = {"key": k, "answer": body,
              "mac": hmac.new(b"", f"{k}\n{body}".encode(), hashlib.sha256).hexdigest()}
    with diskcache.Cache(str(tmp_path), disk=diskcache.JSONDisk) as raw:
        raw.set(k, forged)
    c = AnswerCache(tmp_path)
    try:
        with pytest.raises(CacheError, match=SECRET_FILE):
            c.get(k)
    finally:
        c.close()


# ------------------------------------------------------------------ recordings


def test_a_loose_match_never_serves_a_verifiers_sample_as_the_answer(tmp_path: Path) -> None:
    """A sampling verifier calls the rung's model with the case's own messages (at another
    temperature) and is recorded first; the loose (model, messages) match then served that
    sample as the rung's answer to a call that missed the exact key."""
    from cascade.config import RungConfig
    from cascade.providers.base import Completion, ModelCall
    from cascade.suite import Recording, RecordingStore, answer_call

    rung = RungConfig(model="m1")
    msgs = (Message("user", "2+2?"),)
    sample = ModelCall(model="m1", messages=msgs, temperature=0.7)
    store = RecordingStore(tmp_path / "recordings.jsonl")
    for call, text, kind in ((sample, "5", "verifier"), (answer_call(rung, msgs), "4", "answer")):
        store.add(Recording.of(call, Completion(text=text, model="m1", input_tokens=3,
                                                output_tokens=1),
                               case_id="a", kind=kind, cost_usd=0.0))
    again = RecordingStore.for_suite(tmp_path)
    got = again.get(ModelCall(model="m1", messages=msgs, max_tokens=7))
    assert got is not None and got.kind == "answer" and got.text == "4"
    exact = again.get(sample)
    assert exact is not None and exact.text == "5"


def test_a_suite_schema_ref_is_never_fetched(tmp_path: Path) -> None:
    """Grading a json_schema case used jsonschema's default registry, which opens an unknown
    ``$ref`` (http, https, file:) with urlopen: a suite file chose a read or a network call."""
    from cascade.suite import load_cases
    from cascade.suite.grading import grade

    secret = tmp_path / "outside.json"
    secret.write_text('{"type": "string"}')
    (tmp_path / "cases.jsonl").write_text(json.dumps(
        {"id": "q", "messages": _MSG, "grader": "json_schema",
         "expected": {"$ref": secret.as_uri()}}) + "\n")
    [case] = load_cases(tmp_path)
    import warnings

    # as in production: jsonschema's fetch only warns (a DeprecationWarning, which this test
    # suite otherwise turns into an error that would hide the fetch)
    with warnings.catch_warnings(), pytest.raises(ConfigError, match="cannot be resolved"):
        warnings.simplefilter("ignore", DeprecationWarning)
        grade(case, '"a string"')  # the file would make it valid: it must not be read
