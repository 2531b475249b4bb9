"""The drift alarm: a sequential test on shadow checks, valid when read after every sample.

For an accepting rung with a tolerated disagreement rate ``D`` (what the suite showed, written
by ``cascade tune``, or ``[policy] drift_max_disagreement``), each shadow check is a coin: 1 when
the top rung disagreed with the accepted answer. The alarm asks whether the rate has risen
credibly above ``D``. It runs CUSUM (Page's test) for several alternatives at once,
``p_j = D + 0.05, 0.1, 0.2, 0.35``: per alternative

    S_j ← max(0, S_j + log(p_j / D))            after a disagreement,
    S_j ← max(0, S_j + log((1 - p_j) / (1 - D)))  after an agreement,

and raises the alarm when some ``S_j ≥ log(J / α)``. While the true rate is at most ``D`` each
CUSUM takes on average at least ``J / α`` checks to cross (Lorden's bound), so with the union
over the ``J = 4`` alternatives false alarms come at most once per ``1 / α`` shadow checks on
average (``[policy] drift_alpha``, default 0.001: one per 1,000 checks). Unlike a test that
accumulates all history, CUSUM forgets a good past at once: a rung that agreed for weeks and
then breaks is caught after a handful of checks. While the alarm is up the mirror test
(alternatives ``p_j = D - …``) runs on the comparisons the climb still makes, and clears it by
the same rule. The state (the statistics, the alarm flag, counts since the last change) lives
in the store, so every worker feeds and sees one test.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import anyio

from cascade.store.base import Counters

__all__ = ["DriftMonitor", "DriftState", "increments"]

log = logging.getLogger("cascade.drift")

_STEPS = (0.05, 0.1, 0.2, 0.35)
"""Alternatives p_j = D ± step: near ones catch small drifts slowly, far ones large drifts
fast; covering all of them costs only log(J) in the threshold."""
_SWAP_TRIES = 50
"""Compare-and-set attempts per shadow result before it is given up (heavy contention)."""
_FLOOR = 0.02
"""D is never taken below 2%: a suite that showed no disagreement at all would otherwise
alarm on the first one."""


def increments(d: float, *, above: bool) -> list[tuple[float, float]]:
    """Per alternative, the CUSUM steps (after a disagreement, after an agreement)."""
    d = min(max(d, _FLOOR), 1 - 1e-6)
    alts = [d + s if above else d - s for s in _STEPS]
    alts = [p for p in alts if 0 < p < 1] or [(1 + d) / 2 if above else d / 2]
    return [(math.log(p / d), math.log((1 - p) / (1 - d))) for p in alts]


@dataclass(frozen=True)
class DriftState:
    """One rung's alarm as every worker sees it."""

    alarm: bool
    samples: int
    """Shadow checks since the alarm last changed."""
    disagreements: int
    max_disagreement: float
    statistic: float = 0.0
    """The largest CUSUM statistic of the running test (alarm at ``threshold``)."""
    threshold: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"alarm": self.alarm, "samples": self.samples,
                "disagreements": self.disagreements, "max_disagreement": self.max_disagreement,
                "statistic": round(self.statistic, 4), "threshold": round(self.threshold, 4)}


