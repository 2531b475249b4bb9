"""The shared base of the SDK-backed providers (OpenAI, Anthropic): client, close, one call.

Each subclass says how to build its SDK client, the request body and the reply; this base owns
what they have in common: the key read on first use, the SDK client built on our own
``httpx2`` client (SDK retries off, reply size capped), errors translated once, and structured
output asked for the way the rung's ``structured_output`` says. With a pydantic type, the
``tools`` mode goes through instructor (the tool call is the answer, re-asks possible); every
other mode sends the JSON Schema itself (so a server's grammar can enforce it) and validates
the reply here with pydantic.
"""

from __future__ import annotations

import json
import re
import time
from abc import abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any, ClassVar, Generic, TypeVar, cast

import httpx2

from cascade.config import RungConfig
from cascade.errors import ClientRequestError, MalformedReply, ProviderError
from cascade.providers._common import (
    Where,
    billed,
    guarded,
    resolve_api_key,
    run_instructor,
)
from cascade.providers._http import capped_client, pick_transport
from cascade.providers.base import Completion, ModelCall, Provider

__all__ = ["SDKProvider", "Wire", "parse_structured", "post_json",
           "schema_name", "schema_of"]

ClientT = TypeVar("ClientT")

_STRUCTURED_FIELDS = {"response_format", "tools", "tool_choice", "output_config",
                      "json_schema", "guided_json"}
_FIELD_SETTINGS = {
    "max_tokens": "max_tokens", "max_completion_tokens": "max_tokens",
    "logprobs": "logprobs", "top_logprobs": "logprobs", "temperature": "temperature",
    "stop": "stop", "stop_sequences": "stop",
}


def schema_of(output_type: type[Any]) -> dict[str, Any]:
    """The JSON Schema pydantic derives for ``output_type``."""
    from pydantic import TypeAdapter

    return TypeAdapter(output_type).json_schema()


def schema_name(schema: Mapping[str, Any]) -> str:
    """A name for the schema where the API wants one (a tool, a json_schema): its title."""
    title = schema.get("title")
    return (re.sub(r"[^A-Za-z0-9_-]", "_", title if isinstance(title, str) else "")
            or "answer")[:64]


def _json_part(text: str) -> str:
    """The JSON in a reply that may wrap it in a Markdown fence or a sentence (prompt mode)."""
    stripped = text.strip()
    if stripped.startswith("```"):
        stripped = stripped.strip("`").removeprefix("json").strip()
    if stripped[:1] in "{[":
        return stripped
    start = min((i for i in (stripped.find("{"), stripped.find("[")) if i >= 0), default=-1)
    end = max(stripped.rfind("}"), stripped.rfind("]"))
    return stripped[start:end + 1] if 0 <= start < end else stripped


def parse_structured(text: str, output_type: type[Any], finish_reason: str | None
                     ) -> tuple[Any, str | None]:
    """``(object, None)`` when ``text`` validates as ``output_type``, else ``(None, why)``."""
    from pydantic import TypeAdapter, ValidationError

    try:
        return TypeAdapter(output_type).validate_json(_json_part(text)), None
    except ValidationError as e:
        why = "; ".join(f"{'.'.join(map(str, err['loc'])) or '<root>'}: {err['msg']}"
                        for err in e.errors()[:5])
        if finish_reason == "length":
            why = f"the output was cut at max_tokens before it was complete ({why})"
        return None, why


@dataclass(frozen=True, slots=True)
class Wire:
    """One API's reply handling, as plain functions of its provider module."""

    check: Callable[[object, Where], object]
    """Raise MalformedReply when the reply breaks the wire protocol."""
    completion: Callable[..., Completion]
    """``(reply, call, where, start, *, parsed=, parse_error=)``: the checked reply."""
    usage: Callable[[object], tuple[int, int] | None]
    """Input and output tokens of instructor's summed usage, when it kept one."""


class _Reply(dict[str, Any]):
    """A reply read by :func:`post_json`: the JSON object, and the server's request id."""

    _request_id: str | None = None


