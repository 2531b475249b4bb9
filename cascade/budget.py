"""Spending caps per key (user, tenant, session) and period, safe under tasks and processes.

Before a rung is called its estimated cost is *reserved*; the call goes ahead only when what was
spent, plus what other calls have reserved, plus this estimate stays within the limit. After the
call the reservation is *settled* with the actual cost (or *released* if nothing was spent). So
concurrent calls can never together overspend, as long as the actual cost of a call does not
exceed its estimate (the estimate assumes the full ``max_tokens`` of output, so it rarely does).

Periods are fixed windows aligned to the Unix epoch: with ``period_s = 86400`` the cap resets at
00:00 UTC each day, with 3600 at the top of every hour. Fixed windows need one counter per key
and window, so the check is a single-row read in any store. Money is counted in integer
nano-dollars, so sums are exact and the cap holds to the last digit.

Stores: :class:`InMemoryBudgetStore` (the process-wide default) and :class:`SQLiteBudgetStore`,
one SQLite file in WAL mode that several processes share, each check-and-reserve in a
``BEGIN IMMEDIATE`` transaction. A reservation left behind by a process that died stays pending
until its window ends. (:mod:`cascade.store.redis` shares budgets between hosts.)

Amounts are bounded, so no reply can overflow a store or charge an absurd sum: every amount is
clamped to ``[0, MAX_NANO]`` nano-dollars (about $9M, exact in the doubles Redis's Lua uses), and
a settled cost that is not a finite, non-negative number, or that exceeds both
:data:`MAX_CALL_USD` and the call's reserved estimate (a reply claiming 2**64 tokens), is not
believed: the estimate is charged instead, with a warning. Money is never dropped.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cascade.errors import BudgetExceeded, BudgetStoreError

__all__ = [
    "MAX_CALL_USD",
    "MAX_NANO",
    "BudgetStore",
    "BudgetStoreError",
    "InMemoryBudgetStore",
    "Reservation",
    "SQLiteBudgetStore",
    "budget_exceeded",
    "budget_key",
    "charged_nano",
    "default_store",
    "open_store",
    "reserve_amounts",
    "window_of",
]

log = logging.getLogger("cascade")
_NANO = 1_000_000_000
MAX_NANO = 2**53
"""The largest amount a store holds, in nano-dollars (~$9.0M): exact in a double, far below
SQLite's 64-bit integers."""
MAX_CALL_USD = 1000.0
"""A settled cost above this and above the call's own estimate is not believed."""


def _nano(usd: float) -> int:
    """Dollars as integer nano-dollars, clamped to ``[0, MAX_NANO]`` (+inf is the maximum)."""
    if math.isnan(usd):
        raise ValueError("an amount in USD must be a number, got nan")
    if usd >= MAX_NANO / _NANO:
        return MAX_NANO
    return max(0, round(usd * _NANO))


def charged_nano(reservation: Reservation, actual_usd: float) -> int:
    """What settling ``reservation`` records: the actual cost, unless it cannot be true.

    A cost that is NaN, infinite or negative, or larger than both :data:`MAX_CALL_USD` and the
    reserved estimate (a reply claiming absurd token counts), is replaced by the estimate, the
    most the engine expected the call to cost: the key is charged, never by an absurd sum.
    """
    believable = math.isfinite(actual_usd) and actual_usd >= 0 and (
        actual_usd <= MAX_CALL_USD or _nano(actual_usd) <= reservation.amount_nusd)
    if believable:
        return _nano(actual_usd)
    log.warning("budget key %r: a call reported a cost of $%s, which cannot be true; charged "
                "its estimate $%.6f instead", reservation.key, actual_usd,
                reservation.amount_usd)
    return reservation.amount_nusd


def _usd(nano: int) -> float:
    return nano / _NANO


def window_of(now: float, period_s: float) -> int:
    """The index of the epoch-aligned window of length ``period_s`` that holds ``now``."""
    if not period_s > 0:
        raise ValueError(f"period_s must be > 0, got {period_s}")
    return math.floor(now / period_s)


@dataclass(frozen=True, kw_only=True)
class Reservation:
    """Money set aside for one call until it is settled or released."""

    id: str
    key: str
    period_s: float
    window: int
    amount_nusd: int
    """The reserved estimate in nano-dollars."""

    @property
    def amount_usd(self) -> float:
        return _usd(self.amount_nusd)


def budget_key(metadata: Mapping[str, Any] | None, field: str = "budget_key",
               default: str = "default") -> str:
    """Whose budget a request draws on: ``metadata["budget_key"]`` (a user, a tenant), else
    the default key, so a configured cap always applies."""
    value = (metadata or {}).get(field)
    return default if value is None or value == "" else str(value)


