"""Which values are secret, the forms they take in text, and cutting them out.

One place for it, because a key leaks through whatever quotes it: a server's 401 body, a user
verifier's exception (its own client's URL with ``?key=``), an audit line that JSON-escapes
the quote again. Providers scrub their own key from their errors; the climb and the audit log
cut every secret the config names (:func:`secret_envs_of`) with a :class:`Redactor`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import urllib.parse
from collections.abc import Iterable

from cascade.errors import ConfigError
from cascade.settings import VENDOR_KEY_ENVS, CascadeConfig

__all__ = ["REDACTED", "CredentialFilter", "Redactor", "check_env_name", "has_userinfo",
           "mask_credentials", "mask_http_logs", "secret_envs_of", "secret_forms"]

REDACTED = "[redacted]"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
"""What an environment variable's name looks like; a key pasted in its place does not."""


_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/?#\s|]*@")
"""User info in a URL inside text, to its last ``@`` (a password may hold one); not across
``|``, which separates an endpoint's URL from its model (``claude-x@20240620``)."""
_ONE_URL = re.compile(r"(?i)[a-z][a-z0-9+.-]*://\S*")
_QUERY_VALUE = re.compile(r"([?&][^=&#\s|]*=)[^&#\s|]*")


def has_userinfo(url: str) -> bool:
    """Whether ``url`` carries ``user:password@`` (a basic-auth proxy's credentials)."""
    return "@" in urllib.parse.urlsplit(url).netloc


def mask_credentials(text: str) -> str:
    """``text`` with every URL's user info and query values replaced by ``***``: a
    ``base_url`` may carry a key (``?api-key=``, ``user:password@``), and traces, audit lines
    and ``/healthz`` show endpoints."""
    if _ONE_URL.fullmatch(text):  # a URL alone (a base_url): its user info may hold | too
        parts = urllib.parse.urlsplit(text)
        if "@" in parts.netloc:
            text = urllib.parse.urlunsplit(parts._replace(
                netloc="***@" + parts.netloc.rsplit("@", 1)[1]))
    return _QUERY_VALUE.sub(r"\1***", _USERINFO.sub(r"\1***@", text))


class CredentialFilter(logging.Filter):
    """Masks URL credentials (:func:`mask_credentials`) in log records: the HTTP clients log
    each request's URL, and a basic-auth proxy's ``user:password@`` is in it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad log call: logging's own handler reports it, not a raise here
            return True
        if "@" in message or "=" in message:
            masked = mask_credentials(message)
            if masked != message:
                record.msg, record.args = masked, None
        return True


_HTTP_LOGGERS = ("httpx", "httpx2", "httpcore.http11", "httpcore2.http11", "httpcore.connection",
                 "httpcore2.connection", "httpcore.proxy", "httpcore2.proxy",
                 "openai._base_client", "anthropic._base_client")
"""The loggers that write a request's URL (a filter on a logger sees only its own records)."""
_http_masked = False
_http_lock = threading.Lock()


def mask_http_logs() -> None:
    """Put :class:`CredentialFilter` on the HTTP clients' loggers, once per process: called
    as a client is made for a ``base_url`` with user info."""
    global _http_masked
    with _http_lock:
        if not _http_masked:
            for name in _HTTP_LOGGERS:
                logging.getLogger(name).addFilter(CredentialFilter())
            _http_masked = True


_LOOSE_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
"""Names with ``.`` or ``-`` (Kubernetes allows them): a key can look like one too, so such a
name passes only when the variable is set."""


def check_env_name(value: str, *, source: str, key: str) -> str:
    """``value`` when it is the name of an environment variable (``*_env`` settings): what is
    there instead is most likely the secret itself, so the error never shows it (it would go
    to stderr, the log, and ``/healthz``'s reload status)."""
    if not _ENV_NAME.fullmatch(value) and not (_LOOSE_ENV_NAME.fullmatch(value)
                                               and value in os.environ):
        raise ConfigError("must be the NAME of an environment variable (letters, digits and "
                          "_, e.g. OPENAI_API_KEY; no $), never the key; the value is not "
                          "shown", source=source, key=key)
    return value


def secret_forms(secret: str) -> set[str]:
    """``secret`` as it may appear in a message: raw, repr- or ``\\n``-escaped, JSON-escaped,
    URL-encoded."""
    forms = {
        secret,
        repr(secret)[1:-1],
        secret.encode("unicode_escape").decode("ascii"),
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
        urllib.parse.quote(secret, safe=""),
        urllib.parse.quote_plus(secret, safe=""),
        urllib.parse.quote(secret),
    }
    return {f for f in forms if len(f) >= 4}


def secret_envs_of(config: CascadeConfig) -> list[str]:
    """The variables holding a ladder's secrets: every endpoint's and verifier's key, the
    store's password and cache secret."""
    endpoints = [e for r in config.rungs for e in (r, *r.fallbacks)]
    names = [e.api_key_env for e in endpoints if e.api_key_env]
    # A vendor kind with no variable named reads the vendor's default one (sent to the
    # vendor's own URL only, but a secret wherever it is quoted).
    names += [VENDOR_KEY_ENVS[e.provider] for e in endpoints
              if not e.api_key_env and e.provider in VENDOR_KEY_ENVS]
    for v in config.verifiers:
        env, kind = v.settings.get("api_key_env"), v.settings.get("provider")
        if isinstance(env, str):
            names.append(env)
        elif isinstance(kind, str) and kind in VENDOR_KEY_ENVS:
            names.append(VENDOR_KEY_ENVS[kind])
    names += [env for k in ("password_env", "cache_secret_env")
              if isinstance(env := config.store.get(k), str)]
    return list(dict.fromkeys(names))


class Redactor:
    """Cuts the values of ``envs`` from text, in every form of :func:`secret_forms`; with
    ``json_escaped``, also as each form reads inside a JSON string (for text that is JSON
    itself, an audit line). The variables are read again whenever one changes: keys are read
    at a provider's first call, so one set after the Cascade was built is a key all the same
    (and a rotated key's old value is still cut)."""

    def __init__(self, envs: Iterable[str], *, json_escaped: bool = False) -> None:
        self._names = tuple(envs)
        self._json = json_escaped
        self._lock = threading.Lock()  # the audit writer, the loop and shadow threads share it
        self._read: tuple[str | None, ...] | None = None
        self._values: frozenset[str] = frozenset()
        self._forms: tuple[str, ...] = ()

    @property
    def forms(self) -> tuple[str, ...]:
        """Longest first, so a form holding another is cut whole."""
        now = tuple(os.environ.get(name) for name in self._names)
        with self._lock:  # read and rebuilt together: no thread sees the new values unmet
            if now != self._read:
                # A key file's trailing newline is not part of the key the SDKs send; a 1-3
                # character "key" would shred every line.
                values = self._values | {v for raw in now if raw for v in (raw, raw.strip())
                                         if len(v) >= 4}
                forms: set[str] = set()
                for value in values:
                    for form in secret_forms(value):
                        forms.add(form)
                        if self._json:
                            forms.add(json.dumps(form)[1:-1])
                            forms.add(json.dumps(form, ensure_ascii=False)[1:-1])
                self._values, self._read = values, now
                self._forms = tuple(sorted(forms, key=len, reverse=True))
            return self._forms

    def __call__(self, text: str) -> str:
        for form in self.forms:
            if form in text:
                text = text.replace(form, REDACTED)
        return text

    def __bool__(self) -> bool:
        return bool(self.forms)
