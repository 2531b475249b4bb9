"""Breaks found walking the README's loop (serve → audit log → from-log → record → label → tune
→ reload) by hand; each test fails on the code it was written against."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

from cascade import Cascade
from cascade.audit import AuditLog
from cascade.cli import main
from cascade.config import load_config
from tests.loopback import LoopbackServer, RecordedRequest, Reply, openai_reply
from tests.test_loop import loop_ladder

QUESTIONS = {f"What is {a} plus {a + 3}?": str(2 * a + 3) for a in range(1, 9)}


def _ladder(path: Path, base_url: str, small_threshold: float) -> Path:
    return loop_ladder(path, base_url, small_threshold=small_threshold, cache=False)


def test_eval_of_a_from_log_suite_does_not_call_the_top_rungs_shadow_answers_unverified(
        openai_server: LoopbackServer, tmp_path: Path) -> None:
    """Every request is accepted by small and shadowed by big, whose answers (confidence 0.97,
    threshold 0.9) would verify. from-log keeps a shadow answer with no verdicts (the top
    rung's verifiers never judged it, and the audit log has no log-probabilities to judge it
    by), ``cascade record`` does not fill them (the recording exists), and ``cascade eval`` of
    a setting that escalates to big then reports every one of big's answers as unverified
    (``unverified_rate`` 1.0, recall 0): a replay artefact, not what the ladder would do.
    Unknown (None) or verified would both be right; "unverified" is not: they are now left
    out of the verified figures and counted as ``verified_unknown``."""

    def handle(req: RecordedRequest) -> Reply:
        q, model = req.json["messages"][-1]["content"], req.json["model"]
        text, lp = QUESTIONS[q], math.log(0.97)
        return openai_reply(text, model=model, prompt_tokens=30, completion_tokens=4,
                            logprobs=[(text, lp, {text: lp})])

    openai_server.script(handle)
    ladder = _ladder(tmp_path / "ladder.toml", openai_server.base_url, 0.9)
    log = tmp_path / "audit.jsonl"
    audit = AuditLog(log)
    with Cascade(load_config(ladder), audit_log=audit) as c:
        answers = [c.answer(q) for q in QUESTIONS]
        assert c.drain_shadows(10)
        for a in answers:
            c.feedback(a.request_id, True)
        audit.flush()
    assert all(a.model == "small" and a.verified for a in answers)

    suite = tmp_path / "traffic"
    err = io.StringIO()
    assert main(["suite", "from-log", str(log), "--out", str(suite), "--config", str(ladder)],
                out=io.StringIO(), err=err) == 0, err.getvalue()
    assert main(["record", str(suite), "--config", str(ladder), "--no-progress"],
                out=io.StringIO(), err=io.StringIO()) == 0
    # a setting under which small never exits early: every case is big's
    strict = _ladder(tmp_path / "strict.toml", openai_server.base_url, 1.0)
    out = io.StringIO()
    assert main(["eval", str(suite), "--config", str(strict), "--recorded-with", str(ladder),
                 "--json"], out=out, err=io.StringIO()) == 0
    report = json.loads(out.getvalue())
    big = report["rungs"][-1]
    assert big["reached"] == len(QUESTIONS)
    assert big["unverified_rate"] in (0.0, None), big
    assert report["verified_unknown"] == len(QUESTIONS)
