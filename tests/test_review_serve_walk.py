"""Found by a black-box walk of ``cascade serve`` against the issue's contract: each test failed
on the code before its fix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pydantic
import pytest

from cascade import Cascade
from cascade.serve import create_app
from tests.loopback import LoopbackServer, RecordedRequest, Reply, openai_reply
from tests.serve_kit import ladder, opened, serving

QUESTION: Any = [{"role": "user", "content": "Name a city."}]


class City(pydantic.BaseModel):
    name: str


def _city_json(req: RecordedRequest) -> Reply:
    return openai_reply('{"name": "Paris"}', model=req.json["model"])


def test_json_schema_strict_name_and_description_reach_the_rung(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    """``response_format.json_schema`` carries ``strict``, ``name`` and ``description`` (the
    openai SDK's ``parse()`` sends strict and the model's name): they were parsed and then
    dropped, so an OpenAI rung decoded unconstrained and its answers were rejected more."""
    openai_server.script(_city_json)
    with serving(create_app(ladder(tmp_path, openai_server.base_url))) as url:
        client = opened(openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0))
        parsed = client.chat.completions.parse(model="cascade", messages=QUESTION,
                                               response_format=City)
        assert parsed.choices[0].message.parsed == City(name="Paris")
        sent = openai_server.requests[-1].json["response_format"]
        assert sent["type"] == "json_schema"
        assert sent["json_schema"]["name"] == "City" and sent["json_schema"]["strict"] is True

        schema = {"type": "object", "properties": {"name": {"type": "string"}},
                  "required": ["name"], "additionalProperties": False}
        client.chat.completions.create(model="cascade", messages=QUESTION, response_format={
            "type": "json_schema", "json_schema": {"name": "place", "description": "A city.",
                                                   "schema": schema, "strict": True}})
        sent = openai_server.requests[-1].json["response_format"]["json_schema"]
        assert sent == {"name": "place", "description": "A city.", "strict": True,
                        "schema": schema}
        r = httpx.post(f"{url}/v1/chat/completions", json={
            "model": "cascade", "messages": QUESTION, "response_format": {
                "type": "json_schema", "json_schema": {"name": "no spaces", "schema": schema}}})
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "response_format.json_schema.name"


@pytest.mark.anyio
async def test_schema_options_in_the_library_key_the_cache_and_reach_tools_mode(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    """The same options from code: ``strict`` changes what the rung is asked, so it is part
    of the cache key; in ``tools`` mode the function gets the name, description and strict."""
    openai_server.script(lambda req: openai_reply(
        '{"name": "Paris"}', model=req.json["model"]))
    cfg = ladder(tmp_path, openai_server.base_url, models=("m",),
                 cache={"enabled": True, "directory": str(tmp_path / "cache")})
    schema = City.model_json_schema()
    async with Cascade(cfg) as c:
        a = await c.aanswer(messages=QUESTION, schema=schema, schema_options={"strict": True})
        b = await c.aanswer(messages=QUESTION, schema=schema)
        assert a.verified and b.verified and not b.cache_hit
        assert a.cache_key and b.cache_key and a.cache_key != b.cache_key
        with pytest.raises(Exception, match="allowed: name, description, strict"):
            await c.aanswer(messages=QUESTION, schema=schema, schema_options={"strict2": 1})
        with pytest.raises(Exception, match="needs a JSON Schema"):
            await c.aanswer(messages=QUESTION, schema_options={"strict": True})
    rung = {"model": "m", "provider": "openai-compatible", "base_url": openai_server.base_url,
            "structured_output": "tools", "input_usd_per_mtok": 0.0, "output_usd_per_mtok": 0.0}
    openai_server.script(lambda req: openai_reply(None, model="m", tool_calls=[
        {"id": "c1", "type": "function",
         "function": {"name": "place", "arguments": '{"name": "Paris"}'}}]))
    async with Cascade.from_dict({"rungs": [rung], "cache": {"enabled": False}}) as c:
        ans = await c.aanswer(messages=QUESTION, schema=schema, schema_options={
            "name": "place", "description": "A city.", "strict": True})
    assert ans.verified, ans.attempts
    [tool] = openai_server.requests[-1].json["tools"]
    assert tool["function"]["name"] == "place" and tool["function"]["strict"] is True
    assert tool["function"]["description"] == "A city."


# ---------------------------------------------------------------- the audit log


def _request(text: str) -> Any:
    from cascade.messages import Message, Request

    return Request(messages=(Message("user", text),), id=text)


def test_an_audit_log_on_a_pipe_gets_every_line(tmp_path: Path) -> None:
    """``audit_log = "/dev/stdout"`` (a log shipper reads the container's stdout) or a FIFO:
    the writer opened it "ab+" and seeked, every line failed with "not seekable", and
    ``dropped`` stayed 0, so the audit was lost without a sign in the metrics."""
    import os
    import threading

    from cascade.audit import AuditLog

    fifo = tmp_path / "audit.fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    log = AuditLog(fifo)
    for i in range(3):
        log.on_answer(_request(f"q{i}"), None, RuntimeError("x"))
    assert log.flush(5.0)
    log.close()
    reader.join(5.0)
    lines = [json.loads(x) for x in b"".join(got).splitlines()]
    assert [x["request_id"] for x in lines] == ["q0", "q1", "q2"]
    assert log.dropped == 0 and not (tmp_path / "audit.fifo.lock").exists()


def test_a_fifo_audit_log_stays_open_across_batches(tmp_path: Path) -> None:
    """Reopened and closed for every batch, the FIFO gave its reader EOF after the first one
    (a shipper reading to EOF exits), and the next open blocked the writer for good."""
    import os
    import subprocess
    import time

    from cascade.audit import AuditLog

    fifo = tmp_path / "audit.fifo"
    os.mkfifo(fifo)
    out = tmp_path / "got.txt"
    with out.open("wb") as sink:
        reader = subprocess.Popen(["cat", str(fifo)], stdout=sink)
        try:
            log = AuditLog(fifo)
            log.on_answer(_request("q0"), None, RuntimeError("x"))
            assert log.flush(5.0)
            time.sleep(0.3)
            assert reader.poll() is None, "the reader got EOF after one batch"
            log.on_answer(_request("q1"), None, RuntimeError("x"))
            assert log.flush(5.0)
            log.close()
            reader.wait(5.0)
        finally:
            reader.kill()
    assert [json.loads(x)["request_id"] for x in out.read_text().splitlines()] == ["q0", "q1"]


def test_an_audit_line_that_cannot_be_written_is_counted_as_dropped(tmp_path: Path) -> None:
    """A write that fails (the disk full, the file replaced by a directory) only logged a
    traceback: ``cascade_audit_dropped_total`` said nothing was lost."""
    from cascade.audit import AuditLog

    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    path.mkdir()  # every open for append now fails
    log.on_answer(_request("q0"), None, RuntimeError("x"))
    log.on_answer(_request("q1"), None, RuntimeError("x"))
    assert log.flush(5.0)
    assert log.dropped == 2
    log.on_answer(_request("q1b"), None, RuntimeError("x"))  # fails with the summary line
    assert log.flush(5.0)
    assert log.dropped == 3  # the lost summary is not a dropped line of its own
    path.rmdir()
    log.on_answer(_request("q2"), None, RuntimeError("x"))
    log.close()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["type"] for x in lines] == ["answer", "dropped"]
    assert lines[1]["dropped"] == 3


# ---------------------------------------------------------------- error responses


def test_every_error_body_has_openais_four_keys_and_a_failed_climb_says_its_cost(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    """OpenAI's error object always carries ``message``, ``type``, ``param`` and ``code``
    (null where none): ours left out whichever was None. And a climb that failed after paid
    calls (422 unverified) sent no cost header: only the body's trace said what it cost."""
    openai_server.script(lambda req: openai_reply("I'm sorry, but I can't help with that.",
                                                  model=req.json["model"]))
    cfg = ladder(tmp_path, openai_server.base_url,
                 policy={"on_unverified": "raise"})
    with serving(create_app(cfg)) as url:
        bad = [httpx.post(f"{url}/v1/chat/completions", json=body) for body in (
            {"model": "cascade", "messages": QUESTION, "n": 2},
            {"messages": QUESTION},
            {"model": "cascade", "messages": QUESTION, "max_tokens": True})]
        bad.append(httpx.post(f"{url}/v1/chat/completions", content=b"{not json"))
        bad.append(httpx.get(f"{url}/v1/nowhere"))
        for r in bad:
            assert r.status_code in (400, 404), r.text
            assert set(r.json()["error"]) >= {"message", "type", "param", "code"}, r.text
        refused = httpx.post(f"{url}/v1/chat/completions",
                             json={"model": "cascade", "messages": QUESTION})
    assert refused.status_code == 422
    err = refused.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["param"] is None
    cost = err["cascade"]["cost_usd"]
    assert cost > 0
    assert float(refused.headers["x-cascade-cost-usd"]) == pytest.approx(cost)
    assert refused.headers["x-cascade-verified"] == "false"
    assert refused.headers["x-cascade-request-id"] == err["cascade"]["request_id"]


def test_a_climb_stopped_by_money_is_a_429_not_an_unverified_422(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    """The cheap rung was rejected and the next one skipped because it would break the cap:
    the client got 422 ``unverified_answer``, as if the answers' quality had stopped the climb,
    and ``cascade_budget_refusals_total`` did not move. Under "raise" it is now a 429
    ``budget_exceeded`` with the trace, and in code the error is caught as either."""
    from cascade.errors import BudgetExceeded, UnverifiedAnswerError

    openai_server.script(lambda req: openai_reply(
        "I'm sorry, but I can't help with that." if req.json["model"] == "small" else "Paris",
        model=req.json["model"], completion_tokens=5))
    cfg = ladder(tmp_path, openai_server.base_url, policy={"on_unverified": "raise"},
                 max_cost_usd=0.0002)
    with serving(create_app(cfg)) as url:
        r = httpx.post(f"{url}/v1/chat/completions",
                       json={"model": "cascade", "messages": QUESTION, "max_tokens": 50})
        metrics = httpx.get(f"{url}/metrics").text
    assert r.status_code == 429, r.text
    err = r.json()["error"]
    assert err["type"] == "budget_exceeded" and "was not tried" in err["message"]
    assert [a["status"] for a in err["cascade"]["attempts"]] == ["rejected", "skipped"]
    assert float(r.headers["x-cascade-cost-usd"]) > 0
    assert any(line.startswith("cascade_budget_refusals_total{") and not line.endswith(" 0.0")
               for line in metrics.splitlines()), metrics

    async def in_code() -> None:
        async with Cascade(cfg) as c:
            for kind in (BudgetExceeded, UnverifiedAnswerError):
                with pytest.raises(kind) as info:
                    await c.aanswer(messages=QUESTION, max_cost_usd=0.0015)
                given = getattr(info.value, "answer", None)
                assert given is not None and given.text.startswith("I'm sorry")

    import anyio

    anyio.run(in_code)


# ---------------------------------------------------------------- the cache and clients


@pytest.mark.parametrize("scope", [None, ["client"]])
def test_cache_key_metadata_client_keeps_each_clients_answers_apart(
        tmp_path: Path, openai_server: LoopbackServer, monkeypatch: pytest.MonkeyPatch,
        scope: list[str] | None) -> None:
    """The cache is shared across clients: one client's hit told another that the same
    question had been asked, and when (the original trace). ``[cache] key_metadata =
    ["client"]`` now keys entries by client; the default stays shared (it saves money)."""
    monkeypatch.setenv("WALK_KEY_A", "sk-walk-a-0123456789")
    monkeypatch.setenv("WALK_KEY_B", "sk-walk-b-9876543210")
    openai_server.script(lambda req: openai_reply("Paris", model=req.json["model"]))
    cache: dict[str, Any] = {"enabled": True, "directory": str(tmp_path / "cache")}
    if scope is not None:
        cache["key_metadata"] = scope
    cfg = ladder(tmp_path, openai_server.base_url, cache=cache, server={"clients": [
        {"name": "a", "key_env": "WALK_KEY_A"}, {"name": "b", "key_env": "WALK_KEY_B"}]})
    with serving(create_app(cfg)) as url:
        hits = []
        for key in ("sk-walk-a-0123456789", "sk-walk-b-9876543210", "sk-walk-a-0123456789"):
            r = httpx.post(f"{url}/v1/chat/completions",
                           headers={"authorization": f"Bearer {key}"},
                           json={"model": "cascade", "messages": QUESTION})
            assert r.status_code == 200, r.text
            hits.append(r.headers["x-cascade-cache-hit"])
    assert hits == (["false", "false", "true"] if scope else ["false", "true", "true"])


def test_cache_key_metadata_must_be_a_list_of_names(tmp_path: Path) -> None:
    from cascade import ConfigError, parse_config

    with pytest.raises(ConfigError, match=r"cache\.key_metadata"):
        parse_config({"rungs": [{"model": "m", "provider": "openai-compatible",
                                 "base_url": "http://127.0.0.1:9/v1", "input_usd_per_mtok": 0,
                                 "output_usd_per_mtok": 0}],
                      "cache": {"key_metadata": "client"}}, source="t")


def test_a_service_that_estimates_costs_loads_tiktoken_at_start_up(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    """With a budget or cap, costs are estimated with tiktoken, whose encodings loaded on the
    first request (0.96 s for it against 5 ms for the next ones). They load at start-up now,
    before the service says it is ready."""
    from cascade import tokens

    tokens._reset()
    cfg = ladder(tmp_path, openai_server.base_url, budget={"limit_usd": 1.0})
    with serving(create_app(cfg)):
        loaded = dict(tokens._encodings)
    assert loaded and all(v is not None for v in loaded.values()), loaded


def test_escalations_count_a_climb_going_on_not_the_top_rungs_rejection(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    """``cascade_escalations_total`` counted the top rung's rejection (nothing escalates
    from there) and not a cheap rung's failed call that moved the climb on."""
    from tests.loopback import openai_error

    def handle(req: RecordedRequest) -> Reply:
        prompt = req.json["messages"][-1]["content"]
        if prompt == "fail" and req.json["model"] == "small":
            return openai_error(400, "bad request")
        return openai_reply("I'm sorry, but I can't help with that." if prompt == "refuse"
                            else "Paris", model=req.json["model"])

    openai_server.script(handle)
    with serving(create_app(ladder(tmp_path, openai_server.base_url))) as url:
        for prompt in ("refuse", "fail"):
            r = httpx.post(f"{url}/v1/chat/completions", json={
                "model": "cascade", "messages": [{"role": "user", "content": prompt}]})
            assert r.status_code == 200, r.text
        text = httpx.get(f"{url}/metrics").text
    counts = {line.split("{")[1].split("}")[0]: float(line.rsplit(" ", 1)[1])
              for line in text.splitlines() if line.startswith("cascade_escalations_total{")}
    assert counts == {'ladder="cascade",rung="small"': 2.0}, counts


def test_the_access_log_never_holds_a_query_string(tmp_path: Path) -> None:
    """With ``-v`` uvicorn logs each request's path with its query: a client that put its key
    in the URL (``?key=sk-...``) had it written to the log. The access log's handler now cuts
    the query (the config every worker applies)."""
    import io
    import logging
    import logging.config

    from cascade.serve.cli import log_config

    cfg = log_config()
    logging.config.dictConfig(cfg)
    access = logging.getLogger("uvicorn.access")
    stream = io.StringIO()
    [handler] = access.handlers
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    access.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5", "POST",
                "/v1/chat/completions?key=sk-secret-123", "1.1", 401)
    assert "sk-secret-123" not in stream.getvalue()
    assert "/v1/chat/completions?..." in stream.getvalue()


def test_time_to_first_token_is_a_metric_of_the_running_service(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    """Time to first token was measured only by ``bench/serve.py``: a running service had no
    figure of it. ``cascade_stream_first_token_seconds`` observes each streamed answer."""
    openai_server.script(lambda req: openai_reply("Paris", model=req.json["model"]))
    with serving(create_app(ladder(tmp_path, openai_server.base_url))) as url:
        client = opened(openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0))
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="cascade", messages=QUESTION, stream=True) if c.choices)
        assert text == "Paris"
        client.chat.completions.create(model="cascade", messages=QUESTION)  # not streamed
        metrics = httpx.get(f"{url}/metrics").text
    assert 'cascade_stream_first_token_seconds_count{ladder="cascade"} 1.0' in metrics, metrics


def test_a_budget_store_outage_is_a_503_naming_the_store_not_a_500() -> None:
    """With Redis down a request on a budget raised ``BudgetStoreError``, which the service
    answered as a 500 ``server_error``, a status its error table does not list."""
    from cascade.errors import BudgetStoreError
    from cascade.serve.errors import from_exception

    e = from_exception(BudgetStoreError("the shared budget store redis://127.0.0.1:9/0 is "
                                        "unreachable (refused); fail-closed"))
    assert e.status == 503
    body = e.payload()["error"]
    assert isinstance(body, dict) and body["type"] == "service_unavailable"
    assert body["code"] == "budget_store_unavailable" and "redis://127.0.0.1:9/0" in body["message"]
    assert e.headers["x-should-retry"] == "false"


def test_a_shadow_skipped_for_money_is_not_counted_as_a_check() -> None:
    """``cascade_shadow_checks_total`` counted shadows skipped over the cap or budget (25 of
    64 made no top-rung call in a walk), inflating the checks the alarm's rate is read from."""
    from cascade.messages import Message, Request
    from cascade.serve.metrics import Metrics
    from cascade.trace import Attempt

    m = Metrics("lad")
    req = Request(messages=(Message("user", "q"),))
    acc = Attempt(rung=0, model="small", provider="x", name="small", status="accepted")
    skipped = Attempt(rung=1, model="big", provider="x", name="big", status="shadow",
                      error="budget: over", error_type="Skipped")
    checked = Attempt(rung=1, model="big", provider="x", name="big", status="shadow")
    m.on_shadow(req, acc, skipped, None)
    m.on_shadow(req, acc, checked, False)
    text = m.render().decode()
    assert 'cascade_shadow_checks_total{ladder="lad",rung="small"} 1.0' in text
    assert 'cascade_shadow_disagreements_total{ladder="lad",rung="small"} 1.0' in text
