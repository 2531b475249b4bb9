"""Shadow checks off the response path, charged to budgets, and the drift alarm that acts."""

from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest

from cascade import Cascade, ModelCall, ServerError, VerifyContext
from cascade.budget import InMemoryBudgetStore
from cascade.drift import DriftMonitor, increments
from cascade.store.local import LocalCounters
from cascade.testing import FunctionProvider, completion
from cascade.trace import Attempt

pytestmark = pytest.mark.anyio


def always(ctx: VerifyContext) -> bool:
    return True


always.cache_key = "always"  # type: ignore[attr-defined]


def _config(tmp_path: Path, **policy: Any) -> dict[str, Any]:
    return {
        "rungs": [
            {"model": "small", "provider": "openai-compatible", "base_url": "http://small/v1",
             "input_usd_per_mtok": 1.0, "output_usd_per_mtok": 2.0},
            {"model": "big", "provider": "openai-compatible", "base_url": "http://big/v1",
             "input_usd_per_mtok": 100.0, "output_usd_per_mtok": 200.0},
        ],
        "policy": {"shadow_rate": 1.0, **policy},
        "cache": {"enabled": False, "directory": str(tmp_path / "cache")},
    }


class Seen:
    """An observer of answers and shadow results."""

    def __init__(self) -> None:
        self.answers: list[Any] = []
        self.shadows: list[tuple[Attempt, Attempt, bool | None]] = []

    def on_answer(self, request: Any, answer: Any, error: Any) -> None:
        self.answers.append(answer)

    def on_shadow(self, request: Any, accepted: Attempt, shadow: Attempt,
                  agreed: bool | None) -> None:
        self.shadows.append((accepted, shadow, agreed))


async def test_the_answer_returns_before_its_shadow_check_finishes(tmp_path: Path) -> None:
    """The top rung blocks until the test lets it go, *after* the answer came back: were the
    shadow on the response path, ``aanswer`` could not return within the bound."""
    gate = threading.Event()

    async def model(call: ModelCall) -> str:
        if call.model == "big":
            # a thread's event: the shadow runs on the Cascade's own loop thread
            await anyio.to_thread.run_sync(gate.wait, 10)
        return "Canberra"

    seen = Seen()
    c = Cascade.from_dict(_config(tmp_path), verifiers=[always],
                          provider_factory=FunctionProvider(model).factory, observers=[seen])
    with anyio.fail_after(5):
        ans = await c.aanswer("Capital of Australia?")
    assert ans.verified and [a.status for a in ans.attempts] == ["accepted"]
    assert seen.shadows == []  # still running
    gate.set()
    assert c.drain_shadows(10)
    [(_, shadow, agreed)] = seen.shadows
    assert agreed is True and shadow.status == "shadow" and shadow.text == "Canberra"
    c.close()


async def test_a_failing_shadow_never_changes_the_answer(tmp_path: Path) -> None:
    def model(call: ModelCall) -> str:
        if call.model == "big":
            raise ServerError("top rung down", provider="x", model="big")
        return "Canberra"

    seen = Seen()
    c = Cascade.from_dict(_config(tmp_path, shadow_normaliser="exact"), verifiers=[always],
                          provider_factory=FunctionProvider(model).factory, observers=[seen])
    ans = await c.aanswer("q")
    assert c.drain_shadows(10)
    assert ans.verified and ans.text == "Canberra" and ans.model == "small"
    [(_, shadow, agreed)] = seen.shadows
    assert agreed is None and shadow.error_type == "ServerError"
    c.close()


async def test_shadow_checks_are_charged_to_the_per_key_budget(tmp_path: Path) -> None:
    """#11: with shadow_rate = 1 and a $0.05 limit, 200 requests once billed $0.43. Every call
    the engine makes goes through the same reserve/settle, so the key never spends more than
    its limit, and what the store counted is what the calls cost."""
    store = InMemoryBudgetStore()
    seen = Seen()

    def model(call: ModelCall) -> Any:
        return completion("Canberra", call, input_tokens=100, output_tokens=10)

    cfg = _config(tmp_path)
    cfg["rungs"][1]["max_tokens"] = 20  # its estimate must fit the limit for a shadow to run
    cfg["budget"] = {"limit_usd": 0.05, "period_s": 86400}
    c = Cascade.from_dict(cfg, verifiers=[always], provider_factory=FunctionProvider(model).factory,
                          budget_store=store, observers=[seen])
    answered = refused = 0
    for _ in range(200):
        try:
            await c.aanswer("q", metadata={"budget_key": "alice"})
            answered += 1
        except Exception:
            refused += 1
        assert c.drain_shadows(10)
    spent = store.spent("alice", 86400)
    shadow_cost = sum(s.cost_usd for _, s, _ in seen.shadows)
    answer_cost = sum(a.cost_usd for a in seen.answers if a is not None)
    assert shadow_cost > 0 and refused > 0
    assert spent <= 0.05 + 1e-12
    assert spent == pytest.approx(shadow_cost + answer_cost)
    assert store.pending("alice", 86400) == 0
    c.close()


