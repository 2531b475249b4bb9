"""What an adversarial review found at the provider boundary (#11), each against real SDKs on
loopback servers: keys read and scrubbed safely, replies bounded in size, depth and usage,
redirects and Retry-After handled, and config values that validated but misbehaved refused."""

from __future__ import annotations

import json
import socketserver
import threading
import urllib.parse
import zlib
from collections.abc import Iterator
from typing import Any

import pytest

from cascade import Cascade
from cascade.config import RungConfig, parse_config
from cascade.errors import (
    ClientRequestError,
    ConfigError,
    MalformedReply,
    NoAnswerError,
    ProviderError,
    RateLimited,
    ReplyTooLarge,
    ServerError,
)
from cascade.messages import Message
from cascade.providers import make_provider
from cascade.providers._common import scrub
from cascade.providers.base import ModelCall
from cascade.retry import call_with_retry, retry_delay
from cascade.secrets import secret_forms
from tests.loopback import (
    LoopbackServer,
    RecordedRequest,
    Reply,
    anthropic_message,
    openai_chat,
    openai_error,
    openai_reply,
)

pytestmark = pytest.mark.anyio

KEY_ENV = "CASCADE_TEST_HARDENING_KEY"
KEY = "sk-test-SECRET-0123456789abcdef"
CALL = ModelCall(model="gpt-test", messages=(Message("user", "2+2?"),), max_tokens=16,
                 timeout_s=10.0)


def rung(server: LoopbackServer | str, **kw: Any) -> RungConfig:
    base = server if isinstance(server, str) else server.base_url
    fields: dict[str, Any] = {"model": "gpt-test", "provider": "openai", "base_url": base,
                              "api_key_env": KEY_ENV, **kw}
    return RungConfig(**fields)


async def complete(r: RungConfig, call: ModelCall = CALL) -> Any:
    p = make_provider(r)
    try:
        return await p.complete(call)
    finally:
        await p.aclose()


# ---------------------------------------------------------------- keys


