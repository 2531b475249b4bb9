"""Money, trace, replay and test-double defects from the review of budget/policy/trace/prices/
replay/testing: each test failed on the code before its fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import cascade
from cascade import Cascade, ServerError
from cascade.config import RungConfig
from cascade.errors import BudgetStoreError
from cascade.messages import Message
from cascade.providers.base import Completion
from cascade.suite import Recording, RecordingStore, answer_call
from cascade.testing import Script
from tests.loopback import LoopbackServer, Reply, openai_chat, openai_reply

pytestmark = pytest.mark.anyio

MSGS = (Message("user", "Capital of France?"),)


# ------------------------------------------------------------------ replay


def _answer_only_recordings(tmp_path: Path) -> Path:
    """A suite recorded before a sampling verifier was configured: only the rung's answer."""
    store = RecordingStore(tmp_path / "recordings.jsonl")
    rung = RungConfig(model="m")
    store.add(Recording.of(answer_call(rung, MSGS),
                           Completion(text="Paris", model="m", input_tokens=5, output_tokens=1),
                           case_id="q1", kind="answer", cost_usd=0.0))
    return tmp_path


async def test_replay_never_serves_the_rungs_answer_as_a_verifiers_sample(
        tmp_path: Path) -> None:
    """A self-consistency sample (the rung's model and the case's messages, at another
    temperature) that was never recorded fell through to the loose (model, messages) match and
    got the rung's own answer back: every sample "agreed", and the replayed climb reported an
    answer verified that no recorded evidence supports."""
    where = _answer_only_recordings(tmp_path)
    c = Cascade.from_dict({
        "rungs": [{"model": "m", "provider": "replay", "base_url": str(where),
                   "input_usd_per_mtok": 0.0, "output_usd_per_mtok": 0.0}],
        "verifiers": [{"name": "agreement", "mode": "samples", "samples": 2}],
        "cache": {"enabled": False},
    })
    async with c:
        ans = await c.aanswer(messages=[m.to_dict() for m in MSGS])
    assert ans.text == "Paris"  # the answer itself is still served loosely/exactly
    [verdict] = ans.attempts[0].verdicts
    assert not verdict.passed and "no recording" in verdict.reason, verdict
    assert not ans.verified


async def test_replay_still_serves_an_answer_whose_rung_settings_changed(
        tmp_path: Path) -> None:
    """The loose match keeps doing its job: a rung whose max_tokens changed since recording
    still replays its recorded answer."""
    where = _answer_only_recordings(tmp_path)
    c = Cascade.from_dict({
        "rungs": [{"model": "m", "provider": "replay", "base_url": str(where),
                   "max_tokens": 77, "input_usd_per_mtok": 0.0, "output_usd_per_mtok": 0.0}],
        "cache": {"enabled": False},
    })
    async with c:
        ans = await c.aanswer(messages=[m.to_dict() for m in MSGS])
    assert ans.text == "Paris" and ans.verified


# ------------------------------------------------------------------ the public names


def test_budget_store_error_is_exported() -> None:
    """README: with a shared store down, "a request on a budget raises BudgetStoreError" (and a
    SQLite store that cannot be opened raises it too), yet ``cascade.BudgetStoreError`` did not
    exist: ``except cascade.BudgetStoreError`` was an AttributeError at the worst moment."""
    assert cascade.BudgetStoreError is BudgetStoreError
    assert "BudgetStoreError" in cascade.__all__


# ------------------------------------------------------------------ cascade.testing


def _two_rungs() -> dict[str, Any]:
    return {
        "rungs": [{"model": "small", "input_usd_per_mtok": 1.0, "output_usd_per_mtok": 2.0},
                  {"model": "big", "input_usd_per_mtok": 10.0, "output_usd_per_mtok": 20.0}],
        "retry": {"max_attempts": 1},
        "cache": {"enabled": False},
    }


async def test_a_scripted_error_is_a_fresh_error_on_every_call() -> None:
    """Script re-raised the one scripted exception object on every call, and the retry loop
    adds a note to what it raises: the second request's trace said "gave up after 1 try"
    twice, the third three times... A test of the trace passed or failed by call order."""
    script = Script({"small": [ServerError("down", provider="scripted", model="small")],
                     "big": ["ok"]})
    c = Cascade.from_dict(_two_rungs(), provider_factory=script.factory)
    async with c:
        first = await c.aanswer("q1")
        second = await c.aanswer("q2")
    assert first.attempts[0].error == second.attempts[0].error
    assert (second.attempts[0].error or "").count("gave up") == 1


