"""TUNED.toml: the recommended setting as a complete config, written as TOML."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from cascade.config import CascadeConfig, RungConfig, VerifierConfig
from cascade.suite.outcomes import OutcomeTable
from cascade.tuning.setting import Setting

__all__ = ["to_config", "to_toml"]


_DRIFT = "drift_max_disagreement"
"""Each accepting rung's key for the drift alarm (#17): the suite's disagreement rate with the
top rung among the answers it accepted, at its upper 90% bound. Written when the config knows
the key (the engine's drift alarm reads it; ``[policy] drift_max_disagreement`` is the default
for rungs without one)."""

def to_config(table: OutcomeTable, setting: Setting, *,
              drift: Mapping[int, float] | None = None) -> CascadeConfig:
    """A complete cascade config for ``setting``: the chosen rungs with their thresholds, an
    ``agreement`` verifier (mode ``previous``) on the rungs that must agree with the one before,
    and ``drift`` (table column -> rate) as each accepting rung's ``drift_max_disagreement``.
    """
    base = table.base
    verifiers = base.verifiers if base is not None else table.verifiers
    k1 = len(setting.thresholds)
    gated = [setting.gated(p) for p in range(k1)]
    agree_id = ""
    if any(gated):
        taken = {v.key for v in verifiers}
        agree_id = next(x for x in ("agreement", "agreement_previous", "agreement_tuned")
                        if x not in taken)
        verifiers = (*verifiers, VerifierConfig(
            name="agreement", id=agree_id,
            settings={"mode": "previous", "normaliser": setting.normaliser}))
    rungs: list[RungConfig] = []
    for p, j in enumerate(setting.chain):
        r = table.rungs[j]
        th = dict(r.thresholds)
        if p < k1:
            for k, t in zip(setting.keys, setting.thresholds[p], strict=True):
                if math.isfinite(t) or t == math.inf:
                    # inf: no score reaches it, so the rung never accepts and answers only
                    # for the next rung's agreement check (TOML writes it as inf)
                    th[k] = t
        own = r.verifiers
        if agree_id:
            ids = tuple(own) if own is not None else tuple(v.key for v in verifiers
                                                            if v.key != agree_id)
            own = (*ids, agree_id) if p < k1 and gated[p] else ids
        d = (drift or {}).get(j) if p < k1 else None
        kw: dict[str, Any] = {}
        if d is not None and _DRIFT in RungConfig.__dataclass_fields__:
            kw[_DRIFT] = round(d, 6)
        # A fallback is the same rung at another endpoint: it is judged as the rung is.
        fbs = tuple(replace(fb, thresholds=th, verifiers=own, **kw) for fb in r.fallbacks)
        rungs.append(replace(r, thresholds=th, fallbacks=fbs, verifiers=own, **kw))
    if base is not None:
        return base.replace(rungs=tuple(rungs), verifiers=verifiers)
    return CascadeConfig(rungs=tuple(rungs), verifiers=verifiers, source="<tuned>")


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
"""TOML's bare keys are ASCII: ``str.isalnum`` also passes 'é' and '²', which do not load."""
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
"""What TOML refuses raw in a comment (and, unescaped, in a string): controls but tab, DEL."""


def _toml_string(v: str) -> str:
    """A TOML basic string. JSON's escapes are TOML's, but JSON leaves DEL raw (TOML refuses
    it) and writes a lone surrogate that neither UTF-8 nor TOML can hold."""
    if any("\ud800" <= c <= "\udfff" for c in v):
        raise ValueError(f"TOML cannot hold the lone surrogate in {v!r}")
    return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _toml_string(v)
    if isinstance(v, Mapping):
        inner = ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items())
        return "{ " + inner + " }" if inner else "{}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _toml_key(k: str) -> str:
    return k if _BARE_KEY.fullmatch(k) else _toml_string(k)


def _comment(line: str) -> str:
    """A header line as a TOML comment: it quotes paths and rung labels, which may hold what a
    comment cannot (a control character, a lone surrogate); those are written escaped."""
    safe = line.encode("utf-8", "backslashreplace").decode("utf-8")
    return "# " + _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", safe)


