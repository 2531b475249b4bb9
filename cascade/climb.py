"""One request's climb: route, then each rung — gates, call, verifiers, policy — until one
answer is accepted or the ladder ends.

Every model call the climb makes (rungs, paid verifiers) goes through :meth:`Climb.paid` or the
rung path, which check the request's cap, reserve the per-key budget and settle what was
actually spent; nothing paid for leaves the trace.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import anyio
import anyio.to_thread

from cascade import policy
from cascade.caller import CallResult, EndpointCaller, short
from cascade.config import RungConfig, VerifierConfig
from cascade.drift import DriftMonitor
from cascade.errors import BudgetExceeded, ConfigError, EndpointConfigError, ProviderError
from cascade.ladder import Ladder
from cascade.messages import Message, Request
from cascade.plugins import load_verifier
from cascade.providers.base import Completion, ModelCall, rung_call, schema_instruction
from cascade.store.base import AsyncBudgetStore
from cascade.tokens import estimate_cost
from cascade.trace import Attempt, Status, Verdict
from cascade.verify import BoundVerifier, Candidate, Verifier, VerifyContext, run_verifiers

__all__ = ["Climb", "Money", "OnAttempt", "builtin_verifier", "new_attempt", "record_call",
           "record_error", "request_call"]

OnAttempt = Callable[[Attempt], "Awaitable[None] | None"]
"""Called as each rung finishes (accepted, rejected, error, skipped, routed): progress."""

_OFF_LOOP_CHARS = 50_000
"""Prompts longer than this are token-counted in a worker thread: tiktoken on a 10 MB prompt
would otherwise hold the event loop for seconds."""

_BUILTINS: dict[tuple[str, tuple[tuple[str, Any], ...]], Verifier] = {}


def builtin_verifier(name: str, **settings: Any) -> Verifier:
    """A built-in verifier the engine adds itself (schema for ``schema=``, agreement for shadow
    checks), loaded once per process and setting."""
    key = (name, tuple(sorted(settings.items())))
    if key not in _BUILTINS:
        _BUILTINS[key] = load_verifier(VerifierConfig(name=name, settings=settings))
    return _BUILTINS[key]


@dataclass
class Money:
    """The request's spending: its cap, its per-key budget, what is spent and reserved."""

    budgets: AsyncBudgetStore
    max_cost_usd: float | None
    budget_key: str | None
    limit_usd: float | None
    period_s: float
    spent_usd: float = 0.0
    reserved_usd: float = 0.0
    kept_usd: float = 0.0
    """Estimates kept for calls sent without a reply (see :meth:`settle`)."""

    @property
    def counting(self) -> bool:
        """Whether estimates matter (tiktoken is never loaded without a cap or budget)."""
        return self.max_cost_usd is not None or self.limit_usd is not None

    async def estimate(self, rung: RungConfig, messages: Sequence[Message],
                       schema: Mapping[str, Any] | None = None) -> float:
        """The most the call can cost; a request's schema is input too, as a response format
        or as the prompt's instruction (caps were estimated without it)."""
        if not self.counting:
            return 0.0
        if schema is not None:
            messages = [*messages, Message("system", schema_instruction(schema))]
        if sum(len(m.content) for m in messages) > _OFF_LOOP_CHARS:
            return await anyio.to_thread.run_sync(estimate_cost, rung, messages)
        return estimate_cost(rung, messages)

    def for_shadow(self) -> Money:
        """A shadow check's money: what is left of the request's cap (kept estimates
        counted), the same per-key budget."""
        left = None if self.max_cost_usd is None else max(
            0.0, self.max_cost_usd - self.spent_usd - self.kept_usd)
        return Money(budgets=self.budgets, max_cost_usd=left, budget_key=self.budget_key,
                     limit_usd=self.limit_usd, period_s=self.period_s)

    def cap_skip(self, estimate: float) -> policy.Skip | None:
        return policy.cap_gate(self.max_cost_usd,
                               self.spent_usd + self.reserved_usd + self.kept_usd, estimate)

    async def hold(self, estimate: float) -> Any:
        """Reserve ``estimate`` against the key's budget (raises BudgetExceeded); settle it with
        :meth:`settle` once the actual cost is known."""
        if self.budget_key is None or self.limit_usd is None:
            return None
        return await self.budgets.areserve(self.budget_key, estimate, self.limit_usd,
                                           self.period_s)

    async def settle(self, reservation: Any, actual: float, *, estimate: float = 0.0,
                     unanswered: Sequence[RungConfig] = ()) -> float:
        """Settle ``reservation`` at ``actual``, plus ``estimate`` for each try that went out
        and never came back (timed out, or cut off by the deadline or a client gone): the
        provider may bill those, so the budget and the request's cap keep their estimate,
        the most each can cost. Returns that kept amount; the trace's cost stays what is
        known to be billed."""
        kept = estimate * len(unanswered)
        self.kept_usd += kept
        if reservation is not None:
            with anyio.CancelScope(shield=True):  # spent money is recorded even on cancel
                await self.budgets.asettle(reservation, actual + kept)
        return kept


