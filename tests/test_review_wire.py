"""Review of ``cascade serve``'s wire compatibility: each test pins something a user of the
official ``openai`` / ``anthropic`` SDKs hit (a field the SDK's types say is there but was not
sent, a request shape the SDKs produce that was refused), against the real SDKs over loopback."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from cascade.serve import create_app
from tests.loopback import LoopbackServer
from tests.serve_kit import echo_handler, ladder, opened, serving

QUESTION: Any = [{"role": "user", "content": "What is the capital of France?"}]


def _openai(url: str) -> openai.OpenAI:
    return opened(openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0))


def _anthropic(url: str) -> anthropic.Anthropic:
    return opened(anthropic.Anthropic(base_url=url, api_key="none", max_retries=0))


# ---------------------------------------------------------------- /v1/models


def test_anthropic_sdk_models_have_the_fields_its_types_require(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    """Anthropic's ``ModelInfo`` requires ``type``, ``display_name``, ``created_at`` and
    ``lifecycle``: they were missing (None where the SDK types promise a str / datetime)."""
    with serving(create_app(ladder(tmp_path, openai_server.base_url))) as url:
        client = _anthropic(url)
        listed = list(client.models.list())
        one = client.models.retrieve("cascade")
        page = client.models.list()
        oa = _openai(url).models.retrieve("cascade")
    assert [m.id for m in listed] == ["cascade"]
    for m in (listed[0], one):
        assert m.type == "model" and m.display_name == "cascade"
        assert isinstance(m.created_at, dt.datetime) and m.lifecycle == "active"
    assert page.has_more is False and page.first_id == page.last_id == "cascade"
    assert (oa.id, oa.object, oa.owned_by) == ("cascade", "model", "cascade")  # still OpenAI's


# ---------------------------------------------------------------- request shapes the SDKs send


def test_anthropic_text_blocks_dumped_by_the_sdk_are_accepted(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    """``TextBlock.model_dump()`` (a reply's content sent back as the next turn's history, or a
    stored conversation) carries ``citations: None``: a null says nothing and was a 400."""
    openai_server.script(echo_handler(refuse=()))
    with serving(create_app(ladder(tmp_path, openai_server.base_url))) as url:
        client = _anthropic(url)
        first = client.messages.create(model="cascade", max_tokens=32, messages=QUESTION)
        history = [b.model_dump() for b in first.content]
        assert history[0]["citations"] is None
        turns: Any = [*QUESTION, {"role": "assistant", "content": history},
                      {"role": "user", "content": "And of Spain?"}]
        m = client.messages.create(
            model="cascade", max_tokens=32, messages=turns,
            system=[{"type": "text", "text": "Be brief.", "citations": None}])
        cited: Any = [{"role": "user", "content": [{"type": "text", "text": "hi", "citations": [
            {"type": "char_location", "cited_text": "x", "document_index": 0,
             "start_char_index": 0, "end_char_index": 1}]}]}]
        with pytest.raises(anthropic.BadRequestError) as ei:  # real citations: still refused
            client.messages.create(model="cascade", max_tokens=32, messages=cited)
    assert m.content[0].text == "small says: And of Spain?"  # type: ignore[union-attr]
    assert "messages[0].content[0].citations" in ei.value.message
    sent = openai_server.requests[-1].json["messages"]
    assert sent[0] == {"role": "system", "content": "Be brief."}


def test_anthropic_top_level_cache_control_is_accepted_like_a_blocks(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    """The SDK's ``cache_control`` parameter (automatic prompt caching) is the same
    provider-side hint as a block's ``cache_control``, which is accepted and ignored; at the
    top level it was a 400."""
    openai_server.script(echo_handler(refuse=()))
    with serving(create_app(ladder(tmp_path, openai_server.base_url))) as url:
        client = _anthropic(url)
        m = client.messages.create(model="cascade", max_tokens=32, messages=QUESTION,
                                   cache_control={"type": "ephemeral"})
        with client.messages.stream(model="cascade", max_tokens=32, messages=QUESTION,
                                    cache_control={"type": "ephemeral", "ttl": "1h"}) as s:
            streamed = s.get_final_message()
    assert m.content[0].text == streamed.content[0].text  # type: ignore[union-attr]
    assert "cache_control" not in openai_server.requests[-1].json


def test_openai_developer_messages_are_system_instructions(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    """OpenAI's ``developer`` role replaces ``system`` for newer models (and the SDK's types
    offer it): it was a 400; it now reaches every rung as the system prompt."""
    openai_server.script(echo_handler(refuse=()))
    with serving(create_app(ladder(tmp_path, openai_server.base_url))) as url:
        r = _openai(url).chat.completions.create(model="cascade", messages=[
            {"role": "developer", "content": "Be brief."}, *QUESTION])
    assert r.choices[0].message.content == "small says: What is the capital of France?"
    assert openai_server.requests[-1].json["messages"][0] == {"role": "system",
                                                              "content": "Be brief."}


def test_openai_stream_options_include_obfuscation_is_accepted(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    """``stream_options.include_obfuscation`` is in the SDK's stream options: it was a 400
    (extra field); the service pads nothing either way, so it is accepted."""
    openai_server.script(echo_handler(refuse=()))
    with serving(create_app(ladder(tmp_path, openai_server.base_url))) as url:
        chunks = list(_openai(url).chat.completions.create(
            model="cascade", messages=QUESTION, stream=True,
            stream_options={"include_usage": True, "include_obfuscation": False}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "small says: What is the capital of France?")
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 10


# ---------------------------------------------------------------- request ids


def test_the_sdks_request_id_is_the_cascades(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    """The SDKs expose the service's request id (``r._request_id``, ``e.request_id``) from
    ``x-request-id`` (OpenAI) and ``request-id`` (Anthropic): they were None; now they are the
    cascade's request id, the one ``/v1/feedback`` and the audit log take."""
    openai_server.script(echo_handler(refuse=()))
    with serving(create_app(ladder(tmp_path, openai_server.base_url))) as url:
        oa, an = _openai(url), _anthropic(url)
        r = oa.chat.completions.create(model="cascade", messages=QUESTION)
        m = an.messages.create(model="cascade", max_tokens=32, messages=QUESTION)
        with an.messages.stream(model="cascade", max_tokens=32, messages=QUESTION) as s:
            sm = s.get_final_message()
            s_rid = s.request_id
    assert r._request_id == (r.model_extra or {})["cascade"]["request_id"]
    assert m._request_id == (m.model_extra or {})["cascade"]["request_id"]
    assert s_rid == (sm.model_extra or {})["cascade"]["request_id"]
    openai_server.script(echo_handler(refuse=("small", "big")))
    strict = ladder(tmp_path, openai_server.base_url, policy={"on_unverified": "raise"},
                    models=("small",))
    with serving(create_app(strict)) as url:
        with pytest.raises(openai.UnprocessableEntityError) as oe:
            _openai(url).chat.completions.create(model="cascade", messages=QUESTION)
        with pytest.raises(anthropic.UnprocessableEntityError) as ae:
            _anthropic(url).messages.create(model="cascade", max_tokens=8, messages=QUESTION)
    assert oe.value.request_id == oe.value.body["cascade"]["request_id"]  # type: ignore[index]
    assert ae.value.request_id == ae.value.body["error"]["cascade"]["request_id"]  # type: ignore[index]


