"""Defects found by a black-box walk of the library API as the README describes it, each pinned
by a test that failed on the code before its fix: an answer outside the request's schema
verified (and cached) at a rung with verifiers of its own, ..."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cascade.engine import Cascade
from cascade.errors import NoAnswerError
from cascade.messages import Message
from cascade.testing import Script
from tests.engine_kit import config as _config
from tests.engine_kit import rung as _rung

pytestmark = pytest.mark.anyio

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"},
                                            "country": {"type": "string"}},
          "required": ["name", "country"]}




# ---------------------------------------------------------------- the request's schema


@pytest.mark.parametrize("schema_verifier", [
    {"name": "schema"},  # configured, but not bound to the first rung
    {"name": "schema", "schema": {"type": "object"}},  # bound everywhere, a schema of its own
])
async def test_every_rung_checks_the_schema_the_request_asked_for(
        tmp_path: Path, schema_verifier: dict[str, Any]) -> None:
    s = Script({"small": ['{"name": 1}'], "big": ['{"name": "Canberra", "country": "AU"}']})
    first: dict[str, Any] = ({"verifiers": ["refusal"]} if "schema" not in schema_verifier
                             else {})
    cfg = _config(tmp_path, [_rung("small", 1.0, **first), _rung("big", 10.0)],
                  verifiers=[{"name": "refusal"}, schema_verifier])
    with Cascade.from_dict(cfg, provider_factory=s.factory) as c:
        a = await c.aanswer("Capital of Australia, as JSON", schema=SCHEMA)
        again = await c.aanswer("Capital of Australia, as JSON", schema=SCHEMA)
    assert (a.model, a.verified) == ("big", True)
    assert a.attempts[0].status == "rejected"
    failed = [v for v in a.attempts[0].verdicts if not v.passed]
    assert failed and failed[0].verifier in ("schema", "schema:request")
    assert again.cache_hit and again.text == a.text  # the rejected answer was never cached


# ---------------------------------------------------------------- secrets


async def test_a_provider_error_quoting_its_key_is_cut_from_trace_cache_and_audit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A provider plugin whose error quotes its key (its own URL's ``?key=``): verdict reasons
    were cut, the attempt's error was not, and a key set after the Cascade was built (keys are
    read at the first call) was missed by the audit log too."""
    from cascade.config import RungConfig
    from cascade.errors import ServerError
    from cascade.providers.base import Completion, ModelCall, Provider

    key = "sk-live-SECRET-0123456789abcdef"
    monkeypatch.delenv("WALK_GEN_KEY", raising=False)

    class KeyInUrl(Provider):
        name = "keyurl"

        def __init__(self, rung: RungConfig) -> None:
            self.rung = rung

        async def complete(self, call: ModelCall) -> Completion:
            if call.model == "flaky":
                raise ServerError(f"HTTP 503 from https://gen.example/v1/flaky?key={key}",
                                  provider="keyurl", model=call.model)
            return Completion(text="Canberra", model=call.model, input_tokens=3,
                              output_tokens=2, finish_reason="stop")

    rungs = [{"model": m, "provider": "openai-compatible", "base_url": "http://gen/v1",
              "api_key_env": "WALK_GEN_KEY", "price": "unknown"} for m in ("flaky", "good")]
    log = tmp_path / "audit.jsonl"
    c = Cascade.from_dict(_config(tmp_path, rungs), provider_factory=KeyInUrl, audit_log=log)
    monkeypatch.setenv("WALK_GEN_KEY", key)  # after the Cascade was built
    with c:
        a = await c.aanswer("Capital of Australia?")
        hit = await c.aanswer("Capital of Australia?")
    assert a.model == "good" and a.attempts[0].error_type == "ServerError"
    assert "[redacted]" in (a.attempts[0].error or "")
    assert hit.cache_hit
    for text in (a.attempts[0].error or "", json.dumps(hit.to_dict()), log.read_text()):
        assert "SECRET-0123456789" not in text


# ---------------------------------------------------------------- errors before money


