"""The engine on a ``[store] url``: two Cascades (as two workers would) share the verified cache,
and a Redis outage bypasses the cache with a warning and fails budgets closed, in-process and
fast (tests/test_store_workers.py does the same across processes)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from cascade.breaker import reset_default_breakers
from cascade.engine import Cascade
from cascade.errors import BudgetStoreError
from cascade.providers.base import Completion, ModelCall
from cascade.serve.metrics import Metrics
from cascade.store.redis import RedisStore
from cascade.testing import FunctionProvider
from tests.redis_server import RedisServer, redis_server

pytestmark = pytest.mark.anyio


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    reset_default_breakers()
    with redis_server() as server:
        yield server
    reset_default_breakers()


def _config(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "rungs": [{"model": "m", "provider": "openai-compatible", "base_url": "http://x/v1",
                   "input_usd_per_mtok": 1.0, "output_usd_per_mtok": 1.0}],
        "verifiers": ["refusal"],
        "store": {"url": url, "timeout_s": 2.0},
        **extra,
    }


def _model(calls: list[str]) -> FunctionProvider:
    def answer(call: ModelCall) -> Completion:
        calls.append(call.messages[-1].content if call.messages else "")
        return Completion(text="Canberra", model=call.model, input_tokens=10, output_tokens=2,
                          finish_reason="stop")
    return FunctionProvider(answer)


async def test_two_cascades_on_one_redis_share_verified_answers(redis: RedisServer) -> None:
    calls: list[str] = []
    provider = _model(calls)
    a = Cascade.from_dict(_config(redis.url), provider_factory=lambda rung: provider)
    b = Cascade.from_dict(_config(redis.url), provider_factory=lambda rung: provider)
    try:
        assert isinstance(a.store, RedisStore) and a.store.shared
        first = await a.aanswer("Capital of Australia?")
        assert first.verified and not first.cache_hit
        second = await b.aanswer("Capital of Australia?")
        assert second.cache_hit and second.text == "Canberra" and second.cost_usd == 0.0
        assert len(calls) == 1
    finally:
        for c in (a, b):
            await c.aclose()
            await c.store.aclose()


async def test_redis_down_the_answer_still_comes_with_a_warning(redis: RedisServer) -> None:
    calls: list[str] = []
    provider = _model(calls)
    c = Cascade.from_dict(_config(redis.url), provider_factory=lambda rung: provider)
    try:
        redis.kill()
        ans = await c.aanswer("Capital of Australia?")
        assert ans.verified and ans.text == "Canberra"
        assert any(w.startswith("cache bypassed") for w in ans.warnings), ans.warnings
        assert any(w.startswith("not cached") for w in ans.warnings), ans.warnings
    finally:
        await c.aclose()
        await c.store.aclose()


async def test_redis_down_budgets_fail_closed_naming_the_store(redis: RedisServer) -> None:
    calls: list[str] = []
    provider = _model(calls)
    cfg = _config(redis.url, budget={"limit_usd": 1.0})
    c = Cascade.from_dict(cfg, provider_factory=lambda rung: provider)
    try:
        assert (await c.aanswer("one", metadata={"budget_key": "t"})).verified
        assert (await c.ahealth())["store"] == {"shared": True, "url": redis.url,
                                                 "reachable": True, "unsettled": 0}
        redis.kill()
        with pytest.raises(BudgetStoreError, match=rf"redis://127\.0\.0\.1:{redis.port}/0"):
            await c.aanswer("two", metadata={"budget_key": "t"})
        assert calls == ["one"]  # nothing was called, so nothing was spent unmetered
        # health says so: Redis unreachable; the refused reservation failed fast (the cache
        # lookup before it had found Redis down), so no release waits for it
        store = (await c.ahealth())["store"]
        assert store == {"shared": True, "url": redis.url, "reachable": False, "unsettled": 0}
        metrics = Metrics("cascade")  # what /metrics makes of it
        metrics.set_store(store)
        text = metrics.render().decode()
        assert f'cascade_store_reachable{{store="{redis.url}"}} 0.0' in text
        assert f'cascade_store_unsettled{{store="{redis.url}"}} 0.0' in text
    finally:
        await c.aclose()
        await c.store.aclose()