async def test_key_with_surrounding_whitespace_is_stripped(
        openai_server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """``export KEY=$(cat file)`` leaves a newline: the key is the text around it."""
    monkeypatch.setenv(KEY_ENV, f"  {KEY}\n")
    openai_server.queue(openai_reply("4"))
    assert (await complete(rung(openai_server))).text == "4"
    assert openai_server.requests[0].headers["authorization"] == f"Bearer {KEY}"


@pytest.mark.parametrize("bad", [f"{KEY[:8]}\n{KEY[8:]}", f"{KEY}\x1bx", f"{KEY}\x7f1",
                                 f"{KEY[:8]}\tx", f"{KEY}é"])
async def test_key_with_control_or_non_ascii_character_is_a_config_error(
        openai_server: LoopbackServer, monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv(KEY_ENV, bad)
    with pytest.raises(ConfigError) as info:
        await complete(rung(openai_server))
    message = str(info.value)
    assert KEY_ENV in message and info.value.key == "api_key_env"
    assert KEY[:12] not in message and KEY[-8:] not in message
    assert all(form not in message for form in secret_forms(bad))
    assert openai_server.requests == []  # nothing was sent


def test_scrub_removes_every_escaped_form() -> None:
    secret = 'sk-"odd\\key/+&= é\n'
    forms = {
        "raw": secret,
        "repr": repr(secret),
        "escaped": secret.encode("unicode_escape").decode(),
        "json": json.dumps(secret),
        "json-utf8": json.dumps(secret, ensure_ascii=False),
        "url": urllib.parse.quote(secret, safe=""),
        "url-plus": urllib.parse.quote_plus(secret, safe=""),
    }
    for name, form in forms.items():
        out = scrub(f"server said: {form} (denied)", secret)
        assert "odd" not in out, (name, out)


async def test_key_echoed_url_encoded_or_json_escaped_is_scrubbed(
        openai_server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> None:
    key = "sk-test/with+odd=chars&0123456789"
    monkeypatch.setenv(KEY_ENV, key)
    echo = (f"bad key {json.dumps(key)[1:-1]} at /v1?key="
            f"{urllib.parse.quote(key, safe='')}")
    openai_server.queue(openai_error(401, echo))
    with pytest.raises(ProviderError) as info:
        await complete(rung(openai_server))
    assert "with" not in str(info.value) and "odd" not in str(info.value)


# ---------------------------------------------------------------- reply size, depth, usage


def _gzip_bomb(decoded_mb: int) -> bytes:
    """A gzip body that inflates to ``decoded_mb`` MiB of spaces (compressed ~1000:1)."""
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = b" " * (1 << 20)
    return b"".join([*(z.compress(block) for _ in range(decoded_mb)), z.flush()])


async def test_gzip_bomb_stops_at_the_cap(openai_server: LoopbackServer,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    bomb = _gzip_bomb(256)
    assert len(bomb) < 1 << 20
    openai_server.queue(Reply(body=bomb, headers={"Content-Encoding": "gzip"}))
    with pytest.raises(ReplyTooLarge, match="max_reply_bytes = 1048576") as info:
        await complete(rung(openai_server, max_reply_bytes=1 << 20))
    assert not info.value.retryable and info.value.model == "gpt-test"


async def test_a_reply_under_the_cap_is_read_whole(openai_server: LoopbackServer,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    body = json.dumps(openai_chat("x" * 200_000)).encode()
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    openai_server.queue(Reply(body=z.compress(body) + z.flush(),
                              headers={"Content-Encoding": "gzip"}))
    assert len((await complete(rung(openai_server, max_reply_bytes=1 << 20))).text) == 200_000


class _Endless(socketserver.BaseRequestHandler):
    """Answers every request with a chunked body that never ends; counts what it sent."""

    sent = 0

    def handle(self) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += self.request.recv(65536)
        self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"10000\r\n" + b" " * 0x10000 + b"\r\n"
        try:
            while True:
                self.request.sendall(chunk)
                type(self).sent += 0x10000
        except OSError:
            return


@pytest.fixture
def endless() -> Iterator[str]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Endless)
    server.daemon_threads = True
    _Endless.sent = 0
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


async def test_endless_chunked_body_stops_at_the_cap(endless: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    cap = 1 << 20
    with pytest.raises(ReplyTooLarge):
        await complete(rung(endless, max_reply_bytes=cap, timeout_s=60))
    # stopped reading at the cap, not at the timeout: the server got only socket buffers more
    assert _Endless.sent < 16 * cap


async def test_deeply_nested_json_is_a_malformed_reply_and_fails_over(
        tmp_path: Any, openai_server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)

    def handle(req: RecordedRequest) -> Reply:
        if req.json["model"] == "small":
            return Reply(body=b"[" * 100_000 + b"]" * 100_000)
        return openai_reply("Canberra", model="big")

    openai_server.script(handle)
    cfg = {"rungs": [{"model": m, "provider": "openai-compatible", "price": "unknown",
                      "base_url": openai_server.base_url} for m in ("small", "big")],
           "retry": {"max_attempts": 1}, "cache": {"enabled": False}}
    async with Cascade.from_dict(cfg) as c:
        answer = await c.aanswer("Capital of Australia?")
    assert answer.text == "Canberra" and answer.model == "big"
    assert answer.attempts[0].error_type == "MalformedReply"
    with pytest.raises(MalformedReply, match="nests too deeply"):
        openai_server.script(lambda req: Reply(body=b"{\"a\":" * 100_000 + b"1" + b"}" * 100_000))
        await complete(rung(openai_server))


@pytest.mark.parametrize("usage", [{"prompt_tokens": 2**64, "completion_tokens": 1},
                                   {"prompt_tokens": 1, "completion_tokens": 10**12}])
async def test_absurd_usage_is_a_malformed_reply(openai_server: LoopbackServer,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 usage: dict[str, int]) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    openai_server.queue(Reply(json={**openai_chat("4"), "usage": usage}))
    with pytest.raises(MalformedReply, match="usage"):
        await complete(rung(openai_server))


async def test_absurd_anthropic_usage_is_a_malformed_reply(
        anthropic_server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    body = anthropic_message("4")
    body["usage"] = {"input_tokens": 2**64, "output_tokens": 1}
    anthropic_server.queue(Reply(json=body))
    with pytest.raises(MalformedReply, match="usage"):
        await complete(rung(anthropic_server, provider="anthropic", model="claude-test"),
                       ModelCall(model="claude-test", messages=CALL.messages, max_tokens=16))


# ---------------------------------------------------------------- retries


@pytest.mark.parametrize(("status", "headers", "wait"), [
    (503, {"Retry-After": "3"}, 3.0),
    (529, {"retry-after-ms": "2500"}, 2.5),
])
async def test_retry_after_is_honoured_on_503_and_529(
        openai_server: LoopbackServer, monkeypatch: pytest.MonkeyPatch, status: int,
        headers: dict[str, str], wait: float) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    openai_server.queue(openai_error(status, "busy", type="server_error", headers=headers),
                        openai_reply("4"))
    p = make_provider(rung(openai_server))
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)

    try:
        done, tries = await call_with_retry(lambda: p.complete(CALL), max_attempts=3,
                                            base_delay_s=0.01, max_delay_s=10.0, jitter=0.0,
                                            sleep=sleep)
    finally:
        await p.aclose()
    assert done.text == "4" and tries == 2
    assert slept == [pytest.approx(wait)]


def test_retry_after_beyond_max_delay_gives_up_on_server_errors_too() -> None:
    err = ServerError("busy", retry_after_s=60.0, status_code=503)
    assert retry_delay(err, 1, base_delay_s=0.1, max_delay_s=20.0, jitter=0.0) is None
    limited = RateLimited("slow", retry_after_s=5.0)
    assert retry_delay(limited, 1, base_delay_s=0.1, max_delay_s=20.0, jitter=0.0) == 5.0


async def test_a_redirect_loop_is_not_retried(openai_server: LoopbackServer,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    openai_server.script(lambda req: Reply(status=307, body=b"",
                                           headers={"Location": "/v1/chat/completions"}))
    cfg = {"rungs": [{"model": "gpt-test", "provider": "openai-compatible", "price": "unknown",
                      "base_url": openai_server.base_url}],
           "retry": {"max_attempts": 3, "base_delay_s": 0.0}, "cache": {"enabled": False}}
    async with Cascade.from_dict(cfg) as c:
        with pytest.raises(NoAnswerError) as info:
            await c.aanswer("2+2?")
    [attempt] = info.value.answer.attempts
    assert attempt.error_type == "ClientRequestError" and attempt.tries == 1
    assert "redirect" in (attempt.error or "") and "base_url" in (attempt.error or "")
    assert len(openai_server.requests) <= 21  # one chain of redirects, not three


# ---------------------------------------------------------------- request-field rejections


async def test_a_rejected_field_names_the_setting(openai_server: LoopbackServer,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    body = {"error": {"message": "top_logprobs is not supported", "type": "invalid_request_error",
                      "param": "top_logprobs", "code": None}}
    openai_server.queue(Reply(status=400, json=body))
    with pytest.raises(ClientRequestError, match="'top_logprobs'; change rung 'gpt-test''s "
                                                 "logprobs"):
        await complete(rung(openai_server, logprobs=True))


async def test_a_validation_error_in_a_500_is_a_client_error(
        openai_server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    message = ("1 validation error:\n  {'type': 'literal_error', 'loc': ('body', "
               "'response_format', 'type'), 'msg': \"Input should be 'text' or 'json_object'\"}")
    openai_server.queue(openai_error(500, message, type="internal_server_error"),
                        openai_error(500, "out of memory", type="server_error"))
    call = ModelCall(model="gpt-test", messages=CALL.messages, json_schema={"type": "object"})
    with pytest.raises(ClientRequestError) as info:
        await complete(rung(openai_server, provider="openai-compatible"), call)
    assert not info.value.retryable and info.value.status_code == 500
    assert "structured_output (now 'json_schema'" in str(info.value)
    with pytest.raises(ServerError):  # a plain 500 stays a retryable server error
        await complete(rung(openai_server, provider="openai-compatible"), call)


async def test_check_model_names_what_the_server_serves(
        openai_server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    with pytest.raises(ClientRequestError, match=r"does not serve model 'gpt-tset'.*'gpt-test'"):
        await complete(rung(openai_server, model="gpt-tset", check_model=True),
                       ModelCall(model="gpt-tset", messages=CALL.messages))
    openai_server.reset()
    assert (await complete(rung(openai_server, check_model=True))).text == "ok"
    assert [r.path for r in openai_server.requests] == ["/v1/models", "/v1/chat/completions"]


# ---------------------------------------------------------------- config values


def _rung_config(**kw: Any) -> dict[str, Any]:
    return {"rungs": [{"model": "gpt-4o-mini", **kw}]}


@pytest.mark.parametrize(("rung_kw", "key", "fragment"), [
    ({"thresholds": {"c": float("nan")}}, "rungs[0].thresholds.c", "finite"),
    ({"thresholds": {"c": float("-inf")}}, "rungs[0].thresholds.c", "finite"),
    ({"thresholds": {"c": 7}}, "rungs[0].thresholds.c", "[0, 1]"),
    ({"thresholds": {"c": -0.1}}, "rungs[0].thresholds.c", ">= 0"),
    ({"provider": "openai-compatible", "base_url": "not a url"}, "rungs[0].base_url",
     "not an http(s) URL"),
    ({"base_url": "ftp://example.test/v1"}, "rungs[0].base_url", "not an http(s) URL"),
    ({"max_retries": 10**9}, "rungs[0].max_retries", "at most 19"),
    ({"structured_output": "xml"}, "rungs[0].structured_output", "allowed: json_schema"),
    ({"max_reply_bytes": 10}, "rungs[0].max_reply_bytes", ">= 1024"),
    ({"stop": ["ok", ""]}, "rungs[0].stop", "empty"),
])
def test_rung_values_that_would_misbehave_are_config_errors(
        rung_kw: dict[str, Any], key: str, fragment: str) -> None:
    cfg = _rung_config(**rung_kw)
    if "thresholds" in rung_kw:
        cfg["verifiers"] = [{"name": "confidence", "id": "c"}]
    with pytest.raises(ConfigError) as info:
        parse_config(cfg)
    assert info.value.key == key and fragment in str(info.value), str(info.value)


def test_retry_max_attempts_is_bounded() -> None:
    assert parse_config({**_rung_config(), "retry": {"max_attempts": 20}}).retry.max_attempts == 20
    with pytest.raises(ConfigError, match="at most 20") as info:
        parse_config({**_rung_config(), "retry": {"max_attempts": 10**9}})
    assert info.value.key == "retry.max_attempts"


def test_a_model_without_a_price_is_a_config_error() -> None:
    """A silent $0 let every cap and budget pass: the price must be known or said unknown."""
    with pytest.raises(ConfigError, match='price = "unknown"') as info:
        parse_config({"rungs": [{"model": "my-finetune"}]})
    assert info.value.key == "rungs[0].price" and "my-finetune" in str(info.value)
    cfg = parse_config({"rungs": [{"model": "my-finetune", "price": "unknown"}]})
    assert not cfg.rungs[0].price_known and cfg.rungs[0].cost_usd(10**6, 10**6) == 0.0
    priced = parse_config({"rungs": [{"model": "my-finetune", "input_usd_per_mtok": 0.2,
                                      "output_usd_per_mtok": 0.4}]})
    assert priced.rungs[0].price_known
    assert parse_config({"rungs": [{"model": "gpt-4o"}]}).rungs[0].input_usd_per_mtok == 2.5
    assert parse_config({"rungs": [{"model": "smollm2-135m", "provider": "local"}]}).rungs[0]


@pytest.mark.parametrize(("extra", "key"), [
    ({"max_cost_usd": 0.01}, "max_cost_usd"),
    ({"budget": {"limit_usd": 5.0}}, "budget.limit_usd"),
])
def test_an_unknown_price_refuses_caps_and_budgets(extra: dict[str, Any], key: str) -> None:
    rungs = [{"model": "gpt-4o-mini"},
             {"model": "gpt-4o", "fallbacks": [{"model": "my-mirror", "price": "unknown"}]}]
    with pytest.raises(ConfigError, match="cannot hold") as info:
        parse_config({"rungs": rungs, **extra})
    assert info.value.key == key and "gpt-4o" in str(info.value)


@pytest.mark.parametrize(("value", "fragment"),
                         [("free", "only value"), ("unknown", "contradicts")])
def test_price_key_is_unknown_or_absent(value: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        parse_config({"rungs": [{"model": "x", "price": value, "input_usd_per_mtok": 1.0}]})



def test_a_per_call_cap_asks_the_same_rule() -> None:
    """What a caller taking ``max_cost_usd`` per request checks (the engine's per-call cap)."""
    from cascade.config import check_cap

    unknown = parse_config({"rungs": [{"model": "my-finetune", "price": "unknown"}]})
    with pytest.raises(ConfigError, match="my-finetune") as info:
        check_cap(unknown.rungs, "max_cost_usd")
    assert info.value.key == "max_cost_usd"
    check_cap(parse_config(_rung_config()).rungs, "max_cost_usd")  # priced: nothing to refuse
