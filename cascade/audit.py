"""The audit log: one JSON line per request, per shadow check and per feedback, off the path.

Lines are queued by the request (``put_nowait`` on a bounded queue, so a request never waits
for the disk) and written by one background thread. When the queue is full the line is dropped
and counted (:attr:`AuditLog.dropped`, ``cascade_audit_dropped_total`` in ``/metrics``, a
warning in the process log and a ``"dropped"`` line in the audit log itself once the writer
catches up). The file is only ever appended to and is rotated by size
(``PATH`` → ``PATH.1`` → … → ``PATH.<backups>``); an ``flock`` on ``PATH.lock`` makes the
size check, the rotation and the append one step, so several server workers can share a path.

Every line is keyed by ``request_id`` and has a ``type``: ``"answer"``, ``"shadow"`` or
``"feedback"``. Secrets never enter a line: the values of the environment variables named in
``secret_envs`` (API keys, client keys) are cut from every line, raw and JSON-escaped, before it
is written.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import queue
import stat
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cascade.messages import Request
from cascade.secrets import Redactor
from cascade.trace import Answer, Attempt

__all__ = ["AuditLog", "messages_hash"]

log = logging.getLogger("cascade.audit")

_STOP = object()


def messages_hash(request: Request) -> str:
    """SHA-256 of the request's messages (canonical JSON): what a redacted line keeps, so equal
    prompts can still be grouped without storing them."""
    raw = json.dumps([m.to_dict() for m in request.messages], sort_keys=True,
                     separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(raw.encode()).hexdigest()


def _dumps(line: Any) -> str:
    return json.dumps(line, ensure_ascii=False, default=str, separators=(",", ":"))


def _plain(value: Any) -> Any:
    """``value`` with every mapping's keys as strings (JSON takes no other keys)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _request_id(request: Request, answer: Answer | None, error: BaseException | None) -> str:
    """The id the line is keyed by: the answer's, else the request's own (the engine gives
    every request one), else the one an error carries."""
    if answer is not None and answer.request_id:
        return answer.request_id
    traced = getattr(error, "answer", None)
    for rid in (request.id, getattr(traced, "request_id", None),
                getattr(error, "request_id", None)):
        if isinstance(rid, str) and rid:
            return rid
    return uuid.uuid4().hex  # a Request built by hand, outside the engine