def _kept_note(kept: float, unanswered: Sequence[RungConfig]) -> str:
    n = len(unanswered)
    return (f"{n} {'try' if n == 1 else 'tries'} sent without a reply (or its usage): the "
            f"budget keeps ${kept:.6f} (the estimate) in case the provider bills "
            f"{'it' if n == 1 else 'them'}")


def new_attempt(i: int, rung: RungConfig, status: Status, note: str | None = None) -> Attempt:
    """The attempt of rung ``i`` starting now; its endpoint is shown masked (a ``base_url``
    may carry a proxy's credentials, and traces go to clients and the audit log)."""
    return Attempt(rung=i, model=rung.model, provider=rung.provider, name=rung.label,
                   endpoint=rung.shown_url, status=status, note=note, started_at=time.time())


def request_call(rung: RungConfig, request: Request) -> ModelCall:
    """The call ``rung`` makes for ``request``: its messages and its structured output (the
    typed ``output_type``, else the JSON schema). The climb and a shadow check of the top rung
    send the same call, so a shadow compares like with like."""
    return rung_call(rung, request.messages, output_type=request.output_type,
                     json_schema=request.schema if request.output_type is None else None,
                     schema_options=request.schema_options)


@dataclass
class Climb:
    """Mutable state of one request's climb, and the climb itself."""

    request: Request
    ladder: Ladder
    caller: EndpointCaller
    money: Money
    deadline: float | None
    drift: DriftMonitor | None = None
    on_attempt: OnAttempt | None = None
    clock: Callable[[], float] = time.monotonic
    attempts: list[Attempt] = field(default_factory=list)
    candidate: tuple[Attempt, Any] | None = None
    """The latest answer that came back (attempt, parsed): returned unverified if none passes."""
    skipped: list[tuple[int, policy.Skip]] = field(default_factory=list)
    """Each rung not called, by index, and why."""
    notes: list[str] = field(default_factory=list)
    route: dict[str, Any] | None = None
    """The router's decision, for the trace (``Answer.route``)."""

    @property
    def skips(self) -> list[policy.Skip]:
        return [skip for _, skip in self.skipped]

    def money_skip(self, above: int) -> tuple[int, policy.Skip] | None:
        """The first rung above ``above`` that the cap or the key's budget kept from being
        called, and why (None: money stopped nothing there)."""
        return next(((i, sk) for i, sk in self.skipped
                     if i > above and sk.kind in ("cap", "budget")), None)

    def cut_off(self, error_type: str, why: str) -> None:
        """Mark the rung in flight when the climb was stopped from outside (the deadline, a
        client gone, a shutdown) as failed for that reason."""
        for a in self.attempts:
            if a.status == "running":
                a.status, a.error_type, a.error = "error", error_type, why

    def remaining_s(self) -> float | None:
        return None if self.deadline is None else self.deadline - self.clock()

    async def run(self) -> tuple[Attempt, Any] | None:
        """Climb; the accepted (attempt, parsed), or None (see ``candidate`` for the latest)."""
        rungs = self.ladder.config.rungs
        routed: set[int] = set()
        router = self.ladder.router
        if router is not None:
            route = router.route(self.request.messages, self.request.metadata)
            start = min(max(0, route.start), len(rungs) - 1)
            # The top rung is never routed away: it answers when nothing else may.
            routed = {i for i in range(len(rungs) - 1) if i < start or i in route.skip}
            labels = [r.label for r in rungs]
            self.route = {"start": start, "skipped": [labels[i] for i in sorted(routed)],
                          "scores": dict(zip(labels, route.scores, strict=False)),
                          "reason": route.reason}
            for i in sorted(routed):
                await self._routed(i, route.reason)
        for i, rung in enumerate(rungs):
            if i in routed:
                continue
            accepted = await self._rung(i, rung)
            if self.on_attempt is not None:
                out = self.on_attempt(self.attempts[-1])
                if out is not None:
                    await out
            if accepted is not None:
                return accepted
        return None

    async def _routed(self, i: int, reason: str) -> None:
        rung = self.ladder.rung(i)
        self.attempts.append(new_attempt(i, rung, "routed", note=reason))
        self.skipped.append((i, policy.Skip("router", reason)))

    def _skip(self, attempt: Attempt, skip: policy.Skip) -> None:
        attempt.status, attempt.error_type = "skipped", "Skipped"
        attempt.error = f"{'budget' if skip.kind == 'cap' else skip.kind}: {skip.detail}"
        self.skipped.append((attempt.rung, skip))

    async def _rung(self, i: int, rung: RungConfig) -> tuple[Attempt, Any] | None:
        """Try one rung. Returns (attempt, parsed) when its answer is accepted."""
        attempt = new_attempt(i, rung, "running")
        self.attempts.append(attempt)
        money = self.money
        estimate = await money.estimate(rung, self.request.messages, self.request.schema)
        gate = (policy.deadline_gate(self.remaining_s(), self.caller.expected_s(rung))
                or money.cap_skip(estimate))
        if gate is not None:
            self._skip(attempt, gate)
            return None
        try:
            reservation = await money.hold(estimate)
        except BudgetExceeded as e:
            if self.candidate is None and not self.attempts[:-1]:
                self.attempts.pop()
                raise
            self._skip(attempt, policy.Skip("budget", str(e)))
            return None
        t0 = self.clock()
        call = request_call(rung, self.request)
        actual = 0.0
        unanswered: list[RungConfig] = []
        try:
            try:
                result = await self.caller.call(call, rung, self.deadline,
                                                unanswered=unanswered,
                                                retry=self.ladder.config.retry)
            except EndpointConfigError:
                raise
            except ConfigError as e:  # the rung's own endpoint cannot be built: named as a key
                # of the ladder's file, and the server's fault, not the request's
                raise EndpointConfigError(
                    e.detail, source=self.ladder.config.source or e.source,
                    key=f"rungs[{i}].{e.key}" if e.key else f"rungs[{i}]") from e
            except ProviderError as e:
                attempt.status = "error"
                record_error(attempt, e, self.ladder.redact)
                # billed tries that failed (a malformed 200) were paid for all the same
                actual = attempt.cost_usd
                money.spent_usd += actual
                attempt.latency_ms = (self.clock() - t0) * 1000
                self.notes.append(f"rung {i} ({rung.label}): {type(e).__name__}")
                return None
            record_call(attempt, result, self.ladder.redact)
            # Charged before verifying: if the deadline cuts verification short, the model
            # call has still been paid for.
            actual = attempt.cost_usd
            money.spent_usd += actual
            completion = result.completion
            candidate = Candidate(text=completion.text, rung=result.endpoint, rung_index=i,
                                  completion=completion, parsed=completion.parsed)
            before = money.spent_usd
            try:
                verdicts, parsed = await self._verify(candidate)
            except BaseException:
                # Cut short (the deadline, a client gone): the verifier calls that returned
                # were paid and are in the request's spend; the attempt says so too, so the
                # trace adds up to what the answer cost.
                attempt.cost_usd += money.spent_usd - before
                raise
            verifier_cost = sum(v.cost_usd for v in verdicts)
            # Model calls of verifiers were charged (and settled) as they returned; a plugin
            # may also report a cost of its own in its verdict.
            unsettled = max(0.0, verifier_cost - (money.spent_usd - before))
            money.spent_usd += unsettled
            actual += unsettled
            attempt.cost_usd += verifier_cost
            drifted = self.drift.is_drifted(rung.label) if self.drift is not None else None
            last = len(self.ladder.config.rungs) - 1
            if drifted is not None and i < last and policy.accepts(verdicts):
                verdicts = [*verdicts, policy.drift_verdict(
                    rung.label, f"{drifted.disagreements} of {drifted.samples} shadow checks "
                                f"since it rose; tolerated {drifted.max_disagreement:.3f}")]
            attempt.verdicts = verdicts
            attempt.latency_ms = (self.clock() - t0) * 1000
            ok = policy.accepts(verdicts)
            attempt.status = "accepted" if ok else "rejected"
            self.candidate = (attempt, parsed)
            return (attempt, parsed) if ok else None
        finally:
            kept = await money.settle(reservation, actual, estimate=estimate,
                                      unanswered=unanswered)
            if kept:  # beside the load-aware choice's note, if any, not over it
                attempt.note = "; ".join(
                    n for n in (attempt.note, _kept_note(kept, unanswered)) if n)
            if attempt.status == "running":  # cut off (the deadline, a client gone, a
                # shutdown): what went out is in the trace as it is in the budget
                attempt.tries = max(attempt.tries, len(unanswered))
                attempt.latency_ms = (self.clock() - t0) * 1000

    async def charged(self, call: ModelCall, rung: RungConfig) -> tuple[Completion, float]:
        """A model call outside the rung path (a verifier's): the same cap, budget, retries,
        breakers and deadline, charged as soon as it returns; with what it cost, priced at the
        endpoint that answered, since a failover may land on a dearer fallback than ``rung``."""
        money = self.money
        capped = replace(rung, max_tokens=call.max_tokens, fallbacks=tuple(
            replace(f, max_tokens=call.max_tokens) for f in rung.fallbacks))
        estimate = await money.estimate(capped, call.messages)
        skip = money.cap_skip(estimate)
        if skip is not None:
            raise BudgetExceeded(f"a call to {rung.label} would break the cap: {skip.detail}",
                                 spent_usd=money.spent_usd, limit_usd=money.max_cost_usd or 0.0)
        # Counted against the cap before the first await: verifier calls run concurrently
        # (samples, several paid verifiers), and each must see what the others hold.
        money.reserved_usd += estimate
        try:
            reservation = await money.hold(estimate)
            actual = 0.0
            unanswered: list[RungConfig] = []
            try:
                try:
                    result = await self.caller.call(call, rung, self.deadline,
                                                    unanswered=unanswered,
                                                    retry=self.ladder.config.retry)
                except ProviderError as e:
                    actual = e.billed_usd  # billed tries that failed are spent too
                    raise
                actual = result.cost_usd
                return result.completion, actual
            finally:
                money.spent_usd += actual
                await money.settle(reservation, actual, estimate=estimate,
                                   unanswered=unanswered)
        finally:
            money.reserved_usd -= estimate

    async def _verify(self, candidate: Candidate) -> tuple[list[Verdict], Any]:
        bound = self.ladder.bound(candidate.rung_index)
        if self.request.schema is not None and not any(
                getattr(bv.verifier, "checks_request_schema", False) for bv in bound):
            # every rung's answer must match the schema the request asked for, whatever
            # verifiers this rung has (none bound here, or one with a schema of its own)
            taken = any(bv.id == "schema" for bv in bound)
            bound.insert(0, BoundVerifier(id="schema:request" if taken else "schema",
                                          verifier=builtin_verifier("schema")))
        shared: dict[str, Any] = {}
        prior = [a for a in self.attempts if a.rung != candidate.rung_index
                 and a.status not in ("routed", "skipped")]

        def make_ctx(bv: BoundVerifier) -> VerifyContext:
            return VerifyContext(request=self.request, candidate=candidate, attempts=prior,
                                 settings=bv.settings, threshold=bv.threshold,
                                 _caller=self.charged, shared=shared)

        redact = self.ladder.redact
        verdicts = await run_verifiers(bound, make_ctx,
                                       short_circuit=self.ladder.config.policy.short_circuit,
                                       redact=redact if redact else None)
        return verdicts, shared.get("parsed", candidate.parsed)


