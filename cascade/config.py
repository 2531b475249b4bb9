"""Reading a configuration: TOML or dicts validated into :mod:`cascade.settings`.

Loaded from TOML (``cascade.toml``, ``$CASCADE_CONFIG`` or an explicit path) or built from dicts.
Every error names the source, the key and what is allowed. The setting types are re-exported
here, so ``from cascade.config import RungConfig`` keeps working.
"""

from __future__ import annotations

import math
import os
import tomllib
import urllib.parse
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from cascade.errors import ConfigError
from cascade.prices import lookup_price
from cascade.secrets import check_env_name, has_userinfo, mask_credentials
from cascade.settings import (
    DEFAULT_MAX_REPLY_BYTES,
    STRUCTURED_BY_KIND,
    STRUCTURED_OUTPUTS,
    TRANSPORTS,
    BreakerConfig,
    BudgetConfig,
    CacheConfig,
    CascadeConfig,
    PolicyConfig,
    RetryConfig,
    RungConfig,
    VerifierConfig,
)

__all__ = [
    "DEFAULT_MAX_REPLY_BYTES",
    "STRUCTURED_OUTPUTS",
    "BreakerConfig",
    "BudgetConfig",
    "CacheConfig",
    "CascadeConfig",
    "PolicyConfig",
    "RetryConfig",
    "RungConfig",
    "VerifierConfig",
    "check_cap",
    "find_config_file",
    "load_config",
    "parse_config",
    "parse_rung",
]


# ---------------------------------------------------------------- parsing

_RUNG_KEYS = {f for f in RungConfig.__dataclass_fields__}
_TOP_KEYS = {
    "rungs", "verifiers", "policy", "cache", "retry", "breaker", "budget", "max_cost_usd",
    "timeout_s", "server", "store", "router",
}


def _expect(value: Any, kind: type | tuple[type, ...], what: str, source: str, key: str) -> Any:
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise ConfigError(f"must be {what}, not a boolean", source=source, key=key)
    if not isinstance(value, kind):
        raise ConfigError(
            f"must be {what}, not {type(value).__name__} {value!r}", source=source, key=key
        )
    return value


def _number(d: Mapping[str, Any], k: str, source: str, prefix: str, *, minimum: float = 0.0,
            integer: bool = False) -> Any:
    key = f"{prefix}{k}"
    v = _expect(d[k], int if integer else (int, float), "an integer" if integer else "a number",
                source, key)
    if not math.isfinite(v) or v < minimum:
        raise ConfigError(f"must be a finite number >= {minimum}, got {v}", source=source,
                          key=key)
    return v if integer else float(v)


def _unit(d: Mapping[str, Any], k: str, source: str, prefix: str) -> float:
    """A score threshold: a finite number in [0, 1] (NaN would pass nothing, 7 nothing ever)."""
    v: float = _number(d, k, source, prefix)
    if v > 1.0:
        raise ConfigError(f"must be in [0, 1], got {v}", source=source, key=f"{prefix}{k}")
    return v


def _threshold(d: Mapping[str, Any], k: str, source: str, prefix: str) -> float:
    """A rung's threshold: as :func:`_unit`, or ``inf``, which no score reaches: the rung never
    accepts and answers only for the next rung's agreement gate (a witness, as ``cascade tune
    --agreement all`` may write)."""
    if d[k] == math.inf and not isinstance(d[k], bool):
        return math.inf
    return _unit(d, k, source, prefix)


_HTTP_KINDS = ("openai", "anthropic", "openai-compatible")
"""Provider kinds whose ``base_url`` is an HTTP URL (replay reads a path there)."""
MAX_ATTEMPTS = 20
"""More calls than this per endpoint only turns an outage into a hang."""


