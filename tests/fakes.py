"""In-process test doubles for the engine: a scripted Provider (our own seam, not an SDK's)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from cascade.config import RungConfig
from cascade.errors import ProviderError
from cascade.providers.base import Completion, ModelCall, Provider

Reply = str | Completion | ProviderError | Callable[[ModelCall], "str | Completion"]


@dataclass
class Script:
    """Replies per model name; each call pops the next reply (the last one repeats)."""

    replies: dict[str, list[Reply]] = field(default_factory=dict)
    calls: list[tuple[str, ModelCall]] = field(default_factory=list)

    def factory(self, rung: RungConfig) -> Provider:
        return ScriptedProvider(self, rung)

    def count(self, model: str) -> int:
        return sum(1 for m, _ in self.calls if m == model)


class ScriptedProvider(Provider):
    name = "scripted"

    def __init__(self, script: Script, rung: RungConfig) -> None:
        self.script = script
        self.rung = rung

    async def complete(self, call: ModelCall) -> Completion:
        self.script.calls.append((call.model, call))
        queue = self.script.replies.get(call.model)
        if not queue:
            raise AssertionError(f"no scripted reply for {call.model}")
        reply = queue.pop(0) if len(queue) > 1 else queue[0]
        if callable(reply) and not isinstance(reply, (Completion, ProviderError)):
            reply = reply(call)
        if isinstance(reply, ProviderError):
            raise reply
        if isinstance(reply, str):
            return Completion(text=reply, model=call.model, input_tokens=10,
                              output_tokens=len(reply.split()), finish_reason="stop")
        return reply
