"""The verified-answer disk cache, and the entry format every cache store shares.

Only verified answers are stored. The key is a SHA-256 over everything that changes the answer:
normalised messages, the output schema, the ladder's models and parameters, and the verifier
configuration with thresholds. Values are JSON (``diskcache.JSONDisk``), never pickle, and carry
their own key and an HMAC-SHA256 under a secret created with the cache, so an entry that is
damaged, misplaced, copied from another cache or forged without the secret is dropped, never
served. :func:`pack_entry` / :func:`unpack_entry` are the one encoding, used by the disk cache
and by the Redis store alike.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import shutil
import sqlite3
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import diskcache
import platformdirs

from cascade.errors import CacheError, ConfigError
from cascade.trace import Answer

__all__ = [
    "MAX_SIZE_LIMIT_MB",
    "SECRET_FILE",
    "AnswerCache",
    "DamagedEntry",
    "cache_key",
    "check_size_limit",
    "default_cache_dir",
    "pack_entry",
    "unpack_entry",
]

log = logging.getLogger("cascade")
_FORMAT = 1
MAX_SIZE_LIMIT_MB = 1e9
"""The largest ``size_limit_mb`` accepted (1 PB); diskcache keeps the limit as a 64-bit int."""
SECRET_FILE = "cascade-secret"
"""The per-cache HMAC secret, created (mode 0600) with the cache directory."""
_DB_FILES = {"cache.db", "cache.db-wal", "cache.db-shm", SECRET_FILE}
_VALUE_FILE = re.compile(r"[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{28}\.val")
_TMP_SECRET = re.compile(rf"\.{SECRET_FILE}\.[0-9a-f]{{16}}")


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


class DamagedEntry(ValueError):
    """A stored entry that must not be served (wrong key, bad MAC, unverified, unreadable)."""


def _mac(secret: bytes, key: str, body: str) -> str:
    return hmac.new(secret, f"{key}\n{body}".encode(), hashlib.sha256).hexdigest()


def pack_entry(key: str, answer: Answer, secret: bytes) -> dict[str, str]:
    """The stored form of a verified answer: its key, its JSON body and the body's HMAC."""
    if not answer.verified:
        raise ValueError("only verified answers are cached")
    # Not the metadata: it is the request's own (a hit gets its own request's), and
    # whatever a caller put there (a key JSON cannot encode) must not cost a paid answer.
    body = _canonical({**answer.to_dict(), "cache_hit": False, "metadata": {}})
    return {"key": key, "mac": _mac(secret, key, body), "answer": body}


def unpack_entry(key: str, raw: Any, secret: bytes) -> Answer:
    """The answer in a stored entry (a dict, or its JSON text), or :class:`DamagedEntry`."""
    try:
        if isinstance(raw, (str, bytes)):
            raw = json.loads(raw)
        if not isinstance(raw, dict) or raw.get("key") != key:
            raise DamagedEntry("entry does not belong to this key")
        body, mac = raw.get("answer"), raw.get("mac")
        if not isinstance(body, str) or not isinstance(mac, str):
            raise DamagedEntry("entry has no body or no MAC")
        if not hmac.compare_digest(_mac(secret, key, body), mac):
            raise DamagedEntry("MAC mismatch (damaged, or not written by this cache)")
        answer = Answer.from_dict(json.loads(body))
    except DamagedEntry:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # JSON / shape errors
        raise DamagedEntry(f"unreadable entry: {e}") from None
    if not answer.verified:
        raise DamagedEntry("entry holds an unverified answer")
    return answer


def _load_secret(directory: Path) -> bytes:
    """The cache's HMAC secret, created atomically on first use (``os.link`` cannot clobber a
    secret another process created at the same moment)."""
    path = directory / SECRET_FILE
    try:
        return _secret_of(path.read_text(encoding="ascii"))
    except FileNotFoundError:
        pass
    tmp = directory / f".{SECRET_FILE}.{secrets.token_hex(8)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(secrets.token_hex(32))
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return _secret_of(path.read_text(encoding="ascii"))


_SECRET_BYTES = 32


def _secret_of(text: str) -> bytes:
    """The secret a ``cascade-secret`` file holds. An empty or truncated one is refused (a
    ValueError, read as a damaged secret): as an HMAC key it would let anyone forge entries."""
    secret = bytes.fromhex(text.strip())
    if len(secret) < _SECRET_BYTES:
        raise ValueError(f"{len(secret)} bytes, expected {_SECRET_BYTES}")
    return secret


def check_size_limit(size_limit_mb: float) -> None:
    """``cache.size_limit_mb`` must be a positive, storable number of megabytes."""
    if not (0 < size_limit_mb <= MAX_SIZE_LIMIT_MB):
        raise ConfigError(f"must be > 0 and at most {MAX_SIZE_LIMIT_MB:g}, got {size_limit_mb}",
                          key="cache.size_limit_mb")


