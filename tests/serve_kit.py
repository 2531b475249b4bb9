"""Running ``cascade serve``'s app on a free loopback port inside a test (uvicorn in a thread)
or as a child process, and ladders whose rungs are the loopback model servers of
``tests/loopback.py``."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx2 as httpx
import uvicorn
from fastapi import FastAPI

from cascade import CascadeConfig, parse_config
from tests.loopback import RecordedRequest, Reply, free_port, openai_reply

__all__ = ["close_opened", "echo_handler", "ladder", "one_rung_toml", "opened", "serving",
           "start_serve", "stop", "wait_ready"]

ROOT = Path(__file__).resolve().parents[1]

_C = TypeVar("_C")
_opened: list[Any] = []


def opened(client: _C) -> _C:
    """An SDK client to be closed when the test ends (``close_opened``, run by conftest). A
    client left to the garbage collector can drop its socket unclosed, and the ResourceWarning
    then fails whichever test happens to be running."""
    _opened.append(client)
    return client


def close_opened() -> None:
    while _opened:
        _opened.pop().close()


def ladder(tmp_path: Path, base_url: str, *, models: tuple[str, ...] = ("small", "big"),
           verifiers: list[dict[str, Any]] | None = None, **top: Any) -> CascadeConfig:
    """A ladder of ``models`` on one loopback server; prices make costs non-zero."""
    data: dict[str, Any] = {
        "rungs": [{"model": m, "provider": "openai-compatible", "base_url": base_url,
                   "input_usd_per_mtok": 1.0 * (i + 1), "output_usd_per_mtok": 2.0 * (i + 1),
                   "timeout_s": 5} for i, m in enumerate(models)],
        "verifiers": verifiers if verifiers is not None else [{"name": "refusal"}],
        "cache": {"enabled": False, "directory": str(tmp_path / "cache")},
        "retry": {"max_attempts": 1, "base_delay_s": 0, "max_delay_s": 0},
        **top,
    }
    return parse_config(data, source=str(tmp_path / "cascade.toml"))


def last_user(req: RecordedRequest) -> str:
    msgs = req.json["messages"]
    return str(next(m["content"] for m in reversed(msgs) if m["role"] == "user"))


def echo_handler(refuse: tuple[str, ...] = ("small",), delay_s: float = 0.0,
                 replies: Mapping[str, str] | None = None) -> Any:
    """Models in ``refuse`` refuse; the others answer ``<model> says: <prompt>``."""

    def handle(req: RecordedRequest) -> Reply:
        model = req.json["model"]
        if replies and model in replies:
            return openai_reply(replies[model], model=model, delay_s=delay_s)
        if model in refuse:
            return openai_reply("I'm sorry, but I can't help with that.", model=model,
                                delay_s=delay_s)
        return openai_reply(f"{model} says: {last_user(req)}", model=model, delay_s=delay_s)

    return handle


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free 127.0.0.1 port; yields the base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(),
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(15)




def one_rung_toml(path: Path, base_url: str, *, model: str = "small", server: str = "",
                  extra: str = "") -> Path:
    """Write a one-rung ladder on ``base_url`` as TOML (``server``: the ``[server]`` table's
    lines; ``extra``: more TOML at the end)."""
    path.write_text(f'''
[[rungs]]
model = "{model}"
provider = "openai-compatible"
base_url = "{base_url}"
timeout_s = 10
input_usd_per_mtok = 0.1
output_usd_per_mtok = 0.2

[cache]
enabled = false

[retry]
max_attempts = 1

[server]
{server}
{extra}
''')
    return path


def start_serve(config: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    """``cascade serve --config CONFIG --port PORT`` as a child process (stderr into
    ``stderr.txt`` beside the config)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(config.parent / "stderr.txt", "wb") as err:
        return subprocess.Popen([sys.executable, "-m", "cascade.cli", "serve", "--config",
                                 str(config), "--port", str(port), *extra], env=env, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=err)


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the service exited before it was ready"
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("the service did not become ready")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Kill a child service that is still running (the end of a test, passed or not)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def ask(url: str, prompt: str = "hi") -> Any:
    """One chat completion from ``cascade serve`` at ``url`` through the official SDK."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=20)
    with client:
        return client.chat.completions.create(
            model="cascade", messages=[{"role": "user", "content": prompt}])


def config_health(url: str) -> dict[str, Any]:
    """``/healthz``'s ``config`` part: the file in use and the last reload's outcome."""
    r = httpx.get(f"{url}/healthz", timeout=5)
    assert r.status_code == 200
    config: dict[str, Any] = r.json()["config"]
    return config


def workers_of(pid: int) -> set[int]:
    """The live uvicorn workers (multiprocessing spawn children) of ``pid``; a zombie has no
    command line, so a worker killed but not yet reaped is not one."""
    out = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (d / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and b"spawn_main" in cmd:
            out.add(int(d.name))
    return out
