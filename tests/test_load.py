"""Load: a thousand concurrent requests against a loopback server that misbehaves at random.

Every request must end in an answer or a typed error, none may be lost or given another
request's answer, and afterwards the cache must hold exactly the verified answers.
"""

from __future__ import annotations

import random
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import diskcache
import pytest

from cascade.cache import AnswerCache
from cascade.engine import Cascade
from cascade.errors import CascadeError, NoAnswerError
from cascade.trace import Answer
from tests.loopback import LoopbackServer, RecordedRequest, Reply, openai_error, openai_reply
from tests.verifier_kit import not_idk

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

N = 1000
_QID = re.compile(r"item (\d+)\b")






def question(qid: int) -> str:
    return f"What is the secret of item {qid}?"


def faulty_server_handler(seed: int) -> tuple[Counter[str], Any]:
    """~10% 500s, ~5% resets, ~5% slower than the timeout, ~3% 429s; answers echo the item id.

    ``small`` does not know every 4th item (the climb escalates), ``big`` not every 20th (the
    answer comes back unverified and must not be cached).
    """
    rng = random.Random(seed)  # only the server's loop thread calls the handler
    seen: Counter[str] = Counter()

    def handle(req: RecordedRequest) -> Reply:
        model = req.json["model"]
        m = _QID.search(req.json["messages"][-1]["content"])
        assert m is not None
        qid = int(m.group(1))
        knows = qid % (4 if model == "small" else 20) != 0
        text = f"answer {qid}" if knows else f"I don't know ({qid})"
        r = rng.random()
        if r < 0.10:
            seen["500"] += 1
            return openai_error(500, "overloaded", type="server_error")
        if r < 0.15:
            seen["reset"] += 1
            return Reply(json={"x": "y" * 100}, fault="reset")
        if r < 0.20:
            seen["slow"] += 1
            return openai_reply(text, model=model, delay_s=2.0)
        if r < 0.23:
            seen["429"] += 1
            return openai_error(429, "slow down", type="rate_limit_error",
                                headers={"retry-after": "0.05"})
        seen["ok"] += 1
        return openai_reply(text, model=model, delay_s=rng.uniform(0.0, 0.05))

    return seen, handle


def config(tmp_path: Path, url: str, *, max_attempts: int, failure_threshold: int
           ) -> dict[str, Any]:
    rung: dict[str, Any] = {"provider": "openai-compatible", "base_url": url, "timeout_s": 1.5,
                            "max_tokens": 16}
    return {
        "rungs": [{**rung, "model": "small", "input_usd_per_mtok": 1.0,
                   "output_usd_per_mtok": 2.0},
                  {**rung, "model": "big", "input_usd_per_mtok": 10.0,
                   "output_usd_per_mtok": 20.0}],
        "cache": {"directory": str(tmp_path / "cache")},
        "retry": {"max_attempts": max_attempts, "base_delay_s": 0.05, "max_delay_s": 0.5,
                  "jitter": 0.5},
        "breaker": {"failure_threshold": failure_threshold, "cooldown_s": 30.0},
    }


def _qid_of(text: str) -> int:
    m = re.search(r"(\d+)", text)
    assert m is not None, text
    return int(m.group(1))


async def test_a_thousand_concurrent_requests_with_random_faults(tmp_path: Path) -> None:
    requests = [{"prompt": question(i), "metadata": {"qid": i}} for i in range(N)]
    server = LoopbackServer("openai").start()
    try:
        faults, handle = faulty_server_handler(seed=20240605)
        server.script(handle)
        cfg = config(tmp_path, server.base_url, max_attempts=3, failure_threshold=50)
        t0 = time.monotonic()
        async with Cascade.from_dict(cfg, verifiers=[not_idk]) as c:
            out = await c.aanswer_many(requests, concurrency=N)
        elapsed = time.monotonic() - t0
        calls = len(server.requests)
        server.down()  # for the re-ask below: the port now refuses connections
        again_cfg = config(tmp_path, server.base_url, max_attempts=1, failure_threshold=1)
        t1 = time.monotonic()
        async with Cascade.from_dict(again_cfg, verifiers=[not_idk]) as c:
            again = await c.aanswer_many(requests, concurrency=N)
        again_s = time.monotonic() - t1
    finally:
        server.stop()

    assert len(out) == N
    verified: dict[str, int] = {}  # cache key -> qid
    counts: Counter[str] = Counter()
    for qid, result in enumerate(out):
        if isinstance(result, Answer):
            # the answer belongs to this request: its text, its metadata, every attempt's text
            assert _qid_of(result.text) == qid and result.metadata == {"qid": qid}
            assert all(_qid_of(a.text) == qid for a in result.attempts if a.text)
            assert not result.cache_hit and result.cache_key is not None
            if result.verified:
                assert result.text == f"answer {qid}"
                verified[result.cache_key] = qid
                counts["verified"] += 1
            else:
                # small did not know; big did not know either, or failed for good
                assert qid % 4 == 0 and result.text == f"I don't know ({qid})"
                counts["unverified"] += 1
        else:
            assert isinstance(result, CascadeError), repr(result)
            counts[type(result).__name__] += 1
    assert counts["verified"] > 0.8 * N  # ~95% with this seed; load can add timeouts
    assert counts["unverified"] > 0

    # The cache holds exactly the verified answers, each under its own question's key.
    store = diskcache.Cache(str(tmp_path / "cache"), disk=diskcache.JSONDisk)
    try:
        keys = set(store.iterkeys())
    finally:
        store.close()
    assert keys == set(verified) and len(verified) == counts["verified"]
    cache = AnswerCache(tmp_path / "cache")
    try:
        for key, qid in verified.items():
            hit = cache.get(key)
            assert hit is not None and hit.verified and hit.text == f"answer {qid}"
    finally:
        cache.close()

    # Asked again with the server gone: verified answers come from the cache, nothing else does.
    for qid, result in enumerate(again):
        was = out[qid]
        if isinstance(was, Answer) and was.verified:
            assert isinstance(result, Answer) and result.cache_hit
            assert result.text == f"answer {qid}" and result.cost_usd == 0.0
        else:
            assert isinstance(result, NoAnswerError)
    print(f"\n{N} requests in {elapsed:.1f}s ({calls} calls to the server; faults {dict(faults)})"
          f"; outcomes {dict(counts)}; re-ask from cache in {again_s:.1f}s")
    assert elapsed < 60
