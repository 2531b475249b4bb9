"""Settles Redis has not acknowledged, kept on local disk so a process that dies during an
outage does not take money already spent with it.

Each process has its own pair of files in ``[store] journal_dir``: ``<store>-<pid>-<random>.lock``,
on which it holds an exclusive ``flock`` while it lives, and ``<...>.jsonl``, the settles waiting
for Redis: each kept settle is one appended line, and after a replay the file is replaced whole
(written beside it, renamed over it) with what is still waiting. Writes go to the page cache,
not to the platter (no fsync on the request path): the journal survives the process, not a
power cut. Both exist only while something waits. A process that finds a lock file of the
same store whose lock it can take (its owner died: the kernel dropped the lock) adopts the
entries, writes them into its own file first, then deletes the orphan, and replays them with
its own. A settle replayed twice counts once (Redis remembers settled ids for two budget
periods), so a crash between any two of those steps loses nothing and double-counts nothing.
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
        stem = f"{store}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.path = directory / f"{stem}.jsonl"
        self._lock_path = directory / f"{stem}.lock"
        self._lock: IO[bytes] | None = None
        self._data: IO[str] | None = None
        """The file opened for appending, while it is this one (a replace makes a new one)."""
        self._claimed: list[tuple[Path, IO[bytes]]] = []
        """Adopted owners' lock files, still locked so no other process adopts them too."""
        self._failing = False

    def append(self, entries: list[Entry]) -> bool:
        """Add entries at the end of the file: one short write, whatever the file holds (a
        line cut short by a crash is skipped on adoption). False (logged once per failure
        spell) if the disk refused."""
        try:
            self._hold_lock()
            if self._data is None:
                self._data = self.path.open("a", encoding="utf-8")
            self._data.write(_encode(entries))
            self._data.flush()
        except OSError as e:
            return self._failed(e)
        self._failing = False
        return True

    def write(self, entries: list[Entry]) -> bool:
        """Make the file hold exactly ``entries`` (none: the files are removed), replaced whole
        so a crash leaves the old file or the new one, never half of one."""
        if not entries:
            self._drop()
            return True
        tmp = self.path.with_suffix(".tmp")
        try:
            self._hold_lock()
            tmp.write_text(_encode(entries), encoding="utf-8")
            if self._data is not None:
                self._data.close()
                self._data = None
            os.replace(tmp, self.path)
        except OSError as e:
            return self._failed(e)
        self._failing = False
        return True

    def _failed(self, e: OSError) -> bool:
        if not self._failing:
            log.error("could not write the budget journal %s (%s): unacknowledged settles are "
                      "kept in memory only", self.path, e)
        self._failing = True
        return False

    def adopt(self) -> list[Entry]:
        """Entries of this store's files whose owners died. Their locks stay held until
        :meth:`forget_adopted`, which the caller runs once the entries are in its own file."""
        if fcntl is None or not self.directory.is_dir():
            return []
        found: list[Entry] = []
        for lock_path in sorted(self.directory.glob(f"{self._store}-*.lock")):
            if lock_path == self._lock_path:
                continue
            try:
                f = lock_path.open("rb")
            except OSError:
                continue  # removed meanwhile by its owner or another adopter
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                if os.fstat(f.fileno()).st_nlink == 0:
                    raise FileNotFoundError(lock_path)  # its owner just removed it
            except OSError:  # locked: its owner is alive (or another process adopts it)
                f.close()
                continue
            data = lock_path.with_suffix(".jsonl")
            try:
                entries = _decode(data.read_text(encoding="utf-8"), data)
            except FileNotFoundError:
                entries = []  # its owner died before writing anything: only the lock is left
            except OSError:
                f.close()
                continue
            found.extend(entries)
            self._claimed.append((lock_path, f))
            if entries:
                log.warning("adopted %d unacknowledged settle(s) from %s, left by a process "
                            "that stopped while the shared store was down", len(entries), data)
        return found

    def forget_adopted(self, *, delete: bool = True) -> None:
        """Delete the adopted files, now that their entries are safe in this one (or, with
        ``delete=False``, only unlock them, for a later try)."""
        for lock_path, f in self._claimed:
            if delete:
                _remove(lock_path)
            f.close()
        self._claimed = []

    def close(self) -> None:
        """Release the lock (the file stays if it holds entries, for the next process)."""
        self.forget_adopted(delete=False)
        if self._data is not None:
            self._data.close()
            self._data = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _hold_lock(self) -> None:
        while self._lock is None:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            f = os.fdopen(fd, "r+b")
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            if os.fstat(f.fileno()).st_nlink == 0:
                f.close()  # an adopter took it for an orphan before our lock: make it anew
                continue
            self._lock = f

    def _drop(self) -> None:
        if self._lock is not None:
            _remove(self._lock_path)
            self.close()


def _remove(lock_path: Path) -> None:
    """One journal's files, the data first: a lock file left without data by a crash here is
    only an empty orphan, which the next adopter cleans up."""
    for path in (lock_path.with_suffix(".jsonl"), lock_path.with_suffix(".tmp"), lock_path):
        with contextlib.suppress(OSError):
            path.unlink()
