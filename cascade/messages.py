"""Requests: a prompt or OpenAI-style messages, normalised once so cache keys and providers
agree."""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from cascade.errors import ConfigError

__all__ = ["Message", "Request", "Role", "check_request_id", "check_schema_options",
           "make_request", "normalise_messages", "number_arg", "schema_parts"]

Role = Literal["system", "user", "assistant"]
_ROLES: frozenset[str] = frozenset({"system", "user", "assistant"})


@dataclass(frozen=True, slots=True)
class Message:
    """One chat turn. Content is plain text: the cascade verifies text answers."""

    role: Role
    content: str

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True, kw_only=True)
class Request:
    """What the user asked, independent of any rung.

    ``schema`` is a JSON Schema the answer must satisfy (derived from ``output_type`` when a
    pydantic model is given); ``metadata`` travels into the trace and never into the cache key.
    """

    messages: tuple[Message, ...]
    schema: Mapping[str, Any] | None = None
    output_type: type[Any] | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    id: str = ""
    """The request id (``Answer.request_id``): audit, shadow and feedback lines join on it."""
    schema_options: Mapping[str, Any] = field(default_factory=dict)
    """How ``schema`` is asked for: OpenAI's json_schema ``name``, ``description`` and
    ``strict`` (see :func:`check_schema_options`)."""

    @property
    def system(self) -> str | None:
        """All system turns joined: Anthropic wants them apart from the conversation."""
        parts = [m.content for m in self.messages if m.role == "system"]
        return "\n\n".join(parts) if parts else None

    @property
    def last_user(self) -> str:
        for m in reversed(self.messages):
            if m.role == "user":
                return m.content
        return ""


def _content_text(content: object, index: int) -> str:
    if isinstance(content, str):
        return content
    # OpenAI content parts: [{"type": "text", "text": "..."}]; only text parts are supported.
    if isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
        texts: list[str] = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(
                part.get("text"), str
            ):
                raise ConfigError(
                    f"messages[{index}].content: only text parts "
                    '({"type": "text", "text": ...}) are supported',
                    source="request",
                )
            texts.append(part["text"])
        return "".join(texts)
    raise ConfigError(
        f"messages[{index}].content must be a string or a list of text parts, "
        f"not {type(content).__name__}",
        source="request",
    )


def normalise_messages(
    prompt: str | None = None,
    messages: Sequence[Mapping[str, Any] | Message] | None = None,
) -> tuple[Message, ...]:
    """Turn a prompt string or OpenAI-style messages into an immutable, validated tuple.

    Line endings are unified and surrounding white space of each turn stripped, so requests
    that differ only in formatting share a cache entry.
    """
    if (prompt is None) == (messages is None):
        raise ConfigError("give exactly one of a prompt string or messages", source="request")
    if prompt is not None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError("the prompt must be a non-empty string", source="request")
        return (Message("user", _clean(prompt)),)
    assert messages is not None
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ConfigError("messages must be a list of {role, content} objects", source="request")
    out: list[Message] = []
    for i, m in enumerate(messages):
        if isinstance(m, Message):  # checked as a dict is: the dataclass does not check
            m = {"role": m.role, "content": m.content}
        if not isinstance(m, Mapping):
            raise ConfigError(
                f"messages[{i}] must be an object with 'role' and 'content'", source="request"
            )
        role = m.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise ConfigError(
                f"messages[{i}].role is {role!r}; allowed: system, user, assistant",
                source="request",
            )
        if "content" not in m:
            raise ConfigError(f"messages[{i}] has no 'content'", source="request")
        out.append(Message(role, _clean(_content_text(m["content"], i))))  # type: ignore[arg-type]
    if not any(m.role == "user" for m in out):
        raise ConfigError("messages must contain at least one user turn", source="request")
    if not any(m.role == "user" and m.content.strip() for m in out):  # paid for nothing
        raise ConfigError("messages must contain a user turn with text (every user turn is "
                          "empty)", source="request")
    return tuple(out)


