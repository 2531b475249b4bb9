"""The README's ``cascade tune`` transcripts say what the command prints today.

A fenced block holding ``$ cascade tune ...`` lines is a transcript: each command is run (in a
temporary folder; ``../shared`` and ``fixtures/`` resolved against the checkout) and every line
printed under it in the README, other than ``...``, must be a line of what it printed now;
``$ tail -N FILE`` must show the file's last N lines. The tuner is deterministic (seed 0), so a
figure that moves is a README that went stale, which is what this test is for: the printed
figures are the project's claims.
"""

from __future__ import annotations

import io
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cascade.cli import main

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "cascades"
_FENCE = re.compile(r"^```[a-z]*[ \t]*\n(?P<body>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


@dataclass
class Step:
    """One ``$`` command of a transcript and the lines the README prints under it."""

    line: int
    argv: list[str]
    expected: list[str] = field(default_factory=list)


def transcripts(text: str) -> list[list[Step]]:
    """The README's blocks that hold a ``$ cascade tune`` command, as steps."""
    out: list[list[Step]] = []
    for m in _FENCE.finditer(text):
        body = m.group("body")
        if "$ cascade tune" not in body:
            continue
        first = text.count("\n", 0, m.start("body")) + 1
        steps: list[Step] = []
        for i, raw in enumerate(body.splitlines()):
            if raw.startswith("$ "):
                argv = shlex.split(raw[2:].split("  #")[0])
                steps.append(Step(first + i, argv))
            elif steps and raw.strip() not in ("", "...") and raw.strip() != "…":
                steps[-1].expected.append(raw.rstrip())
        out.append(steps)
    return out


def _resolve(arg: str) -> str:
    if arg.startswith("../shared/"):
        return str(REPO.parent / arg.removeprefix("../"))
    if arg.startswith("fixtures/"):
        return str(REPO / arg)
    return arg


BLOCKS = transcripts((REPO / "README.md").read_text(encoding="utf-8"))


def test_the_readme_has_tune_transcripts() -> None:
    assert len(BLOCKS) >= 3
    assert all(any(s.argv[:2] == ["cascade", "tune"] for s in b) for b in BLOCKS)


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data/cascades beside the checkout")
@pytest.mark.parametrize("steps", BLOCKS, ids=[f"README:{b[0].line}" for b in BLOCKS])
def test_readme_tune_transcript_prints_what_it_says(steps: list[Step], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for step in steps:
        if step.argv[0] == "tail":
            n, name = int(step.argv[1].lstrip("-")), step.argv[2]
            got = (tmp_path / name).read_text(encoding="utf-8").splitlines()[-n:]
            assert [g.rstrip() for g in got] == step.expected, f"README line {step.line}"
            continue
        assert step.argv[:2] == ["cascade", "tune"], f"README line {step.line}: {step.argv}"
        out, err = io.StringIO(), io.StringIO()
        code = main([_resolve(a) for a in step.argv[1:]], out=out, err=err)
        assert code == 0, err.getvalue()
        printed = {line.rstrip() for line in (out.getvalue() + err.getvalue()).splitlines()}
        stale = [e for e in step.expected if e not in printed]
        assert not stale, (f"README line {step.line}: these lines are not what "
                           f"`{' '.join(step.argv)}` prints now:\n" + "\n".join(stale)
                           + "\n--- it prints:\n" + out.getvalue() + err.getvalue())
