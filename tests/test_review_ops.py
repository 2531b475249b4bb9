"""Operations review: defects an operator would hit in metrics, /healthz, reload, the sync
loop and the local model server, each pinned by a test that failed before its fix."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx2 as httpx
import openai
import pytest

from cascade.serve import create_app
from cascade.serve.metrics import Metrics
from cascade.syncloop import LoopThread
from tests.loopback import LoopbackServer, RecordedRequest, Reply, free_port, openai_reply
from tests.serve_kit import (
    ask,
    config_health,
    last_user,
    one_rung_toml,
    serving,
    start_serve,
    stop,
    wait_ready,
    workers_of,
)

ROOT = Path(__file__).resolve().parents[1]


def _handler() -> Callable[[RecordedRequest], Reply]:
    def handle(req: RecordedRequest) -> Reply:
        return openai_reply(f"{req.json['model']} says: {last_user(req)}",
                            model=req.json["model"])

    return handle






def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


# ---------------------------------------------------------------- reload


def test_a_kubernetes_configmap_symlink_swap_is_reloaded(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    """A ConfigMap volume: cascade.toml -> ..data/cascade.toml, ..data -> ..<timestamp>; an
    update writes a new timestamped directory, swaps ..data atomically and deletes the old."""
    openai_server.script(_handler())
    fast = "reload_poll_s = 0.05"
    v1 = tmp_path / "..2026_01_01"
    v1.mkdir()
    one_rung_toml(v1 / "cascade.toml", openai_server.base_url, model="small", server=fast)
    (tmp_path / "..data").symlink_to(v1.name)
    cfg = tmp_path / "cascade.toml"
    cfg.symlink_to("..data/cascade.toml")
    with serving(create_app(cfg)) as url:
        assert ask(url).model == "small"
        v2 = tmp_path / "..2026_01_02"
        v2.mkdir()
        one_rung_toml(v2 / "cascade.toml", openai_server.base_url, model="big", server=fast)
        (tmp_path / "..data_tmp").symlink_to(v2.name)
        os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
        shutil.rmtree(v1)
        deadline = time.monotonic() + 20
        while True:
            h = config_health(url)
            if h["reloads"] or h["last_reload_outcome"] == "error":
                break
            assert time.monotonic() < deadline, h
            time.sleep(0.05)
        assert h["last_reload_error"] is None and h["reloads"] == 1
        assert ask(url).model == "big"


def test_cascade_serve_keeps_the_config_path_it_was_given(tmp_path: Path) -> None:
    """``cascade serve`` must hand the workers the symlink, not the file it points to now."""
    from cascade.serve.reload import config_path

    target = tmp_path / "..v1" / "cascade.toml"
    target.parent.mkdir()
    target.write_text("")
    link = tmp_path / "cascade.toml"
    link.symlink_to("..v1/cascade.toml")
    assert config_path(str(link)) == link
    assert config_path(str(link)).is_absolute()


# ---------------------------------------------------------------- /healthz


def test_healthz_does_not_show_credentials_in_an_endpoint_url(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    """/healthz needs no key; a rung's base_url may carry a proxy's basic-auth password or a
    key in its query string."""
    openai_server.script(_handler())
    base = openai_server.base_url.replace("http://", "http://proxyuser:s3cr3t-pw@")
    # (a key in the query string is refused at load: the SDKs append the path after it)
    cfg = one_rung_toml(tmp_path / "cascade.toml", base, server="reload_poll_s = 0")
    with serving(create_app(cfg)) as url:
        r = httpx.get(f"{url}/healthz", timeout=5)
    assert r.status_code == 200
    assert "s3cr3t" not in r.text
    assert "proxyuser" not in r.text
    (endpoint,) = r.json()["endpoints"]
    assert "127.0.0.1" in endpoint  # still says which endpoint it is


# ---------------------------------------------------------------- metrics


def _sample(text: str, prefix: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_audit_dropped_is_summed_over_workers_in_multiprocess_mode(tmp_path: Path) -> None:
    """With --workers N a scrape answered by a worker that dropped nothing must not show 0
    after one that dropped 5 showed 5: a counter that goes down reads as a reset."""
    prom = tmp_path / "prom"
    prom.mkdir()
    script = textwrap.dedent("""
        import sys
        from cascade.serve.metrics import Metrics
        m = Metrics("l", audit_dropped=lambda: int(sys.argv[1]))
        sys.stdout.write(m.render().decode())
    """)
    env = {**_env(), "PROMETHEUS_MULTIPROC_DIR": str(prom)}

    def scrape(dropped: int) -> float | None:
        out = subprocess.run([sys.executable, "-c", script, str(dropped)], env=env,
                             capture_output=True, text=True, timeout=60, check=True).stdout
        return _sample(out, "cascade_audit_dropped_total")

    assert scrape(5) == 5
    assert scrape(0) == 5  # another worker answers the next scrape


def test_a_drift_alarm_of_a_rung_no_longer_watched_goes_down() -> None:
    """A reload that removes a rung (or its drift threshold) must not leave its alarm at 1."""
    m = Metrics("l")
    m.set_drift({"small": {"alarm": True}, "mid": {"alarm": False}})
    assert _sample(m.render().decode(), 'cascade_drift_alarm{rung="small"}') == 1
    m.set_drift({"mid": {"alarm": False}})
    assert not _sample(m.render().decode(), 'cascade_drift_alarm{rung="small"}')


def _in_flight(url: str) -> float | None:
    """The summed gauge (0 when no worker has one), None while no worker answers."""
    try:
        text = httpx.get(f"{url}/metrics", timeout=5).text
    except httpx.TransportError:
        return None
    return _sample(text, "cascade_requests_in_flight{") or 0.0


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_in_flight_drops_back_when_workers_are_killed_mid_request(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    """A worker killed (OOM, SIGKILL) with requests in flight never counts them down; the
    supervisor must drop its live gauge, or the summed in-flight gauge stays up for ever."""
    def slow(req: RecordedRequest) -> Reply:
        return openai_reply("ok", model=req.json["model"], delay_s=30.0)

    openai_server.script(slow)
    cfg = one_rung_toml(tmp_path / "cascade.toml", openai_server.base_url,
                        server="reload_poll_s = 0")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_serve(cfg, port, "--workers", "2")
    try:
        wait_ready(url, proc, timeout_s=60)
        for i in range(2):
            threading.Thread(target=lambda: _ask_quietly(url), daemon=True,
                             name=f"slow-{i}").start()
        deadline = time.monotonic() + 30
        while _in_flight(url) != 2:
            assert time.monotonic() < deadline, _in_flight(url)
            time.sleep(0.1)
        workers = workers_of(proc.pid)
        assert len(workers) == 2
        for w in workers:
            os.kill(w, signal.SIGKILL)
        deadline = time.monotonic() + 40
        while _in_flight(url) != 0:  # the replacements answer; nothing is in flight
            assert proc.poll() is None
            assert time.monotonic() < deadline, f"in flight stays at {_in_flight(url)}"
            time.sleep(0.2)
        assert sorted(workers_of(proc.pid)) != sorted(workers)
    finally:
        stop(proc)


def _ask_quietly(url: str) -> None:
    with contextlib.suppress(openai.APIError):
        ask(url, "slow")


# ---------------------------------------------------------------- the sync loop


def test_the_sync_loop_works_in_a_forked_child() -> None:
    """A program that used the sync API and then forks (gunicorn --preload, celery prefork,
    multiprocessing's fork) must not hang in the child: the loop thread did not fork."""
    script = textwrap.dedent("""
        import os, signal, sys
        from cascade.syncloop import LoopThread

        async def one():
            return 1

        loop = LoopThread("t")
        assert loop.call(one) == 1
        pid = os.fork()
        if pid == 0:
            signal.alarm(20)  # a hang ends the child with SIGALRM
            ok = loop.call(one) == 1
            loop.stop()  # as Cascade.close() or atexit would
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        print(status)
        loop.stop()
    """)
    out = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0", "the forked child hung or failed in LoopThread.call"


def test_stop_ends_the_loop_thread_even_when_before_raises() -> None:
    async def one() -> int:
        return 1

    async def broken() -> None:
        raise RuntimeError("closing failed")

    loop = LoopThread("cascade-review-stop")
    assert loop.call(one) == 1
    thread = loop._thread
    assert thread is not None
    with pytest.raises(RuntimeError, match="closing failed"):
        loop.stop(broken)
    thread.join(15)
    assert not thread.is_alive(), "the loop thread was left running"
    assert loop.call(one) == 1  # a new loop starts on demand
    loop.stop()


def test_many_threads_share_one_loop_without_leaking_threads() -> None:
    async def one() -> int:
        return 1

    loop = LoopThread("cascade-review-many")
    before = threading.active_count()
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(loop.call(one)))
               for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [1] * 16
    assert threading.active_count() == before + 1  # the one loop thread
    loop.stop()
    assert threading.active_count() == before


# ---------------------------------------------------------------- the local model server


def test_the_local_server_exits_when_its_parent_dies_while_the_model_loads(
        tmp_path: Path) -> None:
    """The parent killed (SIGKILL) while a large model is still loading: the server must not
    go on loading it (minutes, gigabytes) with nobody to serve."""
    script = textwrap.dedent("""
        import sys, time
        from cascade.providers import local_server

        def slow_load(self, *a, **k):
            time.sleep(600)
            raise RuntimeError("never")

        local_server.LocalModel.__init__ = slow_load
        sys.exit(local_server.main(sys.argv[1:]))
    """)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    proc = subprocess.Popen([sys.executable, "-c", script, "--model", str(model),
                             "--exit-on-stdin-eof"], env=_env(), stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # it is importing and "loading" now
        assert proc.stdin is not None
        proc.stdin.close()  # what the parent's death does
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("the server went on loading with its parent gone")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
