"""verified-cascade: climb a ladder of LLMs only as far as verifiers require.

``answer()`` / ``aanswer()`` use the configured ladder (``cascade.toml``, ``$CASCADE_CONFIG``) or,
with no config, the embedded local ladder. For repeated use, build a :class:`Cascade` once.
"""

from __future__ import annotations

import atexit as _atexit
import os as _os
import threading as _threading
from collections.abc import Mapping as _Mapping
from collections.abc import Sequence as _Sequence
from typing import Any as _Any
from typing import Unpack as _Unpack

from cascade.cache import AnswerCache
from cascade.config import CascadeConfig, RungConfig, VerifierConfig, load_config, parse_config
from cascade.dotted import grader, normaliser, verifier
from cascade.engine import AnswerOptions as _AnswerOptions
from cascade.engine import Cascade, health
from cascade.errors import (
    AuthenticationError,
    BudgetExceeded,
    BudgetStoreError,
    CacheError,
    CascadeError,
    CircuitOpen,
    ClientRequestError,
    ConfigError,
    DeadlineExceeded,
    MalformedReply,
    NoAnswerError,
    ProviderError,
    ProviderTimeout,
    RateLimited,
    ReplyTooLarge,
    ServerError,
    TransportError,
    UnknownVerifierError,
    UnverifiedAnswerError,
)
from cascade.messages import Message, Request
from cascade.providers.base import Completion, ModelCall, Provider, TokenLogprob
from cascade.trace import Answer, Attempt, Verdict
from cascade.verify import Candidate, Verifier, VerifyContext

__all__ = [
    "Answer",
    "AnswerCache",
    "Attempt",
    "AuthenticationError",
    "BudgetExceeded",
    "BudgetStoreError",
    "CacheError",
    "Candidate",
    "Cascade",
    "CascadeConfig",
    "CascadeError",
    "CircuitOpen",
    "ClientRequestError",
    "Completion",
    "ConfigError",
    "DeadlineExceeded",
    "MalformedReply",
    "Message",
    "ModelCall",
    "NoAnswerError",
    "Provider",
    "ProviderError",
    "ProviderTimeout",
    "RateLimited",
    "ReplyTooLarge",
    "Request",
    "RungConfig",
    "ServerError",
    "TokenLogprob",
    "TransportError",
    "UnknownVerifierError",
    "UnverifiedAnswerError",
    "Verdict",
    "Verifier",
    "VerifierConfig",
    "VerifyContext",
    "aanswer",
    "aanswer_many",
    "answer",
    "answer_many",
    "grader",
    "health",
    "load_config",
    "normaliser",
    "parse_config",
    "verifier",
]

_default: Cascade | None = None
_default_lock = _threading.Lock()


def _default_cascade() -> Cascade:
    global _default
    with _default_lock:
        if _default is None:
            _default = Cascade.default()
            # nothing else closes it: its connections (aiohttp's sessions) would be left for
            # the interpreter's exit, which warns "Unclosed client session" on stderr
            _atexit.register(_close_default, _os.getpid())
        return _default


def _close_default(pid: int) -> None:
    """At exit, in the process that made the default Cascade only: a forked child (a
    pre-fork server's worker) shares its connections' sockets and event-loop registrations,
    and closing them there broke the parent's next call."""
    if _os.getpid() == pid and _default is not None:
        _default.close()


def answer(prompt: str | None = None, **options: _Unpack[_AnswerOptions]) -> Answer:
    """Answer with the configured (or embedded default) ladder. See :meth:`Cascade.aanswer`."""
    return _default_cascade().answer(prompt, **options)


async def aanswer(prompt: str | None = None, **options: _Unpack[_AnswerOptions]) -> Answer:
    """Async twin of :func:`answer`."""
    return await _default_cascade().aanswer(prompt, **options)


def answer_many(requests: _Sequence[str | _Mapping[str, _Any]], *, concurrency: int = 8
                ) -> list[Answer | Exception]:
    """Answer many requests in input order with bounded concurrency."""
    return _default_cascade().answer_many(requests, concurrency=concurrency)


async def aanswer_many(requests: _Sequence[str | _Mapping[str, _Any]], *, concurrency: int = 8
                       ) -> list[Answer | Exception]:
    """Async twin of :func:`answer_many`."""
    return await _default_cascade().aanswer_many(requests, concurrency=concurrency)
