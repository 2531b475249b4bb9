"""A private event loop on a daemon thread: the sync API's home, and the shadow checks'.

Not ``anyio.from_thread.start_blocking_portal``: its executor thread is joined at interpreter
exit, so a program that never called ``close()`` would hang there.

Fork-safe: a child forked after the loop started (gunicorn ``--preload``, celery's prefork,
multiprocessing's ``fork``) inherits the portal but not its thread, so every call there would
wait for ever; the child starts a loop of its own instead.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import threading
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import TypeVar

import anyio
import anyio.from_thread

__all__ = ["LoopEnd", "LoopThread"]

T = TypeVar("T")


class LoopEnd:
    """Runs ``close()`` on the current event loop as it ends: ``asyncio.run``, ``anyio.run``
    and ``trio.run`` finalize the async generators still open then, on the loop, so one
    started here and left suspended is told. Clients bound to a loop (SDK connection pools)
    are closed on it instead of leaking a socket per ``asyncio.run``. Keep this object
    referenced (loops hold their generators weakly); :meth:`disarm` when closed otherwise,
    or the generator's own finalization would run ``close()`` again later."""

    def __init__(self, close: Callable[[], Awaitable[None]]) -> None:
        self._close: Callable[[], Awaitable[None]] | None = close
        self._agen = self._watch()
        step = self._agen.asend(None)  # the loop's first-iteration hook registers it now
        with contextlib.suppress(StopIteration):
            step.send(None)  # up to the yield, no await on the way: done synchronously

    async def _watch(self) -> AsyncGenerator[None, None]:
        try:
            yield
        finally:
            close, self._close = self._close, None
            if close is not None:
                await close()

    def disarm(self) -> None:
        self._close = None


class LoopThread:
    """Started on first use; ``stop()`` cancels what runs there and joins the thread."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._portal: anyio.from_thread.BlockingPortal | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def _forget_if_forked(self) -> None:
        """In a forked child: forget the parent's loop (its thread does not exist here, so a
        call or a stop there would wait for ever) and a lock a thread may have held at the
        fork."""
        if self._pid != os.getpid():
            self._lock = threading.Lock()
            self._portal = self._thread = None
            self._pid = os.getpid()

    @property
    def running(self) -> bool:
        self._forget_if_forked()
        return self._portal is not None

    def portal(self) -> anyio.from_thread.BlockingPortal:
        self._forget_if_forked()
        with self._lock:
            if self._portal is None:
                ready = threading.Event()
                box: list[anyio.from_thread.BlockingPortal] = []

                async def serve() -> None:
                    async with anyio.from_thread.BlockingPortal() as portal:
                        box.append(portal)
                        ready.set()
                        await portal.sleep_until_stopped()

                thread = threading.Thread(target=anyio.run, args=(serve,), daemon=True,
                                          name=self.name)
                thread.start()
                ready.wait()
                self._portal, self._thread = box[0], thread
            return self._portal

    def submit(self, fn: Callable[[], Awaitable[T]]) -> concurrent.futures.Future[T]:
        """Start ``fn()`` on the loop; a Future for its result."""
        return self.portal().start_task_soon(fn)

    def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn()`` on the loop and wait for it; Ctrl-C cancels it there."""
        future = self.submit(fn)
        try:
            return future.result()
        except KeyboardInterrupt:
            future.cancel()
            concurrent.futures.wait([future], timeout=5)
            raise

    def stop(self, before: Callable[[], Awaitable[None]] | None = None) -> None:
        """Run ``before()`` on the loop (e.g. closing its connections), then stop it: tasks
        still running there are cancelled."""
        self._forget_if_forked()
        with self._lock:
            portal, thread = self._portal, self._thread
            self._portal = self._thread = None
        try:
            if portal is not None:
                try:
                    if before is not None:
                        portal.call(before)
                finally:  # a failing ``before`` must not leave the loop and its thread running
                    portal.call(portal.stop, True)
        finally:
            if thread is not None:
                thread.join(10)
