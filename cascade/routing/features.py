"""What the router reads of a request: word n-grams of the conversation, the system prompt's
words, the length and the number of turns, as TF-IDF weights.

One analyzer (:func:`analyze`) feeds both scikit-learn's ``TfidfVectorizer`` when the router
is fitted and :class:`Featurizer` when it runs, so the two cannot drift apart; the runtime side
is a vocabulary dict and an idf array (no scikit-learn, no pickle), fast enough to add well
under a millisecond to a climb.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from itertools import pairwise
from typing import Any

import numpy as np
import numpy.typing as npt

from cascade.errors import ConfigError
from cascade.messages import Message, normalise_messages

__all__ = ["ANALYZER", "Featurizer", "analyze", "prompt_messages", "system_key"]

ANALYZER = "words12-system1-len-turns/1"
"""Names the token scheme below; a router file made with another one is refused."""

_WORD = re.compile(r"\w\w+")
"""Runs of two or more word characters: scikit-learn's default tokens (its ``\\b`` anchors add
nothing to a greedy run, and cost a third of the time)."""

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def _nfc(text: str) -> str:
    """The text in Unicode NFC: the same words typed on another system (macOS sends "é" as
    "e" and a combining accent, which ``\\w`` splits at) give the same tokens and the same
    system-prompt key. Identity on NFC text (nearly every suite), so files fitted before
    read it as they were fitted; CPython returns NFC text as it is after a quick check."""
    return unicodedata.normalize("NFC", text)


def _terms(messages: Sequence[Message]) -> tuple[list[str], list[tuple[str, str]]]:
    """One walk over a request: its unigram terms (system words prefixed ``s:``, a length
    bucket, the number of turns) and its bigrams (of the user and assistant turns)."""
    words: list[str] = []
    pairs: list[tuple[str, str]] = []
    chars = 0
    turns = 0
    for m in messages:
        text = _nfc(m.content)
        chars += len(text)
        found = _WORD.findall(text.lower())
        if m.role == "system":
            words.extend(["s:" + w for w in found])
            continue
        turns += 1
        words.extend(found)
        pairs.extend(pairwise(found))
    words.append(f"len:{int(math.log2(1 + chars))}")
    words.append(f"turns:{min(turns, 5)}")
    return words, pairs


def analyze(messages: Sequence[Message]) -> list[str]:
    """The tokens of a request: unigrams and bigrams of the user and assistant turns
    (lower-cased words of two or more characters, as scikit-learn's default pattern), the
    system prompt's words prefixed ``s:``, a length bucket (log2 of the characters) and the
    number of turns; all of the text in Unicode NFC."""
    words, pairs = _terms(messages)
    return words + [a + " " + b for a, b in pairs]


def system_key(messages: Sequence[Message]) -> str:
    """Identifies a request's system prompt (all system turns; "" without one): the kind of
    request it is. The router routes only kinds it saw in the suite."""
    text = _nfc("\n\n".join(m.content for m in messages if m.role == "system"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def prompt_messages(prompt: str) -> tuple[Message, ...]:
    """The messages of one ``OutcomeTable.prompts`` entry: canonical JSON of the turns, or (any
    other text) a single user turn."""
    try:
        obj: Any = json.loads(prompt)
    except ValueError:
        obj = None
    if isinstance(obj, list) and obj and all(isinstance(m, Mapping) for m in obj):
        try:
            return normalise_messages(messages=obj)
        except ConfigError:
            pass
    return normalise_messages(prompt=prompt) if prompt.strip() else ()


class Featurizer:
    """TF-IDF of :func:`analyze`'s tokens as scikit-learn computes it (sublinear tf, smooth
    idf, l2 norm), over a fixed vocabulary: a sparse vector as (indices, values).

    Why not call :func:`analyze` here: counting words and word pairs with ``Counter`` (bigrams
    as tuples, never joined into strings) and intersecting with the vocabulary's keys keeps the
    loops in C, which is what keeps a 2 kB prompt well under 0.2 ms. The tokens are the same
    (tests check the vectors against scikit-learn's).
    """

    __slots__ = ("idf", "index")

    def __init__(self, vocabulary: Sequence[str], idf: Sequence[float]) -> None:
        if len(vocabulary) != len(idf):
            raise ValueError("vocabulary and idf differ in length")
        self.index: dict[str | tuple[str, ...], int] = {
            (tuple(t.split(" ")) if " " in t else t): i for i, t in enumerate(vocabulary)}
        self.idf: FloatArray = np.asarray(idf, dtype=np.float64)

    def __len__(self) -> int:
        return len(self.index)

    def vocabulary(self) -> list[str]:
        """The terms in index order, as scikit-learn names them."""
        out = [""] * len(self.index)
        for k, i in self.index.items():
            out[i] = " ".join(k) if isinstance(k, tuple) else k
        return out

    def transform(self, messages: Sequence[Message]) -> tuple[IntArray, FloatArray]:
        words, pairs = _terms(messages)
        counts: Counter[str | tuple[str, ...]] = Counter(words)
        counts.update(pairs)
        index = self.index
        hits = counts.keys() & index.keys()
        if not hits:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        idx = np.fromiter([index[k] for k in hits], dtype=np.int64, count=len(hits))
        tf = np.fromiter([counts[k] for k in hits], dtype=np.float64, count=len(hits))
        vals = (np.log(tf) + 1.0) * self.idf[idx]
        norm = math.sqrt(float(vals @ vals))
        return idx, vals / norm if norm > 0 else vals