def _clean(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def check_request_id(request_id: str | None) -> str | None:
    """A caller's own request id (e.g. its upstream ``X-Request-ID``): it goes into response
    headers, audit lines and feedback joins, so it is kept to 1-128 header-safe characters."""
    if request_id is None:
        return None
    if not isinstance(request_id, str) or not _REQUEST_ID.fullmatch(request_id):
        raise ConfigError("must be 1 to 128 letters, digits, '.', '_', ':' or '-', starting "
                          "with a letter or digit", source="request", key="request_id")
    return request_id


_SCHEMA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SCHEMA_OPTIONS = {"name": str, "description": str, "strict": bool}


def check_schema_options(options: Mapping[str, Any] | None, schema: Mapping[str, Any] | None
                   ) -> dict[str, Any]:
    """``options`` checked: OpenAI's json_schema ``name`` (1-64 letters, digits, ``_``, ``-``),
    ``description`` and ``strict``, which a rung sends with the schema where its structured
    output mode has a place for them (``strict`` asks the server to constrain decoding to the
    schema; the schema verifier checks the answer either way). They need a JSON schema."""
    if not options:
        return {}
    if not isinstance(options, Mapping):
        raise ConfigError("must be a mapping", source="request", key="schema_options")
    if schema is None:
        raise ConfigError("needs a JSON Schema dict as schema", source="request",
                          key="schema_options")
    out: dict[str, Any] = {}
    for k, v in options.items():
        kind = _SCHEMA_OPTIONS.get(k)
        if kind is None:
            raise ConfigError(f"has {k!r}; allowed: name, description, strict",
                              source="request", key="schema_options")
        if v is None:
            continue
        if type(v) is not kind:
            raise ConfigError(f"{k} must be a {kind.__name__}", source="request",
                              key=f"schema_options.{k}")
        if k == "name" and not _SCHEMA_NAME.fullmatch(str(v)):
            raise ConfigError("name must be 1 to 64 letters, digits, '_' or '-'",
                              source="request", key="schema_options.name")
        out[k] = v
    return out


def schema_parts(schema: Any) -> tuple[Mapping[str, Any] | None, type[Any] | None]:
    """A request's ``schema=`` as (JSON Schema, pydantic type or None), checked before any
    rung is paid for."""
    if schema is None:
        return None, None
    if isinstance(schema, Mapping):
        import jsonschema

        try:
            jsonschema.Draft202012Validator.check_schema(schema)
        except jsonschema.SchemaError as e:  # found before any rung is paid for
            raise ConfigError(f"is not a valid JSON Schema: {e.message}", source="request",
                              key="schema") from None
        return schema, None
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        return schema.model_json_schema(), schema
    raise ConfigError(
        f"schema must be a JSON Schema dict or a pydantic model class, not {schema!r}",
        source="request", key="schema",
    )


def make_request(prompt: str | None, messages: Sequence[Mapping[str, Any] | Message] | None, *,
                 schema: Any, schema_options: Mapping[str, Any] | None,
                 metadata: Mapping[str, Any] | None, request_id: str | None) -> Request:
    """A request's arguments checked and normalised, before any rung is paid for."""
    json_schema, output_type = schema_parts(schema)
    if metadata is not None and not isinstance(metadata, Mapping):
        raise ConfigError("must be a mapping", source="request", key="metadata")
    return Request(messages=normalise_messages(prompt, messages), schema=json_schema,
                   output_type=output_type, metadata=dict(metadata or {}),
                   id=check_request_id(request_id) or uuid.uuid4().hex,
                   schema_options=check_schema_options(
                       schema_options, None if output_type is not None else json_schema))


def number_arg(value: Any, key: str) -> float | None:
    """A per-call ``max_cost_usd`` / ``timeout_s``: None, or a finite non-negative number."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"must be a number, not {type(value).__name__}", source="request",
                          key=key)
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"must be a finite number >= 0, got {value}", source="request",
                          key=key)
    return float(value)
