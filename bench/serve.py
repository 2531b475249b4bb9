"""What ``cascade serve`` adds over calling the rung's server directly.

    python bench/serve.py [--n 400] [--delay 0.05] [--concurrency 1 100 1000] [--workers 1 2]
                          [--rounds 5] [--transport httpx aiohttp]

Three measurements, each against a baseline measured in the same run with the same client:

* added latency: a one-rung ladder (refusal verifier, cache off) behind ``cascade serve``,
  versus the same request sent straight to the rung's server, interleaved request by request,
  with the official ``openai`` SDK as the client (target: < 2 ms p50), and where the served
  request's time goes (from the response's own ``cascade`` trace: the rung's call, the engine
  around it, and everything outside the engine: HTTP in and out, uvicorn, FastAPI, the service),
  once for each rung ``transport`` (the SDK's httpx client and its aiohttp one);
* throughput at 1, 100 and 1,000 concurrent clients against a model that takes ``--delay``
  seconds, for 1 and 2 server workers (the last ``--transport``), versus the model server
  directly (the client is a plain ``httpx`` async client on both sides, so the client's own
  cost is the same);
* time to the first content chunk of a stream (``stream: true``) versus the whole
  non-streamed response.

The model server and ``cascade serve`` are child processes; the client is this process.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import anyio
import httpx2 as httpx
import openai
from _common import PROMPT, bare_create, machine, model_server, print_table, stats

from tests.loopback import free_port, reap
from tests.serve_kit import start_serve, wait_ready

TARGET_ADDED_P50_MS = 2.0
BODY = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 512}


def _config(base_url: str, folder: Path, transport: str = "auto") -> Path:
    p = folder / f"serve-bench-{transport}.toml"
    p.write_text(f'''
[[rungs]]
model = "answer"
provider = "openai-compatible"
base_url = "{base_url}"
transport = "{transport}"
max_retries = 0
max_tokens = 512
input_usd_per_mtok = 0.15
output_usd_per_mtok = 0.6

[[verifiers]]
name = "refusal"

[cache]
enabled = false
''')
    return p


@contextmanager
def serving(config: Path, workers: int) -> Iterator[str]:
    """``cascade serve`` on ``config`` as the tests start it; stopped with SIGTERM (a drain)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_serve(config, port, "--workers", str(workers))
    try:
        wait_ready(url, proc, timeout_s=60)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        reap(proc, 20)


