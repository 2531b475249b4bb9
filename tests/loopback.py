"""Loopback HTTP/1.1 servers that speak the OpenAI and Anthropic wire protocols, for tests.

The real SDKs talk to these over real sockets on 127.0.0.1, so the tests exercise the SDKs'
own request building, response parsing and error handling. Each server runs an asyncio loop in
a background thread (it must survive a thousand concurrent keep-alive clients) and is scripted
per test: a handler turns each :class:`RecordedRequest` into a :class:`Reply`, or replies are
queued in order. Every request received is recorded for assertions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "Fault",
    "LoopbackServer",
    "RecordedRequest",
    "Reply",
    "anthropic_error",
    "anthropic_message",
    "anthropic_reply",
    "free_port",
    "openai_chat",
    "openai_error",
    "openai_reply",
    "openai_tool_chat",
    "reap",
]

Kind = Literal["openai", "anthropic"]
Fault = Literal["reset", "close", "garbage"]
"""``reset``: send headers and half the body, then RST; ``close``: close without a reply;
``garbage``: send bytes that are not HTTP, then close."""

_REASONS = {
    200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    408: "Request Timeout", 422: "Unprocessable Entity", 429: "Too Many Requests",
    500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
    529: "Overloaded",
}


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server received it. Header names are lower-cased."""

    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes
    json: Any
    """The parsed JSON body, or None when the body was empty or not JSON."""


@dataclass(frozen=True, kw_only=True)
class Reply:
    """What the server sends back. ``json`` wins over ``body`` when both are given."""

    status: int = 200
    json: Any = None
    body: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    content_type: str = "application/json"
    delay_s: float = 0.0
    """Wait this long before replying (to trip client timeouts)."""
    fault: Fault | None = None


Handler = Callable[[RecordedRequest], Reply]


def reap(proc: subprocess.Popen[Any], timeout_s: float) -> None:
    """Wait up to ``timeout_s`` for a child that was asked to stop (a signal, its stdin
    closed), then kill it; it is gone either way when this returns."""
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the time of asking)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# ---------------------------------------------------------------- reply builders


