"""The production loop end to end on a loopback server: traffic through ``Cascade(audit_log=...)``
with shadow checks and feedback → ``cascade suite from-log`` → ``cascade tune`` → a TUNED.toml
that loads and answers."""

from __future__ import annotations

import gc
import io
import json
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cascade import Cascade
from cascade.cli import main
from cascade.config import load_config
from cascade.messages import Request
from cascade.suite import load_cases
from cascade.trace import Answer, Attempt
from tests.loopback import LoopbackServer, RecordedRequest, Reply, openai_reply

QUESTIONS = {f"What is {a} plus {a + 3}?": str(2 * a + 3) for a in range(1, 13)}


class BriefAudit:
    """An audit log of exactly the shape ``cascade.suite.fromlog`` is written against (Unix-seconds
    timestamps, the whole ``Answer.to_dict()`` under ``answer``); stands in for
    ``cascade.audit`` where that is not there yet."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def _write(self, line: dict[str, Any]) -> None:
        with self._lock, self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")

    def on_answer(self, request: Request, answer: Answer | None,
                  error: BaseException | None) -> None:
        assert answer is not None, error
        self._write({"type": "answer", "request_id": answer.request_id, "timestamp": time.time(),
                     "client": None, "ladder": "test",
                     "messages": [m.to_dict() for m in request.messages],
                     "answer": answer.to_dict(), "cost_usd": answer.cost_usd,
                     "latency_ms": answer.latency_ms})

    def on_shadow(self, request: Request, accepted: Attempt, shadow: Attempt,
                  agreed: bool | None) -> None:
        # Joined by the request's id. (Joining by ``id(request)`` until the answer line was
        # written, as this did, broke when a freed request's id() was reused: a shadow line
        # then carried another request's id, once in a CI run.)
        assert request.id
        self._write({"type": "shadow", "request_id": request.id, "timestamp": time.time(),
                     "accepted": accepted.to_dict(), "shadow": shadow.to_dict(),
                     "agreed": agreed})

    def feedback(self, request_id: str, correct: bool, expected: str | None = None,
                 client: str | None = None) -> None:
        self._write({"type": "feedback", "request_id": request_id, "timestamp": time.time(),
                     "correct": correct, "expected": expected, "client": client})


def _server(server: LoopbackServer) -> dict[str, int]:
    """big is always right; small is right, and sure, on every other question."""
    order = {q: i for i, q in enumerate(QUESTIONS)}
    calls = {"small": 0, "big": 0}

    def handle(req: RecordedRequest) -> Reply:
        body = req.json
        q, model = body["messages"][-1]["content"], body["model"]
        calls[model] += 1
        right = QUESTIONS[q]
        good = model == "big" or order[q] % 2 == 0
        text = right if good else "maybe 7"
        lp = math.log(0.97 if good else 0.35)
        return openai_reply(text, model=model, prompt_tokens=30, completion_tokens=4,
                            logprobs=[(text[:3], lp, {text[:3]: lp})])

    server.script(handle)
    return calls


def loop_ladder(path: Path, base_url: str, *, small_threshold: float = 0.9,
                cache: bool = True) -> Path:
    """small → big on ``base_url``, both scored by log-probability confidence, every early
    answer shadowed; written to ``path``."""
    rungs = "".join(f'''
[[rungs]]
model = "{m}"
provider = "openai-compatible"
base_url = "{base_url}"
logprobs = true
input_usd_per_mtok = {i}
output_usd_per_mtok = {o}
thresholds = {{ confidence = {th} }}
''' for m, i, o, th in (("small", 0.1, 0.4, small_threshold), ("big", 5.0, 15.0, 0.9)))
    path.write_text(rungs + f'''
[[verifiers]]
name = "confidence"
source = "logprobs"

[policy]
shadow_rate = 1.0

[cache]
{"" if cache else "enabled = false"}
directory = "{path.parent / 'cache'}"
''')
    return path


def _real_audit(path: Path) -> Any:
    from cascade.audit import AuditLog

    return AuditLog(path)


@pytest.mark.parametrize("make_log", [BriefAudit, _real_audit], ids=["brief-shape", "audit"])
def test_serve_log_from_log_tune(openai_server: LoopbackServer, tmp_path: Path,
                                 make_log: Callable[[Path], Any]) -> None:
    calls = _server(openai_server)
    ladder = loop_ladder(tmp_path / "ladder.toml", openai_server.base_url)
    log = tmp_path / "audit.jsonl"
    with Cascade(load_config(ladder), audit_log=make_log(log)) as c:
        answers = [c.answer(q) for q in QUESTIONS]
        repeats = [c.answer(q) for q in list(QUESTIONS)[:4]]  # cache hits
        assert c.drain_shadows(10)
        assert all(a.cache_hit for a in repeats)
        for i, a in enumerate(answers):  # a user confirms half, corrects-or-confirms the rest
            c.feedback(a.request_id, True, QUESTIONS[list(QUESTIONS)[i]] if i % 2 else None)
        if hasattr(c.audit_log, "flush"):
            c.audit_log.flush()
    gc.collect()  # the leaked sockets (see the mark) are reported here, inside this test
    n = len(QUESTIONS)
    assert calls["small"] == n and calls["big"] == n  # half climbed, half were shadowed

    suite = tmp_path / "suite"
    out = io.StringIO()
    assert main(["suite", "from-log", str(log), "--out", str(suite), "--config", str(ladder),
                 "--json"], out=out, err=io.StringIO()) == 0
    stats = json.loads(out.getvalue())
    assert stats["cases"] == n and stats["labelled"] == n and stats["cache_hits"] == 4
    cases = load_cases(suite)
    assert {c.messages[-1].content: c.expected for c in cases} == QUESTIONS
    # fill what the climb never reached (nothing, when every shadow line joined its request)
    assert main(["record", str(suite), "--config", str(ladder), "--no-progress"],
                out=io.StringIO(), err=io.StringIO()) == 0
    if make_log is BriefAudit:
        assert calls == {"small": n, "big": n}  # every rung answer came from the log

    tuned = tmp_path / "TUNED.toml"
    out = io.StringIO()
    assert main(["tune", str(suite), "--config", str(ladder), "--max-accuracy-drop", "0.05",
                 "--out", str(tuned), "--json"], out=out, err=io.StringIO()) == 0
    report = json.loads(out.getvalue())
    cfg = load_config(tuned)
    assert [r.model for r in cfg.rungs][-1] == "big"
    assert report["expected"]["accuracy"]["estimate"] == 1.0  # small trusted only where right
    with Cascade(cfg) as c2:
        a = c2.answer(list(QUESTIONS)[1], cache=False)
    assert a.verified and a.text == QUESTIONS[list(QUESTIONS)[1]]
