"""``cascade serve --workers 2``: a worker that dies while the file on disk is bad (a reload of it
was refused, so the old config still serves) is replaced by one serving the last config that
loaded, as its siblings do, and saying so in ``/healthz`` and the log. Before, the
replacement loaded the bad file, died with a traceback and was respawned about once a second
for ever, the service one worker short. Real processes: the supervisor, its workers, SIGHUP,
SIGKILL."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2 as httpx
import numpy as np
import pytest
from starlette.applications import Starlette

from cascade.messages import Message
from cascade.routing.model import fit_model
from tests.loopback import LoopbackServer, free_port, reap
from tests.serve_kit import (
    echo_handler,
    one_rung_toml,
    start_serve,
    stop,
    wait_ready,
    workers_of,
)

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")

_BAD = "bogus_key = 1"  # an unknown [cache] key: a ConfigError naming cache.bogus_key

# A router file beside the config, named relative to it: the last good config must be read
# as the file itself (its folder), not as a copy kept elsewhere. One rung, always "r".
_ROUTED = '[router]\npath = "router.json"\nskip_below = [0.0]\n'


def _router(path: Path) -> None:
    docs = [(Message(role="user", content=f"question number {i}"),) for i in range(6)]
    fit_model(docs, np.ones((6, 1), dtype=bool), ("r",)).save(path)


def _last_good(worker: int) -> Path:
    """Where the supervisor keeps the last good config, as its worker was told."""
    env = dict(kv.split("=", 1) for kv in
               Path(f"/proc/{worker}/environ").read_text().split("\0") if "=" in kv)
    return Path(env["CASCADE_SERVE_LAST_GOOD"])


def _write(cfg: Path, base_url: str, model: str, *, bad: bool = False,
           poll: str = "0") -> None:
    one_rung_toml(cfg, base_url, model=model, server=f"reload_poll_s = {poll}", extra=_ROUTED)
    cfg.write_text(cfg.read_text().replace("model = ", 'name = "r"\nmodel = ', 1))
    if bad:
        cfg.write_text(cfg.read_text().replace("[cache]", f"[cache]\n{_BAD}"))


def _reloads(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith("cascade_config_reloads_total{"):
            out[line.split('outcome="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
    return out


def _models(url: str, n: int) -> list[str]:
    """The rung model that answered each of ``n`` chat completions, each on a new connection
    (so either worker may take it)."""
    out = []
    for i in range(n):
        r = httpx.post(f"{url}/v1/chat/completions", timeout=20, json={
            "model": "cascade", "messages": [{"role": "user", "content": f"q{i}"}]})
        assert r.status_code == 200, r.text
        out.append(r.json()["model"])
    return out


def _health(url: str) -> dict[str, Any] | None:
    """``/healthz`` of whichever worker answers (None: no answer)."""
    try:
        r = httpx.get(f"{url}/healthz", timeout=5)
    except httpx.TransportError:
        return None
    assert r.status_code == 200
    body: dict[str, Any] = r.json()
    return body


def _hup_until(proc: subprocess.Popen[bytes], url: str, done: Callable[[], bool]) -> None:
    """SIGHUP the supervisor until ``done`` (sent again now and then: a worker still starting
    ignores SIGHUP until its app is up)."""
    deadline = time.monotonic() + 20
    while True:
        proc.send_signal(signal.SIGHUP)
        again = time.monotonic() + 3
        while time.monotonic() < again:
            if done():
                return
            assert time.monotonic() < deadline, f"the reload never finished: {_reloads(url)}"
            time.sleep(0.05)


def _respawned(proc: subprocess.Popen[bytes], url: str, victim: int,
               watch_s: float) -> tuple[dict[str, Any], set[int]]:
    """SIGKILL ``victim``; wait for the ``/healthz`` of its replacement (trigger "worker
    start"), watching for at least ``watch_s`` seconds. Returns it and the workers started."""
    before = workers_of(proc.pid)
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    started: set[int] = set()
    seen: dict[str, Any] | None = None
    while time.monotonic() - killed < 15:
        started |= workers_of(proc.pid) - before
        h = _health(url)
        if h is not None and h["config"]["last_reload_trigger"] == "worker start":
            seen = h
        if seen is not None and time.monotonic() - killed >= watch_s:
            break
        time.sleep(0.1)
    assert proc.poll() is None
    assert len(started) <= 2, f"the supervisor respawned {len(started)} workers in " \
        f"{time.monotonic() - killed:.0f} s: the replacement does not start"
    assert seen is not None, "no worker's /healthz showed a start on the last good config"
    return seen, started


def _both(url: str, want: Callable[[dict[str, Any]], Any]) -> dict[Any, dict[str, Any]]:
    """``/healthz`` asked until two answers tell two workers apart by ``want``."""
    got: dict[Any, dict[str, Any]] = {}
    for _ in range(60):
        h = _health(url)
        if h is not None:
            got.setdefault(want(h), h)
        if len(got) >= 2:
            break
    return got


def test_a_worker_respawned_while_the_file_is_bad_serves_the_last_good_config(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    openai_server.script(echo_handler(refuse=()))
    base = openai_server.base_url
    cfg = tmp_path / "cascade.toml"
    _router(tmp_path / "router.json")
    _write(cfg, base, "small")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_serve(cfg, port, "--workers", "2")
    err = tmp_path / "stderr.txt"
    try:
        wait_ready(url, proc, timeout_s=60)
        # both workers up: each reloads the same file on SIGHUP (a worker still starting
        # would take the bad file below for the one it starts on)
        _hup_until(proc, url, lambda: _reloads(url).get("ok", 0) >= 2)
        # the operator writes a bad file and sends SIGHUP: both workers refuse it
        _write(cfg, base, "big", bad=True)
        _hup_until(proc, url, lambda: _reloads(url).get("error", 0) >= 2)
        workers = workers_of(proc.pid)
        assert len(workers) == 2
        errors = _reloads(url)["error"]

        # a worker dies (SIGKILL, an OOM kill): its replacement serves the old config
        h, started = _respawned(proc, url, min(workers), watch_s=3)
        assert len(started) == 1
        assert "Traceback" not in err.read_text()
        config = h["config"]
        assert config["source"] == str(cfg)
        assert config["last_reload_outcome"] == "error" and config["reloads"] == 0
        assert _reloads(url)["error"] == errors + 1  # the respawned's refusal is counted
        assert "cache.bogus_key" in config["last_reload_error"]
        assert str(cfg) in config["last_reload_error"]
        log = err.read_text()
        assert "cache.bogus_key" in log and "last config that loaded" in log
        # both workers answer, the old config (one refused the reload, one the file at start)
        both = _both(url, lambda h: h["config"]["last_reload_trigger"])
        assert set(both) == {"sighup", "worker start"}, both
        assert all(h["config"]["last_reload_outcome"] == "error" for h in both.values())
        assert _models(url, 8) == ["small"] * 8

        # the file fixed, SIGHUP: the new config serves in every worker, the respawned included
        _write(cfg, base, "big", poll="0.1")  # and from now on the file is watched
        _hup_until(proc, url, lambda: _reloads(url).get("ok", 0) >= 4)
        both = _both(url, lambda h: h["config"]["reloads"])  # 2 and 1 (the respawned)
        assert len(both) == 2 and all(
            h["config"]["last_reload_outcome"] == "ok" and h["config"]["last_reload_error"] is None
            for h in both.values()), both
        assert _models(url, 8) == ["big"] * 8

        # the supervisor keeps the last file that loaded, privately, for the next respawn
        kept = _last_good(min(workers_of(proc.pid)))
        assert stat.S_IMODE(kept.stat().st_mode) == 0o600
        assert stat.S_IMODE(kept.parent.stat().st_mode) == 0o700
        assert kept.read_text() == cfg.read_text()

        # a good file written, no SIGHUP: the workers' watch takes it, and the supervisor too
        time.sleep(1.2)  # a watch that was off (reload_poll_s = 0) looks again once a second
        ok = _reloads(url)["ok"]
        _write(cfg, base, "huge", poll="0.1")
        deadline = time.monotonic() + 15
        while '"huge"' not in kept.read_text() or _reloads(url)["ok"] < ok + 2:
            assert time.monotonic() < deadline, "the supervisor never took the changed file"
            time.sleep(0.05)
        # then a bad one: refused by the workers' watch and by the supervisor
        errors = _reloads(url)["error"]
        _write(cfg, base, "other", bad=True, poll="0.1")
        deadline = time.monotonic() + 15
        while _reloads(url)["error"] < errors + 2:
            assert time.monotonic() < deadline, f"the bad file was never refused: {_reloads(url)}"
            time.sleep(0.05)
        time.sleep(0.5)  # the supervisor's own look at it
        assert '"huge"' in kept.read_text() and _BAD not in kept.read_text()
        h, _ = _respawned(proc, url, max(workers_of(proc.pid)), watch_s=0)
        assert "cache.bogus_key" in h["config"]["last_reload_error"]
        assert _models(url, 6) == ["huge"] * 6

        proc.send_signal(signal.SIGTERM)
        reap(proc, 20)
        assert not kept.parent.exists()  # removed at exit
    finally:
        stop(proc)
    assert "Traceback" not in err.read_text()


def test_a_worker_that_cannot_start_even_on_the_last_good_config_is_respawned_slowly(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    """What the file names can break with the file itself unchanged (here the audit log's
    folder is now a file): the replacement fails on the last good config too, and dies. The
    supervisor still replaces it, but after a growing delay, not about once a second."""
    openai_server.script(echo_handler(refuse=()))
    cfg = one_rung_toml(tmp_path / "cascade.toml", openai_server.base_url,
                        server=f'reload_poll_s = 0\naudit_log = "{tmp_path}/logs/audit.jsonl"')
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_serve(cfg, port, "--workers", "2")
    err = tmp_path / "stderr.txt"
    try:
        wait_ready(url, proc, timeout_s=60)
        _hup_until(proc, url, lambda: _reloads(url).get("ok", 0) >= 2)  # both workers up
        workers = workers_of(proc.pid)
        shutil.rmtree(tmp_path / "logs")
        (tmp_path / "logs").write_text("")  # no folder for the audit log any more
        before = workers
        os.kill(min(workers), signal.SIGKILL)
        killed = time.monotonic()
        started: set[int] = set()
        while time.monotonic() - killed < 4:
            started |= workers_of(proc.pid) - before
            time.sleep(0.1)
        assert len(started) == 1, f"{len(started)} workers started in 4 s"
        # the supervisor notices the death at its next look (a busy machine: later)
        deadline = time.monotonic() + 15
        while "its replacement starts in" not in (log := err.read_text()):
            assert time.monotonic() < deadline, "the supervisor never said it would wait"
            time.sleep(0.1)
        # it died once, saying why: the file's error, then the last good config's
        assert "FileExistsError" in log
        assert "During handling of the above exception" in log
        assert log.count("its replacement starts in 5 s") == 1
        assert _models(url, 2) == ["small"] * 2  # the other worker serves on
        assert proc.poll() is None

        # a supervisor killed outright cannot remove its last good config: its workers do
        kept = _last_good(max(workers_of(proc.pid)))
        assert kept.is_file()
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 10
        while kept.parent.exists():
            assert time.monotonic() < deadline, "the killed supervisor's copy stayed"
            time.sleep(0.1)
    finally:
        stop(proc)


@asynccontextmanager
async def _lifespan_fails(app: Starlette) -> AsyncIterator[None]:
    raise RuntimeError("the lifespan of this app always fails")
    yield  # pragma: no cover


lifespan_fails = Starlette(lifespan=_lifespan_fails)
"""An app whose workers all fail before serving, imported by the supervisor's workers."""


def test_a_supervisor_whose_workers_fail_to_start_exits_2_as_one_worker_does(
        tmp_path: Path) -> None:
    """A worker whose lifespan fails exits with uvicorn's start-up failure code; uvicorn then
    stops the other workers and returns as it does after a SIGTERM. ``--workers 1`` exits 2
    (could not start) for it; the supervisor exited 0, as if all had gone well."""
    script = tmp_path / "supervise.py"
    script.write_text(f"""
import sys, uvicorn
from cascade.serve.cli import _serving, _supervise
class NoFile:
    def refresh(self): pass
    def follow(self): pass
if __name__ == "__main__":  # the workers are spawned: they import this file
    config = uvicorn.Config("tests.test_serve_respawn:lifespan_fails", host="127.0.0.1",
                            port={free_port()}, workers=2, lifespan="on", log_level="warning")
    sys.exit(_serving(lambda: _supervise(config, NoFile())))
""")
    root = str(Path(__file__).parent.parent)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": root})
    assert "the lifespan of this app always fails" in proc.stderr
    assert proc.returncode == 2, proc.stderr
    assert "the server could not start" in proc.stderr