async def test_an_unscripted_call_fails_the_test_even_inside_a_verifier() -> None:
    """A judge whose model the Script forgot raised AssertionError inside the verifier, which
    the runner (rightly, for plugins) turns into a failed verdict: the climb escalated, and a
    test asserting "the judge sent it up" passed without the judge ever answering."""
    script = Script({"small": ["a"], "big": ["b"]})  # no reply for "judge"
    cfg = _two_rungs() | {"verifiers": [{"name": "judge", "model": "judge",
                                         "provider": "openai-compatible",
                                         "base_url": "http://judge/v1",
                                         "input_usd_per_mtok": 1.0,
                                         "output_usd_per_mtok": 1.0}]}
    c = Cascade.from_dict(cfg, provider_factory=script.factory)
    async with c:
        with pytest.raises(BaseException, match="no scripted reply for judge") as e:
            await c.aanswer("q")  # before: returned big's answer, "escalated by the judge"
    assert not isinstance(e.value, Exception)  # no plugin guard can swallow it
    assert type(e.value).__name__ == "UnscriptedCall"


# ------------------------------------------------------------------ the policy


async def test_rungs_all_skipped_by_the_deadline_gate_are_a_deadline_not_no_answer() -> None:
    """Every rung's observed latency exceeded the time left, so none was started: the deadline
    alone stopped the climb, yet the request raised NoAnswerError ("no answer, every rung
    failed", exit 3) instead of DeadlineExceeded (exit 4), unlike the budget's twin case."""
    from cascade import DeadlineExceeded, NoAnswerError
    from cascade.testing import FakeClock

    clock = FakeClock()

    def slow(text: str) -> Any:
        def reply(call: Any) -> str:
            clock.advance(5.0)
            return text
        return reply

    script = Script({"dl-small": [slow("a")], "dl-big": [slow("b")]})
    cfg = {"rungs": [{"model": "dl-small", "input_usd_per_mtok": 0.0, "output_usd_per_mtok": 0.0},
                     {"model": "dl-big", "input_usd_per_mtok": 0.0, "output_usd_per_mtok": 0.0}],
           "cache": {"enabled": False}}

    async def reject(ctx: Any) -> bool:
        return False

    c = Cascade.from_dict(cfg, provider_factory=script.factory, clock=clock)
    async with c:
        first = await c.aanswer("q", verifiers=[reject])  # both rungs seen taking 5 s
        assert [a.status for a in first.attempts] == ["rejected", "rejected"]
        with pytest.raises(DeadlineExceeded) as e:
            await c.aanswer("q2", verifiers=[reject], timeout_s=1.0)
    assert not isinstance(e.value, NoAnswerError)
    assert e.value.answer is not None
    assert [a.status for a in e.value.answer.attempts] == ["skipped", "skipped"]
    assert script.count("dl-small") == 1  # nothing was called the second time


def _malformed_but_billed() -> Reply:
    """A 200 that breaks the protocol (no choices) yet says what it billed, as servers do."""
    body = openai_chat("x", prompt_tokens=1000, completion_tokens=500)
    body["choices"] = []
    return Reply(json=body)


