"""Text helpers shared by the verifiers and the suite's graders: JSON extraction, normalisers.

Models wrap answers in prose and code fences and write numbers and choices in many ways; these
helpers pull out the part that is compared, in one place, so a grader and the agreement verifier
read answers alike. A leaf module: it imports nothing from the package.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import string
import unicodedata
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any

__all__ = [
    "NORMALISERS",
    "JSONExtractError",
    "Normaliser",
    "extract_choice",
    "extract_json",
    "extract_number",
    "json_path",
    "normalise_exact",
    "normalise_text",
    "same_answer",
]


class JSONExtractError(ValueError):
    """The text holds no JSON value, or more than one candidate and no way to choose."""


_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\r?\n(.*?)```", re.DOTALL)


def extract_json(text: str) -> Any:
    """The JSON value an answer carries: whole text, a fenced block, or one object/array in prose.

    Order: the whole text; fenced blocks (```json first); then every ``{``/``[`` that starts a
    complete JSON value. Prose around a single value is ignored; two different values are
    ambiguous and rejected rather than guessed.
    """
    stripped = text.strip().lstrip("\ufeff")
    if not stripped:
        raise JSONExtractError("the answer is empty")
    try:
        return json.loads(stripped)
    except ValueError:
        pass
    fences = _FENCE.findall(stripped)
    fences.sort(key=lambda f: f[0].lower() != "json")  # stable: ```json blocks first
    fence_errors: list[str] = []
    for _lang, body in fences:
        try:
            return json.loads(body.strip())
        except ValueError as e:
            fence_errors.append(str(e))
    found = _scan_values(stripped)
    objects = [v for v in found if isinstance(v, dict)]
    if objects:  # "see [1]" in prose is a citation; an object is what structured answers are
        found = objects
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        first = found[0]
        if all(v == first for v in found[1:]):
            return first
        raise JSONExtractError(
            f"found {len(found)} different JSON values in the text; expected exactly one"
        )
    if fence_errors:
        raise JSONExtractError(f"the code block is not valid JSON: {fence_errors[0]}")
    raise JSONExtractError("no JSON object or array found in the text")


def _scan_values(text: str) -> list[Any]:
    """Top-level JSON objects/arrays embedded in prose, left to right, not nested in each other."""
    decoder = json.JSONDecoder()
    out: list[Any] = []
    i = 0
    while i < len(text):
        if text[i] in "{[":
            try:
                value, end = decoder.raw_decode(text, i)
            except ValueError:
                i += 1
                continue
            if isinstance(value, (dict, list)):
                out.append(value)
            i = end  # skip past the whole value, so nested ones do not count
        else:
            i += 1
    return out


def json_path(parts: Any) -> str:
    """``$.items[2].price`` from a sequence of keys and indices (jsonschema, pydantic locations)."""
    path = "$"
    for p in parts:
        if isinstance(p, int):
            path += f"[{p}]"
        elif isinstance(p, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", p):
            path += f".{p}"
        else:
            path += f"[{json.dumps(str(p))}]"
    return path


# ---------------------------------------------------------------- normalisers

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation) | {"“", "”", "‘", "’", "«", "»", "—", "–", "…", "。", "、", "，"}


def normalise_exact(text: str) -> str:
    """Exact comparison, forgiving only surrounding white space."""
    return text.strip()


_BETWEEN = r"(?<=[\w)])\s?(?:{})\s?(?=[\w(])"
"""An operator between operands, so markdown ("**bold**", "> quote", "# Heading") is untouched."""
_SYMBOLS = tuple((re.compile(pattern), f" {word} ", frozenset(chars))
                 for pattern, word, chars in (
    (r"[-−–](?=\s?\d)|(?<=\d)[-−–]|(?<=\d\s)[-−–]", "minus", "-−–"),
    (r"\+", "plus", "+"),
    (r"(?<=\w)#", "sharp", "#"),
    (r"%", "percent", "%"),
    (r"\^", "pow", "^"),
    (r"(?<=\d)\.(?=\d)", "point", "."),
    (_BETWEEN.format(r"[*×]"), "times", "*×"),
    (_BETWEEN.format(r"[/÷]"), "over", "/÷"),
    (_BETWEEN.format(r"≤|<="), "le", "≤<"),
    (_BETWEEN.format(r"≥|>="), "ge", "≥>"),
    (_BETWEEN.format(r"≠|!="), "ne", "≠!"),
    (_BETWEEN.format(r"<"), "lt", "<"),
    (_BETWEEN.format(r">"), "gt", ">"),
    (_BETWEEN.format(r"="), "eq", "="),
))
"""Signs and operators, spelt out before punctuation is dropped: SQuAD-style normalising alone
reads "-5" and "5", "2+2" and "2-2", "x < 5" and "x > 5", "C++" and "C" as the same answer.
A hyphen that is no sign ("well-known", "5-10": see ``_PLAIN``) stays punctuation."""
_PLAIN = (
    (re.compile(r"(?m)^[ \t]*[-*+•][ \t]+"), frozenset("-*+•")),
    (re.compile(r"(?<=[\w)])(?:[-−–]| [-−–] )(?=[\w(])"), frozenset("-−–")),
)
"""Read as punctuation before ``_SYMBOLS``: a markdown bullet ("- 1990", "* 1990") is no sign
or product, and a hyphen between two operands is a range, a date, a phone number or a name
("5-10", "2020-01-01", "555-1234", "COVID-19") as often as a subtraction: "5-3" still differs
from "5+3", and "-5" (a sign) from "5". Each pattern runs only on text holding one of its
characters (the lookbehinds cost ~10 µs a pattern on a paragraph; most answers hold few)."""


def normalise_text(text: str) -> str:
    """SQuAD-style: Unicode NFKC, case-folded, punctuation and English articles dropped; signs
    and operators are spelt out first, so they still count ("-5" is not "5", "x < 5" not
    "x > 5"). One normaliser for graders, the tuner, shadow checks and agreement alike."""
    t = unicodedata.normalize("NFKC", text)
    present = set(t)  # substitutions only remove these characters, never add them
    for plain, chars in _PLAIN:
        if not present.isdisjoint(chars):
            t = plain.sub(" ", t)
    for pattern, word, chars in _SYMBOLS:
        if not present.isdisjoint(chars):
            t = pattern.sub(word, t)
    t = t.casefold()
    t = "".join(" " if ch in _PUNCT else ch for ch in t)
    t = _ARTICLES.sub(" ", t)
    return " ".join(t.split())


_NUMBER = re.compile(
    r"(?<![\w.])[-−+]?\s?[$€£¥]?\s?"
    r"(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|\.\d+)"
)
_FINAL_MARKERS = re.compile(
    r"(?:\\boxed\{|####|final answer\s*(?:is|:)|answer\s*(?:is|:)|=)", re.IGNORECASE
)


def _to_float(token: str) -> float:
    t = token.replace("−", "-").replace(" ", "")
    t = re.sub(r"[$€£¥,]", "", t)
    return float(t)


def extract_number(text: str) -> float | None:
    """The answer's number: the first after the last answer marker, else the last in the text.

    Markers are ``\\boxed{``, ``####``, ``answer is``/``answer:`` and ``=``, so "The answer is 42
    (found in 3 steps)" gives 42, not 3. Thousands separators and currency signs are ignored:
    "$1,234.50" is 1234.5. A trailing sentence period is not a decimal point.
    """
    marker = None
    for marker in _FINAL_MARKERS.finditer(text):  # noqa: B007 - the last one is wanted
        pass
    if marker is not None:
        m = _NUMBER.search(text, marker.end())
        if m is not None:
            return _to_float(m.group())
    matches = _NUMBER.findall(text)
    return _to_float(matches[-1]) if matches else None


def extract_choice(text: str, letters: str = "ABCDE") -> str | None:
    """A multiple-choice letter from a reply, or None when there is no unambiguous one.

    Recognises "B", "(B)", "B) Paris", "**B**", "The answer is (B).", "Answer: b", "option C".
    A capital "A" opening a sentence ("A good question…") is not taken for a choice.
    """
    L = re.escape(letters)
    t = text.strip()
    whole = re.fullmatch(rf"[\(\[*\s]*([{L}{L.lower()}])[\)\]*.:\s]*", t)
    if whole:
        return whole.group(1).upper()
    marked = list(re.finditer(
        rf"(?i:answer|choice|option|correct one)(?:\s+(?i:is|would be|should be|:))?\s*[:\-]?\s*"
        rf"(?:\*\*)?[\(\[]?([{L}])(?![\w'])", t))
    if marked:
        return marked[-1].group(1)
    marked_lower = list(re.finditer(
        rf"(?i:answer)\s*(?i:is|:)\s*(?:\(([{L.lower()}])\)|([{L.lower()}])[.)]?\s*$)", t))
    if marked_lower:
        return next(g for g in marked_lower[-1].groups() if g).upper()
    opening = re.match(rf"[\(\[]([{L}])[\)\]]|([{L}])[\).:](?:\s|$)|\*\*([{L}])\*\*", t)
    if opening:
        return next(g for g in opening.groups() if g)
    boxed = {next(g for g in m.groups() if g)
             for m in re.finditer(rf"[\(\[]([{L}])[\)\]]|\*\*([{L}])\*\*", t)}
    if len(boxed) == 1:
        return boxed.pop()
    return None


Normaliser = Callable[[str], Hashable | None]

NORMALISERS: dict[str, Normaliser] = {
    "exact": normalise_exact,
    "normalised": normalise_text,
    "numeric": extract_number,
    "choice": extract_choice,
}


def same_answer(a: Hashable | None, b: Hashable | None, *, tolerance: float = 1e-6) -> bool:
    """Two normalised answers agree; numbers agree within ``tolerance`` (relative and absolute)."""
    if a is None or b is None:
        return False
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=tolerance, abs_tol=tolerance)
    return a == b


