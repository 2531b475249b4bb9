"""``POST /v1/messages``: the cascade behind Anthropic's wire format, with the official
``anthropic`` SDK as the client (sync, async, streaming) and plain httpx for the errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anthropic
import httpx2 as httpx
import pytest

from cascade.serve import create_app
from tests.loopback import LoopbackServer
from tests.serve_kit import echo_handler, ladder, opened, serving

QUESTION: Any = [{"role": "user", "content": "What is the capital of France?"}]
KEY = "sk-messages-client-0123456789"


def _client(url: str, key: str = "none") -> anthropic.Anthropic:
    return opened(anthropic.Anthropic(base_url=url, api_key=key, max_retries=0))


def test_sync_sdk_gets_the_verified_answer_with_usage_trace_and_headers(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    openai_server.script(echo_handler(refuse=("small",)))
    with serving(create_app(ladder(tmp_path, openai_server.base_url))) as url:
        raw = _client(url).messages.with_raw_response.create(
            model="cascade", max_tokens=64, system="Be brief.",
            messages=[{"role": "user", "content": [{"type": "text", "text": "Capital of"},
                                                   {"type": "text", "text": "France?"}]}],
            stop_sequences=["\n\n"], metadata={"user_id": "u-7"},
            extra_body={"temperature": 0.2})  # older clients send it; this SDK has no field
        m = raw.parse()
    assert m.type == "message" and m.role == "assistant" and m.model == "big"
    assert [b.type for b in m.content] == ["text"]
    assert m.content[0].text == "big says: Capital of\n\nFrance?"  # type: ignore[union-attr]
    assert m.stop_reason == "end_turn"
    assert (m.usage.input_tokens, m.usage.output_tokens) == (14, 6)  # both rungs' calls
    trace = (m.model_extra or {})["cascade"]
    assert trace["verified"] is True
    assert [a["status"] for a in trace["attempts"]] == ["rejected", "accepted"]
    assert raw.headers["x-cascade-request-id"] == trace["request_id"]
    assert m.id == f"msg_{trace['request_id']}" and raw.headers["x-cascade-model"] == "big"
    sent = openai_server.requests[-1].json  # what the rung was asked: the same request
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
    assert sent["max_tokens"] == 64 and sent["temperature"] == 0.2 and sent["stop"] == ["\n\n"]


def test_a_cut_off_answer_stops_for_max_tokens(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    from tests.loopback import openai_reply

    openai_server.script(lambda req: openai_reply("Paris is", model=req.json["model"],
                                                  finish_reason="length"))
    cfg = ladder(tmp_path, openai_server.base_url, models=("small",), verifiers=[])
    with serving(create_app(cfg)) as url:
        m = _client(url).messages.create(model="cascade", max_tokens=2, messages=QUESTION)
    assert m.stop_reason == "max_tokens"


def test_streaming_sends_anthropics_events_once_the_answer_is_verified(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    openai_server.script(echo_handler(refuse=("small",)))
    with serving(create_app(ladder(tmp_path, openai_server.base_url))) as url:
        with _client(url).messages.stream(model="cascade", max_tokens=64,
                                          messages=QUESTION) as stream:
            kinds = [e.type for e in stream]
            final = stream.get_final_message()
        with httpx.stream("POST", f"{url}/v1/messages", json={
                "model": "cascade", "max_tokens": 64, "messages": QUESTION,
                "stream": True}) as r:
            lines = [x for x in r.iter_lines() if x]
    assert kinds == ["message_start", "content_block_start", "content_block_delta", "text",
                     "content_block_stop", "message_delta", "message_stop"]  # "text": the SDK's
    assert final.content[0].text == "big says: What is the capital of France?"  # type: ignore[union-attr]
    assert final.model == "big" and final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 6
    # the climb's progress comes first, as comments every SSE client skips
    assert lines[0].startswith(": cascade ") and '"status":"rejected"' in lines[0]
    assert lines[-2:] == ["event: message_stop", 'data: {"type":"message_stop"}']


@pytest.mark.anyio
async def test_async_sdk_and_the_anthropic_key_header(
        tmp_path: Path, openai_server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MSG_CLIENT_KEY", KEY)
    openai_server.script(echo_handler(refuse=()))
    cfg = ladder(tmp_path, openai_server.base_url, server={"clients": [
        {"name": "app", "key_env": "MSG_CLIENT_KEY", "budget_key": "team"}]})
    with serving(create_app(cfg)) as url:
        async with anthropic.AsyncAnthropic(base_url=url, api_key=KEY, max_retries=0) as c, \
                anthropic.AsyncAnthropic(base_url=url, api_key="sk-wrong",
                                         max_retries=0) as wrong:
            m = await c.messages.create(model="cascade", max_tokens=32, messages=QUESTION)
            with pytest.raises(anthropic.AuthenticationError) as ei:
                await wrong.messages.create(model="cascade", max_tokens=32, messages=QUESTION)
    assert m.content[0].text == "small says: What is the capital of France?"  # type: ignore[union-attr]
    assert ei.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    assert KEY not in str(ei.value.body) and "sk-wrong" not in str(ei.value.body)


@pytest.mark.parametrize(("body", "status", "kind", "needle"), [
    ({"max_tokens": 8, "messages": QUESTION, "top_k": 5}, 400, "invalid_request_error",
     "'top_k'"),
    ({"max_tokens": 8, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "data": "x"}}]}]}, 400,
     "invalid_request_error", "messages[0].content[0]"),
    ({"max_tokens": 8, "messages": QUESTION, "metadata": {"tenant": "x"}}, 400,
     "invalid_request_error", "metadata.tenant"),
    ({"messages": QUESTION}, 400, "invalid_request_error", "max_tokens"),
    ({"max_tokens": 8, "messages": [{"role": "system", "content": "x"}]}, 400,
     "invalid_request_error", "messages[0].role"),
    ({"model": "other", "max_tokens": 8, "messages": QUESTION}, 404, "not_found_error",
     "'other'"),
])
def test_bad_requests_are_anthropic_errors_naming_what_to_fix(
        tmp_path: Path, openai_server: LoopbackServer, body: dict[str, Any], status: int,
        kind: str, needle: str) -> None:
    with serving(create_app(ladder(tmp_path, openai_server.base_url))) as url:
        r = httpx.post(f"{url}/v1/messages", json={"model": "cascade", **body})
    assert r.status_code == status
    err = r.json()
    assert err["type"] == "error" and err["error"]["type"] == kind
    assert needle in err["error"]["message"]
    assert openai_server.requests == []  # nothing was spent


def test_budget_refusal_and_no_answer_keep_the_cascades_error_types(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    openai_server.script(echo_handler(refuse=("small", "big")))
    poor = ladder(tmp_path, openai_server.base_url, models=("small",),
                  budget={"limit_usd": 1e-12})
    with serving(create_app(poor)) as url, pytest.raises(anthropic.RateLimitError) as ei:
        _client(url).messages.create(model="cascade", max_tokens=8, messages=QUESTION)
    assert ei.value.body["error"]["type"] == "budget_exceeded"  # type: ignore[index]
    assert ei.value.response.headers["x-should-retry"] == "false"
    strict = ladder(tmp_path, openai_server.base_url, policy={"on_unverified": "raise"})
    with serving(create_app(strict)) as url:
        r = httpx.post(f"{url}/v1/messages", json={"model": "cascade", "max_tokens": 8,
                                                   "messages": QUESTION})
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "unverified_answer"
    assert [a["status"] for a in r.json()["error"]["cascade"]["attempts"]] == [
        "rejected", "rejected"]


def test_an_error_after_the_stream_began_is_an_anthropic_error_event(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    openai_server.script(echo_handler(refuse=("small", "big")))
    strict = ladder(tmp_path, openai_server.base_url, policy={"on_unverified": "raise"})
    body = {"model": "cascade", "max_tokens": 8, "messages": QUESTION, "stream": True}
    with serving(create_app(strict)) as url:
        s = httpx.post(f"{url}/v1/messages", json=body)
        with pytest.raises(anthropic.APIStatusError) as ei, _client(url).messages.stream(
                model="cascade", max_tokens=8, messages=QUESTION) as stream:
            list(stream)
    # the first rung escalated, so the stream had started: the error comes in-band, as
    # Anthropic's error event, and no content was ever sent
    assert s.status_code == 200
    events = [e for e in s.text.split("\n\n") if e]
    assert events[0].startswith(": cascade ") and '"status":"rejected"' in events[0]
    assert events[-1].startswith("event: error\ndata: ")
    err = json.loads(events[-1].split("data: ", 1)[1])
    assert err["type"] == "error" and err["error"]["type"] == "unverified_answer"
    assert not any("content_block" in e for e in events)
    assert "unverified" in str(ei.value)


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_sequence_that_ended_the_answer_is_reported(
        tmp_path: Path, anthropic_server: LoopbackServer, monkeypatch: pytest.MonkeyPatch,
        stream: bool) -> None:
    """Anthropic rungs say which stop sequence ended the answer; the service passes it on as
    Anthropic's ``stop_reason: "stop_sequence"`` with the sequence, streamed or not."""
    from cascade.config import parse_config
    from tests.loopback import Reply, anthropic_message

    monkeypatch.setenv("CASCADE_TEST_MESSAGES_KEY", "sk-ant-test")
    anthropic_server.script(lambda req: Reply(json={
        **anthropic_message("Paris", model=req.json["model"], stop_reason="stop_sequence"),
        "stop_sequence": req.json["stop_sequences"][0]}))
    cfg = parse_config({"rungs": [{"model": "claude-test", "provider": "anthropic",
                                   "base_url": anthropic_server.base_url, "price": "unknown",
                                   "api_key_env": "CASCADE_TEST_MESSAGES_KEY"}],
                        "cache": {"enabled": False}})
    with serving(create_app(cfg)) as url:
        client = _client(url)
        args: Any = {"model": "cascade", "max_tokens": 64, "messages": QUESTION,
                     "stop_sequences": ["\n\n", "END"]}
        if stream:
            with client.messages.stream(**args) as s:
                m = s.get_final_message()
        else:
            m = client.messages.create(**args)
    assert (m.stop_reason, m.stop_sequence) == ("stop_sequence", "\n\n")
    assert anthropic_server.requests[0].json["stop_sequences"] == ["\n\n", "END"]


