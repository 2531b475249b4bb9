"""Fault injection: the real OpenAI SDK, through the engine, against misbehaving loopback servers.

Every test drives ``Cascade`` (provider ``openai-compatible``) over real sockets and asserts on
the answer, the trace, the wall time taken and the money spent. Delays are small (tenths of a
second) so the whole module stays quick.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cascade.budget import InMemoryBudgetStore
from cascade.engine import Cascade, health
from cascade.errors import BudgetExceeded, CascadeError, DeadlineExceeded, NoAnswerError
from cascade.testing import FakeClock
from cascade.trace import Answer, Verdict
from cascade.verify import VerifyContext
from tests.loopback import (
    LoopbackServer,
    RecordedRequest,
    Reply,
    openai_chat,
    openai_error,
    openai_reply,
)
from tests.verifier_kit import not_idk

pytestmark = pytest.mark.anyio

Handler = Callable[[RecordedRequest], Reply]




@pytest.fixture(scope="module", autouse=True)
def _warm_sdk(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The SDK's first call pays seconds of lazy imports: pay them before any timing."""
    with LoopbackServer("openai") as server:
        cfg = ladder(tmp_path_factory.mktemp("warm"), server.base_url)
        with Cascade.from_dict(cfg) as c:
            assert c.answer("warm up", cache=False).text == "ok"


@pytest.fixture
def second_server() -> Iterator[LoopbackServer]:
    with LoopbackServer("openai") as server:
        yield server