def _check_url(url: str, source: str, key: str) -> None:
    """An http(s) URL without a query string: that is where a key gets pasted, and it never
    works (the SDKs append the API path after the query). User info (a basic-auth proxy's)
    is allowed; traces show it masked, as errors show the URL."""
    parts = urllib.parse.urlsplit(url)
    shown = mask_credentials(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"is {shown!r}, not an http(s) URL; e.g. http://127.0.0.1:8000/v1",
                          source=source, key=key)
    if parts.query:
        raise ConfigError(f"is {shown!r}, with a query string, which the SDKs do not send as "
                          "given (the API path is appended after it); a key goes in the "
                          "variable api_key_env names", source=source, key=key)


_BODY_FIELDS = {
    "openai": frozenset({"model", "messages", "max_tokens", "max_completion_tokens", "stream",
                         "n"}),
    "anthropic": frozenset({"model", "messages", "max_tokens", "stream", "system"}),
}
"""Request fields a built-in kind sets from the rung itself. ``extra`` is merged over the
body, so one of these there would silently replace the rung's value: a larger token limit
than the cost caps were estimated with, another model than the one priced, a stream the
provider cannot read."""
_BODY_FIELDS["openai-compatible"] = _BODY_FIELDS["openai"]
_VENDOR_ROOT = {"anthropic": ("api.anthropic.com", "/v1")}
"""A path the kind's SDK adds itself: the vendor's own URL ending in it doubles it
(/v1/v1/..., a 404). Only the vendor's host is refused: a gateway may document a ``.../v1``
base URL for this SDK and expect the doubled path."""


def _check_rung(rung: RungConfig, source: str, prefix: str) -> None:
    """What a finished rung (or fallback, after inheriting) must not hold: ``extra`` fields
    that override the rung's own, a base_url whose last segment the SDK adds again."""
    clash = sorted(set(rung.extra) & _BODY_FIELDS.get(rung.provider, frozenset()))
    if clash:
        k = clash[0]
        raise ConfigError(f"{k!r} is sent from the rung's own settings and cannot be "
                          f"overridden through extra for provider {rung.provider!r}"
                          + ("; set the rung's max_tokens" if "tokens" in k else ""),
                          source=source, key=f"{prefix}extra.{k}")
    vendor = _VENDOR_ROOT.get(rung.provider)
    if rung.base_url and vendor:
        host, root = vendor
        url = urllib.parse.urlsplit(rung.base_url)
        if (url.hostname or "").lower() == host and url.path.rstrip("/").endswith(root):
            raise ConfigError(f"is {rung.base_url!r}: the {rung.provider} SDK adds "
                              f"{root}/... itself, so drop the trailing {root}",
                              source=source, key=prefix + "base_url")


def _check_kind(rung: RungConfig, d: Mapping[str, Any], source: str, prefix: str, *,
                inherited: bool) -> None:
    """What the rung's provider would refuse when built: at its first call, mid-request for a
    fallback (a bare error, no failover). A fallback is checked after inheriting, so a value
    valid for its rung's kind but not its own is named here, with the fix."""
    def whence(k: str) -> str:
        return (f" (inherited from the rung: set this fallback's own {k})"
                if inherited and k not in d else "")

    allowed = STRUCTURED_BY_KIND.get(rung.provider)
    mode = rung.structured_output
    if allowed is not None and mode is not None and mode not in allowed:
        raise ConfigError(f"is {mode!r}{whence('structured_output')}, "
                          f"which the {rung.provider} provider cannot send; allowed for "
                          f"{rung.provider}: {', '.join(allowed)}", source=source,
                          key=prefix + "structured_output")
    if rung.provider == "local" and inherited and "model" not in d:
        # A vendor rung's model name (gpt-4o-mini) is no local model. Only here: the local
        # provider's module imports the OpenAI SDK (most of a second).
        from cascade.providers.local import check_model_name

        try:
            check_model_name(rung.model)
        except ConfigError as e:
            raise ConfigError(e.detail + whence("model"), source=source,
                              key=prefix + "model") from None