def test_openai_nulls_the_sdk_types_allow_for_n_and_stream_mean_the_defaults(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    """The SDK types ``n`` and ``stream`` as Optional and sends an explicit None as null (a
    wrapper passing its own defaults through): OpenAI takes null as the default (1, false);
    here it was a 400. A wrong type is still one."""
    openai_server.script(echo_handler(refuse=()))
    with serving(create_app(ladder(tmp_path, openai_server.base_url))) as url:
        client = _openai(url)
        r = client.chat.completions.create(model="cascade", messages=QUESTION, n=None,
                                           stream=None)
        with pytest.raises(openai.BadRequestError) as ei:
            client.chat.completions.create(model="cascade", messages=QUESTION,
                                           extra_body={"n": True})
        with pytest.raises(openai.BadRequestError) as two:
            client.chat.completions.create(model="cascade", messages=QUESTION, n=2)
    assert r.choices[0].message.content == "small says: What is the capital of France?"
    assert ei.value.body["param"] == "n"  # type: ignore[index]
    assert two.value.body["param"] == "n"  # type: ignore[index]


def test_stream_chunks_carry_the_fields_openais_chunk_schema_requires(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    """A chunk's choice requires ``finish_reason`` (null until the last) and OpenAI sends
    ``logprobs: null`` and ``system_fingerprint``: clients that validate the schema (not the
    Python SDK, which fills the defaults) found them missing."""
    import json

    import httpx2 as httpx

    openai_server.script(echo_handler(refuse=()))
    with serving(create_app(ladder(tmp_path, openai_server.base_url))) as url:
        for options in (None, {"include_usage": True}):
            body: dict[str, Any] = {"model": "cascade", "messages": QUESTION, "stream": True}
            if options:
                body["stream_options"] = options
            r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=20)
            chunks = [json.loads(e[6:]) for e in r.text.split("\n\n")
                      if e.startswith("data: {")]
            for c in chunks:
                assert set(c) >= {"id", "object", "created", "model", "choices",
                                  "system_fingerprint"}
                assert ("usage" in c) == bool(options)
                for choice in c["choices"]:
                    assert set(choice) == {"index", "delta", "finish_reason", "logprobs"}
            assert [ch["finish_reason"] for c in chunks for ch in c["choices"]] == [None, "stop"]
            assert chunks[-1]["choices"] == [] if options else chunks[-1]["choices"]
