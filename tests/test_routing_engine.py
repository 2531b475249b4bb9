"""The router in the climb: learned by the tuner, read from [router], acted on before any call."""

from __future__ import annotations

from pathlib import Path

import pytest

from cascade import Cascade
from cascade.routing import tune_router, write_router
from cascade.testing import Script
from tests.test_routing import _table

pytestmark = pytest.mark.anyio


def _cascade(tmp_path: Path, s: Script) -> Cascade:
    tuning = tune_router(_table(300))
    assert tuning.router is not None, tuning.choice.reason
    table = write_router(tuning, tmp_path / "TUNED.toml")
    table["path"] = str(tmp_path / table["path"])  # a dict config has no folder to be beside
    rungs = [{"model": m, "provider": "openai-compatible", "base_url": f"http://{m}/v1",
              "price": "unknown"} for m in ("small", "big")]
    return Cascade.from_dict({"rungs": rungs, "router": table, "cache": {"enabled": False}},
                             provider_factory=s.factory)


async def test_a_request_predicted_to_fail_the_cheap_rung_starts_higher_and_says_why(
        tmp_path: Path) -> None:
    s = Script({"small": ["an answer"], "big": ["a better answer"]})
    c = _cascade(tmp_path, s)
    hard = await c.aanswer(messages=[
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Prove that the series sum 1/n^5 converges and bound its "
                                    "tail."}])
    first = hard.attempts[0]
    assert first.status == "routed" and "router" in (first.note or "")
    assert hard.model == "big" and s.count("small") == 0
    easy = await c.aanswer(messages=[
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is the capital city of Peru?"}])
    assert easy.attempts[0].status != "routed" and s.count("small") == 1


async def test_a_router_file_for_another_ladder_is_a_config_error(tmp_path: Path) -> None:
    from cascade import ConfigError

    tuning = tune_router(_table(300))
    table = write_router(tuning, tmp_path / "TUNED.toml")
    table["path"] = str(tmp_path / table["path"])  # a dict config has no folder to be beside
    rungs = [{"model": m, "provider": "openai-compatible", "base_url": f"http://{m}/v1",
              "price": "unknown"} for m in ("tiny", "huge")]
    with pytest.raises(ConfigError, match="do not match"):  # at construction, before traffic
        Cascade.from_dict({"rungs": rungs, "router": table, "cache": {"enabled": False}},
                          provider_factory=Script({"tiny": ["x"], "huge": ["y"]}).factory)


def test_cascade_eval_replays_the_router_as_the_climb_takes_it(tmp_path: Path) -> None:
    """Hard prompts (the cheap rung is right on 10% of them) are routed past it; eval must not
    count them as reaching it, nor charge them for it."""
    import numpy as np

    from cascade.evaluate import evaluate

    t = _table(300)
    tuning = tune_router(t)
    table = write_router(tuning, tmp_path / "TUNED.toml")
    table["path"] = str(tmp_path / table["path"])
    cfg = tuning.config.replace(router=table)
    rep = evaluate(t, cfg)
    plain = evaluate(t, tuning.config)  # the same rungs, every case tried at the cheap one
    small, small_plain = rep["rungs"][0], plain["rungs"][0]
    hard = np.array(["Prove" in p or "integral" in p for p in t.prompts])
    assert small["reached"] <= int((~hard).sum()) + 5 < small_plain["reached"]
    assert rep["mean_cost_usd"] < plain["mean_cost_usd"] or rep["accuracy"] > plain["accuracy"]


async def test_a_variant_of_the_ladder_shares_the_router_loaded_with_its_config(
        tmp_path: Path) -> None:
    """A request with its own ``max_tokens`` (the service's per-request variant) read the
    router file again: a retune that rewrote it before the config reloaded put the new router
    under the old thresholds, or failed every such request on a changed file."""
    from dataclasses import replace

    s = Script({"small": ["an answer"], "big": ["a better answer"]})
    c = _cascade(tmp_path, s)
    (tmp_path / "TUNED.router.json").write_text("rewritten by a retune in progress")
    variant = replace(c.config, rungs=tuple(replace(r, max_tokens=64) for r in c.config.rungs))
    ans = await c.aanswer(messages=[
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Prove that the series sum 1/n^5 converges and bound its "
                                    "tail."}], config=variant)
    assert ans.attempts[0].status == "routed" and ans.model == "big"


async def test_the_routers_decision_and_scores_are_in_the_trace_wherever_it_starts(
        tmp_path: Path) -> None:
    """The issue: "its decision and scores are in the trace". A request the router started
    at rung 0, skipping nothing, left no sign of it (no attempt note, no scores anywhere), and
    ``route.scores`` never reached the Answer, its JSON, or ``cascade answer``'s text."""
    from cascade.cli._format import format_climb

    s = Script({"small": ["Lima"], "big": ["a better answer"]})
    c = _cascade(tmp_path, s)
    easy = await c.aanswer(messages=[
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is the capital city of Peru?"}])
    assert easy.route is not None and easy.route["start"] == 0 and easy.route["skipped"] == []
    assert set(easy.route["scores"]) == {"small", "big"}
    assert easy.route["reason"].startswith("started at rung 0: router P(rung 0 right) = ")
    assert easy.to_dict()["route"] == easy.route
    assert "router: started at rung 0" in format_climb(easy)
    hard = await c.aanswer(messages=[
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Prove that the series sum 1/n^5 converges and bound its "
                                    "tail."}])
    assert hard.route is not None and hard.route["skipped"] == ["small"]
    assert 0.0 <= hard.route["scores"]["small"] <= 1.0
    assert "router P(rung 0 right)" in format_climb(hard)  # the routed attempt's note, too


async def test_a_cache_hit_carries_no_route(tmp_path: Path) -> None:
    """No router runs for a cache hit, and the ladder may have none now (or a retuned one):
    the hit showed the original request's route as if it had been routed."""
    s = Script({"small": ["an answer"], "big": ["a better answer"]})
    tuning = tune_router(_table(300))
    table = write_router(tuning, tmp_path / "TUNED.toml")
    table["path"] = str(tmp_path / table["path"])
    rungs = [{"model": m, "provider": "openai-compatible", "base_url": f"http://{m}/v1",
              "price": "unknown"} for m in ("small", "big")]
    cache = {"enabled": True, "directory": str(tmp_path / "cache")}
    ask = [{"role": "system", "content": "Answer briefly."},
           {"role": "user", "content": "Prove that the series sum 1/n^5 converges."}]
    async with Cascade.from_dict({"rungs": rungs, "router": table, "cache": cache},
                                 provider_factory=s.factory) as c:
        first = await c.aanswer(messages=ask)
        hit = await c.aanswer(messages=ask)
    assert first.route is not None and not first.cache_hit
    assert hit.cache_hit and hit.route is None


def test_a_routed_config_tolerates_what_the_routed_rung_disagreed_on_the_suite() -> None:
    """``cascade tune`` wrote no ``drift_max_disagreement`` for the rung the router lets
    accept early ("accepts when tried": no threshold decides it), so after the deploy the
    drift alarm of that rung could never act. The rate is now measured on the cases the
    route lets it answer, as the tuner does for its own accepting rungs."""
    from dataclasses import replace

    from cascade.suite.outcomes import agreement_arrays

    t = _table(300)
    texts: list[list[str | None]] = [["A" if a else "B", "A" if b else "C"]
                                     for a, b in t.correct.tolist()]
    t = replace(t, agreement=agreement_arrays(texts), agreement_normaliser="choice",
                answers=tuple(tuple(r) for r in texts))
    tuning = tune_router(t)
    assert tuning.router is not None, tuning.choice.reason
    small = tuning.config.rungs[0]
    assert small.drift_max_disagreement is not None
    assert 0.0 < small.drift_max_disagreement < 0.5
