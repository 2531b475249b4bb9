"""The ``[server]`` table, validated: the ladder's name, the audit log and the clients.

``cascade/config.py`` keeps the table raw; this module owns its keys, so every mistake is a
:class:`~cascade.errors.ConfigError` naming ``server.<key>`` and the file. Client keys are read
from the environment variables the table names, once, at start; a variable that is unset is a
configuration error (naming the variable, never a value).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cascade.config import CascadeConfig
from cascade.errors import ConfigError
from cascade.secrets import check_env_name

__all__ = ["ClientConfig", "ServerConfig", "parse_server"]

_SERVER_KEYS = ("name", "audit_log", "audit_redact", "audit_max_bytes", "audit_backups",
                "clients", "shutdown_timeout_s", "reload_poll_s", "max_request_bytes")
_CLIENT_KEYS = ("name", "key_env", "budget_key", "max_cost_usd", "rate_limit_rpm")


@dataclass(frozen=True, kw_only=True)
class ClientConfig:
    """One application allowed to call the service."""

    name: str
    """Shown in the audit log and metadata; never the key."""
    key_env: str
    """The environment variable that holds this client's bearer key."""
    budget_key: str
    """The ``[budget]`` key its spending is charged to (default: its name)."""
    max_cost_usd: float | None = None
    """Per-request cap for this client (the lower of this and the request's own wins)."""
    rate_limit_rpm: float | None = None
    """Requests per minute (a token bucket holding one minute's worth); over it → 429."""

    def key(self) -> str:
        """The client's key, read from the environment now (not kept on the object)."""
        return os.environ.get(self.key_env, "")


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    name: str = "cascade"
    """The ladder's name: what requests put in ``model`` and ``/v1/models`` lists."""
    audit_log: str | None = None
    audit_redact: bool = False
    """Log a hash of the messages instead of the messages."""
    audit_max_bytes: int = 100 * 2**20
    audit_backups: int = 5
    clients: tuple[ClientConfig, ...] = ()
    shutdown_timeout_s: float = 10.0
    """How long SIGTERM waits for requests in flight before cutting them."""
    reload_poll_s: float = 1.0
    """How often the config file is checked for a change to reload (0: only on SIGHUP)."""
    max_request_bytes: int = 16 * 2**20
    """The largest request body read; over it a request is a 413 (a body is held in memory
    whole, so without a bound anyone who can reach the port could exhaust it)."""

    @property
    def secret_envs(self) -> tuple[str, ...]:
        return tuple(c.key_env for c in self.clients)


def _get(table: Mapping[str, Any], key: str, kind: type | tuple[type, ...], what: str,
         source: str, prefix: str) -> Any:
    value = table[key]
    bad_bool = isinstance(value, bool) and kind in (int, float, (int, float))
    if bad_bool or not isinstance(value, kind):
        raise ConfigError(f"must be {what}, not {type(value).__name__} {value!r}",
                          source=source, key=prefix + key)
    return value


def _unknown(table: Mapping[str, Any], allowed: tuple[str, ...], source: str,
             prefix: str) -> None:
    for k in table:
        if k not in allowed:
            raise ConfigError(f"unknown key; allowed: {', '.join(allowed)}", source=source,
                              key=prefix + str(k))


def _positive(table: Mapping[str, Any], key: str, source: str, prefix: str) -> float | None:
    if key not in table:
        return None
    v = float(_get(table, key, (int, float), "a number", source, prefix))
    if not v > 0:
        raise ConfigError(f"must be > 0, not {v:g}", source=source, key=prefix + key)
    return v


def _client(raw: Any, i: int, source: str) -> ClientConfig:
    prefix = f"server.clients[{i}]."
    if not isinstance(raw, Mapping):
        raise ConfigError("must be a table with name, key_env and budget_key", source=source,
                          key=prefix.rstrip("."))
    _unknown(raw, _CLIENT_KEYS, source, prefix)
    for req in ("name", "key_env"):
        if req not in raw:
            raise ConfigError("is required", source=source, key=prefix + req)
    name = _get(raw, "name", str, "a string", source, prefix)
    key_env = _get(raw, "key_env", str, "the name of an environment variable", source, prefix)
    if not name or not key_env:
        raise ConfigError("must not be empty", source=source,
                          key=prefix + ("name" if not name else "key_env"))
    check_env_name(key_env, source=source, key=prefix + "key_env")
    if not os.environ.get(key_env, "").strip():
        raise ConfigError(f"the environment variable {key_env} is not set or blank (it must "
                          "hold this client's key)", source=source, key=prefix + "key_env")
    budget_key = (_get(raw, "budget_key", str, "a string", source, prefix)
                  if "budget_key" in raw else name)
    return ClientConfig(name=name, key_env=key_env, budget_key=budget_key,
                        max_cost_usd=_positive(raw, "max_cost_usd", source, prefix),
                        rate_limit_rpm=_positive(raw, "rate_limit_rpm", source, prefix))


def parse_server(config: CascadeConfig) -> ServerConfig:
    """Validate ``config.server`` (the raw ``[server]`` table)."""
    raw, source, p = config.server, config.source, "server."
    _unknown(raw, _SERVER_KEYS, source, p)
    kw: dict[str, Any] = {}
    if "name" in raw:
        kw["name"] = _get(raw, "name", str, "a string", source, p)
        if not kw["name"].strip() or "/" in kw["name"]:
            raise ConfigError("must be a non-empty name without '/'", source=source,
                              key=p + "name")
    if "audit_log" in raw:
        kw["audit_log"] = _get(raw, "audit_log", str, "a file path", source, p) or None
    if "audit_redact" in raw:
        kw["audit_redact"] = _get(raw, "audit_redact", bool, "true or false", source, p)
    for k in ("audit_max_bytes", "audit_backups", "max_request_bytes"):
        if k in raw:
            kw[k] = _get(raw, k, int, "an integer", source, p)
            if kw[k] < (0 if k == "audit_backups" else 1):
                raise ConfigError("must be >= 0" if k == "audit_backups" else "must be >= 1",
                                  source=source, key=p + k)
    if "shutdown_timeout_s" in raw:
        kw["shutdown_timeout_s"] = _positive(raw, "shutdown_timeout_s", source, p)
    if "reload_poll_s" in raw:
        v = float(_get(raw, "reload_poll_s", (int, float), "a number of seconds", source, p))
        if not 0 <= v < float("inf"):
            raise ConfigError(f"must be >= 0 (0 turns the file watch off), not {v:g}",
                              source=source, key=p + "reload_poll_s")
        kw["reload_poll_s"] = v
    if "clients" in raw:
        items = _get(raw, "clients", list, "a list of [[server.clients]] tables", source, p)
        clients = tuple(_client(c, i, source) for i, c in enumerate(items))
        seen: dict[str, int] = {}
        for i, c in enumerate(clients):
            if c.name in seen:
                raise ConfigError(f"duplicate client name {c.name!r} (also "
                                  f"clients[{seen[c.name]}])", source=source,
                                  key=f"server.clients[{i}].name")
            seen[c.name] = i
        keys = [c.key().strip() for c in clients]
        if len(set(keys)) != len(keys):
            raise ConfigError("two clients share one key (their key_env variables hold the same "
                              "value): each client needs its own", source=source,
                              key="server.clients")
        kw["clients"] = clients
    return ServerConfig(**kw)
