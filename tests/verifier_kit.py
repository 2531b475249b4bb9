"""Builders for verifier tests: a candidate's context, and a fake model caller (our own seam)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cascade.config import RungConfig
from cascade.messages import Message, Request
from cascade.providers.base import Completion, ModelCall, TokenLogprob
from cascade.trace import Attempt, Verdict
from cascade.verify import Candidate, VerifyContext

RUNG = RungConfig(model="small-model", input_usd_per_mtok=1.0, output_usd_per_mtok=2.0)


def not_idk(ctx: VerifyContext) -> Verdict:
    """Rejects answers that admit not knowing: the content failure that makes the climb go up."""
    ok = "don't know" not in ctx.candidate.text
    return Verdict(passed=ok, reason="has an answer" if ok else "the model does not know")


not_idk.cache_key = "not_idk-v1"  # type: ignore[attr-defined]  # says what it is: cacheable


def completion(text: str, *, model: str = "small-model", input_tokens: int = 20,
               output_tokens: int = 5, **kw: Any) -> Completion:
    return Completion(text=text, model=model, input_tokens=input_tokens,
                      output_tokens=output_tokens, **kw)


def logprobs(*pairs: tuple[str, float], top: Sequence[Mapping[str, float]] = ()
             ) -> tuple[TokenLogprob, ...]:
    tops = list(top) + [{}] * (len(pairs) - len(top))
    return tuple(TokenLogprob(t, lp, tp) for (t, lp), tp in zip(pairs, tops, strict=True))


class FakeCaller:
    """Answers verifier model calls from a script; records each call and the rung it went to."""

    def __init__(self, *replies: str | Completion | Exception,
                 fn: Callable[[ModelCall], Completion] | None = None) -> None:
        self.replies = list(replies)
        self.fn = fn
        self.calls: list[tuple[ModelCall, RungConfig]] = []

    async def __call__(self, call: ModelCall, rung: RungConfig) -> tuple[Completion, float]:
        self.calls.append((call, rung))
        c = self._reply(call)
        return c, rung.cost_usd(c.input_tokens, c.output_tokens)

    def _reply(self, call: ModelCall) -> Completion:
        if self.fn is not None:
            return self.fn(call)
        reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        if isinstance(reply, Exception):
            raise reply
        if isinstance(reply, str):
            return completion(reply, model=call.model, input_tokens=100, output_tokens=10)
        return reply


def make_ctx(
    text: str,
    *,
    prompt: str = "What is the capital of Australia?",
    comp: Completion | None = None,
    attempts: Sequence[Attempt] = (),
    caller: FakeCaller | None = None,
    threshold: float | None = None,
    schema: Mapping[str, Any] | None = None,
    output_type: type[Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    rung: RungConfig = RUNG,
) -> VerifyContext:
    request = Request(messages=(Message("user", prompt),), schema=schema,
                      output_type=output_type, metadata=metadata or {})
    candidate = Candidate(text=text, rung=rung, rung_index=len(attempts),
                          completion=comp or completion(text, finish_reason="stop"))
    return VerifyContext(request=request, candidate=candidate, attempts=attempts,
                         threshold=threshold, _caller=caller)
