"""A real ``redis-server`` on a free loopback port, for the shared-store tests.

No persistence (``--save "" --appendonly no``), its own temporary directory, and the controls a
test needs to make an outage: :meth:`kill` (SIGKILL), :meth:`pause` / :meth:`resume`
(SIGSTOP/SIGCONT: connections hang instead of being refused) and :meth:`start` again on the
same port.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.loopback import reap

__all__ = ["RedisServer", "redis_server"]

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    def __init__(self, *, password: str | None = None) -> None:
        self.port = _free_port()
        self.password = password
        self._dir = tempfile.mkdtemp(prefix="cascade-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", self._dir, "--logfile", "",
                "--loglevel", "warning"]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    reply = s.recv(64)
                if reply.startswith((b"+PONG", b"-NOAUTH")):
                    return self
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None:
            self.resume()
            self.proc.terminate()
            reap(self.proc, 10)
            self.proc = None
        shutil.rmtree(self._dir, ignore_errors=True)


@contextmanager
def redis_server(*, password: str | None = None) -> Iterator[RedisServer]:
    """Start a server for the block (skips the test when redis-server is not installed)."""
    if not os.path.exists(REDIS_SERVER):
        pytest.skip("redis-server is not installed (.ci/run installs Debian's package)")
    server = RedisServer(password=password).start()
    try:
        yield server
    finally:
        server.stop()
