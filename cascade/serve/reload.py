"""Hot reload of the served config: when to reload (SIGHUP, a changed file) and how it went.

The service reloads its config file on ``SIGHUP`` and when the file (or the router file its
``[router]`` table names) changes. A change is seen by polling each file's modification time,
size and inode every ``[server] reload_poll_s`` seconds (default 1; 0 turns the watch off):
no extra dependency, and it sees an editor's save, a ``cascade tune --out`` rewrite and an
atomic rename alike. A change is acted on once the files have stayed the same for one short
settle interval, so a file caught half-written is not loaded (if it is, the reload fails, the
old config stays, and the finished file is a new change).

:class:`ReloadStatus` is what ``/healthz`` shows under ``config``: the file, when the config
in use was loaded, and the last reload's outcome and error.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import tomllib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

from cascade.config import CascadeConfig, load_config, parse_config
from cascade.errors import ConfigError

__all__ = ["ReloadStatus", "Signature", "config_path", "describe", "now_iso", "on_sighup",
           "parse_text", "read_config", "signature", "watch", "watched_files"]

log = logging.getLogger("cascade.serve")

Signature = tuple[tuple[str, int, int, int] | tuple[str], ...]
"""Per watched file: ``(path, mtime_ns, size, inode)``, or ``(path,)`` when it cannot be read."""

_SETTLE_S = 0.2


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class ReloadStatus:
    """The config in use and how the last reload went (``/healthz`` → ``config``)."""

    source: str | None
    """The config file (None: the service was given a config object, nothing to reload)."""
    loaded_at: str
    """When the config in use was loaded (UTC, ISO 8601)."""
    reloads: int = 0
    """Reloads that swapped a new config in."""
    last_reload_at: str | None = None
    last_reload_trigger: str | None = None
    """``"sighup"``, ``"file changed"``, ``"api"`` (a call of ``Service.reload``), or
    ``"worker start"``: a worker (re)started by ``cascade serve --workers N`` found the file
    bad and serves the last config that loaded, as its siblings do."""
    last_reload_outcome: str | None = None
    """``"ok"`` or ``"error"`` (the old config kept serving)."""
    last_reload_error: str | None = None
    """Why the last reload was refused; None once one succeeds."""

    def succeeded(self, trigger: str) -> None:
        self.reloads += 1
        self.loaded_at = self.last_reload_at = now_iso()
        self.last_reload_trigger, self.last_reload_outcome = trigger, "ok"
        self.last_reload_error = None

    def failed(self, trigger: str, error: BaseException) -> None:
        self.last_reload_at = now_iso()
        self.last_reload_trigger, self.last_reload_outcome = trigger, "error"
        self.last_reload_error = describe(error)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "loaded_at": self.loaded_at, "reloads": self.reloads,
                "last_reload_at": self.last_reload_at,
                "last_reload_trigger": self.last_reload_trigger,
                "last_reload_outcome": self.last_reload_outcome,
                "last_reload_error": self.last_reload_error}


def describe(error: BaseException) -> str:
    """One line saying why a config did not load (a ConfigError already names file and key)."""
    from cascade.errors import CascadeError

    text = str(error) or type(error).__name__
    return text if isinstance(error, CascadeError) else f"{type(error).__name__}: {text}"


def config_path(given: str | os.PathLike[str]) -> Path:
    """The config file as given, made absolute but with its symlinks kept: a Kubernetes
    ConfigMap is ``cascade.toml -> ..data/cascade.toml`` with ``..data`` swapped to a new
    directory on each update (the old one deleted), so the resolved path would go stale."""
    return Path(os.path.abspath(os.path.expanduser(given)))


def read_config(path: Path) -> tuple[CascadeConfig, str]:
    """``load_config(path)``, and the text it was parsed from (what ``cascade serve --workers
    N`` keeps of the last file that loaded)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        load_config(path)  # raises the error it words for an unreadable file
        raise  # readable again a moment later: still this read's error
    return parse_text(text, path), text


def parse_text(text: str, source: Path) -> CascadeConfig:
    """A config file's text, parsed as if read from ``source`` (relative paths in it, and its
    errors, are the file's)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"not valid TOML: {e}", source=str(source)) from None
    return parse_config(data, source=str(source))


def watched_files(path: Path, config: CascadeConfig) -> tuple[Path, ...]:
    """The config file, and the router file its ``[router] path`` names (relative to it)."""
    files = [path]
    router = config.router.get("path") if config.router else None
    if isinstance(router, str) and router:
        p = Path(router).expanduser()
        files.append(p if p.is_absolute() else path.parent / p)
    return tuple(files)


def signature(files: Sequence[Path]) -> Signature:
    out: list[tuple[str, int, int, int] | tuple[str]] = []
    for f in files:
        try:
            st = os.stat(f)
        except OSError:
            out.append((str(f),))
            continue
        out.append((str(f), st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


async def watch(files: Callable[[], Sequence[Path]], interval_s: Callable[[], float],
                on_change: Callable[[], Awaitable[object]]) -> None:
    """Call ``on_change`` each time the files' signature changes (and then settles); runs
    until cancelled. ``files`` and ``interval_s`` are asked again after each change (a reload
    may name another router file or poll at another pace; an interval of 0 pauses the watch
    until a SIGHUP reload sets another)."""
    watched = tuple(files())
    seen = signature(watched)
    while True:
        every = interval_s()
        if every <= 0:
            await anyio.sleep(1.0)
            watched = tuple(files())
            seen = signature(watched)
            continue
        await anyio.sleep(every)
        now = signature(watched)
        if now == seen:
            continue
        while True:  # still being written: wait until it holds still
            await anyio.sleep(min(_SETTLE_S, every))
            settled = signature(watched)
            if settled == now:
                break
            now = settled
        await on_change()
        # What was loaded is what settled; a change made during the reload is a new change.
        before, watched = watched, tuple(files())
        seen = now if watched == before else signature(watched)


async def on_sighup(handler: Callable[[], Awaitable[object]]) -> None:
    """Call ``handler`` on each SIGHUP; runs until cancelled. Signals reach only the main
    thread: elsewhere (an app served from a test's thread) this returns at once."""
    if not hasattr(signal, "SIGHUP") or threading.current_thread() is not threading.main_thread():
        return
    with anyio.open_signal_receiver(signal.SIGHUP) as signals:
        async for _ in signals:
            await handler()
