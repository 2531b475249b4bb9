"""``POST /v1/chat/completions``: the cascade behind OpenAI's chat wire format.

Streaming (``stream: true``) never sends a token before the answer is final: the climb runs to
its end (every rung, every verifier) and the accepted answer is then sent as chunks whose first
one carries the ``cascade`` trace, ``verified`` included, so no client can mistake an unverified
answer for a verified one. While the climb goes on, each finished rung is announced as an SSE
comment (``: cascade {"rung": 0, "status": "rejected", ...}``), which OpenAI clients ignore.
The response starts (status and headers) at the first of: the answer (then the ``x-cascade-*``
headers and error statuses are the same as without streaming), or a rung that escalated (then
errors after it come in-band, as ``data: {"error": {...}}``, which the SDKs raise); the request
id headers are sent either way.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from opentelemetry import context as otel_context
from opentelemetry import propagate
from opentelemetry import trace as otel_trace
from pydantic import BaseModel
from pydantic_core import PydanticSerializationError

from cascade.serve.config import ClientConfig
from cascade.serve.errors import (
    APIError,
    counting_refusals,
    cut_by_shutdown,
    from_exception,
    parse_body,
    read_body,
)
from cascade.serve.protocol import (
    CascadeTrace,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChunkChoice,
    Delta,
    ResponseMessage,
    Usage,
)
from cascade.serve.service import ClimbEvent, Service
from cascade.trace import Answer, Attempt

__all__ = ["Render", "answer_headers", "answer_request", "caller_trace", "carried_keys",
           "check_request", "finish_reason", "progress_comment",
           "refuse_unsupported", "request_id_headers", "router", "stop_sequence",
           "stream_answer", "to_json", "trace_of", "usage_of", "wire_error"]

router = APIRouter()

_HEARTBEAT_S = 15.0
_TRACE_FIELDS_DROPPED = ("text",)
"""Left out of the wire trace: rejected answers belong in the audit log, not the response."""
_RESERVED_METADATA = ("budget_key", "client", "ladder", "request_id")
"""Metadata the service sets itself: a request choosing its own ``budget_key`` would escape
the ``[budget]`` cap it is under."""
_MESSAGE_KEYS = frozenset({"role", "content"})
_PART_KEYS = frozenset({"type", "text"})


def trace_of(answer: Answer, ladder: str) -> CascadeTrace:
    attempts = []
    for a in answer.attempts:
        d = a.to_dict()
        for k in _TRACE_FIELDS_DROPPED:
            d.pop(k, None)
        attempts.append(d)
    return CascadeTrace(request_id=answer.request_id, ladder=ladder, verified=answer.verified,
                        cache_hit=answer.cache_hit, cost_usd=answer.cost_usd,
                        latency_ms=answer.latency_ms, attempts=attempts,
                        warnings=list(answer.warnings),
                        route=None if answer.route is None else dict(answer.route))


def usage_of(answer: Answer) -> Usage:
    """Tokens of every call made for this request: rungs, verifiers, shadow; none on a hit."""
    p, c = answer.input_tokens, answer.output_tokens
    return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


def answer_headers(answer: Answer) -> dict[str, str]:
    return {
        **request_id_headers(answer.request_id),
        "x-cascade-verified": "true" if answer.verified else "false",
        "x-cascade-model": answer.model,
        "x-cascade-cost-usd": f"{answer.cost_usd:.10f}".rstrip("0").rstrip(".") or "0",
        "x-cascade-cache-hit": "true" if answer.cache_hit else "false",
    }


def request_id_headers(rid: str) -> dict[str, str]:
    """The request id under our name and the two the SDKs read (``x-request-id``: OpenAI's
    ``r._request_id`` / ``e.request_id``; ``request-id``: Anthropic's)."""
    return {"x-cascade-request-id": rid, "x-request-id": rid, "request-id": rid}


def _chosen(answer: Answer) -> Attempt | None:
    for a in reversed(answer.attempts):
        if a.status == "accepted":
            return a
    return next((a for a in reversed(answer.attempts)
                 if a.status == "rejected" and a.text is not None), None)


def finish_reason(answer: Answer) -> str:
    a = _chosen(answer)
    return (a.finish_reason if a is not None else None) or "stop"


def stop_sequence(answer: Answer) -> str | None:
    """The stop sequence that ended the answer given, when its provider said which."""
    a = _chosen(answer)
    return a.stop_sequence if a is not None else None


def wire_error(e: BaseException) -> APIError:
    """The wire error for a failed climb, with its trace and request id when it has them."""
    traced = getattr(e, "answer", None)
    ladder = (traced.metadata.get("ladder", "cascade") if isinstance(traced, Answer)
              else "cascade")
    api = from_exception(e, trace_of(traced, str(ladder)) if isinstance(traced, Answer)
                         else None)
    rid = getattr(traced, "request_id", None) or getattr(e, "request_id", None)
    if isinstance(traced, Answer):  # what the failed climb cost, as on an answer
        api.headers.update(answer_headers(traced))
    elif isinstance(rid, str) and rid:
        api.headers.update(request_id_headers(rid))
    return api


def refuse_unsupported(names: list[str], *, at: str = "",
                       why: str = "the cascade service does not implement it") -> None:
    """A 400 naming the first request field the service does not implement (never dropped);
    ``at`` is where the fields sit (``"metadata"``, ``"messages[0]"``; the top level: "")."""
    if names:
        name = f"{at}.{names[0]}" if at else names[0]
        raise APIError(400, f"unsupported field {name!r}: {why} (remove it from the request)",
                       param=name, code="unsupported_field")


def carried_keys(d: Mapping[str, object], allowed: frozenset[str]) -> list[str]:
    """Keys of ``d`` beyond ``allowed`` that carry something (``"refusal": null`` or
    ``"tool_calls": []``, as an SDK's own reply object dumps them, say nothing)."""
    return [k for k, v in d.items() if k not in allowed and v is not None and v != []]


def _check_messages(messages: list[dict[str, object]]) -> None:
    """A 400 naming a message key (``name``, ``tool_calls``...) or content-part key the
    cascade would otherwise drop: the model would answer another question than the one sent."""
    for i, m in enumerate(messages):
        refuse_unsupported(carried_keys(m, _MESSAGE_KEYS), at=f"messages[{i}]")
        content = m.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if isinstance(part, dict):
                    refuse_unsupported(carried_keys(part, _PART_KEYS),
                                       at=f"messages[{i}].content[{j}]")


def check_request(body: ChatCompletionRequest, service: Service) -> None:
    refuse_unsupported(body.unsupported())
    _check_messages(body.messages)
    refuse_unsupported([k for k in body.metadata or {} if k in _RESERVED_METADATA],
                       at="metadata", why="the service sets it (the client's key selects the "
                       "budget)")
    if body.n not in (1, None):
        raise APIError(400, f"n must be 1 (one verified answer per request), not {body.n}",
                       param="n")
    if body.model != service.name:
        raise APIError(404, f"the model {body.model!r} does not exist: this service serves the "
                       f"ladder {service.name!r}", param="model", code="model_not_found")
    rf = body.response_format
    if rf is not None and rf.type == "json_schema" and rf.json_schema is None:
        raise APIError(400, "response_format of type json_schema needs a json_schema",
                       param="response_format.json_schema")
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed with stream: true",
                       param="stream_options")


