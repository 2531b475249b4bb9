"""Engine defects from the adversarial review (#11): each test failed on the old engine."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from cascade import (
    AnswerCache,
    CacheError,
    Cascade,
    CascadeError,
    ConfigError,
    ModelCall,
    Provider,
    RungConfig,
    VerifyContext,
)
from cascade.config import parse_config
from cascade.testing import FunctionProvider, Script
from tests.loopback import LoopbackServer, free_port, openai_reply

pytestmark = pytest.mark.anyio


def _config(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {
        "rungs": [
            {"model": "small", "provider": "openai-compatible", "base_url": "http://small/v1",
             "input_usd_per_mtok": 1.0, "output_usd_per_mtok": 2.0},
            {"model": "big", "provider": "openai-compatible", "base_url": "http://big/v1",
             "input_usd_per_mtok": 10.0, "output_usd_per_mtok": 20.0},
        ],
        "cache": {"directory": str(tmp_path / "cache")},
        **extra,
    }


class Raises:
    """A plugin that raises ``exc`` on the requests whose prompt says so."""

    name = "raises"
    expensive = False
    cache_key = "raises"

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def verify(self, ctx: VerifyContext) -> bool:
        if "boom" in ctx.request.last_user:
            raise self.exc
        return True


@pytest.mark.parametrize("exc", [asyncio.CancelledError(), SystemExit(3)])
async def test_answer_many_keeps_every_slot_whatever_a_plugin_raises(
        tmp_path: Path, exc: BaseException) -> None:
    """Old engine: a CancelledError from a plugin left 15 of 50 results, in the wrong slots;
    SystemExit lost them all and broke the Cascade. Each slot must hold its own request's
    answer or error, and the Cascade must stay usable."""
    s = Script({"small": [lambda call: f"answer to {call.messages[-1].content}"],
                "big": [lambda call: "big"]})
    c = Cascade.from_dict(_config(tmp_path, cache={"enabled": False}),
                          verifiers=[Raises(exc)], provider_factory=s.factory)
    prompts = [f"q{i} boom" if i % 3 == 0 else f"q{i}" for i in range(50)]
    results = await c.aanswer_many(prompts, concurrency=7)
    assert len(results) == 50
    for i, r in enumerate(results):
        if i % 3 == 0:
            assert isinstance(r, CascadeError), (i, r)
        else:
            assert not isinstance(r, BaseException) and r.text == f"answer to q{i}", (i, r)
    assert (await c.aanswer("still usable")).text == "answer to still usable"


def test_sync_answer_many_survives_system_exit_from_a_plugin(tmp_path: Path) -> None:
    s = Script({"small": [lambda call: "fine"], "big": ["big"]})
    with Cascade.from_dict(_config(tmp_path, cache={"enabled": False}),
                           verifiers=[Raises(SystemExit(1))], provider_factory=s.factory) as c:
        out = c.answer_many(["boom", "ok"])
        assert isinstance(out[0], CascadeError) and not isinstance(out[1], BaseException)
        assert c.answer("ok again").text == "fine"


@pytest.mark.parametrize(("kw", "key"), [
    ({"max_cost_usd": "0.1"}, "max_cost_usd"),
    ({"max_cost_usd": float("nan")}, "max_cost_usd"),
    ({"max_cost_usd": -1.0}, "max_cost_usd"),
    ({"timeout_s": float("nan")}, "timeout_s"),
    ({"timeout_s": "2"}, "timeout_s"),
    ({"metadata": ["budget_key"]}, "metadata"),
    ({"cache": "yes"}, "cache"),
    ({"schema": {"type": "object", "properties": {"a": {"type": "no-such-type"}}}}, "schema"),
])
async def test_bad_per_call_arguments_are_typed_errors_before_anything_is_paid(
        tmp_path: Path, kw: dict[str, Any], key: str) -> None:
    """NaN used to disable the cap silently; a bad JSON Schema was found only after every rung
    had been paid for."""
    s = Script({"small": ["a"], "big": ["b"]})
    c = Cascade.from_dict(_config(tmp_path), provider_factory=s.factory)
    with pytest.raises(ConfigError) as ei:
        await c.aanswer("q", **kw)
    assert ei.value.key == key
    assert s.calls == []


async def test_a_role_given_as_a_list_is_a_typed_error(tmp_path: Path) -> None:
    c = Cascade.from_dict(_config(tmp_path), provider_factory=Script({}).factory)
    with pytest.raises(ConfigError, match="role"):
        await c.aanswer(messages=[{"role": ["user"], "content": "hi"}])


class FullDisk(AnswerCache):
    """A cache whose store fails as a full disk would (reads work)."""

    def set(self, key: str, answer: Any) -> None:
        raise CacheError("database or disk is full")


async def test_a_paid_verified_answer_survives_a_failing_cache_store(tmp_path: Path) -> None:
    s = Script({"small": ["Canberra"], "big": ["Canberra"]})
    c = Cascade.from_dict(_config(tmp_path), provider_factory=s.factory,
                          cache=FullDisk(tmp_path / "c"))
    ans = await c.aanswer("Capital of Australia?")
    assert ans.verified and ans.text == "Canberra"
    assert any("not cached" in w and "disk is full" in w for w in ans.warnings)


async def test_the_deadline_starts_after_the_providers_are_made(tmp_path: Path) -> None:
    """``cascade answer --timeout 2`` failed its first request: the SDK import counted against
    the deadline. A provider that takes 1 s to make must not eat a 0.5 s deadline."""
    fn = FunctionProvider(lambda call: "Canberra")

    def slow_factory(rung: RungConfig) -> Provider:
        time.sleep(1.0)  # stands in for importing an SDK
        return fn

    c = Cascade.from_dict(_config(tmp_path, cache={"enabled": False}),
                          provider_factory=slow_factory)
    ans = await c.aanswer("q", timeout_s=0.5)
    assert ans.verified and ans.text == "Canberra"


async def test_on_attempt_reports_each_rung_as_it_finishes(tmp_path: Path) -> None:
    s = Script({"small": ["I don't know"], "big": ["Canberra"]})

    def knows(ctx: VerifyContext) -> bool:
        return "don't know" not in ctx.candidate.text

    seen: list[tuple[int, str]] = []

    async def progress(attempt: Any) -> None:
        seen.append((attempt.rung, attempt.status))

    c = Cascade.from_dict(_config(tmp_path, cache={"enabled": False}), verifiers=[knows],
                          provider_factory=s.factory)
    ans = await c.aanswer("q", on_attempt=progress)
    assert seen == [(0, "rejected"), (1, "accepted")] and ans.model == "big"


async def test_equivalent_endpoints_are_chosen_by_load(tmp_path: Path) -> None:
    """Two endpoints of the same model: once the configured first one is seen to be slow, the
    other goes first, and the trace says why."""
    calls: list[str] = []

    def factory(rung: RungConfig) -> Provider:
        async def answer(call: ModelCall) -> str:
            calls.append(rung.base_url or "")
            if rung.base_url == "http://slow/v1":
                await anyio.sleep(0.3)
            return "Canberra"
        return FunctionProvider(answer)

    cfg = {"rungs": [{"model": "m", "provider": "openai-compatible", "base_url": "http://slow/v1",
                      "price": "unknown",
                      "fallbacks": [{"base_url": "http://fast/v1"}]}],
           "cache": {"enabled": False}}
    c = Cascade.from_dict(cfg, provider_factory=factory)
    first = await c.aanswer("q")
    assert calls == ["http://slow/v1"] and first.attempts[0].note is None
    second = await c.aanswer("q")  # the fast one is not timed yet: it gets its chance
    third = await c.aanswer("q")
    assert calls[1:] == ["http://fast/v1", "http://fast/v1"]
    assert second.attempts[0].endpoint == "http://fast/v1"
    assert "load-aware" in (third.attempts[0].note or "")


async def test_per_call_config_reuses_one_ladder(tmp_path: Path) -> None:
    """``aanswer(config=...)`` built a whole new Cascade per call (providers, breakers, a
    cache); now a per-call config is a ladder built once and the providers are shared."""
    made: list[str] = []
    fn = FunctionProvider(lambda call: "x")

    def factory(rung: RungConfig) -> Provider:
        made.append(rung.model)
        return fn

    c = Cascade.from_dict(_config(tmp_path, cache={"enabled": False}), provider_factory=factory)
    other = c.config.replace(rungs=c.config.rungs[1:])
    for _ in range(5):
        assert (await c.aanswer("q", config=other)).model == "big"
    assert made == ["big"]


async def test_a_per_call_cap_over_a_rung_of_unknown_price_is_refused(tmp_path: Path) -> None:
    """A cap cannot hold over a rung whose cost is unknown: say so, before any call."""
    cfg = _config(tmp_path)
    cfg["rungs"][1] = {"model": "mystery", "provider": "openai-compatible",
                       "base_url": "http://m/v1", "price": "unknown"}
    s = Script({"small": ["a"], "mystery": ["b"]})
    c = Cascade.from_dict(cfg, provider_factory=s.factory)
    with pytest.raises(ConfigError, match="unknown") as ei:
        await c.aanswer("q", max_cost_usd=0.01)
    assert ei.value.key == "max_cost_usd" and s.calls == []
    assert (await c.aanswer("q")).text in ("a", "b")


async def test_a_huge_prompt_is_counted_off_the_event_loop(tmp_path: Path) -> None:
    """With a cost cap, a 10 MB prompt held the event loop ~8 s in tiktoken. Now it is counted
    in a worker thread: another task keeps ticking while the estimate runs."""
    ticks = 0
    done = False

    async def ticker() -> None:
        nonlocal ticks
        while not done:
            ticks += 1
            await anyio.sleep(0.005)

    s = Script({"small": ["ok"], "big": ["ok"]})
    c = Cascade.from_dict(_config(tmp_path, cache={"enabled": False}),
                          provider_factory=s.factory)
    prompt = "word " * 2_000_000  # 10 MB
    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        await anyio.sleep(0.02)
        before = ticks
        ans = await c.aanswer(prompt, max_cost_usd=100.0)
        during = ticks - before
        done = True
    assert ans.text == "ok"
    assert during >= 5  # the loop ran other tasks while the prompt was counted


async def test_a_fallback_at_another_endpoint_never_gets_the_rungs_key(
        openai_server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fallback inherits what it does not set, but not the key variable when it points
    elsewhere: the README's own example (an Anthropic rung failing over to a local server)
    used to send the Anthropic key, in plain HTTP, to whatever listened there."""
    secret = "sk-ant-FALLBACK-LEAK-0123456789"
    monkeypatch.setenv("CASCADE_TEST_ANTHROPIC_KEY", secret)
    openai_server.queue(openai_reply("Canberra"))
    c = Cascade.from_dict({
        "rungs": [{"model": "claude-sonnet-4-5", "provider": "anthropic",
                   "api_key_env": "CASCADE_TEST_ANTHROPIC_KEY",
                   "base_url": f"http://127.0.0.1:{free_port()}", "max_retries": 0,
                   "fallbacks": [{"provider": "openai-compatible",
                                  "base_url": openai_server.base_url}]}],
        "cache": {"enabled": False}})
    try:
        ans = await c.aanswer("Capital of Australia?")
    finally:
        await c.aclose()
    assert ans.text == "Canberra" and ans.attempts[0].endpoint == openai_server.base_url
    sent = openai_server.requests[0].headers.get("authorization", "")
    assert secret not in sent and sent  # the local server's dummy key, not the Anthropic one
    assert c.config.rungs[0].fallbacks[0].api_key_env is None


def test_a_fallback_at_the_same_endpoint_keeps_the_key_variable() -> None:
    cfg = parse_config({"rungs": [{"model": "gpt-4o-mini", "api_key_env": "MY_KEY",
                                   "fallbacks": [{"model": "gpt-4o-mini-2024-07-18"},
                                                 {"base_url": "https://eu.example/v1",
                                                  "api_key_env": "EU_KEY"}]}]})
    assert [f.api_key_env for f in cfg.rungs[0].fallbacks] == ["MY_KEY", "EU_KEY"]