def parse_rung(d: Mapping[str, Any], *, source: str = "<config>", prefix: str = "rungs[0].",
               inherit: RungConfig | None = None) -> RungConfig:
    """Build a rung from a TOML table, validating every key; with ``inherit``, one of that
    rung's fallbacks, validated after inheriting as a rung of its own kind."""
    _expect(d, Mapping, "a table", source, prefix.rstrip("."))
    unknown = set(d) - _RUNG_KEYS
    if unknown:
        raise ConfigError(
            f"unknown key(s) {sorted(unknown)}; allowed: {sorted(_RUNG_KEYS)}",
            source=source, key=prefix + sorted(unknown)[0],
        )
    if inherit is not None and "fallbacks" in d:
        # Failover walks the rung's own list only: these would be validated, then never tried.
        raise ConfigError("fallbacks do not nest: list every endpoint in the rung's own "
                          "fallbacks", source=source, key=prefix + "fallbacks")
    if inherit is None and "model" not in d:
        raise ConfigError("is required (the model name to call)", source=source,
                          key=prefix + "model")
    kw: dict[str, Any] = {}
    for k in ("model", "base_url", "api_key_env", "name"):
        if k in d:
            kw[k] = _expect(d[k], str, "a string", source, prefix + k)
            if k == "model" and not kw[k].strip():
                raise ConfigError("must not be empty", source=source, key=prefix + k)
            if k == "api_key_env":
                check_env_name(kw[k], source=source, key=prefix + k)
    if "provider" in d:
        p = _expect(d["provider"], str, "a provider name", source, prefix + "provider")
        from cascade.providers import has_provider, known_providers  # they need RungConfig

        if not has_provider(p):
            raise ConfigError(f"is {p!r}; allowed: {', '.join(known_providers())}",
                              source=source, key=prefix + "provider")
        kw["provider"] = p
    for k in ("input_usd_per_mtok", "output_usd_per_mtok", "temperature"):
        if k in d:
            kw[k] = _number(d, k, source, prefix)
    if "timeout_s" in d:
        kw["timeout_s"] = _number(d, "timeout_s", source, prefix, minimum=0.001)
    if "max_tokens" in d:
        kw["max_tokens"] = _number(d, "max_tokens", source, prefix, minimum=1, integer=True)
    if "drift_max_disagreement" in d:
        kw["drift_max_disagreement"] = _number(d, "drift_max_disagreement", source, prefix)
        if kw["drift_max_disagreement"] > 1:
            raise ConfigError("must be a rate in [0, 1]", source=source,
                              key=prefix + "drift_max_disagreement")
    if "max_retries" in d:
        kw["max_retries"] = _number(d, "max_retries", source, prefix, integer=True)
        if kw["max_retries"] > MAX_ATTEMPTS - 1:
            raise ConfigError(f"must be at most {MAX_ATTEMPTS - 1}, got {kw['max_retries']}",
                              source=source, key=prefix + "max_retries")
    for k in ("logprobs", "check_model"):
        if k in d:
            kw[k] = _expect(d[k], bool, "true or false", source, prefix + k)
    if "stop" in d:
        stops = _expect(d["stop"], list, "a list of strings", source, prefix + "stop")
        kw["stop"] = tuple(_expect(s, str, "a non-empty string", source, f"{prefix}stop[{i}]")
                           for i, s in enumerate(stops))
        if not all(kw["stop"]):
            raise ConfigError("must not hold an empty string", source=source, key=prefix + "stop")
    if "verifiers" in d:
        vs = _expect(d["verifiers"], list, "a list of verifier ids", source, prefix + "verifiers")
        kw["verifiers"] = tuple(
            _expect(v, str, "a verifier id", source, f"{prefix}verifiers[{i}]")
            for i, v in enumerate(vs)
        )
    if "thresholds" in d:
        th = _expect(d["thresholds"], Mapping, "a table of verifier id = number", source,
                     prefix + "thresholds")
        kw["thresholds"] = {str(k): _threshold(th, k, source, f"{prefix}thresholds.")
                            for k in th}
    if "extra" in d:
        kw["extra"] = dict(_expect(d["extra"], Mapping, "a table", source, prefix + "extra"))
    if "structured_output" in d:
        mode = _expect(d["structured_output"], str, "a string", source,
                       prefix + "structured_output")
        if mode not in STRUCTURED_OUTPUTS:
            raise ConfigError(f"is {mode!r}; allowed: {', '.join(STRUCTURED_OUTPUTS)}",
                              source=source, key=prefix + "structured_output")
        kw["structured_output"] = mode
    if "transport" in d:
        how = _expect(d["transport"], str, "a string", source, prefix + "transport")
        if how not in TRANSPORTS:
            raise ConfigError(f"is {how!r}; allowed: {', '.join(TRANSPORTS)}", source=source,
                              key=prefix + "transport")
        kw["transport"] = how
    if "max_reply_bytes" in d:
        kw["max_reply_bytes"] = _number(d, "max_reply_bytes", source, prefix, minimum=1024,
                                        integer=True)
    if inherit is not None and kw.get("provider", inherit.provider) != inherit.provider and (
            "base_url" not in d):
        # Another kind is another endpoint: the rung's URL speaks the rung's protocol (a vLLM
        # URL under an `openai` fallback sent it, and OPENAI_API_KEY, to the vLLM host).
        kw["base_url"] = None
    rung = replace(inherit, fallbacks=(), **kw) if inherit is not None else RungConfig(**kw)
    if inherit is not None and "api_key_env" not in d and (
            rung.provider, rung.base_url) != (inherit.provider, inherit.base_url):
        # A key belongs to its endpoint: a fallback elsewhere names its own (or sends none).
        rung = replace(rung, api_key_env=None)
    if rung.provider == "openai-compatible" and not rung.base_url:
        raise ConfigError("is required when provider = 'openai-compatible'", source=source,
                          key=prefix + "base_url")
    if rung.base_url and rung.provider in _HTTP_KINDS:
        _check_url(rung.base_url, source, prefix + "base_url")
        if rung.transport == "aiohttp" and has_userinfo(rung.base_url):
            raise ConfigError("is 'aiohttp', which refuses the user info in base_url beside "
                              "the SDK's Authorization header (every call would fail): use "
                              "'auto' or 'httpx'", source=source, key=prefix + "transport")
        if rung.api_key_env and has_userinfo(rung.base_url):
            # the HTTP client sends the user info as Basic auth, over the SDK's bearer key
            raise ConfigError(f"is {rung.api_key_env!r}, but base_url carries user:password@, "
                              "which is sent as HTTP Basic auth in place of the key's "
                              "'Authorization: Bearer': the key would never be sent. Keep "
                              "one (a proxy that adds the key itself needs no api_key_env)",
                              source=source, key=prefix + "api_key_env")
    _check_rung(rung, source, prefix)
    _check_kind(rung, d, source, prefix, inherited=inherit is not None)
    # Priced before its fallbacks are read: they bill like the rung unless they say otherwise,
    # and a price from the built-in table is the rung's price too (not a silent $0).
    rung = _priced(rung, d, source, prefix, parent=inherit)
    if "fallbacks" in d:
        fbs = _expect(d["fallbacks"], list, "a list of tables", source, prefix + "fallbacks")
        rung = replace(rung, fallbacks=tuple(
            parse_rung(fb, source=source, prefix=f"{prefix}fallbacks[{i}].", inherit=rung)
            for i, fb in enumerate(fbs)
        ))
    return rung