def completion(answer: Answer, ladder: str) -> ChatCompletionResponse:
    return ChatCompletionResponse(
        id=f"chatcmpl-{answer.request_id}", model=answer.model,
        choices=[Choice(message=ResponseMessage(content=answer.text),
                        finish_reason=finish_reason(answer))],
        usage=usage_of(answer), cascade=trace_of(answer, ladder))


@contextlib.contextmanager
def caller_trace(request: Request) -> Iterator[None]:
    """Continue the caller's trace: with a W3C ``traceparent`` header, the request's span (made
    by the telemetry observer at the end of the climb, in this task or in the stream's climb
    task, which copies this context when it starts) is a child of the caller's span."""
    # A server span already current (FastAPI instrumentation, an APM middleware) has read
    # the header itself: ours nest under it rather than beside it.
    if "traceparent" not in request.headers or otel_trace.get_current_span(
            ).get_span_context().is_valid:
        yield
        return
    token = otel_context.attach(propagate.extract(request.headers))
    try:
        yield
    finally:
        otel_context.detach(token)


def _parse_chat(raw: bytes) -> ChatCompletionRequest:
    """The request body; OpenAI's ``developer`` messages (what newer models take instead of
    ``system``, and the SDK's types offer) are the ladder's system instructions."""
    body = parse_body(raw, ChatCompletionRequest)
    for m in body.messages:
        if isinstance(m, dict) and m.get("role") == "developer":
            m["role"] = "system"
    return body


