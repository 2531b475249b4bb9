"""The verifier protocol and the runner that applies a rung's verifiers to a candidate.

A verifier is an object with ``name``, an optional ``expensive`` flag and an async (or sync)
``verify(ctx) -> Verdict``; a plain function ``fn(ctx) -> Verdict | bool`` works too. Verifiers of
one rung run concurrently in an anyio task group; cheap ones run first and, when one rejects,
the expensive ones are skipped. A verifier that raises or times out yields a failed verdict.
A sync ``verify`` runs in a worker thread, so its ``timeout_s`` holds and it never blocks the
event loop (after a timeout its thread is abandoned and finishes on its own).

This module is the whole surface a verifier needs: it re-exports the types a verifier builds
(``Verdict``, ``ModelCall``, ``Message``, ``RungConfig`` and ``parse_rung`` for a verifier's own
endpoint, ``ConfigError``) and ``import_object`` for dotted-path settings, so ``verifiers/``
depends on this protocol (and ``cascade.text``) only.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import anyio

from cascade.config import RungConfig, parse_rung
from cascade.dotted import import_object
from cascade.errors import ConfigError
from cascade.messages import Message, Request
from cascade.providers.base import Completion, ModelCall, TokenLogprob
from cascade.trace import Attempt, Verdict

__all__ = [
    "BoundVerifier",
    "Candidate",
    "Completion",
    "ConfigError",
    "FunctionVerifier",
    "Message",
    "ModelCall",
    "ModelCaller",
    "RungConfig",
    "TokenLogprob",
    "Verdict",
    "Verifier",
    "VerifyContext",
    "apply_threshold",
    "as_verifier",
    "implements_verifier",
    "import_object",
    "parse_rung",
    "run_verifiers",
]


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """The answer of the current rung, as the verifiers see it."""

    text: str
    rung: RungConfig
    rung_index: int
    completion: Completion
    parsed: Any = None
    """Set by a schema verifier (or structured output) when the text parsed."""


ModelCaller = Callable[[ModelCall, RungConfig], Awaitable[tuple[Completion, float]]]
"""Makes a model call through the engine (retries, breaker, pricing) for a verifier: the reply
and what it cost at the endpoint that answered (a failover may land on a fallback dearer than
the rung asked for)."""


@dataclass(kw_only=True)
class VerifyContext:
    """What a verifier receives: the request, the candidate, the climb so far, and a model caller.

    ``call_model`` charges the call to this verifier: its tokens and cost land in the verdict and
    in the answer's total, so a paid verifier is never free in the report.
    """

    request: Request
    candidate: Candidate
    attempts: Sequence[Attempt]
    """Earlier rungs of this climb, in order (for agreement with an earlier answer)."""
    settings: dict[str, Any] = field(default_factory=dict)
    threshold: float | None = None
    _caller: ModelCaller | None = None
    cost_usd: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    shared: dict[str, Any] = field(default_factory=dict)
    """Scratch space shared by the verifiers of one rung (e.g. the parsed object)."""

    async def call_model(self, call: ModelCall, rung: RungConfig | None = None) -> Completion:
        """Call ``rung`` (default: the candidate's own rung) and charge it to this verifier."""
        if self._caller is None:
            raise RuntimeError("this VerifyContext has no model caller")
        c, cost = await self._caller(call, rung or self.candidate.rung)
        self.input_tokens += c.input_tokens
        self.output_tokens += c.output_tokens
        self.cost_usd += cost
        return c


@runtime_checkable
class Verifier(Protocol):
    """The plugin protocol. ``expensive`` verifiers (model calls) run after the cheap ones."""

    name: str
    expensive: bool

    def verify(self, ctx: VerifyContext) -> Verdict | Awaitable[Verdict]: ...


VerifyFn = Callable[[VerifyContext], "Verdict | bool | Awaitable[Verdict | bool]"]


class FunctionVerifier:
    """Adapts a plain function (sync or async, returning a Verdict or a bool) to the protocol;
    a sync one runs in a worker thread, like a sync ``verify`` method."""

    def __init__(self, fn: VerifyFn, *, name: str | None = None, expensive: bool = False) -> None:
        self.fn = fn
        self.name: str = name or str(getattr(fn, "__name__", "function"))
        self.expensive = expensive
        # what the function declares of itself is the verifier's: the metadata it reads
        # (the cache key's part) and its cache_key
        self.metadata_keys: tuple[str, ...] = tuple(getattr(fn, "metadata_keys", ()) or ())
        self.cache_key: str | None = getattr(fn, "cache_key", None)

    async def verify(self, ctx: VerifyContext) -> Verdict:
        result = await _call(self.fn, ctx)
        return _as_verdict(result, self.name)


async def _call(fn: Callable[[VerifyContext], Any], ctx: VerifyContext) -> Any:
    """Await an async ``fn``; run a sync one in a worker thread, abandoned when cancelled."""
    if inspect.iscoroutinefunction(fn):
        return await fn(ctx)
    result = await anyio.to_thread.run_sync(fn, ctx, abandon_on_cancel=True)
    if inspect.isawaitable(result):  # a sync function that returned a coroutine
        result = await result
    return result


def _as_verdict(result: object, name: str) -> Verdict:
    """A verifier's return value as a Verdict: a bool is accepted, anything else is a bug."""
    if isinstance(result, bool):
        return Verdict(passed=result, reason="passed" if result else "rejected")
    if not isinstance(result, Verdict):
        raise TypeError(f"verifier {name!r} returned {type(result).__name__}, "
                        "expected a Verdict or a bool")
    return result


def implements_verifier(obj: Any) -> bool:
    """Whether ``obj`` is a verifier class, or an instance of one, by the protocol's shape: a
    ``verify`` method taking the context alone."""
    cls = obj if inspect.isclass(obj) else type(obj)
    verify = inspect.getattr_static(cls, "verify", None)
    if not callable(verify):
        return False
    try:
        params = list(inspect.signature(verify).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                  inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    required_rest = [p for p in params[len(positional):] if p.default is inspect.Parameter.empty
                     and p.kind is inspect.Parameter.KEYWORD_ONLY]
    return len(positional) == 2 and not required_rest  # (self, ctx)


def as_verifier(obj: Any, *, name: str | None = None) -> Verifier:
    """Accept a verifier object or a plain function."""
    if isinstance(obj, Verifier):
        return obj
    if hasattr(obj, "verify") and callable(obj.verify):
        if not hasattr(obj, "expensive"):
            obj.expensive = False
        if not hasattr(obj, "name"):
            obj.name = name or type(obj).__name__
        return obj  # type: ignore[no-any-return]
    if callable(obj):
        return FunctionVerifier(obj, name=name)
    raise TypeError(f"{obj!r} is not a verifier: give an object with verify(ctx) or a function")


@dataclass(frozen=True, kw_only=True)
class BoundVerifier:
    """A verifier with the id, settings, threshold and timeout it runs under at one rung."""

    id: str
    verifier: Verifier
    settings: dict[str, Any] = field(default_factory=dict)
    threshold: float | None = None
    timeout_s: float = 30.0


def apply_threshold(v: Verdict, threshold: float | None) -> Verdict:
    """The policy's rule for one verdict: a configured threshold decides on the score."""
    if threshold is None or v.score is None or v.skipped:
        return v
    if math.isnan(v.score):
        return replace(v, passed=False, reason=f"{v.reason}; score is NaN")
    passed = v.score >= threshold
    cmp = ">=" if passed else "<"
    return replace(v, passed=passed, reason=f"{v.reason} (score {v.score:.3f} {cmp} {threshold:g})")


async def _run_one(bv: BoundVerifier, make_ctx: Callable[[BoundVerifier], VerifyContext]
                   ) -> Verdict:
    ctx = make_ctx(bv)
    try:
        if getattr(bv.verifier, "inline", False):
            # A built-in check bounded by the reply size cap (a regex, a schema): no thread hop.
            result = bv.verifier.verify(ctx)
            if inspect.isawaitable(result):
                with anyio.fail_after(bv.timeout_s):
                    result = await result
        else:
            with anyio.fail_after(bv.timeout_s):
                result = await _call(bv.verifier.verify, ctx)
        result = _as_verdict(result, bv.id)
        if result.score is not None and not (0.0 <= result.score <= 1.0):
            raise ValueError(f"score {result.score} is outside [0, 1]")
        verdict = result
    except TimeoutError:
        verdict = Verdict(passed=False, reason=f"timed out after {bv.timeout_s:g}s")
    except Exception as e:  # a plugin bug must not crash the climb: it becomes a failed verdict
        verdict = Verdict(passed=False, reason=f"verifier crashed: {type(e).__name__}: {e}")
    verdict = replace(
        verdict,
        verifier=bv.id,
        cost_usd=verdict.cost_usd + ctx.cost_usd,
        input_tokens=verdict.input_tokens + ctx.input_tokens,
        output_tokens=verdict.output_tokens + ctx.output_tokens,
    )
    return apply_threshold(verdict, bv.threshold)


async def run_verifiers(
    bound: Sequence[BoundVerifier],
    make_ctx: Callable[[BoundVerifier], VerifyContext],
    *,
    short_circuit: bool = True,
    redact: Callable[[str], str] | None = None,
) -> list[Verdict]:
    """Run ``bound`` verifiers: cheap ones concurrently first, then the expensive ones.

    Verdicts come back in configuration order, so traces read the same every time; with
    ``redact``, their reasons pass through it (a crashed plugin's error may quote a secret).
    """
    results: dict[int, Verdict] = {}

    async def stage(indices: list[int]) -> None:
        if len(indices) == 1:  # no task group (and no task) for a lone verifier
            results[indices[0]] = await _run_one(bound[indices[0]], make_ctx)
            return

        async def one(i: int) -> None:
            results[i] = await _run_one(bound[i], make_ctx)

        async with anyio.create_task_group() as tg:
            for i in indices:
                tg.start_soon(one, i)

    cheap = [i for i, b in enumerate(bound) if not getattr(b.verifier, "expensive", False)]
    dear = [i for i, b in enumerate(bound) if getattr(b.verifier, "expensive", False)]
    if short_circuit and cheap and dear:
        await stage(cheap)
        if not all(results[i].passed for i in cheap):
            for i in dear:
                results[i] = Verdict(passed=False, skipped=True, verifier=bound[i].id,
                                     reason="skipped: a cheaper verifier already rejected")
        else:
            await stage(dear)
    else:
        await stage(cheap + dear)
    verdicts = [results[i] for i in range(len(bound))]
    if redact is not None:
        verdicts = [v if (r := redact(v.reason)) == v.reason else replace(v, reason=r)
                    for v in verdicts]
    return verdicts