_FREE_KINDS = ("local",)
"""Provider kinds whose price is known to be zero: the model runs on this machine."""
_PRICE_KEYS = ("input_usd_per_mtok", "output_usd_per_mtok")


def _half_priced(rung: RungConfig, given: str, source: str, prefix: str, *,
                 parent: RungConfig | None) -> RungConfig:
    """One price given: the other is the built-in table's for the model (a fallback of its
    rung's own model keeps the rung's, as it inherits both). Anything else would be a silent
    $0 on half the tokens, so the other must be given too."""
    missing = _PRICE_KEYS[1 - _PRICE_KEYS.index(given)]
    if rung.provider in _FREE_KINDS:  # known to cost nothing: the other is 0 too
        free: dict[str, Any] = {missing: 0.0}
        return replace(rung, price=None, **free)
    if parent is not None and rung.model == parent.model and parent.price_known:
        return replace(rung, price=None)  # the other inherited with the rest of the rung
    price = lookup_price(rung.model)
    if price is not None:
        other: dict[str, Any] = {missing: price[_PRICE_KEYS.index(missing)]}
        return replace(rung, price=None, **other)
    why = " and its rung's price is unknown" if parent is not None and (
        rung.model == parent.model) else ""
    raise ConfigError(f"is required with {given}: model {rung.model!r} is not in the built-in "
                      f"price table (cascade/prices.py){why}, so nothing else gives it; set "
                      "both (0 for a free endpoint)", source=source, key=prefix + missing)