async def post_json(client: Any, path: str, kw: Mapping[str, Any], *,
                    request_id_header: str) -> object:
    """The create call through the SDK's own ``post`` (its documented way to send a request
    as given): the same URL, headers, auth and typed errors, without the work the SDK's
    create adds around it: openai's per-call transform of the params, both SDKs' typed reply
    objects (openai 0.4 ms of a 1.2 ms loopback call; anthropic 0.27 of 0.86 ms of CPU). Our
    bodies are plain JSON already, and the provider's :class:`Wire` checks the reply either
    way. Returns the JSON value, or the text when the body is not JSON and does not say it is
    (as the SDKs do)."""
    body = dict(kw)
    timeout = body.pop("timeout", None)
    body.update(body.pop("extra_body", None) or {})
    response: httpx2.Response = await client.post(
        path, body=body, cast_to=httpx2.Response,
        options={"timeout": timeout} if timeout is not None else {})
    kind = response.headers.get("content-type", "").split(";")[0].strip()
    try:
        data = json.loads(response.content)
    except ValueError:
        if kind.endswith("json"):
            raise
        return response.text
    if not isinstance(data, dict):
        return data
    reply = _Reply(data)
    reply._request_id = response.headers.get(request_id_header)
    return reply


class SDKProvider(Provider, Generic[ClientT]):
    """One endpoint spoken through a vendor SDK; subclasses fill in the wire format."""

    sdk: ModuleType
    """The vendor SDK module (its error classes and default http client class)."""
    wire: Wire
    """How this API's replies are checked and read."""
    instructor_provider: str
    """The name of instructor's ``Provider`` member for this SDK."""
    structured_modes: ClassVar[tuple[str, ...]] = ()
    default_structured: ClassVar[str] = "json_schema"
    lean_path: ClassVar[str | None] = None
    """The create call's path for :func:`post_json` (None: the SDK's create itself)."""
    request_id_header: ClassVar[str] = "x-request-id"
    """The header carrying the server's request id, kept on the lean call's reply."""

    def __init__(self, rung: RungConfig) -> None:
        self.rung = rung
        self.name = rung.provider
        self._client: ClientT | None = None
        self._key: str | None = None
        self._model_checked = not rung.check_model
        self.transport: str | None = None
        """The HTTP client its SDK sends with (``httpx`` or ``aiohttp``), once the first call
        chose it from the rung's ``transport``."""

    # ------------------------------------------------------------ what a subclass says

    @abstractmethod
    def _key_source(self) -> tuple[str | None, str | None]:
        """(the variable read when the rung names none, the key sent when no variable is
        named at all and the kind needs none, e.g. a local server)."""

    @abstractmethod
    def _new_client(self, key: str, http_client: httpx2.AsyncClient) -> ClientT:
        """The SDK client, on our http client, with the SDK's own retries off."""

    @abstractmethod
    def _endpoint(self, client: ClientT) -> Callable[..., Awaitable[Any]]:
        """The SDK's create method for one call (instructor patches it)."""

    def _plain_endpoint(self, client: ClientT) -> Callable[..., Awaitable[Any]]:
        """The call made when instructor is not in it: :func:`post_json` to
        :attr:`lean_path` when the kind has one, else the SDK's create (its reply is read by
        :attr:`wire` either way)."""
        path = self.lean_path
        if path is None:
            return self._endpoint(client)
        header = self.request_id_header

        async def create(**kw: Any) -> object:
            return await post_json(client, path, kw, request_id_header=header)

        return create

    @abstractmethod
    def _request(self, call: ModelCall, *, schema: Mapping[str, Any] | None,
                 mode: str) -> dict[str, Any]:
        """The request body; ``schema`` (None for instructor's tools mode) sent per ``mode``."""


    # ------------------------------------------------------------ shared

    @property
    def structured_output(self) -> str:
        """How structured output is asked for: the rung's setting, else this kind's default."""
        return self.rung.structured_output or self.default_structured

    def _get_client(self) -> ClientT:
        # Built on first use so that a missing key fails the call (the cascade records it and
        # moves on) rather than the construction of the whole ladder.
        if self._client is None:
            default_env, dummy = self._key_source()
            self._key = resolve_api_key(self.rung, default_env=default_env, dummy=dummy)
            where = Where(provider=self.name, model=self.rung.model)
            self.transport = pick_transport(self.rung.transport, rung=self.rung.label,
                                            base_url=self.rung.base_url)
            self._client = self._new_client(self._key, capped_client(
                self.sdk, self.rung.max_reply_bytes, where, transport=self.transport))
        return self._client

    async def complete(self, call: ModelCall) -> Completion:
        client = self._get_client()
        where = Where(provider=self.name, model=call.model)
        if not self._model_checked:
            try:
                await self._check_model(client, call.model, where)
            except ProviderError as e:
                e.sent = False  # the model call itself never went out: nothing to bill
                raise
        mode = self.structured_output
        tools_type = call.output_type if mode == "tools" else None  # instructor's case
        endpoint = (self._endpoint if tools_type is not None else self._plain_endpoint)(client)
        create = guarded(endpoint, self.sdk, secret=self._key, where=where,
                         check=self.wire.check, setting=self._setting_for,
                         usage=self.wire.usage)
        start = time.perf_counter()
        if tools_type is not None:
            import instructor

            result = await run_instructor(
                create, mode=instructor.Mode.TOOLS,
                provider=getattr(instructor.Provider, self.instructor_provider),
                output_type=tools_type, reasks=call.reasks,
                kwargs=self._request(call, schema=None, mode=mode), where=where,
                secret=self._key,
            )
            done = self.wire.completion(result.raw, call, where, start, parsed=result.parsed,
                                        parse_error=result.error)
            usage = self.wire.usage(result.total_usage)
            return replace(done, input_tokens=usage[0], output_tokens=usage[1]) if usage \
                else done
        schema = call.json_schema
        if call.output_type is not None:
            schema = schema_of(call.output_type)
        reply = await create(**self._request(call, schema=schema, mode=mode))
        try:
            done = self.wire.completion(reply, call, where, start)
        except MalformedReply as bad:  # e.g. bad logprobs in a billed 200
            raise billed(bad, reply, self.wire.usage) from None
        if call.output_type is not None:
            parsed, error = parse_structured(done.text, call.output_type, done.finish_reason)
            done = replace(done, parsed=parsed, parse_error=error)
        return done

    async def _check_model(self, client: ClientT, model: str, where: Where) -> None:
        """``check_model``: fail clearly when the server's ``/models`` does not list ``model``
        (servers that load one model answer any name with it). A server without the endpoint
        cannot be checked and is let through."""
        listing = guarded(cast(Any, client).models.list, self.sdk, secret=self._key,
                          where=where, check=lambda reply, where: reply)
        try:
            page = await listing()
        except ClientRequestError:
            self._model_checked = True  # no /models here (404): nothing to check against
            return
        ids = [i for i in (getattr(m, "id", None) for m in getattr(page, "data", ()) or ())
               if isinstance(i, str)]
        if ids and model not in ids:
            raise ClientRequestError(
                f"the server at {self.rung.base_url or 'the default URL'} does not serve model "
                f"{model!r}; it lists {ids[:10]}: set rung {self.rung.label!r}'s 'model' to one "
                "of them (check_model = true asked for this check)", **where)
        self._model_checked = True

    def _setting_for(self, field: str) -> str:
        """The rung setting that sends ``field``, for a server's rejection of it."""
        where = f"rung {self.rung.label!r}"
        top = field.split(".")[0]
        if top in _STRUCTURED_FIELDS:
            others = [m for m in self.structured_modes if m != self.structured_output]
            return (f"{where}'s structured_output (now {self.structured_output!r}; try "
                    f"{' or '.join(repr(m) for m in others)})")
        setting = _FIELD_SETTINGS.get(top)
        if setting is not None:
            return f"{where}'s {setting}"
        if top in self.rung.extra:
            return f"{where}'s extra.{top}"
        return f"{where}'s settings (the server does not take {top!r})"

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            close = getattr(client, "close", None)
            if close is not None:
                await close()
