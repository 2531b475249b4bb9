"""A small OpenAI-compatible chat-completions server around one in-process llama.cpp model.

Run as ``python -m cascade.providers.local_server --model PATH --port N``; the ``local``
provider starts it for you. It exists so local models go through the same code path as any
OpenAI-compatible endpoint, without the bundled ``llama_cpp.server``, whose defaults differ from
the library's (``repeat_penalty`` 1.1) and which returns log-probabilities only with
``logits_all``, a mode that made decoding 7 to 9 times slower. Here a logits processor keeps a
numpy log-softmax of each step's raw logits instead, which gives the same values at full speed.

Endpoints: ``POST /v1/chat/completions`` (no streaming, ``n`` = 1), ``GET /v1/models``,
``GET /health``. Generation is serialised (one model, one lock); HTTP requests are served on
threads. Once the model is loaded and the socket bound, one JSON line ``{"port": N}`` goes to
stdout. With ``--exit-on-stdin-eof`` the server exits when its stdin closes, so it dies with
the process that started it even if that process is killed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt

__all__ = ["LocalModel", "LogprobRecorder", "RequestError", "default_threads", "main", "serve"]

_MAX_TOP_LOGPROBS = 20
_MAX_BODY_BYTES = 8 * 1024 * 1024

# llama-cpp-python's create_chat_completion defaults; repeat_penalty stays 1.0 (no penalty),
# unlike the bundled server's 1.1.
_DEFAULT_TEMPERATURE = 0.2
_DEFAULT_TOP_P = 0.95
_DEFAULT_TOP_K = 40
_DEFAULT_MIN_P = 0.05


class RequestError(Exception):
    """The request is wrong; becomes an OpenAI-style error body with this status."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param,
                          "code": self.code}}


class LogprobRecorder:
    """A llama-cpp-python logits processor that records the log-softmax of the raw logits.

    It is first in the sampler chain, so it sees the model's own distribution (before
    penalties, grammar, top-k/top-p and temperature), which is what OpenAI's ``logprobs``
    report. It returns the logits unchanged.
    """

    def __init__(self) -> None:
        self.row: npt.NDArray[np.float64] | None = None

    def __call__(self, input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single]
                 ) -> npt.NDArray[np.single]:
        x = scores.astype(np.float64)
        m = float(np.max(x))
        self.row = x - (m + float(np.log(np.sum(np.exp(x - m)))))
        return scores


@dataclass(frozen=True, slots=True)
class _Sampling:
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    presence_penalty: float
    frequency_penalty: float
    repeat_penalty: float
    seed: int | None
    stop: tuple[str, ...]
    logprobs: bool
    top_logprobs: int
    default_system: str | None