def _priced(rung: RungConfig, d: Mapping[str, Any], source: str, prefix: str, *,
            parent: RungConfig | None) -> RungConfig:
    """One rule: every rung has a price, from its config, the built-in table, or an explicit
    ``price = "unknown"``. A silent $0 would let every cap and budget pass unnoticed. A
    fallback (``parent`` given) bills like its rung unless it says otherwise, or names another
    model that the table prices. One price alone: see :func:`_half_priced`."""
    given = [k for k in _PRICE_KEYS if k in d]
    explicit = bool(given)
    if "price" in d:
        if d["price"] != "unknown":
            raise ConfigError(f"is {d['price']!r}; the only value is \"unknown\" (give a known "
                              "price with input_usd_per_mtok/output_usd_per_mtok)",
                              source=source, key=prefix + "price")
        if explicit:
            raise ConfigError("price = \"unknown\" contradicts the input_usd_per_mtok/"
                              "output_usd_per_mtok given; keep one", source=source,
                              key=prefix + "price")
        return replace(rung, price="unknown", input_usd_per_mtok=0.0, output_usd_per_mtok=0.0)
    if len(given) == 1:
        return _half_priced(rung, given[0], source, prefix, parent=parent)
    if explicit:
        return replace(rung, price=None)
    price = lookup_price(rung.model)
    if parent is not None and (rung.model == parent.model or price is None):
        return rung
    if price is not None:
        return replace(rung, price=None, input_usd_per_mtok=price[0],
                       output_usd_per_mtok=price[1])
    if rung.provider in _FREE_KINDS:
        return rung
    raise ConfigError(
        f"model {rung.model!r} has no price: it is not in the built-in table "
        "(cascade/prices.py); set input_usd_per_mtok and output_usd_per_mtok (0 for a free "
        "endpoint), or price = \"unknown\" to run it without cost caps or budgets",
        source=source, key=prefix + "price")


def check_cap(rungs: tuple[RungConfig, ...], key: str, *, source: str = "request") -> None:
    """Refuse a cost cap or budget (named ``key``) over rungs whose price is unknown: it could
    not hold. Config parsing calls this; so should anything taking a cap per call."""
    unpriced = sorted({r.label for r in rungs for e in (r, *r.fallbacks) if not e.price_known})
    if unpriced:
        raise ConfigError(f"cannot hold: rung(s) {unpriced} have price = \"unknown\", so their "
                          "cost is not known; give them a price or drop the cap", source=source,
                          key=key)