def test_a_bad_shadow_normaliser_fails_at_build_not_after_each_paid_shadow_call(
        tmp_path: Path) -> None:
    from cascade.errors import ConfigError

    s = Script({"small": ["Canberra"], "big": ["Canberra"]})
    cfg = _config(tmp_path, [_rung("small", 1.0), _rung("big", 10.0)],
                  policy={"shadow_rate": 1.0, "shadow_normaliser": "nope"})
    with pytest.raises(ConfigError) as ei:
        Cascade.from_dict(cfg, provider_factory=s.factory)
    assert ei.value.key == "policy.shadow_normaliser" and "nope" in str(ei.value)
    assert not s.calls
    cfg["policy"]["shadow_normaliser"] = "exact"
    Cascade.from_dict(cfg, provider_factory=s.factory).close()  # a good one builds


# ---------------------------------------------------------------- the cache key


async def test_a_function_verifiers_metadata_keys_enter_the_cache_key(tmp_path: Path) -> None:
    """A plain function declaring ``metadata_keys`` (as the class form does): the declaration
    was read off the wrapper, not the function, so a request with another ``expected`` got
    the first request's answer from the cache, one its own verifier rejects."""
    from cascade.trace import Verdict
    from cascade.verify import VerifyContext

    def matches_expected(ctx: VerifyContext) -> Verdict:
        want = str(ctx.request.metadata.get("expected", ""))
        return Verdict(passed=want.lower() in ctx.candidate.text.lower(), reason=want)

    matches_expected.metadata_keys = ("expected",)  # type: ignore[attr-defined]
    matches_expected.cache_key = "v1"  # type: ignore[attr-defined]
    s = Script({"small": ["Sydney"], "big": ["Canberra"]})
    cfg = _config(tmp_path, [_rung("small", 1.0), _rung("big", 10.0)])
    with Cascade.from_dict(cfg, provider_factory=s.factory) as c:
        a = await c.aanswer("Capital of Australia?", verifiers=[matches_expected],
                            metadata={"expected": "Sydney"})
        b = await c.aanswer("Capital of Australia?", verifiers=[matches_expected],
                            metadata={"expected": "Canberra"})
        again = await c.aanswer("Capital of Australia?", verifiers=[matches_expected],
                                metadata={"expected": "Sydney"})
    assert (a.text, a.cache_hit) == ("Sydney", False)
    assert (b.text, b.cache_hit, b.verified) == ("Canberra", False, True)
    assert again.cache_hit and again.text == "Sydney"


@pytest.mark.parametrize("bad", [5, "refusal", [5], [None]])
async def test_verifiers_that_are_not_verifiers_are_a_config_error_before_any_call(
        tmp_path: Path, bad: Any) -> None:
    from cascade.errors import ConfigError

    s = Script({"small": ["Canberra"], "big": ["Canberra"]})
    with Cascade.from_dict(_config(tmp_path, [_rung("small", 1.0), _rung("big", 10.0)]),
                           provider_factory=s.factory) as c:
        with pytest.raises(ConfigError) as ei:
            await c.aanswer("Capital of Australia?", verifiers=bad)
        assert ei.value.key == "verifiers"
        with pytest.raises(ConfigError):
            Cascade.from_dict(_config(tmp_path, [_rung("small", 1.0)]), verifiers=bad)
    assert not s.calls


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"on_attempt": "print"}, "on_attempt"),
    ({"on_attempt": 5}, "on_attempt"),
    ({"config": 5}, "config"),
    ({"messages": [Message("user", 123)]}, None),  # type: ignore[arg-type]
    ({"messages": [Message("tool", "x"), Message("user", "hi")]}, None),  # type: ignore[arg-type]
])
async def test_bad_per_call_values_are_config_errors_before_any_model_is_called(
        tmp_path: Path, kwargs: dict[str, Any], key: str | None) -> None:
    """``on_attempt="print"`` was called after the first (paid) rung, losing its answer;
    ``config=5`` and a ``Message`` of the wrong role or content type were a TypeError or
    reached the model."""
    from cascade.errors import ConfigError

    s = Script({"small": ["Canberra"], "big": ["Canberra"]})
    prompt = None if "messages" in kwargs else "Capital of Australia?"
    with Cascade.from_dict(_config(tmp_path, [_rung("small", 1.0), _rung("big", 10.0)]),
                           provider_factory=s.factory) as c:
        with pytest.raises(ConfigError) as ei:
            await c.aanswer(prompt, **kwargs)
        with pytest.raises(ConfigError):
            c.answer(prompt, **kwargs)  # the sync twin alike
    if key is not None:
        assert ei.value.key == key
    assert not s.calls


