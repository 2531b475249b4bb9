"""The verified-answer disk cache.

Only verified answers are stored. The key is a SHA-256 over everything that changes the answer:
normalised messages, the output schema, the ladder's models and parameters, and the verifier
configuration with thresholds. Values are JSON (``diskcache.JSONDisk``), never pickle, and carry
their own key and a checksum, so a damaged or misplaced entry is dropped, never served.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sqlite3
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import diskcache
import platformdirs

from cascade.errors import CacheError
from cascade.trace import Answer

__all__ = ["AnswerCache", "cache_key", "default_cache_dir"]

log = logging.getLogger("cascade")
_FORMAT = 1


def default_cache_dir() -> Path:
    """``$CASCADE_CACHE_DIR``, else the platform's user cache dir."""
    env = os.environ.get("CASCADE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_cache_dir("verified-cascade"))


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def cache_key(parts: Mapping[str, Any]) -> str:
    """A stable key: SHA-256 of the canonical JSON of ``parts`` plus the entry format version."""
    return hashlib.sha256(_canonical({"format": _FORMAT, **parts}).encode()).hexdigest()


def _checksum(key: str, body: str) -> str:
    return hashlib.sha256(f"{key}\n{body}".encode()).hexdigest()


class AnswerCache:
    """A process- and thread-safe store of verified answers on disk (SQLite under diskcache)."""

    def __init__(self, directory: str | os.PathLike[str] | None = None, *,
                 ttl_s: float | None = None, size_limit_mb: float = 1024.0,
                 timeout_s: float = 10.0) -> None:
        self.directory = Path(directory).expanduser() if directory else default_cache_dir()
        self.ttl_s = ttl_s
        self._size_limit = int(size_limit_mb * 1024 * 1024)
        self._timeout_s = timeout_s
        self._cache: diskcache.Cache | None = None

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except CacheError:
            raise
        except diskcache.Timeout:
            raise CacheError(
                f"the answer cache at {self.directory} is locked by another process "
                f"({action} waited {self._timeout_s:g}s); retry, or use cache=False"
            ) from None
        except sqlite3.OperationalError as e:
            if "locked" in str(e) or "busy" in str(e):
                raise CacheError(
                    f"the answer cache at {self.directory} is locked ({action}): {e}; "
                    "retry, or use cache=False"
                ) from None
            raise CacheError(
                f"the answer cache at {self.directory} cannot be used ({action}): {e}; "
                f"run `cascade cache clear` or delete the directory"
            ) from None
        except sqlite3.DatabaseError as e:
            raise CacheError(
                f"the answer cache at {self.directory} is corrupt ({e}); "
                f"run `cascade cache clear --force` or delete the directory to rebuild it"
            ) from None
        except OSError as e:
            raise CacheError(
                f"the answer cache at {self.directory} is not usable ({action}): {e.strerror}"
            ) from None

    @property
    def _db(self) -> diskcache.Cache:
        if self._cache is None:
            with self._errors("open"):
                self.directory.mkdir(parents=True, exist_ok=True)
                self._cache = diskcache.Cache(
                    str(self.directory),
                    disk=diskcache.JSONDisk,
                    size_limit=self._size_limit,
                    timeout=self._timeout_s,
                    eviction_policy="least-recently-stored",
                )
        return self._cache

    def get(self, key: str) -> Answer | None:
        """The stored answer for ``key``, or None. Damaged entries are deleted and missed."""
        with self._errors("read"):
            raw = self._db.get(key, default=None)
        if raw is None:
            return None
        try:
            if not isinstance(raw, dict) or raw.get("key") != key:
                raise ValueError("entry does not belong to this key")
            body = raw["answer"]
            if _checksum(key, body) != raw["checksum"]:
                raise ValueError("checksum mismatch")
            answer = Answer.from_dict(json.loads(body))
            if not answer.verified:
                raise ValueError("entry holds an unverified answer")
        except (KeyError, TypeError, ValueError) as e:
            log.warning("cache entry %s… in %s was damaged (%s): dropped", key[:12],
                        self.directory, e)
            with self._errors("delete"):
                self._db.delete(key)
            return None
        return answer

    def set(self, key: str, answer: Answer) -> None:
        """Store a verified answer. Refuses unverified ones: they must never be served."""
        if not answer.verified:
            raise ValueError("only verified answers are cached")
        body = _canonical({**answer.to_dict(), "cache_hit": False})
        entry = {"key": key, "checksum": _checksum(key, body), "answer": body}
        with self._errors("write"):
            self._db.set(key, entry, expire=self.ttl_s)

    def clear(self) -> int:
        with self._errors("clear"):
            return int(self._db.clear(retry=True))

    def stats(self) -> dict[str, Any]:
        with self._errors("stats"):
            db = self._db
            hits, misses = db.stats()
            return {
                "directory": str(self.directory),
                "entries": len(db),
                "size_bytes": int(db.volume()),
                "size_limit_bytes": self._size_limit,
                "ttl_s": self.ttl_s,
                "hits": hits,
                "misses": misses,
            }

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
            self._cache = None
