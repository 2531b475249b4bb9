"""The ``[store]`` table: where shared state lives, validated with errors naming ``store.<key>``.

```toml
[store]
url = "redis://127.0.0.1:6379/0"   # or rediss:// for TLS
password_env = "REDIS_PASSWORD"    # the password comes from this variable, never from the file
budgets_on_outage = "fail-closed"  # or "fail-open": spend unmetered while Redis is down
journal_dir = "/var/lib/cascade"   # where settles wait for Redis, surviving a crash
```
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import platformdirs

from cascade.errors import ConfigError
from cascade.secrets import check_env_name

__all__ = ["OUTAGE_POLICIES", "StoreConfig", "parse_store"]

OUTAGE_POLICIES = ("fail-closed", "fail-open")


@dataclass(frozen=True, kw_only=True)
class StoreConfig:
    """A validated ``[store]`` table (the password is resolved, never stored in config)."""

    url: str
    """``redis://HOST:PORT/DB`` or ``rediss://HOST:PORT/DB``, without a password."""
    password_env: str | None = None
    """The environment variable holding the Redis password (or ACL user's password)."""
    budgets_on_outage: Literal["fail-closed", "fail-open"] = "fail-closed"
    """While Redis is unreachable: refuse metered calls (the default), or let them through and
    record their spend once Redis is back."""
    timeout_s: float = 1.0
    """Socket connect and read timeout of every Redis call (the request deadline caps it too)."""
    max_connections: int = 64
    """Connections in this process's pool; a burst beyond it waits up to ``timeout_s``."""
    key_prefix: str = "cascade"
    """Namespace of every key this store writes, so several deployments can share a Redis."""
    reservation_ttl_s: float = 600.0
    """A reservation not settled within this time (its worker died) stops holding money back.
    Keep it above the longest request."""
    cache_secret_env: str | None = None
    """Optional: the cache's HMAC secret from this variable instead of a key in Redis, so an
    entry written by anyone with Redis access but not the secret is refused."""
    journal_dir: Path = field(default_factory=lambda: Path(
        platformdirs.user_state_dir("verified-cascade")) / "budget-journal")
    """Where spend Redis has not acknowledged yet waits on local disk, so a worker that dies
    during an outage loses none of it: the next process here using the same store records it."""
    source: str = "<config>"

    @property
    def display_url(self) -> str:
        """The URL for messages: never carries a password (one is refused at load)."""
        return self.url


_KEYS = {f for f in StoreConfig.__dataclass_fields__} - {"source"}


def _err(msg: str, source: str, key: str) -> ConfigError:
    return ConfigError(msg, source=source, key=f"store.{key}")


def _str(raw: Mapping[str, Any], k: str, source: str) -> str:
    v = raw[k]
    if not isinstance(v, str) or not v.strip():
        raise _err(f"must be a non-empty string, not {type(v).__name__}", source, k)
    return v.strip()


def _positive(raw: Mapping[str, Any], k: str, source: str, *, integer: bool = False,
              maximum: float = 1e9) -> Any:
    v = raw[k]
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not math.isfinite(v) or not 0 < v <= maximum:
        kind = "an integer" if integer else "a number"
        raise _err(f"must be {kind} > 0 and <= {maximum:g}, got {v!r}", source, k)
    return int(v) if integer else float(v)


def _check_url(url: str, source: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise _err(f"must start with redis:// or rediss://, got {parts.scheme or 'no'} scheme",
                   source, "url")
    if parts.password is not None:
        raise _err("must not contain a password: put it in an environment variable and name "
                   "that variable in store.password_env", source, "url")
    if not parts.hostname:
        raise _err("must name a host, as redis://HOST:PORT/DB", source, "url")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise _err("has an invalid port; expected redis://HOST:PORT/DB", source, "url") from None
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise _err(f"database must be a number (redis://HOST:PORT/DB), got {db!r}", source,
                   "url")
    if parts.query or parts.fragment:
        raise _err("must not carry query options; use the [store] keys", source, "url")
    return url


def parse_store(raw: Mapping[str, Any], *, source: str = "<config>") -> StoreConfig:
    """Validate a raw ``[store]`` table (``CascadeConfig.store``)."""
    unknown = set(raw) - _KEYS
    if unknown:
        k = sorted(unknown)[0]
        hint = (" (a password never goes in the file: name its variable in store.password_env)"
                if k == "password" else "")
        raise _err(f"unknown key {k!r}{hint}; allowed: {sorted(_KEYS)}", source, k)
    if "url" not in raw:
        raise _err('is required, as url = "redis://HOST:PORT/DB"', source, "url")
    kw: dict[str, Any] = {"url": _check_url(_str(raw, "url", source), source), "source": source}
    for k in ("password_env", "cache_secret_env", "key_prefix"):
        if k in raw:
            kw[k] = _str(raw, k, source)
            if k != "key_prefix":
                check_env_name(kw[k], source=source, key=f"store.{k}")
    if "journal_dir" in raw:
        kw["journal_dir"] = Path(_str(raw, "journal_dir", source)).expanduser()
    if "budgets_on_outage" in raw:
        v = raw["budgets_on_outage"]
        if v not in OUTAGE_POLICIES:
            raise _err(f"is {v!r}; allowed: {', '.join(OUTAGE_POLICIES)}", source,
                       "budgets_on_outage")
        kw["budgets_on_outage"] = v
    if "timeout_s" in raw:
        kw["timeout_s"] = _positive(raw, "timeout_s", source, maximum=60)
    if "reservation_ttl_s" in raw:
        kw["reservation_ttl_s"] = _positive(raw, "reservation_ttl_s", source, maximum=86400 * 7)
    if "max_connections" in raw:
        kw["max_connections"] = _positive(raw, "max_connections", source, integer=True,
                                          maximum=10_000)
    return StoreConfig(**kw)


def secret_from_env(cfg: StoreConfig, field: str) -> str | None:
    """The value of the variable ``cfg.<field>`` names, validated and never echoed."""
    name = getattr(cfg, field)
    if name is None:
        return None
    value = os.environ.get(name)
    if value is None or not value.strip():
        raise _err(f"names the environment variable {name}, which is not set", cfg.source,
                   field)
    value = value.strip()  # `export X=$(cat file)` leaves a trailing newline
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise _err(f"the value of {name} contains control characters (not shown); fix the "
                   "variable", cfg.source, field)
    return value