async def test_a_billed_200_that_breaks_the_protocol_is_charged_on_retry_and_failure(
        openai_server: LoopbackServer, tmp_path: Path) -> None:
    """The vendor bills a 200 whose body we reject (empty choices, bad logprobs): it was
    charged $0, up to once per try, so budgets and the trace under-counted real spend."""
    from cascade.budget import InMemoryBudgetStore
    from cascade.errors import NoAnswerError

    replies = [_malformed_but_billed(), openai_reply("Canberra", prompt_tokens=10,
                                                     completion_tokens=2)]
    openai_server.script(lambda req: replies.pop(0) if len(replies) > 1 else replies[0])
    rung = {"model": "m", "provider": "openai-compatible", "base_url": openai_server.base_url,
            "input_usd_per_mtok": 1.0, "output_usd_per_mtok": 1.0, "verifiers": []}
    cfg = {"rungs": [rung], "cache": {"enabled": False}, "budget": {"limit_usd": 1.0},
           "retry": {"max_attempts": 2, "base_delay_s": 0.0, "max_delay_s": 0.0}}
    store = InMemoryBudgetStore()
    async with Cascade.from_dict(cfg, budget_store=store) as c:
        ans = await c.aanswer("Capital of Australia?")
        assert ans.text == "Canberra" and ans.attempts[0].tries == 2
        first = (1000 + 500) / 1e6
        assert ans.cost_usd == pytest.approx(first + 12 / 1e6)
        assert store.spent("default", 86400.0) == pytest.approx(first + 12 / 1e6)
        replies[:] = [_malformed_but_billed()]  # every try now: no answer, still paid
        with pytest.raises(NoAnswerError) as info:
            await c.aanswer("Capital of France?")
        assert info.value.answer.cost_usd == pytest.approx(2 * first)
        assert info.value.answer.attempts[0].cost_usd == pytest.approx(2 * first)
        assert store.spent("default", 86400.0) == pytest.approx(3 * first + 12 / 1e6)


async def test_raise_on_unverified_names_the_rejected_answer_it_gives() -> None:
    """The top rung errored, so the answer given is the cheap rung's rejected one: the error
    read "the top answer (small) was rejected: accepted", from the top rung's empty verdicts."""
    from cascade.errors import UnverifiedAnswerError

    s = Script({"small": ["I can't help with that."],
                "big": [ServerError("down", provider="x", model="big")]})
    rungs = [{"model": m, "provider": "openai-compatible", "base_url": f"http://{m}/v1",
              "price": "unknown"} for m in ("small", "big")]
    cfg = {"rungs": rungs, "verifiers": [{"name": "refusal"}], "cache": {"enabled": False},
           "policy": {"on_unverified": "raise"}, "retry": {"max_attempts": 1}}
    async with Cascade.from_dict(cfg, provider_factory=s.factory) as c:
        with pytest.raises(UnverifiedAnswerError) as info:
            await c.aanswer("How do I bake bread?")
    msg = str(info.value)
    assert "small, rung 0" in msg and "refus" in msg.lower() and "accepted" not in msg


# ------------------------------------------------------------------ calls sent, never answered


def _slow_priced(url: str, **top: Any) -> dict[str, Any]:
    """Two rungs on one loopback server; output-only prices so that each call's estimate is
    exact: small $0.01, big $0.1 (max_tokens 10)."""
    rungs = [{"model": m, "provider": "openai-compatible", "base_url": url, "max_tokens": 10,
              "input_usd_per_mtok": 0.0, "output_usd_per_mtok": price, "timeout_s": 5.0,
              "max_retries": 0}
             for m, price in (("small", 1000.0), ("big", 10000.0))]
    return {"rungs": rungs, "cache": {"enabled": False}, "budget": {"limit_usd": 0.05},
            "verifiers": [{"name": "refusal"}], **top}


async def test_a_call_cut_off_by_the_deadline_is_charged_its_estimate(
        openai_server: LoopbackServer) -> None:
    """A prompt that keeps the model past the request's deadline was settled at $0: the call
    had gone out (the provider may bill it), yet the budget never saw it, so a client could
    spend without limit in requests that all time out. The budget keeps the estimate; the
    trace's cost stays what is known to be billed, and its note says what was kept."""
    from cascade.budget import InMemoryBudgetStore
    from cascade.errors import DeadlineExceeded

    openai_server.script(lambda req: Reply(json=openai_chat("late"), delay_s=3.0))
    store = InMemoryBudgetStore()
    async with Cascade.from_dict(_slow_priced(openai_server.base_url),
                                 budget_store=store) as c:
        for _ in range(2):
            with pytest.raises(DeadlineExceeded) as info:
                await c.aanswer("Tell me a long story.", timeout_s=0.3)
            [attempt] = info.value.answer.attempts
            assert attempt.cost_usd == 0.0 and "budget keeps $0.010000" in attempt.note
            # the try went out: the trace says so, as the budget does (it said 0 tries, 0 ms)
            assert attempt.tries == 1 and attempt.latency_ms >= 250
        assert store.spent("default", 86400.0) == pytest.approx(0.02)
        assert store.pending("default", 86400.0) == 0.0


