"""schema= end to end: a pydantic model through instructor and the real SDK on loopback; the
schema verifier escalates past a rung whose JSON does not validate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from cascade import Cascade
from tests.loopback import LoopbackServer, RecordedRequest, Reply, openai_reply

pytestmark = pytest.mark.anyio


class City(BaseModel):
    name: str
    country: str
    population_millions: float


def _config(tmp_path: Path, base_url: str) -> dict[str, Any]:
    rung = {"provider": "openai-compatible", "base_url": base_url, "price": "unknown"}
    return {
        "rungs": [{"model": "small", **rung}, {"model": "big", **rung}],
        "cache": {"directory": str(tmp_path / "cache")},
    }


def _handler(req: RecordedRequest) -> Reply:
    if req.json["model"] == "small":  # valid JSON, wrong shape: population is missing
        return openai_reply(json.dumps({"name": "Canberra", "country": "Australia"}))
    return openai_reply("```json\n" + json.dumps(
        {"name": "Canberra", "country": "Australia", "population_millions": 0.46}) + "\n```")


async def test_pydantic_schema_escalates_and_parses(openai_server: LoopbackServer,
                                                    tmp_path: Path) -> None:
    openai_server.script(_handler)
    async with Cascade.from_dict(_config(tmp_path, openai_server.base_url)) as c:
        ans = await c.aanswer("Capital of Australia, as JSON", schema=City)
        assert ans.verified and ans.model == "big"
        assert isinstance(ans.parsed, City) and ans.parsed.population_millions == 0.46
        small = ans.attempts[0]
        assert small.status == "rejected"
        schema_verdict = next(v for v in small.verdicts if v.verifier == "schema")
        assert not schema_verdict.passed and "population_millions" in schema_verdict.reason
        # instructor's JSON mode for compatible servers: the schema travelled in the request
        assert "population_millions" in json.dumps(openai_server.requests[0].json)
        n = len(openai_server.requests)
        again = await c.aanswer("Capital of Australia, as JSON", schema=City)
        assert again.cache_hit and isinstance(again.parsed, City)
        assert len(openai_server.requests) == n
        # a different schema is a different cache key
        other = await c.aanswer("Capital of Australia, as JSON",
                                schema={"type": "object", "required": ["name"]})
        assert not other.cache_hit and other.verified


async def test_json_schema_dict_rejects_everything_invalid(openai_server: LoopbackServer,
                                                           tmp_path: Path) -> None:
    openai_server.script(lambda req: openai_reply("Sure! Canberra."))
    async with Cascade.from_dict(_config(tmp_path, openai_server.base_url)) as c:
        ans = await c.aanswer("Capital?", schema={"type": "object", "required": ["name"]})
    assert not ans.verified and ans.parsed is None
    assert all(a.status == "rejected" for a in ans.attempts)
    sent = openai_server.requests[0].json
    assert sent["response_format"]["type"] == "json_schema"