def test_a_vllm_stop_reason_names_the_sequence_and_chat_still_says_stop(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    """vLLM puts the stop string that matched in ``choices[0].stop_reason``: the messages
    endpoint reports it; the chat endpoint's ``finish_reason`` stays OpenAI's ``stop``. A
    ``stop_reason`` that is not one of the request's sequences (a token id) is not taken."""
    import openai

    from tests.loopback import Reply, openai_chat

    def handle(req: Any) -> Reply:
        body = openai_chat("Paris", model=req.json["model"])
        body["choices"][0]["stop_reason"] = "END" if "END" in req.json.get("stop", []) else 7
        return Reply(json=body)

    openai_server.script(handle)
    cfg = ladder(tmp_path, openai_server.base_url, models=("small",), verifiers=[])
    with serving(create_app(cfg)) as url:
        m = _client(url).messages.create(model="cascade", max_tokens=64, messages=QUESTION,
                                         stop_sequences=["END"])
        other = _client(url).messages.create(model="cascade", max_tokens=64, messages=QUESTION)
        with openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0) as oc:
            chat = oc.chat.completions.create(model="cascade", stop=["END"], messages=[
                {"role": "user", "content": "What is the capital of France?"}])
    assert (m.stop_reason, m.stop_sequence) == ("stop_sequence", "END")
    assert (other.stop_reason, other.stop_sequence) == ("end_turn", None)
    assert chat.choices[0].finish_reason == "stop"
    trace = (chat.model_extra or {})["cascade"]
    assert trace["attempts"][0]["stop_sequence"] == "END"


@pytest.mark.parametrize("system", ["", []])
def test_an_empty_system_is_no_system_prompt(tmp_path: Path, openai_server: LoopbackServer,
                                             system: Any) -> None:
    """``system: ""`` (or ``[]``) reached the rungs as an empty system message."""
    openai_server.script(echo_handler(refuse=()))
    cfg = ladder(tmp_path, openai_server.base_url, models=("small",), verifiers=[])
    with serving(create_app(cfg)) as url:
        _client(url).messages.create(model="cascade", max_tokens=16, system=system,
                                     messages=QUESTION)
    assert [m["role"] for m in openai_server.requests[-1].json["messages"]] == ["user"]


def test_a_user_id_that_is_not_a_string_is_a_400_naming_it(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    """``metadata.user_id: 42`` was turned into "42" rather than refused as the wrong type."""
    openai_server.script(echo_handler(refuse=()))
    with serving(create_app(ladder(tmp_path, openai_server.base_url))) as url:
        r = httpx.post(f"{url}/v1/messages", json={
            "model": "cascade", "max_tokens": 50, "metadata": {"user_id": 42},
            "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400, r.text
    assert r.json()["type"] == "error" and "metadata.user_id" in r.json()["error"]["message"]
    assert openai_server.requests == []