async def test_timed_out_tries_are_charged_and_count_against_the_request_cap(
        openai_server: LoopbackServer) -> None:
    """A rung whose call timed out (after it was sent) is charged its estimate, and the
    request's cap counts it: the next rung's $0.1 does not fit a $0.105 cap with $0.01 kept,
    while a refused connection (never sent) keeps nothing."""
    from cascade.budget import InMemoryBudgetStore

    def handler(req: Any) -> Reply:
        if req.json.get("model") == "small":
            return Reply(json=openai_chat("late"), delay_s=2.0)
        return Reply(json=openai_chat("Canberra"))

    openai_server.script(handler)
    cfg = _slow_priced(openai_server.base_url, budget={"limit_usd": 1.0})
    cfg["rungs"][0]["timeout_s"] = 0.2
    store = InMemoryBudgetStore()
    async with Cascade.from_dict(cfg, budget_store=store) as c:
        ans = await c.aanswer("Capital of Australia?")
        assert ans.text == "Canberra" and ans.attempts[0].status == "error"
        assert "budget keeps $0.010000" in ans.attempts[0].note
        assert ans.cost_usd == pytest.approx(ans.attempts[1].cost_usd)  # known cost only
        assert store.spent("default", 86400.0) == pytest.approx(0.01 + ans.attempts[1].cost_usd)
        with pytest.raises(cascade.NoAnswerError) as capped:
            await c.aanswer("Capital of Australia, again?", max_cost_usd=0.105)
        assert [a.status for a in capped.value.answer.attempts] == ["error", "skipped"]
        assert "$0.095000 left of max_cost_usd" in str(capped.value)

    refused = _slow_priced("http://127.0.0.1:9/v1", budget={"limit_usd": 1.0})
    refused["rungs"] = refused["rungs"][:1]
    store = InMemoryBudgetStore()
    async with Cascade.from_dict(refused, budget_store=store) as c:
        with pytest.raises(cascade.NoAnswerError) as info:
            await c.aanswer("Capital of Australia?")
        assert info.value.answer.attempts[0].note is None
    assert store.spent("default", 86400.0) == 0.0


@pytest.mark.parametrize("transport", ["httpx", "aiohttp"])
async def test_a_connection_that_never_opened_keeps_nothing(transport: str) -> None:
    """A connect timeout (the host drops SYNs: a listener whose accept queue is full) sends no
    request byte, so nothing can be billed; it was kept at the call's estimate like a reply
    that never came, draining budgets through an outage. The SDK's connect timeout now says
    so (the whole-call bound gives it room to fire first)."""
    import contextlib
    import socket

    import anyio

    from cascade.budget import InMemoryBudgetStore

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    fillers = []
    for _ in range(8):  # fill the accept queue: later SYNs are dropped
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        fillers.append(s)
    await anyio.sleep(0.2)
    cfg = _slow_priced(f"http://127.0.0.1:{port}/v1", budget={"limit_usd": 1.0})
    cfg["rungs"] = [{**cfg["rungs"][0], "timeout_s": 0.5, "transport": transport}]
    store = InMemoryBudgetStore()
    try:
        async with Cascade.from_dict(cfg, budget_store=store) as c:
            with pytest.raises(cascade.NoAnswerError) as info:
                await c.aanswer("Capital of Australia?")
        [attempt] = info.value.answer.attempts
        assert attempt.error_type == "ProviderTimeout" and "no connection" in (attempt.error or "")
        assert attempt.note is None
        assert store.spent("default", 86400.0) == 0.0
    finally:
        for s in (*fillers, srv):
            s.close()


