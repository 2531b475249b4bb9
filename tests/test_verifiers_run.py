"""run_verifiers over mixed verdicts: concurrency, short-circuit, crashes, timeouts, thresholds."""

from __future__ import annotations

import threading

import anyio
import pytest

from cascade.trace import Verdict
from cascade.verify import BoundVerifier, VerifyContext, as_verifier, run_verifiers
from tests.verifier_kit import FakeCaller, completion, logprobs, make_ctx
from verifiers import ConfidenceVerifier, JudgeVerifier, RefusalVerifier, SchemaVerifier


class Probe:
    """A scripted verifier that records whether it ran."""

    def __init__(self, verdict: Verdict | None = None, *, expensive: bool = False,
                 delay: float = 0.0, error: Exception | None = None) -> None:
        self.name = "probe"
        self.expensive = expensive
        self.verdict = verdict or Verdict(passed=True, reason="ok")
        self.delay = delay
        self.error = error
        self.ran = False

    async def verify(self, ctx: VerifyContext) -> Verdict:
        self.ran = True
        await anyio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return self.verdict


def bind(vid: str, verifier: object, *, threshold: float | None = None,
         timeout_s: float = 5.0) -> BoundVerifier:
    return BoundVerifier(id=vid, verifier=as_verifier(verifier), threshold=threshold,
                         timeout_s=timeout_s)


def ctx_factory(text: str, **kw: object):  # type: ignore[no-untyped-def]
    contexts: dict[str, VerifyContext] = {}

    def make(bv: BoundVerifier) -> VerifyContext:
        ctx = make_ctx(text, **kw)  # type: ignore[arg-type]
        ctx.settings = dict(bv.settings)
        ctx.threshold = bv.threshold
        contexts[bv.id] = ctx
        return ctx

    return make, contexts


@pytest.mark.anyio
async def test_cheap_verifiers_run_concurrently() -> None:
    started = anyio.Event()

    async def waits(ctx: VerifyContext) -> bool:
        await started.wait()  # deadlocks unless the other verifier runs at the same time
        return True

    def sets(ctx: VerifyContext) -> bool:
        started.set()
        return True

    make, _ = ctx_factory("Canberra")
    with anyio.fail_after(2):
        verdicts = await run_verifiers([bind("a", waits), bind("b", sets)], make)
    assert [v.passed for v in verdicts] == [True, True]
    assert [v.verifier for v in verdicts] == ["a", "b"]


@pytest.mark.anyio
async def test_cheap_reject_skips_the_expensive_judge_and_costs_nothing() -> None:
    caller = FakeCaller('{"score": 10}')
    judge = JudgeVerifier(model="gpt-4o")
    make, _ = ctx_factory("I'm sorry, but I can't help with that.", caller=caller)
    verdicts = await run_verifiers([bind("judge", judge), bind("refusal", RefusalVerifier())],
                                   make)
    assert verdicts[0].skipped and not verdicts[0].passed and verdicts[0].cost_usd == 0.0
    assert not verdicts[1].passed and "refusal" in verdicts[1].reason
    assert caller.calls == []
    # Without short-circuit the judge runs anyway, and its cost is in its verdict.
    verdicts = await run_verifiers([bind("judge", judge), bind("refusal", RefusalVerifier())],
                                   make, short_circuit=False)
    assert not verdicts[0].skipped and verdicts[0].cost_usd > 0
    assert verdicts[0].input_tokens == 100 and verdicts[0].output_tokens == 10


@pytest.mark.anyio
async def test_crash_becomes_a_failed_verdict_and_others_still_run() -> None:
    ok = Probe()
    make, _ = ctx_factory("Canberra")
    verdicts = await run_verifiers(
        [bind("buggy", Probe(error=KeyError("missing"))), bind("ok", ok)], make)
    assert not verdicts[0].passed
    assert "verifier crashed: KeyError" in verdicts[0].reason
    assert ok.ran and verdicts[1].passed


@pytest.mark.anyio
async def test_slow_verifier_times_out() -> None:
    make, _ = ctx_factory("Canberra")
    with anyio.fail_after(2):
        verdicts = await run_verifiers([bind("slow", Probe(delay=30), timeout_s=0.05)], make)
    assert not verdicts[0].passed and "timed out after 0.05s" in verdicts[0].reason


@pytest.mark.anyio
async def test_bound_threshold_overrides_the_verifiers_own() -> None:
    lp = logprobs(("Canberra", -0.2231))  # p = 0.80
    comp = completion("Canberra", logprobs=lp)
    make, _ = ctx_factory("Canberra", comp=comp)
    own = ConfidenceVerifier(source="logprobs")  # own threshold 0.7 → passes
    verdicts = await run_verifiers([bind("conf", own), bind("strict", own, threshold=0.9)],
                                   make)
    assert verdicts[0].passed
    assert not verdicts[1].passed and "< 0.9" in verdicts[1].reason
    assert verdicts[1].score == pytest.approx(0.8, abs=1e-3)


@pytest.mark.anyio
async def test_schema_parsed_object_is_shared_for_the_engine() -> None:
    make, contexts = ctx_factory('```json\n{"city": "Canberra"}\n```')
    schema = {"type": "object", "required": ["city"]}
    verdicts = await run_verifiers([bind("schema", SchemaVerifier(schema=schema))], make)
    assert verdicts[0].passed
    assert contexts["schema"].shared["parsed"] == {"city": "Canberra"}


@pytest.mark.anyio
async def test_out_of_range_score_is_a_crash_not_a_pass() -> None:
    make, _ = ctx_factory("Canberra")
    verdicts = await run_verifiers(
        [bind("weird", Probe(Verdict(passed=True, score=7.0, reason="7/10")))], make)
    assert not verdicts[0].passed and "outside [0, 1]" in verdicts[0].reason


class BlockingSync:
    """A sync verifier stuck in blocking work until released (or 3 s, so old code cannot hang
    the test for a minute). It records whether it had finished when others looked."""

    name = "blocking"
    expensive = False

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.finished = False

    def verify(self, ctx: VerifyContext) -> Verdict:
        self.started.set()
        self.release.wait(3.0)
        self.finished = True
        return Verdict(passed=True, reason="finally done")


@pytest.mark.anyio
@pytest.mark.parametrize("as_function", [False, True])
async def test_a_blocking_sync_verifier_times_out_and_the_loop_stays_responsive(
        as_function: bool) -> None:
    """A sync verify() runs in a worker thread: its timeout_s holds (the verdict fails while it
    is still blocked) and other tasks make progress meanwhile. On the event loop thread it would
    block everything until it returned, then pass."""
    blocker = BlockingSync()
    target: object = blocker.verify if as_function else blocker
    make, _ = ctx_factory("Canberra")
    seen_while_blocked: list[bool] = []
    verdicts: list[Verdict] = []

    async def other_task() -> None:
        await anyio.to_thread.run_sync(blocker.started.wait, 3.0)
        seen_while_blocked.append(not blocker.finished)

    async def climb() -> None:
        verdicts.extend(await run_verifiers([bind("blocking", target, timeout_s=0.3)], make))

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(other_task)
            tg.start_soon(climb)
        assert seen_while_blocked == [True]  # the loop ran another task during the block
        (v,) = verdicts
        assert not v.passed and "timed out after 0.3s" in v.reason
        assert not blocker.finished  # the verdict did not wait for the blocked thread
    finally:
        blocker.release.set()
