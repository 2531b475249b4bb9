"""run_verifiers over mixed verdicts: concurrency, short-circuit, crashes, timeouts, thresholds."""

from __future__ import annotations

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