async def create_chat_completion(request: Request) -> Response:
    service: Service = request.app.state.service
    with caller_trace(request):
        return await answer_request(
            service, request, parse=_parse_chat,
            render=lambda body: _openai_render(body, service.name),
            reply=lambda a: completion(a, service.name))


async def answer_request(service: Service, request: Request, *,
                         parse: Callable[[bytes], ChatCompletionRequest],
                         render: Callable[[ChatCompletionRequest], Render],
                         reply: Callable[[Answer], BaseModel]) -> Response:
    """One wire request, in any format ``parse`` reads and ``reply`` / ``render`` write:
    authenticate, validate, climb (or stream), and count refusals; errors are raised as
    :class:`APIError` for the format's endpoint to write."""
    try:
        with counting_refusals(service.metrics.refusal):
            client = service.auth.client_for(request.headers)
            body = parse(await read_body(request, service.server.max_request_bytes))
            check_request(body, service)
            if body.stream:
                return await stream_answer(service, body, client, render(body))
            answer = await service.answer(body, client)
    except APIError:
        raise
    except Exception as e:
        raise wire_error(e) from None
    except anyio.get_cancelled_exc_class() as e:
        if not cut_by_shutdown(e):
            raise
        raise wire_error(e) from None  # a 503 in the endpoint's wire format, with the trace
    return Response(to_json(reply(answer)), media_type="application/json",
                    headers=answer_headers(answer))


def to_json(model: BaseModel) -> str:
    """The reply's JSON, serialised once by pydantic-core (not model → dict → json.dumps),
    except for a text pydantic-core cannot encode (an unpaired surrogate a model server's
    JSON escape produced): that answer was paid for, so it is sent escaped, as a stream
    sends it, instead of a 500."""
    try:
        return model.model_dump_json()
    except PydanticSerializationError:
        return json.dumps(model.model_dump(mode="json"), separators=(",", ":"))


# A plain Starlette route: the handler reads and validates its own body, so FastAPI's
# dependency solving around it was 15-40 µs a request of work for nothing.
router.add_route("/v1/chat/completions", create_chat_completion, methods=["POST"])


# ---------------------------------------------------------------- streaming


def _imminent(event: ClimbEvent, service: Service) -> bool:
    """Whether the response should wait for the next event: the answer follows at once (the
    rung was accepted, or it was the last one), or the rung was skipped unpaid (over the cap,
    the deadline, an open circuit), which is no escalation: a climb whose every rung is
    skipped must get the same status (429, 504, 502) streamed or not."""
    kind, value = event
    return kind == "attempt" and (value.status in ("accepted", "skipped")
                                  or value.rung >= len(service.config.rungs) - 1)


@dataclass(frozen=True)
class Render:
    """How one wire format writes a streamed answer: its events for the verified answer, an
    in-band error, and the line that ends the stream (OpenAI's ``[DONE]``; none for
    Anthropic's, whose last event says so itself)."""

    answer: Callable[[Answer], list[bytes]]
    error: Callable[[APIError], bytes]
    done: bytes = b""


def _openai_render(body: ChatCompletionRequest, ladder: str) -> Render:
    return Render(answer=lambda a: _answer_chunks(a, body, ladder),
                  error=lambda e: _data(e.payload()), done=b"data: [DONE]\n\n")