def fence(parts: list[tuple[str, str]], extra: str = "") -> tuple[str, str]:
    """(tag, sections): text a model must read as data, between marker lines that carry a hash
    of everything they enclose, so no enclosed text (a candidate answer) can forge its own END
    line and write instructions after it."""
    digest = hashlib.sha256(extra.encode())
    for title, body in parts:
        digest.update(b"\0" + title.encode() + b"\0" + body.encode())
    tag = digest.hexdigest()[:20]
    sections = "".join(f"\n<<<BEGIN {title} {tag}>>>\n{body}\n<<<END {title} {tag}>>>\n"
                       for title, body in parts)
    return tag, sections


_REGEX_TIMEOUT_S = 0.05
"""How long one schema ``pattern`` may search an answer: Python's ``re`` backtracks
exponentially on patterns such as ``^(\\w+\\s?)*$`` (minutes at 30 characters), holding the
interpreter lock, so a request's schema could stall every request of the service."""


def _search(pattern: str, text: str) -> bool | None:
    """Whether ``pattern`` matches in ``text`` (None: it ran out of time)."""
    import regex  # type: ignore[import-untyped,unused-ignore]

    try:
        return regex.search(pattern, text, timeout=_REGEX_TIMEOUT_S) is not None
    except TimeoutError:
        return None