def openai_chat(
    text: str | None = "ok",
    *,
    model: str = "gpt-test",
    prompt_tokens: int = 7,
    completion_tokens: int = 3,
    finish_reason: str | None = "stop",
    logprobs: Sequence[tuple[str, float, Mapping[str, float]]] | None = None,
    tool_calls: Sequence[Mapping[str, Any]] | None = None,
    id: str = "chatcmpl-test",
) -> dict[str, Any]:
    """A chat.completion body; ``logprobs`` is ``(token, logprob, {alt: logprob})`` per token."""
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if tool_calls is not None:
        message["tool_calls"] = list(tool_calls)
    choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": finish_reason,
                              "logprobs": None}
    if logprobs is not None:
        choice["logprobs"] = {
            "content": [
                {
                    "token": tok,
                    "logprob": lp,
                    "bytes": list(tok.encode()),
                    "top_logprobs": [
                        {"token": t, "logprob": v, "bytes": list(t.encode())}
                        for t, v in top.items()
                    ],
                }
                for tok, lp, top in logprobs
            ],
            "refusal": None,
        }
    return {
        "id": id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def openai_tool_chat(
    name: str, arguments: str, *, finish_reason: str = "tool_calls", **kw: Any
) -> dict[str, Any]:
    """A chat.completion whose answer is one tool call (how instructor's TOOLS mode replies)."""
    call = {"id": "call_1", "type": "function", "function": {"name": name, "arguments": arguments}}
    return openai_chat(None, tool_calls=[call], finish_reason=finish_reason, **kw)


def openai_reply(text: str | None = "ok", *, headers: Mapping[str, str] | None = None,
                 delay_s: float = 0.0, **kw: Any) -> Reply:
    return Reply(json=openai_chat(text, **kw), headers=headers or {}, delay_s=delay_s)


def openai_error(status: int, message: str = "error", *, type: str = "invalid_request_error",
                 headers: Mapping[str, str] | None = None) -> Reply:
    return Reply(status=status, headers=headers or {},
                 json={"error": {"message": message, "type": type, "param": None, "code": None}})


def anthropic_message(
    text: str | Iterable[str] = "ok",
    *,
    model: str = "claude-test",
    input_tokens: int = 11,
    output_tokens: int = 5,
    stop_reason: str | None = "end_turn",
    id: str = "msg_test",
    content: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """A messages-API body; several strings become several text blocks."""
    texts = [text] if isinstance(text, str) else list(text)
    blocks = list(content) if content is not None else [{"type": "text", "text": t}
                                                         for t in texts]
    return {
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": blocks,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
    }


def anthropic_reply(text: str | Iterable[str] = "ok", *,
                    headers: Mapping[str, str] | None = None, delay_s: float = 0.0,
                    **kw: Any) -> Reply:
    return Reply(json=anthropic_message(text, **kw), headers=headers or {}, delay_s=delay_s)


def anthropic_error(status: int, message: str = "error", *, type: str = "invalid_request_error",
                    headers: Mapping[str, str] | None = None) -> Reply:
    return Reply(status=status, headers=headers or {},
                 json={"type": "error", "error": {"type": type, "message": message}})


def _default_handler(kind: Kind) -> Handler:
    def handle(req: RecordedRequest) -> Reply:
        if req.method == "GET" and req.path.rstrip("/") == "/v1/models":
            return Reply(json={"object": "list", "data": [
                {"id": "gpt-test", "object": "model", "created": 0, "owned_by": "loopback"}
            ]})
        model = req.json.get("model", "") if isinstance(req.json, dict) else ""
        if kind == "openai" and req.path == "/v1/chat/completions":
            return openai_reply("ok", model=model)
        if kind == "anthropic" and req.path == "/v1/messages":
            return anthropic_reply("ok", model=model)
        return Reply(status=404, json={"error": {"message": f"no route {req.path}"}})

    return handle


# ---------------------------------------------------------------- the server


class LoopbackServer:
    """An HTTP/1.1 server on 127.0.0.1 in its own thread and event loop.

    Use as a context manager, or call :meth:`start` / :meth:`stop`. :meth:`down` closes the
    port (clients get "connection refused") and :meth:`up` opens it again on the same port.
    """

    def __init__(self, kind: Kind = "openai") -> None:
        self.kind: Kind = kind
        self.requests: list[RecordedRequest] = []
        self._handler: Handler = _default_handler(kind)
        self._queue: deque[Reply] = deque()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self.port = 0

    # -- scripting

    @property
    def base_url(self) -> str:
        """What to give the SDK: the OpenAI SDK wants ``/v1`` in it, the Anthropic SDK not."""
        root = f"http://127.0.0.1:{self.port}"
        return f"{root}/v1" if self.kind == "openai" else root

    def script(self, handler: Handler) -> None:
        """Answer every later request with ``handler(request)`` (queued replies go first)."""
        self._handler = handler

    def queue(self, *replies: Reply) -> None:
        """Answer the next requests with these replies, in order."""
        with self._lock:
            self._queue.extend(replies)

    def reset(self) -> None:
        with self._lock:
            self._queue.clear()
            self.requests.clear()
        self._handler = _default_handler(self.kind)

    def _reply_for(self, req: RecordedRequest) -> Reply:
        with self._lock:
            self.requests.append(req)
            if self._queue:
                return self._queue.popleft()
        return self._handler(req)

    # -- life cycle

    def start(self) -> LoopbackServer:
        loop = asyncio.new_event_loop()
        self._loop = loop
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(started.set)
            loop.run_forever()

        self._thread = threading.Thread(target=run, name=f"loopback-{self.kind}", daemon=True)
        self._thread.start()
        started.wait()
        self.up()
        return self

    def _call(self, coro: Any, timeout: float = 10.0) -> Any:
        assert self._loop is not None, "server not started"
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def up(self) -> None:
        """Listen (again) on the server's port."""

        async def listen() -> None:
            self._server = await asyncio.start_server(
                self._serve, "127.0.0.1", self.port or 0, backlog=4096, reuse_address=True
            )
            self.port = self._server.sockets[0].getsockname()[1]

        if self._server is None:
            self._call(listen())

    def down(self) -> None:
        """Stop listening and drop every open connection: the port refuses connections."""

        async def close() -> None:
            if self._server is not None:
                self._server.close()
                self._server = None
            for task in list(self._conns):
                task.cancel()
            if self._conns:
                await asyncio.wait(list(self._conns), timeout=5)

        self._call(close())

    def stop(self) -> None:
        if self._loop is None:
            return
        self.down()
        loop = self._loop
        loop.call_soon_threadsafe(loop.stop)
        assert self._thread is not None
        self._thread.join(10)
        loop.close()
        self._loop = None

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- HTTP

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            while True:
                req = await _read_request(reader)
                if req is None:
                    break
                reply = self._reply_for(req)
                if reply.delay_s:
                    await asyncio.sleep(reply.delay_s)
                keep = await _write_reply(writer, reply, req)
                if not keep:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self._conns.discard(task)
            writer.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await writer.wait_closed()


async def _read_request(reader: asyncio.StreamReader) -> RecordedRequest | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, target, _version = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        chunks: list[bytes] = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            chunks.append(chunk[:-2])
        body = b"".join(chunks)
    else:
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    try:
        parsed = json.loads(body) if body else None
    except ValueError:
        parsed = None
    path = target.split("?", 1)[0]
    return RecordedRequest(method=method, path=path, headers=headers, body=body, json=parsed)


async def _write_reply(writer: asyncio.StreamWriter, reply: Reply, req: RecordedRequest) -> bool:
    """Send ``reply``; False when the connection must not be reused."""
    if reply.fault == "close":
        return False
    if reply.fault == "garbage":
        writer.write(b"\x00\xffthis is not http\r\n\r\n\x17\x03")
        await writer.drain()
        return False
    body = json.dumps(reply.json).encode() if reply.json is not None else (reply.body or b"")
    if reply.fault == "reset" and len(body) < 64:
        body = b'{"padding": "' + b"x" * 200 + b'"}'
    head = [f"HTTP/1.1 {reply.status} {_REASONS.get(reply.status, 'Status')}",
            f"Content-Type: {reply.content_type}", f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in reply.headers.items()]
    close = req.headers.get("connection", "").lower() == "close"
    if close:
        head.append("Connection: close")
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
    if reply.fault == "reset":
        writer.write(body[: len(body) // 2])
        await writer.drain()
        sock = writer.get_extra_info("socket")
        if sock is not None:
            # SO_LINGER 0: closing sends RST, so the client sees a reset rather than a clean EOF.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        return False
    writer.write(body)
    await writer.drain()
    return not close