def ladder(tmp_path: Path, small_url: str, big_url: str | None = None, *,
           retry: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """Two rungs, ``small`` then ``big``, on loopback servers; fast retries."""
    rung: dict[str, Any] = {"provider": "openai-compatible", "timeout_s": 2.0}
    return {
        "rungs": [
            {**rung, "model": "small", "base_url": small_url,
             "input_usd_per_mtok": 1.0, "output_usd_per_mtok": 2.0, "max_tokens": 64},
            {**rung, "model": "big", "base_url": big_url or small_url,
             "input_usd_per_mtok": 10.0, "output_usd_per_mtok": 20.0, "max_tokens": 64},
        ],
        "cache": {"directory": str(tmp_path / "cache")},
        "retry": {"max_attempts": 3, "base_delay_s": 0.01, "max_delay_s": 0.5, "jitter": 0.0,
                  **(retry or {})},
        **extra,
    }


def by_model(**handlers: Handler) -> Handler:
    """Route each request to the handler of the model it names."""

    def handle(req: RecordedRequest) -> Reply:
        model = req.json.get("model", "") if isinstance(req.json, dict) else ""
        return handlers[model](req)

    return handle


def sequence(*replies: Reply) -> Handler:
    """Reply with these in turn; the last one repeats."""
    left = list(replies)

    def handle(req: RecordedRequest) -> Reply:
        return left.pop(0) if len(left) > 1 else left[0]

    return handle


def answer_with(text: str, **kw: Any) -> Handler:
    return lambda req: openai_reply(text, model=req.json["model"], **kw)


def calls_to(server: LoopbackServer, model: str) -> int:
    return sum(1 for r in server.requests
               if isinstance(r.json, dict) and r.json.get("model") == model)


def endpoint(server: LoopbackServer, model: str) -> str:
    return f"openai-compatible|{server.base_url}|{model}"


# ---------------------------------------------------------------- 429 and Retry-After


async def test_429_waits_retry_after_then_succeeds(tmp_path: Path,
                                                    openai_server: LoopbackServer) -> None:
    openai_server.script(by_model(small=sequence(
        openai_error(429, "slow down", type="rate_limit_error", headers={"retry-after": "0.3"}),
        openai_reply("Canberra", model="small"),
    )))
    async with Cascade.from_dict(ladder(tmp_path, openai_server.base_url),
                                 verifiers=[not_idk]) as c:
        t0 = time.monotonic()
        ans = await c.aanswer("Capital of Australia?")
        took = time.monotonic() - t0
    assert (ans.text, ans.model, ans.verified) == ("Canberra", "small", True)
    assert ans.attempts[0].tries == 2 and ans.attempts[0].status == "accepted"
    assert calls_to(openai_server, "small") == 2 and calls_to(openai_server, "big") == 0
    assert 0.3 <= took < 1.5  # honoured Retry-After (0.3 s), not the 0.01 s backoff


async def test_retry_after_beyond_max_delay_fails_over_at_once(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    openai_server.script(by_model(
        small=lambda req: openai_error(429, "come back in a minute", type="rate_limit_error",
                                       headers={"retry-after": "60"}),
        big=answer_with("Canberra"),
    ))
    async with Cascade.from_dict(ladder(tmp_path, openai_server.base_url),
                                 verifiers=[not_idk]) as c:
        t0 = time.monotonic()
        ans = await c.aanswer("Capital of Australia?")
        took = time.monotonic() - t0
    assert ans.model == "big" and ans.verified
    first = ans.attempts[0]
    assert (first.status, first.error_type, first.tries) == ("error", "RateLimited", 1)
    assert "429" in (first.error or "") and "come back in a minute" in (first.error or "")
    assert calls_to(openai_server, "small") == 1  # no second try: waiting 60 s is pointless
    assert took < 1.0


# ---------------------------------------------------------------- 5xx bursts


@pytest.mark.parametrize(("failures", "model", "small_calls"), [(2, "small", 3), (5, "big", 3)])
async def test_500_burst(tmp_path: Path, openai_server: LoopbackServer, failures: int,
                         model: str, small_calls: int) -> None:
    boom = openai_error(500, "internal kaboom", type="server_error")
    openai_server.script(by_model(
        small=sequence(*[boom] * failures, openai_reply("small says Canberra", model="small")),
        big=answer_with("big says Canberra"),
    ))
    async with Cascade.from_dict(ladder(tmp_path, openai_server.base_url),
                                 verifiers=[not_idk]) as c:
        ans = await c.aanswer("Capital of Australia?")
    assert ans.model == model and ans.verified and ans.text == f"{model} says Canberra"
    assert calls_to(openai_server, "small") == small_calls  # max_attempts = 3
    first = ans.attempts[0]
    assert first.tries == 3
    if model == "small":
        assert first.status == "accepted" and first.error is None
    else:
        assert (first.status, first.error_type) == ("error", "ServerError")
        assert "HTTP 500" in (first.error or "") and "internal kaboom" in (first.error or "")
        assert ans.attempts[1].status == "accepted"
    assert ans.cost_usd > 0


# ---------------------------------------------------------------- slow, reset, garbage


async def test_slow_reply_times_out_is_retried_then_fails_over(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    cfg = ladder(tmp_path, openai_server.base_url, retry={"max_attempts": 2})
    cfg["rungs"][0]["timeout_s"] = 0.2
    openai_server.script(by_model(
        small=lambda req: openai_reply("too late", model="small", delay_s=1.5),
        big=answer_with("Canberra"),
    ))
    async with Cascade.from_dict(cfg, verifiers=[not_idk]) as c:
        t0 = time.monotonic()
        ans = await c.aanswer("Capital of Australia?")
        took = time.monotonic() - t0
    assert ans.model == "big" and ans.text == "Canberra"
    first = ans.attempts[0]
    assert (first.status, first.error_type, first.tries) == ("error", "ProviderTimeout", 2)
    assert calls_to(openai_server, "small") == 2
    assert 0.4 <= took < 1.2  # two 0.2 s timeouts, never the 1.5 s reply


@pytest.mark.parametrize("fault", ["reset", "close", "garbage"])
async def test_broken_connection_is_retried(tmp_path: Path, openai_server: LoopbackServer,
                                            fault: Any) -> None:
    openai_server.script(by_model(small=sequence(
        Reply(json=openai_chat("lost", model="small"), fault=fault),
        openai_reply("Canberra", model="small"),
    )))
    async with Cascade.from_dict(ladder(tmp_path, openai_server.base_url),
                                 verifiers=[not_idk]) as c:
        ans = await c.aanswer("Capital of Australia?")
    assert (ans.model, ans.text, ans.attempts[0].tries) == ("small", "Canberra", 2)


@pytest.mark.parametrize("fault", ["reset", "close", "garbage"])
async def test_broken_connection_for_good_fails_over(tmp_path: Path,
                                                     openai_server: LoopbackServer,
                                                     fault: Any) -> None:
    openai_server.script(by_model(
        small=lambda req: Reply(json=openai_chat("lost", model="small"), fault=fault),
        big=answer_with("Canberra"),
    ))
    async with Cascade.from_dict(ladder(tmp_path, openai_server.base_url),
                                 verifiers=[not_idk]) as c:
        ans = await c.aanswer("Capital of Australia?")
    first = ans.attempts[0]
    assert (first.status, first.error_type, first.tries) == ("error", "TransportError", 3)
    assert "connection failed" in (first.error or "")
    assert ans.model == "big" and ans.verified


_MALFORMED = {
    "invalid-json": Reply(body=b'{"choices": [ {"message": '),
    "not-utf8": Reply(body=b"\x80\xff{"),
    "empty-choices": Reply(json={**openai_chat("x"), "choices": []}),
    "no-usage": Reply(json={k: v for k, v in openai_chat("x").items() if k != "usage"}),
    "wrong-content-type": Reply(body=b"Canberra", content_type="text/plain"),
    "content-not-string": Reply(json=json.loads(
        json.dumps(openai_chat("x")).replace('"content": "x"', '"content": 42'))),
}


@pytest.mark.parametrize("kind", sorted(_MALFORMED))
async def test_malformed_reply_is_a_typed_error_for_that_attempt(
        tmp_path: Path, openai_server: LoopbackServer, kind: str) -> None:
    bad = _MALFORMED[kind]
    openai_server.script(by_model(small=lambda req: bad, big=sequence(
        bad, openai_reply("Canberra", model="big"))))
    async with Cascade.from_dict(ladder(tmp_path, openai_server.base_url),
                                 verifiers=[not_idk]) as c:
        ans = await c.aanswer("Capital of Australia?")
    first, second = ans.attempts
    assert (first.status, first.error_type, first.tries) == ("error", "MalformedReply", 3)
    assert first.error
    assert (second.status, second.tries, ans.text) == ("accepted", 2, "Canberra")


# ---------------------------------------------------------------- circuit breaker


async def test_breaker_opens_skips_then_probes_and_closes(
        tmp_path: Path, openai_server: LoopbackServer, second_server: LoopbackServer) -> None:
    """In fake time: the cooldown passes when the test says so, not after a real sleep."""
    cfg = ladder(tmp_path, openai_server.base_url, second_server.base_url,
                 retry={"max_attempts": 1}, breaker={"failure_threshold": 2, "cooldown_s": 30})
    openai_server.script(lambda req: openai_error(503, "down for maintenance"))
    second_server.script(answer_with("Canberra"))
    small = endpoint(openai_server, "small")
    clock = FakeClock()
    async with Cascade.from_dict(cfg, verifiers=[not_idk], clock=clock) as c:
        for i in range(2):
            ans = await c.aanswer(f"q{i}", cache=False)
            assert ans.model == "big" and ans.attempts[0].error_type == "ServerError"
        assert len(openai_server.requests) == 2
        snap = (await c.ahealth())["endpoints"][small]["circuit"]
        assert snap["state"] == "open" and snap["consecutive_failures"] == 2

        ans = await c.aanswer("q-open", cache=False)
        first = ans.attempts[0]
        assert (first.status, first.error_type, first.tries) == ("error", "CircuitOpen", 0)
        assert "circuit open" in (first.error or "")
        assert len(openai_server.requests) == 2  # not even a connection attempt
        assert ans.model == "big"

        clock.advance(29.9)
        assert (await c.ahealth())["endpoints"][small]["circuit"]["state"] == "open"
        clock.advance(0.2)
        assert (await c.ahealth())["endpoints"][small]["circuit"]["state"] == "half_open"
        openai_server.script(answer_with("small says Canberra"))
        ans = await c.aanswer("q-probe", cache=False)
        assert ans.model == "small" and len(openai_server.requests) == 3
        # a success closes the circuit: the endpoint has no failures on record any more
        assert (await c.ahealth())["endpoints"][small]["circuit"] == {"state": "closed"}


async def test_half_open_lets_exactly_one_probe_through(
        tmp_path: Path, openai_server: LoopbackServer, second_server: LoopbackServer) -> None:
    cfg = ladder(tmp_path, openai_server.base_url, second_server.base_url,
                 retry={"max_attempts": 1}, breaker={"failure_threshold": 1, "cooldown_s": 0.2})
    openai_server.script(lambda req: openai_error(500))
    second_server.script(answer_with("big says Canberra"))
    async with Cascade.from_dict(cfg, verifiers=[not_idk]) as c:
        await c.aanswer("trip", cache=False)
        await anyio.sleep(0.25)
        openai_server.script(answer_with("small says Canberra", delay_s=0.3))
        out = await c.aanswer_many([{"prompt": f"q{i}", "cache": False} for i in range(5)],
                                   concurrency=5)
    assert len(openai_server.requests) == 2  # the trip and one probe
    answers = [a for a in out if isinstance(a, Answer)]
    assert len(answers) == 5
    assert sorted(a.model for a in answers) == ["big"] * 4 + ["small"]
    skipped = [a.attempts[0] for a in answers if a.model == "big"]
    assert all(a.error_type == "CircuitOpen" and "probe" in (a.error or "") for a in skipped)


# ---------------------------------------------------------------- fallback endpoints


async def test_transport_failure_fails_over_to_the_fallback_endpoint(
        tmp_path: Path, openai_server: LoopbackServer, second_server: LoopbackServer) -> None:
    cfg = ladder(tmp_path, openai_server.base_url, retry={"max_attempts": 2})
    cfg["rungs"][0]["fallbacks"] = [{"base_url": second_server.base_url}]
    second_server.script(answer_with("mirror says Canberra"))
    openai_server.down()  # connection refused
    async with Cascade.from_dict(cfg, verifiers=[not_idk]) as c:
        ans = await c.aanswer("Capital of Australia?")
    assert ans.model == "small" and ans.verified and ans.text == "mirror says Canberra"
    first = ans.attempts[0]
    assert first.status == "accepted" and first.endpoint == second_server.base_url
    assert first.tries == 3  # two refused tries on the primary, one on the fallback
    error = first.error or ""
    assert error.startswith("failed over:") and "TransportError" in error
    assert [r.json["model"] for r in second_server.requests] == ["small"]


async def test_content_failure_escalates_instead_of_using_the_fallback(
        tmp_path: Path, openai_server: LoopbackServer, second_server: LoopbackServer) -> None:
    cfg = ladder(tmp_path, openai_server.base_url)
    cfg["rungs"][0]["fallbacks"] = [{"base_url": second_server.base_url}]
    second_server.script(answer_with("mirror says Canberra"))
    openai_server.script(by_model(small=answer_with("I don't know"),
                                  big=answer_with("big says Canberra")))
    async with Cascade.from_dict(cfg, verifiers=[not_idk]) as c:
        ans = await c.aanswer("Capital of Australia?")
    assert ans.model == "big" and ans.text == "big says Canberra"
    assert [a.status for a in ans.attempts] == ["rejected", "accepted"]
    assert second_server.requests == []


async def test_open_circuit_on_the_primary_goes_straight_to_the_fallback(
        tmp_path: Path, openai_server: LoopbackServer, second_server: LoopbackServer) -> None:
    cfg = ladder(tmp_path, openai_server.base_url, retry={"max_attempts": 2},
                 breaker={"failure_threshold": 1, "cooldown_s": 30.0})
    cfg["rungs"][0]["fallbacks"] = [{"base_url": second_server.base_url}]
    openai_server.script(lambda req: Reply(fault="reset"))
    second_server.script(answer_with("mirror says Canberra"))
    async with Cascade.from_dict(cfg, verifiers=[not_idk]) as c:
        first = await c.aanswer("q1", cache=False)
        assert first.attempts[0].tries == 3 and len(openai_server.requests) == 2
        ans = await c.aanswer("q2", cache=False)
    assert ans.text == "mirror says Canberra" and ans.attempts[0].tries == 1
    assert "CircuitOpen" in (ans.attempts[0].error or "")
    # straight to the fallback: no request, not even a connection, to the open primary
    assert len(openai_server.requests) == 2 and len(second_server.requests) == 2


# ---------------------------------------------------------------- money


def priced(tmp_path: Path, url: str, **extra: Any) -> dict[str, Any]:
    """Output-only prices so that estimates (max_tokens) and actual costs are exact."""
    cfg = ladder(tmp_path, url, **extra)
    for rung, price in zip(cfg["rungs"], (1000.0, 10000.0), strict=True):
        rung.update(input_usd_per_mtok=0.0, output_usd_per_mtok=price, max_tokens=10)
    return cfg  # estimates: small $0.01, big $0.1


async def test_max_cost_skips_rungs_that_do_not_fit(tmp_path: Path,
                                                    openai_server: LoopbackServer) -> None:
    openai_server.script(by_model(
        small=answer_with("I don't know", completion_tokens=10),
        big=answer_with("Canberra", completion_tokens=10),
    ))
    async with Cascade.from_dict(priced(tmp_path, openai_server.base_url),
                                 verifiers=[not_idk]) as c:
        ans = await c.aanswer("Capital of Australia?", max_cost_usd=0.05)
        assert not ans.verified and ans.model == "small"
        skipped = ans.attempts[1]
        assert (skipped.status, skipped.error_type) == ("skipped", "Skipped")
        why = skipped.error or ""
        assert "budget" in why and "max_cost_usd=$0.05" in why
        assert ans.cost_usd == pytest.approx(0.01) and ans.cost_usd <= 0.05
        assert calls_to(openai_server, "big") == 0

        with pytest.raises(BudgetExceeded, match="no rung fits the budget"):
            await c.aanswer("Capital of Australia?", max_cost_usd=0.005)
        assert calls_to(openai_server, "small") == 1

        ans = await c.aanswer("Capital of Australia?", max_cost_usd=0.2)
        assert ans.verified and ans.cost_usd == pytest.approx(0.11) and ans.cost_usd <= 0.2


async def test_budget_per_key_caps_spending_over_time(tmp_path: Path,
                                                      openai_server: LoopbackServer) -> None:
    cfg = priced(tmp_path, openai_server.base_url, budget={"limit_usd": 0.03})
    cfg["rungs"] = cfg["rungs"][:1]
    openai_server.script(answer_with("Canberra", completion_tokens=10))
    store = InMemoryBudgetStore()
    async with Cascade.from_dict(cfg, verifiers=[not_idk], budget_store=store) as c:
        a = {"budget_key": "tenant-a"}
        for i in range(3):
            ans = await c.aanswer(f"q{i}", metadata=a)
            assert ans.cost_usd == pytest.approx(0.01)
        with pytest.raises(BudgetExceeded) as ei:
            await c.aanswer("q3", metadata=a)
        msg = str(ei.value)
        assert "'tenant-a'" in msg and "limit $0.030000" in msg and "spent $0.030000" in msg
        assert ei.value.key == "tenant-a"
        assert len(openai_server.requests) == 3  # refused before any call
        ans = await c.aanswer("q3", metadata={"budget_key": "tenant-b"})
        assert ans.verified
    assert store.spent("tenant-a", 86400.0) == pytest.approx(0.03)


async def test_concurrent_requests_never_overspend_a_budget(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    cfg = priced(tmp_path, openai_server.base_url, budget={"limit_usd": 0.05})
    cfg["rungs"] = cfg["rungs"][:1]
    openai_server.script(answer_with("Canberra", completion_tokens=10, delay_s=0.1))
    store = InMemoryBudgetStore()
    async with Cascade.from_dict(cfg, verifiers=[not_idk], budget_store=store) as c:
        out = await c.aanswer_many(
            [{"prompt": f"q{i}", "metadata": {"budget_key": "tenant-c"}} for i in range(20)],
            concurrency=20)
    answers = [a for a in out if isinstance(a, Answer)]
    assert len(out) == 20 and len(answers) == 5
    assert all(isinstance(e, BudgetExceeded) for e in out if not isinstance(e, Answer))
    assert sum(a.cost_usd for a in answers) <= 0.05 + 1e-12
    assert len(openai_server.requests) == 5
    assert store.pending("tenant-c", 86400.0) == 0.0


# ---------------------------------------------------------------- deadlines


async def test_deadline_returns_the_lower_rungs_unverified_answer(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    openai_server.script(by_model(
        small=answer_with("I don't know, maybe Sydney"),
        big=answer_with("Canberra", delay_s=1.5),
    ))
    async with Cascade.from_dict(ladder(tmp_path, openai_server.base_url),
                                 verifiers=[not_idk]) as c:
        t0 = time.monotonic()
        ans = await c.aanswer("Capital of Australia?", timeout_s=0.5)
        took = time.monotonic() - t0
    assert 0.45 <= took < 0.8
    assert (ans.verified, ans.model, ans.text) == (False, "small", "I don't know, maybe Sydney")
    assert ans.attempts[1].status == "error"
    assert ans.attempts[1].error_type in ("DeadlineExceeded", "ProviderTimeout")


async def test_deadline_with_nothing_answered_raises_deadline_exceeded(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    cfg = ladder(tmp_path, openai_server.base_url)
    cfg["rungs"] = cfg["rungs"][:1]
    openai_server.script(answer_with("Canberra", delay_s=1.5))
    async with Cascade.from_dict(cfg, verifiers=[not_idk]) as c:
        for _ in range(2):  # the SDK timeout races the deadline: either way, DeadlineExceeded
            t0 = time.monotonic()
            with pytest.raises(DeadlineExceeded, match=r"no answer within 0\.4s"):
                await c.aanswer("Capital of Australia?", timeout_s=0.4)
            assert 0.35 <= time.monotonic() - t0 < 0.7


async def test_climb_does_not_start_a_rung_it_cannot_finish(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    openai_server.script(by_model(
        small=answer_with("I don't know"),
        big=answer_with("Canberra", delay_s=0.6),
    ))
    async with Cascade.from_dict(ladder(tmp_path, openai_server.base_url),
                                 verifiers=[not_idk]) as c:
        first = await c.aanswer("warm-up: learn how slow big is", cache=False)
        assert first.model == "big" and first.verified
        t0 = time.monotonic()
        ans = await c.aanswer("Capital of Australia?", timeout_s=0.4)
        took = time.monotonic() - t0
    assert calls_to(openai_server, "big") == 1
    assert took < 0.2 and not ans.verified and ans.model == "small"
    skipped = ans.attempts[1]
    assert skipped.status == "skipped" and "deadline" in (skipped.error or "")
    m = re.search(r"usually takes (\d+\.\d+)s", skipped.error or "")
    assert m is not None and float(m.group(1)) >= 0.6


async def test_deadline_during_verification_still_counts_the_model_call(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    """The model call was paid before the deadline cut the (slow) verifier short."""

    async def slow_check(ctx: VerifyContext) -> Verdict:
        await anyio.sleep(2.0)
        return Verdict(passed=True, reason="took its time")

    cfg = priced(tmp_path, openai_server.base_url, budget={"limit_usd": 1.0})
    cfg["rungs"] = cfg["rungs"][:1]
    openai_server.script(answer_with("Canberra", completion_tokens=10))  # costs $0.01
    store = InMemoryBudgetStore()
    async with Cascade.from_dict(cfg, verifiers=[slow_check], budget_store=store) as c:
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await c.aanswer("Capital of Australia?", timeout_s=0.3)
        assert time.monotonic() - t0 < 0.6
    assert len(openai_server.requests) == 1
    assert store.pending("default", 86400.0) == 0.0
    assert store.spent("default", 86400.0) == pytest.approx(0.01)


# ---------------------------------------------------------------- cancellation


def _established_to(port: int) -> int:
    """Client sockets in ESTABLISHED state connected to 127.0.0.1:port (Linux /proc)."""
    n = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            remote, state = fields[2], fields[3]
            if state == "01" and int(remote.split(":")[1], 16) == port:
                n += 1
    return n


def _tasks() -> set[asyncio.Task[Any]]:
    return {t for t in asyncio.all_tasks() if not t.done()}


async def _eventually(check: Callable[[], bool], within_s: float = 2.0) -> bool:
    """Poll ``check`` (wall time, not a fixed sleep, so that a busy machine does not flake)."""
    end = time.monotonic() + within_s
    while not check():
        if time.monotonic() > end:
            return False
        await anyio.sleep(0.01)
    return True


async def _cancel_once_arrived(c: Cascade, server: LoopbackServer, prompt: str,
                               before: Callable[[], None] = lambda: None) -> float:
    """Ask, and cancel the request once the server has received it; the seconds it took."""
    seen = len(server.requests)
    t0 = time.monotonic()
    async with anyio.create_task_group() as tg:

        async def cancel() -> None:
            assert await _eventually(lambda: len(server.requests) > seen)
            before()
            tg.cancel_scope.cancel()

        tg.start_soon(cancel)
        await c.aanswer(prompt, cache=False)
        raise AssertionError("the request was not cancelled")
    return time.monotonic() - t0


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc/net/tcp")
async def test_cancel_mid_flight_leaves_no_task_connection_or_reservation(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    cfg = priced(tmp_path, openai_server.base_url, budget={"limit_usd": 1.0})
    openai_server.script(answer_with("Canberra", delay_s=5.0))
    store = InMemoryBudgetStore()
    before = _tasks()
    port = openai_server.port
    in_flight: list[int] = []
    async with Cascade.from_dict(cfg, verifiers=[not_idk], budget_store=store) as c:
        took = await _cancel_once_arrived(c, openai_server, "Capital of Australia?",
                                          lambda: in_flight.append(_established_to(port)))
        assert in_flight == [1] and took < 2.0  # cancelled well before the 5 s reply
        assert store.pending("default", 86400.0) == 0.0
        # The call went out and was cut off: the provider may bill it, so the budget keeps
        # its estimate (small: $0.01), not $0 (see test_review_money.py).
        assert store.spent("default", 86400.0) == pytest.approx(0.01)
        assert await _eventually(lambda: _established_to(port) == 0)  # the client hung up
        assert await _eventually(lambda: _tasks() - before == set())


async def test_cancelled_probe_does_not_leave_the_circuit_stuck(
        tmp_path: Path, openai_server: LoopbackServer, second_server: LoopbackServer) -> None:
    cfg = ladder(tmp_path, openai_server.base_url, second_server.base_url,
                 retry={"max_attempts": 1}, breaker={"failure_threshold": 1, "cooldown_s": 0.2})
    openai_server.script(lambda req: openai_error(500))
    second_server.script(answer_with("big says Canberra"))
    small = endpoint(openai_server, "small")
    async with Cascade.from_dict(cfg, verifiers=[not_idk]) as c:
        await c.aanswer("trip", cache=False)
        await anyio.sleep(0.25)
        openai_server.script(answer_with("small says Canberra", delay_s=5.0))
        probing: list[bool] = []
        await _cancel_once_arrived(
            c, openai_server, "the probe, cancelled",
            lambda: probing.append(health()["endpoints"][small]["circuit"]["probe_in_flight"]))
        snap = health()["endpoints"][small]["circuit"]
        assert probing == [True]
        assert snap["state"] == "half_open" and not snap["probe_in_flight"]
        openai_server.script(answer_with("small says Canberra"))
        ans = await c.aanswer("the next probe", cache=False)
    assert ans.model == "small" and len(openai_server.requests) == 3
    assert health()["endpoints"][small]["circuit"] == {"state": "closed"}


# ---------------------------------------------------------------- answer_many


async def test_answer_many_bounds_concurrency_and_isolates_failures(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    served: list[tuple[float, float]] = []  # (arrival, seconds until the reply)
    delay = 0.1

    def handle(req: RecordedRequest) -> Reply:
        q = req.json["messages"][-1]["content"]
        if q == "q7":
            served.append((time.monotonic(), 0.0))
            return openai_error(500, "this question always breaks")
        served.append((time.monotonic(), delay))
        return openai_reply(f"answer to {q}", model=req.json["model"], delay_s=delay)

    openai_server.script(handle)
    cfg = ladder(tmp_path, openai_server.base_url, retry={"max_attempts": 1})
    async with Cascade.from_dict(cfg, verifiers=[not_idk]) as c:
        out = await c.aanswer_many([f"q{i}" for i in range(20)], concurrency=4)
    assert len(out) == 20
    for i, a in enumerate(out):
        if i == 7:
            assert isinstance(a, NoAnswerError)
            assert [t.error_type for t in a.answer.attempts] == ["ServerError", "ServerError"]
        else:
            assert isinstance(a, Answer) and a.text == f"answer to q{i}"
    # A request is in flight at the server from its arrival until its reply; the next one of
    # the same client slot can only arrive after that reply.
    most = max(sum(1 for s, d in served if s <= t < s + d) for t, _ in served)
    assert most == 4


# ---------------------------------------------------------------- any reply at all


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=8,
)


@st.composite
def _replies(draw: st.DrawFn) -> Reply:
    status = draw(st.sampled_from([200, 200, 200, 201, 400, 401, 404, 408, 409, 422, 429, 500,
                                   502, 503, 529, 599]))
    valid = openai_chat("Canberra")
    body = draw(st.one_of(
        _json,
        st.just(valid),
        st.builds(lambda k, v: {**valid, k: v}, st.sampled_from(sorted(valid)), _json),
        st.builds(lambda v: {**valid, "choices": [{"message": v}]}, _json),
        st.builds(lambda v: {**valid, "usage": v}, _json),
    ))
    headers = draw(st.sampled_from([{}, {"retry-after": "0.01"}, {"retry-after": "soon"},
                                    {"retry-after": "-3"}, {"retry-after-ms": "5"}]))
    content_type = draw(st.sampled_from(["application/json", "application/json", "text/plain"]))
    raw = draw(st.none() | st.none() | st.binary(max_size=20)
               | st.text(max_size=20).map(str.encode))
    if raw is not None:
        return Reply(status=status, body=raw, headers=headers, content_type=content_type)
    return Reply(status=status, json=body, headers=headers, content_type=content_type)


def test_any_reply_ends_in_an_answer_or_a_typed_error(tmp_path: Path) -> None:
    with LoopbackServer("openai") as server:
        cfg = ladder(tmp_path, server.base_url, retry={"max_attempts": 2, "max_delay_s": 0.05},
                     breaker={"failure_threshold": 1000})
        with Cascade.from_dict(cfg, verifiers=[not_idk]) as c:

            @settings(max_examples=50, deadline=None,
                      suppress_health_check=[HealthCheck.too_slow])
            @given(small=st.lists(_replies(), min_size=1, max_size=3), big=_replies())
            def check(small: list[Reply], big: Reply) -> None:
                server.script(by_model(small=sequence(*small), big=lambda req: big))
                try:
                    ans = c.answer("Capital of Australia?", cache=False)
                except CascadeError as e:
                    assert str(e)
                else:
                    assert isinstance(ans, Answer) and ans.attempts

            check()
