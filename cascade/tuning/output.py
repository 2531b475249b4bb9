"""TUNED.toml: the recommended setting as a complete config, written as TOML."""

from __future__ import annotations

import json
import math
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

_WITNESS = 2.0
"""Written for a threshold of +inf: no verifier score (all are in [0, 1]) reaches it, so the
rung never accepts and only answers for the next rung's agreement check."""


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
                if math.isfinite(t):
                    th[k] = t
                elif t == math.inf:
                    th[k] = _WITNESS
        own = r.verifiers
        if agree_id:
            ids = tuple(own) if own is not None else tuple(v.key for v in verifiers
                                                            if v.key != agree_id)
            own = (*ids, agree_id) if p < k1 and gated[p] else ids
        d = (drift or {}).get(j) if p < k1 else None
        kw: dict[str, Any] = {}
        if d is not None and _DRIFT in RungConfig.__dataclass_fields__:
            kw[_DRIFT] = round(d, 6)
        rungs.append(replace(r, thresholds=th, fallbacks=(), verifiers=own, **kw))
    if base is not None:
        return base.replace(rungs=tuple(rungs), verifiers=verifiers)
    return CascadeConfig(rungs=tuple(rungs), verifiers=verifiers, source="<tuned>")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isinf(v) or math.isnan(v):
            raise ValueError("TOML cannot hold inf/nan here")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, Mapping):
        inner = ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items())
        return "{ " + inner + " }" if inner else "{}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _toml_key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else json.dumps(k)


def _rung_table(r: RungConfig) -> dict[str, Any]:
    d: dict[str, Any] = {"model": r.model, "provider": r.provider}
    if r.name:
        d["name"] = r.name
    for k in ("base_url", "api_key_env", "max_retries", _DRIFT):
        if getattr(r, k, None) is not None:
            d[k] = getattr(r, k)
    if r.price == "unknown":  # never a silent $0 that every cap and budget would let pass
        d["price"] = "unknown"
    else:
        d.update(input_usd_per_mtok=r.input_usd_per_mtok,
                 output_usd_per_mtok=r.output_usd_per_mtok)
    d.update(max_tokens=r.max_tokens, temperature=r.temperature, timeout_s=r.timeout_s,
             logprobs=r.logprobs)
    if r.verifiers is not None:
        d["verifiers"] = list(r.verifiers)
    if r.thresholds:
        d["thresholds"] = dict(r.thresholds)
    if r.extra:
        d["extra"] = dict(r.extra)
    return d


def to_toml(config: CascadeConfig, *, header: str = "") -> str:
    """Write a config as TOML that :func:`cascade.config.load_config` reads back the same."""
    lines = [f"# {h}" for h in header.splitlines()]
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
    return "\n".join(lines).lstrip("\n") + "\n"

