"""Shadow checks off the response path: a sample of early-accepted answers is asked of the top
rung as well, on a background event loop, bounded, charged to the same budgets.

The answer has already been returned when a shadow runs; its result goes to the observers (the
audit log's ``shadow`` line, metrics) and to the drift monitor, whose alarm makes a drifted rung
escalate. A shadow that fails or times out changes nothing but its own record.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from cascade.caller import EndpointCaller
from cascade.climb import Money, new_attempt, record_call, record_error, request_call
from cascade.config import RungConfig
from cascade.drift import DriftMonitor
from cascade.errors import BudgetExceeded, ProviderError
from cascade.ladder import Ladder
from cascade.messages import Request
from cascade.providers.base import Completion
from cascade.syncloop import LoopThread
from cascade.trace import Attempt
from cascade.verify import BoundVerifier, Candidate, VerifyContext, run_verifiers

__all__ = ["ShadowJob", "Shadows", "shadow_stats"]

log = logging.getLogger("cascade.shadow")

_STATS_LOCK = threading.Lock()
_STATS: dict[str, dict[str, int]] = {}
"""Per endpoint of an accepting rung, this process: shadow checks and disagreements."""


def shadow_stats() -> dict[str, dict[str, int]]:
    """This process's shadow checks per accepting endpoint (for ``cascade.health()``)."""
    with _STATS_LOCK:
        return {k: dict(v) for k, v in _STATS.items()}


@dataclass(frozen=True)
class ShadowJob:
    """One early-accepted answer to check against the top rung."""

    request: Request
    ladder: Ladder
    accepted: Attempt
    money: Money
    """The request's money: its cap's remainder and its per-key budget."""
    held: tuple[Attempt, ...] = ()
    """Rungs the drift alarm kept from exiting on this request, compared with the same top
    answer too (their alarm clears only on such comparisons)."""


