"""The refusal verifier: refusals in nine languages, near misses, and its measured precision."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cascade.errors import ConfigError
from tests.verifier_kit import completion, make_ctx
from verifiers.refusal import RefusalVerifier, classify

LABELLED = Path(__file__).resolve().parents[1] / "fixtures" / "refusal" / "labelled.jsonl"


def load() -> list[dict[str, Any]]:
    with LABELLED.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def scores(rows: list[dict[str, Any]]) -> tuple[float, float, list[str]]:
    tp = fp = fn = 0
    wrong: list[str] = []
    for r in rows:
        got = classify(r["text"], r["finish_reason"]).refusal
        if got and r["refusal"]:
            tp += 1
        elif got:
            fp += 1
            wrong.append(f"FP {r['text'][:60]!r}")
        elif r["refusal"]:
            fn += 1
            wrong.append(f"FN {r['text'][:60]!r}")
    return tp / (tp + fp), tp / (tp + fn), wrong


def test_labelled_set_is_big_balanced_and_multilingual() -> None:
    rows = load()
    assert len(rows) >= 150
    assert 0.4 <= sum(r["refusal"] for r in rows) / len(rows) <= 0.6
    assert {"en", "fr", "de", "es", "it", "pt", "zh", "ja", "ru"} <= {r["lang"] for r in rows}
    assert {r["split"] for r in rows} == {"dev", "heldout"}


def test_precision_and_recall_floors_on_the_labelled_set() -> None:
    # Measured: all 186 rows P=0.989 R=0.948; dev (160) P=1.000 R=0.964; held-out (26) P=0.923
    # R=0.857. Held-out rows were written after tuning and never tuned on.
    rows = load()
    precision, recall, wrong = scores(rows)
    assert precision >= 0.97, wrong
    assert recall >= 0.93, wrong
    dev_p, dev_r, wrong = scores([r for r in rows if r["split"] == "dev"])
    assert dev_p >= 0.95 and dev_r >= 0.95, wrong
    held_p, held_r, wrong = scores([r for r in rows if r["split"] == "heldout"])
    assert held_p >= 0.90 and held_r >= 0.80, wrong


@pytest.mark.parametrize("text", [
    "I can't believe how simple this is: the answer is 42",
    "Sorry for the delay — the capital is Canberra",
    'The assistant said "I\'m sorry, but I can\'t help with that" and the user gave up.',
    "I cannot stress enough that you must back up first. Then run the migration script.",
    "I can't help but notice the off-by-one error: use range(n) instead of range(n + 1).",
    "I don't have live data, but as of 2023 the city had about 14 million residents.",
])
def test_near_misses_pass(text: str) -> None:
    assert not classify(text).refusal, classify(text).reason


@pytest.mark.parametrize("text", [
    "I can't help with that.",
    "As an AI language model, I don't have personal opinions.",
    "I'm sorry, but I cannot provide that information. Feel free to ask something else!",
    "I don't have access to your files.",
    "I am unable to comply with this request.",
    "Je suis désolé, mais je ne peux pas vous aider.",
    "Leider kann ich Ihnen dabei nicht helfen.",
    "Lo siento, pero no puedo ayudarte con eso.",
    "Mi dispiace, ma non posso aiutarti.",
    "Desculpe, mas não posso ajudar com isso.",
    "抱歉，我无法回答这个问题。",
    "申し訳ありませんが、お答えできません。",
    "Извините, но я не могу помочь с этим.",
])
def test_refusals_fail(text: str) -> None:
    assert classify(text).refusal


def test_verifier_fails_empty_and_truncated_answers() -> None:
    v = RefusalVerifier()
    assert not v.verify(make_ctx("  \n")).passed
    cut = make_ctx("The first step is to", comp=completion("The first step is to",
                                                          finish_reason="length"))
    verdict = v.verify(cut)
    assert not verdict.passed and "truncated" in verdict.reason
    assert v.verify(make_ctx("Canberra.")).passed
    assert not RefusalVerifier(min_chars=3).verify(make_ctx("ok")).passed


def test_extra_patterns_reject_anywhere_and_bad_ones_are_config_errors() -> None:
    v = RefusalVerifier(extra_patterns=[r"\bconsult your doctor\b"])
    assert not v.verify(make_ctx("Take rest and fluids. Consult your doctor if it persists.")
                        ).passed
    with pytest.raises(ConfigError) as info:
        RefusalVerifier(extra_patterns=["(unclosed"])
    assert info.value.key == "extra_patterns[0]"
