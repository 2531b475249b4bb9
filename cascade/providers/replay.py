"""The replay provider: answers from recordings, so suites re-run offline, exactly and for free.

A rung with ``provider = "replay"`` reads the recordings named by its ``base_url`` (a
``recordings.jsonl`` file or a suite folder holding one), else ``$CASCADE_RECORDINGS``. Calls are
matched on the model and the whole request (messages and sampling settings), falling back to
model and messages only for the rung's own answer call (its settings may have changed since
recording): a verifier's call (a self-consistency sample has the rung's model and the case's
messages too) is served only by its exact recording, never by the rung's answer. A call never
recorded is an error naming the case and the model, never a silent guess. Grades are not in
recordings' replies, so verifiers cannot see them.
"""

from __future__ import annotations

import os
from pathlib import Path

from cascade.config import RungConfig
from cascade.errors import ClientRequestError, ConfigError
from cascade.providers.base import Completion, ModelCall, Provider, rung_call
from cascade.suite import RECORDINGS_FILE, RecordingStore

__all__ = ["MissingRecording", "ReplayProvider", "replay_provider"]


class MissingRecording(ClientRequestError):
    """No recording for this call: record the suite for this model first (never retried)."""


class ReplayProvider(Provider):
    """Serves recorded completions by (model, request).

    With ``rung`` (the endpoint this provider serves), only a call shaped as that rung's answer
    may fall back to the loose (model, messages) match; without it, every call may.
    """

    name = "replay"

    def __init__(self, store: RecordingStore, rung: RungConfig | None = None) -> None:
        self.store = store
        self.rung = rung

    def _answer_shaped(self, call: ModelCall) -> bool:
        """Whether ``call`` is the rung's answer call (the request's structured output and the
        deadline-cut timeout aside): the only call a recorded answer may stand in for."""
        if self.rung is None:
            return True
        own = rung_call(self.rung, call.messages)
        return (call.model, call.max_tokens, call.temperature, call.logprobs,
                call.top_logprobs, tuple(call.stop), dict(call.extra)) == (
            own.model, own.max_tokens, own.temperature, own.logprobs, own.top_logprobs,
            tuple(own.stop), dict(own.extra))

    async def complete(self, call: ModelCall) -> Completion:
        rec = self.store.get(call, exact=not self._answer_shaped(call))
        if rec is None:
            case = self.store.case_for(call.messages)
            if case is not None:
                what = f"case {case!r}"
            else:
                last = next((m.content for m in reversed(call.messages) if m.role == "user"), "")
                what = f"the request starting {last[:60]!r}"
            where = self.store.path or "the recordings"
            raise MissingRecording(
                f"no recording of {what} for model {call.model!r} in {where}; "
                "run `cascade record` for this model",
                provider="replay", model=call.model,
            )
        return rec.completion()


_STORES: dict[Path, RecordingStore] = {}


def _store_for(path: Path) -> RecordingStore:
    p = path / RECORDINGS_FILE if path.is_dir() else path
    if not p.is_file():
        raise ConfigError("replay recordings not found", source=str(p), key="base_url")
    key = p.resolve()
    if key not in _STORES:
        _STORES[key] = RecordingStore(key)
    return _STORES[key]


def replay_provider(rung: RungConfig) -> Provider:
    """The provider factory for ``provider = "replay"`` rungs."""
    where = rung.base_url or os.environ.get("CASCADE_RECORDINGS")
    if not where:
        raise ConfigError("a replay rung needs base_url = the recordings file or suite folder "
                          "(or $CASCADE_RECORDINGS)", key="base_url")
    return ReplayProvider(_store_for(Path(where)), rung)
