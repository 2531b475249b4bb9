"""The cascade against a server we did not write: llama-cpp-python's own OpenAI-compatible one.

One ``python -m llama_cpp.server`` per module, on a free 127.0.0.1 port, serving the bundled
SmolLM2-135M GGUF. What this server does, as measured here (the README's compatibility table):
``response_format`` takes only ``text`` and ``json_object`` (with an optional ``schema`` it
enforces by grammar); ``json_schema`` is answered with HTTP 500 and a validation message;
``logprobs`` come in the OpenAI ``content`` shape; any model name is served with the loaded model.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pydantic
import pytest

from cascade import Cascade
from cascade.errors import ClientRequestError, NoAnswerError
from cascade.providers.local import resolve_model, runtime_available
from tests.loopback import free_port, reap

pytestmark = [
    pytest.mark.slow,
    pytest.mark.local,
    pytest.mark.skipif(not runtime_available(), reason="needs llama-cpp-python"),
]

ALIAS = "smollm2"
CITY_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "country": {"type": "string"}},
    "required": ["name", "country"],
    "additionalProperties": False,
}


class City(pydantic.BaseModel):
    name: str
    country: str


@pytest.fixture(scope="module")
def llama_server() -> Iterator[str]:
    """The server's base URL; its log is in a temporary file, shown if it fails to start."""
    model = resolve_model("smollm2-135m")
    port = free_port()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(model),
             "--model_alias", ALIAS, "--host", "127.0.0.1", "--port", str(port),
             "--n_ctx", "2048", "--verbose", "False"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}/v1"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    with opener.open(f"{base}/models", timeout=5) as r:
                        if r.status == 200:
                            break
                except (urllib.error.URLError, OSError):
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    pytest.fail(f"llama_cpp.server did not start: {log.read()[-2000:]!r}")
                time.sleep(0.2)
            yield base
        finally:
            proc.terminate()
            reap(proc, 10)


def ladder(base: str, *, verifiers: list[Any], **rung: Any) -> dict[str, Any]:
    return {
        "rungs": [{"model": ALIAS, "provider": "openai-compatible", "base_url": base,
                   "input_usd_per_mtok": 0.0, "output_usd_per_mtok": 0.0,
                   "max_tokens": 48, "timeout_s": 60, **rung}],
        "verifiers": verifiers,
        "retry": {"max_attempts": 1},
        "cache": {"enabled": False},
    }


def ask(config: dict[str, Any], prompt: str, **kw: Any) -> Any:
    with Cascade.from_dict(config) as cascade:
        return cascade.answer(prompt, **kw)


def test_answer_with_logprob_confidence(llama_server: str) -> None:
    config = ladder(llama_server, logprobs=True,
                    verifiers=[{"name": "confidence", "source": "logprobs", "threshold": 0.0}])
    answer = ask(config, "What is the capital of Japan? Answer in one sentence.")
    assert answer.text.strip()
    [verdict] = answer.attempts[0].verdicts
    assert verdict.verifier == "confidence"
    assert verdict.score is not None and 0.0 < verdict.score <= 1.0
    assert "logprob" in verdict.reason.lower()


def test_self_check(llama_server: str) -> None:
    config = ladder(llama_server, logprobs=True,
                    verifiers=[{"name": "confidence", "source": "self_check", "threshold": 0.0}])
    answer = ask(config, "What is 2 + 2? Answer with the number.")
    [verdict] = answer.attempts[0].verdicts
    # SmolLM2-135M may start its reply with another word ("The"): then it said neither yes
    # nor no, and a sliver of "yes" among its alternatives is no confidence (a failed verdict)
    if verdict.score is None:
        assert not verdict.passed and "neither yes nor no" in verdict.reason
    else:
        assert 0.0 <= verdict.score <= 1.0
    assert verdict.input_tokens > 0  # the self-check was a second call to the same server


def test_json_schema_dict_is_enforced_by_the_servers_grammar(llama_server: str) -> None:
    config = ladder(llama_server, structured_output="json_object_schema",
                    verifiers=[{"name": "schema"}])
    answer = ask(config, "Name the capital of Japan and its country as JSON.",
                 schema=CITY_SCHEMA)
    assert answer.verified, answer.attempts[0].verdicts
    assert isinstance(answer.parsed, dict) and set(answer.parsed) == {"name", "country"}


def test_pydantic_model_is_sent_as_a_schema_and_validated(llama_server: str) -> None:
    config = ladder(llama_server, structured_output="json_object_schema",
                    verifiers=[{"name": "schema"}])
    answer = ask(config, "Name the capital of Japan and its country as JSON.", schema=City)
    assert answer.verified, answer.attempts[0].verdicts
    assert isinstance(answer.parsed, City) and answer.parsed.name


def test_json_schema_mode_is_a_client_error_naming_the_setting(llama_server: str) -> None:
    """This server answers ``response_format.type = json_schema`` with HTTP 500 and a
    validation message: that is our request's fault, so it is not retried and says what to
    change."""
    config = ladder(llama_server, structured_output="json_schema",
                    verifiers=[{"name": "schema"}])
    config["retry"] = {"max_attempts": 3, "base_delay_s": 0.5}
    with pytest.raises(NoAnswerError) as info:
        ask(config, "Name the capital of Japan as JSON.", schema=CITY_SCHEMA)
    [attempt] = info.value.answer.attempts
    assert attempt.error_type == "ClientRequestError"
    assert attempt.tries == 1
    assert attempt.error is not None
    assert "'response_format'" in attempt.error and "structured_output" in attempt.error
    assert "json_object_schema" in attempt.error


def test_stop_sequence(llama_server: str) -> None:
    config = ladder(llama_server, stop=[","], max_tokens=64, verifiers=[])
    answer = ask(config, "List five colours, separated by commas.")
    assert "," not in answer.text
    assert answer.attempts[0].finish_reason == "stop"


def test_max_tokens_truncation_is_caught_by_the_refusal_verifier(llama_server: str) -> None:
    config = ladder(llama_server, max_tokens=3, verifiers=[{"name": "refusal"}])
    answer = ask(config, "Tell me a long story about a dragon.")
    attempt = answer.attempts[0]
    assert attempt.finish_reason == "length"
    assert not answer.verified
    [verdict] = attempt.verdicts
    assert not verdict.passed and "max_tokens" in verdict.reason


def test_any_model_name_is_served_unless_check_model(llama_server: str) -> None:
    """This server answers every name with the model it loaded (measured), so a typo would go
    unnoticed; ``check_model = true`` asks ``/models`` first and names the fix."""
    answer = ask(ladder(llama_server, model="smollm3", verifiers=[]), "Say hi.")
    assert answer.text  # served anyway, by SmolLM2
    with pytest.raises(NoAnswerError) as info:
        ask(ladder(llama_server, model="smollm3", check_model=True, verifiers=[]), "Say hi.")
    [attempt] = info.value.answer.attempts
    assert attempt.error_type == ClientRequestError.__name__
    assert attempt.error is not None
    assert "'smollm3'" in attempt.error and "'smollm2'" in attempt.error
    assert "'model'" in attempt.error
    assert ask(ladder(llama_server, check_model=True, verifiers=[]), "Say hi.").text