# ---------------------------------------------------------------- a per-call config


@pytest.mark.parametrize(("base", "per_call", "tries"), [(1, 4, 4), (4, 1, 1)])
async def test_a_per_call_configs_retry_is_the_one_used(tmp_path: Path, base: int,
                                                        per_call: int, tries: int) -> None:
    """``config=`` is another ladder for this call, yet its ``[retry]`` was ignored for the
    Cascade's own."""
    from cascade.errors import ServerError

    s = Script({"only": [ServerError("HTTP 503", status_code=503)]})

    def cfg(attempts: int) -> dict[str, Any]:
        d = _config(tmp_path, [_rung("only", 1.0)])
        d["retry"] = {"max_attempts": attempts, "base_delay_s": 0.0, "max_delay_s": 0.0}
        return d

    with (Cascade.from_dict(cfg(base), provider_factory=s.factory) as c,
          pytest.raises(NoAnswerError)):
        await c.aanswer("Capital of Australia?", config=cfg(per_call))
    assert s.count("only") == tries


# ---------------------------------------------------------------- resources


@pytest.mark.parametrize("run", ["asyncio", "anyio"])
def test_providers_of_an_event_loop_that_ended_are_closed_with_it(tmp_path: Path,
                                                                   run: str) -> None:
    """``asyncio.run(cascade.aanswer(...))`` again and again (a script, a sync view): each run
    left an SDK client and its open connection behind, for the life of the Cascade."""
    import asyncio

    import anyio

    from cascade.config import RungConfig
    from cascade.testing import ScriptedProvider

    s = Script({"small": ["Canberra"]})
    closed: list[int] = []

    class Counted(ScriptedProvider):
        async def aclose(self) -> None:
            closed.append(1)

    def factory(rung: RungConfig) -> Counted:
        return Counted(s, rung)

    cfg = _config(tmp_path, [_rung("small", 1.0)])
    cfg["cache"] = {"enabled": False}
    c = Cascade.from_dict(cfg, provider_factory=factory)
    for _ in range(5):
        if run == "asyncio":
            asyncio.run(c.aanswer("Capital of Australia?"))
        else:
            anyio.run(c.aanswer, "Capital of Australia?")
    assert s.count("small") == 5
    assert len(closed) == 5 and not c._providers  # each closed as its loop ended
    c.answer("Capital of Australia?")  # the sync API's own loop keeps its provider
    assert len(c._providers) == 1
    c.close()
    assert len(closed) == 6 and not c._providers


@pytest.mark.parametrize("content", ["", "   ", []])
async def test_messages_whose_user_turns_are_all_empty_are_refused_unpaid(
        tmp_path: Path, content: Any) -> None:
    """``prompt=""`` was refused, the same empty question as messages was sent to every rung
    (the service let it through too, paid)."""
    from cascade.errors import ConfigError

    s = Script({"small": ["Canberra"]})
    with Cascade.from_dict(_config(tmp_path, [_rung("small", 1.0)]),
                           provider_factory=s.factory) as c:
        with pytest.raises(ConfigError, match="user turn with text"):
            await c.aanswer(messages=[{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": content}])
        ok = await c.aanswer(messages=[{"role": "user", "content": ""},
                                       {"role": "assistant", "content": "?"},
                                       {"role": "user", "content": "Capital of Australia?"}])
    assert ok.text == "Canberra" and s.count("small") == 1


@pytest.mark.parametrize(("section", "key", "value"), [
    ("retry", "max_attempts", 0), ("retry", "jitter", 2.0),
    ("breaker", "failure_threshold", 0), (None, "timeout_s", 0),
])
def test_settings_that_could_only_misbehave_are_refused(
        tmp_path: Path, section: str | None, key: str, value: Any) -> None:
    """``max_attempts = 0`` and ``jitter = 2`` were clamped silently, ``failure_threshold =
    0`` opened every circuit at once, and ``timeout_s = 0`` failed every request."""
    from cascade.config import parse_config
    from cascade.errors import ConfigError

    cfg = _config(tmp_path, [_rung("small", 1.0)])
    if section is None:
        cfg[key] = value
    else:
        cfg[section] = {**cfg.get(section, {}), key: value}
    with pytest.raises(ConfigError) as ei:
        parse_config(cfg)
    assert ei.value.key == (f"{section}.{key}" if section else key)
