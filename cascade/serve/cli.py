"""``cascade serve --config FILE [--host 127.0.0.1] [--port 8000] [--workers N] [--insecure]``.

Binding beyond loopback with no ``[[server.clients]]`` would hand the ladder (and its API keys'
spending) to anyone who can reach the port, so it is refused unless ``--insecure``. SIGTERM
stops accepting connections, lets requests in flight finish for up to
``[server] shutdown_timeout_s`` (default 10 s), flushes the audit log and exits. SIGHUP
reloads the config (as does a change of the file, see :mod:`cascade.serve.reload`); with
``--workers N`` the parent passes SIGHUP on to every worker and each reloads itself, keeping
its config when the new file is bad, instead of uvicorn's restart of every worker (whose
new workers would fail to start on a bad file); a worker whose parent dies drains and exits.
The parent keeps the text of the file as it last loaded (:class:`LastGood`), so a worker
that starts while the file is bad (one respawned after it died) serves that config, as its
siblings do, instead of dying at start and being respawned for ever; a worker that still
dies at start is respawned after a growing delay.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ipaddress
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from cascade.cli._args import int_in
from cascade.config import CascadeConfig
from cascade.errors import ConfigError

__all__ = ["LastGood", "add_arguments", "exit_with_parent", "forget_workers", "ignore_sighup",
           "is_loopback", "run", "tcp_listener"]

log = logging.getLogger("cascade.serve")


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

    from cascade.serve.app import CONFIG_ENV, LAST_GOOD_ENV, REQUIRE_CLIENTS_ENV, create_app
    from cascade.serve.config import parse_server
    from cascade.serve.reload import config_path, read_config

    path = config_path(ns.config)
    config, text = read_config(path)
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
        app = create_app(path, sighup=True, require_clients=require_clients)
        return _serving(lambda: uvicorn.run(app, **common))
    # Everything a worker checks as it builds its app (the store's settings, client keys,
    # verifier plugins, the router file), checked once here: a worker that fails to start
    # is respawned by the supervisor, so a bad config would loop instead of exiting 2.
    check(config, require_clients)
    _warn_unshared(config, ns.workers)
    os.environ[CONFIG_ENV] = str(path)
    # a reload in a worker must not drop every key either
    os.environ[REQUIRE_CLIENTS_ENV] = "1" if require_clients else "0"
    os.environ[_PARENT_ENV] = str(os.getpid())
    made = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # every worker's counts, summed into each scrape whichever worker answers it
        made = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="cascade-prom-")
    last_good = LastGood(path, config, text, require_clients)
    try:
        os.environ[LAST_GOOD_ENV] = str(last_good.file)
        return _serving(lambda: _supervise(uvicorn.Config(
            "cascade.serve.app:app_factory", factory=True, workers=ns.workers, **common),
            last_good))
    finally:
        last_good.close()
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)


def _serving(serve: Callable[[], None]) -> int:
    """Run the server until it stops: 0, or 2 (a usage error) when it could not start (the
    port taken, an address not on this machine: uvicorn's log line says which), for which
    uvicorn exits 3, our code for "no answer"."""
    from uvicorn.config import STARTUP_FAILURE

    from cascade.cli import EXIT_USAGE

    try:
        serve()
    except SystemExit as e:
        if e.code != STARTUP_FAILURE:
            raise
        print("cascade: the server could not start (see the error above)", file=sys.stderr)
        return EXIT_USAGE
    return 0


def _warn_unshared(config: CascadeConfig, workers: int) -> None:
    """Without ``[store]`` each of the workers keeps its own budgets, breakers and drift
    alarm: a budget then holds ``workers`` times over. Said at start, once."""
    if config.store:
        return
    capped = config.budget.limit_usd is not None
    log.warning("--workers %d with no [store]: each worker keeps its own %sbreakers and drift "
                "alarm; name a Redis in [store] to share them", workers,
                f"budgets (so [budget] limit_usd holds {workers} times over), " if capped else "")


def check(config: CascadeConfig, require_clients: bool) -> None:
    """Build what a worker builds from ``config`` (then close it): raises what it would."""
    from cascade.serve.service import Loaded

    Loaded(config, provider_factory=None, observers=(),
           require_clients=require_clients).cascade.close()


class LastGood:
    """In the supervisor of ``--workers N``: the config file's text as it last loaded (at
    start, then on each SIGHUP or change of the file that loads, checked as at start), which
    a worker starting while the file is bad serves instead (``$CASCADE_SERVE_LAST_GOOD``, see
    :func:`cascade.serve.app.app_factory`). A copy of the config file (key variables' names,
    perhaps a URL's credentials), so a 0600 file in a 0700 folder, removed at exit. The file is
    followed as the workers' watch does (``[server] reload_poll_s``; 0: SIGHUP only)."""

    def __init__(self, path: Path, config: CascadeConfig, text: str,
                 require_clients: bool) -> None:
        from cascade.serve.reload import signature, watched_files

        self.path, self._require_clients = path, require_clients
        self._use(config)
        self._folder = Path(tempfile.mkdtemp(prefix="cascade-serve-"))  # mode 0700
        self.file = self._folder / "last-good.toml"
        self._write(text)
        self._seen = self._pending = signature(watched_files(path, config))
        self._next_look = 0.0

    def _use(self, config: CascadeConfig) -> None:
        from cascade.serve.config import parse_server

        self.config, self._every = config, parse_server(config).reload_poll_s

    def _write(self, text: str) -> None:
        new = self._folder / "last-good.toml.new"
        fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(new, self.file)  # a worker reading it sees the old text or the new

    def refresh(self) -> bool:
        """Read the file again; keep it when it loads (False: the last good text stays)."""
        from cascade.serve.reload import read_config, signature, watched_files

        before = watched_files(self.path, self.config)
        seen = signature(before)  # taken first: a change made while it loads is a new one
        try:
            config, text = read_config(self.path)
            check(config, self._require_clients)
            self._write(text)
        except Exception as e:
            # each worker refuses it too, and logs why; this only keeps what it had
            log.debug("the supervisor keeps the last config that loaded: %s", e)
            ok = False
        else:
            self._use(config)
            ok = True
        after = watched_files(self.path, self.config)
        self._seen = self._pending = seen if after == before else signature(after)
        return ok

    def follow(self) -> None:
        """Called often (each supervisor tick): refresh once the files changed and then held
        still until the next look."""
        from cascade.serve.reload import signature, watched_files

        every, now = self._every, time.monotonic()
        if now < self._next_look:
            return
        self._next_look = now + (every if every > 0 else 1.0)
        files = watched_files(self.path, self.config)
        if every <= 0:  # watch off: SIGHUP only (what changed meanwhile is not a change)
            self._seen = self._pending = signature(files)
            return
        current = signature(files)
        if current == self._seen:
            self._pending = current
        elif current != self._pending:
            self._pending = current  # changed, or still being written: look again
        else:
            self.refresh()

    def close(self) -> None:
        shutil.rmtree(self._folder, ignore_errors=True)

    @staticmethod
    def discard(file: str | None) -> None:
        """Remove the last-good file (and its folder) of a supervisor that was killed, as its
        workers go: nobody else will. Only a file this class makes."""
        p = Path(file) if file else None
        if p is None or p.name != "last-good.toml" or not p.parent.name.startswith(
                "cascade-serve-"):
            return
        for f in (p, p.with_name(p.name + ".new")):
            with contextlib.suppress(OSError):
                f.unlink()
        with contextlib.suppress(OSError):
            p.parent.rmdir()


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
    Nor can it remove its :class:`LastGood` file: the workers do, as they go.
    """
    import threading

    # The supervisor's pid as it said it before starting us: a worker still starting when the
    # supervisor died would otherwise take init for its parent and wait for ever.
    parent = int(os.environ.get(_PARENT_ENV) or os.getppid())

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        from cascade.serve.app import LAST_GOOD_ENV

        LastGood.discard(os.environ.get(LAST_GOOD_ENV))
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="cascade-exit-with-parent", daemon=True).start()


RESPAWN_DELAYS_S = (0.0, 5.0, 10.0, 20.0, 40.0, 60.0)
"""How long the supervisor waits to replace a worker, by how many of that slot's workers in a
row exited with an error within ``QUICK_DEATH_S`` of their start (the last delay repeats); a
worker killed by a signal is replaced at once."""
QUICK_DEATH_S = 10.0


def _supervise(config: Any, last_good: LastGood) -> None:
    """uvicorn's multi-process supervisor, except that SIGHUP is passed on to the workers (and
    refreshes ``last_good``), the config file is followed for ``last_good``, and a worker that
    keeps dying at start is respawned after a growing delay, not about once a second."""
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors import Multiprocess

    class Workers(Multiprocess):
        def __init__(self, config: Any, sockets: list[socket.socket]) -> None:
            super().__init__(config, sockets)
            self.born: dict[int | None, float] = {}
            """When each live worker was first seen."""
            self.strikes: dict[int, int] = {}
            """Per slot: how many of its workers in a row died soon after they started."""
            self.due: dict[int, float] = {}
            """Per slot whose worker died: when its replacement may start."""

        def handle_hup(self) -> None:
            for worker in self.processes:
                if worker.pid is not None and worker.process.is_alive():
                    os.kill(worker.pid, signal.SIGHUP)
            last_good.refresh()

        def keep_subprocess_alive(self) -> None:
            last_good.follow()
            now = time.monotonic()
            workers = self.processes
            held = {i for i, w in enumerate(workers) if self._held(i, w, now)}
            # uvicorn replaces the dead (and hung) workers it is shown
            self.processes = [w for i, w in enumerate(workers) if i not in held]
            try:
                super().keep_subprocess_alive()
            finally:
                shown = iter(self.processes)
                self.processes = [w if i in held else next(shown) for i, w in enumerate(workers)]
            for i, (old, new) in enumerate(zip(workers, self.processes, strict=True)):
                if new is not old:
                    self.due.pop(i, None)
            self.born = {w.pid: self.born.get(w.pid, now) for w in self.processes
                         if w.process.exitcode is None}
            forget_workers({w.pid for w in workers} - {w.pid for w in self.processes})

        def _held(self, slot: int, worker: Any, now: float) -> bool:
            """Whether the dead ``worker``'s replacement must wait (never a live worker's)."""
            code = worker.process.exitcode
            if code in (None, STARTUP_FAILURE):  # alive, or uvicorn's to handle
                return False
            if slot not in self.due:  # found dead just now
                started = self.born.get(worker.pid)
                # an error (its app did not build, say), not a signal (SIGKILL, an OOM kill)
                failed = code > 0 and started is not None and now - started < QUICK_DEATH_S
                n = self.strikes[slot] = self.strikes.get(slot, 0) + 1 if failed else 0
                wait = RESPAWN_DELAYS_S[min(n, len(RESPAWN_DELAYS_S) - 1)]
                self.due[slot] = now + wait
                if wait:
                    log.warning("worker [%s] exited with code %d %.0f s after it started (%d "
                                "in a row): its replacement starts in %.0f s", worker.pid, code,
                                now - (started or now), n, wait)
            return now < self.due[slot]

    workers = Workers(config, sockets=[tcp_listener(config.bind_socket())])
    workers.run()
    if any(w.process.exitcode == STARTUP_FAILURE for w in workers.processes):
        # uvicorn stops every worker when one fails before serving (its lifespan raised) and
        # returns as from a SIGTERM; exit as ``--workers 1`` does, not 0
        raise SystemExit(STARTUP_FAILURE)


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