def _number(body: Mapping[str, Any], key: str, default: float, *, lo: float, hi: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise RequestError(f"'{key}' must be a number in [{lo}, {hi}], got {v!r}", param=key)
    return float(v)


def _integer(body: Mapping[str, Any], key: str, *, lo: int, hi: int) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise RequestError(f"'{key}' must be an integer in [{lo}, {hi}], got {v!r}", param=key)
    return v


def _sampling(body: Mapping[str, Any], *, default_max_tokens: int) -> _Sampling:
    if body.get("stream"):
        raise RequestError("streaming is not supported by the local server", param="stream")
    if _integer(body, "n", lo=1, hi=1_000_000) not in (None, 1):
        raise RequestError("only n = 1 is supported by the local server", param="n")
    if body.get("tools") or body.get("functions"):
        raise RequestError("tool calling is not supported by the local server", param="tools")
    max_tokens = _integer(body, "max_completion_tokens", lo=1, hi=1 << 20)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", lo=1, hi=1 << 20)
    stop_raw = body.get("stop")
    if stop_raw is None:
        stop: tuple[str, ...] = ()
    elif isinstance(stop_raw, str):
        stop = (stop_raw,)
    elif isinstance(stop_raw, list) and all(isinstance(s, str) for s in stop_raw):
        stop = tuple(stop_raw)
    else:
        raise RequestError("'stop' must be a string or a list of strings", param="stop")
    logprobs = body.get("logprobs") or False
    if not isinstance(logprobs, bool):
        raise RequestError("'logprobs' must be true or false", param="logprobs")
    top = _integer(body, "top_logprobs", lo=0, hi=_MAX_TOP_LOGPROBS) or 0
    if top and not logprobs:
        raise RequestError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    default_system = body.get("default_system")
    if default_system is not None and not isinstance(default_system, str):
        raise RequestError("'default_system' must be a string", param="default_system")
    return _Sampling(
        max_tokens=max_tokens or default_max_tokens,
        temperature=_number(body, "temperature", _DEFAULT_TEMPERATURE, lo=0.0, hi=2.0),
        top_p=_number(body, "top_p", _DEFAULT_TOP_P, lo=0.0, hi=1.0),
        top_k=int(_number(body, "top_k", _DEFAULT_TOP_K, lo=0, hi=1 << 20)),
        min_p=_number(body, "min_p", _DEFAULT_MIN_P, lo=0.0, hi=1.0),
        presence_penalty=_number(body, "presence_penalty", 0.0, lo=-2.0, hi=2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, lo=-2.0, hi=2.0),
        repeat_penalty=_number(body, "repeat_penalty", 1.0, lo=0.5, hi=2.0),
        seed=_integer(body, "seed", lo=-(1 << 63), hi=(1 << 64) - 1),
        stop=stop,
        logprobs=logprobs,
        top_logprobs=top,
        default_system=default_system or None,
    )


def _messages(body: Mapping[str, Any]) -> list[dict[str, str]]:
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise RequestError("'messages' must be a non-empty list", param="messages")
    out: list[dict[str, str]] = []
    for i, m in enumerate(raw):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a 'role'",
                               param=f"messages[{i}]")
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content
                              if isinstance(p, Mapping) and p.get("type") == "text")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string or text parts",
                               param=f"messages[{i}].content")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    return out


def _token_entry(text: bytes, logprob: float) -> dict[str, Any]:
    return {"token": text.decode("utf-8", errors="replace"), "logprob": logprob,
            "bytes": list(text)}