def record_call(attempt: Attempt, result: CallResult,
                redact: Callable[[str], str] = str) -> None:
    """Write a model call's outcome into its attempt: who answered, what, and what it cost
    (``redact`` cuts the config's secrets from the errors of endpoints failed over from)."""
    used, completion = result.endpoint, result.completion
    attempt.model, attempt.provider = used.model, used.provider
    attempt.endpoint = used.shown_url
    attempt.tries = result.tries
    attempt.note = result.choice
    if result.failover_errors:
        attempt.error = redact("failed over: " + " | ".join(result.failover_errors))
    attempt.text = completion.text
    attempt.response_model = completion.model or None
    attempt.finish_reason = completion.finish_reason
    attempt.stop_sequence = completion.stop_sequence
    attempt.input_tokens, attempt.output_tokens = completion.input_tokens, completion.output_tokens
    attempt.cost_usd = result.cost_usd


def record_error(attempt: Attempt, e: ProviderError,
                 redact: Callable[[str], str] = str) -> None:
    """Write why a call failed into its attempt: each endpoint tried, and why retries stopped
    (``redact`` cuts the config's secrets: a provider plugin's error may quote its key)."""
    attempt.error_type = type(e).__name__
    fo = getattr(e, "failover_errors", [])
    error = " | ".join(fo) if len(fo) > 1 else short(e)
    notes = getattr(e, "__notes__", None)
    if notes:
        error += " (" + "; ".join(notes) + ")"
    attempt.error = redact(error)
    attempt.tries = e.tries
    attempt.cost_usd = e.billed_usd
