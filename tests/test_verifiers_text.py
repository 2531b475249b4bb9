"""The shared text helpers: JSON extraction and the answer normalisers, on messy real replies."""

from __future__ import annotations

import pytest

from cascade.text import (
    JSONExtractError,
    extract_choice,
    extract_json,
    extract_number,
    json_path,
    normalise_text,
    same_answer,
)


@pytest.mark.parametrize(("text", "expected"), [
    ('{"city": "Canberra"}', {"city": "Canberra"}),
    ('```json\n{"city": "Canberra", "pop": 456692}\n```', {"city": "Canberra", "pop": 456692}),
    ('Sure! Here is the JSON you asked for:\n```\n[1, 2, 3]\n```\nLet me know if you need more.',
     [1, 2, 3]),
    ('The result is {"ok": true, "items": [{"id": 1}]}. Hope this helps!',
     {"ok": True, "items": [{"id": 1}]}),
    ('Notes [1] aside, the answer: {"a": 1}', {"a": 1}),
    ('```python\nx = 1\n```\n```json\n{"a": 2}\n```', {"a": 2}),
    ('\ufeff  {"a": "ü"}  ', {"a": "ü"}),
    ('{"a": 1} and again {"a": 1}', {"a": 1}),
])
def test_extract_json_finds_the_value(text: str, expected: object) -> None:
    assert extract_json(text) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("", "empty"),
    ("The capital is Canberra.", "no JSON"),
    ('{"a": 1} or maybe {"a": 2}', "2 different JSON values"),
    ("```json\n{'a': 1,}\n```", "code block is not valid JSON"),
])
def test_extract_json_failures_say_why(text: str, message: str) -> None:
    with pytest.raises(JSONExtractError, match=message):
        extract_json(text)


@pytest.mark.parametrize(("text", "expected"), [
    ("1,234.50", 1234.5),
    ("$12", 12.0),
    ("It costs $1,200.", 1200.0),
    ("The answer is 42 (I checked it in 3 steps).", 42.0),
    ("First 3 + 4 = 7, then 7 * 6 = 42", 42.0),
    ("#### 18", 18.0),
    ("\\boxed{-3.5}", -3.5),
    ("Temperature: −5 °C", -5.0),
    ("x = 3.5e2", 350.0),
    ("We had 5 apples and ate 2, leaving 3.", 3.0),
    ("no digits here", None),
])
def test_extract_number(text: str, expected: float | None) -> None:
    assert extract_number(text) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("B", "B"),
    ("(c)", "C"),
    ("The answer is (B).", "B"),
    ("Answer: d", "D"),
    ("**E**", "E"),
    ("B) Canberra", "B"),
    ("A good question. Option A is wrong; the correct answer is C because of entropy.", "C"),
    ("I would pick option D here.", "D"),
    ("The answer is a bit subtle and depends on context.", None),
    ("A careful reading shows both (A) and (C) are plausible.", None),
    ("I am not sure.", None),
])
def test_extract_choice(text: str, expected: str | None) -> None:
    assert extract_choice(text) == expected


def test_normalise_text_ignores_case_punctuation_and_articles() -> None:
    assert normalise_text("The  Eiffel Tower!") == normalise_text("eiffel tower")
    assert normalise_text("Canberra.") != normalise_text("Sydney.")


def test_same_answer_uses_tolerance_for_numbers_only() -> None:
    assert same_answer(0.1 + 0.2, 0.3)
    assert not same_answer(1.0, 1.01)
    assert same_answer(1.0, 1.01, tolerance=0.02)
    assert not same_answer(None, None)
    assert same_answer("b", "b")


def test_json_path_formats_keys_and_indices() -> None:
    assert json_path(["items", 2, "price"]) == "$.items[2].price"
    assert json_path(["odd key"]) == '$["odd key"]'


def test_verifiers_depend_only_on_the_verifier_protocol() -> None:
    """Built-in verifiers are plugins like any other: they import ``cascade.verify`` (the
    protocol, which re-exports what a verifier builds) and the shared ``cascade.text``, never
    the engine, the config loader or another room of the house."""
    import ast
    from pathlib import Path

    import verifiers

    allowed = {"cascade.verify", "cascade.text"}
    for path in Path(verifiers.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                if name == "cascade" or name.startswith("cascade."):
                    assert name in allowed, f"{path.name} imports {name}"


def test_the_text_helpers_live_in_cascade_not_in_the_plugin_package() -> None:
    from pathlib import Path

    import cascade.text
    import verifiers

    assert not (Path(verifiers.__file__).parent / "_text.py").exists()
    assert set(cascade.text.NORMALISERS) == {"exact", "normalised", "numeric", "choice"}
