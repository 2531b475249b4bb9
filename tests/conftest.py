"""Shared test setup: the anyio backend, tiktoken's encodings from the shared offline cache, and
a guard that fails any test opening a connection to anything but this machine."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.loopback import LoopbackServer
from tests.netguard import no_network
from tests.serve_kit import close_opened

__all__ = ["no_network"]  # an autouse fixture: every test runs under the network guard

# tiktoken must never reach for the network in tests: point it at the encodings shipped beside
# the repo (CI sets this too). setdefault keeps an explicit setting.
_SHARED_TIKTOKEN = Path(__file__).resolve().parents[2] / "shared" / "tiktoken"
if _SHARED_TIKTOKEN.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(_SHARED_TIKTOKEN))


# Shared-store budget journals (platformdirs' state folder) go to a folder of this run, never
# the developer's own; worker processes the tests start inherit it.
_STATE_HOME = tempfile.mkdtemp(prefix="cascade-test-state-")
os.environ["XDG_STATE_HOME"] = _STATE_HOME


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# ---------------------------------------------------------------- loopback wire-protocol servers


@pytest.fixture
def openai_server() -> Iterator[LoopbackServer]:
    """A real HTTP server on 127.0.0.1 speaking OpenAI chat completions; see tests/loopback.py."""
    with LoopbackServer("openai") as server:
        yield server


@pytest.fixture
def anthropic_server() -> Iterator[LoopbackServer]:
    """A real HTTP server on 127.0.0.1 speaking the Anthropic messages API."""
    with LoopbackServer("anthropic") as server:
        yield server


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Remove this run's state folder. llama-cpp-python opens /dev/null twice at import and
    never closes it; close them so the interpreter's exit does not print ResourceWarnings that
    are not ours."""
    import shutil
    import sys

    shutil.rmtree(_STATE_HOME, ignore_errors=True)

    utils = sys.modules.get("llama_cpp._utils")
    for name in ("outnull_file", "errnull_file"):
        f = getattr(utils, name, None)
        if f is not None and not f.closed:
            f.close()


@pytest.fixture(autouse=True)
def _fresh_breakers() -> Iterator[None]:
    """Breakers are process-wide: each test starts (and leaves) every circuit closed."""
    from cascade.breaker import reset_default_breakers

    reset_default_breakers()
    yield
    reset_default_breakers()


@pytest.fixture(autouse=True)
def _close_opened_clients() -> Iterator[None]:
    yield
    close_opened()


@pytest.fixture(autouse=True)
def _collect_garbage_after_each_test() -> Iterator[None]:
    """With CASCADE_TEST_GC=1, a full garbage collection after every test, so an unclosed
    socket fails the test that leaked it instead of a random later one (it triples the run's
    time, so it is a hunting aid, off by default)."""
    yield
    if os.environ.get("CASCADE_TEST_GC") == "1":
        import gc

        gc.collect()
