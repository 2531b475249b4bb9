"""Defects found by an adversarial review of the engine, each pinned by a test that failed on the
code before its fix: money a verifier's failover spent, a request's cap broken by concurrent
verifier calls, a cancelled shared-budget reservation, the audit log's writer and secrets, the
deadline's trace, a stray TimeoutError taken for the deadline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest

from cascade.budget import InMemoryBudgetStore, SQLiteBudgetStore
from cascade.config import parse_config
from cascade.engine import Cascade
from cascade.errors import DeadlineExceeded, ServerError
from cascade.messages import Message, Request
from cascade.providers.base import Completion, ModelCall
from cascade.testing import Script
from cascade.tokens import estimate_cost
from cascade.trace import Answer, Attempt, Verdict
from cascade.verify import VerifyContext
from tests.engine_kit import config as _config
from tests.engine_kit import rung as _rung

pytestmark = pytest.mark.anyio




class _Recorder:
    """An observer that keeps what the engine told it."""

    def __init__(self) -> None:
        self.seen: list[tuple[Request, Answer | None, BaseException | None]] = []

    def on_answer(self, request: Request, answer: Answer | None,
                  error: BaseException | None) -> None:
        self.seen.append((request, answer, error))

    def on_shadow(self, *args: Any) -> None:
        pass


# ---------------------------------------------------------------- money


async def test_a_verifier_call_that_fails_over_is_charged_at_the_endpoint_that_answered(
        tmp_path: Path) -> None:
    """A self-check (any ctx.call_model on the candidate's rung) whose primary endpoint fails
    and whose fallback, a dearer model, answers: the verdict, the answer and the budget must
    carry the fallback's price, not the primary's (100x too low before)."""
    rung = _rung("small", 1.0, fallbacks=[_rung("dear", 100.0)])
    s = Script({"small": ["Canberra", ServerError("down", provider="x", model="small")],
                "dear": ["yes"]})

    class AsksAgain:
        name = "again"
        expensive = True

        async def verify(self, ctx: VerifyContext) -> Verdict:
            await ctx.call_model(ModelCall(model=ctx.candidate.rung.model,
                                           messages=ctx.request.messages, max_tokens=8))
            return Verdict(passed=True, reason="asked again")

    store = InMemoryBudgetStore()
    cfg = _config(tmp_path, [rung], budget={"limit_usd": 1.0}, cache={"enabled": False})
    async with Cascade.from_dict(cfg, verifiers=[AsksAgain()], provider_factory=s.factory,
                                 budget_store=store) as c:
        ans = await c.aanswer("Capital of Australia?")
    assert s.count("dear") == 1
    rung_cost = (10 * 1.0 + 1 * 1.0) / 1e6           # Script: 10 input tokens, 1 per word
    check_cost = (10 * 100.0 + 1 * 100.0) / 1e6      # answered by the fallback "dear"
    [verdict] = ans.attempts[0].verdicts
    assert verdict.cost_usd == pytest.approx(check_cost)
    assert ans.cost_usd == pytest.approx(rung_cost + check_cost)
    assert ans.attempts[0].cost_usd == pytest.approx(rung_cost + check_cost)
    assert store.spent("default", 86400.0) == pytest.approx(rung_cost + check_cost)


async def test_concurrent_verifier_calls_never_break_the_requests_cap(tmp_path: Path) -> None:
    """The agreement verifier's samples call the model concurrently. With a budget store that
    does I/O (SQLite), each sample awaited its reservation before counting itself against the
    request's ``max_cost_usd``: all three passed the cap check, and the request overspent it."""
    rung = _rung("m", 1000.0, max_tokens=50)
    prompt = "Capital of Australia?"
    parsed = parse_config(_config(tmp_path, [rung]))
    one_call = estimate_cost(parsed.rungs[0], [Message("user", prompt)])
    cap = 2.5 * one_call  # the rung's call and one sample fit; three samples do not

    def reply(call: ModelCall) -> Completion:
        # Every call costs exactly its estimate: an overspend shows in the money.
        tokens = round(one_call * 1e6 / 1000.0) - call.max_tokens
        return Completion(text="Canberra", model=call.model, input_tokens=tokens,
                          output_tokens=call.max_tokens, finish_reason="stop")

    s = Script({"m": [reply]})
    cfg = _config(tmp_path, [rung], budget={"limit_usd": 100.0}, cache={"enabled": False},
                  verifiers=[{"name": "agreement", "mode": "samples", "samples": 3}])
    store = SQLiteBudgetStore(tmp_path / "budget.sqlite3")
    async with Cascade.from_dict(cfg, provider_factory=s.factory, budget_store=store) as c:
        ans = await c.aanswer(prompt, max_cost_usd=cap)
    assert ans.cost_usd <= cap * (1 + 1e-9)
    assert s.count("m") == 2  # the rung, and the one sample that fits
    assert store.pending("default", 86400.0) == 0.0


async def test_a_shared_reservation_cancelled_in_flight_is_released(tmp_path: Path) -> None:
    """A request cancelled (its deadline, a client gone) while its reserve script is on its way
    to Redis: Redis runs the script, the reply is lost. The reservation held the key's money
    back until ``reservation_ttl_s`` (10 minutes by default); a lost reply by timeout was
    already released once Redis answered again, a cancellation must be too."""
    from cascade.store.redis import RedisStore
    from tests.redis_server import redis_server

    with redis_server() as server:
        cfg = parse_config({"rungs": [_rung("m", 1.0)],
                            "store": {"url": server.url, "timeout_s": 5.0,
                                      "journal_dir": str(tmp_path / "journal")}})
        store = RedisStore.from_config(cfg)
        try:
            budgets = store.budgets
            warm = await budgets.areserve("k", 0.1, 1.0, 3600.0)  # connected, scripts loaded
            await budgets.arelease(warm)
            server.pause()  # the command is sent, Redis does not run it yet
            try:
                with anyio.move_on_after(0.3):
                    await budgets.areserve("k", 0.5, 1.0, 3600.0)
                    raise AssertionError("reserved while Redis was paused")
            finally:
                server.resume()
            await anyio.sleep(0.3)  # Redis runs the script it had been sent
            assert await budgets.apending("k", 3600.0) == 0.0
            reservation = await budgets.areserve("k", 0.9, 1.0, 3600.0)  # the money is free
            await budgets.asettle(reservation, 0.9)
            assert await budgets.aspent("k", 3600.0) == pytest.approx(0.9)
        finally:
            await store.aclose()


# ---------------------------------------------------------------- the trace of a deadline


async def test_a_deadline_after_a_paid_call_keeps_its_trace_and_cost_in_the_audit(
        tmp_path: Path) -> None:
    """The deadline cuts a slow verifier short after the model call was paid: the budget is
    charged, and the audit line (what spend is reconciled from) must say so, with the trace.
    Before, DeadlineExceeded carried nothing: the line said $0 and had no trace."""

    async def slow_check(ctx: VerifyContext) -> Verdict:
        await anyio.sleep(5.0)
        return Verdict(passed=True, reason="took its time")

    s = Script({"m": ["Canberra"]})
    store = InMemoryBudgetStore()
    audit = tmp_path / "audit.jsonl"
    cfg = _config(tmp_path, [_rung("m", 1000.0)], budget={"limit_usd": 1.0})
    with (Cascade.from_dict(cfg, verifiers=[slow_check], provider_factory=s.factory,
                            budget_store=store, audit_log=audit) as c,
          pytest.raises(DeadlineExceeded) as ei):
        await c.aanswer("Capital of Australia?", timeout_s=0.3)
    spent = store.spent("default", 86400.0)
    assert spent == pytest.approx((10 + 1) * 1000.0 / 1e6)
    traced = getattr(ei.value, "answer", None)
    assert isinstance(traced, Answer) and traced.cost_usd == pytest.approx(spent)
    [line] = [json.loads(x) for x in audit.read_text().splitlines()]
    assert line["error"]["type"] == "DeadlineExceeded"
    assert line["cost_usd"] == pytest.approx(spent)
    assert line["trace"]["attempts"][0]["text"] == "Canberra"
    assert line["trace"]["attempts"][0]["cost_usd"] == pytest.approx(spent)


# ---------------------------------------------------------------- odd metadata, the audit log


async def test_metadata_json_cannot_encode_loses_neither_the_answer_nor_the_audit_log(
        tmp_path: Path) -> None:
    """Metadata travels into the cache entry and the audit line. A key JSON cannot encode (a
    tuple) made the cache store raise TypeError after the call was paid (the answer lost), and
    killed the audit log's writer thread: that line and every later one, of every request,
    never reached the disk."""
    s = Script({"m": ["Canberra"]})
    audit = tmp_path / "audit.jsonl"
    cfg = _config(tmp_path, [_rung("m", 1.0)])
    with Cascade.from_dict(cfg, provider_factory=s.factory, audit_log=audit) as c:
        odd = await c.aanswer("Capital of Australia?", metadata={("tenant", 1): "x"})  # type: ignore[dict-item]
        assert odd.verified and odd.text == "Canberra"
        assert (await c.aanswer("Capital of Australia?")).cache_hit
        assert c.audit_log.flush(5.0)
        await c.aanswer("Capital of France?")
        assert c.audit_log.flush(5.0)
    lines = [json.loads(x) for x in audit.read_text().splitlines()]
    answers = [x for x in lines if x["type"] == "answer"]
    assert len(answers) == 3
    assert [x["verified"] for x in answers] == [True, True, True]
    assert answers[2]["messages"][0]["content"] == "Capital of France?"


async def test_a_library_audit_log_cuts_the_ladders_keys_in_every_escaped_form(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``Cascade(config, audit_log=PATH)`` opened its log without the ladder's key variables
    (``cascade serve`` passes them), so nothing was cut: a user verifier's error quoting the
    key (its own client's URL, say) went to disk raw and URL-encoded."""
    key = "sk-review+key/with=chars-0123456789"
    monkeypatch.setenv("REVIEW_TEST_KEY", key)
    from urllib.parse import quote

    def leaky(ctx: VerifyContext) -> Verdict:
        raise RuntimeError(f"GET https://checker/?key={quote(key, safe='')} failed; key={key}")

    rungs = [_rung("small", 1.0, api_key_env="REVIEW_TEST_KEY"), _rung("big", 2.0)]
    rungs[1]["verifiers"] = []  # the top rung accepts: the rejected one stays in the trace
    s = Script({"small": ["Canberra"], "big": ["Canberra"]})
    audit = tmp_path / "audit.jsonl"
    cfg = _config(tmp_path, rungs, cache={"enabled": False})
    with Cascade.from_dict(cfg, verifiers=[leaky], provider_factory=s.factory,
                           audit_log=audit) as c:
        ans = await c.aanswer("Capital of Australia?")
        assert ans.verified and ans.attempts[0].status == "rejected"
    text = audit.read_text()
    assert "verifier crashed" in text
    assert key not in text and quote(key, safe="") not in text
    assert json.dumps(key)[1:-1] not in text


# ---------------------------------------------------------------- what the deadline is


@pytest.mark.parametrize("first", ["Canberra", "error"])
async def test_a_timeout_error_of_the_callers_own_is_not_taken_for_the_deadline(
        tmp_path: Path, first: str) -> None:
    """``on_attempt`` (a stream's writer, say) raising TimeoutError of its own: the engine took
    any TimeoutError for its deadline, so an accepted answer came back as unverified (and was
    not cached), or, with nothing answered and no deadline set, a TypeError formatting the
    missing deadline. The caller's own error must reach the caller, as any other does."""
    reply: Any = (ServerError("down", provider="x", model="small") if first == "error"
                  else first)
    s = Script({"small": [reply], "big": ["Canberra"]})

    def on_attempt(a: Attempt) -> None:
        raise TimeoutError("the client's socket write timed out")

    cfg = _config(tmp_path, [_rung("small", 1.0), _rung("big", 2.0)])
    async with Cascade.from_dict(cfg, provider_factory=s.factory) as c:
        with pytest.raises(TimeoutError, match="socket write"):
            await c.aanswer("Capital of Australia?", on_attempt=on_attempt)


async def test_a_sqlite_reservation_cancelled_in_flight_is_released(tmp_path: Path) -> None:
    """A request cancelled while its reservation waits on a busy SQLite budget file: the
    worker thread still reserved once the file was free, and its result was thrown away, so
    the money stayed held until the window ended (a day by default)."""
    import sqlite3
    import threading

    from cascade.store.local import LocalBudgets

    path = tmp_path / "budget.sqlite3"
    store = SQLiteBudgetStore(path)
    budgets = LocalBudgets(store)
    locked, done = threading.Event(), threading.Event()

    def hold_the_lock() -> None:  # another process holding the write lock for 0.5 s
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        locked.set()
        done.wait(0.5)
        blocker.execute("COMMIT")
        blocker.close()

    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    locked.wait(5)
    try:
        with anyio.move_on_after(0.1):
            await budgets.areserve("k", 0.5, 1.0, 3600.0)
    finally:
        holder.join()
    assert store.pending("k", 3600.0) == 0.0


@pytest.mark.parametrize("alpha", [0, 0.0, 1, 1.0, 2.5])
def test_a_drift_alpha_outside_zero_one_is_a_config_error_not_replaced(alpha: float) -> None:
    """``drift_alpha`` 0 never alarms and 1 alarms on every check; the engine used to swap
    either for 0.01 (ten times the default false-alarm rate) without a word."""
    from cascade.config import parse_config
    from cascade.errors import ConfigError

    rung = {"model": "m", "provider": "openai-compatible", "base_url": "http://127.0.0.1:9/v1",
            "price": "unknown"}
    with pytest.raises(ConfigError, match="drift_alpha"):
        parse_config({"rungs": [rung], "policy": {"drift_alpha": alpha}})
    assert parse_config({"rungs": [rung], "policy": {"drift_alpha": 0.02}}).policy.drift_alpha \
        == 0.02


async def test_cascade_record_bills_a_failed_over_call_at_the_fallback_that_answered(
        tmp_path: Path) -> None:
    """``cascade record`` priced every recorded call at its rung's own price and endpoint,
    also when the rung's primary failed and a dearer fallback answered: the recording (and
    so every tuning cost built from it) was 100x too low here."""
    from cascade.record import record
    from cascade.suite import RecordingStore, answer_call, load_cases

    (tmp_path / "cases.jsonl").write_text(json.dumps(
        {"id": "q0", "messages": [{"role": "user", "content": "Capital of Australia?"}],
         "expected": "Canberra"}) + "\n")
    cfg = parse_config(_config(tmp_path, [_rung("small", 1.0,
                                                fallbacks=[_rung("dear", 100.0)])]))
    s = Script({"small": [ServerError("down", provider="x", model="small")],
                "dear": ["Canberra"]})
    store = RecordingStore.for_suite(tmp_path)
    cases = load_cases(tmp_path)
    counts = await record(cases, cfg, store, factory=s.factory, progress=False)
    assert counts["recorded"] == 1 and s.count("dear") == 1
    rec = RecordingStore.for_suite(tmp_path).get(answer_call(cfg.rungs[0], cases[0].messages))
    assert rec is not None
    assert rec.cost_usd == pytest.approx((10 * 100.0 + 1 * 100.0) / 1e6)
    assert rec.endpoint == cfg.rungs[0].fallbacks[0].endpoint


async def test_an_answer_with_a_lone_surrogate_loses_no_audit_line(tmp_path: Path) -> None:
    """A model's reply JSON may carry an unpaired "\\ud800"; encoding the batch to UTF-8
    failed and the writer dropped every line of it (up to 1,000 requests')."""
    s = Script({"small": ["Canberra \ud800", "Paris"]})
    audit = tmp_path / "audit.jsonl"
    cfg = _config(tmp_path, [_rung("small", 1.0, verifiers=[])], cache={"enabled": False})
    with Cascade.from_dict(cfg, provider_factory=s.factory, audit_log=audit) as c:
        await c.aanswer("Capital of Australia?")
        await c.aanswer("Capital of France?")
    lines = [json.loads(x) for x in audit.read_text(encoding="utf-8").splitlines()]
    answers = [x["answer"] for x in lines if x.get("type") == "answer"]
    assert answers == ["Canberra \ud800", "Paris"]


async def test_a_key_variable_ending_in_a_newline_is_still_cut_from_the_audit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Key files end in a newline; the key sent (and quoted by errors) is the stripped one."""
    key = "sk-review-newline-0123456789"
    monkeypatch.setenv("REVIEW_TEST_KEY", key + "\n")

    def leaky(ctx: VerifyContext) -> Verdict:
        raise RuntimeError(f"the checker refused key {key}")

    rungs = [_rung("small", 1.0, api_key_env="REVIEW_TEST_KEY"), _rung("big", 2.0)]
    rungs[1]["verifiers"] = []
    s = Script({"small": ["Canberra"], "big": ["Canberra"]})
    audit = tmp_path / "audit.jsonl"
    cfg = _config(tmp_path, rungs, cache={"enabled": False})
    with Cascade.from_dict(cfg, verifiers=[leaky], provider_factory=s.factory,
                           audit_log=audit) as c:
        await c.aanswer("Capital of Australia?")
    text = audit.read_text()
    assert "the checker refused key" in text and key not in text


async def test_a_structured_requests_shadow_check_asks_the_top_rung_for_the_same_structure(
        tmp_path: Path) -> None:
    """The shadow check sent the top rung the bare messages, without the request's schema: its
    free-text answer then disagreed with the early rung's JSON on every structured request,
    and the drift alarm fired on agreement that was there."""
    from cascade.testing import FunctionProvider

    schema = {"type": "object", "properties": {"city": {"type": "string"}},
              "required": ["city"]}
    calls: list[ModelCall] = []

    def model(call: ModelCall) -> str:
        calls.append(call)
        return '{"city": "Canberra"}' if call.json_schema is not None else "Canberra"

    cfg = _config(tmp_path, [_rung("small", 1.0), _rung("big", 100.0)],
                  policy={"shadow_rate": 1.0}, cache={"enabled": False})
    seen = _Recorder()
    shadows: list[bool | None] = []

    class Shadows:
        def on_answer(self, *args: Any) -> None:
            pass

        def on_shadow(self, request: Any, accepted: Any, shadow: Any,
                      agreed: bool | None) -> None:
            shadows.append(agreed)

    c = Cascade.from_dict(cfg, provider_factory=FunctionProvider(model).factory,
                          observers=[seen, Shadows()])
    try:
        ans = await c.aanswer("Capital of Australia, as JSON?", schema=schema)
        assert ans.verified and ans.model == "small"
        assert c.drain_shadows(10)
    finally:
        c.close()
    top = [x for x in calls if x.model == "big"]
    assert len(top) == 1 and top[0].json_schema == schema
    assert shadows == [True]


async def test_a_crashed_verifiers_error_quoting_a_key_is_cut_from_the_trace_and_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A user verifier whose own client failed with the key in its URL: the crash reason went
    into the trace (and so the response) and into the cache entry of the rung accepted after
    it; only the audit log was scrubbed."""
    from urllib.parse import quote

    key = "sk-review+trace/key=0123456789"
    monkeypatch.setenv("REVIEW_TEST_KEY", key)

    def leaky(ctx: VerifyContext) -> Verdict:
        if ctx.candidate.rung.model == "small":
            raise RuntimeError(f"GET https://checker/?key={quote(key, safe='')} failed: {key!r}")
        return Verdict(passed=True, reason="ok")

    leaky.cache_key = "leaky-v1"  # type: ignore[attr-defined]
    rungs = [_rung("small", 1.0, api_key_env="REVIEW_TEST_KEY"), _rung("big", 2.0)]
    s = Script({"small": ["Canberra"], "big": ["Canberra"]})
    async with Cascade.from_dict(_config(tmp_path, rungs), verifiers=[leaky],
                                 provider_factory=s.factory) as c:
        ans = await c.aanswer("Capital of Australia?")
        again = await c.aanswer("Capital of Australia?")
    assert ans.verified and ans.attempts[0].status == "rejected" and again.cache_hit
    trace = json.dumps(ans.to_dict()) + json.dumps(again.to_dict())
    assert "verifier crashed" in trace and "[redacted]" in trace
    stored = "".join(p.read_bytes().decode("latin-1") for p in (tmp_path / "cache").rglob("*")
                     if p.is_file())
    for text in (trace, stored):
        assert key not in text and quote(key, safe="") not in text and repr(key) not in text


def test_a_vendors_default_key_variable_is_a_secret_of_the_config(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An ``openai`` rung naming no variable sends OPENAI_API_KEY: it must be cut as well."""
    from cascade.secrets import Redactor, secret_envs_of

    monkeypatch.setenv("OPENAI_API_KEY", "sk-default-vendor-key-0123")
    cfg = parse_config({"rungs": [{"model": "gpt-4o-mini", "provider": "openai"}]})
    assert "OPENAI_API_KEY" in secret_envs_of(cfg)
    assert Redactor(secret_envs_of(cfg))("key sk-default-vendor-key-0123!") == "key [redacted]!"
    local = parse_config({"rungs": [{"model": "m", "provider": "openai-compatible",
                                     "base_url": "http://127.0.0.1:9/v1", "price": "unknown"}]})
    assert secret_envs_of(local) == []


async def test_a_requests_schema_counts_in_the_cost_estimate_the_cap_is_held_to(
        tmp_path: Path) -> None:
    """A JSON schema is input the call pays for (a response format, or the prompt's
    instruction); the estimate left it out, so a cap that fits the messages alone let a call
    through that could cost more than the cap."""
    from cascade.errors import BudgetExceeded

    schema = {"type": "object", "properties": {f"field_{i}": {"type": "string",
                                                             "description": "x " * 20}
                                               for i in range(30)}}
    prompt = "Capital of Australia?"
    parsed = parse_config(_config(tmp_path, [_rung("m", 1000.0, max_tokens=16)]))
    bare = estimate_cost(parsed.rungs[0], [Message("user", prompt)])
    s = Script({"m": ['{"field_0": "Canberra"}']})
    async with Cascade.from_dict(_config(tmp_path, [_rung("m", 1000.0, max_tokens=16)],
                                         cache={"enabled": False}),
                                 provider_factory=s.factory) as c:
        with pytest.raises(BudgetExceeded):
            await c.aanswer(prompt, schema=schema, max_cost_usd=bare * 1.5)
        assert s.count("m") == 0
        ok = await c.aanswer(prompt, max_cost_usd=bare * 1.5)  # without the schema it fits
        assert ok.text


def test_an_audit_line_is_never_glued_onto_a_line_a_killed_worker_left_unfinished(
        tmp_path: Path) -> None:
    """Workers share one audit file; one killed mid-write leaves a line without its newline,
    and the next writer's line was appended right after it, so a reader lost both."""
    from cascade.audit import AuditLog

    path = tmp_path / "audit.jsonl"
    path.write_text('{"type":"answer","request_id":"cut-sh')  # a worker died here
    log = AuditLog(path)
    try:
        log.on_answer(Request(messages=(Message("user", "q"),)),
                      Answer(text="a", model="m", verified=True, attempts=[],
                             cost_usd=0.0, request_id="r2"), None)
        assert log.flush(10)
    finally:
        log.close()
    lines = path.read_text().splitlines()
    assert lines[0] == '{"type":"answer","request_id":"cut-sh'
    assert json.loads(lines[1])["request_id"] == "r2"


def test_an_async_observer_is_refused_rather_than_silently_never_run(tmp_path: Path) -> None:
    """Observers are called, not awaited: an ``async def on_answer`` made a coroutine nobody
    awaited, so the user's audit or metrics hook never ran, without a word."""
    from cascade.errors import ConfigError

    class Late:
        async def on_answer(self, *args: Any) -> None:
            pass

        def on_shadow(self, *args: Any) -> None:
            pass

    with pytest.raises(ConfigError, match="on_answer must be a plain function"):
        Cascade.from_dict(_config(tmp_path, [_rung("m", 1.0)]), observers=[Late()])


async def test_cascade_record_never_takes_the_rungs_answer_for_a_verifiers_sample(
        tmp_path: Path) -> None:
    """A sampling verifier asks the rung's model the case's own messages (at another
    temperature): its lookup in the recordings matched, by model and messages alone, the answer
    an earlier rung of the same model had recorded (the embedded ladder's two rungs are one
    model), so that answer was taken for a fresh sample."""
    from cascade.record import record
    from cascade.suite import RecordingStore, load_cases

    (tmp_path / "cases.jsonl").write_text(json.dumps(
        {"id": "q0", "messages": [{"role": "user", "content": "Capital of Australia?"}],
         "expected": "Canberra"}) + "\n")
    brief = {**_rung("small", 1.0, max_tokens=8, verifiers=[]), "name": "brief"}
    sampled = {**_rung("small", 1.0, max_tokens=64, verifiers=["agreement"]), "name": "sampled"}
    cfg = parse_config({**_config(tmp_path, [brief, sampled]), "verifiers": [
        {"name": "agreement", "mode": "samples", "samples": 1, "temperature": 0.9}]})
    s = Script({"small": ["Canberra", "Sydney", "Canberra"]})  # brief, sampled, its sample
    store = RecordingStore.for_suite(tmp_path)
    counts = await record(load_cases(tmp_path), cfg, store, factory=s.factory,
                          concurrency=1, progress=False)
    assert counts["recorded"] == 2
    assert s.count("small") == 3  # the sample was really drawn, not read back


async def test_a_deadline_during_verification_keeps_the_paid_checks_in_the_attempts_cost(
        tmp_path: Path) -> None:
    """A paid check (a model call) returned, then the deadline cut the next one short: the
    check was in the answer's cost and the budget but not in its attempt, so the trace's
    attempts summed to less than what the request cost."""

    class AsksThenWaits:
        name = "asks_then_waits"
        expensive = True
        cache_key = "asks-then-waits"

        async def verify(self, ctx: VerifyContext) -> Verdict:
            await ctx.call_model(ModelCall(model="m", messages=ctx.request.messages,
                                           max_tokens=4))
            await anyio.sleep(5.0)
            return Verdict(passed=True, reason="late")

    s = Script({"m": ["Canberra"]})
    store = InMemoryBudgetStore()
    cfg = _config(tmp_path, [_rung("m", 1000.0)], budget={"limit_usd": 1.0})
    with (Cascade.from_dict(cfg, verifiers=[AsksThenWaits()], provider_factory=s.factory,
                            budget_store=store) as c,
          pytest.raises(DeadlineExceeded) as ei):
        await c.aanswer("Capital of Australia?", timeout_s=0.3)
    assert s.count("m") == 2  # the answer and the check
    traced = ei.value.answer
    assert traced is not None
    spent = store.spent("default", 86400.0)
    assert traced.cost_usd == pytest.approx(spent)
    assert sum(a.cost_usd for a in traced.attempts) == pytest.approx(spent)


async def test_an_observer_raising_system_exit_does_not_replace_the_answer(
        tmp_path: Path) -> None:
    """Only ``Exception`` was caught around observers: a ``SystemExit`` from one (a metrics
    hook calling sys.exit on a full disk, say) replaced a paid, verified answer."""

    class Quits:
        def on_answer(self, *args: Any) -> None:
            raise SystemExit(1)

        def on_shadow(self, *args: Any) -> None:
            pass

    s = Script({"m": ["Canberra"]})
    cfg = _config(tmp_path, [_rung("m", 1.0, verifiers=[])], cache={"enabled": False})
    async with Cascade.from_dict(cfg, provider_factory=s.factory, observers=[Quits()]) as c:
        ans = await c.aanswer("Capital of Australia?")
    assert ans.verified and ans.text == "Canberra"
