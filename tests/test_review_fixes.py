"""Review of the day's defect fixes: each test pins a legitimate use a fix broke (over-strict,
or inconsistent with another fix), so the fix of the fix does not regress."""

from __future__ import annotations

import pytest

from cascade.text import normalise_text
from verifiers.judge import parse_grade

# ---------------------------------------------------------------- judge verdict formats


@pytest.mark.parametrize("reply", [
    "Correct and complete.\n- Score: 8/10",
    "Correct and complete.\n- **Score**: 8/10",
    "Correct and complete.\n\n## Score: 8/10",
    "Correct and complete.\n> Score: 8/10",
    "Correct and complete.\nTotal score: 8/10",
])
def test_common_final_score_lines_are_verdicts(reply: str) -> None:
    """A markdown bullet, heading or quote before the judge's own last-line score (or "Total
    score") was read before the colon rule and is a verdict still."""
    got = parse_grade(reply)
    assert got is not None and got[0] == pytest.approx(0.8), reply


# ---------------------------------------------------------------- normalised comparison


@pytest.mark.parametrize(("a", "b"), [
    ("- 1990\n- 1995", "* 1990\n* 1995"),
    ("- 1990\n- 1995", "1990 1995"),
    ("555-123-4567", "(555) 123-4567"),
    ("COVID-19", "COVID 19"),
    ("GPT-4", "gpt 4"),
    ("2020-01-01", "2020 01 01"),
    ("5-10", "5 - 10"),
    ("x-1", "x - 1"),
])
def test_formatting_only_differences_still_agree(a: str, b: str) -> None:
    """Markdown bullets are not operators, and a hyphen between two operands (a range, a
    date, a phone number, "COVID-19") is the punctuation it always was."""
    assert normalise_text(a) == normalise_text(b)


@pytest.mark.parametrize(("a", "b"), [
    ("-5", "5"), ("The answer is -5.", "The answer is 5."), ("2+2", "2-2"), ("x - 1", "x + 1"),
    ("(-3)", "(3)"), ("= -2", "= 2"), ("x < 5", "x > 5"), ("3 * 4", "3 / 4"),
])
def test_signs_and_operators_still_count(a: str, b: str) -> None:
    assert normalise_text(a) != normalise_text(b)


def test_a_bulleted_score_and_reason_pair_is_a_verdict() -> None:
    got = parse_grade("Checked the facts.\n- Score: 8/10\n- Reason: right city, no source")
    assert got == (pytest.approx(0.8), "right city, no source")
