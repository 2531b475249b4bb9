"""A third-party provider: answers every question by shouting it back.

A provider is a class (or any factory) called with the rung's ``RungConfig`` that returns a
``cascade.Provider``: one async ``complete(call)`` returning a ``Completion`` whose usage comes
from the reply, plus ``aclose()`` for connections. Its own settings come from the rung's
``extra`` table; errors it raises should be ``cascade.errors.ProviderError`` subclasses, so the
cascade retries, fails over or escalates as it does for the built-in providers.
"""

from __future__ import annotations

from cascade import Completion, ModelCall, Provider, RungConfig


class ShoutProvider(Provider):
    """Answers with the last user message in capitals, after an optional prefix."""

    name = "shout"

    def __init__(self, rung: RungConfig) -> None:
        self.rung = rung
        self.prefix = str(rung.extra.get("prefix", ""))

    async def complete(self, call: ModelCall) -> Completion:
        question = next(m.content for m in reversed(call.messages) if m.role == "user")
        text = self.prefix + question.upper()
        return Completion(text=text, model=call.model, input_tokens=len(question.split()),
                          output_tokens=len(text.split()), finish_reason="stop")

    async def aclose(self) -> None:
        """Nothing to release: no connections."""
