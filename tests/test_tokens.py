"""Token and cost estimates: tiktoken counts from the offline cache, and the fallback without it."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cascade import tokens
from cascade.config import RungConfig
from cascade.messages import Message
from cascade.tokens import (
    encoding_name_for,
    estimate_cost,
    estimate_tokens,
    fallback_tokens,
    warm_up,
)


@pytest.fixture(autouse=True)
def fresh_encodings() -> Iterator[None]:
    tokens._reset()
    yield
    tokens._reset()


def user(text: str) -> list[Message]:
    return [Message("user", text)]


@pytest.mark.parametrize(("model", "encoding"), [
    ("gpt-4o", "o200k_base"),
    ("gpt-4o-mini", "o200k_base"),
    ("gpt-4.1-nano", "o200k_base"),
    ("o4-mini", "o200k_base"),
    ("o1", "o200k_base"),
    ("openai/gpt-5", "o200k_base"),
    ("GPT-4O", "o200k_base"),
    ("gpt-4", "cl100k_base"),
    ("gpt-3.5-turbo", "cl100k_base"),
    ("claude-haiku-4-5", "cl100k_base"),
    ("smollm2-135m-instruct", "cl100k_base"),
    ("", "cl100k_base"),
])
def test_encoding_follows_the_model_family(model: str, encoding: str) -> None:
    assert encoding_name_for(model) == encoding


def test_requires_the_shared_encodings() -> None:
    assert os.environ.get("TIKTOKEN_CACHE_DIR"), "tests/conftest.py sets TIKTOKEN_CACHE_DIR"


@pytest.mark.parametrize(("text", "cl100k", "o200k"), [
    ("hello world", 2, 2),
    ("tiktoken is great!", 6, 6),
    ("Привет, мир! 你好世界", 13, 8),
    ("    def f(x):\n        return x**2\n", 11, 11),
    ("<|endoftext|> x", 8, 8),  # special-token text in user content is plain text
])
def test_known_counts(text: str, cl100k: int, o200k: int) -> None:
    overhead = 3 + 3 + 1  # reply priming, per-message overhead, the role "user"
    assert estimate_tokens(user(text), "gpt-4") == overhead + cl100k
    assert estimate_tokens(user(text), "gpt-4o") == overhead + o200k


def test_chat_overhead_per_message() -> None:
    messages = [Message("system", "You are a helpful assistant."), Message("user", "What is 2+2?")]
    # OpenAI's recipe: 3 + Σ(3 + role + content); "system" and "user" are one token each.
    assert estimate_tokens(messages, "gpt-4o") == 3 + (3 + 1 + 6) + (3 + 1 + 7)
    assert estimate_tokens([], "gpt-4o") == 3


def test_large_input_is_counted() -> None:
    text = "lorem ipsum dolor sit amet " * 40_000  # about a megabyte
    start = time.perf_counter()
    n = estimate_tokens(user(text), "gpt-4o")
    assert 150_000 < n < 300_000
    assert time.perf_counter() - start < 5.0


def test_estimate_cost_prices_input_and_full_output() -> None:
    rung = RungConfig(model="gpt-4o", input_usd_per_mtok=2.5, output_usd_per_mtok=10.0,
                      max_tokens=100)
    assert estimate_cost(rung, user("hello world")) == pytest.approx(
        (9 * 2.5 + 100 * 10.0) / 1e6)
    free = RungConfig(model="local", max_tokens=100)
    assert estimate_cost(free, user("hello world")) == 0.0
    # a failover may land on any endpoint: the estimate is the dearest one's
    with_fallbacks = RungConfig(model="gpt-4o-mini", input_usd_per_mtok=0.15,
                                output_usd_per_mtok=0.6, max_tokens=100,
                                fallbacks=(rung, free))
    assert estimate_cost(with_fallbacks, user("hello world")) == estimate_cost(
        rung, user("hello world"))


def test_warm_up_reports_availability(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert warm_up(["gpt-4o", "claude-haiku-4-5"]) is True
    tokens._reset()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    assert warm_up(["gpt-4o"]) is False


def test_fallback_formula() -> None:
    assert fallback_tokens(user("abcdefghi")) == 3 + 3 + 1 + 3
    assert fallback_tokens([]) == 3


def test_missing_encodings_fall_back_with_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    caplog.set_level(logging.WARNING, logger="cascade")
    msgs = user("Привет, мир! 你好世界 and some more text")
    assert estimate_tokens(msgs, "gpt-4o") == fallback_tokens(msgs)
    assert estimate_tokens(msgs, "gpt-4") == fallback_tokens(msgs)
    assert estimate_tokens(msgs, "gpt-4o") == fallback_tokens(msgs)
    warnings = [r for r in caplog.records if r.name == "cascade"]
    assert len(warnings) == 1
    assert "characters/4" in warnings[0].getMessage()
    assert "missing" in warnings[0].getMessage()
    assert list(tmp_path.iterdir()) == []  # nothing was downloaded into the cache


def test_corrupt_encoding_file_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    (tmp_path / hashlib.sha1(url.encode()).hexdigest()).write_bytes(b"not an encoding\n")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    caplog.set_level(logging.WARNING, logger="cascade")
    assert estimate_tokens(user("hello world"), "gpt-4") == fallback_tokens(user("hello world"))
    assert "corrupt" in caplog.records[-1].getMessage()


def test_a_fresh_process_without_encodings_never_reaches_for_the_network(
    tmp_path: Path,
) -> None:
    # In a new interpreter tiktoken has nothing loaded, so without the guard it would try to
    # download the file; unroutable proxies make any such attempt fail fast instead of hanging.
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path), "HTTPS_PROXY": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9"}
    code = (
        "import logging; logging.basicConfig(level=logging.WARNING)\n"
        "from cascade.messages import Message\n"
        "from cascade.tokens import estimate_tokens\n"
        "print(estimate_tokens([Message('user', 'hello world')], 'gpt-4o'))\n"
    )
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == str(fallback_tokens(user("hello world")))
    assert out.stderr.count("tiktoken encoding o200k_base unavailable") == 1
    assert "is missing" in out.stderr and "Traceback" not in out.stderr
    assert time.perf_counter() - start < 30
