"""Fixture suites: cases, graders, recorded responses, and the outcome table the tuner works on.

A suite is a folder of JSONL files (or one JSONL file); one case a line::

    {"id": "q1", "messages": [{"role": "user", "content": "2+2?"}], "expected": "4",
     "grader": "numeric", "tags": ["arith"], "metadata": {}}

A case without ``expected`` (and without a grader function of its own) is *unlabelled*: recorded
traffic the tuner uses where that is exact and ``cascade label`` may ask to have labelled.

Modules: :mod:`~cascade.suite.cases`, :mod:`~cascade.suite.grading`,
:mod:`~cascade.suite.recordings` (all numpy-free: the replay provider imports them) and
:mod:`~cascade.suite.outcomes` (numpy; imported only when one of its names is asked for).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from cascade.suite.cases import RECORDINGS_FILE, Case, load_cases
from cascade.suite.grading import GRADERS, grade
from cascade.suite.recordings import (
    Recording,
    RecordingStore,
    answer_call,
    messages_hash,
    request_hash,
)

if TYPE_CHECKING:
    from cascade.suite.outcomes import (
        AGREEMENT_NORMALISERS,
        OutcomeTable,
        agreement_arrays,
        is_shared_outcomes,
        load_outcome_table,
        load_shared_outcomes,
        table_from_recordings,
    )

__all__ = [
    "AGREEMENT_NORMALISERS",
    "GRADERS",
    "RECORDINGS_FILE",
    "Case",
    "OutcomeTable",
    "Recording",
    "RecordingStore",
    "agreement_arrays",
    "answer_call",
    "grade",
    "is_shared_outcomes",
    "load_cases",
    "load_outcome_table",
    "load_shared_outcomes",
    "messages_hash",
    "request_hash",
    "table_from_recordings",
]

_OUTCOMES = frozenset({"AGREEMENT_NORMALISERS", "OutcomeTable", "agreement_arrays",
                       "is_shared_outcomes", "load_outcome_table", "load_shared_outcomes",
                       "table_from_recordings"})


def __getattr__(name: str) -> Any:
    """The outcome-table names, loaded on first use so that replay never pulls in numpy."""
    if name in _OUTCOMES:
        return getattr(importlib.import_module("cascade.suite.outcomes"), name)
    raise AttributeError(f"module 'cascade.suite' has no attribute {name!r}")