def _parse_verifier(d: Any, i: int, source: str) -> VerifierConfig:
    prefix = f"verifiers[{i}]."
    if isinstance(d, str):
        return VerifierConfig(name=d)
    _expect(d, Mapping, "a table with at least 'name'", source, f"verifiers[{i}]")
    if "name" not in d:
        raise ConfigError("is required (built-in short name, entry-point name, or "
                          "'package.module:factory')", source=source, key=prefix + "name")
    name = _expect(d["name"], str, "a string", source, prefix + "name")
    vid = _expect(d.get("id", ""), str, "a string", source, prefix + "id")
    threshold = None
    if d.get("threshold") is not None:
        threshold = _number(d, "threshold", source, prefix)
        if threshold > 1.0:
            raise ConfigError(f"must be in [0, 1], got {threshold}", source=source,
                              key=prefix + "threshold")
    timeout = _number(d, "timeout_s", source, prefix, minimum=0.001) if "timeout_s" in d else 30.0
    settings = {k: v for k, v in d.items() if k not in {"name", "id", "threshold", "timeout_s"}}
    return VerifierConfig(name=name, id=vid, threshold=threshold, timeout_s=timeout,
                          settings=settings)


def _section(d: Mapping[str, Any], name: str, cls: type, source: str) -> Any:
    raw = d.get(name, {})
    _expect(raw, Mapping, "a table", source, name)
    allowed = set(getattr(cls, "__dataclass_fields__", {}))
    unknown = set(raw) - allowed
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}",
                          source=source, key=f"{name}.{sorted(unknown)[0]}")
    kw: dict[str, Any] = {}
    defaults = cls()
    for k, v in raw.items():
        default = getattr(defaults, k)
        key = f"{name}.{k}"
        if isinstance(default, bool):
            kw[k] = _expect(v, bool, "true or false", source, key)
        elif isinstance(default, int) and not isinstance(default, bool):
            kw[k] = _number(raw, k, source, f"{name}.", integer=True)
        elif isinstance(default, float) or (default is None and k not in {"directory"}):
            kw[k] = None if v is None else _number(raw, k, source, f"{name}.")
        elif isinstance(default, str) or k == "directory":
            kw[k] = _expect(v, str, "a string", source, key)
        else:
            kw[k] = v
    if cls is PolicyConfig and "on_unverified" in kw and kw["on_unverified"] not in (
        "return", "raise"
    ):
        raise ConfigError(f"is {kw['on_unverified']!r}; allowed: return, raise", source=source,
                          key="policy.on_unverified")
    if cls is BudgetConfig and "period_s" in kw and not kw["period_s"] > 0:
        raise ConfigError(f"must be > 0 (the length of a budget window in seconds), got "
                          f"{kw['period_s']}", source=source, key="budget.period_s")
    if cls is CacheConfig and "key_metadata" in kw:
        keys = kw["key_metadata"]
        if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
            raise ConfigError("must be a list of metadata key names, e.g. [\"client\"]",
                              source=source, key="cache.key_metadata")
        kw["key_metadata"] = tuple(keys)
    if cls is CacheConfig and "size_limit_mb" in kw:
        from cascade.cache import check_size_limit

        try:
            check_size_limit(kw["size_limit_mb"])
        except ConfigError as e:
            raise ConfigError(e.detail, source=source, key=e.key) from None
    if cls is PolicyConfig and (kw.get("drift_max_disagreement") or 0.0) > 1.0:
        raise ConfigError(f"must be in [0, 1], got {kw['drift_max_disagreement']}",
                          source=source, key="policy.drift_max_disagreement")
    if cls is PolicyConfig and "drift_alpha" in kw and not 0.0 < kw["drift_alpha"] < 1.0:
        # A false-alarm rate of 0 never alarms, and 1 alarms on every check.
        raise ConfigError(f"must be a rate in (0, 1), e.g. 0.001, got {kw['drift_alpha']}",
                          source=source, key="policy.drift_alpha")
    if cls is RetryConfig and not 1 <= kw.get("max_attempts", 1) <= MAX_ATTEMPTS:
        raise ConfigError(f"must be at least 1 (the first try) and at most {MAX_ATTEMPTS}, "
                          f"got {kw['max_attempts']}", source=source, key="retry.max_attempts")
    if cls is RetryConfig and kw.get("jitter", 0.0) > 1.0:  # a fraction of each delay
        raise ConfigError(f"must be in [0, 1], got {kw['jitter']}", source=source,
                          key="retry.jitter")
    if cls is BreakerConfig and kw.get("failure_threshold", 1) < 1:
        raise ConfigError(f"must be >= 1 (failures in a row that open a circuit), got "
                          f"{kw['failure_threshold']}", source=source,
                          key="breaker.failure_threshold")
    if cls is PolicyConfig and kw.get("shadow_rate", 0.0) > 1.0:
        raise ConfigError(f"must be in [0, 1], got {kw['shadow_rate']}", source=source,
                          key="policy.shadow_rate")
    return cls(**kw)