class BudgetStore(Protocol):
    """Where spending is counted. Each method is atomic with respect to every other caller."""

    blocking: bool
    """True when calls do I/O: async callers should run them in a worker thread."""

    def reserve(self, key: str, amount_usd: float, limit_usd: float,
                period_s: float) -> Reservation:
        """Set ``amount_usd`` aside, or raise :class:`BudgetExceeded` if the cap would break."""
        ...

    def settle(self, reservation: Reservation, actual_usd: float) -> None:
        """Replace the reservation with what was actually spent. Idempotent."""
        ...

    def release(self, reservation: Reservation) -> None:
        """Drop the reservation: nothing was spent. Idempotent."""
        ...

    def spent(self, key: str, period_s: float) -> float:
        """Settled spending of ``key`` in the current window."""
        ...

    def pending(self, key: str, period_s: float) -> float:
        """Reserved, unsettled spending of ``key`` in the current window."""
        ...


def reserve_amounts(amount_usd: float, limit_usd: float) -> tuple[int, int]:
    """A reservation's estimate and limit as nano-dollars, or ValueError for a non-number."""
    if not (math.isfinite(amount_usd) and amount_usd >= 0):
        raise ValueError(f"a cost estimate must be a finite number >= 0, got {amount_usd}")
    if not (math.isfinite(limit_usd) and limit_usd >= 0):
        raise ValueError(f"a budget limit must be a finite number >= 0, got {limit_usd}")
    return _nano(amount_usd), _nano(limit_usd)


def budget_exceeded(key: str, spent: int, pending: int, amount: int, limit: int,
                    period_s: float, now: float) -> BudgetExceeded:
    """The refusal every store raises: the key, what was spent and reserved, the limit."""
    resets_in = (window_of(now, period_s) + 1) * period_s - now
    msg = (
        f"budget for key {key!r} would be exceeded: spent ${_usd(spent):.6f}"
        + (f" + reserved ${_usd(pending):.6f}" if pending else "")
        + f" + this call's estimate ${_usd(amount):.6f} > limit ${_usd(limit):.6f} "
        f"per {period_s:g}s window (resets in {resets_in:.0f}s)"
    )
    return BudgetExceeded(msg, key=key, spent_usd=_usd(spent), limit_usd=_usd(limit))


class InMemoryBudgetStore:
    """Counts in a dict guarded by a lock: shared by every task and thread of one process."""

    blocking = False

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        # (key, period_s) -> window -> [spent, pending] in nano-dollars
        self._windows: dict[tuple[str, float], dict[int, list[int]]] = {}
        self._open: set[str] = set()

    def reserve(self, key: str, amount_usd: float, limit_usd: float,
                period_s: float) -> Reservation:
        amount, limit = reserve_amounts(amount_usd, limit_usd)
        with self._lock:
            now = self._clock()
            window = window_of(now, period_s)
            windows = self._windows.setdefault((key, period_s), {})
            for old in [w for w, (_, p) in windows.items() if w < window and p == 0]:
                del windows[old]
            counts = windows.setdefault(window, [0, 0])
            spent, pending = counts
            if spent + pending + amount > limit:
                raise budget_exceeded(key, spent, pending, amount, limit, period_s, now)
            counts[1] += amount
            res = Reservation(id=uuid.uuid4().hex, key=key, period_s=period_s, window=window,
                              amount_nusd=amount)
            self._open.add(res.id)
            return res

    def _close(self, res: Reservation, actual: int) -> None:
        with self._lock:
            if res.id not in self._open:
                return
            self._open.discard(res.id)
            counts = self._windows.setdefault((res.key, res.period_s), {}).setdefault(
                res.window, [0, 0]
            )
            counts[1] -= res.amount_nusd
            counts[0] += actual

    def settle(self, reservation: Reservation, actual_usd: float) -> None:
        self._close(reservation, charged_nano(reservation, actual_usd))

    def release(self, reservation: Reservation) -> None:
        self._close(reservation, 0)

    def _counts(self, key: str, period_s: float) -> list[int]:
        with self._lock:
            window = window_of(self._clock(), period_s)
            return list(self._windows.get((key, period_s), {}).get(window, [0, 0]))

    def spent(self, key: str, period_s: float) -> float:
        return _usd(self._counts(key, period_s)[0])

    def pending(self, key: str, period_s: float) -> float:
        return _usd(self._counts(key, period_s)[1])


