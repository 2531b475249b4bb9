"""``cascade serve`` over the wire: the official openai SDK (sync, async, streaming) as the
client, plain httpx for the error cases, the ladder's rungs on loopback model servers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import httpx2 as httpx
import openai
import pytest

from cascade.serve import create_app
from tests.loopback import LoopbackServer, openai_error, openai_reply
from tests.serve_kit import echo_handler, ladder, opened, serving

MESSAGES: Any = [{"role": "user", "content": "What is the capital of France?"}]


def _client(url: str, **kw: Any) -> openai.OpenAI:
    return opened(openai.OpenAI(base_url=f"{url}/v1", api_key=kw.pop("api_key", "none"),
                                max_retries=0, **kw))


def test_sync_sdk_gets_the_accepting_rungs_answer_with_trace_usage_and_headers(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    openai_server.script(echo_handler(refuse=("small",)))
    app = create_app(ladder(tmp_path, openai_server.base_url))
    with serving(app) as url:
        raw = _client(url).chat.completions.with_raw_response.create(
            model="cascade", messages=MESSAGES)
        r = raw.parse()
    assert r.choices[0].message.content == "big says: What is the capital of France?"
    assert r.model == "big"  # the accepting rung's model, not the ladder's name
    # usage sums every call: both rungs answered 7 prompt + 3 completion tokens
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (14, 6, 20)
    trace = (r.model_extra or {})["cascade"]
    assert trace["verified"] is True and trace["cache_hit"] is False
    assert [a["status"] for a in trace["attempts"]] == ["rejected", "accepted"]
    assert trace["attempts"][0]["verdicts"][0]["verifier"] == "refusal"
    assert trace["cost_usd"] == pytest.approx((7 * 1 + 3 * 2 + 7 * 2 + 3 * 4) / 1e6)
    h = raw.headers
    assert h["x-cascade-request-id"] == trace["request_id"] and r.id.endswith(trace["request_id"])
    assert (h["x-cascade-verified"], h["x-cascade-model"], h["x-cascade-cache-hit"]) == (
        "true", "big", "false")
    assert float(h["x-cascade-cost-usd"]) == pytest.approx(trace["cost_usd"])


def test_models_lists_the_ladder_under_its_configured_name(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    app = create_app(ladder(tmp_path, openai_server.base_url, server={"name": "cheap-first"}))
    with serving(app) as url:
        client = _client(url)
        models = client.models.list()
        assert [m.id for m in models.data] == ["cheap-first"]
        with pytest.raises(openai.NotFoundError) as ei:
            client.chat.completions.create(model="cascade", messages=MESSAGES)
        assert ei.value.body["code"] == "model_not_found"  # type: ignore[index]
        ok = client.chat.completions.create(model="cheap-first", messages=MESSAGES)
        assert ok.model == "small"


@pytest.mark.anyio
async def test_concurrent_clients_never_get_each_others_answers(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    # the cheap rung refuses every third prompt, so climbs of different lengths interleave
    def handler(req: Any) -> Any:
        prompt = req.json["messages"][-1]["content"]
        n = int(prompt.split()[-1])
        if req.json["model"] == "small" and n % 3 == 0:
            return openai_reply("I can't help with that.", model="small", delay_s=0.01)
        return openai_reply(f"answer to {n}", model=req.json["model"], delay_s=(n % 5) / 200)

    openai_server.script(handler)
    app = create_app(ladder(tmp_path, openai_server.base_url))
    with serving(app) as url:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none",
                                      max_retries=0) as client:
            results: dict[int, Any] = {}

            async def one(n: int) -> None:
                results[n] = await client.chat.completions.with_raw_response.create(
                    model="cascade", messages=[{"role": "user", "content": f"question {n}"}])

            async with anyio.create_task_group() as tg:
                for n in range(120):
                    tg.start_soon(one, n)
    ids = set()
    for n, raw in results.items():
        r = raw.parse()
        assert r.choices[0].message.content == f"answer to {n}"
        assert r.model == ("big" if n % 3 == 0 else "small")
        ids.add(raw.headers["x-cascade-request-id"])
    assert len(ids) == 120


def test_streaming_sends_the_verified_answer_with_its_trace_first_and_usage_last(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    openai_server.script(echo_handler(refuse=("small",)))
    app = create_app(ladder(tmp_path, openai_server.base_url))
    with serving(app) as url:
        chunks = list(_client(url).chat.completions.create(
            model="cascade", messages=MESSAGES, stream=True,
            stream_options={"include_usage": True}))
        plain = list(_client(url).chat.completions.create(model="cascade", messages=MESSAGES,
                                                           stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "big says: What is the capital of France?"
    first = next(c for c in chunks if c.choices and c.choices[0].delta.content)
    assert (first.model_extra or {})["cascade"]["verified"] is True  # before any token
    assert first.model == "big"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 20
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert all(c.usage is None for c in plain)


def test_stream_reports_each_escalation_as_a_comment_before_the_answer(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    openai_server.script(echo_handler(refuse=("small", "mid")))
    app = create_app(ladder(tmp_path, openai_server.base_url, models=("small", "mid", "big")))
    with serving(app) as url, httpx.stream(
            "POST", f"{url}/v1/chat/completions",
            json={"model": "cascade", "messages": MESSAGES, "stream": True}) as resp:
        events = [e for e in resp.read().decode().split("\n\n") if e]
        headers = resp.headers
    progress = [json.loads(e[len(": cascade "):]) for e in events if e.startswith(": cascade ")]
    assert [(p["name"], p["status"]) for p in progress] == [
        ("small", "rejected"), ("mid", "rejected"), ("big", "accepted")]
    assert progress[0]["verdicts"][0] == {"verifier": "refusal", "passed": False, "score": None}
    first_data = next(i for i, e in enumerate(events) if e.startswith("data: "))
    assert first_data > max(i for i, e in enumerate(events) if e.startswith(": cascade "))
    chunk = json.loads(events[first_data][6:])
    assert chunk["model"] == "big" and chunk["cascade"]["verified"] is True
    # the response started before the answer, and still names the request the trace is of
    rid = chunk["cascade"]["request_id"]
    assert headers["x-cascade-request-id"] == headers["x-request-id"] == rid
    assert chunk["id"] == f"chatcmpl-{rid}"


def test_stream_wire_format_ends_with_done_and_carries_the_headers(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    openai_server.script(echo_handler(refuse=()))
    app = create_app(ladder(tmp_path, openai_server.base_url))
    with serving(app) as url, httpx.stream(
            "POST", f"{url}/v1/chat/completions",
            json={"model": "cascade", "messages": MESSAGES, "stream": True}) as resp:
        body = resp.read().decode()
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["x-cascade-verified"] == "true"
        assert resp.headers["x-cascade-model"] == "small"
    events = [e for e in body.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    data = [json.loads(e[len("data: "):]) for e in events[:-1] if e.startswith("data: ")]
    assert data[0]["object"] == "chat.completion.chunk"
    assert data[0]["choices"][0]["delta"] == {"role": "assistant",
                                               "content": "small says: What is the capital "
                                                          "of France?"}


def test_unverified_answer_is_200_verified_false_or_an_error_under_raise(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    openai_server.script(echo_handler(refuse=("small", "big")))
    ret = create_app(ladder(tmp_path, openai_server.base_url))
    with serving(ret) as url:
        r = httpx.post(f"{url}/v1/chat/completions", json={"model": "cascade",
                                                           "messages": MESSAGES})
    assert r.status_code == 200 and r.headers["x-cascade-verified"] == "false"
    assert r.json()["cascade"]["verified"] is False
    raising = create_app(ladder(tmp_path, openai_server.base_url,
                                policy={"on_unverified": "raise"}))
    with serving(raising) as url:
        r = httpx.post(f"{url}/v1/chat/completions", json={"model": "cascade",
                                                           "messages": MESSAGES})
        s = httpx.post(f"{url}/v1/chat/completions",
                       json={"model": "cascade", "messages": MESSAGES, "stream": True})
        with pytest.raises(openai.APIError) as ei:
            list(_client(url).chat.completions.create(model="cascade", messages=MESSAGES,
                                                      stream=True))
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["type"] == "unverified_answer"
    assert [a["status"] for a in err["cascade"]["attempts"]] == ["rejected", "rejected"]
    assert "I'm sorry, but I can't help with that." not in r.text  # no rejected text
    # the stream had started (the first rung escalated): the error comes in-band, after the
    # climb's progress, and the SDK raises it; no content chunk was ever sent
    assert s.status_code == 200
    events = [e for e in s.text.split("\n\n") if e]
    assert events[0].startswith(": cascade ") and '"status":"rejected"' in events[0]
    data = [json.loads(e[6:]) for e in events if e.startswith("data: {")]
    assert len(data) == 1 and data[0]["error"]["type"] == "unverified_answer"
    assert events[-1] == "data: [DONE]"
    assert ei.value.body["type"] == "unverified_answer"  # type: ignore[index]


@pytest.mark.parametrize(("field", "value"), [
    ("tools", [{"type": "function", "function": {"name": "f"}}]),
    ("logprobs", True),
    ("seed", 1),
])
def test_unsupported_fields_are_a_400_naming_the_field(
        tmp_path: Path, openai_server: LoopbackServer, field: str, value: Any) -> None:
    app = create_app(ladder(tmp_path, openai_server.base_url))
    with serving(app) as url:
        r = httpx.post(f"{url}/v1/chat/completions",
                       json={"model": "cascade", "messages": MESSAGES, field: value})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == field and field in err["message"]
    assert err["type"] == "invalid_request_error"
    assert openai_server.requests == []  # nothing was spent


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"model": "nope", "messages": MESSAGES}, 404, "model"),
    ({"model": "cascade", "messages": MESSAGES, "n": 2}, 400, "n"),
    ({"model": "cascade", "messages": [{"role": "tool", "content": "x"}]}, 400, "messages"),
    ({"model": "cascade"}, 400, "messages"),
    ({"model": "cascade", "messages": MESSAGES, "temperature": 9}, 400, "temperature"),
    ({"model": "cascade", "messages": MESSAGES, "stream_options": {"include_usage": True}},
     400, "stream_options"),
])
def test_bad_requests_get_openai_style_errors(
        tmp_path: Path, openai_server: LoopbackServer, body: Any, status: int,
        param: str) -> None:
    app = create_app(ladder(tmp_path, openai_server.base_url))
    with serving(app) as url:
        r = httpx.post(f"{url}/v1/chat/completions", json=body)
        not_json = httpx.post(f"{url}/v1/chat/completions", content=b"{not json")
        no_route = httpx.get(f"{url}/v1/nothing")
    assert r.status_code == status
    assert r.json()["error"]["param"] == param
    assert not_json.status_code == 400 and "error" in not_json.json()
    assert no_route.status_code == 404 and no_route.json()["error"]["type"] == "not_found"


def test_no_answer_is_502_and_deadline_504_with_no_sdk_retry(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    openai_server.script(lambda req: openai_error(500, "down", type="server_error"))
    app = create_app(ladder(tmp_path, openai_server.base_url))
    with serving(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")  # SDK default retries
        with client, pytest.raises(openai.APIStatusError) as ei:
            client.chat.completions.create(model="cascade", messages=MESSAGES)
    assert ei.value.status_code == 502
    assert ei.value.body["type"] == "no_answer"  # type: ignore[index]
    assert len(openai_server.requests) == 2  # one climb: x-should-retry stopped the SDK

    openai_server.reset()
    openai_server.script(echo_handler(refuse=(), delay_s=2.0))
    slow = create_app(ladder(tmp_path, openai_server.base_url, timeout_s=0.3))
    with serving(slow) as url:
        r = httpx.post(f"{url}/v1/chat/completions",
                       json={"model": "cascade", "messages": MESSAGES}, timeout=10)
    assert r.status_code == 504 and r.json()["error"]["type"] == "deadline_exceeded"


def test_budget_refusal_is_429_budget_exceeded(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    openai_server.script(echo_handler(refuse=()))
    cfg = ladder(tmp_path, openai_server.base_url, models=("small",),
                 budget={"limit_usd": 1e-12})
    with serving(create_app(cfg)) as url:
        r = httpx.post(f"{url}/v1/chat/completions",
                       json={"model": "cascade", "messages": MESSAGES})
        metrics = httpx.get(f"{url}/metrics").text
    assert r.status_code == 429
    assert r.json()["error"]["type"] == "budget_exceeded"
    assert r.headers["x-should-retry"] == "false"
    assert openai_server.requests == []
    assert 'cascade_budget_refusals_total{ladder="cascade"} 1.0' in metrics


def test_request_options_pass_through_to_every_rung(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    openai_server.script(echo_handler(refuse=("small",)))
    app = create_app(ladder(tmp_path, openai_server.base_url))
    with serving(app) as url:
        r = _client(url).chat.completions.create(
            model="cascade", messages=MESSAGES, max_tokens=17, temperature=0.4,
            stop=["\n\n"], user="u-42", metadata={"team": "search"})
    assert r.model == "big"
    sent = [q.json for q in openai_server.requests]
    assert [q["model"] for q in sent] == ["small", "big"]
    for q in sent:
        assert (q["max_tokens"], q["temperature"], q["stop"]) == (17, 0.4, ["\n\n"])


def test_a_requests_stop_sequences_join_the_rungs_own(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    """A rung's ``stop`` is sent with every call (an end marker its model needs): a client's
    own stop sequences are added to it, not put in its place."""
    from dataclasses import replace

    openai_server.script(echo_handler(refuse=()))
    cfg = ladder(tmp_path, openai_server.base_url, models=("small",))
    cfg = replace(cfg, rungs=(replace(cfg.rungs[0], stop=("<|end|>",)),))
    with serving(create_app(cfg)) as url:
        _client(url).chat.completions.create(model="cascade", messages=MESSAGES,
                                             stop=["\n\n", "<|end|>"])
        _client(url).chat.completions.create(model="cascade", messages=MESSAGES)
    assert [q.json["stop"] for q in openai_server.requests] == [["<|end|>", "\n\n"],
                                                                 ["<|end|>"]]


def test_json_schema_response_format_adds_the_schema_verifier(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    openai_server.script(echo_handler(replies={"small": "Paris, of course",
                                               "big": '{"city": "Paris"}'}))
    schema = {"type": "object", "properties": {"city": {"type": "string"}},
              "required": ["city"]}
    app = create_app(ladder(tmp_path, openai_server.base_url, verifiers=[]))
    with serving(app) as url:
        r = _client(url).chat.completions.create(
            model="cascade", messages=MESSAGES,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "city", "schema": schema}})
    assert json.loads(r.choices[0].message.content or "") == {"city": "Paris"}
    trace = (r.model_extra or {})["cascade"]
    assert trace["attempts"][0]["verdicts"][0]["verifier"] == "schema"
    assert trace["attempts"][0]["status"] == "rejected"


def test_healthz_and_metrics(tmp_path: Path, openai_server: LoopbackServer) -> None:
    openai_server.script(echo_handler(refuse=("small",)))
    app = create_app(ladder(tmp_path, openai_server.base_url))
    with serving(app) as url:
        health = httpx.get(f"{url}/healthz")
        assert health.status_code == 200 and health.json()["store"] == {"shared": False}
        _client(url).chat.completions.create(model="cascade", messages=MESSAGES)
        text = httpx.get(f"{url}/metrics").text
    assert ('cascade_requests_total{cache_hit="false",ladder="cascade",outcome="verified",'
            'rung="big",verified="true"} 1.0') in text
    assert 'cascade_escalations_total{ladder="cascade",rung="small"} 1.0' in text
    assert 'cascade_rung_calls_total{ladder="cascade",rung="big"} 1.0' in text
    assert 'cascade_rung_latency_seconds_count{ladder="cascade",rung="small"} 1.0' in text
    assert 'cascade_cost_usd_total{ladder="cascade",rung="big"}' in text
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
             if line and not line.startswith("#")}
    assert names and all(n.startswith("cascade_") for n in names)
    assert "France" not in text  # never a prompt
    assert not any(n.startswith("cascade_store_") for n in names)  # no shared store, no samples
