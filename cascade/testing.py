"""Test doubles that ship with the library, so tests, benchmarks and examples need no network.

``FunctionProvider(fn)`` answers every call with ``fn(call)``; ``Script`` scripts replies per
model. Both plug in through ``Cascade(config, provider_factory=...)``, our own seam, never an
SDK's internals.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from cascade.config import RungConfig
from cascade.errors import ProviderError
from cascade.providers.base import Completion, ModelCall, Provider

__all__ = ["FakeClock", "FunctionProvider", "Reply", "Script", "ScriptedProvider", "UnscriptedCall",
           "completion"]

Reply = str | Completion | ProviderError | Callable[[ModelCall], "str | Completion"]
"""A scripted reply: text, a whole Completion, an error to raise, or a function of the call."""


class UnscriptedCall(BaseException):
    """A call to a model the :class:`Script` has no reply for: a bug in the test itself.

    A ``BaseException``, like pytest's own ``fail``: the engine turns any *Exception* a plugin
    raises into a failed verdict (a judge, a sampling verifier), so an ``AssertionError`` there
    became a quiet rejection and the climb escalated, passing a test that meant to check the
    judge. This one escapes every such guard and fails the test where the call was made.
    """


def completion(text: str, call: ModelCall, *, input_tokens: int = 10,
               output_tokens: int | None = None, finish_reason: str = "stop") -> Completion:
    """A plain reply to ``call``: ``output_tokens`` defaults to the number of words."""
    return Completion(text=text, model=call.model, input_tokens=input_tokens,
                      output_tokens=len(text.split()) if output_tokens is None else output_tokens,
                      finish_reason=finish_reason)


class FunctionProvider(Provider):
    """A provider whose replies come from a (sync or async) function of the call."""

    name = "function"

    def __init__(self, fn: Callable[[ModelCall], str | Completion | Awaitable[str | Completion]]
                 ) -> None:
        self.fn = fn
        self.calls: list[ModelCall] = []

    async def complete(self, call: ModelCall) -> Completion:
        self.calls.append(call)
        out = self.fn(call)
        if inspect.isawaitable(out):
            out = await out
        return completion(out, call) if isinstance(out, str) else out

    def factory(self, rung: RungConfig) -> Provider:
        """Use as ``provider_factory``: every rung answers through this one function."""
        return self


@dataclass
class Script:
    """Replies per model name; each call pops the next reply (the last one repeats)."""

    replies: dict[str, list[Reply]] = field(default_factory=dict)
    calls: list[tuple[str, ModelCall]] = field(default_factory=list)

    def factory(self, rung: RungConfig) -> Provider:
        """Use as ``provider_factory``."""
        return ScriptedProvider(self, rung)

    def count(self, model: str) -> int:
        """How many calls went to ``model``."""
        return sum(1 for m, _ in self.calls if m == model)


class ScriptedProvider(Provider):
    """One rung's view of a :class:`Script`."""

    name = "scripted"

    def __init__(self, script: Script, rung: RungConfig) -> None:
        self.script = script
        self.rung = rung

    async def complete(self, call: ModelCall) -> Completion:
        self.script.calls.append((call.model, call))
        queue = self.script.replies.get(call.model)
        if not queue:
            raise UnscriptedCall(f"no scripted reply for {call.model}")
        reply = queue.pop(0) if len(queue) > 1 else queue[0]
        if callable(reply) and not isinstance(reply, (Completion, ProviderError)):
            reply = reply(call)
        if isinstance(reply, ProviderError):
            raise _fresh(reply)
        if isinstance(reply, str):
            return completion(reply, call)
        return reply


def _fresh(err: ProviderError) -> ProviderError:
    """A copy of a scripted error to raise: the retry loop and failover annotate what they
    raise (``tries``, notes, ``failover_errors``), and a reply that repeats must not carry the
    previous call's annotations into the next call's trace."""
    cls = type(err)
    copy = cls.__new__(cls, *err.args)
    copy.__dict__.update(err.__dict__)
    if hasattr(err, "__notes__"):
        copy.__notes__ = list(err.__notes__)
    return copy


class FakeClock:
    """A monotonic clock that moves only when told: ``Cascade(config, clock=FakeClock())``
    runs breakers' cooldowns, deadlines and latency in fake time."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

