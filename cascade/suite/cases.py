"""Suite cases: one question a JSONL line, with what a right answer looks like.

Numpy-free: the replay provider reaches the recordings through this package.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cascade.errors import ConfigError
from cascade.messages import Message, normalise_messages
from cascade.suite.grading import check_grader_name

__all__ = ["RECORDINGS_FILE", "Case", "load_cases", "parse_case", "read_jsonl", "suite_files",
           "unique_cases"]

RECORDINGS_FILE = "recordings.jsonl"


@dataclass(frozen=True, kw_only=True)
class Case:
    """One question of a suite, with what a right answer looks like."""

    id: str
    messages: tuple[Message, ...]
    expected: Any = None
    grader: str = "normalised"
    tags: tuple[str, ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""
    """File and line, for error messages."""

    @property
    def group(self) -> str:
        """The mix the case belongs to (first tag), for distribution-shift checks."""
        return self.tags[0] if self.tags else ""


    @property
    def labelled(self) -> bool:
        """Whether the case says what a right answer is: an ``expected`` answer, or a grader of
        its own (a function needs no expected answer). An unlabelled case is recorded traffic
        that ``cascade label`` may ask a person or a judge model to label."""
        return self.expected is not None or ":" in self.grader

    @property
    def prompt(self) -> str:
        """The request text: the last user message (what a router reads)."""
        users = [m.content for m in self.messages if m.role == "user"]
        return users[-1] if users else (self.messages[-1].content if self.messages else "")


def suite_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.glob("*.jsonl") if p.name != RECORDINGS_FILE)
    raise ConfigError("suite not found (give a folder of JSONL files or one JSONL file)",
                      source=str(path))


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line; a byte that is not UTF-8 is a
    ConfigError naming its line (it was a UnicodeDecodeError traceback). Lines end at ``\n``
    only: ``str.splitlines`` also broke a line at a U+2028 or U+0085 inside a JSON string."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror}", source=str(path)) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        at = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(f"line {at} is not UTF-8 text (byte 0x{data[e.start]:02x} at "
                          f"column {col})", source=str(path)) from None
    for i, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise ConfigError(f"line {i} is not valid JSON: {e}", source=str(path)) from None
        if not isinstance(obj, dict):
            raise ConfigError(f"line {i} must be a JSON object", source=str(path))
        yield i, obj


def _check_schema(schema: Any, where: str) -> None:
    """A json_schema case's schema must be one: an invalid one crashed grading (UnknownType,
    TypeError) only after every rung had been recorded."""
    if not isinstance(schema, Mapping):
        raise ConfigError("grader 'json_schema' needs the schema as 'expected'", source=where,
                          key="expected")
    import jsonschema  # type: ignore[import-untyped,unused-ignore]

    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        raise ConfigError(f"is not a valid JSON Schema: {e.message}", source=where,
                          key="expected") from None


_CASE_KEYS = ("id", "messages", "expected", "grader", "tags", "metadata")


def _check_gradable(expected: Any, grader: str, where: str) -> None:
    """An ``expected`` the grader can read: ``"forty"`` under ``numeric`` (or ``12`` under
    ``choice``) graded every answer wrong, silently."""
    from cascade.text import NORMALISERS

    norm = NORMALISERS[grader]
    for exp in expected if isinstance(expected, list) else [expected]:
        number = grader == "numeric" and isinstance(exp, (int, float)) and not isinstance(
            exp, bool)
        if not number and (isinstance(exp, (list, dict)) or norm(str(exp)) is None):
            what = "a number" if grader == "numeric" else "an option letter (A, B, ...)"
            raise ConfigError(f"expected {exp!r} is not {what}, so the {grader} grader "
                              "could never match it", source=where, key="expected")


def parse_case(obj: Mapping[str, Any], where: str) -> Case:
    for k in ("id", "messages"):
        if k not in obj:
            raise ConfigError(f"a case needs {k!r}", source=where)
    unknown = sorted(set(obj) - set(_CASE_KEYS))
    if unknown:  # "expectd" left the case unlabelled, "grade" took the default grader
        raise ConfigError(f"unknown key {unknown[0]!r}; a case has {', '.join(_CASE_KEYS)} "
                          "(anything else goes in metadata)", source=where, key=unknown[0])
    grader = check_grader_name(obj.get("grader", "normalised"), where)
    if grader == "json_schema":
        _check_schema(obj.get("expected"), where)
    if grader in ("numeric", "choice") and obj.get("expected") is not None:
        _check_gradable(obj["expected"], grader, where)
    tags = obj.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise ConfigError("tags must be a list of strings", source=where, key="tags")
    try:
        messages = normalise_messages(messages=obj["messages"])
    except ConfigError as e:
        raise ConfigError(str(e), source=where, key="messages") from None
    return Case(id=str(obj["id"]), messages=messages, expected=obj.get("expected"),
                grader=grader, tags=tuple(tags), metadata=dict(obj.get("metadata") or {}),
                source=where)


def unique_cases(cases: Iterable[Case], hint: str = "") -> list[Case]:
    """``cases`` as a list, refusing an id seen before (labels and recordings are keyed by
    id: a repeat would count one case's evidence twice)."""
    out: list[Case] = []
    seen: dict[str, str] = {}
    for case in cases:
        if case.id in seen:
            raise ConfigError(f"case id {case.id!r} repeats (first at {seen[case.id]}{hint})",
                              source=case.source)
        seen[case.id] = case.source
        out.append(case)
    return out


def load_cases(path: str | os.PathLike[str]) -> list[Case]:
    """Read a suite: every ``*.jsonl`` of a folder (but the recordings) or one file."""
    p = Path(path)
    cases = unique_cases(parse_case(obj, f"{f}:{i}") for f in suite_files(p)
                         for i, obj in read_jsonl(f))
    if not cases:
        raise ConfigError("the suite holds no cases", source=str(p))
    return cases


