"""A ladder as the engine runs it: the config plus what is built from it once, not per request
— loaded verifiers, the config's part of every cache key, the router, the drift thresholds.

Per-call ``config=`` and ``verifiers=`` get a Ladder of their own (kept, small LRU), never a
whole new Cascade: providers, breakers, store and caller stay shared.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cascade.cache import cache_key
from cascade.config import CascadeConfig, RungConfig, VerifierConfig
from cascade.errors import ConfigError
from cascade.messages import Request
from cascade.plugins import load_verifier
from cascade.secrets import Redactor, secret_envs_of
from cascade.verify import BoundVerifier, Verifier, as_verifier

if TYPE_CHECKING:
    from cascade.routing import Router

__all__ = ["Ladder", "check_verifier_list", "qualname"]


def qualname(obj: Any) -> str:
    """``module.QualName`` of a class, function or instance (for keys and traces)."""
    t = obj if isinstance(obj, type) else type(obj)
    if callable(obj) and not isinstance(obj, type) and hasattr(obj, "__qualname__"):
        t = obj
    return f"{getattr(t, '__module__', '?')}.{getattr(t, '__qualname__', repr(t))}"


def _code_identity(v: Verifier) -> str | None:
    """A code verifier's part of the cache key: its ``cache_key`` attribute, if it has one.

    Two closures of one function (or two instances of a class) can judge differently, and
    nothing outside the object can tell them apart; so a verifier given as code caches only
    when it says what it is. Without one, requests that use it bypass the cache.
    """
    key = getattr(v, "cache_key", None)
    return f"{qualname(v)}:{key}" if isinstance(key, str) and key else None


def check_verifier_list(verifiers: object) -> Sequence[Any]:
    """A ``verifiers=`` argument checked to be a list (one verifier, or a name, is not)."""
    if verifiers is None:
        return ()
    if isinstance(verifiers, (str, bytes, Mapping)) or not isinstance(verifiers, Sequence):
        raise ConfigError("must be a list of verifier objects or functions, not "
                          f"{type(verifiers).__name__}", source="request", key="verifiers")
    return verifiers


class Ladder:
    """One config's rungs, verifiers, cache-key part, router and drift thresholds."""

    def __init__(self, config: CascadeConfig, extra_verifiers: Sequence[Any] | None = None,
                 *, base: Ladder | None = None) -> None:
        """``base``: the ladder this one is a variant of (a request's own ``max_tokens``, say);
        when both name the same router file for the same rungs, its router, loaded with the
        config, is shared rather than read again: the file may since have been rewritten by a
        retune the config has not been reloaded for."""
        self.config = config
        if (base is not None and config.router and config.router == base.config.router
                and config.source == base.config.source
                and [r.label for r in config.rungs] == [r.label for r in base.config.rungs]):
            self.__dict__["router"] = base.router
        self.verifiers: dict[str, tuple[VerifierConfig, Verifier]] = {}
        for i, vc in enumerate(config.verifiers):
            try:
                self.verifiers[vc.key] = (vc, load_verifier(vc, relative_to=config.source))
            except ConfigError as e:  # say which file and table, not only which verifier
                key = f"verifiers[{i}]" + (f".{e.key}" if e.key else "")
                raise type(e)(e.detail, source=config.source, key=key) from None
        self.shadow_agreement: Verifier | None = None
        """What a shadow check compares with (``[policy] shadow_normaliser``), loaded now: a
        bad normaliser failed only after each shadow check's paid top-rung call."""
        if config.policy.shadow_rate > 0:
            try:
                self.shadow_agreement = load_verifier(VerifierConfig(
                    name="agreement", settings={"mode": "previous",
                                                "normaliser": config.policy.shadow_normaliser}),
                    relative_to=config.source)
            except ConfigError as e:
                raise ConfigError(e.detail, source=config.source,
                                  key="policy.shadow_normaliser") from None
        uncacheable: list[str] = []
        for obj in check_verifier_list(extra_verifiers):
            try:
                v = as_verifier(obj)
            except TypeError as e:
                raise ConfigError(str(e), source="request", key="verifiers") from None
            vc = VerifierConfig(name=f"<code>:{v.name}", id=v.name)
            if vc.key in self.verifiers:
                raise ConfigError(f"two verifiers named {v.name!r}; give one another name",
                                  source="request", key="verifiers")
            self.verifiers[vc.key] = (vc, v)
            if _code_identity(v) is None:
                uncacheable.append(v.name)
        self.uncacheable = tuple(uncacheable)
        """Code verifiers without a ``cache_key``: requests on this ladder bypass the cache."""
        self.metadata_keys = tuple(sorted({
            str(k) for _, v in self.verifiers.values()
            for k in getattr(v, "metadata_keys", ()) or ()} | set(config.cache.key_metadata)))
        """Request metadata in the key: what the verifiers read (e.g. the judge's
        ``reference``) and ``[cache] key_metadata`` (``["client"]``: a cache per client)."""
        _ = self.router  # a bad or mismatched router file fails here, not on first traffic

    @functools.cached_property
    def redact(self) -> Redactor:
        """Cuts the config's secrets (keys, store password) from what its climbs record: a
        user verifier's error may quote a key (its own client's URL), and verdict reasons go
        into the trace, the cache entry and the response."""
        return Redactor(secret_envs_of(self.config))

    @functools.cached_property
    def key(self) -> str:
        """The config's part of every cache key (its identity, plus the verifiers given as
        code with their ``cache_key``), hashed once."""
        code = [_code_identity(v) for vc, v in self.verifiers.values()
                if vc.name.startswith("<code>")]
        return cache_key({"config": self.config.identity(), "code": code})

    def request_key(self, request: Request) -> str | None:
        """The cache key of ``request`` on this ladder, or None when it must bypass the cache."""
        if self.uncacheable:
            return None
        meta = {k: request.metadata.get(k) for k in self.metadata_keys}
        parts: dict[str, Any] = {
            "messages": [m.to_dict() for m in request.messages],
            "schema": request.schema,
            "output_type": qualname(request.output_type) if request.output_type else None,
            "metadata": _jsonable(meta),
            "ladder": self.key,
        }
        if request.schema_options:  # only when set: keys cached before stay the same
            parts["schema_options"] = dict(request.schema_options)
        return cache_key(parts)

    def bound(self, rung_index: int) -> list[BoundVerifier]:
        """The verifiers of one rung with the settings, threshold and timeout they run under."""
        cfg = self.config
        rung = cfg.rungs[rung_index]
        ids = rung.verifiers if rung.verifiers is not None else list(self.verifiers)
        out = []
        for vid in ids:
            vc, v = self.verifiers[vid]
            out.append(BoundVerifier(id=vid, verifier=v, settings=dict(vc.settings),
                                     threshold=cfg.threshold(rung, vc), timeout_s=vc.timeout_s))
        return out

    @functools.cached_property
    def router(self) -> Router | None:
        """The tuned router of ``[router]``, loaded once (None when the ladder has none)."""
        table = self.config.router
        if not table:
            return None
        from cascade.routing import load_router  # loaded only when configured

        src = self.config.source
        base = Path(src).parent if not src.startswith("<") else None
        return load_router(table, base_dir=base, labels=[r.label for r in self.config.rungs],
                           source=src)

    @functools.cached_property
    def drift_thresholds(self) -> dict[str, float]:
        """Tolerated disagreement with the top rung per accepting rung: the rung's own value
        (what ``cascade tune`` measured on the suite) wins over ``[policy]``'s default."""
        default = self.config.policy.drift_max_disagreement
        out: dict[str, float] = {}
        for r in self.config.rungs[:-1]:
            own = r.drift_max_disagreement
            if own is not None:
                out[r.label] = own
            elif default is not None:
                out[r.label] = default
        return out

    @functools.cached_property
    def name(self) -> str:
        """A short stable id of the ladder (labels + config hash) for shared counters."""
        h = hashlib.sha256(self.key.encode()).hexdigest()[:10]
        return f"{'>'.join(r.label for r in self.config.rungs)}#{h}"

    def rung(self, i: int) -> RungConfig:
        return self.config.rungs[i]


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))
