"""Shared pieces of the benchmarks: the loopback model server, ladders, baselines, percentiles.

The server is ``tests/loopback.py``'s real HTTP/1.1 server speaking the OpenAI protocol. It runs
in a child process by default (``--server process``) so that its own CPU time does not compete
with the client for the GIL; ``--server thread`` runs it in a thread of the bench process, as the
tests do. A model named ``refuse-*`` answers with a refusal (the refusal verifier rejects it, so
the climb goes on); every other model answers a short factual sentence.

Run directly, this module is that child server: ``python bench/_common.py serve [--delay S]``
prints the port on stdout and serves until its stdin closes.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import resource
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
# Token estimates must never reach for the network: use the encodings shipped beside the repo.
_TIKTOKEN = REPO.parent / "shared" / "tiktoken"
if _TIKTOKEN.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(_TIKTOKEN))

import openai  # noqa: E402

from cascade.config import CascadeConfig, parse_config  # noqa: E402
from cascade.engine import Cascade  # noqa: E402
from cascade.providers.base import Completion, ModelCall  # noqa: E402
from cascade.testing import FunctionProvider, completion  # noqa: E402
from tests.loopback import (  # noqa: E402
    LoopbackServer,
    RecordedRequest,
    Reply,
    openai_reply,
    reap,
)

__all__ = [
    "ANSWER",
    "PROMPT",
    "REFUSAL",
    "ServerMode",
    "Stats",
    "add_server_arg",
    "bare_client",
    "bare_create",
    "instant_provider",
    "instant_reply",
    "ladder",
    "machine",
    "make_cascade",
    "model_server",
    "peak_rss_mb",
    "percentile",
    "print_table",
    "rss_mb",
    "stats",
]

ServerMode = Literal["process", "thread"]
PROMPT = "What is the capital of France? Answer in one sentence."
ANSWER = "Paris is the capital of France."
REFUSAL = "I'm sorry, but I can't help with that request."
_DUMMY_KEY = "sk-no-key-required"


# ---------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between closest ranks."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class Stats:
    """Latency summary in milliseconds."""

    n: int
    p50: float
    p99: float
    mean: float


def stats(seconds: Sequence[float]) -> Stats:
    ms = [s * 1000.0 for s in seconds]
    return Stats(len(ms), percentile(ms, 50), percentile(ms, 99), sum(ms) / max(1, len(ms)))


def print_table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain fixed-width table; floats get three decimals."""
    cells = [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(head)]
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w)
                     for i, (h, w) in enumerate(zip(head, widths, strict=True)))
    print(line)
    print("-" * len(line))
    for r in cells:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(r, widths, strict=True))))


def machine() -> str:
    """Cores and load: benchmarks on a busy machine must say so next to their figures."""
    try:
        load = f"load average {os.getloadavg()[0]:.1f}"
    except OSError:
        load = "load unknown"
    return f"{os.cpu_count()} cores, {load}, Python {sys.version.split()[0]}"


def rss_mb() -> float:
    """Current resident set size (Linux ``/proc``; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return peak_rss_mb()


def peak_rss_mb() -> float:
    """Peak resident set size of this process (``ru_maxrss`` is KiB on Linux)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


# ---------------------------------------------------------------- the model server


def _handler(delay_s: float) -> Any:
    replies: dict[str, Reply] = {}

    def handle(req: RecordedRequest) -> Reply:
        model = req.json.get("model", "") if isinstance(req.json, dict) else ""
        reply = replies.get(model)
        if reply is None:
            text = REFUSAL if model.startswith("refuse") else ANSWER
            reply = replies[model] = openai_reply(text, model=model, delay_s=delay_s,
                                                  prompt_tokens=15, completion_tokens=8)
        return reply

    return handle


class _QuietServer(LoopbackServer):
    """The loopback server without its per-request record (a bench sends millions)."""

    def _reply_for(self, req: RecordedRequest) -> Reply:
        return self._handler(req)