class Shadows:
    """Samples, schedules and runs shadow checks on a loop thread of their own."""

    def __init__(self, caller: EndpointCaller, *, observers: Callable[[], Sequence[Any]],
                 drift: Callable[[Ladder], DriftMonitor | None],
                 rng: random.Random | None = None) -> None:
        self.caller = caller
        self._observers = observers
        self._drift = drift
        self._rng = rng or random.Random()
        self._loop = LoopThread("cascade-shadow")
        self._lock = threading.Lock()
        self._futures: set[concurrent.futures.Future[None]] = set()
        self.dropped = 0
        """Samples not checked because ``shadow_max_in_flight`` were already running."""

    def sample(self, job: ShadowJob) -> bool:
        """Maybe schedule a check of ``job`` (rate ``shadow_rate``); never blocks."""
        pol = job.ladder.config.policy
        if pol.shadow_rate <= 0 or self._rng.random() >= pol.shadow_rate:
            return False
        return self._submit(job, None)

    def compare(self, job: ShadowJob, top: Attempt) -> bool:
        """Record a comparison the climb made for free: a rung in safe mode (drift alarm)
        escalated, so the top rung answered anyway. This is how the alarm can clear."""
        return self._submit(job, top)

    def _submit(self, job: ShadowJob, answered: Attempt | None) -> bool:
        """Start a check on the loop unless ``shadow_max_in_flight`` already run (then drop)."""
        with self._lock:
            self._futures = {f for f in self._futures if not f.done()}
            if len(self._futures) >= max(1, job.ladder.config.policy.shadow_max_in_flight):
                self.dropped += 1
                return False
            self._futures.add(self._loop.submit(lambda: self._run(job, answered)))
        return True

    def drain(self, timeout_s: float | None = None) -> bool:
        """Wait for the shadow checks in flight (tests, orderly shutdown); True when all ended."""
        with self._lock:
            pending = list(self._futures)
        _, not_done = concurrent.futures.wait(pending, timeout=timeout_s)
        return not not_done

    def close(self, before: Callable[[], Awaitable[None]] | None = None) -> None:
        """Cancel what is still running and stop the loop (reservations are settled);
        ``before()`` runs on the loop first (closing the connections made there)."""
        if not self._loop.running:
            return
        with self._lock:
            pending = list(self._futures)
        for f in pending:
            f.cancel()
        concurrent.futures.wait(pending, timeout=5)
        self._loop.stop(before)

    async def _run(self, job: ShadowJob, answered: Attempt | None = None) -> None:
        cfg = job.ladder.config
        top_i = len(cfg.rungs) - 1
        top = cfg.rungs[top_i]
        accepted = job.accepted
        attempt = new_attempt(top_i, top, "shadow")
        t0 = time.monotonic()
        agreed: bool | None = None
        try:
            if answered is not None:  # the climb reached the top rung itself: nothing to pay
                # A copy: the answer's own attempt is not touched, and its cost and tokens,
                # counted with the answer, are not counted again as the shadow's.
                attempt = replace(answered, status="shadow", cost_usd=0.0, input_tokens=0,
                                  output_tokens=0, verdicts=[],
                                  note="the climb's own top answer: no call made")
                completion = Completion(text=answered.text or "", model=answered.model,
                                        input_tokens=answered.input_tokens,
                                        output_tokens=answered.output_tokens)
                endpoint = top
            else:
                got = await self._ask_top(job, attempt)
                if got is None:
                    return
                completion, endpoint = got
            agree = job.ladder.shadow_agreement
            assert agree is not None  # loaded with the ladder whenever shadow_rate > 0
            ctx = VerifyContext(request=job.request, attempts=[accepted], candidate=Candidate(
                text=completion.text, rung=endpoint, rung_index=top_i,
                completion=completion))
            [verdict] = await run_verifiers([BoundVerifier(id="shadow", verifier=agree)],
                                            lambda bv: ctx)
            attempt.verdicts = [verdict]
            agreed = verdict.passed
            with _STATS_LOCK:
                st = _STATS.setdefault(cfg.rungs[accepted.rung].endpoint,
                                       {"samples": 0, "disagreements": 0})
                st["samples"] += 1
                st["disagreements"] += 0 if agreed else 1
            monitor = self._drift(job.ladder)
            if monitor is not None:
                await monitor.record(cfg.rungs[accepted.rung].label, not agreed)
                for held in job.held:  # free: the top answer is in hand
                    [hv] = await run_verifiers([BoundVerifier(id="shadow", verifier=agree)],
                                               functools.partial(_held_ctx, ctx, held))
                    await monitor.record(cfg.rungs[held.rung].label, not hv.passed)
        except Exception as e:  # a shadow's failure never reaches the answer
            log.warning("shadow check failed: %s: %s", type(e).__name__, e)
            attempt.error = attempt.error or f"{type(e).__name__}: {e}"
        finally:
            attempt.latency_ms = (time.monotonic() - t0) * 1000
            for obs in self._observers():
                try:
                    obs.on_shadow(job.request, accepted, attempt, agreed)
                except Exception as e:
                    log.warning("observer %r failed on a shadow result: %s", obs, e)

    async def _ask_top(self, job: ShadowJob, attempt: Attempt
                       ) -> tuple[Completion, RungConfig] | None:
        """The paid part: the top rung's answer, within the request's cap and budget."""
        top = job.ladder.config.rungs[-1]
        money = job.money
        estimate = await money.estimate(top, job.request.messages, job.request.schema)
        if money.cap_skip(estimate) is not None:
            attempt.error, attempt.error_type = "cap: would break the request's cap", "Skipped"
            return None  # a shadow check never breaks the request's cap
        try:
            reservation = await money.hold(estimate)
        except BudgetExceeded as e:
            attempt.error, attempt.error_type = f"budget: {e}", "Skipped"
            return None
        actual = 0.0
        unanswered: list[RungConfig] = []
        try:
            result = await self.caller.call(request_call(top, job.request), top, None,
                                            unanswered=unanswered,
                                            retry=job.ladder.config.retry)
            record_call(attempt, result, job.ladder.redact)
            actual = attempt.cost_usd
        except ProviderError as e:
            record_error(attempt, e, job.ladder.redact)
            actual = attempt.cost_usd  # billed tries that failed
            return None
        finally:
            money.spent_usd += actual
            await money.settle(reservation, actual, estimate=estimate, unanswered=unanswered)
        return result.completion, result.endpoint


def _held_ctx(ctx: VerifyContext, held: Attempt, _bv: BoundVerifier) -> VerifyContext:
    """The shadow check's context with ``held`` (a rung the drift alarm kept) in place of the
    accepted rung: its answer against the same top answer."""
    return VerifyContext(request=ctx.request, attempts=[held], candidate=ctx.candidate)
