"""verified-cascade: climb a ladder of LLMs only as far as verifiers require.

``answer()`` / ``aanswer()`` use the configured ladder (``cascade.toml``, ``$CASCADE_CONFIG``) or,
with no config, the embedded local ladder. For repeated use, build a :class:`Cascade` once.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

from cascade.cache import AnswerCache
from cascade.config import CascadeConfig, RungConfig, VerifierConfig, load_config, parse_config
from cascade.dotted import grader, normaliser, verifier
from cascade.engine import Cascade, health
from cascade.errors import (
    AuthenticationError,
    BudgetExceeded,
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
_default_lock = threading.Lock()


def _default_cascade() -> Cascade:
    global _default
    with _default_lock:
        if _default is None:
            _default = Cascade.default()
        return _default


def answer(prompt: str | None = None, **kw: Any) -> Answer:
    """Answer with the configured (or embedded default) ladder. See :meth:`Cascade.aanswer`."""
    return _default_cascade().answer(prompt, **kw)


async def aanswer(prompt: str | None = None, **kw: Any) -> Answer:
    """Async twin of :func:`answer`."""
    return await _default_cascade().aanswer(prompt, **kw)


def answer_many(requests: Sequence[str | Mapping[str, Any]], *, concurrency: int = 8
                ) -> list[Answer | Exception]:
    """Answer many requests in input order with bounded concurrency."""
    return _default_cascade().answer_many(requests, concurrency=concurrency)


async def aanswer_many(requests: Sequence[str | Mapping[str, Any]], *, concurrency: int = 8
                       ) -> list[Answer | Exception]:
    """Async twin of :func:`answer_many`."""
    return await _default_cascade().aanswer_many(requests, concurrency=concurrency)
