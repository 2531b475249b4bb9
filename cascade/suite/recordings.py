"""Recorded model calls of a suite: what ``cascade record`` stores and the replay provider serves.

Recordings (``recordings.jsonl`` beside the cases) hold every model call made while recording,
keyed by a hash of the call, with the verdicts of the rung's verifiers, so a replay is exact and
the tuner can re-threshold scores without calling anything. Numpy-free.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from cascade.config import RungConfig
from cascade.messages import Message
from cascade.providers.base import Completion, ModelCall, TokenLogprob, rung_call
from cascade.suite.cases import RECORDINGS_FILE, read_jsonl
from cascade.trace import Verdict

__all__ = ["Recording", "RecordingStore", "answer_call", "messages_hash", "messages_text",
           "request_hash"]


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def messages_text(messages: Sequence[Message]) -> str:
    """The canonical JSON of ``messages`` (what a request is, as one string)."""
    return _canonical([m.to_dict() for m in messages])


def messages_hash(messages: Sequence[Message]) -> str:
    """Identifies a question across models: the case a recording belongs to."""
    return hashlib.sha256(messages_text(messages).encode()).hexdigest()


def request_hash(call: ModelCall) -> str:
    """Identifies one model call exactly: model, messages and every sampling setting."""
    parts: dict[str, Any] = {
        "model": call.model,
        "messages": [m.to_dict() for m in call.messages],
        "max_tokens": call.max_tokens,
        "temperature": call.temperature,
        "logprobs": call.logprobs,
        "top_logprobs": call.top_logprobs,
        "json_schema": call.json_schema,
        "stop": list(call.stop),
        "extra": dict(call.extra),
    }
    if call.schema_options:  # only when set: the keys of calls recorded before stay the same
        parts["schema_options"] = dict(call.schema_options)
    return hashlib.sha256(_canonical(parts).encode()).hexdigest()


def _loose_hash(model: str, messages: Sequence[Message]) -> str:
    return hashlib.sha256(f"{model}\n{messages_hash(messages)}".encode()).hexdigest()


def answer_call(rung: RungConfig, messages: Sequence[Message]) -> ModelCall:
    """The call a rung makes for a question: what record sends and replay looks up."""
    return rung_call(rung, messages)


@dataclass(frozen=True, kw_only=True)
class Recording:
    """One recorded model call: the reply, its usage and price, and (for answers) the verdicts."""

    key: str
    model: str
    case_id: str
    kind: str
    """``answer`` (the rung's reply to the case) or ``verifier`` (a call a verifier made)."""
    text: str
    input_tokens: int
    output_tokens: int
    cost_usd: float
    latency_ms: float = 0.0
    finish_reason: str | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None
    endpoint: str = ""
    loose_key: str = ""
    messages_key: str = ""
    verdicts: tuple[Verdict, ...] = ()
    """Raw verdicts (no threshold applied) of the rung's verifiers on this answer."""

    def completion(self) -> Completion:
        return Completion(text=self.text, model=self.model, input_tokens=self.input_tokens,
                          output_tokens=self.output_tokens, finish_reason=self.finish_reason,
                          logprobs=self.logprobs, latency_ms=self.latency_ms)

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key, "model": self.model, "case_id": self.case_id, "kind": self.kind,
            "text": self.text, "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens, "cost_usd": self.cost_usd,
            "latency_ms": self.latency_ms, "finish_reason": self.finish_reason,
            "logprobs": None if self.logprobs is None else [
                {"token": t.token, "logprob": t.logprob, "top": dict(t.top)}
                for t in self.logprobs],
            "endpoint": self.endpoint, "loose_key": self.loose_key,
            "messages_key": self.messages_key,
            "verdicts": [v.to_dict() for v in self.verdicts],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Recording:
        lps = d.get("logprobs")
        return cls(
            key=d["key"], model=d["model"], case_id=d.get("case_id", ""),
            kind=d.get("kind", "answer"), text=d["text"],
            input_tokens=int(d.get("input_tokens", 0)),
            output_tokens=int(d.get("output_tokens", 0)),
            cost_usd=float(d.get("cost_usd", 0.0)), latency_ms=float(d.get("latency_ms", 0.0)),
            finish_reason=d.get("finish_reason"),
            logprobs=None if lps is None else tuple(
                TokenLogprob(t["token"], float(t["logprob"]), dict(t.get("top") or {}))
                for t in lps),
            endpoint=d.get("endpoint", ""), loose_key=d.get("loose_key", ""),
            messages_key=d.get("messages_key", ""),
            verdicts=tuple(Verdict.from_dict(v) for v in d.get("verdicts", [])),
        )

    @classmethod
    def of(cls, call: ModelCall, completion: Completion, *, case_id: str, kind: str,
           cost_usd: float, endpoint: str = "",
           verdicts: Sequence[Verdict] = ()) -> Recording:
        return cls(key=request_hash(call), model=call.model, case_id=case_id, kind=kind,
                   text=completion.text, input_tokens=completion.input_tokens,
                   output_tokens=completion.output_tokens, cost_usd=cost_usd,
                   latency_ms=completion.latency_ms, finish_reason=completion.finish_reason,
                   logprobs=completion.logprobs, endpoint=endpoint,
                   loose_key=_loose_hash(call.model, call.messages),
                   messages_key=messages_hash(call.messages), verdicts=tuple(verdicts))


class RecordingStore:
    """Recorded calls of a suite, in memory, appended to a JSONL file as they come."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._by_key: dict[str, Recording] = {}
        self._by_loose: dict[str, Recording] = {}
        self._case_of: dict[str, str] = {}
        if self.path is not None and self.path.is_file():
            for _i, obj in read_jsonl(self.path):
                self.remember(Recording.from_dict(obj))

    @classmethod
    def for_suite(cls, suite: str | os.PathLike[str]) -> RecordingStore:
        """The store of a suite folder (``recordings.jsonl`` inside) or beside a suite file."""
        p = Path(suite)
        return cls(p / RECORDINGS_FILE if p.is_dir() else p.with_name(RECORDINGS_FILE))

    def remember(self, r: Recording) -> None:
        """Index ``r`` in memory only (merging stores; :meth:`add` also writes it)."""
        self._by_key[r.key] = r
        # Only answers stand in loosely: a sampling verifier's call has the case's own model and
        # messages, and its sample must never be served as the rung's answer.
        if r.loose_key and r.kind == "answer":
            self._by_loose.setdefault(r.loose_key, r)
        if r.messages_key and r.case_id:
            self._case_of.setdefault(r.messages_key, r.case_id)

    def __len__(self) -> int:
        return len(self._by_key)

    def __iter__(self) -> Iterator[Recording]:
        return iter(self._by_key.values())

    def get(self, call: ModelCall, *, exact: bool = False) -> Recording | None:
        """The recording of ``call``: exact match first, else (unless ``exact``) the answer
        recorded for the same model and messages."""
        r = self._by_key.get(request_hash(call))
        if r is not None or exact:
            return r
        return self._by_loose.get(_loose_hash(call.model, call.messages))

    def case_for(self, messages: Sequence[Message]) -> str | None:
        return self._case_of.get(messages_hash(messages))

    def add(self, r: Recording) -> None:
        self.remember(r)
        if self.path is not None:
            with self._append() as f:
                f.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")

    def check_writable(self) -> None:
        """Raise the OSError a first :meth:`add` would (a folder, a path under a file)."""
        if self.path is not None:
            with self._append():
                pass

    def _append(self) -> IO[str]:
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return self.path.open("a", encoding="utf-8")


