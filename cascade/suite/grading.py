"""Graders: whether an answer text is right for a case. Grades never reach verifiers.

``exact``, ``normalised``, ``contains`` (an expected answer appears, word for word after
normalising, inside a free-text answer: "The capital is Canberra."), ``numeric``, ``choice``,
``json_schema`` (``expected`` is the schema) or ``package.module:function`` (called with
``(text, case)``, returns a bool), resolved by :func:`resolve_grader` alone.

Numpy-free (the replay provider imports this package).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cascade.errors import ConfigError

if TYPE_CHECKING:
    from cascade.suite.cases import Case

__all__ = ["GRADERS", "GRADER_NORMALISER", "check_grader_name", "grade", "resolve_grader"]

GRADERS: tuple[str, ...] = ("exact", "normalised", "contains", "numeric", "choice",
                             "json_schema")
GRADER_NORMALISER = {"exact": "exact", "normalised": "normalised", "contains": "normalised",
                     "numeric": "numeric", "choice": "choice", "json_schema": "exact"}
"""Which normaliser compares two answers the way a grader compares one with the expected: two
answers equal under it get the same grade (what lets the tuner use unlabelled cases exactly)."""


def check_grader_name(grader: Any, where: str) -> str:
    """The grader a case names, if it is one of ours or a dotted path (resolved when grading)."""
    if not isinstance(grader, str) or (grader not in GRADERS and ":" not in grader):
        raise ConfigError(f"grader is {grader!r}; allowed: {', '.join(GRADERS)} or "
                          "'package.module:function'", source=where, key="grader")
    return grader


def resolve_grader(case: Case) -> Callable[[str, Case], Any]:
    """The function a case's dotted-path grader names. The one place a suite names code."""
    from cascade.dotted import config_folder, import_object

    # the suite file's folder is searched, as a config's is for its verifiers
    suite_file = case.source.rpartition(":")[0] or case.source
    try:
        fn = import_object(case.grader, kind="grader", search=config_folder(suite_file),
                           source=case.source, key="grader")
    except ImportError as e:
        raise ConfigError(f"grader {case.grader!r} cannot be imported: {e}", source=case.source,
                          key="grader") from None
    if not callable(fn):
        raise ConfigError(f"grader {case.grader!r} is not callable", source=case.source,
                          key="grader")
    return fn  # type: ignore[no-any-return]


def grade(case: Case, text: str) -> bool:
    """Whether ``text`` answers ``case`` rightly."""
    from cascade.text import NORMALISERS, normalise_text, same_answer

    g = case.grader
    if g == "json_schema":
        import referencing.exceptions

        from cascade.text import JSONExtractError, extract_json, json_validator

        try:
            value = extract_json(text)
        except JSONExtractError:
            return False
        try:
            return bool(json_validator(case.expected).is_valid(value))
        except referencing.exceptions.Unresolvable as e:  # never fetched: a grade is offline
            raise ConfigError(f"the schema's reference {e.ref!r} cannot be resolved (only "
                              "references inside the schema are)", source=case.source,
                              key="expected") from None
    if ":" in g:
        return bool(resolve_grader(case)(text, case))
    if case.expected is None:
        raise ConfigError("has no 'expected' answer to grade against", source=case.source,
                          key="expected")
    expected = case.expected if isinstance(case.expected, list) else [case.expected]
    if g == "contains":
        padded = f" {normalise_text(text)} "
        return any(f" {normalise_text(str(exp))} " in padded for exp in expected)
    norm = NORMALISERS[g]
    got = norm(text)
    for exp in expected:
        want: Any = (float(exp) if g == "numeric" and isinstance(exp, (int, float))
                     else norm(str(exp)))
        if same_answer(got, want):
            return True
    return False
