"""Review of the shared state and the learning loop's first step, against a real redis-server:
what several workers sharing one Redis, an outage, and audit logs as production leaves them
(overlapping rotated copies, a line cut short by a killed worker) must not get wrong."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from cascade.config import CascadeConfig, parse_config
from cascade.drift import DriftMonitor
from cascade.errors import BudgetStoreError
from cascade.store.redis import RedisStore
from cascade.suite.fromlog import build_suite
from tests.redis_server import RedisServer, redis_server

pytestmark = pytest.mark.anyio


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


def _config(url: str, journal: Path, **store: Any) -> CascadeConfig:
    return parse_config({
        "rungs": [{"model": "m", "input_usd_per_mtok": 0, "output_usd_per_mtok": 0}],
        "store": {"url": url, "timeout_s": 2.0, "journal_dir": str(journal), **store},
    }, source="cascade.toml")


# ---------------------------------------------------------------- drift across workers


async def test_drift_checks_fed_by_two_workers_at_once_are_all_counted(
        redis: RedisServer, tmp_path: Path) -> None:
    """Two workers record shadow results for one rung at the same time: every check must land
    in the shared test (a lost update can also overwrite an alarm another worker raised)."""
    a = RedisStore.from_config(_config(redis.url, tmp_path / "j"))
    b = RedisStore.from_config(_config(redis.url, tmp_path / "j"))
    try:
        ma = DriftMonitor(a.counters, ladder="L", thresholds={"small": 0.1})
        mb = DriftMonitor(b.counters, ladder="L", thresholds={"small": 0.1})
        async with anyio.create_task_group() as tg:
            for _ in range(40):
                tg.start_soon(ma.record, "small", False)
                tg.start_soon(mb.record, "small", False)
        state = (await ma.refresh())["small"]
        assert state.samples == 80
    finally:
        await a.aclose()
        await b.aclose()


async def test_an_alarm_raised_by_another_worker_is_never_lost_to_a_concurrent_update(
        redis: RedisServer, tmp_path: Path) -> None:
    """Worker A raises the alarm while worker B adds an agreeing check it read before: the
    alarm must stay up (B must not write back the state it read before A's write)."""
    a = RedisStore.from_config(_config(redis.url, tmp_path / "j"))
    b = RedisStore.from_config(_config(redis.url, tmp_path / "j"))
    try:
        ma = DriftMonitor(a.counters, ladder="L", thresholds={"small": 0.02})
        mb = DriftMonitor(b.counters, ladder="L", thresholds={"small": 0.02})
        raised = False
        for _ in range(40):
            async with anyio.create_task_group() as tg:
                tg.start_soon(ma.record, "small", True)
                tg.start_soon(mb.record, "small", False)
            if (await ma.refresh())["small"].alarm:
                raised = True
                break
        assert raised  # 40 disagreements at D = 0.02 raise it long before the end
    finally:
        await a.aclose()
        await b.aclose()


async def test_a_raised_drift_alarm_stays_up_while_redis_is_down(
        redis: RedisServer, tmp_path: Path) -> None:
    """Safe mode must not end because Redis went away: during the outage the worker keeps the
    last alarm state it knew instead of reading an empty local one."""
    store = RedisStore.from_config(_config(redis.url, tmp_path / "j"))
    try:
        mon = DriftMonitor(store.counters, ladder="L", thresholds={"small": 0.02})
        for _ in range(20):
            state = await mon.record("small", True)
            if state is not None and state.alarm:
                break
        assert mon.is_drifted("small") is not None
        redis.kill()
        await mon.refresh()  # what maybe_refresh does every second on the request path
        assert mon.is_drifted("small") is not None
        await mon.record("small", False)  # a check during the outage keeps it up too
        assert mon.is_drifted("small") is not None
    finally:
        await store.aclose()


# ---------------------------------------------------------------- budgets across an outage


async def test_a_settle_replayed_hours_later_in_a_daily_window_counts_once(
        redis: RedisServer, tmp_path: Path) -> None:
    """A daily budget. A settle Redis recorded is sent again more than an hour later (its reply
    was lost and the outage lasted, or a journal was adopted twice after a crash) while other
    workers kept settling on the key: settling is idempotent, so it still counts once. The
    hour is simulated by backdating the settled-id record Redis keeps."""
    cfg = _config(redis.url, tmp_path / "j")
    a, b = RedisStore.from_config(cfg), RedisStore.from_config(cfg)
    try:
        res = await a.budgets.areserve("day", 0.1, 10.0, 86400)
        await a.budgets.asettle(res, 0.1)
        done = a.budgets._keys("day", 86400)[2]
        sec, _ = await b.conn.run(lambda c: c.time())
        await b.conn.run(lambda c: c.zadd(done, {res.id: (int(sec) - 3700) * 1000}))
        other = await b.budgets.areserve("day", 0.2, 10.0, 86400)  # the key stays busy
        await b.budgets.asettle(other, 0.2)
        await a.budgets.asettle(res, 0.1)  # the replay
        assert await a.budgets.aspent("day", 86400) == pytest.approx(0.3)
        # and the memory itself lasts as long as the window can still be charged
        ttl_ms = await b.conn.run(lambda c: c.pttl(done))
        assert ttl_ms > 86400 * 1000
    finally:
        await a.aclose()
        await b.aclose()


async def test_requests_refused_during_an_outage_do_not_pile_up_in_the_journal(
        redis: RedisServer, tmp_path: Path) -> None:
    """Fail-closed with Redis dead: a reserve refused without even trying Redis (the store's
    fail-fast second) sent nothing, so it leaves nothing to release. Otherwise every refused
    request adds a line to the journal and to /healthz's `unsettled` for the whole outage."""
    journal = tmp_path / "j"
    store = RedisStore.from_config(_config(redis.url, journal))
    try:
        assert await store.aping()
        redis.kill()
        for _ in range(200):
            with pytest.raises(BudgetStoreError):
                await store.budgets.areserve("t", 0.01, 1.0, 3600)
        assert store.budgets.unsettled <= 2
        lines = sum(len(p.read_text().splitlines()) for p in journal.glob("*.jsonl"))
        assert lines <= 2
    finally:
        await store.aclose()


# ---------------------------------------------------------------- suite from-log

T0 = 1_764_000_000.0


def _line(rid: str, ts: float, question: str, text: str) -> dict[str, Any]:
    attempt = {"rung": 0, "model": "small", "provider": "openai", "name": "small",
               "endpoint": "", "status": "accepted", "text": text, "verdicts": [],
               "input_tokens": 5, "output_tokens": 1, "cost_usd": 0.001, "latency_ms": 10.0,
               "error": None, "error_type": None, "tries": 1, "finish_reason": "stop",
               "note": None, "started_at": 0.0}
    trace: dict[str, Any] = {"text": text, "parsed": None, "model": "small", "verified": True,
             "cost_usd": 0.001, "cache_hit": False, "latency_ms": 10.0, "input_tokens": 0,
             "output_tokens": 0, "cache_key": None, "metadata": {}, "request_id": rid,
             "warnings": [], "attempts": [attempt]}
    return {"type": "answer", "request_id": rid, "timestamp": ts, "client": None,
            "ladder": "prod", "messages": [{"role": "user", "content": question}],
            "trace": trace, "answer": text, "verified": True, "cost_usd": 0.001,
            "latency_ms": 10.0, "error": None}


def _write(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return path


def test_overlapping_copies_of_a_rotated_log_do_not_count_a_request_twice(
        tmp_path: Path) -> None:
    """Rotated files collected on two days overlap (yesterday's audit.jsonl.1 is today's
    audit.jsonl.2): one request read twice is still one request of its case."""
    lines = [_line("r1", T0, "Capital of France?", "Paris"),
             _line("r2", T0 + 5, "Capital of France?", "Paris")]
    day1 = _write(tmp_path / "day1-audit.jsonl.1", lines)
    day2 = _write(tmp_path / "day2-audit.jsonl.2", lines)
    suite = build_suite([day1, day2])
    (case,) = suite.cases
    assert case["metadata"]["requests"] == 2
    assert case["metadata"]["request_ids"] == ["r1", "r2"]
    assert suite.stats.requests == 2


def test_a_line_written_after_one_cut_short_by_a_killed_worker_is_still_read(
        tmp_path: Path) -> None:
    """Workers share one audit file: one killed mid-write leaves a line without its end, and
    the next worker's line is appended right after it. Only the cut line is lost."""
    cut = json.dumps(_line("r1", T0, "Capital of France?", "Paris"))[:70]
    whole = json.dumps(_line("r2", T0 + 5, "Largest planet?", "Jupiter"))
    path = tmp_path / "audit.jsonl"
    path.write_text(cut + whole + "\n", encoding="utf-8")
    suite = build_suite([path])
    assert [c["messages"][0]["content"] for c in suite.cases] == ["Largest planet?"]
    assert suite.stats.bad_lines == 1


# ---------------------------------------------------------------- key_prefix isolation


async def test_breaker_health_of_one_deployment_never_shows_anothers(
        redis: RedisServer, tmp_path: Path) -> None:
    """Two deployments on one Redis, one with glob characters in its key_prefix: each one's
    breaker snapshot (/healthz) lists its own endpoints only, named exactly."""
    from cascade.errors import ServerError

    ours = RedisStore.from_config(_config(redis.url, tmp_path / "j", key_prefix="team[a]"))
    theirs = RedisStore.from_config(_config(redis.url, tmp_path / "j", key_prefix="teama"))
    try:
        fail = ServerError("down", provider="openai", model="m", status_code=503)
        await theirs.breakers.arecord("openai|http://x/v1|theirs", fail)
        await ours.breakers.arecord("openai|http://x/v1|ours", fail)
        assert list(await ours.breakers.asnapshot()) == ["openai|http://x/v1|ours"]
        assert list(await theirs.breakers.asnapshot()) == ["openai|http://x/v1|theirs"]
    finally:
        await ours.aclose()
        await theirs.aclose()
