"""The verified-answer cache: only verified answers, damaged entries never served, safe in
parallel."""

from __future__ import annotations

import multiprocessing as mp
import secrets
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


# ---------------------------------------------------------------- damaged values, HMAC, clear


def _rewrite_values(directory: Path, value: bytes) -> None:
    """Overwrite every stored value blob as a bit flip on disk would."""
    con = sqlite3.connect(directory / "cache.db")
    with con:
        con.execute("UPDATE Cache SET value = ?", (value,))
    con.close()


@pytest.mark.parametrize("damage", ["zlib", "json"])
def test_a_damaged_value_is_dropped_and_missed_not_raised(tmp_path: Path, damage: str) -> None:
    """The README promises damaged entries are dropped and missed: a value that no longer
    decompresses or parses must read as a miss (once), not raise on every lookup."""
    import zlib

    c = AnswerCache(tmp_path)
    k = cache_key({"q": 1})
    c.set(k, _answer())
    c.close()
    _rewrite_values(tmp_path, b"\x00\xffnot zlib" if damage == "zlib"
                    else zlib.compress(b'{"key": truncated'))
    c = AnswerCache(tmp_path)
    assert c.get(k) is None
    assert c.stats()["entries"] == 0  # dropped, so the next lookup is a plain miss
    assert c.get(k) is None
    c.set(k, _answer("again"))  # and the key is usable again
    got = c.get(k)
    assert got is not None and got.text == "again"


def test_a_truncated_value_file_is_dropped_and_missed(tmp_path: Path) -> None:
    """Large values live in their own files; a truncated one is a miss, not an error."""
    c = AnswerCache(tmp_path)
    k = cache_key({"q": "big"})
    c.set(k, _answer(secrets.token_hex(100_000)))  # incompressible: over diskcache's 32 KB
    [value_file] = list(tmp_path.rglob("*.val"))
    value_file.write_bytes(value_file.read_bytes()[:100])
    assert c.get(k) is None
    assert c.stats()["entries"] == 0


def test_entries_are_tamper_evident_under_the_caches_own_secret(tmp_path: Path) -> None:
    """The checksum is for tamper evidence, so it is an HMAC under a secret created with the
    cache (mode 0600): an entry recomputed with plain SHA-256 (what anyone could forge), or
    copied from another cache with its own secret, is dropped, never served."""
    import hashlib
    import json
    import stat

    from cascade.cache import SECRET_FILE

    a, b = AnswerCache(tmp_path / "a"), AnswerCache(tmp_path / "b")
    k = cache_key({"q": 1})
    a.set(k, _answer("right"))
    secret_file = tmp_path / "a" / SECRET_FILE
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert a.secret != b.secret
    forged = dict(a._db.get(k))
    forged["answer"] = forged["answer"].replace("right", "wrong")
    digest = hashlib.sha256(f"{k}\n{forged['answer']}".encode()).hexdigest()
    forged["mac"] = forged["checksum"] = digest
    a._db.set(k, forged)
    assert a.get(k) is None
    a.set(k, _answer("right"))
    b._db.set(k, a._db.get(k))  # a whole, genuine entry from another cache
    assert b.get(k) is None
    got = a.get(k)
    assert got is not None and got.text == "right"
    assert json.loads(json.dumps(a._db.get(k)))["mac"] != digest
    # the secret survives reopening: entries stay valid across processes and restarts
    a.close()
    got = AnswerCache(tmp_path / "a").get(k)
    assert got is not None and got.text == "right"


def test_clear_refuses_a_directory_holding_other_files(tmp_path: Path) -> None:
    """`cascade cache clear --force` once removed the whole tree: a cache pointed at a folder
    with the user's files must refuse and delete nothing, forced or not."""
    c = AnswerCache(tmp_path)
    c.set(cache_key({"q": 1}), _answer())
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "ab").mkdir()
    (tmp_path / "ab" / "thesis.tex").write_text("mine too")
    from cascade.errors import ConfigError

    for force in (False, True):
        # not a CacheError: nothing that handles "the cache is damaged" may catch it
        with pytest.raises(ConfigError, match=r"cache\.directory.*refusing.*notes\.txt") as e:
            c.clear(force=force)
        assert not isinstance(e.value, CacheError)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / "ab" / "thesis.tex").exists()
    assert c.get(cache_key({"q": 1})) is not None


def test_forced_clear_of_a_damaged_cache_removes_only_its_own_files(tmp_path: Path) -> None:
    d = tmp_path / "cache"
    c = AnswerCache(d)
    c.set(cache_key({"q": 1}), _answer(secrets.token_hex(100_000)))  # a value file too
    c.close()
    (d / "cache.db").write_bytes(b"this is not sqlite" * 100)
    c = AnswerCache(d)
    with pytest.raises(CacheError, match="corrupt"):
        c.clear()
    assert c.clear(force=True) == 0
    assert not d.exists()
    assert tmp_path.exists()
    fresh = AnswerCache(d)  # rebuilt from scratch
    assert fresh.stats()["entries"] == 0


def _fill_with_small_fsize(directory: str) -> str:
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    c = AnswerCache(directory)
    c.set(cache_key({"q": 0}), _answer())
    size = sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 4096, size + 4096))
    try:
        c.set(cache_key({"q": 1}), _answer(secrets.token_hex(500_000)))
    except CacheError as e:
        return f"CacheError: {e}"
    except BaseException as e:  # anything else is the failure this test looks for
        return f"{type(e).__name__}: {e}"
    return "stored"


def test_a_full_disk_is_a_cache_error(tmp_path: Path) -> None:
    """A store that fails (disk full; here a file-size limit) is a typed CacheError naming the
    directory, so the engine can return the answer it paid for with a warning."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        outcome = pool.apply(_fill_with_small_fsize, (str(tmp_path),))
    assert outcome.startswith("CacheError:") and str(tmp_path) in outcome, outcome


def test_absurd_size_limit_is_a_config_error(tmp_path: Path) -> None:
    from cascade.config import parse_config
    from cascade.errors import ConfigError

    with pytest.raises(ConfigError, match=r"cache\.size_limit_mb"):
        AnswerCache(tmp_path, size_limit_mb=1e300)
    with pytest.raises(ConfigError, match=r"x\.toml.*cache\.size_limit_mb"):
        parse_config({"rungs": [{"model": "m", "price": "unknown"}],
                      "cache": {"size_limit_mb": 1e300}},
                     source="x.toml")