def _too_slow(pattern: str) -> Any:
    from jsonschema.exceptions import ValidationError  # type: ignore[import-untyped,unused-ignore]

    return ValidationError(f"pattern {pattern!r} took over {_REGEX_TIMEOUT_S * 1000:g} ms on "
                           "the answer (it backtracks): not verified")


def _pattern(validator: Any, patrn: str, instance: Any, schema: Any) -> Iterator[Any]:
    from jsonschema.exceptions import ValidationError  # type: ignore[import-untyped,unused-ignore]

    if validator.is_type(instance, "string"):
        found = _search(patrn, instance)
        if found is None:
            yield _too_slow(patrn)
        elif not found:
            yield ValidationError(f"{instance!r} does not match {patrn!r}")


def _pattern_properties(validator: Any, properties: Mapping[str, Any], instance: Any,
                        schema: Any) -> Iterator[Any]:
    if not validator.is_type(instance, "object"):
        return
    for patrn, subschema in properties.items():
        for k, v in instance.items():
            found = _search(patrn, k)
            if found is None:
                yield _too_slow(patrn)
            elif found:
                yield from validator.descend(v, subschema, path=k, schema_path=patrn)


@functools.cache
def _validator_class() -> Any:
    import jsonschema  # type: ignore[import-untyped,unused-ignore]

    extend: Any = jsonschema.validators.extend  # untyped in jsonschema
    return extend(jsonschema.Draft202012Validator, {
        "pattern": _pattern, "patternProperties": _pattern_properties})


def json_validator(schema: Mapping[str, Any], *, check_formats: bool = False) -> Any:
    """A Draft 2020-12 validator of ``schema`` that never leaves the schema and never stalls:
    jsonschema's default registry opens an unknown ``$ref`` with ``urlopen`` (http, https,
    even ``file:``), a network call or a file read on the data path that a request's or a
    suite's schema would choose, and its ``pattern`` uses ``re`` without a time limit. Refs
    inside the schema and to the meta-schemas resolve; any other raises
    ``referencing.exceptions.Unresolvable`` when validation reaches it. A pattern that runs
    past ``_REGEX_TIMEOUT_S`` is a validation error."""
    import referencing

    cls = _validator_class()
    return cls(schema, format_checker=cls.FORMAT_CHECKER if check_formats else None,
               registry=referencing.Registry())
