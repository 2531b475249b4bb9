"""The verified-answer cache: only verified answers, damaged entries never served, safe in
parallel."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
from pathlib import Path

import pytest

from cascade.cache import AnswerCache, cache_key
from cascade.errors import CacheError
from cascade.trace import Answer, Attempt, Verdict


def _answer(text: str = "Canberra", verified: bool = True) -> Answer:
    a = Attempt(rung=0, model="m", provider="openai", status="accepted", text=text,
                verdicts=[Verdict(passed=True, reason="ok", verifier="refusal")],
                input_tokens=5, output_tokens=1, cost_usd=1e-6)
    return Answer(text=text, model="m", verified=verified, attempts=[a], cost_usd=1e-6)


def test_round_trip_keeps_the_trace(tmp_path: Path) -> None:
    c = AnswerCache(tmp_path)
    k = cache_key({"q": 1})
    c.set(k, _answer())
    got = c.get(k)
    assert got is not None and got.text == "Canberra"
    assert got.attempts[0].verdicts[0].verifier == "refusal"
    assert c.stats()["entries"] == 1
    assert c.clear() == 1 and c.get(k) is None


def test_unverified_answers_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="only verified"):
        AnswerCache(tmp_path).set("k", _answer(verified=False))


def test_tampered_or_misplaced_entry_is_dropped_not_served(tmp_path: Path) -> None:
    c = AnswerCache(tmp_path)
    k1, k2 = cache_key({"q": 1}), cache_key({"q": 2})
    c.set(k1, _answer("right"))
    raw = c._db.get(k1)
    c._db.set(k2, raw)  # an entry stored under the wrong key
    assert c.get(k2) is None and c._db.get(k2) is None
    raw["answer"] = raw["answer"].replace("right", "wrong")  # body no longer matches checksum
    c._db.set(k1, raw)
    assert c.get(k1) is None


def test_corrupt_database_file_gives_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "cache.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(CacheError, match=r"corrupt.*cascade cache clear"):
        AnswerCache(tmp_path).get("k")


def test_locked_database_gives_a_clear_error(tmp_path: Path) -> None:
    c = AnswerCache(tmp_path, timeout_s=0.1)
    c.set("k", _answer())
    con = sqlite3.connect(tmp_path / "cache.db", timeout=0)
    con.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(CacheError, match="locked"):
            c.set("k2", _answer())
    finally:
        con.rollback()
        con.close()


def _writer(directory: str, worker: int, n: int) -> None:
    c = AnswerCache(directory)
    for i in range(n):
        c.set(cache_key({"w": worker, "i": i}), _answer(f"{worker}-{i}"))
    c.close()


def test_several_processes_write_at_once(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 40)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    c = AnswerCache(tmp_path)
    for w in range(4):
        for i in range(40):
            got = c.get(cache_key({"w": w, "i": i}))
            assert got is not None and got.text == f"{w}-{i}"


def _endless_writer(directory: str) -> None:
    c = AnswerCache(directory)
    i = 0
    while True:  # killed from outside, mid-write
        c.set(cache_key({"i": i}), _answer("x" * (i % 50_000)))
        i += 1


def test_a_killed_writer_leaves_only_whole_entries(tmp_path: Path) -> None:
    import os
    import signal
    import time

    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_endless_writer, args=(str(tmp_path),))
    p.start()
    c = AnswerCache(tmp_path)
    deadline = time.monotonic() + 30
    while c.stats()["entries"] < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert p.pid is not None
    os.kill(p.pid, signal.SIGKILL)
    p.join(10)
    keys = list(c._db.iterkeys())
    assert len(keys) >= 20
    for k in keys:
        got = c.get(k)
        assert got is not None and got.verified, k