async def test_close_cancels_a_shadow_in_flight_and_settles_its_reservation(
        tmp_path: Path) -> None:
    store = InMemoryBudgetStore()
    started = threading.Event()

    async def model(call: ModelCall) -> str:
        if call.model == "big":
            started.set()
            await anyio.sleep(3600)
        return "Canberra"

    cfg = _config(tmp_path)
    cfg["budget"] = {"limit_usd": 1.0, "period_s": 86400}
    c = Cascade.from_dict(cfg, verifiers=[always], provider_factory=FunctionProvider(model).factory,
                          budget_store=store)
    await c.aanswer("q")
    assert await anyio.to_thread.run_sync(started.wait, 5)
    assert store.pending("default", 86400) > 0  # the shadow's estimate is held
    with anyio.fail_after(15):
        await anyio.to_thread.run_sync(c.close)
    assert store.pending("default", 86400) == 0


# ---------------------------------------------------------------- the sequential test


async def _run_monitor(rate: float, d: float, n: int, rng: random.Random, alpha: float,
                       good_first: int = 0) -> int | None:
    """Feed ``good_first`` agreeing checks, then ``n`` checks with disagreement ``rate``; the
    check (counted from the second phase) at which the alarm rose."""
    mon = DriftMonitor(LocalCounters(), ladder="t", thresholds={"small": d}, alpha=alpha)
    for _ in range(good_first):
        await mon.record("small", False)
    for i in range(n):
        state = await mon.record("small", rng.random() < rate)
        if state is not None and state.alarm:
            return i + 1
    return None


async def test_false_alarms_stay_within_the_stated_bound() -> None:
    """At the tolerated rate itself (the worst case of "no drift"), false alarms come at most
    once per 1/alpha checks on average: over 150 runs of 400 checks at alpha = 0.02, fewer
    than one alarm per 50 checks."""
    rng = random.Random(7)
    alpha, d, n, runs = 0.02, 0.1, 400, 150
    alarms = [await _run_monitor(d, d, n, rng, alpha) for _ in range(runs)]
    checks = sum(x if x is not None else n for x in alarms)
    false_alarms = sum(x is not None for x in alarms)
    assert false_alarms / checks <= alpha


async def test_a_real_drift_is_caught_within_a_few_checks_even_after_a_long_good_past() -> None:
    rng = random.Random(11)
    delays = [await _run_monitor(0.6, 0.1, 200, rng, 0.001, good_first=300)
              for _ in range(100)]
    assert all(x is not None for x in delays)
    assert sorted(x for x in delays if x is not None)[94] <= 30  # 95% within 30 checks


def test_cusum_steps_point_the_right_way() -> None:
    for up, down in increments(0.1, above=True):
        assert up > 0 > down
    for up, down in increments(0.3, above=False):
        assert up < 0 < down


async def test_the_drift_alarm_puts_a_rung_in_safe_mode_and_clears_when_it_recovers(
        tmp_path: Path) -> None:
    """A cheap model agrees with the top rung, then answers wrongly with full confidence: the
    alarm rises within a bounded number of shadow checks, the rung's traffic goes up, and once
    the model recovers the comparisons the climb makes anyway clear the alarm."""
    mode = {"small": "Canberra"}

    def model(call: ModelCall) -> str:
        return mode["small"] if call.model == "small" else "Canberra"

    cfg = _config(tmp_path, shadow_normaliser="exact", drift_alpha=0.001)
    cfg["rungs"][0]["drift_max_disagreement"] = 0.2
    c = Cascade.from_dict(cfg, verifiers=[always], provider_factory=FunctionProvider(model).factory)

    async def alarm() -> bool:
        return bool((await c.ahealth())["drift"]["small"]["alarm"])

    for _ in range(30):
        assert (await c.aanswer("q")).model == "small"
        assert c.drain_shadows(10)
    assert not await alarm()

    mode["small"] = "Sydney"
    served_wrong = 0
    for _ in range(40):
        ans = await c.aanswer("q")
        assert c.drain_shadows(10)
        if ans.model == "small":
            served_wrong += 1
        if await alarm():
            break
    assert await alarm() and served_wrong <= 15

    held = await c.aanswer("q")
    assert held.model == "big" and held.text == "Canberra" and held.verified
    assert held.attempts[0].status == "rejected"
    assert any(v.verifier == "drift" and not v.passed for v in held.attempts[0].verdicts)

    mode["small"] = "Canberra"
    for _ in range(200):
        await c.aanswer("q")
        assert c.drain_shadows(10)
        if not await alarm():
            break
    assert not await alarm()
    assert (await c.aanswer("q")).model == "small"
    c.close()


