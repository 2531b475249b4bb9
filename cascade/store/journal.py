"""Settles Redis has not acknowledged, kept on local disk so a process that dies during an
outage does not take money already spent with it.

Each process writes its own file, ``<store>-<pid>-<random>.jsonl`` in ``[store] journal_dir``,
and holds an exclusive ``flock`` on it while it lives; the file exists only while something is
waiting for Redis. A process that finds a file of the same store whose lock it can take (its
writer died: the kernel dropped the lock) adopts the entries, copies them into its own file
first, then deletes the orphan, and replays them with its own. A settle replayed twice counts
once (Redis remembers settled ids), so a crash between any two of those steps loses nothing
and double-counts nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: files are kept, never adopted
    fcntl = None  # type: ignore[assignment]

from cascade.budget import Reservation

__all__ = ["Journal", "store_id"]

log = logging.getLogger("cascade")

Entry = tuple[Reservation, int]
"""A reservation and the nano-dollars it is to be settled at (0: a release)."""


def store_id(url: str, key_prefix: str) -> str:
    """Which shared store a journal belongs to (files of another store are never adopted)."""
    return hashlib.sha256(f"{url}\n{key_prefix}".encode()).hexdigest()[:16]


def _encode(entries: Iterable[Entry]) -> str:
    return "".join(json.dumps({
        "id": r.id, "key": r.key, "period_s": r.period_s, "window": r.window,
        "amount_nusd": r.amount_nusd, "charged_nusd": c}, separators=(",", ":")) + "\n"
        for r, c in entries)


def _decode(text: str, path: Path) -> list[Entry]:
    out: list[Entry] = []
    for line in text.splitlines():
        try:
            d = json.loads(line)
            res = Reservation(id=str(d["id"]), key=str(d["key"]),
                              period_s=float(d["period_s"]), window=int(d["window"]),
                              amount_nusd=int(d["amount_nusd"]))
            charged = int(d["charged_nusd"])
        except (ValueError, KeyError, TypeError):
            # a line cut short by the crash that orphaned the file: the rest still counts
            log.warning("skipped a damaged line of the budget journal %s", path)
            continue
        out.append((res, charged))
    return out


class Journal:
    """This process's file of unacknowledged settles, and adoption of dead processes' files."""

    def __init__(self, directory: Path, store: str) -> None:
        self.directory = directory
        self._store = store
        self.path = self._path = directory / f"{store}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        self._file: IO[str] | None = None
        self._claimed: list[tuple[Path, IO[str]]] = []
        self._failing = False
        """Adopted files, still locked so no other process adopts them too."""

    def write(self, entries: list[Entry]) -> bool:
        """Make the file hold exactly ``entries`` (none: the file is removed), durably; False
        (logged) if the disk refused."""
        if not entries:
            self._drop()
            return True
        try:
            f = self._open()
            f.seek(0)
            f.truncate()
            f.write(_encode(entries))
            f.flush()
            os.fsync(f.fileno())
        except OSError as e:
            if not self._failing:  # once per outage of the disk, not once per settle
                log.error("could not write the budget journal %s (%s): unacknowledged settles "
                          "are kept in memory only", self._path, e)
            self._failing = True
            return False
        self._failing = False
        return True

    def adopt(self) -> list[Entry]:
        """Entries of this store's files whose writers died. The files stay locked until
        :meth:`forget_adopted`, which the caller runs once the entries are in its own file."""
        if fcntl is None or not self.directory.is_dir():
            return []
        found: list[Entry] = []
        for path in sorted(self.directory.glob(f"{self._store}-*.jsonl")):
            if path == self._path:
                continue
            try:
                f = path.open("r", encoding="utf-8")
            except OSError:
                continue  # removed meanwhile by its writer or another adopter
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                if os.fstat(f.fileno()).st_nlink == 0:
                    raise FileNotFoundError(path)  # emptied and removed just now
                entries = _decode(f.read(), path)
            except OSError:  # locked: its writer is alive (or another process adopts it)
                f.close()
                continue
            found.extend(entries)
            self._claimed.append((path, f))
            log.warning("adopted %d unacknowledged settle(s) from %s, left by a process that "
                        "stopped while the shared store was down", len(entries), path)
        return found

    def forget_adopted(self, *, delete: bool = True) -> None:
        """Delete the adopted files, now that their entries are safe in this one (or, with
        ``delete=False``, only unlock them, for a later try)."""
        for path, f in self._claimed:
            if delete:
                with contextlib.suppress(OSError):
                    path.unlink()
            f.close()
        self._claimed = []

    def close(self) -> None:
        """Release the file (kept if it holds entries, for the next process to adopt)."""
        self.forget_adopted(delete=False)
        if self._file is not None:
            self._file.close()
            self._file = None

    def _open(self) -> IO[str]:
        if self._file is None:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
            f = os.fdopen(fd, "r+", encoding="utf-8")
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            self._file = f
        return self._file

    def _drop(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._path.unlink()
            self.close()

