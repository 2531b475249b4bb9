"""What the router reads of a request: word n-grams of the conversation, the system prompt's
words, the length and the number of turns, as TF-IDF weights.

One analyzer (:func:`analyze`) feeds both scikit-learn's ``TfidfVectorizer`` when the router
is fitted and :class:`Featurizer` when it runs, so the two cannot drift apart; the runtime side
is a vocabulary dict and an idf array (no scikit-learn, no pickle), fast enough to add well
under a millisecond to a climb.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from itertools import pairwise
from typing import Any

import numpy as np
import numpy.typing as npt

from cascade.errors import ConfigError
from cascade.messages import Message, normalise_messages

__all__ = ["ANALYZER", "Featurizer", "analyze", "prompt_messages"]

ANALYZER = "words12-system1-len-turns/1"
"""Names the token scheme below; a router file made with another one is refused."""

_WORD = re.compile(r"(?u)\b\w\w+\b")

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def analyze(messages: Sequence[Message]) -> list[str]:
    """The tokens of a request: unigrams and bigrams of the user and assistant turns
    (lower-cased words of two or more characters, as scikit-learn's default pattern), the
    system prompt's words prefixed ``s:``, a length bucket (log2 of the characters) and the
    number of turns."""
    out: list[str] = []
    chars = 0
    turns = 0
    for m in messages:
        chars += len(m.content)
        words = _WORD.findall(m.content.lower())
        if m.role == "system":
            out.extend(["s:" + w for w in words])
            continue
        turns += 1
        out.extend(words)
        out.extend([a + " " + b for a, b in pairwise(words)])
    out.append(f"len:{int(math.log2(1 + chars))}")
    out.append(f"turns:{min(turns, 5)}")
    return out


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
    idf, l2 norm), over a fixed vocabulary: a sparse vector as (indices, values)."""

    __slots__ = ("idf", "index")

    def __init__(self, vocabulary: Sequence[str], idf: Sequence[float]) -> None:
        if len(vocabulary) != len(idf):
            raise ValueError("vocabulary and idf differ in length")
        self.index: dict[str, int] = {t: i for i, t in enumerate(vocabulary)}
        self.idf: FloatArray = np.asarray(idf, dtype=np.float64)

    def __len__(self) -> int:
        return len(self.index)

    def transform(self, messages: Sequence[Message]) -> tuple[IntArray, FloatArray]:
        counts: dict[int, int] = {}
        get = self.index.get
        for tok in analyze(messages):
            i = get(tok)
            if i is not None:
                counts[i] = counts.get(i, 0) + 1
        if not counts:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        idx = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
        tf = np.fromiter(counts.values(), dtype=np.float64, count=len(counts))
        vals = (np.log(tf) + 1.0) * self.idf[idx]
        norm = math.sqrt(float(vals @ vals))
        return idx, vals / norm if norm > 0 else vals
