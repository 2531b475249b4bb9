"""The drift alarm: a sequential test on shadow checks that is valid however often it is read.

For an accepting rung with a tolerated disagreement rate ``D`` (what the suite showed, written
by ``cascade tune``, or ``[policy] drift_max_disagreement``), each shadow check is a coin: 1 when
the top rung disagreed with the accepted answer. The alarm asks whether the rate is credibly
above ``D``: it keeps a mixture of likelihood-ratio martingales

    E_n = mean_j  (p_j / D)^k · ((1 - p_j) / (1 - D))^(n - k),    p_j > D,

over ``n`` checks with ``k`` disagreements since the last change of state. While the true rate
is at most ``D`` each term is a non-negative supermartingale with mean at most 1, so by Ville's
inequality ``P(E_n ≥ 1/α for some n) ≤ α``: checking after every sample keeps the false-alarm
rate at ``α`` (``[policy] drift_alpha``, default 0.01) per alarm-free stretch. Once raised, the
alarm clears by the mirror test (alternatives ``p_j < D``) on the samples since it was raised.
The state is ``(n, k)`` and a flag, kept in the store, so every worker adds to one test.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cascade.store.base import Counters

__all__ = ["DriftMonitor", "DriftState", "log_evidence"]

log = logging.getLogger("cascade.drift")

_STEPS = (0.05, 0.1, 0.2, 0.35)
"""Alternatives p_j = D ± step (clipped into (0, 1)): near ones detect small drifts slowly, far
ones large drifts fast; the mixture pays only log(len) for covering all of them."""


def log_evidence(n: int, k: int, d: float, *, above: bool) -> float:
    """log E_n for ``k`` disagreements in ``n`` checks against rate ``d`` (above or below it)."""
    d = min(max(d, 1e-6), 1 - 1e-6)
    alts = [d + s if above else d - s for s in _STEPS]
    alts = [p for p in alts if 0 < p < 1] or [(1 + d) / 2 if above else d / 2]
    terms = [k * math.log(p / d) + (n - k) * math.log((1 - p) / (1 - d)) for p in alts]
    top = max(terms)
    return top + math.log(sum(math.exp(t - top) for t in terms) / len(terms))


@dataclass(frozen=True)
class DriftState:
    """One rung's alarm as every worker sees it."""

    alarm: bool
    epoch: int
    samples: int
    disagreements: int
    max_disagreement: float

    def to_dict(self) -> dict[str, Any]:
        return {"alarm": self.alarm, "samples": self.samples,
                "disagreements": self.disagreements, "max_disagreement": self.max_disagreement,
                "epoch": self.epoch}


class DriftMonitor:
    """Per accepting rung: adds shadow results, raises and clears the alarm, answers "drifted?".

    ``thresholds`` maps a rung label to its tolerated disagreement rate; rungs without one are
    watched (counted) but never alarmed. ``is_drifted`` reads a local copy of the flags,
    refreshed on every shadow result and by :meth:`refresh`, so the hot path does no I/O.
    """

    def __init__(self, counters: Counters, *, ladder: str,
                 thresholds: Mapping[str, float], alpha: float = 0.01) -> None:
        self.counters = counters
        self.ladder = ladder
        self.thresholds = dict(thresholds)
        self.alpha = alpha
        self._local: dict[str, DriftState] = {}
        self._refreshed = -math.inf

    def _flag(self, rung: str) -> str:
        return f"drift:{self.ladder}:{rung}:state"

    def _counter(self, rung: str, epoch: int) -> str:
        return f"drift:{self.ladder}:{rung}:{epoch}"

    async def _state(self, rung: str) -> tuple[bool, int]:
        raw = await self.counters.aget_flag(self._flag(rung))
        if not raw:
            return False, 0
        d = json.loads(raw)
        return bool(d.get("alarm")), int(d.get("epoch", 0))

    async def record(self, rung: str, disagreed: bool) -> DriftState:
        """Add one shadow result for ``rung``; raise or clear its alarm when the test says so."""
        alarm, epoch = await self._state(rung)
        counts = await self.counters.aincr(self._counter(rung, epoch),
                                           {"n": 1, "k": int(disagreed)})
        n, k = counts.get("n", 0), counts.get("k", 0)
        d = self.thresholds.get(rung)
        if d is not None:
            bar = math.log(1 / self.alpha)
            if not alarm and log_evidence(n, k, d, above=True) >= bar:
                alarm, epoch, n, k = True, epoch + 1, 0, 0
                log.warning("drift alarm raised for rung %s of ladder %s: %d of %d shadow "
                            "checks disagreed with the top rung, credibly above %.3f; its "
                            "answers escalate until the alarm clears", rung, self.ladder,
                            counts["k"], counts["n"], d)
                await self._set(rung, alarm, epoch)
            elif alarm and log_evidence(n, k, d, above=False) >= bar:
                alarm, epoch, n, k = False, epoch + 1, 0, 0
                log.warning("drift alarm cleared for rung %s of ladder %s: %d of %d shadow "
                            "checks disagreed, credibly below %.3f", rung, self.ladder,
                            counts["k"], counts["n"], d)
                await self._set(rung, alarm, epoch)
        state = DriftState(alarm, epoch, n, k, d if d is not None else math.nan)
        self._local[rung] = state
        return state

    async def _set(self, rung: str, alarm: bool, epoch: int) -> None:
        await self.counters.aset_flag(self._flag(rung),
                                      json.dumps({"alarm": alarm, "epoch": epoch}))

    async def refresh(self) -> dict[str, DriftState]:
        """Read every watched rung's state from the store (other workers may have moved it)."""
        for rung in self.thresholds:
            alarm, epoch = await self._state(rung)
            c = await self.counters.aget(self._counter(rung, epoch))
            self._local[rung] = DriftState(alarm, epoch, c.get("n", 0), c.get("k", 0),
                                           self.thresholds[rung])
        return dict(self._local)

    async def maybe_refresh(self, now: float, every_s: float = 1.0) -> None:
        """Refresh from the store at most every ``every_s`` (another worker may have moved
        an alarm); a store that fails keeps the last known state."""
        if not self.thresholds or now - self._refreshed < every_s:
            return
        self._refreshed = now
        try:
            await self.refresh()
        except Exception as e:  # the store is down: keep serving on the last known state
            log.warning("could not refresh drift alarms from the store: %s", e)

    def is_drifted(self, rung: str) -> DriftState | None:
        """The rung's state when its alarm is up (local view; no I/O)."""
        s = self._local.get(rung)
        return s if s is not None and s.alarm else None
