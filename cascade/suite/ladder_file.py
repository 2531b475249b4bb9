"""The shared ``ladder-<chain>.json``: a ladder's models, cheapest first, with their prices
and provider, as written beside the recorded-outcomes files; read as rungs (and as a config,
so ``--config`` takes the file the README points at as well as a TOML ladder)."""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cascade.config import CascadeConfig, RungConfig
from cascade.errors import ConfigError
from cascade.secrets import has_userinfo

__all__ = ["UNKNOWN_HOST", "ladder_config", "ladder_rungs", "read_ladder", "read_ladder_file"]

log = logging.getLogger("cascade.suite")

_HOSTS = {
    "fireworks": "https://api.fireworks.ai/inference/v1",
    "together": "https://api.together.xyz/v1",
    "groq": "https://api.groq.com/openai/v1",
    "deepinfra": "https://api.deepinfra.com/v1/openai",
    "openrouter": "https://openrouter.ai/api/v1",
    "mistral": "https://api.mistral.ai/v1",
    "deepseek": "https://api.deepseek.com/v1",
    "xai": "https://api.x.ai/v1",
    "cerebras": "https://api.cerebras.ai/v1",
}
"""OpenAI-compatible hosts a ladder file may name as ``provider`` without a ``base_url``."""
UNKNOWN_HOST = "http://127.0.0.1:8000/v1"
"""Where a rung of a provider this table lacks (and no ``base_url``) is written to call: the
tuning replays recorded answers and needs none, but TUNED.toml must load; a warning and
``cascade health --probe`` say to set it."""


def read_ladder_file(path: str | os.PathLike[str]) -> Mapping[str, Any]:
    """A shared ``ladder-<chain>.json``: ``{"ladder": [{"model": ..., prices, provider}]}``,
    checked here so a malformed entry is a ConfigError naming the file, not a KeyError."""
    try:
        ladder: Any = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise ConfigError(f"cannot read the ladder: {e}", source=str(path)) from None
    entries = ladder.get("ladder") if isinstance(ladder, Mapping) else None
    if not (isinstance(entries, list) and entries):
        raise ConfigError('a ladder file is {"ladder": [{"model": ..., "input_usd_per_mtok": '
                          '..., "output_usd_per_mtok": ...}, ...]}', source=str(path))
    for k, m in enumerate(entries):
        if not (isinstance(m, Mapping) and isinstance(m.get("model"), str) and m["model"]):
            raise ConfigError(f"entry {k} needs a \"model\" name", source=str(path),
                              key=f"ladder[{k}]")
        if m.get("price") == "unknown":
            continue
        for price in ("input_usd_per_mtok", "output_usd_per_mtok"):
            if price not in m:  # a silent $0 would make the rung look free to the tuner
                raise ConfigError(f"entry {k} ({m['model']}) has no {price}: give both prices "
                                  '(0 for a free model), or "price": "unknown"',
                                  source=str(path), key=f"ladder[{k}].{price}")
            v = m[price]
            if not (isinstance(v, (int, float)) and not isinstance(v, bool)
                    and math.isfinite(v) and v >= 0):
                raise ConfigError(f"{price} must be a finite number >= 0, got {v!r}",
                                  source=str(path), key=f"ladder[{k}]")
    return dict(ladder)


def ladder_config(path: str | os.PathLike[str], *, logprobs: bool = False) -> CascadeConfig:
    """A shared ladder JSON as a config (its rungs, no verifiers), so ``--config`` takes the
    file the README points at as well as a TOML ladder."""
    rungs = ladder_rungs(read_ladder_file(path), logprobs)
    return CascadeConfig(rungs=tuple(rungs.values()), source=str(path))


def read_ladder(paths: Sequence[Path], chains: set[str],
                 models: Sequence[str]) -> tuple[Mapping[str, Any], str]:
    """The ``ladder-<chain>.json`` beside the files, and where it came from; without one (a
    file not named after its chain, or no ladder file), the models as rungs of unknown price:
    the recorded ``cost_usd`` still decides the order and the saving, and the tuned file says
    so."""
    if len(chains) > 1:
        raise ConfigError(f"files come from different ladders {sorted(chains)}; tune one "
                          "ladder at a time", source=", ".join(map(str, paths)))
    if chains:
        ladder_file = paths[0].with_name(f"ladder-{next(iter(chains))}.json")
        if ladder_file.is_file():
            return read_ladder_file(ladder_file), str(ladder_file)
    looked = (f"no {paths[0].with_name(f'ladder-{next(iter(chains))}.json')}" if chains else
              f"{paths[0].name} is not named <bench>_<chain>_train.jsonl")
    log.warning("%s: the rungs are the recorded models at unknown prices, in the order of "
                "their recorded cost (give --config, or a ladder file, for prices and "
                "providers)", looked)
    return {"ladder": [{"model": m, "price": "unknown"} for m in models]}, "<recorded models>"


def ladder_rungs(ladder: Mapping[str, Any], logprobs: bool) -> dict[str, RungConfig]:
    out: dict[str, RungConfig] = {}
    for m in ladder["ladder"]:
        prov = m.get("provider", "openai")
        kw: dict[str, Any] = {}
        if prov in ("openai", "anthropic"):
            kw["provider"] = prov
        else:
            name = str(prov).lower()
            url = m.get("base_url") or _HOSTS.get(name)
            if not isinstance(url, str) or not url:
                log.warning("ladder entry %r: provider %r is no host this project knows and the "
                            "entry has no base_url; its rung is written to call %s: set "
                            "base_url in the tuned file before serving it", m["model"], prov,
                            UNKNOWN_HOST)
                url = UNKNOWN_HOST
            kw.update(provider="openai-compatible", base_url=url)
            if not has_userinfo(url):  # else its user info is the credential (Basic auth)
                kw["api_key_env"] = re.sub(r"[^A-Z0-9_]", "_", name.upper()) + "_API_KEY"
        if m.get("price") == "unknown":
            kw["price"] = "unknown"
        out[m["model"]] = RungConfig(
            model=m["model"], input_usd_per_mtok=float(m.get("input_usd_per_mtok", 0.0)),
            output_usd_per_mtok=float(m.get("output_usd_per_mtok", 0.0)), logprobs=logprobs,
            **kw)
    return out