class AuditLog:
    """An append-only JSON-lines audit log written by a background thread; an observer."""

    def __init__(self, path: str | os.PathLike[str], *, redact: bool = False,
                 max_bytes: int = 100 * 2**20, backups: int = 5, queue_size: int = 10_000,
                 ladder: str = "cascade", secret_envs: Iterable[str] = ()) -> None:
        if max_bytes < 1 or backups < 0 or queue_size < 1:
            raise ValueError("max_bytes and queue_size must be >= 1, backups >= 0")
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.redact = redact
        self.max_bytes = max_bytes
        self.backups = backups
        self.ladder = ladder
        self._redact = Redactor(secret_envs, json_escaped=True)
        self._queue: queue.Queue[object] = queue.Queue(maxsize=queue_size)
        self._dropped = 0
        self._reported = 0
        self._lock = threading.Lock()
        # A pipe, FIFO or terminal (``/dev/stdout`` for a log shipper) cannot be sized or
        # seeked: it is appended to as it is, never rotated, and needs no lock file beside it.
        self._stream = self.path.exists() and not stat.S_ISREG(self.path.stat().st_mode)
        self._lockfile = None if self._stream else open(  # noqa: SIM115 (held for its lifetime)
            f"{self.path}.lock", "a")
        self._pipe: Any = None
        """The stream, opened once by the writer: closing a FIFO after each batch would end
        its reader's input (EOF), and the next open would block with no reader."""
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="cascade-audit", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ observer

    def on_answer(self, request: Request, answer: Answer | None,
                  error: BaseException | None) -> None:
        traced = answer if answer is not None else getattr(error, "answer", None)
        line: dict[str, Any] = {
            "type": "answer",
            "request_id": _request_id(request, answer, error),
            "timestamp": _now(),
            "client": request.metadata.get("client"),
            "ladder": request.metadata.get("ladder", self.ladder),
        }
        if self.redact:
            line["messages_sha256"] = messages_hash(request)
        else:
            line["messages"] = [m.to_dict() for m in request.messages]
        trace = traced.to_dict() if isinstance(traced, Answer) else None
        line.update(
            trace=trace,
            answer=answer.text if answer is not None else None,
            verified=answer.verified if answer is not None else False,
            cost_usd=traced.cost_usd if isinstance(traced, Answer) else 0.0,
            latency_ms=traced.latency_ms if isinstance(traced, Answer) else None,
            error=None if error is None else {"type": type(error).__name__,
                                               "message": str(error)},
        )
        self._put(line)

    def on_shadow(self, request: Request, accepted: Attempt, shadow: Attempt,
                  agreed: bool | None) -> None:
        self._put({
            "type": "shadow",
            "request_id": _request_id(request, None, None),
            "timestamp": _now(),
            "client": request.metadata.get("client"),
            "ladder": request.metadata.get("ladder", self.ladder),
            "rung": accepted.name or accepted.model,
            "agreed": agreed,
            "accepted": accepted.to_dict(),
            "shadow": shadow.to_dict(),
        })

    def feedback(self, request_id: str, correct: bool, expected: str | None = None,
                 client: str | None = None) -> None:
        """Record a user's judgement of an answer (``cascade suite from-log`` reads it as a
        label)."""
        if not isinstance(request_id, str) or not request_id:
            raise ValueError("request_id must be a non-empty string")
        self._put({"type": "feedback", "request_id": request_id, "timestamp": _now(),
                   "client": client, "correct": bool(correct), "expected": expected})

    # ------------------------------------------------------------------ queue and writer

    @property
    def dropped(self) -> int:
        """Lines dropped: the queue was full (the disk could not keep up), or a write failed."""
        return self._dropped

    def _put(self, line: Mapping[str, Any]) -> None:
        if self._closed:
            self._count_drop("the audit log is closed")
            return
        try:
            self._queue.put_nowait(line)
        except queue.Full:
            self._count_drop("the queue is full")

    def _count_drop(self, why: str, lines: int = 1) -> None:
        with self._lock:
            before = self._dropped
            self._dropped += lines
            n = self._dropped
        if before == 0 or n // 1000 > before // 1000:
            log.warning("audit log %s: dropped %d line(s) so far (%s)", self.path, n, why)

    def _encode(self, line: Mapping[str, Any]) -> str:
        """One line of JSON, whatever the request carried: keys JSON cannot take become
        strings, and a line that still cannot be written keeps its type, id and why."""
        try:
            text = _dumps(line)
        except (TypeError, ValueError, RecursionError):
            try:
                text = _dumps(_plain(line))
            except (TypeError, ValueError, RecursionError) as e:
                text = _dumps({"type": line.get("type"), "request_id": line.get("request_id"),
                               "timestamp": line.get("timestamp"),
                               "unencodable": f"{type(e).__name__}: {e}"})
        text = self._redact(text)
        return text + "\n"

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            batch = [first]
            with contextlib.suppress(queue.Empty):
                while len(batch) < 1000:
                    batch.append(self._queue.get_nowait())
            stop = any(item is _STOP for item in batch)
            lines: list[str] = []
            missed = 0
            try:
                lines = [self._encode(item) for item in batch  # type: ignore[arg-type]
                         if item is not _STOP]
                with self._lock:
                    missed = self._dropped - self._reported
                    self._reported = self._dropped
                if missed:
                    lines.append(self._encode({"type": "dropped", "timestamp": _now(),
                                               "dropped": missed,
                                               "dropped_total": self._reported}))
                if lines:
                    self._write("".join(lines))
            except Exception:  # the writer outlives any one batch: later lines still go out
                log.exception("audit log %s: could not write %d line(s)", self.path, len(lines))
                with self._lock:  # the summary line was lost too: the next batch says it
                    self._reported -= missed
                self._count_drop("a write failed", len(lines) - (1 if missed else 0))
            finally:
                for _ in batch:
                    self._queue.task_done()
            if stop:
                return

    def _write(self, data: str) -> None:
        # A lone surrogate (a model's reply may carry "\ud800") can only sit inside a JSON
        # string here, where backslashreplace writes it as that very JSON escape: the line
        # stays valid JSON and UTF-8, and the batch is not lost to an encoding error.
        raw = data.encode("utf-8", "backslashreplace")
        if self._lockfile is None:
            if self._pipe is None:
                self._pipe = open(self.path, "ab", buffering=0)  # noqa: SIM115 (kept open)
            try:
                self._pipe.write(raw)
            except OSError:  # the reader went away: open anew (for the next one) next time
                with contextlib.suppress(OSError):
                    self._pipe.close()
                self._pipe = None
                raise
            return
        fcntl.flock(self._lockfile, fcntl.LOCK_EX)
        try:
            size = self.path.stat().st_size if self.path.exists() else 0
            if size and size + len(raw) > self.max_bytes:
                self._rotate()
            with open(self.path, "ab+") as f:  # appends wherever it reads
                if not self._ends_line(f):
                    # another worker was killed mid-line: close it, or ours is glued onto it
                    raw = b"\n" + raw
                f.write(raw)
        finally:
            fcntl.flock(self._lockfile, fcntl.LOCK_UN)

    @staticmethod
    def _ends_line(f: Any) -> bool:
        """Whether the file is empty or its last byte ends a line."""
        if f.seek(0, os.SEEK_END) == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return bool(f.read(1) == b"\n")

    def _rotate(self) -> None:
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
            return
        for i in range(self.backups - 1, 0, -1):
            src = Path(f"{self.path}.{i}")
            if src.exists():
                src.replace(f"{self.path}.{i + 1}")
        self.path.replace(f"{self.path}.1")

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every queued line is on disk; False if that took longer than
        ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued, then stop the writer thread."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(queue.Full):
            self._queue.put(_STOP, timeout=timeout_s)
        self._thread.join(timeout_s)
        if self._lockfile is not None:
            self._lockfile.close()
        if self._pipe is not None and not self._thread.is_alive():
            with contextlib.suppress(OSError):
                self._pipe.close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
