"""Requests per second through a two-rung ladder at 1, 100 and 1,000 concurrent requests.

    python bench/throughput.py [--concurrency 1 100 1000] [--delay 0.05] [--server process|thread]

The loopback server takes ``--delay`` (50 ms) per call, like a fast model. Every request climbs
both rungs (the first one refuses, the refusal verifier rejects it), so it makes two calls. The
baseline makes the same two calls per request with the bare SDK (one client per rung, as the
engine has), under the same concurrency limit. The engine is not the bottleneck when its rate
stays close to the baseline's; the ideal is ``concurrency / (2 × delay)``.
"""

from __future__ import annotations

import argparse
import sys
import time
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
    ladder,
    machine,
    make_cascade,
    model_server,
    print_table,
    stats,
)

RUNGS = 2
_DEFAULT_N = {1: 20, 100: 600, 1000: 2000}


def requests_for(concurrency: int, scale: float) -> int:
    n = _DEFAULT_N.get(concurrency, max(20, concurrency * 3))
    return max(concurrency, int(n * scale))


async def run_engine(base_url: str, n: int, concurrency: int) -> tuple[float, Stats, int]:
    """(requests/s, latency, failures) for ``n`` requests through ``aanswer_many``."""
    cascade, _how = make_cascade(ladder(base_url, rungs=RUNGS))
    try:
        await cascade.aanswer_many([PROMPT] * min(n, concurrency), concurrency=concurrency)
        t = time.perf_counter()
        results = await cascade.aanswer_many([{"prompt": PROMPT, "cache": False}] * n,
                                             concurrency=concurrency)
        took = time.perf_counter() - t
    finally:
        await cascade.aclose()
    lat: list[float] = []
    failed = 0
    for r in results:
        if isinstance(r, Exception) or not r.verified or len(r.attempts) != RUNGS:
            failed += 1
        else:
            lat.append(r.latency_ms / 1000)
    return n / took, stats(lat), failed


async def run_bare(base_url: str, n: int, concurrency: int) -> tuple[float, Stats, int]:
    """The same calls with the bare SDK, bounded the way ``aanswer_many`` bounds them."""
    clients = [bare_client(base_url) for _ in range(RUNGS)]
    models = [f"refuse-{i}" for i in range(RUNGS - 1)] + ["answer"]
    lat: list[float] = []
    failed = 0

    async def batch(count: int, record: bool) -> None:
        limiter = anyio.CapacityLimiter(concurrency)

        async def one() -> None:
            nonlocal failed
            async with limiter:
                t = time.perf_counter()
                try:
                    for client, model in zip(clients, models, strict=True):
                        await bare_create(client, model)
                except Exception:
                    failed += record
                    return
                if record:
                    lat.append(time.perf_counter() - t)

        async with anyio.create_task_group() as tg:
            for _ in range(count):
                tg.start_soon(one)

    try:
        await batch(min(n, concurrency), record=False)
        t = time.perf_counter()
        await batch(n, record=True)
        took = time.perf_counter() - t
    finally:
        for c in clients:
            await c.close()
    return n / took, stats(lat), failed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 100, 1000])
    ap.add_argument("--delay", type=float, default=0.05, help="model latency per call, seconds")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiply the number of requests per concurrency level")
    add_server_arg(ap)
    ns = ap.parse_args(argv)
    mode: ServerMode = ns.server
    rows = []
    with model_server(delay_s=ns.delay, mode=mode) as url:
        for c in ns.concurrency:
            n = requests_for(c, ns.scale)
            b_rate, b_lat, b_fail = anyio.run(run_bare, url, n, c)
            e_rate, e_lat, e_fail = anyio.run(run_engine, url, n, c)
            ideal = c / (RUNGS * ns.delay)
            rows.append((str(c), str(n), f"{ideal:,.0f}", f"{b_rate:,.1f}", f"{e_rate:,.1f}",
                         f"{e_rate / b_rate:.2f}", b_lat.p50, e_lat.p50, b_lat.p99, e_lat.p99,
                         f"{b_fail}/{e_fail}"))
    print(f"throughput, {RUNGS}-rung ladder (first rung rejected), model latency "
          f"{ns.delay * 1000:g} ms per call, server in a {mode}; requests/s and ms per request")
    print(f"({machine()})")
    print_table(("conc", "requests", "ideal/s", "bare/s", "cascade/s", "ratio", "bare p50",
                 "cascade p50", "bare p99", "cascade p99", "failed b/c"), rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