class AnswerCache:
    """A process- and thread-safe store of verified answers on disk (SQLite under diskcache)."""

    def __init__(self, directory: str | os.PathLike[str] | None = None, *,
                 ttl_s: float | None = None, size_limit_mb: float = 1024.0,
                 timeout_s: float = 10.0) -> None:
        check_size_limit(size_limit_mb)
        self.directory = Path(directory).expanduser() if directory else default_cache_dir()
        self.ttl_s = ttl_s
        self._size_limit = int(size_limit_mb * 1024 * 1024)
        self._timeout_s = timeout_s
        self._cache: diskcache.Cache | None = None
        self._secret: bytes | None = None

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
                f"the answer cache at {self.directory} is not usable ({action}): "
                f"{e.strerror or e}"
            ) from None
        except ValueError as e:  # a secret file that is not hex
            raise CacheError(
                f"the answer cache at {self.directory} has a damaged {SECRET_FILE} ({e}); "
                "run `cascade cache clear --force` to rebuild it"
            ) from None

    @property
    def _db(self) -> diskcache.Cache:
        if self._cache is None:
            with self._errors("open"):
                self.directory.mkdir(parents=True, exist_ok=True)
                self._secret = _load_secret(self.directory)
                self._cache = diskcache.Cache(
                    str(self.directory),
                    disk=diskcache.JSONDisk,
                    size_limit=self._size_limit,
                    timeout=self._timeout_s,
                    eviction_policy="least-recently-stored",
                )
        return self._cache

    @property
    def secret(self) -> bytes:
        db = self._db  # opening the cache loads (or creates) its secret
        assert self._secret is not None, db
        return self._secret

    def _drop(self, key: str, why: object) -> None:
        log.warning("cache entry %s… in %s was damaged (%s): dropped", key[:12], self.directory,
                    why)
        with self._errors("delete"):
            self._db.delete(key)

    def get(self, key: str) -> Answer | None:
        """The stored answer for ``key``, or None. Damaged entries are deleted and missed: a
        value that no longer decompresses or parses, a truncated value file, a wrong MAC."""
        with self._errors("read"):
            try:
                raw = self._db.get(key, default=None)
            except (zlib.error, ValueError) as e:  # bad zlib, bad JSON, truncated value file
                self._drop(key, e)
                return None
        if raw is None:
            return None
        try:
            return unpack_entry(key, raw, self.secret)
        except DamagedEntry as e:
            self._drop(key, e)
            return None

    def set(self, key: str, answer: Answer) -> None:
        """Store a verified answer. Refuses unverified ones: they must never be served.

        Raises :class:`CacheError` when the store fails (disk full, read-only, locked), so the
        caller can still return the answer it paid for."""
        if not answer.verified:
            raise ValueError("only verified answers are cached")
        with self._errors("write"):
            self._db.set(key, pack_entry(key, answer, self.secret), expire=self.ttl_s)

    def _foreign_files(self) -> list[str]:
        """Files in the directory the cache did not make (diskcache's db and value files)."""
        foreign = []
        for path in sorted(self.directory.rglob("*")):
            rel = path.relative_to(self.directory).as_posix()
            if path.is_dir() and not path.is_symlink():
                if re.fullmatch(r"[0-9a-f]{2}(/[0-9a-f]{2})?", rel):
                    continue
            elif rel in _DB_FILES or _VALUE_FILE.fullmatch(rel) or _TMP_SECRET.fullmatch(rel):
                continue
            foreign.append(rel)
        return foreign

    def clear(self, *, force: bool = False) -> int:
        """Delete every entry; returns how many there were.

        Only what the cache owns is touched, and a directory that holds anything else is
        refused (:class:`ConfigError` on ``cache.directory``, nothing deleted). With ``force``
        a cache too damaged to open is removed file by file (its database, secret and value
        files) and 0 is returned.
        """
        if self.directory.is_dir():
            foreign = self._foreign_files()
            if foreign:
                shown = ", ".join(foreign[:5]) + (" …" if len(foreign) > 5 else "")
                # A ConfigError, not a CacheError: the directory setting is what is wrong,
                # and no "remove the damaged cache" fallback may catch it and delete the lot.
                raise ConfigError(
                    f"refusing to clear {self.directory}: it holds files the cache did not "
                    f"create ({shown}); point the cache at a directory of its own",
                    key="cache.directory",
                )
        try:
            with self._errors("clear"):
                return int(self._db.clear(retry=True))
        except CacheError:
            if not force:
                raise
        self.close()
        self._remove_owned()
        return 0

    def _remove_owned(self) -> None:
        for name in _DB_FILES:
            (self.directory / name).unlink(missing_ok=True)
        for tmp in self.directory.glob(f".{SECRET_FILE}.*"):
            tmp.unlink(missing_ok=True)
        for sub in self.directory.iterdir():
            if sub.is_dir() and re.fullmatch(r"[0-9a-f]{2}", sub.name):
                shutil.rmtree(sub)  # only value-file directories remain (checked above)
        with contextlib.suppress(OSError):
            self.directory.rmdir()

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