async def test_a_free_comparison_leaves_the_answer_alone_and_costs_nothing_again(
        tmp_path: Path) -> None:
    """With the alarm up, the climb's own top answer is compared for free: the shadow check
    took that very Attempt, set its latency to the comparison's and handed it to observers as
    the shadow, whose cost ``/metrics`` and the audit log then counted a second time."""
    from cascade.observe import Observer

    seen: list[Attempt] = []

    class Shadows(Observer):
        def on_shadow(self, request: Any, accepted: Attempt, shadow: Attempt,
                      agreed: bool | None) -> None:
            seen.append(shadow)

    def model(call: ModelCall) -> str:
        return "Sydney" if call.model == "small" else "Canberra"

    cfg = _config(tmp_path, shadow_normaliser="exact", drift_alpha=0.001)
    cfg["rungs"][0]["drift_max_disagreement"] = 0.01
    cfg["rungs"][1]["input_usd_per_mtok"] = cfg["rungs"][1]["output_usd_per_mtok"] = 5.0
    c = Cascade.from_dict(cfg, verifiers=[always], observers=[Shadows()],
                          provider_factory=FunctionProvider(model).factory)
    for _ in range(40):
        await c.aanswer("q")
        assert c.drain_shadows(10)
        if (await c.ahealth())["drift"]["small"]["alarm"]:
            break
    seen.clear()
    held = await c.aanswer("q")
    assert held.model == "big"
    top = held.attempts[-1]
    before = (top.latency_ms, top.status, top.cost_usd)
    assert c.drain_shadows(10)
    assert (top.latency_ms, top.status, top.cost_usd) == before and top.cost_usd > 0
    [free] = seen
    assert free is not top and free.cost_usd == 0.0 and free.status == "shadow"
    assert free.verdicts and free.verdicts[0].verifier == "shadow"
    c.close()


@pytest.mark.parametrize("where", ["a middle rung accepts", "the top rung rejects"])
async def test_a_held_rung_clears_when_the_climb_ends_below_the_top_or_the_top_rejects(
        tmp_path: Path, where: str) -> None:
    """The free comparison was made only when the top rung itself accepted: with a middle rung
    accepting the held rung's escalations (or the top rung rejecting), the held rung got no
    samples at all, and its alarm stayed up for good (300 agreeing requests, 0 samples)."""
    mode = {"small": "Sydney"}
    top_rejects = where == "the top rung rejects"

    def model(call: ModelCall) -> str:
        return mode["small"] if call.model == "small" else "Canberra"

    def accept(ctx: VerifyContext) -> bool:  # the top rung's answers rejected, in one case
        return not (top_rejects and ctx.candidate.rung_index == 1)  # big, after small

    accept.cache_key = f"accept-{where}"  # type: ignore[attr-defined]
    cfg = _config(tmp_path, shadow_normaliser="exact", drift_alpha=0.001)
    mid = {**cfg["rungs"][0], "model": "mid", "base_url": "http://mid/v1",
           "input_usd_per_mtok": 10.0, "output_usd_per_mtok": 20.0}
    cfg["rungs"] = [cfg["rungs"][0], mid, cfg["rungs"][1]]
    if top_rejects:
        cfg["rungs"].pop(1)  # small, then big: nothing between them
    cfg["rungs"][0]["drift_max_disagreement"] = 0.2
    c = Cascade.from_dict(cfg, verifiers=[accept],
                          provider_factory=FunctionProvider(model).factory)

    async def state() -> dict[str, Any]:
        return dict((await c.ahealth())["drift"]["small"])

    for _ in range(40):
        await c.aanswer("q")
        assert c.drain_shadows(10)
        if (await state())["alarm"]:
            break
    assert (await state())["alarm"]
    mode["small"] = "Canberra"  # recovered
    for _ in range(300):
        await c.aanswer("q")
        assert c.drain_shadows(10)
        if not (await state())["alarm"]:
            break
    assert not (await state())["alarm"], await state()
    c.close()
