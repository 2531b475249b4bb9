"""The network guard every test runs under (``tests/conftest.py`` uses :func:`no_network`).

An audit hook sees every ``socket.connect``/``connect_ex``: a connection to anything but
127.0.0.0/8, ::1, ``localhost`` or a Unix socket raises :class:`NonLoopbackConnection` and is
recorded, and the autouse fixture fails the test afterwards, so a test whose code swallows the
refusal (an SDK turning it into a connection error, say) fails all the same.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from collections.abc import Iterator
from typing import Any

import pytest

__all__ = ["NETWORK_VIOLATIONS", "NonLoopbackConnection", "no_network"]


class NonLoopbackConnection(RuntimeError):
    """A test tried to connect somewhere other than 127.0.0.0/8, ::1 or a Unix socket."""


NETWORK_VIOLATIONS: list[str] = []
"""Every refused connection of the running test (checked after it, so a swallowed refusal
still fails the test)."""


def _loopback(host: object) -> bool:
    if not isinstance(host, str):
        return False
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is loopback too
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def _network_guard(event: str, args: tuple[Any, ...]) -> None:
    """An audit hook: ``socket.connect`` to a non-loopback address raises and is recorded."""
    if event != "socket.connect":
        return
    sock, address = args
    if getattr(sock, "family", None) == getattr(socket, "AF_UNIX", None):
        return
    host = address[0] if isinstance(address, tuple) and address else address
    if not _loopback(host):
        NETWORK_VIOLATIONS.append(f"connect to {address!r}")
        raise NonLoopbackConnection(f"tests must not leave 127.0.0.1; refused connect to "
                                    f"{address!r}")


sys.addaudithook(_network_guard)  # audit hooks cannot be removed: installed once per process


@pytest.fixture(autouse=True)
def no_network() -> Iterator[None]:
    NETWORK_VIOLATIONS.clear()
    yield
    if NETWORK_VIOLATIONS:
        found = list(NETWORK_VIOLATIONS)
        NETWORK_VIOLATIONS.clear()
        pytest.fail(f"the test opened non-loopback connection(s): {found}", pytrace=False)
