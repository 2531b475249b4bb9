"""``cascade serve --config FILE [--host 127.0.0.1] [--port 8000] [--workers N] [--insecure]``.

Binding beyond loopback with no ``[[server.clients]]`` would hand the ladder (and its API keys'
spending) to anyone who can reach the port, so it is refused unless ``--insecure``. SIGTERM
stops accepting connections, lets requests in flight finish for up to
``[server] shutdown_timeout_s`` (default 10 s), flushes the audit log and exits. SIGHUP
reloads the config (as does a change of the file, see :mod:`cascade.serve.reload`); with
``--workers N`` the parent passes SIGHUP on to every worker and each reloads itself, keeping
its config when the new file is bad, instead of uvicorn's restart of every worker (whose
new workers would fail to start on a bad file); a worker whose parent dies drains and exits.
"""

from __future__ import annotations

import argparse
import copy
import ipaddress
import logging
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterable
from typing import Any

from cascade.cli._args import int_in
from cascade.config import load_config
from cascade.errors import ConfigError

__all__ = ["add_arguments", "exit_with_parent", "forget_workers", "ignore_sighup",
           "is_loopback", "run", "tcp_listener"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="the ladder's TOML file ([server] table "
                   "for the name, clients and audit log)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int_in(1, 65535), default=8000, help="port (default 8000)")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes (default 1); each holds its own ladder")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback host with no client keys configured")


_PARENT_ENV = "CASCADE_SERVE_SUPERVISOR_PID"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(ns: argparse.Namespace) -> int:
    import uvicorn

    from cascade.serve.app import CONFIG_ENV, REQUIRE_CLIENTS_ENV, create_app
    from cascade.serve.config import parse_server
    from cascade.serve.reload import config_path

    path = config_path(ns.config)
    config = load_config(path)
    server = parse_server(config)
    if ns.workers < 1:
        raise ConfigError("must be >= 1", source="command line", key="--workers")
    require_clients = not is_loopback(ns.host) and not ns.insecure
    if require_clients and not server.clients:
        raise ConfigError(
            f"refusing to serve on {ns.host} with no client keys: anyone who can reach the "
            "port could spend the ladder's money. Add [[server.clients]] (name, key_env, "
            "budget_key), bind 127.0.0.1, or pass --insecure", source=str(path),
            key="server.clients")
    verbose = logging.getLogger().isEnabledFor(logging.INFO)
    common = {"host": ns.host, "port": ns.port, "access_log": verbose,
              "log_level": "info" if verbose else "warning", "log_config": log_config(),
              "timeout_graceful_shutdown": server.shutdown_timeout_s}
    ignore_sighup()  # until the app's lifespan takes SIGHUP over: not a reason to die
    if ns.workers == 1:
        uvicorn.run(create_app(path, sighup=True, require_clients=require_clients), **common)
        return 0
    # Everything a worker checks as it builds its app (the store's settings, client keys,
    # verifier plugins, the router file), checked once here: a worker that fails to start
    # is respawned by the supervisor, so a bad config would loop instead of exiting 2.
    from cascade.serve.service import Loaded

    Loaded(config, provider_factory=None, observers=(),
           require_clients=require_clients).cascade.close()
    os.environ[CONFIG_ENV] = str(path)
    # a reload in a worker must not drop every key either
    os.environ[REQUIRE_CLIENTS_ENV] = "1" if require_clients else "0"
    os.environ[_PARENT_ENV] = str(os.getpid())
    made = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # every worker's counts, summed into each scrape whichever worker answers it
        made = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="cascade-prom-")
    try:
        _supervise(uvicorn.Config("cascade.serve.app:app_factory", factory=True,
                                  workers=ns.workers, **common))
    finally:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
    return 0


class QueryRedactor(logging.Filter):
    """Cuts the query string from uvicorn's access log lines: a client that puts its key in
    the URL (``?key=sk-...``) must not have it written to the log (keys are never logged)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) \
                and "?" in args[2]:
            record.args = (*args[:2], args[2].split("?", 1)[0] + "?...", *args[3:])
        return True


def log_config() -> dict[str, Any]:
    """uvicorn's logging config with :class:`QueryRedactor` on the access log (each worker
    process applies it as it starts)."""
    from uvicorn.config import LOGGING_CONFIG

    cfg = copy.deepcopy(LOGGING_CONFIG)
    cfg.setdefault("filters", {})["no_query"] = {"()": f"{__name__}.QueryRedactor"}
    cfg["handlers"]["access"]["filters"] = ["no_query"]
    return cfg


def ignore_sighup() -> None:
    """Ignore SIGHUP in this process until an app's lifespan handles it (a reload)."""
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)


def exit_with_parent(poll_s: float = 1.0) -> None:
    """In a worker: SIGTERM this process (a graceful drain) once its parent is gone.

    A supervisor killed outright (SIGKILL, OOM) cannot stop its workers, and uvicorn's do not
    notice: they went on holding the port, the model connections and the audit log's tail.
    """
    import threading
    import time

    # The supervisor's pid as it said it before starting us: a worker still starting when the
    # supervisor died would otherwise take init for its parent and wait for ever.
    parent = int(os.environ.get(_PARENT_ENV) or os.getppid())

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="cascade-exit-with-parent", daemon=True).start()


def _supervise(config: Any) -> None:
    """uvicorn's multi-process supervisor, except that SIGHUP is passed on to the workers."""
    from uvicorn.supervisors import Multiprocess

    class Workers(Multiprocess):
        def handle_hup(self) -> None:
            for worker in self.processes:
                if worker.pid is not None and worker.process.is_alive():
                    os.kill(worker.pid, signal.SIGHUP)

        def keep_subprocess_alive(self) -> None:
            before = {w.pid for w in self.processes}
            super().keep_subprocess_alive()  # replaces the workers that died or hung
            forget_workers(before - {w.pid for w in self.processes})

    Workers(config, sockets=[tcp_listener(config.bind_socket())]).run()


def forget_workers(pids: Iterable[int | None]) -> None:
    """Drop dead workers' live gauges (``cascade_requests_in_flight``) from the multiprocess
    directory: a worker killed with requests in flight never counted them down, so the sum
    every scrape shows would stay up for ever. Their counters stay (counts never go down)."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder:
        return
    from prometheus_client import multiprocess

    for pid in pids:
        if pid is not None:
            multiprocess.mark_process_dead(pid, folder)  # type: ignore[no-untyped-call]


def tcp_listener(sock: socket.socket) -> socket.socket:
    """The listening socket, marked as TCP. uvicorn makes it with ``proto=0``, and asyncio
    sets ``TCP_NODELAY`` only on accepted sockets whose ``proto`` says TCP: without it every
    response written in two parts (head, body) waited out a delayed ACK, about 40 ms a
    request with ``--workers 2``."""
    if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.proto == 0:
        return socket.socket(sock.family, sock.type, socket.IPPROTO_TCP, fileno=sock.detach())
    return sock
