"""Hot reload of ``cascade serve``'s config: SIGHUP (a real child process) and a changed file
(in process), with the official ``openai`` SDK as the client. A good file swaps the ladder in
for new requests, a bad one (not TOML, gone, a mismatched router file) leaves the old one
answering and is reported in ``/healthz`` and ``/metrics``, and a request in flight during a
reload finishes on the config it started on."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2 as httpx
import numpy as np
import pytest

from cascade.config import parse_config
from cascade.errors import ConfigError
from cascade.messages import Message
from cascade.routing.model import fit_model
from cascade.serve import create_app
from cascade.serve.config import parse_server
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
)


def _handler(slow_s: float = 1.5) -> Callable[[RecordedRequest], Reply]:
    """Every model answers ``<model> says: <prompt>``; a prompt starting "slow" takes
    ``slow_s`` seconds."""

    def handle(req: RecordedRequest) -> Reply:
        prompt = last_user(req)
        return openai_reply(f"{req.json['model']} says: {prompt}", model=req.json["model"],
                            delay_s=slow_s if prompt.startswith("slow") else 0.0)

    return handle






def _until(url: str, ok: Callable[[dict[str, Any]], bool], timeout_s: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        h = config_health(url)
        if ok(h):
            return h
        assert time.monotonic() < deadline, f"/healthz never showed it: {h}"
        time.sleep(0.05)


def _reloads(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith("cascade_config_reloads_total{"):
            outcome = line.split('outcome="')[1].split('"')[0]
            out[outcome] = float(line.rsplit(" ", 1)[1])
    return out


# ---------------------------------------------------------------- SIGHUP, a real process


def test_sighup_swaps_in_a_new_ladder_and_keeps_it_when_the_next_file_is_bad(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    openai_server.script(_handler())
    cfg = tmp_path / "TUNED.toml"
    no_watch = "reload_poll_s = 0"  # only SIGHUP reloads here
    one_rung_toml(cfg, openai_server.base_url, model="small", server=no_watch)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_serve(cfg, port)
    try:
        wait_ready(url, proc)
        assert config_health(url)["source"] == str(cfg.resolve())
        assert ask(url).model == "small"
        one_rung_toml(cfg, openai_server.base_url, model="big", server=no_watch)
        assert ask(url).model == "small"  # a written file is not live until SIGHUP
        proc.send_signal(signal.SIGHUP)
        h = _until(url, lambda h: h["reloads"] == 1)
        assert h["last_reload_trigger"] == "sighup" and h["last_reload_error"] is None
        r = ask(url, "after")
        assert (r.model, r.choices[0].message.content) == ("big", "big says: after")

        cfg.write_text(cfg.read_text() + "\n[server]\nname = 'twice'\n")  # not valid TOML
        proc.send_signal(signal.SIGHUP)
        h = _until(url, lambda h: h["last_reload_outcome"] == "error")
        assert "not valid TOML" in h["last_reload_error"] and str(cfg.resolve()) in \
            h["last_reload_error"]
        assert h["reloads"] == 1
        r = ask(url, "still")
        assert (r.model, r.choices[0].message.content) == ("big", "big says: still")
        assert proc.poll() is None  # SIGHUP never kills it
        assert _reloads(url) == {"ok": 1.0, "error": 1.0}
    finally:
        stop(proc)
    assert "config reload (sighup) refused" in (tmp_path / "stderr.txt").read_text()


def test_a_request_in_flight_during_a_reload_finishes_on_the_old_ladder(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    openai_server.script(_handler(slow_s=2.0))
    cfg = tmp_path / "cascade.toml"
    log = tmp_path / "audit.jsonl"
    server = f'audit_log = "{log}"\nreload_poll_s = 0'
    one_rung_toml(cfg, openai_server.base_url, model="small", server=server)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_serve(cfg, port)
    try:
        wait_ready(url, proc)
        result: dict[str, Any] = {}
        slow = threading.Thread(target=lambda: result.update(r=ask(url, "slow one")))
        slow.start()
        while not openai_server.requests:  # the slow request has reached the model
            time.sleep(0.02)
        one_rung_toml(cfg, openai_server.base_url, model="big", server=server)
        proc.send_signal(signal.SIGHUP)
        _until(url, lambda h: h["reloads"] == 1)
        assert slow.is_alive()  # the swap happened while it was in flight
        assert ask(url, "new one").model == "big"
        slow.join(20)
        r = result["r"]
        assert (r.model, r.choices[0].message.content) == ("small", "small says: slow one")
        # the old config's audit log was flushed and closed after its last request
        deadline = time.monotonic() + 10
        while '"answer":"small says: slow one"' not in log.read_text():
            assert time.monotonic() < deadline, "the old config's audit line never came"
            time.sleep(0.05)
        assert '"answer":"big says: new one"' in log.read_text()
    finally:
        stop(proc)


def test_sighup_with_two_workers_reloads_each_worker_itself(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    openai_server.script(_handler())
    cfg = tmp_path / "cascade.toml"
    one_rung_toml(cfg, openai_server.base_url, model="small", server="reload_poll_s = 0")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_serve(cfg, port, "--workers", "2")
    try:
        wait_ready(url, proc, timeout_s=60)
        assert ask(url).model == "small"
        one_rung_toml(cfg, openai_server.base_url, model="big", server="reload_poll_s = 0")
        proc.send_signal(signal.SIGHUP)  # to the parent: it passes it on to each worker
        deadline = time.monotonic() + 30
        while _reloads(url).get("ok", 0) < 2:  # summed over the workers
            assert time.monotonic() < deadline, f"not every worker reloaded: {_reloads(url)}"
            time.sleep(0.1)
        assert [ask(url, f"q{i}").model for i in range(8)] == ["big"] * 8
        assert _reloads(url) == {"ok": 2.0}  # each worker once, none restarted
        assert proc.poll() is None
    finally:
        stop(proc)


# ---------------------------------------------------------------- the file watch, in process


def _router(path: Path, rungs: tuple[str, ...]) -> None:
    docs = [(Message(role="user", content=f"question number {i}"),) for i in range(6)]
    fit_model(docs, np.ones((6, len(rungs)), dtype=bool), rungs).save(path)


def test_a_changed_file_is_reloaded_and_a_bad_one_keeps_the_old_ladder(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    openai_server.script(_handler())
    cfg = tmp_path / "TUNED.toml"
    fast = "reload_poll_s = 0.05"
    one_rung_toml(cfg, openai_server.base_url, model="small", server=fast)
    with serving(create_app(cfg)) as url:
        assert ask(url).model == "small"
        h0 = config_health(url)
        assert h0["reloads"] == 0 and h0["last_reload_outcome"] is None

        one_rung_toml(cfg, openai_server.base_url, model="big", server=fast)
        h = _until(url, lambda h: h["reloads"] == 1)
        assert h["last_reload_trigger"] == "file changed" and h["loaded_at"] != h0["loaded_at"]
        assert ask(url, "new").choices[0].message.content == "big says: new"

        # a ConfigError: an unknown key, named in the error
        one_rung_toml(cfg, openai_server.base_url, model="other", server=fast + "\nnmae = 'x'")
        h = _until(url, lambda h: h["last_reload_outcome"] == "error")
        assert "server.nmae" in h["last_reload_error"]
        assert ask(url).model == "big"

        # an unreadable file (gone)
        cfg.unlink()
        h = _until(url, lambda h: "not found" in (h["last_reload_error"] or ""))
        assert ask(url).model == "big"
        assert _reloads(url) == {"ok": 1.0, "error": 2.0}

        # a good file again: swapped in, the error cleared
        one_rung_toml(cfg, openai_server.base_url, model="small", server=fast)
        h = _until(url, lambda h: h["reloads"] == 2)
        assert h["last_reload_error"] is None and h["last_reload_outcome"] == "ok"
        assert ask(url).model == "small"


def test_a_router_file_that_does_not_match_the_ladder_is_refused(
        tmp_path: Path, openai_server: LoopbackServer) -> None:
    openai_server.script(_handler())
    cfg = tmp_path / "cascade.toml"
    _router(tmp_path / "router.json", ("small",))
    routed = '[router]\npath = "router.json"\nskip_below = [0.0]\n'
    one_rung_toml(cfg, openai_server.base_url, model="small", server="reload_poll_s = 0.05",
                  extra=routed)
    with serving(create_app(cfg)) as url:
        assert ask(url).model == "small"
        # only the router file changes (as a retune that forgot the config would leave it)
        _router(tmp_path / "router.json", ("small", "big"))
        h = _until(url, lambda h: h["last_reload_outcome"] == "error")
        assert "do not match" in h["last_reload_error"]
        assert "router.json" in h["last_reload_error"]
        r = ask(url, "routed")
        assert (r.model, r.choices[0].message.content) == ("small", "small says: routed")


def test_reload_poll_s_is_validated(tmp_path: Path) -> None:
    base = {"rungs": [{"model": "m", "provider": "openai-compatible",
                       "base_url": "http://127.0.0.1:9/v1", "price": "unknown"}]}
    for bad in (-1, "1s", float("nan")):
        cfg = parse_config({**base, "server": {"reload_poll_s": bad}}, source="c.toml")
        with pytest.raises(ConfigError) as ei:
            parse_server(cfg)
        assert ei.value.key == "server.reload_poll_s"
    assert parse_server(parse_config({**base, "server": {"reload_poll_s": 0}},
                                     source="c.toml")).reload_poll_s == 0
