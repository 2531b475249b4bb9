"""A third-party verifier plugin: rejects answers shorter than ``min_words`` words."""

from __future__ import annotations

from cascade.trace import Verdict
from cascade.verify import VerifyContext


class MinLengthVerifier:
    """Fails answers with fewer than ``min_words`` words; score is the fraction reached."""

    name = "min_length"
    expensive = False

    def __init__(self, min_words: int = 3) -> None:
        self.min_words = min_words

    def verify(self, ctx: VerifyContext) -> Verdict:
        n = len(ctx.candidate.text.split())
        return Verdict(passed=n >= self.min_words, score=min(1.0, n / self.min_words),
                       reason=f"{n} words (minimum {self.min_words})")
