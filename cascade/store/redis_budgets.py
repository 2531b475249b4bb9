"""Per-key budgets shared through Redis: reserve, settle and release are each one Lua script.

The scripts (:mod:`cascade.store.lua`) check and reserve in one atomic step on Redis's clock, so
N workers × M concurrent requests can never together reserve past the limit; each window is its
own hash fields, so rollover resets nothing and loses nothing; a reservation not settled within
``reservation_ttl_s`` (its worker died) stops holding money back; a settle that comes after its
reservation expired is still charged.

While Redis is unreachable, ``budgets_on_outage = "fail-closed"`` (the default) refuses metered
calls with :class:`BudgetStoreError` naming the store; ``"fail-open"`` lets them through with a
local reservation. Either way a settle that cannot reach Redis is kept, in the process and in
its journal on local disk (:mod:`cascade.store.journal`), and replayed as soon as Redis answers
again (the settled-id memory makes a replay count once); what a process that died kept is
adopted from its journal by the next one.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import anyio

from cascade.budget import (
    Reservation,
    budget_exceeded,
    charged_nano,
    reserve_amounts,
    window_of,
)
from cascade.errors import BudgetStoreError
from cascade.store import lua
from cascade.store.connection import Connection, StoreDown
from cascade.store.journal import Journal, store_id

__all__ = ["RedisBudgets"]

log = logging.getLogger("cascade")
_LOCAL = "local:"
"""Prefix of the id of a reservation made without Redis (fail-open)."""
_ADOPT_EVERY_S = 60.0
"""How often the journal folder is looked at for settles left by processes that died."""


class RedisBudgets:
    """:class:`cascade.store.base.AsyncBudgetStore` on Redis."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._prefix = conn.cfg.key_prefix
        self._ttl_ms = int(conn.cfg.reservation_ttl_s * 1000)
        self._unsettled: list[tuple[Reservation, int]] = []
        """Settles Redis has not acknowledged yet, replayed when it answers again."""
        self._journal = Journal(conn.cfg.journal_dir, store_id(conn.cfg.url, self._prefix))
        self._replaying: list[tuple[Reservation, int]] = []
        """Settles being replayed now: still in the journal until Redis has them all."""
        self._adopt_at = 0.0

    def _keep(self, res: Reservation, charged: int) -> None:
        self._unsettled.append((res, charged))
        self._journal.append([(res, charged)])  # O(1): a long outage never rewrites the file

    def _keys(self, key: str, period_s: float) -> list[str]:
        # the {hash tag} keeps a key's three structures in one slot of a Redis Cluster
        base = f"{self._prefix}:budget:{{{float(period_s)!r}|{key}}}"
        return [base, f"{base}:exp", f"{base}:done"]

    def _down(self, key: str, why: str) -> BudgetStoreError:
        return BudgetStoreError(
            f"the shared budget store {self._conn.cfg.display_url} is unreachable ({why}); "
            f"refusing a metered call for key {key!r} because [store] budgets_on_outage = "
            '"fail-closed" (set "fail-open" to let calls through while it is down)'
        )

    async def areserve(self, key: str, amount_usd: float, limit_usd: float,
                       period_s: float) -> Reservation:
        amount, limit = reserve_amounts(amount_usd, limit_usd)
        window_of(0.0, period_s)  # a period <= 0 is a ValueError here, as in the local stores
        await self.replay()
        rid = uuid.uuid4().hex
        script = self._conn.script("budget_reserve", lua.BUDGET_RESERVE)
        args: list[Any] = [rid, str(amount), str(limit), repr(float(period_s)), self._ttl_ms]
        try:
            ok, spent, pending, win, now_ms = await self._conn.run(
                lambda c: script(keys=self._keys(key, period_s), args=args, client=c))
        except StoreDown as e:
            # Redis may have run the script before the reply was lost (a timeout): release the
            # id once Redis answers again, so it does not hold money back until it expires. A
            # call that failed fast never reached Redis: keeping it would add a journal line
            # and an `unsettled` count per refused request for the whole outage.
            if e.sent:
                self._keep(Reservation(id=rid, key=key, period_s=period_s, window=0,
                                       amount_nusd=amount), 0)
            if self._conn.cfg.budgets_on_outage == "fail-closed":
                raise self._down(key, e.reason) from None
            log.warning("budget key %r: shared store down, call let through unmetered "
                        "(budgets_on_outage = fail-open); its spend is recorded later", key)
            return Reservation(id=_LOCAL + uuid.uuid4().hex, key=key, period_s=period_s,
                               window=window_of(time.time(), period_s), amount_nusd=amount)
        except BaseException:
            # Cancelled (a deadline, a client gone) with the script sent: the same lost reply,
            # released at the next replay instead of holding money back until it expires.
            self._keep(Reservation(id=rid, key=key, period_s=period_s, window=0,
                                   amount_nusd=amount), 0)
            raise
        if not int(ok):
            raise budget_exceeded(key, int(spent), int(pending), amount, limit, period_s,
                                  int(now_ms) / 1000)
        return Reservation(id=rid, key=key, period_s=period_s, window=int(win),
                           amount_nusd=amount)

    async def _close(self, res: Reservation, charged: int) -> None:
        # Shielded: money spent must be recorded even when the request is cancelled; the
        # connection's own timeout still bounds it.
        with anyio.CancelScope(shield=True):
            await self.replay()
            try:
                await self._send(res, charged)
            except StoreDown as e:
                self._keep(res, charged)
                log.warning("budget key %r: could not record $%.6f in the shared store (%s); "
                            "kept (in %s too) and recorded when it is back", res.key,
                            charged / 1e9, e.reason, self._journal.path)

    async def _send(self, res: Reservation, charged: int) -> None:
        script = self._conn.script("budget_settle", lua.BUDGET_SETTLE)
        keep_ms = int(2 * res.period_s * 1000) + self._ttl_ms
        rid = res.id.removeprefix(_LOCAL)
        await self._conn.run(lambda c: script(
            keys=self._keys(res.key, res.period_s),
            args=[rid, str(res.window), str(charged), keep_ms], client=c))

    def _adopt(self) -> None:
        """Take over the journals of processes that died with settles Redis never saw."""
        self._adopt_at = time.monotonic() + _ADOPT_EVERY_S
        adopted = self._journal.adopt()
        safe = True
        if adopted:
            self._unsettled.extend(adopted)
            safe = self._journal.write(self._replaying + self._unsettled)
        self._journal.forget_adopted(delete=safe)  # orphans go once their entries are safe

    async def replay(self) -> None:
        """Record settles kept while Redis was down (oldest first), stopping at a failure; also
        takes up, once a minute, the journals of processes that closed or died."""
        if time.monotonic() >= self._adopt_at:
            self._adopt()
        if not self._unsettled:
            return
        todo, self._unsettled = self._unsettled, []
        self._replaying = todo
        sent = 0
        try:
            for res, charged in todo:
                await self._send(res, charged)
                sent += 1
        except StoreDown:
            return
        finally:
            # what was not sent (Redis failed, or the request was cancelled) waits for the next
            # try, in front of what was kept meanwhile
            self._unsettled[:0] = todo[sent:]
            self._replaying = []
            if sent:  # the file still holds everything otherwise: no rewrite per request
                self._journal.write(self._unsettled)
        log.warning("recorded %d settle(s) kept while the shared store was down", len(todo))

    async def asettle(self, reservation: Reservation, actual_usd: float) -> None:
        await self._close(reservation, charged_nano(reservation, actual_usd))

    async def arelease(self, reservation: Reservation) -> None:
        if reservation.id.startswith(_LOCAL):
            return  # nothing was held in Redis, nothing was spent
        await self._close(reservation, 0)

    async def _counts(self, key: str, period_s: float) -> tuple[int, int]:
        await self.replay()
        script = self._conn.script("budget_counts", lua.BUDGET_COUNTS)
        try:
            spent, pending = await self._conn.run(lambda c: script(
                keys=self._keys(key, period_s), args=[repr(float(period_s))], client=c))
        except StoreDown as e:
            raise BudgetStoreError(f"the shared budget store {self._conn.cfg.display_url} is "
                                   f"unreachable ({e.reason})") from None
        return int(spent), int(pending)

    async def aspent(self, key: str, period_s: float) -> float:
        return (await self._counts(key, period_s))[0] / 1e9

    async def apending(self, key: str, period_s: float) -> float:
        """Reserved, unsettled spending of ``key`` in the current window."""
        return (await self._counts(key, period_s))[1] / 1e9

    @property
    def unsettled(self) -> int:
        """Settles (and releases of reservations whose reply was lost) waiting in this process
        for Redis to come back."""
        return len(self._unsettled)

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            await self.replay()
        self._journal.close()
        if self._unsettled:
            left = sum(c for _, c in self._unsettled) / 1e9
            log.error("closing with %d settle(s) ($%.6f) the shared store has not acknowledged; "
                      "they stay in %s and the next process using this store records them",
                      len(self._unsettled), left, self._journal.path)
