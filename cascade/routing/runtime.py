"""The router in the climb: before the first call, where the request starts and which rungs it
skips, with the scores and a reason for the trace.

A rung is skipped when the router's probability that its answer is right falls below the rung's
tuned ``skip_below``; the climb starts at the first rung not skipped and never skips the last.
The ``[router]`` table of the config names the file and carries the thresholds::

    [router]
    path = "router.json"              # relative to the config file
    skip_below = [0.62, 0.7, 0.0]     # one per rung; the last rung is never skipped
    unfamiliar_start = 2              # where a request with a system prompt the suite never
                                      # had starts, skipping nothing (default: the last rung)

Why the last guard: across kinds of task the router's scores mean little (tuned on four
benchmarks, routing the fifth cost up to 11 points in ``bench/router.py``), and a new kind of
task comes with its own system prompt.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cascade.errors import ConfigError
from cascade.messages import Message
from cascade.routing.features import system_key
from cascade.routing.model import RouterModel, read_model

__all__ = ["Route", "Router", "load_router"]

_KEYS = ("path", "skip_below", "unfamiliar_start")


@dataclass(frozen=True, slots=True)
class Route:
    """Where a request starts, which later rungs it skips, and why."""

    start: int
    skip: tuple[int, ...]
    scores: tuple[float, ...]
    """Per rung, the router's P(its answer is right)."""
    reason: str


@dataclass(frozen=True)
class Router:
    """A fitted router model with its tuned per-rung thresholds."""

    model: RouterModel
    skip_below: tuple[float, ...]
    source: str = ""
    unfamiliar_start: int = -1
    """Where a request whose system prompt the suite never had starts (-1: the last rung)."""

    @property
    def labels(self) -> tuple[str, ...]:
        return self.model.rungs

    def route(self, messages: Sequence[Message], metadata: Mapping[str, Any]) -> Route:
        """The route of one request. ``metadata`` is accepted for the engine's contract; the
        features come from the messages (suites carry no per-request metadata to learn from)."""
        s: list[float] = self.model.scores(messages).tolist()
        if system_key(messages) not in self.model.systems:
            start = self.unfamiliar_start % len(s)
            return Route(start, (), tuple(s), f"started at rung {start}: router has not seen "
                         "this system prompt (a kind of request unlike the suite's)")
        act = [x >= u for x, u in zip(s, self.skip_below, strict=True)]
        act[-1] = True
        start = act.index(True)
        skip = tuple(j for j in range(start + 1, len(s)) if not act[j])
        return Route(start, skip, tuple(s), self._reason(s, start, skip))

    def _reason(self, s: list[float], start: int, skip: tuple[int, ...]) -> str:
        def why(j: int, op: str) -> str:
            return f"P(rung {j} right) = {s[j]:.2f} {op} {self.skip_below[j]:.2f}"

        if start == 0:
            head = "started at rung 0: router " + (
                why(0, ">=") if len(s) > 1 else "has one rung")
        else:
            head = f"started at rung {start}: router " + ", ".join(
                why(j, "<") for j in range(start))
        if skip:
            head += "; skipped " + ", ".join(why(j, "<") for j in skip)
        return head


def _thresholds(value: Any, n: int, source: str) -> tuple[float, ...]:
    ok = (isinstance(value, list) and len(value) == n
          and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value))
    if not ok:
        raise ConfigError(f"must be a list of {n} numbers, one per rung of the router file",
                          source=source, key="router.skip_below")
    out = tuple(float(x) for x in value)
    # A probability threshold outside [0, 1] (TOML's inf, a typo) is met by no score, or by
    # every one: it silently skips a rung on every request, or never.
    if not all(0.0 <= x <= 1.0 for x in out):  # False for NaN too
        raise ConfigError("must hold probabilities from 0 to 1 (no NaN or inf)",
                          source=source, key="router.skip_below")
    return out


def load_router(table: Mapping[str, Any], *, base_dir: Path | None = None,
                labels: Sequence[str] | None = None, source: str = "config") -> Router:
    """The router a config's ``[router]`` table names. ``labels`` (the ladder's rung labels, in
    climbing order) are checked against the file's; a bad or mismatched file, or a bad table,
    is a :class:`ConfigError` naming it and what is wrong."""
    unknown = sorted(set(table) - set(_KEYS))
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r}; allowed: {', '.join(_KEYS)}",
                          source=source, key=f"router.{unknown[0]}")
    path = table.get("path")
    if not isinstance(path, str) or not path:
        raise ConfigError("must name the router file (a path relative to the config file)",
                          source=source, key="router.path")
    p = Path(path).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    model = read_model(p)
    if labels is not None and tuple(labels) != model.rungs:
        raise ConfigError(f"router file: its rungs {list(model.rungs)} do not match the "
                          f"ladder's {list(labels)}; re-run `cascade tune`", source=str(p))
    skip = _thresholds(table.get("skip_below", [0.0] * len(model.rungs)), len(model.rungs),
                       source)
    k = len(model.rungs)
    start = table.get("unfamiliar_start", k - 1)
    if not isinstance(start, int) or isinstance(start, bool) or not 0 <= start < k:
        raise ConfigError(f"must be a rung index from 0 to {k - 1}", source=source,
                          key="router.unfamiliar_start")
    return Router(model, skip, str(p), start)
