"""Circuit breakers in fake time: open after N failures, one probe after the cool-down."""

from __future__ import annotations

import threading

import pytest

from cascade.breaker import CircuitBreakers, breakers_for, counts_as_failure, reset_default_breakers
from cascade.config import BreakerConfig
from cascade.errors import (
    CircuitOpen,
    ClientRequestError,
    MalformedReply,
    ProviderTimeout,
    RateLimited,
    ServerError,
    TransportError,
)

EP = "openai|http://127.0.0.1:1/v1|gpt-4o-mini"


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def make(threshold: int = 3, cooldown: float = 30.0) -> tuple[CircuitBreakers, Clock]:
    clock = Clock()
    return CircuitBreakers(threshold, cooldown, clock=clock), clock


def test_opens_after_threshold_consecutive_failures() -> None:
    b, _ = make(threshold=3)
    for _ in range(2):
        assert b.check(EP) is False
        b.record_failure(EP)
    assert b.state(EP) == "closed"
    b.check(EP)
    b.record_failure(EP)
    assert b.state(EP) == "open"
    with pytest.raises(CircuitOpen) as info:
        b.check(EP)
    msg = str(info.value)
    assert "3 consecutive failures" in msg and "next probe in 30.0s" in msg
    assert info.value.provider == "openai" and info.value.model == "gpt-4o-mini"
    assert info.value.retryable is False


def test_a_success_resets_the_count() -> None:
    b, _ = make(threshold=3)
    b.record_failure(EP)
    b.record_failure(EP)
    b.record_success(EP)
    b.record_failure(EP)
    b.record_failure(EP)
    assert b.state(EP) == "closed"
    b.check(EP)


def test_endpoints_are_independent() -> None:
    b, _ = make(threshold=1)
    b.record_failure(EP)
    assert b.state(EP) == "open"
    assert b.check("anthropic||claude-haiku-4-5") is False
    assert b.state("anthropic||claude-haiku-4-5") == "closed"


def test_exactly_one_probe_after_cooldown_then_close_on_success() -> None:
    b, clock = make(threshold=1, cooldown=10.0)
    b.record_failure(EP)
    clock.now += 9.9
    with pytest.raises(CircuitOpen):
        b.check(EP)
    clock.now += 0.1
    assert b.state(EP) == "half_open"
    assert b.check(EP) is True
    for _ in range(3):
        with pytest.raises(CircuitOpen, match="probe request is in flight"):
            b.check(EP)
    b.record_success(EP)
    assert b.state(EP) == "closed"
    assert b.check(EP) is False
    assert b.check(EP) is False


def test_failed_probe_reopens_for_a_fresh_cooldown() -> None:
    b, clock = make(threshold=2, cooldown=10.0)
    b.record_failure(EP)
    b.record_failure(EP)
    clock.now += 10.0
    assert b.check(EP) is True
    clock.now += 2.0
    b.record_failure(EP)
    assert b.state(EP) == "open"
    clock.now += 9.0
    with pytest.raises(CircuitOpen):
        b.check(EP)
    clock.now += 1.0
    assert b.check(EP) is True


def test_a_lost_probe_is_replaced_after_another_cooldown() -> None:
    b, clock = make(threshold=1, cooldown=5.0)
    b.record_failure(EP)
    clock.now += 5.0
    assert b.check(EP) is True  # this caller is cancelled and never reports
    clock.now += 4.0
    with pytest.raises(CircuitOpen):
        b.check(EP)
    clock.now += 1.0
    assert b.check(EP) is True


def test_release_probe_lets_the_next_caller_probe() -> None:
    b, clock = make(threshold=1, cooldown=5.0)
    b.record_failure(EP)
    clock.now += 5.0
    assert b.check(EP) is True
    b.record(EP, KeyError("a bug, says nothing about the endpoint"))
    assert b.check(EP) is True


def test_failures_while_open_do_not_extend_the_cooldown() -> None:
    b, clock = make(threshold=1, cooldown=10.0)
    b.record_failure(EP)
    clock.now += 6.0
    b.record_failure(EP)  # a call that started before the circuit opened
    clock.now += 4.0
    assert b.check(EP) is True


@pytest.mark.parametrize(("err", "fails"), [
    (TransportError("reset"), True),
    (ProviderTimeout("slow"), True),
    (RateLimited("429"), True),
    (ServerError("500"), True),
    (MalformedReply("garbage"), True),
    (ClientRequestError("400"), False),
    (None, False),
])
def test_record_classifies_outcomes(err: Exception | None, fails: bool) -> None:
    assert counts_as_failure(err) is fails
    b, _ = make(threshold=1)
    b.record(EP, err)
    assert b.state(EP) == ("open" if fails else "closed")


def test_circuit_open_is_not_an_outcome() -> None:
    b, _ = make(threshold=1)
    b.record_failure(EP)
    b.record(EP, CircuitOpen("skipped"))
    assert b.state(EP) == "open"


def test_snapshot_reports_state_failures_and_time_to_probe() -> None:
    b, clock = make(threshold=2, cooldown=30.0)
    b.record_failure(EP)
    b.record_failure("other")
    b.record_failure("other")
    clock.now += 12.0
    snap = b.snapshot()
    assert snap[EP] == {"state": "closed", "consecutive_failures": 1, "opened_at": None,
                        "seconds_until_probe": None, "probe_in_flight": False}
    assert snap["other"]["state"] == "open"
    assert snap["other"]["opened_at"] == 500.0
    assert snap["other"]["seconds_until_probe"] == pytest.approx(18.0)
    clock.now += 18.0
    b.check("other")
    snap = b.snapshot()
    assert snap["other"]["state"] == "half_open"
    assert snap["other"]["seconds_until_probe"] == 0.0
    assert snap["other"]["probe_in_flight"] is True
    b.reset()
    assert b.snapshot() == {}


def test_only_one_probe_under_many_threads() -> None:
    b, clock = make(threshold=1, cooldown=1.0)
    b.record_failure(EP)
    clock.now += 1.0
    probes: list[bool] = []
    barrier = threading.Barrier(16)

    def worker() -> None:
        barrier.wait()
        try:
            probes.append(b.check(EP))
        except CircuitOpen:
            probes.append(False)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert probes.count(True) == 1


def test_shared_registry_per_configuration() -> None:
    reset_default_breakers()
    a = breakers_for(BreakerConfig(failure_threshold=2, cooldown_s=5.0))
    assert breakers_for(BreakerConfig(failure_threshold=2, cooldown_s=5.0)) is a
    other = breakers_for(BreakerConfig(failure_threshold=3, cooldown_s=5.0))
    assert other is not a
    assert (a.failure_threshold, a.cooldown_s) == (2, 5.0)
    reset_default_breakers()
    assert breakers_for(BreakerConfig(failure_threshold=2, cooldown_s=5.0)) is not a