_ALWAYS = ("max_tokens", "temperature", "timeout_s", "logprobs")
"""Written for every rung even at their defaults: what a reader of TUNED.toml looks for."""
_PRICE = ("price", "input_usd_per_mtok", "output_usd_per_mtok")
_DEFAULT_RUNG = RungConfig(model="")


def _price_keys(r: RungConfig) -> dict[str, Any]:
    if r.price == "unknown":  # never a silent $0 that every cap and budget would let pass
        return {"price": "unknown"}
    return {"input_usd_per_mtok": r.input_usd_per_mtok,
            "output_usd_per_mtok": r.output_usd_per_mtok}


def _rung_table(r: RungConfig, parent: RungConfig | None = None) -> dict[str, Any]:
    """Every setting of ``r`` that the loader would not give it anyway: for a rung, what
    differs from the defaults; for one of its ``fallbacks`` (``parent`` given), what differs
    from the rung, since a fallback inherits every key it does not set."""
    ref = parent or _DEFAULT_RUNG
    d: dict[str, Any] = {} if parent else {"model": r.model, "provider": r.provider}
    # A fallback naming another model is priced from the built-in table unless it says so.
    if parent is None or r.model != parent.model or any(
            getattr(r, k) != getattr(parent, k) for k in _PRICE):
        d.update(_price_keys(r))
    for f in RungConfig.__dataclass_fields__:
        value = getattr(r, f)
        if f in d or f in _PRICE or f == "fallbacks" or value is None:
            continue
        if value != getattr(ref, f) or (parent is None and f in _ALWAYS):
            d[f] = dict(value) if isinstance(value, Mapping) else \
                list(value) if isinstance(value, tuple) else value
    if parent is not None:
        # What the loader does not inherit: a fallback of another kind gets no URL, and one at
        # another endpoint no key, unless it names them (even when they equal the rung's).
        if r.provider != parent.provider and r.base_url is not None:
            d["base_url"] = r.base_url
        if r.api_key_env is not None and (r.provider, r.base_url) != (parent.provider,
                                                                       parent.base_url):
            d["api_key_env"] = r.api_key_env
    if r.fallbacks:
        d["fallbacks"] = [_rung_table(fb, r) for fb in r.fallbacks]
    return d


def to_toml(config: CascadeConfig, *, header: str = "") -> str:
    """Write a config as TOML that :func:`cascade.config.load_config` reads back the same."""
    lines = [_comment(h) for h in header.splitlines()]
    if config.max_cost_usd is not None:
        lines.append(f"max_cost_usd = {_toml_value(config.max_cost_usd)}")
    if config.timeout_s is not None:
        lines.append(f"timeout_s = {_toml_value(config.timeout_s)}")
    for r in config.rungs:
        lines += ["", "[[rungs]]"]
        lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in _rung_table(r).items()]
    for v in config.verifiers:
        lines += ["", "[[verifiers]]", f"name = {_toml_value(v.name)}"]
        if v.id:
            lines.append(f"id = {_toml_value(v.id)}")
        if v.threshold is not None:
            lines.append(f"threshold = {_toml_value(v.threshold)}")
        lines.append(f"timeout_s = {_toml_value(v.timeout_s)}")
        lines += [f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.settings.items()]
    for name in ("policy", "cache", "retry", "breaker", "budget"):
        section = getattr(config, name)
        default = type(section)()
        items = {k: getattr(section, k) for k in type(section).__dataclass_fields__
                 if getattr(section, k) != getattr(default, k) and getattr(section, k) is not None}
        if items:
            lines += ["", f"[{name}]"] + [f"{k} = {_toml_value(x)}" for k, x in items.items()]
    # The service's and the shared store's tables as the user wrote them (their modules
    # validate them on load): a tuned ladder served from TUNED.toml keeps its client keys,
    # audit log and shared budgets. ``[router]`` is the tuning's own to write.
    for name in ("server", "store"):
        table = getattr(config, name)
        if table:
            lines += ["", f"[{name}]"] + [f"{_toml_key(k)} = {_toml_value(x)}"
                                          for k, x in table.items()]
    return "\n".join(lines).lstrip("\n") + "\n"