async def added_latency(direct: str, served: Mapping[str, str], n: int
                        ) -> dict[str, list[float]]:
    """Request by request, in a rotating order: the rung's server directly, then each served
    app (``served``: transport -> URL); keys ``direct``, ``T``, ``T:engine``, ``T:rung``."""
    times: dict[str, list[float]] = defaultdict(list)
    async with contextlib.AsyncExitStack() as stack:
        d = await stack.enter_async_context(
            openai.AsyncOpenAI(base_url=direct, api_key="x", max_retries=0))
        calls: dict[str, Callable[[], Awaitable[object]]] = {"direct": lambda: bare_create(d)}
        for transport, url in served.items():
            s = await stack.enter_async_context(
                openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0))

            async def through(s: openai.AsyncOpenAI = s, t: str = transport) -> None:
                # the same request as bare_create's, keeping the trace
                r = await s.chat.completions.create(
                    model="cascade", messages=[{"role": "user", "content": PROMPT}],
                    max_tokens=512, temperature=0.0, timeout=60.0)
                trace = (r.model_extra or {})["cascade"]
                times[f"{t}:engine"].append(trace["latency_ms"] / 1000)
                times[f"{t}:rung"].append(trace["attempts"][0]["latency_ms"] / 1000)

            calls[transport] = through
        keys = list(calls)
        for i in range(n + n // 10):
            for k in keys[i % len(keys):] + keys[:i % len(keys)]:
                t0 = time.perf_counter()
                await calls[k]()
                if i >= n // 10:
                    times[k].append(time.perf_counter() - t0)
    for k in list(times):  # the warm-up requests' traces
        if ":" in k:
            del times[k][:n // 10]
    return times


def _uvicorn_stack() -> str:
    """What uvicorn's "auto" picks here (httptools and uvloop come with uvicorn[standard])."""
    import importlib.util

    http = "httptools" if importlib.util.find_spec("httptools") else "h11 (no httptools)"
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio (no uvloop)"
    return f"uvicorn http={http}, loop={loop}"


async def throughput(url: str, model: str, concurrency: int, total: int) -> float:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        async def one() -> None:
            r = await client.post("/chat/completions", json={"model": model, **BODY})
            r.raise_for_status()

        # Warm up every worker (its first requests import and connect) and the pool.
        async with anyio.create_task_group() as tg:
            for _ in range(max(16, min(concurrency, 200))):
                tg.start_soon(one)
        left = total
        t0 = time.perf_counter()

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await one()

        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(worker)
        return total / (time.perf_counter() - t0)


async def first_chunk(url: str, n: int) -> tuple[list[float], list[float]]:
    ttfc, whole = [], []
    async with httpx.AsyncClient(base_url=f"{url}/v1", timeout=60) as client:
        for i in range(n + 10):
            t0 = time.perf_counter()
            async with client.stream("POST", "/chat/completions", json={
                    "model": "cascade", "stream": True, **BODY}) as r:
                first = None
                async for line in r.aiter_lines():
                    if first is None and line.startswith("data: {") and '"content"' in line:
                        first = time.perf_counter() - t0
            t1 = time.perf_counter()
            await client.post("/chat/completions", json={"model": "cascade", **BODY})
            if i >= 10 and first is not None:
                ttfc.append(first)
                whole.append(time.perf_counter() - t1)
    return ttfc, whole


def _latency_report(transport: str, lat: dict[str, list[float]], ttfc: list[float],
                    whole: list[float]) -> None:
    d, s = stats(lat["direct"]), stats(lat[transport])
    print(f"\n## added latency, one-rung ladder, model answers at once (openai SDK client); "
          f"rung transport {transport}")
    print_table(["path", "n", "p50 ms", "p99 ms", "mean ms"], [
        ["direct to the rung's server", d.n, d.p50, d.p99, d.mean],
        ["through cascade serve", s.n, s.p50, s.p99, s.mean],
        ["added", "", s.p50 - d.p50, s.p99 - d.p99, s.mean - d.mean]])
    ok = "met" if s.p50 - d.p50 < TARGET_ADDED_P50_MS else "MISSED"
    print(f"target: added p50 < {TARGET_ADDED_P50_MS} ms: {ok}")
    served, engine, rung = lat[transport], lat[f"{transport}:engine"], lat[f"{transport}:rung"]
    print(f"\n## where a served request's time goes (p50 of per-request differences); {transport}")
    print_table(["part", "p50 ms"], [
        ["the rung's call (provider SDK, HTTP to the model, verifiers)", stats(rung).p50],
        ["the engine around it", stats([e - r for e, r in zip(engine, rung, strict=True)]).p50],
        ["outside the engine (HTTP in/out, uvicorn, FastAPI, service)",
         stats([t - e for t, e in zip(served, engine, strict=True)]).p50],
        ["direct call, for comparison", d.p50]])
    t, w = stats(ttfc), stats(whole)
    print(f"\n## streaming: time to the first content chunk vs the whole response; {transport}")
    print_table(["", "n", "p50 ms", "p99 ms"], [
        ["first content chunk (stream)", t.n, t.p50, t.p99],
        ["whole response (no stream)", w.n, w.p50, w.p99]])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=400, help="timed requests for latency")
    p.add_argument("--delay", type=float, default=0.05, help="model delay for throughput (s)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 100, 1000])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=5,
                   help="throughput: requests per client (a steady state, not one burst)")
    p.add_argument("--transport", nargs="+", default=["httpx", "aiohttp"],
                   choices=["auto", "httpx", "aiohttp"],
                   help="the rung's transport(s) to measure latency with")
    ns = p.parse_args()
    print(f"# bench/serve.py on {machine()}; {_uvicorn_stack()}")
    with tempfile.TemporaryDirectory() as tmp:
        with model_server(delay_s=0.0) as direct, contextlib.ExitStack() as apps:
            served = {t: apps.enter_context(serving(_config(direct, Path(tmp), t), 1))
                      for t in ns.transport}
            lat = anyio.run(added_latency, direct, served, ns.n)
            streams = {t: anyio.run(first_chunk, url, max(50, ns.n // 4))
                       for t, url in served.items()}
        for t in ns.transport:
            _latency_report(t, lat, *streams[t])

        rows = []
        with model_server(delay_s=ns.delay) as slow:
            config = _config(slow, Path(tmp), ns.transport[-1])
            for c in ns.concurrency:
                total = max(20, min(5000, c * ns.rounds))
                base = anyio.run(throughput, slow, "answer", c, total)
                rows.append([f"direct, {c} clients", total, base, "1.00×"])
            for workers in ns.workers:
                with serving(config, workers) as url:
                    for i, c in enumerate(ns.concurrency):
                        total = max(20, min(5000, c * ns.rounds))
                        rps = anyio.run(throughput, f"{url}/v1", "cascade", c, total)
                        base = rows[i][2]
                        rows.append([f"serve --workers {workers}, {c} clients", total, rps,
                                     f"{rps / base:.2f}×"])
        print(f"\n## throughput, model takes {ns.delay * 1000:.0f} ms (httpx client; rung "
              f"transport {ns.transport[-1]})")
        print_table(["", "requests", "req/s", "vs direct"], rows)


if __name__ == "__main__":
    main()
