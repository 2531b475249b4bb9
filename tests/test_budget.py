"""Budgets: reserve, settle, release; epoch windows; never overspent, even across processes."""

from __future__ import annotations

import multiprocessing
import random
import tempfile
import threading
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cascade.budget import (
    BudgetStore,
    BudgetStoreError,
    InMemoryBudgetStore,
    Reservation,
    SQLiteBudgetStore,
    budget_key,
    default_store,
    open_store,
    window_of,
)
from cascade.errors import BudgetExceeded
from cascade.store.local import LocalBudgets


class Clock:
    def __init__(self, now: float = 86400.0 * 1000 + 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "sqlite"])
def store_and_clock(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[BudgetStore, Clock]:
    clock = Clock()
    if request.param == "memory":
        return InMemoryBudgetStore(clock=clock), clock
    return SQLiteBudgetStore(tmp_path / "budget.sqlite3", clock=clock), clock


def test_reserve_settle_release_accounting(store_and_clock: tuple[BudgetStore, Clock]) -> None:
    store, _ = store_and_clock
    a = store.reserve("alice", 0.30, 1.00, 3600)
    b = store.reserve("alice", 0.50, 1.00, 3600)
    assert store.pending("alice", 3600) == pytest.approx(0.80)
    assert store.spent("alice", 3600) == 0.0
    store.settle(a, 0.10)
    store.release(b)
    assert store.spent("alice", 3600) == pytest.approx(0.10)
    assert store.pending("alice", 3600) == 0.0
    # settling or releasing twice changes nothing
    store.settle(a, 0.10)
    store.release(a)
    store.settle(b, 0.50)
    assert store.spent("alice", 3600) == pytest.approx(0.10)


def test_exceeding_raises_a_clear_error(store_and_clock: tuple[BudgetStore, Clock]) -> None:
    store, _ = store_and_clock
    store.settle(store.reserve("tenant:acme", 0.7, 1.0, 86400), 0.6)
    store.reserve("tenant:acme", 0.3, 1.0, 86400)
    with pytest.raises(BudgetExceeded) as info:
        store.reserve("tenant:acme", 0.2, 1.0, 86400)
    e = info.value
    assert e.key == "tenant:acme"
    assert e.spent_usd == pytest.approx(0.6)
    assert e.limit_usd == 1.0
    msg = str(e)
    for part in ("'tenant:acme'", "spent $0.600000", "reserved $0.300000",
                 "estimate $0.200000", "limit $1.000000", "per 86400s window", "resets in"):
        assert part in msg
    # the exact remainder still fits: the cap is inclusive and sums are exact
    store.reserve("tenant:acme", 0.1, 1.0, 86400)


def test_keys_and_periods_are_separate(store_and_clock: tuple[BudgetStore, Clock]) -> None:
    store, _ = store_and_clock
    store.settle(store.reserve("u1", 1.0, 1.0, 3600), 1.0)
    with pytest.raises(BudgetExceeded):
        store.reserve("u1", 0.01, 1.0, 3600)
    store.reserve("u2", 1.0, 1.0, 3600)
    store.reserve("u1", 1.0, 1.0, 86400)


def test_windows_are_aligned_to_the_epoch(store_and_clock: tuple[BudgetStore, Clock]) -> None:
    store, clock = store_and_clock
    clock.now = 7200.0 + 3599.0  # one second before the top of an hour
    store.settle(store.reserve("k", 1.0, 1.0, 3600), 1.0)
    with pytest.raises(BudgetExceeded, match="resets in 1s"):
        store.reserve("k", 0.5, 1.0, 3600)
    clock.now += 1.0
    assert store.spent("k", 3600) == 0.0
    store.reserve("k", 1.0, 1.0, 3600)


def test_settling_after_the_window_ends_counts_in_the_old_window(
    store_and_clock: tuple[BudgetStore, Clock],
) -> None:
    store, clock = store_and_clock
    clock.now = 3600.0 * 10
    res = store.reserve("k", 0.5, 1.0, 3600)
    clock.now += 3600.0
    store.settle(res, 0.5)
    assert store.spent("k", 3600) == 0.0
    clock.now -= 3600.0
    assert store.spent("k", 3600) == 0.5


def test_window_of() -> None:
    assert window_of(0.0, 60) == 0
    assert window_of(59.999, 60) == 0
    assert window_of(60.0, 60) == 1
    with pytest.raises(ValueError, match="period_s must be > 0"):
        window_of(1.0, 0)


def test_non_finite_amounts_are_refused() -> None:
    with pytest.raises(ValueError, match="finite"):
        InMemoryBudgetStore().reserve("k", float("nan"), 1.0, 60)


def test_sqlite_store_reports_an_unusable_path(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(BudgetStoreError, match="cannot be opened"):
        SQLiteBudgetStore(tmp_path / "file" / "budget.sqlite3")


def test_sqlite_state_is_shared_between_store_objects(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite3"
    a, b = SQLiteBudgetStore(path), SQLiteBudgetStore(path)
    res = a.reserve("k", 0.4, 1.0, 60)
    assert b.pending("k", 60) == pytest.approx(0.4)
    b.settle(res, 0.25)
    assert a.spent("k", 60) == pytest.approx(0.25)


def test_open_store() -> None:
    assert open_store() is default_store()
    assert open_store("memory") is default_store()


def test_a_requests_budget_key_comes_from_its_metadata() -> None:
    store = InMemoryBudgetStore()
    assert budget_key({"budget_key": "user:7"}) == "user:7"
    assert budget_key({}) == budget_key(None) == budget_key({"budget_key": ""}) == "default"
    assert budget_key({"budget_key": 7}) == "7"
    res = store.reserve(budget_key({"budget_key": "user:7"}), 0.6, 1.0, 60)
    assert res.key == "user:7"
    with pytest.raises(BudgetExceeded):
        store.reserve("user:7", 0.5, 1.0, 60)
    store.settle(res, 0.2)
    assert store.spent("user:7", 60) == pytest.approx(0.2) and store.pending("user:7", 60) == 0


# ---------------------------------------------------------------- several processes


def _spend_in_process(path: str, seed: int, calls: int, queue: Any) -> None:
    store = SQLiteBudgetStore(path)
    rng = random.Random(seed)
    spent = 0
    for _ in range(calls):
        estimate = rng.randint(1, 50) / 1000
        try:
            res = store.reserve("team", estimate, 1.0, 86400)
        except BudgetExceeded:
            continue
        actual = round(estimate * rng.random(), 6)
        store.settle(res, actual)
        spent += round(actual * 1e9)
    queue.put(spent)


def test_several_processes_share_one_cap(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.sqlite3")
    SQLiteBudgetStore(path)
    # fork is ten times faster than spawn here; forking while threads run is unsafe, so only then.
    ctx: Any = (multiprocessing.get_context("fork") if threading.active_count() == 1
                else multiprocessing.get_context("spawn"))
    queue = ctx.Queue()
    procs = [ctx.Process(target=_spend_in_process, args=(path, seed, 80, queue))
             for seed in range(4)]
    for p in procs:
        p.start()
    totals = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    store = SQLiteBudgetStore(path)
    spent = store.spent("team", 86400)
    assert spent <= 1.0
    assert round(spent * 1e9) == sum(totals)  # no update was lost
    assert store.pending("team", 86400) == 0.0
    # 320 calls averaging ~$0.0125 actual would spend ~$4: the cap was what stopped them
    assert spent > 0.5


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_many_tasks_never_overspend(kind: str, tmp_path: Path) -> None:
    store: BudgetStore = (InMemoryBudgetStore() if kind == "memory"
                          else SQLiteBudgetStore(tmp_path / "b.sqlite3"))
    budgets = LocalBudgets(store)  # what the engine reserves and settles through
    outcomes: list[str] = []

    async def call(i: int) -> None:
        try:
            res = await budgets.areserve("shared", 0.03, 1.0, 3600)
        except BudgetExceeded:
            outcomes.append("refused")
            return
        await anyio.lowlevel.checkpoint()
        if i % 5 == 0:
            await budgets.arelease(res)
            outcomes.append("released")
        else:
            await budgets.asettle(res, 0.03)
            outcomes.append("spent")

    async with anyio.create_task_group() as tg:
        for i in range(60):
            tg.start_soon(call, i)
    spent = store.spent("shared", 3600)
    assert spent <= 1.0
    assert spent == pytest.approx(0.03 * outcomes.count("spent"))
    assert outcomes.count("refused") > 0
    assert store.pending("shared", 3600) == 0.0


# ---------------------------------------------------------------- random interleavings

_ops = st.lists(
    st.one_of(
        st.tuples(st.just("reserve"), st.integers(0, 400), st.sampled_from(["a", "b"])),
        st.tuples(st.just("settle"), st.integers(0, 30), st.floats(0.0, 1.0)),
        st.tuples(st.just("release"), st.integers(0, 30), st.just(0.0)),
        st.tuples(st.just("tick"), st.integers(0, 1800), st.just("")),
    ),
    max_size=60,
)


def _check_interleaving(store: BudgetStore, clock: Clock, ops: list[tuple[str, Any, Any]]
                        ) -> None:
    limit, period = 1.0, 3600.0
    open_res: list[Reservation] = []
    spent: dict[tuple[str, int], int] = {}
    for op, x, y in ops:
        if op == "reserve":
            window = window_of(clock.now, period)
            pending = sum(r.amount_nusd for r in open_res if (r.key, r.window) == (y, window))
            amount = x * 10_000_000 // 3  # odd nano-dollar amounts, up to ~$1.33
            fits = spent.get((y, window), 0) + pending + amount <= 1_000_000_000
            try:
                open_res.append(store.reserve(y, amount / 1e9, limit, period))
            except BudgetExceeded:
                assert not fits
            else:
                assert fits
        elif op in ("settle", "release") and open_res:
            res = open_res.pop(x % len(open_res))
            if op == "settle":
                actual = int(res.amount_nusd * y)  # never more than the estimate
                store.settle(res, actual / 1e9)
                spent[(res.key, res.window)] = spent.get((res.key, res.window), 0) + actual
            else:
                store.release(res)
        elif op == "tick":
            clock.now += x
        window = window_of(clock.now, period)
        for key in ("a", "b"):
            got_spent = round(store.spent(key, period) * 1e9)
            got_pending = round(store.pending(key, period) * 1e9)
            assert got_spent == spent.get((key, window), 0)
            assert got_pending == sum(
                r.amount_nusd for r in open_res if (r.key, r.window) == (key, window))
            assert got_spent + got_pending <= 1_000_000_000


@given(_ops)
def test_memory_store_never_overspends(ops: list[tuple[str, Any, Any]]) -> None:
    clock = Clock()
    _check_interleaving(InMemoryBudgetStore(clock=clock), clock, ops)


@settings(max_examples=15, deadline=None)
@given(_ops)
def test_sqlite_store_never_overspends(ops: list[tuple[str, Any, Any]]) -> None:
    clock = Clock()
    with tempfile.TemporaryDirectory() as d:
        _check_interleaving(SQLiteBudgetStore(Path(d) / "b.sqlite3", clock=clock), clock, ops)


# ---------------------------------------------------------------- absurd amounts


def test_a_reply_claiming_2_64_tokens_neither_overflows_nor_charges_absurdly(
        store_and_clock: tuple[BudgetStore, Clock]) -> None:
    """A reply claiming 2**64 output tokens at $15/M is $2.8e14: SQLite cannot hold it in
    nano-dollars and the memory store charged it. Such a cost cannot be true, so the call is
    charged its reserved estimate (what it could at most have cost): no crash, no lost spend,
    no key locked for the window by a lie."""
    store, _ = store_and_clock
    res = store.reserve("alice", 0.02, 1.00, 3600)
    store.settle(res, 2**64 * 15 / 1e6)
    assert store.spent("alice", 3600) == pytest.approx(0.02)
    for bad in (float("nan"), float("inf"), -5.0):
        r = store.reserve("alice", 0.01, 1.00, 3600)
        store.settle(r, bad)
    assert store.spent("alice", 3600) == pytest.approx(0.05)
    assert store.pending("alice", 3600) == 0.0
    # a large but believable overrun (within the per-call ceiling) is charged as reported
    r = store.reserve("alice", 0.01, 1.00, 3600)
    store.settle(r, 0.50)
    assert store.spent("alice", 3600) == pytest.approx(0.55)


def test_absurd_estimates_and_limits_are_refused_or_bounded(
        store_and_clock: tuple[BudgetStore, Clock]) -> None:
    store, _ = store_and_clock
    with pytest.raises(BudgetExceeded) as info:
        store.reserve("bob", 2.0**64, 5.0, 3600)
    assert info.value.key == "bob" and info.value.limit_usd == 5.0
    with pytest.raises(ValueError, match="estimate"):
        store.reserve("bob", float("nan"), 5.0, 3600)
    # a limit of 1e300 is "unlimited", not an overflow
    r = store.reserve("bob", 1.0, 1e300, 3600)
    store.settle(r, 1.0)
    assert store.spent("bob", 3600) == pytest.approx(1.0)


def test_period_zero_is_a_config_error() -> None:
    from cascade.config import parse_config
    from cascade.errors import ConfigError

    for period in (0, 0.0):
        with pytest.raises(ConfigError, match=r"x\.toml.*budget\.period_s.*> 0"):
            parse_config({"rungs": [{"model": "m", "price": "unknown"}],
                          "budget": {"limit_usd": 1.0, "period_s": period}}, source="x.toml")