class DriftMonitor:
    """Per accepting rung: adds shadow results, raises and clears the alarm, answers "drifted?".

    ``thresholds`` maps a rung label to its tolerated disagreement rate; rungs without one are
    not watched. ``is_drifted`` reads a local copy of the state, refreshed on every shadow
    result here and by :meth:`maybe_refresh`, so the request path does no I/O for it.
    """

    def __init__(self, counters: Counters, *, ladder: str,
                 thresholds: Mapping[str, float], alpha: float = 0.001) -> None:
        self.counters = counters
        self.ladder = ladder
        self.thresholds = dict(thresholds)
        self.alpha = alpha
        self._local: dict[str, DriftState] = {}
        self._refreshed = -math.inf
        self._lock = anyio.Lock()

    def threshold(self, rung: str) -> float:
        """The CUSUM bar for ``rung``: log(J / alpha)."""
        d = self.thresholds[rung]
        return math.log(len(increments(d, above=True)) / self.alpha)

    def _key(self, rung: str) -> str:
        return f"drift:{self.ladder}:{rung}"

    async def _load(self, rung: str) -> dict[str, Any]:
        return self._parse(await self.counters.aget_flag(self._key(rung)))

    @staticmethod
    def _parse(raw: str | None) -> dict[str, Any]:
        return json.loads(raw) if raw else {"alarm": False, "s": [], "n": 0, "k": 0}

    def _state(self, rung: str, st: Mapping[str, Any]) -> DriftState:
        return DriftState(bool(st["alarm"]), int(st["n"]), int(st["k"]), self.thresholds[rung],
                          max(st["s"], default=0.0), self.threshold(rung))

    async def record(self, rung: str, disagreed: bool) -> DriftState | None:
        """Add one shadow result for ``rung``; raise or clear its alarm when the test says so."""
        d = self.thresholds.get(rung)
        if d is None:
            return None
        async with self._lock:  # one update at a time in this process
            key = self._key(rung)
            for _ in range(_SWAP_TRIES):
                raw = await self.counters.aget_flag(key)
                old = self._parse(raw)
                st = self._update(rung, d, old, disagreed)
                # compare-and-set: another worker's update in between is retried on, never
                # overwritten (a lost update would drop samples, or an alarm it raised)
                if await self._swap(key, raw, json.dumps(st)):
                    break
                await anyio.sleep(random.random() * 0.002)  # jitter: no two workers in lockstep
            else:
                log.warning("drift state of rung %s of ladder %s changed under %d tries in a "
                            "row; this shadow check is not counted", rung, self.ladder,
                            _SWAP_TRIES)
                old = st = self._parse(await self.counters.aget_flag(key))
            if bool(st["alarm"]) != bool(old["alarm"]):
                alarm = bool(st["alarm"])
                log.warning(
                    "drift alarm %s for rung %s of ladder %s: %d of %d shadow checks "
                    "disagreed with the top rung since the last change, credibly %s the "
                    "tolerated %.3f%s", "raised" if alarm else "cleared", rung, self.ladder,
                    old["k"] + int(disagreed), old["n"] + 1, "above" if alarm else "below", d,
                    "; its answers escalate (safe mode) until it clears" if alarm else "")
            state = self._state(rung, st)
            self._local[rung] = state
            return state

    async def _swap(self, key: str, expected: str | None, value: str) -> bool:
        swap = getattr(self.counters, "aswap_flag", None)
        if swap is None:  # a Store written before compare-and-set: last writer wins
            await self.counters.aset_flag(key, value)
            return True
        return bool(await swap(key, expected, value))

    def _update(self, rung: str, d: float, st: Mapping[str, Any],
                disagreed: bool) -> dict[str, Any]:
        """The test's state after one more check; pure, so a failed swap just recomputes it."""
        steps = increments(d, above=not st["alarm"])
        s = list(st["s"]) if len(st["s"]) == len(steps) else [0.0] * len(steps)
        s = [max(0.0, x + (up if disagreed else down)) for x, (up, down)
             in zip(s, steps, strict=True)]
        if max(s) >= self.threshold(rung):
            return {"alarm": not st["alarm"], "s": [], "n": 0, "k": 0}
        return {**st, "s": s, "n": st["n"] + 1, "k": st["k"] + int(disagreed)}

    async def refresh(self) -> dict[str, DriftState]:
        """Read every watched rung's state from the store (other workers may have moved it)."""
        for rung in self.thresholds:
            self._local[rung] = self._state(rung, await self._load(rung))
        return dict(self._local)

    async def maybe_refresh(self, now: float, every_s: float = 1.0) -> None:
        """Refresh from the store at most every ``every_s``; a store that fails keeps the
        last known state (the request is served either way)."""
        if not self.thresholds or now - self._refreshed < every_s:
            return
        self._refreshed = now
        try:
            await self.refresh()
        except Exception as e:
            log.warning("could not refresh drift alarms from the store: %s", e)

    def is_drifted(self, rung: str) -> DriftState | None:
        """The rung's state when its alarm is up (local view; no I/O)."""
        s = self._local.get(rung)
        return s if s is not None and s.alarm else None