def default_threads() -> int:
    """``$CASCADE_LOCAL_THREADS``, else half the usable CPUs (llama-cpp-python's choice), <= 8.

    All cores decode about twice as fast on an idle 2-core machine, but when other processes
    compete for the CPU, llama.cpp's spinning thread barriers made 2 threads ten times slower
    than 1 here; half the cores stays fast under load.
    """
    env = os.environ.get("CASCADE_LOCAL_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n // 2))


class LocalModel:
    """One loaded GGUF model answering OpenAI chat-completion bodies, one request at a time."""

    def __init__(self, model_path: str | os.PathLike[str], *, alias: str | None = None,
                 n_ctx: int = 2048, n_threads: int | None = None, max_tokens: int = 512,
                 verbose: bool = False) -> None:
        try:
            import llama_cpp
            from llama_cpp import Llama, LogitsProcessorList
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        except ImportError as e:
            raise RuntimeError(
                "llama-cpp-python is not installed; run: pip install \"verified-cascade[local]\""
            ) from e
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {path}")
        self._llama_cpp = llama_cpp
        self.llama = Llama(model_path=str(path), n_ctx=n_ctx,
                           n_threads=n_threads or default_threads(), verbose=verbose)
        self.alias = alias or path.stem
        self.default_max_tokens = max_tokens
        self.created = int(time.time())
        self._lock = threading.Lock()
        self._recorder = LogprobRecorder()
        self._processors = LogitsProcessorList([self._recorder])
        llama = self.llama
        template = llama.metadata.get("tokenizer.chat_template")
        if not template:
            raise RuntimeError(f"{path.name} has no chat template (tokenizer.chat_template); "
                               "it is not a chat model")
        eos_id, bos_id = llama.token_eos(), llama.token_bos()
        eos = llama._model.token_get_text(eos_id) if eos_id != -1 else ""
        bos = llama._model.token_get_text(bos_id) if bos_id != -1 else ""
        self._formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos,
                                              stop_token_ids=[eos_id])
        self._template_stop = (eos,) if eos else ()

    def prompt_tokens(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """The prompt as the GGUF's own chat template renders it, tokenised as llama-cpp does."""
        try:
            rendered = self._formatter(messages=cast(Any, list(messages)))
        except Exception as e:  # jinja raise_exception, e.g. roles out of order
            raise RequestError(f"the model's chat template rejected the messages: {e}",
                               param="messages") from None
        tokens: list[int] = self.llama.tokenize(
            rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True
        )
        return tokens

    def _is_eog(self, token: int) -> bool:
        return bool(self._llama_cpp.llama_vocab_is_eog(self.llama._model.vocab, token))

    def _grammar(self, body: Mapping[str, Any]) -> Any:
        fmt = body.get("response_format")
        if not fmt:
            return None
        from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

        kind = fmt.get("type") if isinstance(fmt, Mapping) else None
        try:
            if kind == "json_object":
                return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
            if kind == "json_schema":
                schema = fmt.get("json_schema", {}).get("schema", {})
                return LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
        except (ValueError, RuntimeError, TypeError) as e:
            raise RequestError(f"cannot build a grammar for response_format: {e}",
                               param="response_format") from None
        if kind == "text":
            return None
        raise RequestError(f"response_format type {kind!r} is not supported; use text, "
                           "json_object or json_schema", param="response_format")

    def chat(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Answer one chat-completion request body with an OpenAI-shaped response body."""
        s = _sampling(body, default_max_tokens=self.default_max_tokens)
        messages = _messages(body)
        if s.default_system and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": s.default_system})
        grammar = self._grammar(body)
        with self._lock:
            reply = self._generate(messages, s, grammar)
        if isinstance(body.get("model"), str) and body["model"]:
            reply["model"] = body["model"]  # echo the caller's name, as hosted APIs do
        return reply

    def _generate(self, messages: list[dict[str, str]], s: _Sampling, grammar: Any
                  ) -> dict[str, Any]:
        llama = self.llama
        prompt = self.prompt_tokens(messages)
        room = llama.n_ctx() - len(prompt)
        if room <= 0:
            raise RequestError(
                f"the prompt is {len(prompt)} tokens; this model's context is {llama.n_ctx()}",
                param="messages", code="context_length_exceeded",
            )
        max_tokens = min(s.max_tokens, room)
        llama.set_seed(s.seed if s.seed is not None else random.getrandbits(31))
        recorder = self._recorder
        recorder.row = None
        stops = s.stop + self._template_stop
        out = bytearray()
        generated: list[int] = []
        entries: list[tuple[int, dict[str, Any]]] = []  # (byte offset where the token starts, …)
        finish = "length"
        cut: int | None = None
        for token in llama.generate(
            prompt, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p, temp=s.temperature,
            repeat_penalty=s.repeat_penalty, presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
            logits_processor=self._processors if s.logprobs else None,
            grammar=grammar,
        ):
            if self._is_eog(token):
                finish = "stop"
                break
            piece = llama.detokenize([token], prev_tokens=prompt + generated)
            if s.logprobs:
                entries.append((len(out), self._entry(token, piece, s.top_logprobs)))
            generated.append(token)
            out += piece
            if stops:
                text = out.decode("utf-8", errors="ignore")
                hits = [i for i in (text.find(x) for x in stops if x) if i >= 0]
                if hits:
                    cut = len(text[: min(hits)].encode("utf-8"))
                    finish = "stop"
                    break
            if len(generated) >= max_tokens:
                break
        if cut is not None:
            del out[cut:]
            entries = [(at, e) for at, e in entries if at < cut]
        text = out.decode("utf-8", errors="replace")
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.alias,
            "system_fingerprint": None,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": {"content": [e for _, e in entries], "refusal": None}
                if s.logprobs else None,
                "finish_reason": finish,
            }],
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(generated),
                      "total_tokens": len(prompt) + len(generated)},
        }

    def _entry(self, token: int, piece: bytes, top: int) -> dict[str, Any]:
        row = self._recorder.row
        if row is None:  # the sampler did not run our processor: a llama-cpp-python change
            raise RequestError("internal error: no logits were recorded", status=500)
        entry = _token_entry(piece, float(row[token]))
        if top:
            ids = np.argpartition(row, -top)[-top:]
            ids = ids[np.argsort(-row[ids], kind="stable")]
            entry["top_logprobs"] = [
                _token_entry(self.llama.detokenize([int(i)]), float(row[i])) for i in ids
            ]
        else:
            entry["top_logprobs"] = []
        return entry

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": self.alias, "object": "model", "created": self.created, "owned_by": "local"}
        ]}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.access_log:
            super().log_message(format, *args)

    def _send(self, status: int, body: Mapping[str, Any]) -> None:
        data = json.dumps(body).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-request-id", str(body.get("id", uuid.uuid4().hex)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        model = self.server.model
        if path == "/health":
            self._send(200, {"status": "ok", "model": model.alias})
        elif path in ("/v1/models", "/models"):
            self._send(200, model.models())
        else:
            self._send(404, RequestError(f"no route GET {path}", status=404).body())

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= _MAX_BODY_BYTES:
            self.close_connection = True
            self._send(413, RequestError("missing or too large Content-Length",
                                         status=413).body())
            return
        raw = self.rfile.read(length)
        if path not in ("/v1/chat/completions", "/chat/completions"):
            self._send(404, RequestError(f"no route POST {path}", status=404).body())
            return
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise RequestError("the request body must be a JSON object")
            self._send(200, self.server.model.chat(body))
        except json.JSONDecodeError as e:
            self._send(400, RequestError(f"the request body is not JSON: {e}").body())
        except RequestError as e:
            self._send(e.status, e.body())
        except Exception as e:  # a bug or a llama.cpp failure: report it, keep serving
            self._send(500, RequestError(f"{type(e).__name__}: {e}", status=500).body())


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    model: LocalModel
    access_log: bool = False


def serve(model: LocalModel, *, host: str = "127.0.0.1", port: int = 0,
          access_log: bool = False) -> ThreadingHTTPServer:
    """Bind the HTTP server for ``model`` (port 0 picks a free one); the caller serves it."""
    httpd = _Server((host, port), _Handler)
    httpd.model = model
    httpd.access_log = access_log
    return httpd


def _exit_on_stdin_eof() -> None:
    """Die with the parent: its end of our stdin closes when it exits, however it exits."""
    try:
        while sys.stdin.buffer.read(65536):
            pass
    except (OSError, ValueError):
        pass
    os._exit(0)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cascade.providers.local_server",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="path to a .gguf chat model")
    p.add_argument("--alias", default=None, help="model id in replies (default: file stem)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    p.add_argument("--ctx", type=int, default=2048, help="context length in tokens")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: $CASCADE_LOCAL_THREADS or half the CPUs)")
    p.add_argument("--max-tokens", type=int, default=512, help="default max_tokens")
    p.add_argument("--exit-on-stdin-eof", action="store_true",
                   help="exit when stdin closes (set by the local provider)")
    p.add_argument("--access-log", action="store_true")
    p.add_argument("--verbose", action="store_true", help="llama.cpp's own logging")
    args = p.parse_args(argv)
    if not args.exit_on_stdin_eof:
        return _run(args)
    # Before loading: a parent killed while a large model loads (minutes, gigabytes) must not
    # leave the load running with nobody to serve.
    threading.Thread(target=_exit_on_stdin_eof, name="stdin-eof", daemon=True).start()
    code = 1
    try:
        code = _run(args)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        # the watcher thread is blocked reading stdin, which interpreter shutdown cannot
        # survive (it aborts): leave at once, with the code the run ended with
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _run(args: argparse.Namespace) -> int:
    """Load the model, bind, print the port line and serve until interrupted."""
    try:
        model = LocalModel(args.model, alias=args.alias, n_ctx=args.ctx, n_threads=args.threads,
                           max_tokens=args.max_tokens, verbose=args.verbose)
        httpd = serve(model, host=args.host, port=args.port, access_log=args.access_log)
    except (RuntimeError, FileNotFoundError, ValueError, OSError) as e:
        print(f"cascade.providers.local_server: {e}", file=sys.stderr, flush=True)
        return 2
    print(json.dumps({"port": httpd.server_address[1], "model": model.alias,
                      "pid": os.getpid()}), flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
    return 0

if __name__ == "__main__":
    sys.exit(main())