_SCHEMA = """
CREATE TABLE IF NOT EXISTS budget_spent (
    key TEXT NOT NULL, period_s REAL NOT NULL, win INTEGER NOT NULL,
    spent_nusd INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (key, period_s, win)
);
CREATE TABLE IF NOT EXISTS budget_reserved (
    id TEXT PRIMARY KEY, key TEXT NOT NULL, period_s REAL NOT NULL, win INTEGER NOT NULL,
    amount_nusd INTEGER NOT NULL, created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS budget_reserved_window ON budget_reserved (key, period_s, win);
"""


class SQLiteBudgetStore:
    """One SQLite file shared by every process on the machine that opens the same path.

    Each operation opens a short-lived connection (safe across threads and ``fork``) and runs in
    a ``BEGIN IMMEDIATE`` transaction, which SQLite serialises between processes; WAL mode keeps
    readers from blocking the writer.
    """

    blocking = True

    def __init__(self, path: str | os.PathLike[str], *, clock: Callable[[], float] = time.time,
                 timeout_s: float = 30.0) -> None:
        self.path = Path(path).expanduser()
        self._clock = clock
        self._timeout_s = timeout_s
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as db:
                db.execute("PRAGMA journal_mode=WAL")
                db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as e:
            raise BudgetStoreError(f"budget store {str(self.path)!r} cannot be opened: {e}") \
                from e

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=self._timeout_s, isolation_level=None)
        try:
            yield db
        finally:
            db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        try:
            with self._connect() as db:
                db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
        except sqlite3.Error as e:
            raise BudgetStoreError(f"budget store {str(self.path)!r} failed: {e}") from e

    @staticmethod
    def _read(db: sqlite3.Connection, key: str, period_s: float, window: int) -> tuple[int, int]:
        row = db.execute(
            "SELECT spent_nusd FROM budget_spent WHERE key=? AND period_s=? AND win=?",
            (key, period_s, window),
        ).fetchone()
        (pending,) = db.execute(
            "SELECT COALESCE(SUM(amount_nusd), 0) FROM budget_reserved "
            "WHERE key=? AND period_s=? AND win=?",
            (key, period_s, window),
        ).fetchone()
        return (int(row[0]) if row else 0), int(pending)

    def reserve(self, key: str, amount_usd: float, limit_usd: float,
                period_s: float) -> Reservation:
        amount, limit = reserve_amounts(amount_usd, limit_usd)
        with self._transaction() as db:
            now = self._clock()
            window = window_of(now, period_s)
            spent, pending = self._read(db, key, period_s, window)
            if spent + pending + amount > limit:
                raise budget_exceeded(key, spent, pending, amount, limit, period_s, now)
            res = Reservation(id=uuid.uuid4().hex, key=key, period_s=period_s, window=window,
                              amount_nusd=amount)
            db.execute(
                "INSERT INTO budget_reserved (id, key, period_s, win, amount_nusd, created) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (res.id, key, period_s, window, amount, now),
            )
            return res

    def _close(self, res: Reservation, actual: int) -> None:
        with self._transaction() as db:
            gone = db.execute("DELETE FROM budget_reserved WHERE id=?", (res.id,)).rowcount
            if gone and actual:
                db.execute(
                    "INSERT INTO budget_spent (key, period_s, win, spent_nusd) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT (key, period_s, win) "
                    "DO UPDATE SET spent_nusd = MIN(spent_nusd + excluded.spent_nusd, ?)",
                    (res.key, res.period_s, res.window, actual, 2**62),
                )

    def settle(self, reservation: Reservation, actual_usd: float) -> None:
        self._close(reservation, charged_nano(reservation, actual_usd))

    def release(self, reservation: Reservation) -> None:
        self._close(reservation, 0)

    def _counts(self, key: str, period_s: float) -> tuple[int, int]:
        try:
            with self._connect() as db:
                return self._read(db, key, period_s, window_of(self._clock(), period_s))
        except sqlite3.Error as e:
            raise BudgetStoreError(f"budget store {str(self.path)!r} failed: {e}") from e

    def spent(self, key: str, period_s: float) -> float:
        return _usd(self._counts(key, period_s)[0])

    def pending(self, key: str, period_s: float) -> float:
        return _usd(self._counts(key, period_s)[1])


_default_lock = threading.Lock()
_default: InMemoryBudgetStore | None = None


def default_store() -> InMemoryBudgetStore:
    """The process-wide in-memory store every :class:`Budget` uses unless given another."""
    global _default
    with _default_lock:
        if _default is None:
            _default = InMemoryBudgetStore()
        return _default


def open_store(spec: str | os.PathLike[str] | None = None) -> BudgetStore:
    """A store from a setting: None or ``"memory"`` for the process default, else a SQLite path."""
    if spec is None or str(spec) == "memory":
        return default_store()
    return SQLiteBudgetStore(spec)
