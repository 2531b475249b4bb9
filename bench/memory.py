"""Peak memory of a 1,000-request run through ``aanswer_many``, against the bare SDK.

    python bench/memory.py [--n 1000] [--concurrency 100] [--rungs 2]

Each side runs in a fresh child process (peak RSS only ever grows within a process), against
the same loopback server in a third process, so the server's memory is nobody's. Reported:
RSS after imports and a 10-request warm-up, peak RSS (``getrusage``) after the run, and the
Python heap peak during the run (``tracemalloc``, which slows the run but not the figures).
The engine's answers keep their full traces; the baseline keeps the SDK's reply objects.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import anyio
from _common import (
    PROMPT,
    bare_client,
    ladder,
    machine,
    make_cascade,
    model_server,
    peak_rss_mb,
    print_table,
    rss_mb,
)


async def _engine(url: str, n: int, concurrency: int, rungs: int) -> dict[str, Any]:
    cascade, _how = make_cascade(ladder(url, rungs=rungs))
    try:
        await cascade.aanswer_many([PROMPT] * 10, concurrency=concurrency)
        before = rss_mb()
        tracemalloc.start()
        results = await cascade.aanswer_many([PROMPT] * n, concurrency=concurrency)
        _cur, heap_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        ok = sum(1 for r in results if not isinstance(r, Exception) and r.verified)
    finally:
        await cascade.aclose()
    return {"before": before, "heap_peak": heap_peak / 2**20, "ok": ok}


async def _bare(url: str, n: int, concurrency: int, rungs: int) -> dict[str, Any]:
    clients = [bare_client(url) for _ in range(rungs)]
    models = [f"refuse-{i}" for i in range(rungs - 1)] + ["answer"]
    results: list[Any] = [None] * n

    async def many(count: int) -> None:
        limiter = anyio.CapacityLimiter(concurrency)

        async def one(i: int) -> None:
            async with limiter:
                replies = []
                for client, model in zip(clients, models, strict=True):
                    replies.append(await client.chat.completions.create(
                        model=model, messages=[{"role": "user", "content": PROMPT}],
                        max_tokens=512, temperature=0.0, timeout=60.0))
                results[i] = replies

        async with anyio.create_task_group() as tg:
            for i in range(count):
                tg.start_soon(one, i)

    try:
        await many(10)
        before = rss_mb()
        tracemalloc.start()
        await many(n)
        _cur, heap_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    finally:
        for c in clients:
            await c.close()
    ok = sum(1 for r in results if r is not None)
    return {"before": before, "heap_peak": heap_peak / 2**20, "ok": ok}


def _child(ns: argparse.Namespace) -> int:
    fn = _engine if ns.child == "engine" else _bare
    out = anyio.run(fn, ns.url, ns.n, ns.concurrency, ns.rungs)
    out["peak"] = peak_rss_mb()
    print(json.dumps(out))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=100)
    ap.add_argument("--rungs", type=int, default=2, help="rungs called per request (default 2: "
                                                          "the first one is rejected)")
    ap.add_argument("--child", choices=("engine", "bare"), help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ns = ap.parse_args(argv)
    if ns.child:
        return _child(ns)
    res: dict[str, dict[str, Any]] = {}
    with model_server(mode="process") as url:
        for side in ("bare", "engine"):
            proc = subprocess.run(
                [sys.executable, __file__, "--child", side, "--url", url, "--n", str(ns.n),
                 "--concurrency", str(ns.concurrency), "--rungs", str(ns.rungs)],
                capture_output=True, text=True, check=True,
            )
            res[side] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"memory of {ns.n} requests × {ns.rungs} rung call(s), {ns.concurrency} in flight; MiB")
    print(f"({machine()})")
    rows = []
    for side, name in (("bare", "bare SDK"), ("engine", "Cascade.aanswer_many")):
        r = res[side]
        rows.append((name, r["before"], r["peak"], r["peak"] - r["before"], r["heap_peak"],
                     f"{r['ok']}/{ns.n}"))
    print_table(("run", "RSS before", "peak RSS", "growth", "heap peak (tracemalloc)", "ok"),
                rows)
    b, e = res["bare"], res["engine"]
    print(f"engine over bare: peak RSS {e['peak'] - b['peak']:+.1f} MiB, "
          f"heap peak {e['heap_peak'] - b['heap_peak']:+.1f} MiB "
          f"({(e['heap_peak'] - b['heap_peak']) * 1024 / ns.n:+.1f} KiB per request)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
