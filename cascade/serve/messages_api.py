"""``POST /v1/messages``: the same cascade behind Anthropic's Messages wire format.

A request is translated into the chat-completions request the service already answers (system
prompt first, text blocks joined; ``max_tokens``, ``temperature``, ``stop_sequences`` and
``metadata.user_id`` carried over), so budgets, verifiers, the cache, the audit log and the
spans are the same for both formats. Only text content is accepted: image, document and tool
blocks are a 400 naming the block, never dropped. ``cache_control``, on a block or at the top
level (the SDK's automatic caching), is accepted and ignored (it is a provider-side caching
hint; the cascade has its own cache); so is a block key that is null (``citations: None``, as
the SDK dumps a reply's ``TextBlock``).

The reply is a ``message`` with one text block, ``stop_reason`` ``max_tokens`` when the
accepting rung was cut off, ``stop_sequence`` (with the sequence) when one of the request's
stop sequences ended it and the rung's server said which (Anthropic does, and vLLM), and
``end_turn`` otherwise, ``usage`` summed over every call, and the ``cascade`` trace; errors are
Anthropic's ``{"type": "error", "error": {...}}`` with the same statuses as the chat endpoint
(budget 429, no answer 502, deadline 504) and the cascade's own error types. Streaming sends
the verified answer as Anthropic's event sequence (``message_start`` … ``message_stop``) once
the climb is over, with the same progress comments as the chat endpoint while it climbs.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from cascade.serve.chat import (
    Render,
    answer_request,
    caller_trace,
    carried_keys,
    finish_reason,
    refuse_unsupported,
    stop_sequence,
    trace_of,
    usage_of,
)
from cascade.serve.errors import APIError, parse_body
from cascade.serve.protocol import (
    AnthropicText,
    AnthropicUsage,
    ChatCompletionRequest,
    MessagesRequest,
    MessagesResponse,
)
from cascade.serve.service import Service
from cascade.trace import Answer

__all__ = ["anthropic_error", "router", "to_chat"]

router = APIRouter()

_KINDS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
          503: "overloaded_error"}
_OURS = {"budget_exceeded", "no_answer", "deadline_exceeded", "unverified_answer"}
"""The cascade's own error types keep their names (the SDKs choose the exception by status)."""
_BLOCK_KEYS = frozenset({"type", "text", "cache_control"})
_STOP = {"length": "max_tokens", "content_filter": "refusal"}


def anthropic_error(e: APIError) -> dict[str, Any]:
    kind = e.body.type if e.body.type in _OURS else _KINDS.get(e.status, "api_error")
    err: dict[str, Any] = {"type": kind, "message": e.body.message}
    if e.body.cascade is not None:
        err["cascade"] = e.body.cascade.model_dump(mode="json")
    return {"type": "error", "error": err}


def _text(content: object, where: str) -> str:
    """A message's content as text: a string, or text blocks joined (anything else: a 400)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where} must be a string or a list of content blocks", param=where)
    parts = []
    for j, block in enumerate(content):
        at = f"{where}[{j}]"
        if not isinstance(block, dict) or block.get("type") != "text":
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise APIError(400, f"{at}: only text blocks are supported, not {kind!r}",
                           param=f"{at}.type", code="unsupported_field")
        # A null (``citations: None``, as the SDK's ``TextBlock.model_dump()`` writes it) or
        # empty list says nothing; a key that carries something is refused, never dropped.
        refuse_unsupported(sorted(carried_keys(block, _BLOCK_KEYS)), at=at)
        if not isinstance(block.get("text"), str):
            raise APIError(400, f"{at}.text must be a string", param=f"{at}.text")
        parts.append(block["text"])
    return "\n\n".join(parts)


def to_chat(body: MessagesRequest) -> ChatCompletionRequest:
    """The chat-completions request the service answers for a Messages request."""
    refuse_unsupported(body.unsupported())
    meta = dict(body.metadata or {})
    user = meta.pop("user_id", None)
    refuse_unsupported(sorted(meta), at="metadata", why="only user_id is")
    if user is not None and not isinstance(user, str):  # Anthropic's is a string
        raise APIError(400, f"metadata.user_id must be a string, not {type(user).__name__}",
                       param="metadata.user_id")
    messages: list[dict[str, Any]] = []
    system = _text(body.system, "system") if body.system is not None else ""
    if system.strip():  # "" or [] is no system prompt, not an empty one sent to the rungs
        messages.append({"role": "system", "content": system})
    for i, m in enumerate(body.messages):
        refuse_unsupported(sorted(set(m) - {"role", "content"}), at=f"messages[{i}]")
        if m.get("role") not in ("user", "assistant"):
            raise APIError(400, f"messages[{i}].role must be 'user' or 'assistant'",
                           param=f"messages[{i}].role")
        messages.append({"role": m["role"], "content": _text(m.get("content"),
                                                             f"messages[{i}].content")})
    return ChatCompletionRequest(
        model=body.model, messages=messages, max_tokens=body.max_tokens,
        temperature=body.temperature, stop=body.stop_sequences, stream=body.stream,
        user=None if user is None else str(user))


def _stop_reason(answer: Answer) -> str:
    if stop_sequence(answer) is not None:
        return "stop_sequence"
    return _STOP.get(finish_reason(answer), "end_turn")


def _message(answer: Answer, ladder: str, *, streamed: bool = False) -> MessagesResponse:
    usage = usage_of(answer)
    return MessagesResponse(
        id=f"msg_{answer.request_id}", model=answer.model,
        content=[] if streamed else [AnthropicText(text=answer.text)],
        stop_reason=None if streamed else _stop_reason(answer),
        stop_sequence=None if streamed else stop_sequence(answer),
        usage=AnthropicUsage(input_tokens=usage.prompt_tokens,
                             output_tokens=0 if streamed else usage.completion_tokens),
        cascade=trace_of(answer, ladder))


def _event(name: str, obj: object) -> bytes:
    return f"event: {name}\ndata: ".encode() + json.dumps(
        obj, separators=(",", ":")).encode() + b"\n\n"


def _render(ladder: str) -> Render:
    def answer(a: Answer) -> list[bytes]:
        start = _message(a, ladder, streamed=True).model_dump(mode="json")
        return [
            _event("message_start", {"type": "message_start", "message": start}),
            _event("content_block_start", {"type": "content_block_start", "index": 0,
                                           "content_block": {"type": "text", "text": ""}}),
            _event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                           "delta": {"type": "text_delta", "text": a.text}}),
            _event("content_block_stop", {"type": "content_block_stop", "index": 0}),
            _event("message_delta", {
                "type": "message_delta",
                "delta": {"stop_reason": _stop_reason(a), "stop_sequence": stop_sequence(a)},
                "usage": {"output_tokens": usage_of(a).completion_tokens}}),
            _event("message_stop", {"type": "message_stop"}),
        ]

    return Render(answer=answer, error=lambda e: _event("error", anthropic_error(e)))


async def create_message(request: Request) -> Response:
    service: Service = request.app.state.service
    with caller_trace(request):
        try:
            return await answer_request(
                service, request, parse=lambda raw: to_chat(parse_body(raw, MessagesRequest)),
                render=lambda body: _render(service.name),
                reply=lambda a: _message(a, service.name))
        except APIError as e:
            return JSONResponse(anthropic_error(e), status_code=e.status, headers=e.headers)


router.add_route("/v1/messages", create_message, methods=["POST"])
