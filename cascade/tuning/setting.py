"""A cascade setting: which rungs, in which order, with which thresholds."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from cascade.suite.outcomes import OutcomeTable

__all__ = ["BoolArray", "FloatArray", "IntArray", "Setting", "prune", "scoring_keys"]

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Setting:
    """A cascade over some rungs of a table: thresholds for every rung but the last.

    ``thresholds[p][v]`` is the threshold of scoring verifier ``keys[v]`` at ``chain[p]``;
    ``agree[p]`` (when given) also requires ``chain[p]``'s answer to agree with
    ``chain[p - 1]``'s under ``normaliser`` (the engine's ``agreement`` verifier in mode
    ``previous``: the previous rung that answered in this climb). With ``accept = "any"`` a
    gated rung accepts when its scores pass *or* it agrees: measured for comparison only, the
    engine's policy needs every verdict to pass.
    """

    chain: tuple[int, ...]
    keys: tuple[str, ...] = ()
    thresholds: tuple[tuple[float, ...], ...] = ()
    agree: tuple[bool, ...] = ()
    normaliser: str = ""
    accept: str = "all"

    def gated(self, p: int) -> bool:
        """Whether early position ``p`` uses the agreement gate (never the first rung)."""
        return 0 < p < len(self.agree) and self.agree[p]

    def describe(self, table: OutcomeTable) -> str:
        parts = []
        for p, j in enumerate(self.chain):
            label = table.rungs[j].label
            if p < len(self.thresholds):
                th = ", ".join(f"{k}>={t:.3g}" for k, t in zip(self.keys, self.thresholds[p],
                                                              strict=True)
                               if math.isfinite(t) and not (self.gated(p) and t <= 0.0))
                if self.thresholds[p] and all(t == math.inf for t in self.thresholds[p]):
                    th = "never accepts"
                if self.gated(p):
                    prev = table.rungs[self.chain[p - 1]].label
                    joint = " or " if self.accept == "any" else ", "
                    th = (th + joint if th and th != "never accepts" else "") + \
                        f"agrees with {prev}"
                label += f" [{th or 'never accepts'}]"
            parts.append(label)
        return " → ".join(parts)


def scoring_keys(table: OutcomeTable) -> tuple[str, ...]:
    """The scores a threshold can be tuned on: a column with no value at all (a ladder
    recorded without confidences, ``"confidence": null``) has nothing to tune."""
    return tuple(sorted(k for k, v in table.scores.items() if not np.isnan(v).all()))


def prune(setting: Setting) -> Setting:
    """Drop early rungs that can never accept: they would only add cost. A rung whose answer
    the next rung's agreement gate compares with is a witness and stays."""
    rows = setting.thresholds
    keep = [p for p, row in enumerate(rows)
            if not any(t == math.inf for t in row) or setting.gated(p + 1)]
    agree = tuple(setting.gated(p) and p - 1 in keep for p in keep) if setting.agree else ()
    return replace(setting, chain=tuple(setting.chain[p] for p in keep) + setting.chain[-1:],
                   thresholds=tuple(rows[p] for p in keep),
                   agree=agree if any(agree) else ())

