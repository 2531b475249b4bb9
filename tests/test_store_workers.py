"""Several worker processes, each a Cascade on one ``[store] url``, against a real redis-server
and a loopback model server that counts what it billed: one budget to the cent, one breaker
state, one verified cache, and Redis killed and restarted mid-run."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.to_thread
import pytest

from tests.loopback import LoopbackServer, RecordedRequest, Reply, openai_chat, openai_error
from tests.redis_server import RedisServer, redis_server

pytestmark = pytest.mark.slow  # spawns worker processes: about 40 s in all; .ci/run runs it

MAX_TOKENS = 10
OUT_USD_PER_MTOK = 1000.0
CALL_USD = MAX_TOKENS * OUT_USD_PER_MTOK / 1e6
"""Every call costs exactly its estimate ($0.01): no input price, and the reply uses all of
``max_tokens``, so "usage matches the estimate"."""


def _config(redis_url: str, base_url: str, *, limit_usd: float | None = None,
            rungs: tuple[str, ...] = ("good",), failure_threshold: int = 50) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "rungs": [{"model": m, "provider": "openai-compatible", "base_url": base_url,
                   "api_key_env": "CASCADE_TEST_KEY", "max_tokens": MAX_TOKENS,
                   "input_usd_per_mtok": 0.0, "output_usd_per_mtok": OUT_USD_PER_MTOK,
                   "timeout_s": 15.0} for m in rungs],
        "verifiers": ["refusal"],
        "retry": {"max_attempts": 1},
        "breaker": {"failure_threshold": failure_threshold, "cooldown_s": 60},
        "timeout_s": 30,
        "store": {"url": redis_url, "timeout_s": 5.0},
    }
    if limit_usd is not None:
        cfg["budget"] = {"limit_usd": limit_usd, "period_s": 3600}
    return cfg


class BillingServer(LoopbackServer):
    """An OpenAI-compatible server that bills every completion it sends; "flaky" is down."""

    def __init__(self) -> None:
        super().__init__("openai")
        self.billed_usd = 0.0
        self.calls: dict[str, int] = {}
        self._bill_lock = threading.Lock()
        self.script(self._handle)

    def _handle(self, req: RecordedRequest) -> Reply:
        model = req.json.get("model", "")
        prompt = req.json["messages"][-1]["content"]
        with self._bill_lock:
            self.calls[model] = self.calls.get(model, 0) + 1
            if model == "flaky":
                return openai_error(503, "overloaded", type="server_error")
            if not prompt.startswith("warm-up"):
                self.billed_usd += CALL_USD
        return Reply(json=openai_chat(f"answer to {prompt}", model=model, prompt_tokens=5,
                                      completion_tokens=MAX_TOKENS))


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture
def model() -> Iterator[BillingServer]:
    with BillingServer() as server:
        yield server


# ---------------------------------------------------------------- what a worker runs


def _outcome(result: Any) -> dict[str, Any]:
    from cascade.errors import BudgetExceeded

    if isinstance(result, BaseException):
        return {"error": type(result).__name__, "message": str(result),
                "key": getattr(result, "key", None) if isinstance(result, BudgetExceeded)
                else None}
    return {"text": result.text, "verified": result.verified, "cache_hit": result.cache_hit,
            "cost_usd": result.cost_usd, "warnings": list(result.warnings),
            "errors": [a.error_type for a in result.attempts]}


def _worker(config: dict[str, Any], prompts: list[str], concurrency: int,
            spacing_s: float = 0.0, barrier: Any = None) -> list[dict[str, Any]]:
    """One worker process: a Cascade answering ``prompts`` ``concurrency`` at a time, after a
    warm-up request (not billed, its own budget key) and, given a barrier, once every worker
    is warm. Returns plain data only (some exceptions do not pickle): a crash is an entry."""
    import os
    import sys
    import traceback

    os.environ["CASCADE_TEST_KEY"] = "sk-test"
    from cascade.config import parse_config
    from cascade.engine import Cascade
    from cascade.tokens import warm_up

    async def main() -> list[dict[str, Any]]:
        cascade = Cascade(parse_config(config, source="cascade.toml"))
        # A worker starts before its traffic: SDK imported, tokenizer and plugins loaded, the
        # store reachable. (Cold imports inside the event loop stall every Redis call in
        # flight past its timeout.)
        try:
            warm_up(r["model"] for r in config["rungs"])
            await cascade.store.aping()  # type: ignore[attr-defined]
            await cascade.aanswer(f"warm-up {os.getpid()}", cache=False,
                                  metadata={"budget_key": f"warm-up {os.getpid()}"})
        except Exception as e:  # the test's counts show it; the barrier must be reached
            sys.stderr.write(f"warm-up failed: {e!r}\n")
        finally:
            if barrier is not None:
                await anyio.to_thread.run_sync(barrier.wait, 60)
        out: list[dict[str, Any]] = [{} for _ in prompts]
        limiter = anyio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with limiter:
                try:
                    out[i] = _outcome(await cascade.aanswer(prompts[i],
                                                            metadata={"budget_key": "team"}))
                except Exception as e:
                    out[i] = _outcome(e)
                out[i]["t"] = time.time()

        try:
            async with anyio.create_task_group() as tg:
                for i in range(len(prompts)):
                    tg.start_soon(one, i)
                    if spacing_s:
                        await anyio.sleep(spacing_s)
        finally:
            await cascade.aclose()
            await cascade.store.aclose()
        return out

    try:
        return anyio.run(main)
    except BaseException:
        return [{"error": "worker crashed", "message": traceback.format_exc()}]


def _run_workers(jobs: list[tuple[Any, ...]]) -> list[list[dict[str, Any]]]:
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager, ctx.Pool(len(jobs)) as pool:
        barrier = manager.Barrier(len(jobs))
        pending = [pool.apply_async(_worker, (*job, 0.0, barrier)) for job in jobs]
        return [p.get(timeout=100) for p in pending]


# ---------------------------------------------------------------- the tests


def test_workers_share_one_budget_to_the_cent(redis: RedisServer, model: BillingServer) -> None:
    """4 processes × 10 concurrent requests, $0.01 each, on one $0.25 budget: the model server
    bills at most $0.25, every request is answered or refused with the budget error, none is
    lost."""
    limit = 0.25
    cfg = _config(redis.url, model.base_url, limit_usd=limit)
    jobs = [(cfg, [f"w{w} q{i}" for i in range(10)], 10) for w in range(4)]
    results = [r for worker in _run_workers(jobs) for r in worker]
    assert len(results) == 40 and all(results), results
    answered = [r for r in results if "text" in r]
    refused = [r for r in results if "error" in r]
    assert model.billed_usd <= limit + 1e-9
    assert len(answered) == model.calls.get("good", 0) - 4 == round(model.billed_usd / CALL_USD)
    # usage matches the estimate, so the whole budget is usable
    assert len(answered) == 25, refused
    assert all(r["verified"] and not r["cache_hit"] for r in answered)
    assert len(refused) == 15, refused
    for r in refused:
        assert r["error"] == "BudgetExceeded", r
        assert r["key"] == "team" and "team" in r["message"], r


def test_breaker_and_cache_are_shared_between_processes(redis: RedisServer,
                                                        model: BillingServer) -> None:
    cfg = _config(redis.url, model.base_url, rungs=("flaky", "good"), failure_threshold=2)
    # worker 1: its warm-up and q1 fail on "flaky" (503), which opens the circuit in Redis;
    # q2 skips "flaky" at once; all three are answered by "good"
    [first] = _run_workers([(cfg, ["q1", "q2"], 1)])
    assert [r["errors"][0] for r in first] == ["ServerError", "CircuitOpen"]
    assert all(r["verified"] for r in first)
    assert model.calls == {"flaky": 2, "good": 3}
    # worker 2, another process: the circuit is open there too, and q1 is a cache hit
    [second] = _run_workers([(cfg, ["q1", "q3"], 1)])
    hit, fresh = second
    assert hit["cache_hit"] and hit["text"] == "answer to q1" and hit["cost_usd"] == 0.0
    assert fresh["errors"][0] == "CircuitOpen" and fresh["verified"]
    # no call to "flaky" from worker 2 (warm-up included), none to anything for the hit
    assert model.calls == {"flaky": 2, "good": 5}


def test_redis_killed_mid_run_and_restarted(redis: RedisServer, model: BillingServer) -> None:
    """While Redis is down requests on a budget fail closed with the store's error (none
    hangs, no worker crashes); after the restart the same workers answer again."""
    cfg = _config(redis.url, model.base_url, limit_usd=100.0)
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager, ctx.Pool(2) as pool:
        barrier = manager.Barrier(3)
        pending = [pool.apply_async(_worker, (cfg, [f"w{w} q{i}" for i in range(60)], 2, 0.1,
                                              barrier)) for w in range(2)]
        barrier.wait(60)  # both workers are warm and start now
        time.sleep(1.5)  # they answer for a while
        killed_at = time.time()
        redis.kill()
        time.sleep(1.5)
        redis.start()
        restarted_at = time.time()
        results = [r for p in pending for r in p.get(timeout=120)]
    assert len(results) == 120 and all(results)
    for r in results:
        assert "text" in r or r["error"] == "BudgetStoreError", r
        if "error" in r:
            assert f"redis://127.0.0.1:{redis.port}/0" in r["message"], r
            assert "fail-closed" in r["message"]
    down = [r for r in results if "error" in r]
    assert down, "no request met the outage"
    assert all(killed_at - 1 <= r["t"] <= restarted_at + 2 for r in down)
    assert any("text" in r and r["t"] < killed_at for r in results)
    assert any("text" in r and r["t"] > restarted_at + 2 for r in results)  # recovered
    assert model.calls["good"] - 2 == len(results) - len(down)