async def stream_answer(service: Service, body: ChatCompletionRequest,
                        client: ClientConfig | None, render: Render) -> Response:
    """Climb in the service's task group and stream the verified answer in ``render``'s
    format; errors before the response starts are raised (the caller's wire format)."""
    t0 = time.perf_counter()
    rid = uuid.uuid4().hex
    # the ladder this request is served by, whatever a reload renames while it climbs
    first_token = service.metrics.first_token.labels(service.name)
    events = service.stream(body, client, rid)
    pending: list[ClimbEvent] = []
    try:
        while True:
            event = await events.receive()
            pending.append(event)
            if event[0] != "attempt" or not _imminent(event, service):
                break
    except anyio.EndOfStream:
        events.close()
        raise APIError(503, "the server is shutting down", type="server_error") from None
    kind, value = pending[-1]
    headers = {"cache-control": "no-cache", "x-accel-buffering": "no",
               **request_id_headers(rid)}
    if kind == "error":
        events.close()
        raise value if isinstance(value, APIError) else wire_error(value)
    if kind == "answer":
        headers.update(answer_headers(value))
    return StreamingResponse(
        _sse(pending, events, render,
             on_answer=lambda: first_token.observe(time.perf_counter() - t0)),
        media_type="text/event-stream", headers=headers)


def _data(obj: object) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def progress_comment(a: Attempt) -> bytes:
    info = {"rung": a.rung, "name": a.name or a.model, "model": a.model, "status": a.status,
            "latency_ms": round(a.latency_ms, 3), "cost_usd": a.cost_usd,
            "verdicts": [{"verifier": v.verifier, "passed": v.passed, "score": v.score}
                         for v in a.verdicts]}
    return b": cascade " + json.dumps(info, separators=(",", ":")).encode() + b"\n\n"


def _answer_chunks(answer: Answer, body: ChatCompletionRequest, ladder: str) -> list[bytes]:
    usage = body.stream_options is not None and body.stream_options.include_usage
    rid, created, model = f"chatcmpl-{answer.request_id}", int(time.time()), answer.model
    first = ChatCompletionChunk(id=rid, created=created, model=model, choices=[ChunkChoice(
        delta=Delta(role="assistant", content=answer.text))], cascade=trace_of(answer, ladder))
    last = ChatCompletionChunk(id=rid, created=created, model=model, choices=[ChunkChoice(
        delta=Delta(), finish_reason=finish_reason(answer))])
    out = []
    for chunk in (first, last):
        d = chunk.model_dump(mode="json", exclude_none=True)
        # OpenAI's chunk schema: these are sent as null, not left out
        d["system_fingerprint"] = None
        for c in d["choices"]:
            c.setdefault("finish_reason", None)
            c["logprobs"] = None
        if usage:
            d["usage"] = None  # OpenAI's shape: null on every chunk but the usage chunk
        out.append(_data(d))
    if usage:
        out.append(_data({**ChatCompletionChunk(id=rid, created=created, model=model,
                                                choices=[], usage=usage_of(answer))
                          .model_dump(mode="json", exclude_none=True),
                          "system_fingerprint": None}))
    return out


_SHUT_DOWN = APIError(503, "the server shut down before the answer (what the climb cost is in "
                      "its audit line)", type="server_error", code="server_shutting_down")


async def _sse(pending: list[ClimbEvent], events: MemoryObjectReceiveStream[ClimbEvent],
               render: Render, on_answer: Callable[[], None] = lambda: None
               ) -> AsyncIterator[bytes]:
    with events:
        queue = list(pending)
        while True:
            if queue:
                kind, value = queue.pop(0)
            else:
                try:
                    with anyio.move_on_after(_HEARTBEAT_S) as scope:
                        kind, value = await events.receive()
                    if scope.cancelled_caught:
                        yield b": keep-alive\n\n"
                        continue
                except anyio.EndOfStream:
                    yield render.error(_SHUT_DOWN)
                    break
                except anyio.get_cancelled_exc_class():
                    # uvicorn's drain timeout cut the response (or the client left: then no
                    # one reads this). Said in-band, as the 503 of a response not yet begun
                    # says it: an SDK sees an error it does not retry, not a broken read. The
                    # writes do not wait (uvicorn's send only waits on a full socket buffer),
                    # so the cancellation is re-raised after them.
                    yield render.error(_SHUT_DOWN)
                    if render.done:
                        yield render.done
                    raise
            if kind == "attempt":
                yield progress_comment(value)
                continue
            if kind == "answer":
                chunks = render.answer(value)
                yield chunks[0]
                on_answer()  # time to first token: the first content chunk is out
                for chunk in chunks[1:]:
                    yield chunk
            else:
                yield render.error(wire_error(value))
            break
        if render.done:
            yield render.done
