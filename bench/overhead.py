"""What the cascade adds to each request, per rung, over the bare OpenAI SDK call.

    python bench/overhead.py [--n 2000] [--warmup 200] [--server process|thread]

Against a loopback OpenAI-compatible server that answers at once, with the cache off and the
refusal verifier on, three ways of making the same calls, interleaved request by request so
all see the same machine state:

* bare: ``AsyncOpenAI().chat.completions.create``, once per rung;
* provider: the engine's ``OpenAIProvider.complete`` for each rung (request building, reply
  check, usage), without the climb;
* cascade: ``Cascade.aanswer()`` through the ladder.

Ladders of one rung, and of two rungs where the first refuses (so both are called). Then the
engine alone: ``aanswer`` with an in-process provider that answers at once (no HTTP, no SDK),
which isolates the climb, the verifier and the trace. Target: under 1 ms p50 and 3 ms p99 added
per rung. p99 on a shared machine includes time slices lost to other processes.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import anyio
from _common import (
    PROMPT,
    ServerMode,
    Stats,
    add_server_arg,
    bare_client,
    bare_create,
    instant_provider,
    ladder,
    machine,
    make_cascade,
    model_server,
    print_table,
    stats,
)

from cascade.messages import normalise_messages
from cascade.providers import make_provider
from cascade.providers.base import ModelCall

TARGET_P50_MS, TARGET_P99_MS = 1.0, 3.0
Fn = Callable[[], Awaitable[None]]


async def _interleaved(fns: dict[str, Fn], n: int, warmup: int) -> dict[str, Stats]:
    """Run each of ``fns`` once per round, rotating the order; time rounds after ``warmup``."""
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    for i in range(warmup + n):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            t = time.perf_counter()
            await fns[name]()
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
        if i == warmup - 1:
            gc.collect()
    return {k: stats(v) for k, v in times.items()}


async def measure_http(base_url: str, rungs: int, n: int, warmup: int
                       ) -> tuple[dict[str, Stats], str]:
    config = ladder(base_url, rungs=rungs)
    cascade, how = make_cascade(config)
    client = bare_client(base_url)
    providers = [make_provider(r) for r in config.rungs]
    messages = normalise_messages(PROMPT)
    calls = [ModelCall(model=r.model, messages=messages, max_tokens=r.max_tokens,
                       temperature=r.temperature, timeout_s=r.timeout_s) for r in config.rungs]

    async def engine() -> None:
        a = await cascade.aanswer(PROMPT, cache=False)
        if not a.verified or len(a.attempts) != rungs:
            raise RuntimeError(f"unexpected climb: {[x.status for x in a.attempts]}")

    async def provider() -> None:
        for p, call in zip(providers, calls, strict=True):
            await p.complete(call)

    async def bare() -> None:
        for r in config.rungs:
            await bare_create(client, r.model)

    try:
        res = await _interleaved({"bare": bare, "provider": provider, "cascade": engine},
                                 n, warmup)
    finally:
        await cascade.aclose()
        await client.close()
        for p in providers:
            await p.aclose()
    return res, how


async def measure_engine_alone(rungs: int, n: int, warmup: int) -> Stats:
    cascade, _how = make_cascade(ladder("http://127.0.0.1:9/v1", rungs=rungs),
                                 provider_factory=instant_provider().factory)

    async def engine() -> None:
        await cascade.aanswer(PROMPT, cache=False)

    try:
        return (await _interleaved({"engine": engine}, n, warmup))["engine"]
    finally:
        await cascade.aclose()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="measured requests per variant")
    ap.add_argument("--warmup", type=int, default=200)
    add_server_arg(ap)
    ns = ap.parse_args(argv)
    mode: ServerMode = ns.server
    rows = []
    ok = True
    how = ""
    with model_server(mode=mode) as url:
        for rungs in (1, 2):
            res, how = anyio.run(measure_http, url, rungs, ns.n, ns.warmup)
            raw, prov, eng = res["bare"], res["provider"], res["cascade"]
            d50, d99 = (eng.p50 - raw.p50) / rungs, (eng.p99 - raw.p99) / rungs
            ok = ok and d50 < TARGET_P50_MS and d99 < TARGET_P99_MS
            rows.append((f"{rungs} rung{'s' * (rungs > 1)}", raw.p50, prov.p50, eng.p50,
                         raw.p99, prov.p99, eng.p99, d50, (prov.p50 - raw.p50) / rungs, d99))
    print(f"per-request overhead, n={ns.n} each (after {ns.warmup} warm-up), server in a "
          f"{mode}, verifier: {how}, cache off; milliseconds")
    print(f"({machine()})")
    print_table(("ladder", "bare p50", "provider p50", "cascade p50", "bare p99", "provider p99",
                 "cascade p99", "added/rung p50", "of which provider", "added/rung p99"), rows)
    print(f"target: < {TARGET_P50_MS:g} ms p50 and < {TARGET_P99_MS:g} ms p99 added per rung: "
          f"{'met' if ok else 'NOT met'}")
    print()
    alone = [anyio.run(measure_engine_alone, r, ns.n * 2, ns.warmup) for r in (1, 2)]
    print("the engine alone (in-process provider that answers at once: no HTTP, no SDK); "
          "microseconds")
    print_table(("ladder", "p50", "p99", "mean", "per rung p50"),
                [(f"{r} rung{'s' * (r > 1)}", f"{s.p50 * 1000:.0f}", f"{s.p99 * 1000:.0f}",
                  f"{s.mean * 1000:.0f}", f"{s.p50 * 1000 / r:.0f}")
                 for r, s in zip((1, 2), alone, strict=True)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
