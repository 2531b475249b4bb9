"""Estimate a request's input tokens and a rung's cost before calling it.

Counts use tiktoken with the encoding of the model family (``o200k_base`` for gpt-4o, gpt-4.1,
gpt-5 and the o-series; ``cl100k_base`` for everything else, a fair approximation for other
vendors' models) plus OpenAI's chat overhead: 3 tokens per message, the role's tokens, and 3 to
prime the reply.

Encodings load lazily, once per process, from tiktoken's cache directory
(``$TIKTOKEN_CACHE_DIR``, else ``$DATA_GYM_CACHE_DIR``, else ``<tmp>/data-gym-cache``). They are
never downloaded from here, because a cascade must not stall on a network fetch inside a request:
when the file is absent or corrupt (or tiktoken fails) the estimate falls back to
``ceil(characters / 4)`` per message (one token per byte of non-ASCII text) plus the same
overhead, and one warning is logged on the ``cascade`` logger. Set
``CASCADE_TIKTOKEN_DOWNLOAD=1`` to let tiktoken fetch missing files.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
import threading
from collections.abc import Iterable, Sequence
from typing import Any

from cascade.config import RungConfig
from cascade.messages import Message

__all__ = [
    "encoding_name_for", "estimate_cost", "estimate_tokens", "fallback_tokens", "warm_up",
]

logger = logging.getLogger("cascade")

TOKENS_PER_MESSAGE = 3
REPLY_PRIMING_TOKENS = 3
_FALLBACK_ROLE_TOKENS = 1

_O200K_PREFIXES = (
    "gpt-4o", "chatgpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "gpt-oss", "o1", "o3", "o4",
    "ft:gpt-4o", "ft:gpt-4.1",
)

# tiktoken's source URL (only hashed into its cache file name: nothing is fetched) and the
# SHA-256 tiktoken checks; a file that fails the check would make tiktoken download it again.
_BLOB_URL = "https://openaipublic.blob.core.windows.net/encodings/{}.tiktoken"
_SHA256 = {
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
}

_lock = threading.Lock()
_encodings: dict[str, Any] = {}  # name -> tiktoken.Encoding, or None when it failed to load
_warned = False


def encoding_name_for(model: str) -> str:
    """The tiktoken encoding for a model name (a ``provider/`` prefix is ignored)."""
    name = model.strip().lower().rsplit("/", 1)[-1]
    return "o200k_base" if name.startswith(_O200K_PREFIXES) else "cl100k_base"


def _cache_file(name: str) -> str:
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        cache_dir = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        cache_dir = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    key = hashlib.sha1(_BLOB_URL.format(name).encode()).hexdigest()
    return os.path.join(cache_dir, key)


def _load(name: str) -> Any:
    """The encoding, or None after logging why (once per process)."""
    global _warned
    reason: str | None = None
    if os.environ.get("CASCADE_TIKTOKEN_DOWNLOAD") != "1":
        path = _cache_file(name)
        try:
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
        except OSError:
            reason = f"{path} is missing (set TIKTOKEN_CACHE_DIR to a directory holding it)"
        else:
            if digest != _SHA256.get(name, digest):
                reason = f"{path} is corrupt (SHA-256 mismatch)"
    if reason is None:
        try:
            import tiktoken

            return tiktoken.get_encoding(name)
        except Exception as e:  # tiktoken raises many kinds; any of them means "no encoding"
            reason = f"tiktoken failed: {type(e).__name__}: {e}"
    if not _warned:
        _warned = True
        logger.warning(
            "token counts are estimated as characters/4: tiktoken encoding %s unavailable: %s",
            name, reason,
        )
    return None


def _encoding(name: str) -> Any:
    with _lock:
        if name not in _encodings:
            _encodings[name] = _load(name)
        return _encodings[name]


def _reset() -> None:
    """Forget loaded encodings and the warning (tests)."""
    global _warned
    with _lock:
        _encodings.clear()
        _warned = False


def warm_up(models: Iterable[str]) -> bool:
    """Load the encodings these models need now (e.g. in a worker thread at start-up), so the
    first request does not pay the ~0.5 s load; True when every one is available."""
    return all([_encoding(name) is not None for name in {encoding_name_for(m) for m in models}])


def _fallback_count(text: str) -> int:
    """``ceil(chars/4)`` for ASCII, one token per UTF-8 byte of anything else. Byte-level BPE
    never makes a token of less than a byte, so the second part is a bound; chars/4 alone
    counted 90 emoji (240 cl100k tokens) as 23, and Chinese or Hindi text 3-4x low."""
    if text.isascii():
        return math.ceil(len(text) / 4)
    ascii_chars = len(text.encode("ascii", "ignore"))
    return math.ceil(ascii_chars / 4) + len(text.encode("utf-8", "surrogatepass")) - ascii_chars


def fallback_tokens(messages: Sequence[Message]) -> int:
    """The estimate without an encoding: ``ceil(chars/4)`` per message (a byte per token
    for non-ASCII text) plus chat overhead."""
    return REPLY_PRIMING_TOKENS + sum(
        TOKENS_PER_MESSAGE + _FALLBACK_ROLE_TOKENS + _fallback_count(m.content)
        for m in messages
    )


def estimate_tokens(messages: Sequence[Message], model: str) -> int:
    """Input tokens the model will bill for ``messages``, by OpenAI's counting recipe.

    Special-token text in user content (``<|endoftext|>``) is counted as plain text, as the
    providers treat it. Synchronous: tiktoken encodes megabytes in well under a second.
    """
    enc = _encoding(encoding_name_for(model))
    if enc is None:
        return fallback_tokens(messages)
    total = REPLY_PRIMING_TOKENS
    for m in messages:
        total += TOKENS_PER_MESSAGE + len(enc.encode_ordinary(m.role))
        total += len(enc.encode_ordinary(m.content))
    return total


def estimate_cost(rung: RungConfig, messages: Sequence[Message]) -> float:
    """The most a call to ``rung`` can cost in USD: estimated input plus ``max_tokens`` output,
    at the dearest of its endpoints (a failover may land on any of its ``fallbacks``, so a cap
    or a budget reservation made from this estimate holds whichever answers).

    Local GGUF models use their own tokenizers, which no tiktoken encoding matches: for them the
    documented character estimate is used directly, with nothing to warn about.
    """
    return max(_estimate_one(e, messages) for e in (rung, *rung.fallbacks))


def _estimate_one(endpoint: RungConfig, messages: Sequence[Message]) -> float:
    tokens = (fallback_tokens(messages) if endpoint.provider == "local"
              else estimate_tokens(messages, endpoint.model))
    return endpoint.cost_usd(tokens, endpoint.max_tokens)
