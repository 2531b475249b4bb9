"""Client keys and rate limits: who may call, and how often.

Keys are read from the environment once, at start, and held only here. A bearer token is
compared with *every* configured key by :func:`hmac.compare_digest`, so neither the comparison
nor which client matched leaks through timing. No key, token or prefix of one is ever put in a
message, a log line or an error. With no clients configured every request is served (the
command refuses to bind beyond loopback that way unless ``--insecure``).
"""

from __future__ import annotations

import hmac
import math
import threading
import time
from collections.abc import Mapping, Sequence

from cascade.serve.config import ClientConfig
from cascade.serve.errors import APIError

__all__ = ["Authenticator", "RateLimiter"]

_UNAUTHORISED = {"www-authenticate": "Bearer"}


class RateLimiter:
    """A token bucket per client: ``rpm`` requests a minute, bursts up to a minute's worth."""

    def __init__(self, rpm: float) -> None:
        self.rate = rpm / 60.0
        self.capacity = max(1.0, rpm)
        self._tokens = self.capacity
        self._at = time.monotonic()
        self._lock = threading.Lock()

    def take(self) -> float:
        """0 when a request may go now, else the seconds until one may."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.capacity, self._tokens + (now - self._at) * self.rate)
            self._at = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return 0.0
            return (1.0 - self._tokens) / self.rate


class Authenticator:
    """Maps an ``Authorization: Bearer`` (or Anthropic's ``x-api-key``) header to a configured
    client (or None when none are)."""

    def __init__(self, clients: Sequence[ClientConfig]) -> None:
        # A bearer token never carries surrounding white space; a key variable read from a
        # secret file often ends in a newline, which would lock its client out for good.
        self._keys = tuple((c, c.key().strip().encode()) for c in clients)
        self._limits = {(c.name, bucket): RateLimiter(c.rate_limit_rpm) for c in clients
                        for bucket in ("answers", "feedback") if c.rate_limit_rpm}

    @property
    def required(self) -> bool:
        return bool(self._keys)

    def client_for(self, headers: Mapping[str, str], *,
                   bucket: str | None = "answers") -> ClientConfig | None:
        """The client whose key is the bearer token (else ``x-api-key``); raises a 401
        ``APIError`` otherwise, and a 429 when that client is over its rate limit.

        Each ``bucket`` has the client's ``rate_limit_rpm`` of its own: ``"answers"`` (the
        model endpoints) and ``"feedback"`` (each a line in the audit log, which a flood would
        rotate away), so a client that sends feedback on each answer still gets the answers
        per minute it was given. ``None`` (``/v1/models``) checks the key only."""
        if not self._keys:
            return None
        auth = headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            given = token.strip().encode()
        elif headers.get("x-api-key", "").strip():  # what Anthropic's SDKs send
            given = headers["x-api-key"].strip().encode()
        else:
            raise APIError(401, "missing key: send 'Authorization: Bearer <your key>' (or "
                           "'x-api-key: <your key>')", type="invalid_request_error",
                           code="invalid_api_key", headers=_UNAUTHORISED)
        found: ClientConfig | None = None
        for client, key in self._keys:
            if hmac.compare_digest(given, key) and found is None:
                found = client
        if found is None:
            raise APIError(401, "invalid key", type="invalid_request_error",
                           code="invalid_api_key", headers=_UNAUTHORISED)
        limiter = self._limits.get((found.name, bucket or ""))
        if limiter is not None:
            wait = limiter.take()
            if wait > 0:
                raise APIError(429, f"client {found.name!r} is over its rate limit of "
                               f"{found.rate_limit_rpm:g} requests per minute",
                               type="rate_limit_exceeded", code="rate_limit_exceeded",
                               headers={"retry-after": str(math.ceil(wait))})
        return found
