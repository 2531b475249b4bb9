"""``cascade health``: the configured ladder's endpoints with their circuit state; ``--probe``
makes one tiny call to each through the engine and reports ok, latency and error.

A fresh process has no history of its own, so without ``--probe`` the circuits show what this
process (or a shared store, when one is configured) knows; ``--probe`` is the live check, and
its exit code (3 when any endpoint fails) lets a script or a container health check use it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from cascade.caller import endpoints_of
from cascade.cli import EXIT_NO_ANSWER, EXIT_OK
from cascade.cli._args import seconds
from cascade.errors import CascadeError

if TYPE_CHECKING:
    from cascade.config import CascadeConfig, RungConfig
    from cascade.engine import Cascade

__all__ = ["add_arguments", "run"]

PROBE_PROMPT = "Reply with the single word: ok"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``cascade health [--config FILE] [--probe] [--timeout S] [--json]``."""
    parser.add_argument("--config", help="TOML config (default: $CASCADE_CONFIG, ./cascade.toml, "
                        "else the embedded local ladder)")
    parser.add_argument("--probe", action="store_true",
                        help="call each endpoint once (1 output token, no retries, no "
                             "failover) and report ok, latency and error; exit 3 if any fails")
    parser.add_argument("--timeout", type=seconds, default=10.0,
                        help="with --probe: seconds to wait for each endpoint (default 10, "
                             "or the rung's timeout_s when smaller)")
    parser.add_argument("--json", action="store_true", help="print the endpoints as JSON")


async def _probe(c: Cascade, ep: RungConfig, timeout_s: float) -> dict[str, Any]:
    """One tiny call to one endpoint, through the engine's breaker bookkeeping."""
    from cascade.messages import Message
    from cascade.providers.base import ModelCall

    call = ModelCall(model=ep.model, messages=(Message(role="user", content=PROBE_PROMPT),),
                     max_tokens=1, temperature=0.0, timeout_s=min(timeout_s, ep.timeout_s),
                     extra=dict(ep.extra))
    alone = replace(ep, fallbacks=(), max_retries=0)  # this endpoint, once
    t0 = time.perf_counter()
    try:
        await c.call_model(call, alone)
    except CascadeError as e:
        from cascade.secrets import Redactor, secret_envs_of

        cut = Redactor(secret_envs_of(c.config))  # a provider plugin's error may quote its key
        return {"ok": False, "latency_ms": round((time.perf_counter() - t0) * 1000, 3),
                "error": cut(f"{type(e).__name__}: {e}")}
    return {"ok": True, "latency_ms": round((time.perf_counter() - t0) * 1000, 3), "error": None}


async def _probe_all(c: Cascade, eps: list[RungConfig], timeout_s: float) -> list[dict[str, Any]]:
    import anyio

    from cascade.providers import make_provider

    # Load each provider's SDK before the clock starts: a probe's latency is the endpoint's,
    # not the seconds an import of openai/anthropic takes in a fresh process.
    for ep in eps:
        with contextlib.suppress(CascadeError):  # an unknown provider fails its own probe
            await anyio.to_thread.run_sync(make_provider, ep)
    results: list[dict[str, Any]] = [{} for _ in eps]

    async def one(k: int) -> None:
        results[k] = await _probe(c, eps[k], timeout_s)

    try:
        async with anyio.create_task_group() as tg:
            for k in range(len(eps)):
                tg.start_soon(one, k)
    finally:
        await c.aclose()
    return results


def _report(config: CascadeConfig, probes: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    from cascade.engine import health

    known = health()["endpoints"]
    rows = []
    for k, (i, rung, ep) in enumerate(endpoints_of(config)):
        seen = known.get(ep.endpoint, {})
        row: dict[str, Any] = {
            "rung": i, "label": rung.label, "role": "primary" if ep is rung else "fallback",
            "provider": ep.provider, "model": ep.model,
            "base_url": ep.shown_url if ep.base_url else ep.base_url,
            "endpoint": ep.endpoint,
            "fallbacks": [fb.endpoint for fb in rung.fallbacks] if ep is rung else [],
            "circuit": seen.get("circuit", {"state": "closed"}),
        }
        for stat in ("calls", "failures", "mean_latency_ms"):
            if stat in seen:
                row[stat] = seen[stat]
        if probes is not None:
            row["probe"] = probes[k]
        rows.append(row)
    return rows


def _format(rows: list[dict[str, Any]]) -> str:
    lines = []
    for r in rows:
        where = r["base_url"] or "(provider default URL)"
        head = (f"  {r['rung'] + 1}. {r['label']}" if r["role"] == "primary"
                else "     fallback")
        line = f"{head}: {r['provider']} {r['model']} @ {where}  circuit {r['circuit']['state']}"
        probe = r.get("probe")
        if probe is not None:
            state = "ok" if probe["ok"] else "FAILED"
            line += f"  {state} {probe['latency_ms']:.0f} ms"
            if probe["error"]:
                line += f"\n       ! {probe['error']}"
        lines.append(line)
    return "\n".join(lines)


def run(ns: argparse.Namespace) -> int:
    """Show the endpoints; with ``--probe``, call each once and exit 3 if any failed."""
    import anyio

    from cascade.defaults import resolve_config
    from cascade.engine import Cascade

    config = resolve_config(ns.config)
    probes = None
    if ns.probe:
        c = Cascade(config)
        eps = [ep for _i, _rung, ep in endpoints_of(config)]
        probes = anyio.run(_probe_all, c, eps, ns.timeout)
    rows = _report(config, probes)
    if ns.json:
        sys.stdout.write(json.dumps({"source": config.source, "endpoints": rows}, indent=2)
                         + "\n")
    else:
        sys.stdout.write(f"ladder {config.source}\n{_format(rows)}\n")
    failed = probes is not None and not all(p["ok"] for p in probes)
    return EXIT_NO_ANSWER if failed else EXIT_OK