@pytest.mark.parametrize("transport", ["httpx", "aiohttp"])
@pytest.mark.parametrize("fault", ["reset", "close", "no usage"])
async def test_a_try_sent_whose_reply_or_usage_never_came_keeps_its_estimate(
        openai_server: LoopbackServer, transport: str, fault: str) -> None:
    """The server read the request, then reset the connection mid-reply, closed it without
    one, or answered 200 without ``usage``: the model may have run (and billed) all the same,
    yet these tries were settled at $0, unlike a timeout's."""
    from cascade.budget import InMemoryBudgetStore

    def handler(req: Any) -> Reply:
        if req.json.get("model") != "small":
            return Reply(json=openai_chat("Canberra"))
        if fault == "no usage":
            body = openai_chat("Canberra")
            del body["usage"]
            return Reply(json=body)
        return Reply(json=openai_chat("Canberra"), fault=fault)  # type: ignore[arg-type]

    openai_server.script(handler)
    cfg = _slow_priced(openai_server.base_url, budget={"limit_usd": 1.0})
    for r in cfg["rungs"]:
        r["transport"] = transport
    store = InMemoryBudgetStore()
    async with Cascade.from_dict(cfg, budget_store=store) as c:
        ans = await c.aanswer("Capital of Australia?")
    assert ans.model == "big" and ans.attempts[0].status == "error"
    assert sum(r.json.get("model") == "small" for r in openai_server.requests) == 1
    assert "budget keeps $0.010000" in (ans.attempts[0].note or "")
    assert store.spent("default", 86400.0) == pytest.approx(0.01 + ans.attempts[1].cost_usd)


@pytest.mark.parametrize("case", ["503 too large", "check_model"])
async def test_tries_never_sent_or_never_billed_keep_nothing(
        openai_server: LoopbackServer, case: str) -> None:
    """The kept-estimate rule over-reached: a 503 whose body passed ``max_reply_bytes`` (a
    ReplyTooLarge, a MalformedReply, but no model ran), and a ``check_model`` lookup that
    failed before the chat request went out, each kept the estimate."""
    from cascade.budget import InMemoryBudgetStore

    def handler(req: Any) -> Reply:
        if req.path.endswith("/models"):
            return Reply(body=b"{not json", content_type="application/json")
        if case == "503 too large" and req.json.get("model") == "small":
            return Reply(status=503, body=b"x" * 5000, content_type="text/html")
        return Reply(json=openai_chat("Canberra"))

    openai_server.script(handler)
    cfg = _slow_priced(openai_server.base_url, budget={"limit_usd": 1.0})
    cfg["rungs"][0].update({"max_reply_bytes": 1024} if case == "503 too large"
                           else {"check_model": True})
    store = InMemoryBudgetStore()
    async with Cascade.from_dict(cfg, budget_store=store) as c:
        ans = await c.aanswer("Capital of Australia?")
    assert ans.model == "big" and ans.attempts[0].status == "error"
    assert ans.attempts[0].note is None
    assert store.spent("default", 86400.0) == pytest.approx(ans.attempts[1].cost_usd)


async def test_requests_started_while_aclose_runs_get_open_clients(
        openai_server: LoopbackServer) -> None:
    """``aclose()`` dropped the loop's closer, whose finalization then closed the loop's
    providers once more a tick later: requests started meanwhile failed on a closed client
    (and kept an estimate for a call never sent)."""
    import asyncio

    openai_server.script(lambda req: Reply(json=openai_chat("Canberra"), delay_s=0.1))
    c = Cascade.from_dict(_slow_priced(openai_server.base_url, budget={"limit_usd": 1.0}))
    await c.aanswer("warm up")

    async def during() -> Any:
        await asyncio.sleep(0)
        return await c.aanswer("Capital of Australia?")

    got = await asyncio.gather(c.aclose(), *(during() for _ in range(3)),
                               return_exceptions=True)
    await c.aclose()
    assert [getattr(a, "text", a) for a in got[1:]] == ["Canberra"] * 3


def test_a_shadow_check_counts_what_the_cap_keeps_for_an_unanswered_call() -> None:
    """The cheap rung's call timed out (its estimate kept against the cap) and the next rung
    was accepted; the shadow check's cap left out the kept estimate, so the top rung was
    called for a shadow past the request's cap."""
    import anyio

    from cascade.testing import FunctionProvider, completion

    calls: list[str] = []

    async def fn(call: Any) -> Completion:
        calls.append(call.model)
        if call.model == "slow":
            await anyio.sleep(5)
        return completion("Paris", call)

    price = {"input_usd_per_mtok": 10.0, "output_usd_per_mtok": 10.0}
    cfg = {"rungs": [{"model": "slow", "max_tokens": 1000, "timeout_s": 0.3, **price},
                     {"model": "mid", "max_tokens": 100, **price},
                     {"model": "top", "max_tokens": 900, **price}],
           "retry": {"max_attempts": 1, "base_delay_s": 0, "max_delay_s": 0},
           "policy": {"shadow_rate": 1.0}, "cache": {"enabled": False}}
    with Cascade.from_dict(cfg, provider_factory=FunctionProvider(fn).factory) as c:
        a = c.answer(messages=[{"role": "user", "content": "Capital of France?"}],
                     max_cost_usd=0.0125)
        c.drain_shadows(10)
    assert a.model == "mid" and "budget keeps" in (a.attempts[0].note or "")
    assert calls == ["slow", "mid"], calls  # no shadow: 0.0101 kept + top's 0.009 > 0.0125