@contextlib.contextmanager
def model_server(*, delay_s: float = 0.0, mode: ServerMode = "process") -> Iterator[str]:
    """An OpenAI-compatible server on 127.0.0.1; yields its base URL (with ``/v1``)."""
    if mode == "thread":
        server = _QuietServer("openai")
        server.script(_handler(delay_s))
        with server:
            yield server.base_url
        return
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "serve", "--delay", str(delay_s)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line.isdigit():
            raise RuntimeError(f"the model server did not start (said {line!r})")
        yield f"http://127.0.0.1:{line}/v1"
    finally:
        assert proc.stdin is not None
        proc.stdin.close()  # the child serves until its stdin closes
        reap(proc, 10)


def add_server_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", choices=("process", "thread"), default="process",
                   help="run the loopback model server in a child process (default) or in a "
                        "thread of this process")


# ---------------------------------------------------------------- ladders and baselines


def ladder(base_url: str, *, rungs: int = 1, cache_dir: str | None = None) -> CascadeConfig:
    """``rungs`` loopback rungs; with two or more, every rung but the last is refused.

    ``max_retries = 0`` and no deadline: a benchmark must fail loudly, not retry quietly.
    ``transport = "httpx"``: the HTTP client of the bare-SDK baseline, so the engine's cost is
    measured over the same client (``auto`` would take aiohttp, faster by itself).
    """
    models = [f"refuse-{i}" for i in range(rungs - 1)] + ["answer"]
    return parse_config({
        "rungs": [{"model": m, "provider": "openai-compatible", "base_url": base_url,
                   "max_retries": 0, "price": "unknown", "transport": "httpx"}
                  for m in models],
        "cache": {"enabled": False} if cache_dir is None else {"directory": cache_dir},
    }, source="<bench>")


def make_cascade(config: CascadeConfig, **kw: Any) -> tuple[Cascade, str]:
    """A Cascade with the built-in refusal verifier: by name when the plugin table has it,
    else the same class given in code. Returns the cascade and how the verifier was loaded."""
    from cascade.config import VerifierConfig
    from cascade.plugins import load_verifier

    try:
        load_verifier(VerifierConfig(name="refusal"))
    except NotImplementedError:
        from verifiers.refusal import RefusalVerifier

        return Cascade(config, verifiers=[RefusalVerifier()], **kw), "refusal (given in code)"
    cfg = parse_config({
        "rungs": [{"model": r.model, "provider": r.provider, "base_url": r.base_url,
                   "price": "unknown", "max_retries": 0} for r in config.rungs],
        "verifiers": ["refusal"],
        "cache": ({"enabled": False} if not config.cache.enabled
                  else {"directory": config.cache.directory}),
    }, source="<bench>")
    return Cascade(cfg, **kw), "refusal (built-in, by name)"


def instant_reply(call: ModelCall) -> Completion:
    """What the loopback server would answer, at once and in-process: the engine alone."""
    text = REFUSAL if call.model.startswith("refuse") else ANSWER
    return completion(text, call, input_tokens=15, output_tokens=8)


def instant_provider() -> FunctionProvider:
    """The shipped function-backed double answering :func:`instant_reply`
    (use ``.factory`` as ``provider_factory``)."""
    return FunctionProvider(instant_reply)


def bare_client(base_url: str) -> openai.AsyncOpenAI:
    """The SDK client the provider would build: same key, URL, no SDK retries."""
    return openai.AsyncOpenAI(api_key=_DUMMY_KEY, base_url=base_url, max_retries=0, timeout=60.0)


async def bare_create(client: openai.AsyncOpenAI, model: str = "answer") -> str:
    """The baseline call: the request the engine sends for the same rung, and nothing else."""
    reply = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=512,
        temperature=0.0, timeout=60.0,
    )
    return reply.choices[0].message.content or ""


# ---------------------------------------------------------------- child server entry point


def _serve(delay_s: float) -> None:
    server = _QuietServer("openai")
    server.script(_handler(delay_s))
    with server:
        print(server.port, flush=True)
        sys.stdin.read()  # until the parent closes the pipe (or dies)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("command", choices=("serve",))
    ap.add_argument("--delay", type=float, default=0.0)
    _serve(ap.parse_args().delay)
