"""Spend Redis never acknowledged survives the process that kept it: the budget journal, with a
real redis-server, a worker process that is SIGKILLed mid-outage, and the next one recording it."""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from cascade.budget import window_of
from cascade.config import CascadeConfig, parse_config
from cascade.errors import BudgetStoreError, ConfigError
from cascade.store.config import parse_store
from cascade.store.journal import store_id
from cascade.store.redis import RedisStore
from tests.redis_server import RedisServer, redis_server

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


def _config(url: str, journal: Path) -> CascadeConfig:
    return parse_config({
        "rungs": [{"model": "m", "input_usd_per_mtok": 0, "output_usd_per_mtok": 0}],
        "store": {"url": url, "timeout_s": 2.0, "journal_dir": str(journal)},
    }, source="cascade.toml")


def _files(journal: Path) -> list[Path]:
    """The journals holding entries; once nothing waits, no file of any kind is left."""
    if not journal.is_dir():
        return []
    data = sorted(journal.glob("*.jsonl"))
    if not data:
        assert list(journal.iterdir()) == []  # no lock or temporary file left behind either
    return data


async def test_spend_kept_by_a_closed_worker_is_recorded_by_the_next(
        redis: RedisServer, tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    first = RedisStore.from_config(_config(redis.url, journal))
    res = await first.budgets.areserve("team", 0.30, 1.0, 3600)
    redis.kill()
    await first.budgets.asettle(res, 0.25)  # Redis is gone: kept, in memory and on disk
    [kept] = _files(journal)
    entry = json.loads(kept.read_text())
    assert entry["key"] == "team" and entry["charged_nusd"] == 250_000_000
    await first.aclose()  # still down: closing keeps the file for whoever comes next
    assert _files(journal) == [kept]

    redis.start()  # an empty Redis would know nothing of the spend...
    second = RedisStore.from_config(_config(redis.url, journal))
    try:
        assert await second.budgets.aspent("team", 3600) == pytest.approx(0.25)  # ...but this
        assert _files(journal) == []
        again = RedisStore.from_config(_config(redis.url, journal))  # counted once, not twice
        assert await again.budgets.aspent("team", 3600) == pytest.approx(0.25)
        await again.aclose()
    finally:
        await second.aclose()


async def test_a_live_workers_journal_is_not_taken_and_damaged_lines_are_skipped(
        redis: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    journal = tmp_path / "journal"
    alive = RedisStore.from_config(_config(redis.url, journal))
    other = RedisStore.from_config(_config(redis.url, journal))
    try:
        res = await alive.budgets.areserve("k", 0.5, 1.0, 3600)
        redis.kill()
        await alive.budgets.asettle(res, 0.5)
        redis.start()
        # an orphan left by a crash mid-write: one whole line, one cut short
        orphan = journal / f"{store_id(redis.url, 'cascade')}-1-dead.jsonl"
        orphan.with_suffix(".lock").write_text("")  # its owner's lock, which nobody holds
        good = {"id": "r-dead", "key": "k", "period_s": 3600.0,
                "window": window_of(time.time(), 3600),
                "amount_nusd": 100_000_000, "charged_nusd": 100_000_000}
        orphan.write_text(json.dumps(good) + '\n{"id": "r-cut", "key": "k", "per')
        # the other worker adopts the orphan, not the live worker's file (it holds its lock)
        assert await other.budgets.aspent("k", 3600) == pytest.approx(0.1)
        assert not orphan.exists() and not orphan.with_suffix(".lock").exists()
        assert len(_files(journal)) == 1
        assert "damaged line" in caplog.text
        # the live worker records its own kept settle once Redis answers it
        await anyio.sleep(1.1)  # past the connection's fail-fast second
        assert await alive.budgets.aspent("k", 3600) == pytest.approx(0.6)
        assert _files(journal) == []
    finally:
        await alive.aclose()
        await other.aclose()


_WORKER = textwrap.dedent("""
    import os, signal, sys
    import anyio
    from cascade.config import parse_config
    from cascade.store.redis import RedisStore

    async def main() -> None:
        cfg = parse_config({
            "rungs": [{"model": "m", "input_usd_per_mtok": 0, "output_usd_per_mtok": 0}],
            "store": {"url": sys.argv[1], "timeout_s": 2.0, "journal_dir": sys.argv[2]}})
        store = RedisStore.from_config(cfg)
        res = await store.budgets.areserve("crash", 0.4, 1.0, 3600)
        os.kill(int(sys.argv[3]), signal.SIGKILL)  # Redis dies mid-request...
        await store.budgets.asettle(res, 0.4)      # ...the spend cannot be recorded...
        os.kill(os.getpid(), signal.SIGKILL)       # ...and the worker dies too

    anyio.run(main)
""")


def _env() -> dict[str, Any]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


async def test_a_worker_killed_during_an_outage_loses_no_spend(
        redis: RedisServer, tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    assert redis.proc is not None
    with anyio.fail_after(60):
        child = await anyio.run_process(
            [sys.executable, "-c", _WORKER, redis.url, str(journal), str(redis.proc.pid)],
            env=_env(), check=False)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    redis.proc.wait(10)
    redis.proc = None
    assert len(_files(journal)) == 1  # what the dead worker could not record

    redis.start()
    store = RedisStore.from_config(_config(redis.url, journal))
    try:
        assert await store.budgets.aspent("crash", 3600) == pytest.approx(0.4)
        assert _files(journal) == []
    finally:
        await store.aclose()


def test_journal_dir_is_a_store_key_with_a_per_user_default(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    url = {"url": "redis://127.0.0.1:6379/0"}
    monkeypatch.setenv("HOME", str(tmp_path))
    assert parse_store({**url, "journal_dir": "~/j"}).journal_dir == tmp_path / "j"
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert parse_store(url).journal_dir == tmp_path / "state" / "verified-cascade" / \
        "budget-journal"
    with pytest.raises(ConfigError, match="non-empty") as info:
        parse_store({**url, "journal_dir": ""}, source="cascade.toml")
    assert info.value.key == "store.journal_dir" and info.value.source == "cascade.toml"


async def test_an_unwritable_journal_keeps_spend_in_memory_and_says_so_once(
        redis: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")  # journal_dir names a file: every write fails
    store = RedisStore.from_config(_config(redis.url, blocker / "journal"))
    try:
        reservations = [await store.budgets.areserve("k", 0.1, 1.0, 3600) for _ in range(3)]
        redis.kill()
        for res in reservations:
            await store.budgets.asettle(res, 0.1)
        assert store.budgets.unsettled == 3
        assert caplog.text.count("could not write the budget journal") == 1
        redis.start()
        await anyio.sleep(1.1)
        assert await store.budgets.aspent("k", 3600) == pytest.approx(0.3)  # from memory
    finally:
        await store.aclose()


def test_journals_of_live_owners_stay_and_of_dead_ones_are_taken_over(tmp_path: Path) -> None:
    """No Redis needed: the files themselves. A held lock means a live owner; a released one
    (closed, or its process died) means an orphan, adopted once; a lock file with no data (an
    owner that died before writing) is only cleaned up."""
    from cascade.budget import Reservation
    from cascade.store.journal import Journal

    res = Reservation(id="r1", key="k", period_s=60.0, window=7, amount_nusd=5)
    owner, other = Journal(tmp_path, "s1"), Journal(tmp_path, "s1")
    stranger = Journal(tmp_path, "s2")  # another store's journal is never read
    assert owner.write([(res, 3)])
    assert other.adopt() == [] and stranger.adopt() == []
    owner.close()  # as a process that stops while Redis is down: its entries stay
    (tmp_path / "s1-1-died-early.lock").write_text("")
    (tmp_path / "s1-1-died-early.tmp").write_text('{"id": "half-wr')  # died mid-write
    [(got, charged)] = other.adopt()
    assert got == res and charged == 3
    assert other.adopt() == []  # held now by the adopter: nobody takes it twice
    assert other.write([(got, charged)])
    other.forget_adopted()
    assert {p.name for p in tmp_path.iterdir()} == {other.path.name,
                                                     other.path.with_suffix(".lock").name}
    assert other.write([])  # all acknowledged: nothing is left
    assert list(tmp_path.iterdir()) == []


async def test_a_long_outage_appends_and_never_rewrites_the_journal(
        redis: RedisServer, tmp_path: Path) -> None:
    """Each kept settle is one appended line (a rewrite per settle would be quadratic over a
    long outage, and every request during it retries the replay): the file is replaced only
    once Redis has taken some of it."""
    journal = tmp_path / "journal"
    store = RedisStore.from_config(_config(redis.url, journal))
    try:
        held = [await store.budgets.areserve("k", 0.01, 10.0, 3600) for _ in range(20)]
        redis.kill()
        inodes = set()
        for res in held:
            await store.budgets.asettle(res, 0.01)
            with pytest.raises(BudgetStoreError):  # each request retries the replay, fails
                await store.budgets.areserve("k", 0.01, 10.0, 3600)
            inodes.add(os.stat(_files(journal)[0]).st_ino)
        assert len(inodes) == 1  # appended to, never replaced
        # the 20 settles; the refused reservations failed fast, never reaching Redis
        assert len(_files(journal)[0].read_text().splitlines()) == 20
        redis.start()
        await anyio.sleep(1.1)
        assert await store.budgets.aspent("k", 3600) == pytest.approx(0.2)
        assert _files(journal) == []
    finally:
        await store.aclose()


async def test_a_replay_cut_short_by_cancellation_keeps_what_it_had_not_sent(
        redis: RedisServer, tmp_path: Path) -> None:
    """A request cancelled while its call replays kept settles (a client hung up, a deadline)
    must not take the unsent ones with it: they stay, in memory and journal, for the next."""
    journal = tmp_path / "journal"
    store = RedisStore.from_config(_config(redis.url, journal))
    try:
        held = [await store.budgets.areserve("k", 0.1, 10.0, 3600) for _ in range(3)]
        redis.kill()
        for res in held:
            await store.budgets.asettle(res, 0.1)
        redis.start()
        await anyio.sleep(1.1)  # past the connection's fail-fast second
        redis.pause()  # the replay's first call now hangs...
        with anyio.move_on_after(0.3):  # ...until the request is cancelled
            await store.budgets.aspent("k", 3600)
        redis.resume()
        assert store.budgets.unsettled == 3
        assert len(_files(journal)[0].read_text().splitlines()) == 3
        assert await store.budgets.aspent("k", 3600) == pytest.approx(0.3)
        assert _files(journal) == []
    finally:
        redis.resume()
        await store.aclose()