async def test_unverified_within_budget_names_what_stopped_it_and_round_trips() -> None:
    """The request's cap stopped the climb, yet the error named the key's $50 budget; and it
    could not be pickled or copied (a process pool's worker raising it broke the pool)."""
    import copy
    import pickle

    from cascade.errors import UnverifiedWithinBudget

    cfg = {"rungs": [{"model": "small", "input_usd_per_mtok": 1.0, "output_usd_per_mtok": 1.0},
                     {"model": "big", "input_usd_per_mtok": 100.0,
                      "output_usd_per_mtok": 100.0, "max_tokens": 1000}],
           "verifiers": [{"name": "refusal"}], "policy": {"on_unverified": "raise"},
           "cache": {"enabled": False}, "budget": {"limit_usd": 50.0, "period_s": 3600}}
    s = Script({"small": ["I'm sorry, but I can't help with that."], "big": ["Paris"]})
    async with Cascade.from_dict(cfg, provider_factory=s.factory) as c:
        with pytest.raises(UnverifiedWithinBudget) as info:
            await c.aanswer("Capital of France?", max_cost_usd=0.001,
                            metadata={"budget_key": "team-a"})
    e = info.value
    assert e.limit_usd == 0.001 and e.key is None
    for again in (pickle.loads(pickle.dumps(e)), copy.copy(e)):
        assert type(again) is UnverifiedWithinBudget and str(again) == str(e)
        assert again.answer.text == e.answer.text and again.limit_usd == 0.001
    plain = cascade.UnverifiedAnswerError("rejected", e.answer)
    assert pickle.loads(pickle.dumps(plain)).answer.text == e.answer.text


async def test_leaving_async_with_cascade_leaves_the_audit_lines_on_disk(tmp_path: Path) -> None:
    """``aclose()`` (what ``async with`` ends with) did not wait for the audit log's writer
    thread: a script that exits right after it could lose its last lines."""
    import json

    s = Script({"m": ["Paris"] * 300})
    cfg = {"rungs": [{"model": "m", "input_usd_per_mtok": 0.0, "output_usd_per_mtok": 0.0}],
           "cache": {"enabled": False}}
    path = tmp_path / "audit.jsonl"
    c = Cascade.from_dict(cfg, provider_factory=s.factory, audit_log=path)
    async with c:
        for i in range(300):
            await c.aanswer(f"Question {i}?")
    lines = path.read_text().splitlines()  # straight after, no flush of our own
    assert len(lines) == 300 and json.loads(lines[-1])["type"] == "answer"
    c.close()


async def test_a_store_of_ones_own_without_asettle_kept_is_not_warned_about(
        caplog: pytest.LogCaptureFixture) -> None:
    """A store written before ``asettle_kept`` joined the protocol has nothing kept to settle:
    every health check (and ``cascade serve`` every 5 s) logged a warning about it."""
    import logging

    from cascade.config import parse_config
    from cascade.store.local import LocalStore

    cfg = parse_config({"rungs": [{"model": "m", "price": "unknown"}],
                        "cache": {"enabled": False}}, source="<t>")

    class MyStore:  # the protocol as it was
        def __init__(self) -> None:
            self._s = LocalStore(cfg)

        def __getattr__(self, name: str) -> Any:
            if name == "asettle_kept":
                raise AttributeError(name)
            return getattr(self._s, name)

    s = Script({"m": ["Paris"]})
    c = Cascade(cfg, store=MyStore(), provider_factory=s.factory)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="cascade"):
        assert (await c.aanswer("q")).text == "Paris"
        await c.ahealth()
    assert not [r for r in caplog.records if "kept settles" in r.getMessage()]
    c.close()
