"""The conftest guard: a test that connects anywhere but loopback fails, even if it swallows the
refusal; loopback connections are untouched."""

from __future__ import annotations

import socket

import pytest

from tests.loopback import LoopbackServer, openai_reply
from tests.netguard import NETWORK_VIOLATIONS, NonLoopbackConnection

pytest_plugins = ["pytester"]


def test_a_non_loopback_connect_is_refused_and_recorded() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s, \
            pytest.raises(NonLoopbackConnection, match=r"203\.0\.113\.7"):
        s.connect(("203.0.113.7", 9))  # TEST-NET-3: refused before any packet leaves
    assert NETWORK_VIOLATIONS == ["connect to ('203.0.113.7', 9)"]
    NETWORK_VIOLATIONS.clear()  # this test expected it; the guard would fail it otherwise


def test_ipv6_and_connect_ex_are_guarded_too() -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s, \
            pytest.raises(NonLoopbackConnection):
        s.connect_ex(("2001:db8::1", 9, 0, 0))
    NETWORK_VIOLATIONS.clear()


def test_what_counts_as_loopback() -> None:
    from tests.netguard import _loopback

    for host in ("127.0.0.1", "127.8.9.10", "::1", "localhost", "::ffff:127.0.0.1"):
        assert _loopback(host), host
    for host in ("10.0.0.1", "::ffff:8.8.8.8", "example.com", "0.0.0.0", None):
        assert not _loopback(host), host


def test_loopback_is_allowed(openai_server: LoopbackServer) -> None:
    import urllib.request

    openai_server.queue(openai_reply("ok"))
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(f"{openai_server.base_url}/chat/completions", data=b"{}",
                                 headers={"content-type": "application/json"})
    with opener.open(req, timeout=5) as r:
        assert r.status == 200
    assert NETWORK_VIOLATIONS == []


def test_a_test_that_swallows_the_refusal_still_fails(pytester: pytest.Pytester) -> None:
    pytester.makeconftest("from tests.netguard import no_network  # noqa: F401\n")
    pytester.makepyfile(test_sneaky="""
        import socket

        def test_sneaky():
            with socket.socket() as s:
                try:
                    s.connect(("192.0.2.1", 80))
                except Exception:
                    pass
    """)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)  # the body passed; the guard failed it
    result.stdout.fnmatch_lines(["*opened non-loopback connection*192.0.2.1*"])
