"""The climb: early exit, escalation, verdicts in the trace, costs, the cache, failover."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cascade import (
    Answer,
    BudgetExceeded,
    Cascade,
    ConfigError,
    NoAnswerError,
    ServerError,
    UnverifiedAnswerError,
    Verdict,
    VerifyContext,
    parse_config,
)
from cascade.testing import Script
from cascade.trace import Attempt
from tests.verifier_kit import not_idk

pytestmark = pytest.mark.anyio


def _config(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {
        "rungs": [
            {"model": "small", "provider": "openai-compatible", "base_url": "http://x/v1",
             "input_usd_per_mtok": 1.0, "output_usd_per_mtok": 2.0},
            {"model": "big", "provider": "openai-compatible", "base_url": "http://x/v1",
             "input_usd_per_mtok": 10.0, "output_usd_per_mtok": 20.0},
        ],
        "cache": {"directory": str(tmp_path / "cache")},
        "retry": {"max_attempts": 2, "base_delay_s": 0.0, "max_delay_s": 0.0},
        **extra,
    }





async def test_early_exit_at_the_cheapest_rung(tmp_path: Path) -> None:
    s = Script({"small": ["Canberra"], "big": ["Canberra (big)"]})
    c = Cascade.from_dict(_config(tmp_path), verifiers=[not_idk], provider_factory=s.factory)
    ans = await c.aanswer("Capital of Australia?")
    assert (ans.text, ans.model, ans.verified, ans.cache_hit) == ("Canberra", "small", True, False)
    assert [a.status for a in ans.attempts] == ["accepted"]
    assert s.count("big") == 0
    assert ans.attempts[0].verdicts[0].verifier == "not_idk"
    assert ans.cost_usd == pytest.approx((10 * 1.0 + 1 * 2.0) / 1e6)


async def test_escalates_when_rejected_and_sums_every_rung(tmp_path: Path) -> None:
    s = Script({"small": ["I don't know"], "big": ["Canberra"]})
    c = Cascade.from_dict(_config(tmp_path), verifiers=[not_idk], provider_factory=s.factory)
    ans = await c.aanswer("Capital of Australia?")
    assert ans.model == "big" and ans.verified
    assert [a.status for a in ans.attempts] == ["rejected", "accepted"]
    assert ans.attempts[0].verdicts[0].reason == "the model does not know"
    small = (10 * 1.0 + 3 * 2.0) / 1e6
    big = (10 * 10.0 + 1 * 20.0) / 1e6
    assert ans.cost_usd == pytest.approx(small + big)
    assert ans.attempts[1].text == "Canberra"


async def test_top_rung_rejected_returns_unverified_or_raises(tmp_path: Path) -> None:
    s = Script({"small": ["I don't know"], "big": ["I don't know either"]})
    c = Cascade.from_dict(_config(tmp_path), verifiers=[not_idk], provider_factory=s.factory)
    ans = await c.aanswer("Hard question")
    assert not ans.verified and ans.model == "big" and len(ans.attempts) == 2
    # an unverified answer is never cached: the repeat calls the models again
    await c.aanswer("Hard question")
    assert s.count("small") == 2

    raising = Cascade.from_dict(_config(tmp_path, policy={"on_unverified": "raise"}),
                                verifiers=[not_idk], provider_factory=s.factory)
    with pytest.raises(UnverifiedAnswerError) as ei:
        await raising.aanswer("Hard question")
    assert ei.value.answer.attempts[-1].status == "rejected"


async def test_cache_hit_costs_nothing_and_keeps_the_trace(tmp_path: Path) -> None:
    s = Script({"small": ["I don't know"], "big": ["Canberra"]})
    c = Cascade.from_dict(_config(tmp_path), verifiers=[not_idk], provider_factory=s.factory)
    first = await c.aanswer("Capital of Australia?")
    calls = len(s.calls)
    again = await c.aanswer("  Capital of Australia?\r\n")  # same after normalisation
    assert len(s.calls) == calls
    assert again.cache_hit and again.cost_usd == 0.0 and again.text == "Canberra"
    assert [a.to_dict() for a in again.attempts] == [a.to_dict() for a in first.attempts]
    # refresh skips the lookup; False bypasses the cache entirely
    await c.aanswer("Capital of Australia?", cache="refresh")
    assert len(s.calls) > calls
    n = len(s.calls)
    ans = await c.aanswer("Capital of Australia?", cache=False)
    assert not ans.cache_hit and len(s.calls) > n


async def test_cache_key_covers_thresholds_and_ladder(tmp_path: Path) -> None:
    s = Script({"small": ["Canberra"], "big": ["Canberra"]})
    a = Cascade.from_dict(_config(tmp_path), verifiers=[not_idk], provider_factory=s.factory)
    await a.aanswer("q")
    n = len(s.calls)
    same = Cascade(parse_config(_config(tmp_path)), verifiers=[not_idk],
                   provider_factory=s.factory)
    assert (await same.aanswer("q")).cache_hit and len(s.calls) == n
    cfg = _config(tmp_path)
    cfg["rungs"][0]["temperature"] = 0.7
    b = Cascade.from_dict(cfg, verifiers=[not_idk], provider_factory=s.factory)
    assert not (await b.aanswer("q")).cache_hit and len(s.calls) == n + 1
    cfg = _config(tmp_path)
    cfg["rungs"][0]["thresholds"] = {}
    cfg["verifiers"] = [{"name": "refusal", "threshold": 0.9}]
    c = Cascade.from_dict(cfg, verifiers=[not_idk], provider_factory=s.factory)
    assert not (await c.aanswer("q")).cache_hit


async def test_verifiers_given_as_code_cache_only_when_they_say_what_they_are(
        tmp_path: Path) -> None:
    """Two closures of one function can judge differently and nothing outside them can tell
    them apart, so a code verifier without a ``cache_key`` makes its requests bypass the cache
    (with a warning in the answer); one with a ``cache_key`` is keyed by it."""
    s = Script({"small": ["Canberra"], "big": ["Canberra"]})

    def accept_if(word: str) -> Any:
        def check(ctx: VerifyContext) -> bool:
            return word in ctx.candidate.text
        return check

    strict = Cascade.from_dict(_config(tmp_path), verifiers=[accept_if("Canberra")],
                               provider_factory=s.factory)
    first = await strict.aanswer("q")
    assert first.verified and any("not cached" in w for w in first.warnings)
    loose = Cascade.from_dict(_config(tmp_path), verifiers=[accept_if("Sydney")],
                              provider_factory=s.factory)
    again = await loose.aanswer("q")
    assert not again.cache_hit and again.attempts[0].status != "accepted"
    keyed = accept_if("Canberra")
    keyed.cache_key = "canberra"  # type: ignore[attr-defined]
    k1 = Cascade.from_dict(_config(tmp_path), verifiers=[keyed], provider_factory=s.factory)
    await k1.aanswer("q")
    assert (await k1.aanswer("q")).cache_hit


async def test_metadata_a_verifier_reads_is_part_of_the_cache_key(tmp_path: Path) -> None:
    """The judge decides against ``metadata["reference"]``: two references, two entries."""
    s = Script({"small": ["Canberra"], "big": ["Canberra"]})

    class AgreesWithReference:
        name = "reference_check"
        metadata_keys = ("reference",)
        cache_key = "v1"

        def verify(self, ctx: VerifyContext) -> bool:
            return ctx.request.metadata.get("reference") == ctx.candidate.text

    c = Cascade.from_dict(_config(tmp_path), verifiers=[AgreesWithReference()],
                          provider_factory=s.factory)
    right = await c.aanswer("q", metadata={"reference": "Canberra"})
    assert right.verified
    wrong = await c.aanswer("q", metadata={"reference": "Sydney"})
    assert not wrong.cache_hit and not wrong.verified
    assert (await c.aanswer("q", metadata={"reference": "Canberra", "other": 1})).cache_hit


async def test_transport_failure_fails_over_to_next_rung(tmp_path: Path) -> None:
    s = Script({"small": [ServerError("boom", provider="x", model="small")], "big": ["Canberra"]})
    c = Cascade.from_dict(_config(tmp_path), verifiers=[not_idk], provider_factory=s.factory)
    ans = await c.aanswer("Capital?")
    assert ans.verified and ans.model == "big"
    assert ans.attempts[0].status == "error" and ans.attempts[0].error_type == "ServerError"
    assert ans.attempts[0].tries == 2  # retried once (max_attempts = 2), then failed over
    assert s.count("small") == 2


async def test_fallback_endpoint_for_the_same_rung(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    cfg["rungs"][0]["fallbacks"] = [{"model": "small-mirror"}]
    s = Script({"small": [ServerError("down", provider="x", model="small")],
                "small-mirror": ["Canberra"], "big": ["nope"]})
    c = Cascade.from_dict(cfg, verifiers=[not_idk], provider_factory=s.factory)
    ans = await c.aanswer("Capital?")
    assert ans.model == "small-mirror" and ans.verified and s.count("big") == 0
    assert "ServerError" in (ans.attempts[0].error or "")


async def test_a_fallback_bills_like_its_rung_whose_price_is_from_the_table(
        tmp_path: Path) -> None:
    """A fallback that names no price bills like its rung, also when the rung's price comes
    from the built-in table (it used to be a silent $0 that budgets let through)."""
    cfg = _config(tmp_path)
    cfg["rungs"][0] = {"model": "gpt-4o-mini", "provider": "openai",
                       "fallbacks": [{"provider": "openai-compatible",
                                      "base_url": "http://mirror/v1"}]}
    s = Script({"gpt-4o-mini": [ServerError("down", provider="x", model="gpt-4o-mini"),
                                ServerError("down", provider="x", model="gpt-4o-mini"),
                                "Canberra"]})
    c = Cascade.from_dict(cfg, verifiers=[not_idk], provider_factory=s.factory)
    rung = c.config.rungs[0]
    assert [(e.input_usd_per_mtok, e.output_usd_per_mtok) for e in (rung, *rung.fallbacks)] \
        == [(0.15, 0.6), (0.15, 0.6)]
    ans = await c.aanswer("Capital?")
    assert ans.verified and s.count("gpt-4o-mini") == 3  # twice at the rung, once at its mirror
    assert ans.attempts[0].endpoint == "http://mirror/v1"
    assert ans.cost_usd == pytest.approx((10 * 0.15 + 1 * 0.6) / 1e6)


async def test_every_rung_failing_raises_no_answer_with_trace(tmp_path: Path) -> None:
    err = ServerError("down", provider="x", model="m")
    s = Script({"small": [err], "big": [err]})
    c = Cascade.from_dict(_config(tmp_path), verifiers=[not_idk], provider_factory=s.factory)
    with pytest.raises(NoAnswerError) as ei:
        await c.aanswer("Capital?")
    assert [a.status for a in ei.value.answer.attempts] == ["error", "error"]


async def test_max_cost_skips_rungs_that_would_exceed(tmp_path: Path) -> None:
    s = Script({"small": ["I don't know"], "big": ["Canberra"]})
    c = Cascade.from_dict(_config(tmp_path), verifiers=[not_idk], provider_factory=s.factory)
    # big costs at least 512 output tokens x $20/Mtok = $0.01 by estimate
    ans = await c.aanswer("Capital?", max_cost_usd=0.005, cache=False)
    assert not ans.verified and ans.model == "small"
    assert ans.attempts[1].status == "skipped" and "budget" in (ans.attempts[1].error or "")
    assert s.count("big") == 0


async def test_a_cap_holds_whichever_endpoint_answers(tmp_path: Path) -> None:
    """A rung's estimate is its dearest endpoint's: a cap that its own price fits but its
    fallback's does not skips it, since a failover would pass the cap; a cheaper fallback
    changes nothing."""
    cfg = _config(tmp_path)
    cfg["rungs"][0]["fallbacks"] = [{"model": "small-dear", "input_usd_per_mtok": 10.0,
                                     "output_usd_per_mtok": 20.0}]
    s = Script({"small": ["Canberra"], "small-dear": ["Canberra"], "big": ["Canberra"]})
    c = Cascade.from_dict(cfg, verifiers=[not_idk], provider_factory=s.factory)
    # small: 512 output tokens x $2/Mtok ~ $0.001; its fallback and big ~ $0.01
    with pytest.raises(BudgetExceeded, match=r"no rung fits.*\$0\.0103.*\$0\.0103"):
        await c.aanswer("Capital?", max_cost_usd=0.005, cache=False)
    assert s.count("small") == s.count("small-dear") == s.count("big") == 0
    cfg["rungs"][0]["fallbacks"] = [{"model": "small-mirror"}]
    c = Cascade.from_dict(cfg, verifiers=[not_idk], provider_factory=s.factory)
    ans = await c.aanswer("Capital?", max_cost_usd=0.005, cache=False)
    assert ans.verified and ans.model == "small"


async def test_answer_many_keeps_order_and_isolates_failures(tmp_path: Path) -> None:
    def echo(call: Any) -> str:
        q = call.messages[-1].content
        if q == "q3":
            raise ServerError("bad", provider="x", model=call.model)
        return f"answer to {q}"

    s = Script({"small": [echo], "big": [echo]})
    c = Cascade.from_dict(_config(tmp_path), verifiers=[not_idk], provider_factory=s.factory)
    out = await c.aanswer_many([f"q{i}" for i in range(6)], concurrency=3)
    assert isinstance(out[3], NoAnswerError)
    for i in (0, 1, 2, 4, 5):
        a = out[i]
        assert isinstance(a, Answer) and a.text == f"answer to q{i}"


def test_sync_answer_and_from_file(tmp_path: Path) -> None:
    p = tmp_path / "cascade.toml"
    p.write_text(
        f'''
[[rungs]]
model = "small"
price = "unknown"
provider = "openai-compatible"
base_url = "http://127.0.0.1:9/v1"

[cache]
directory = "{tmp_path / 'c'}"
''')
    s = Script({"small": ["hello"]})
    with Cascade.from_file(p, provider_factory=s.factory) as c:
        ans = c.answer("hi")
        assert ans.text == "hello" and ans.verified
        assert c.answer("hi").cache_hit


def test_a_program_that_never_closes_still_exits(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = tmp_path / "prog.py"
    script.write_text(
        "from cascade.testing import Script\n"
        "from cascade import Cascade\n"
        "s = Script({'m': ['hello']})\n"
        "c = Cascade.from_dict({'rungs': [{'model': 'm', 'price': 'unknown', "
        "'provider': 'openai-compatible', "
        "'base_url': 'http://x/v1'}], 'cache': {'enabled': False}}, provider_factory=s.factory)\n"
        "print(c.answer('hi').text)\n"
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=60, cwd=root, env={**__import__("os").environ,
                                                     "PYTHONPATH": str(root)})
    assert proc.returncode == 0 and proc.stdout.strip() == "hello", proc.stderr


class PaidCheck:
    """Asks a 'judge' model (priced like big) whether the answer is fine."""

    name = "paid_check"
    expensive = True

    async def verify(self, ctx: VerifyContext) -> Verdict:
        from cascade import ModelCall, RungConfig

        judge = RungConfig(model="judge", provider="openai-compatible", base_url="http://x/v1",
                           input_usd_per_mtok=10.0, output_usd_per_mtok=20.0)
        c = await ctx.call_model(ModelCall(model="judge", messages=ctx.request.messages,
                                           max_tokens=100), judge)
        return Verdict(passed=c.text == "yes", reason=f"judge said {c.text}")


async def test_paid_verifier_cost_counts_once_and_respects_max_cost(tmp_path: Path) -> None:
    s = Script({"small": ["Canberra"], "big": ["Canberra"], "judge": ["yes"]})
    c = Cascade.from_dict(_config(tmp_path), verifiers=[PaidCheck()], provider_factory=s.factory)
    ans = await c.aanswer("Capital?", cache=False)
    judge_cost = (10 * 10.0 + 1 * 20.0) / 1e6
    small_cost = (10 * 1.0 + 1 * 2.0) / 1e6
    assert ans.verified and ans.model == "small"
    assert ans.attempts[0].verdicts[0].cost_usd == pytest.approx(judge_cost)
    assert ans.cost_usd == pytest.approx(small_cost + judge_cost)  # counted once

    # room for small's call ($0.0010 by estimate) but not for the judge's as well ($0.0021)
    calls = s.count("judge")
    capped = await c.aanswer("Capital?", cache=False, max_cost_usd=0.002)
    assert s.count("judge") == calls  # the judge was never called
    v = capped.attempts[0].verdicts[0]
    assert not v.passed and "BudgetExceeded" in v.reason and "max_cost_usd" in v.reason
    assert capped.cost_usd <= 0.002 and not capped.verified
    assert capped.attempts[1].status == "skipped"  # big does not fit either


async def test_per_call_config_as_dict_or_path(tmp_path: Path) -> None:
    s = Script({"small": ["from small"], "other": ["from other"]})
    c = Cascade.from_dict(_config(tmp_path), provider_factory=s.factory)
    other = {"rungs": [{"model": "other", "price": "unknown", "provider": "openai-compatible",
                        "base_url": "http://x/v1"}], "cache": {"enabled": False}}
    assert (await c.aanswer("q", config=other)).text == "from other"
    p = tmp_path / "other.toml"
    p.write_text('[[rungs]]\nmodel = "other"\nprice = "unknown"\nprovider = "openai-compatible"\n'
                 'base_url = "http://x/v1"\n[cache]\nenabled = false\n')
    assert (await c.aanswer("q", config=p)).text == "from other"
    assert (await c.aanswer("q", cache=False)).text == "from small"


class _Shadows:
    """An observer collecting shadow results."""

    def __init__(self) -> None:
        self.results: list[tuple[Attempt, Attempt, bool | None]] = []

    def on_answer(self, request: Any, answer: Any, error: Any) -> None:
        pass

    def on_shadow(self, request: Any, accepted: Attempt, shadow: Attempt,
                  agreed: bool | None) -> None:
        self.results.append((accepted, shadow, agreed))


async def test_shadow_checks_sample_the_top_rung_without_changing_the_answer(
        tmp_path: Path) -> None:
    from cascade import health

    s = Script({"small": ["Canberra", "Sydney"], "big": ["Canberra"]})
    cfg = _config(tmp_path, policy={"shadow_rate": 1.0})
    seen = _Shadows()
    c = Cascade.from_dict(cfg, verifiers=[not_idk], provider_factory=s.factory, observers=[seen])
    agree = await c.aanswer("Capital of Australia?", cache=False)
    differ = await c.aanswer("Capital of Australia?", cache=False)
    assert c.drain_shadows(10)
    assert (agree.text, differ.text) == ("Canberra", "Sydney")  # monitoring only
    assert [a.status for a in differ.attempts] == ["accepted"]  # the shadow is off the path
    assert sorted(r[2] for r in seen.results) == [False, True]
    assert all(r[1].status == "shadow" and r[1].cost_usd > 0 for r in seen.results)
    assert differ.cost_usd == pytest.approx((10 * 1.0 + 1 * 2.0) / 1e6)
    small_ep = c.config.rungs[0].endpoint
    shadow = health()["endpoints"][small_ep]["shadow"]
    assert shadow["samples"] >= 2 and shadow["disagreements"] >= 1
    c.close()

    quiet = Cascade.from_dict(_config(tmp_path), verifiers=[not_idk], provider_factory=s.factory)
    n = s.count("big")
    await quiet.aanswer("Capital of Australia?", cache=False)
    assert quiet.drain_shadows(1)
    assert s.count("big") == n  # shadow_rate defaults to 0


async def test_a_callers_request_id_names_the_answer_and_a_bad_one_is_refused_unpaid(
        tmp_path: Path) -> None:
    s = Script({"small": ["Canberra", "Canberra"], "big": ["Canberra (big)"]})
    c = Cascade.from_dict(_config(tmp_path), verifiers=[not_idk], provider_factory=s.factory)
    ans = await c.aanswer("Capital of Australia?", request_id="upstream-42:a.b_c")
    assert ans.request_id == "upstream-42:a.b_c"
    hit = await c.aanswer("Capital of Australia?", request_id="again-1")
    assert hit.cache_hit and hit.request_id == "again-1"
    default = await c.aanswer("Capital of Australia?")
    assert len(default.request_id) == 32 and default.request_id != "again-1"
    for bad in ("", "x" * 129, "has space", "new\nline", "-leading", 42):
        with pytest.raises(ConfigError) as ei:
            await c.aanswer("Capital of New Zealand?", request_id=bad)  # type: ignore[arg-type]
        assert ei.value.key == "request_id"
    assert s.count("small") == 1  # nothing paid for the refused ones