def parse_config(data: Mapping[str, Any], *, source: str = "<config>") -> CascadeConfig:
    """Validate a config mapping (as read from TOML) into a :class:`CascadeConfig`."""
    _expect(data, Mapping, "a table", source, "<top level>")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}",
                          source=source, key=sorted(unknown)[0])
    raw_rungs = data.get("rungs")
    if not raw_rungs:
        raise ConfigError("the ladder needs at least one [[rungs]] table", source=source,
                          key="rungs")
    _expect(raw_rungs, list, "a list of [[rungs]] tables", source, "rungs")
    rungs = tuple(parse_rung(r, source=source, prefix=f"rungs[{i}].")
                  for i, r in enumerate(raw_rungs))
    labels = [r.label for r in rungs]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"rung labels must be unique, got {labels}; set 'name' to tell "
                          "apart rungs that use the same model", source=source, key="rungs")
    raw_vs = data.get("verifiers", [])
    _expect(raw_vs, list, "a list of [[verifiers]] tables", source, "verifiers")
    verifiers = tuple(_parse_verifier(v, i, source) for i, v in enumerate(raw_vs))
    keys = [v.key for v in verifiers]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"verifier ids must be unique, got {keys}; set 'id' to tell them apart",
                          source=source, key="verifiers")
    for i, r in enumerate(rungs):
        for vid in list(r.verifiers or ()) + list(r.thresholds):
            if vid not in keys:
                raise ConfigError(f"names verifier {vid!r}, which is not configured; "
                                  f"configured: {keys or 'none'}", source=source,
                                  key=f"rungs[{i}].verifiers")
    kw: dict[str, Any] = {}
    for k in ("max_cost_usd", "timeout_s"):
        if data.get(k) is not None:  # a deadline of 0 would fail every request
            kw[k] = _number(data, k, source, "", minimum=0.001 if k == "timeout_s" else 0.0)
    budget = _section(data, "budget", BudgetConfig, source)
    if "max_cost_usd" in kw:
        check_cap(rungs, "max_cost_usd", source=source)
    if budget.limit_usd is not None:
        check_cap(rungs, "budget.limit_usd", source=source)
    for k in ("server", "store", "router"):
        if k in data:
            kw[k] = dict(_expect(data[k], Mapping, "a table", source, k))
    return CascadeConfig(
        rungs=rungs,
        verifiers=verifiers,
        policy=_section(data, "policy", PolicyConfig, source),
        cache=_section(data, "cache", CacheConfig, source),
        retry=_section(data, "retry", RetryConfig, source),
        breaker=_section(data, "breaker", BreakerConfig, source),
        budget=budget,
        source=source,
        **kw,
    )


def load_config(path: str | os.PathLike[str]) -> CascadeConfig:
    """Read and validate a TOML config file."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("config file not found", source=str(p)) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                          "save the file as UTF-8", source=str(p)) from None
    except OSError as e:
        raise ConfigError(f"cannot read config file: {e.strerror}", source=str(p)) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"not valid TOML: {e}", source=str(p)) from None
    return parse_config(data, source=str(p))


def find_config_file(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The config to use: explicit path, else ``$CASCADE_CONFIG``, else ``./cascade.toml``."""
    if explicit is not None:
        return Path(explicit)
    env = os.environ.get("CASCADE_CONFIG")
    if env:
        return Path(env)
    local = Path.cwd() / "cascade.toml"
    return local if local.is_file() else None

