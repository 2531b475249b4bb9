"""The agreement verifier: trust an answer that other answers agree with.

``previous``
    Compares the candidate with the latest earlier rung that produced text. Two different models
    agreeing is good evidence; disagreement sends the question up. At the first rung there is
    nothing to compare with, and failing there would make every climb skip rung 0, so by default
    the verifier *abstains*: ``passed=True``, ``score=None`` and a reason saying so (a configured
    threshold does not apply to a verdict without a score). Set ``no_previous = "fail"`` to
    force a second opinion, i.e. never accept the first rung on this verifier alone. Use it on
    upper rungs via the rung's ``verifiers`` list.

``samples``
    Self-consistency: draws ``samples`` more answers from the same rung at ``temperature`` and
    scores the fraction that agree with the candidate. Passes at ``min_agreement``. Costs
    ``samples`` model calls, charged to the verdict.

Answers are compared after a normaliser: ``exact``, ``normalised`` (case, white space,
punctuation, articles; signs and operators such as "-5" or "x < 5" still count), ``numeric``
(the answer's number, within ``tolerance``), ``choice`` (a multiple-choice letter), or
``package.module:function`` returning a comparable value or None. An empty answer agrees with
nothing.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, Literal

import anyio

from cascade.text import NORMALISERS, Normaliser, same_answer
from cascade.verify import (
    Completion,
    ConfigError,
    ModelCall,
    Verdict,
    VerifyContext,
    import_object,
)

__all__ = ["AgreementVerifier"]

class AgreementVerifier:
    """Passes when other answers (an earlier rung's, or fresh samples) agree with the candidate."""

    def __init__(
        self,
        mode: Literal["previous", "samples"] = "previous",
        samples: int = 3,
        normaliser: str = "normalised",
        min_agreement: float = 0.5,
        *,
        temperature: float = 0.7,
        tolerance: float = 1e-6,
        no_previous: Literal["abstain", "fail"] = "abstain",
        name: str = "agreement",
    ) -> None:
        where = f"verifier {name!r}"
        if mode not in ("previous", "samples"):
            raise ConfigError(f"is {mode!r}; allowed: previous, samples", source=where,
                              key="mode")
        if no_previous not in ("abstain", "fail"):
            raise ConfigError(f"is {no_previous!r}; allowed: abstain, fail", source=where,
                              key="no_previous")
        if mode == "samples" and samples < 1:
            raise ConfigError(f"must be >= 1, got {samples}", source=where, key="samples")
        if not 0.0 <= min_agreement <= 1.0:
            raise ConfigError(f"must be in [0, 1], got {min_agreement}", source=where,
                              key="min_agreement")
        if mode == "samples" and temperature <= 0.0:
            raise ConfigError("must be > 0 for samples to differ", source=where,
                              key="temperature")
        self.name = name
        self.mode = mode
        self.samples = samples
        self.min_agreement = min_agreement
        self.temperature = temperature
        self.tolerance = tolerance
        self.no_previous = no_previous
        self.normaliser_name = normaliser
        self.normalise = _load_normaliser(normaliser, where)
        self.expensive = mode == "samples"

    async def verify(self, ctx: VerifyContext) -> Verdict:
        mine = self.normalise(ctx.candidate.text)
        if mine is None or mine == "":  # nothing to agree on: two blank answers are no evidence
            return Verdict(passed=False, score=0.0, reason="the candidate has no "
                           f"{self.normaliser_name} answer to compare")
        if self.mode == "previous":
            return self._against_previous(ctx, mine)
        return await self._against_samples(ctx, mine)

    def _against_previous(self, ctx: VerifyContext, mine: Hashable) -> Verdict:
        earlier = next((a for a in reversed(ctx.attempts) if a.text is not None), None)
        if earlier is None:
            if self.no_previous == "fail":
                return Verdict(passed=False, reason="no earlier answer to compare with")
            return Verdict(passed=True, reason="abstained: no earlier answer to compare with")
        theirs = self.normalise(earlier.text or "")
        agree = same_answer(mine, theirs, tolerance=self.tolerance)
        who = f"rung {earlier.rung} ({earlier.model})"
        if agree:
            return Verdict(passed=True, score=1.0, reason=f"agrees with {who}: {mine!r}")
        return Verdict(passed=False, score=0.0,
                       reason=f"disagrees with {who}: {mine!r} vs {theirs!r}")

    async def _against_samples(self, ctx: VerifyContext, mine: Hashable) -> Verdict:
        rung = ctx.candidate.rung
        call = ModelCall(model=rung.model, messages=ctx.request.messages,
                         max_tokens=rung.max_tokens, temperature=self.temperature,
                         timeout_s=rung.timeout_s, extra=rung.extra)
        replies: list[Completion | Exception | None] = [None] * self.samples

        async def draw(i: int) -> None:
            try:
                replies[i] = await ctx.call_model(call)
            except Exception as e:  # one failed sample should not void the others
                replies[i] = e

        async with anyio.create_task_group() as tg:
            for i in range(self.samples):
                tg.start_soon(draw, i)
        texts = [r.text for r in replies if isinstance(r, Completion)]
        errors = [r for r in replies if isinstance(r, Exception)]
        if not texts:
            raise errors[0]  # every sample failed: the runner reports it as a crashed verifier
        agreeing = sum(same_answer(mine, self.normalise(t), tolerance=self.tolerance)
                       for t in texts)
        score = agreeing / len(texts)
        threshold = ctx.threshold if ctx.threshold is not None else self.min_agreement
        failed = self.samples - len(texts)
        note = f" ({failed} sample(s) failed)" if failed else ""
        return Verdict(passed=score >= threshold, score=score,
                       reason=f"{agreeing}/{len(texts)} samples agree on {mine!r}{note}")


def _load_normaliser(spec: str, where: str) -> Normaliser:
    if spec in NORMALISERS:
        return NORMALISERS[spec]
    if ":" not in spec:
        raise ConfigError(f"is {spec!r}; allowed: {', '.join(NORMALISERS)} or "
                          "'package.module:function'", source=where, key="normaliser")
    try:
        fn: Any = import_object(spec, kind="normaliser", source=where, key="normaliser")
    except ImportError as e:
        raise ConfigError(f"cannot import {spec!r}: {e}", source=where, key="normaliser") from None
    if not callable(fn):
        raise ConfigError(f"{spec!r} is not callable", source=where, key="normaliser")
    return fn  # type: ignore[no-any-return]
