"""``cascade serve`` as a process: the host guard, SIGTERM draining requests in flight, and
``--workers N`` through uvicorn's factory import string."""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from pathlib import Path

import httpx2 as httpx
import pytest

from cascade.cli import main
from tests.loopback import LoopbackServer, free_port
from tests.serve_kit import echo_handler, one_rung_toml, start_serve, wait_ready


def _toml(tmp_path: Path, base_url: str, server: str = "") -> Path:
    return one_rung_toml(tmp_path / "cascade.toml", base_url, server=server)


def test_refuses_a_public_host_without_client_keys(tmp_path: Path) -> None:
    cfg = _toml(tmp_path, "http://127.0.0.1:9/v1")
    err = io.StringIO()
    assert main(["serve", "--config", str(cfg), "--host", "0.0.0.0"], err=err) == 2
    assert "server.clients" in err.getvalue() and "--insecure" in err.getvalue()


def test_sigterm_drains_requests_in_flight_then_exits(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    openai_server.script(echo_handler(refuse=(), delay_s=1.5))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "audit.jsonl"
    proc = start_serve(_toml(tmp_path, openai_server.base_url, f'audit_log = "{log}"\n'),
                  port)
    try:
        wait_ready(url, proc)
        result: dict[str, httpx.Response] = {}

        def slow() -> None:
            result["r"] = httpx.post(f"{url}/v1/chat/completions", timeout=20, json={
                "model": "cascade", "messages": [{"role": "user", "content": "slow one"}]})

        t = threading.Thread(target=slow)
        t.start()
        while not openai_server.requests:  # the request has reached the model
            time.sleep(0.02)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=15)
        took = time.monotonic() - t0
        t.join(5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # uvicorn re-raises the signal once it has shut down: killed-by-SIGTERM is the clean exit
    assert rc in (0, -signal.SIGTERM)
    assert result["r"].status_code == 200
    assert result["r"].json()["choices"][0]["message"]["content"] == "small says: slow one"
    assert took < 10  # seconds, not the drain timeout's worth of waiting
    # the shutdown ran to its end: the audit log was flushed before the process exited
    assert '"answer":"small says: slow one"' in log.read_text()


def test_two_workers_serve_and_stop_on_sigterm(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    openai_server.script(echo_handler(refuse=()))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_serve(_toml(tmp_path, openai_server.base_url, 'name = "two"\n'), port,
                  "--workers", "2")
    try:
        wait_ready(url, proc, timeout_s=60)
        codes = [httpx.post(f"{url}/v1/chat/completions", timeout=20, json={
            "model": "two", "messages": [{"role": "user", "content": f"q{i}"}]}).status_code
            for i in range(6)]
        metrics = httpx.get(f"{url}/metrics").text
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert codes == [200] * 6
    # no [store]: each worker keeps its own breakers and drift alarm, and the log says so
    assert "--workers 2 with no [store]" in (tmp_path / "stderr.txt").read_text()
    # every worker's counts in one scrape (multiprocess mode), whichever worker answered
    assert 'cascade_requests_total{cache_hit="false",ladder="two",outcome="verified",' \
           'rung="small",verified="true"} 6.0' in metrics
    assert rc in (0, -signal.SIGTERM)


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone while we looked
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_workers_exit_when_their_supervisor_is_killed(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    openai_server.script(echo_handler(refuse=()))
    port = free_port()
    proc = start_serve(_toml(tmp_path, openai_server.base_url, 'name = "two"\n'), port,
                       "--workers", "2")
    workers: list[int] = []
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, timeout_s=60)
        workers += [c for c in _children(proc.pid)
                   if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()]
        assert len(workers) == 2
        proc.kill()  # no SIGTERM, no chance to stop them: they must notice for themselves
        proc.wait()
        deadline = time.monotonic() + 20
        while any(_alive(w) for w in workers):
            assert time.monotonic() < deadline, \
                f"workers {[w for w in workers if _alive(w)]} outlived their supervisor"
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)


def test_worker_connections_get_tcp_nodelay() -> None:
    """With --workers N uvicorn binds the socket itself (proto 0), and asyncio sets
    TCP_NODELAY only on accepted sockets marked TCP: without it each response waited out a
    delayed ACK (about 40 ms a request)."""
    import asyncio
    import socket

    import uvicorn

    from cascade.serve.cli import tcp_listener

    async def nodelay_of_accepted(listener: socket.socket) -> int:
        seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            s = writer.get_extra_info("socket")
            seen.set_result(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(accepted, sock=listener)
        _, w = await asyncio.open_connection(*listener.getsockname()[:2])
        value = await asyncio.wait_for(seen, 5)
        w.close()
        server.close()
        return value

    config = uvicorn.Config("cascade.serve.app:app_factory", host="127.0.0.1", port=free_port())
    assert asyncio.run(nodelay_of_accepted(tcp_listener(config.bind_socket()))) != 0


def test_a_config_the_workers_refuse_exits_2_instead_of_respawning_them(
        tmp_path: Path) -> None:
    """With ``--workers 2`` only the parent's checks ran before the workers started: a store
    setting each worker refused (a reservation TTL below the request timeout) made every
    worker die at start and the supervisor respawn it, for ever, with a traceback each time.
    The parent now builds what a worker builds first, and exits 2 naming the key."""
    import subprocess
    import sys

    cfg = one_rung_toml(tmp_path / "cascade.toml", "http://127.0.0.1:9/v1")
    cfg.write_text(cfg.read_text().replace("[[rungs]]", 'timeout_s = 20\n\n[[rungs]]', 1)
                   + '\n[store]\nurl = "redis://127.0.0.1:9/0"\nreservation_ttl_s = 5\n')
    done = subprocess.run([sys.executable, "-m", "cascade.cli", "serve", "--config", str(cfg),
                           "--workers", "2", "--port", str(free_port())],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "store.reservation_ttl_s" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_port_in_use_is_a_usage_error_not_no_answer(tmp_path: Path, workers: str) -> None:
    """uvicorn exits 3 when it cannot bind, which is our "no answer" code (README: health
    checks rely on the codes)."""
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        proc = start_serve(_toml(tmp_path, "http://127.0.0.1:9/v1"), port, "--workers", workers)
        rc = proc.wait(timeout=60)
    finally:
        taken.close()
    assert rc == 2
    assert "could not start" in (tmp_path / "stderr.txt").read_text()
