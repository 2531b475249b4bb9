"""The command line's own surface (#11): --version, help on every option, -v anywhere, a closed
stdout, non-UTF-8 input, and a `cascade health` that says something about the ladder."""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from cascade.cli import COMMANDS, build_parser, main
from cascade.config import load_config
from cascade.errors import ConfigError
from tests.loopback import LoopbackServer, RecordedRequest, Reply, free_port, openai_reply

SECRET = "sk-test-SECRET-health-456"


def _run(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(args, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def _cli(args: list[str | bytes], *, cwd: Path, input: bytes | None = None
         ) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "LOOPBACK_KEY": SECRET}
    return subprocess.run([sys.executable, "-m", "cascade.cli", *args], capture_output=True,
                          env=env, timeout=60, cwd=cwd, input=input)


def _ladder(tmp_path: Path, *rungs: str) -> Path:
    p = tmp_path / "cascade.toml"
    p.write_text("\n".join(rungs) + f'\n[cache]\ndirectory = "{tmp_path / "cache"}"\n')
    return p


def _rung(name: str, base_url: str, extra: str = "") -> str:
    return (f'[[rungs]]\nname = "{name}"\nmodel = "{name}-model"\nprovider = "openai-compatible"\n'
            f'base_url = "{base_url}"\napi_key_env = "LOOPBACK_KEY"\nprice = "unknown"\n{extra}\n')


# ------------------------------------------------------------------ parser surface


def test_version_prints_the_installed_version() -> None:
    code, out, _err = _run(["--version"])
    assert code == 0
    assert out.strip() == f"cascade {metadata.version('verified-cascade')}"


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions  # argparse has no public walk over its actions
            if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_of_every_command_has_help(command: str) -> None:
    """Each command's module is imported only when chosen, so the parser is built per command."""
    parser = build_parser([command])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for p in (parser, sub.choices[command]):
        for action in _options(p):
            assert action.help and action.help.strip(), (
                f"cascade {command}: {action.option_strings or action.dest} has no help text")
    assert sub.choices[command].get_default("run") is not None


def test_every_command_is_one_table_entry() -> None:
    """A command is a module with add_arguments/run named in COMMANDS, imported when chosen."""
    import importlib

    assert {"answer", "cache", "health", "record", "tune", "eval"} <= set(COMMANDS)
    for module, helptext in COMMANDS.values():
        mod = importlib.import_module(module)
        assert callable(mod.add_arguments) and callable(mod.run) and helptext


@pytest.mark.parametrize("argv", [["-v", "cache", "stats"], ["cache", "stats", "-v"],
                                  ["cache", "-v", "stats"], ["--verbose", "cache", "stats"]])
def test_verbose_works_before_and_after_the_command(argv: list[str], tmp_path: Path) -> None:
    ns = build_parser(argv).parse_args(argv)
    assert ns.verbose is True
    code, out, err = _run([*argv, "--cache-dir", str(tmp_path / "c")])
    assert code == 0 and "entries" in out, err


@pytest.mark.parametrize("position", ["before", "after"])
def test_verbose_after_the_command_turns_logging_on(position: str, openai_server: LoopbackServer,
                                                    tmp_path: Path) -> None:
    """What -v shows: INFO logs, here httpx's line per HTTP request (absent without -v)."""
    openai_server.script(lambda req: openai_reply("Canberra."))
    cfg = _ladder(tmp_path, _rung("small", openai_server.base_url))
    args: list[str | bytes] = ["answer", "q", "--config", str(cfg), "--no-cache"]
    quiet = _cli(args, cwd=tmp_path)
    loud = _cli(["-v", *args] if position == "before" else [*args, "-v"], cwd=tmp_path)
    assert quiet.returncode == loud.returncode == 0, loud.stderr.decode()
    assert b"HTTP Request: POST" not in quiet.stderr
    assert b"HTTP Request: POST" in loud.stderr and SECRET.encode() not in loud.stderr


def test_no_verbose_flag_means_quiet() -> None:
    ns = build_parser(["cache", "stats"]).parse_args(["cache", "stats"])
    assert not getattr(ns, "verbose", False)


def test_closed_stdout_exits_quietly(tmp_path: Path) -> None:
    """`cascade cache stats | head` with the reader gone: no BrokenPipeError, exit 141 (128 +
    SIGPIPE, what a shell reports for any tool whose reader went away)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cascade.cli", "cache", "stats", "--cache-dir",
         str(tmp_path / "c")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the interpreter has even started: every write hits EPIPE
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=60) == 141, err
    assert "BrokenPipeError" not in err and "Traceback" not in err, err


# ------------------------------------------------------------------ non-UTF-8 input


def test_non_utf8_prompt_argument_is_a_usage_error(openai_server: LoopbackServer,
                                                   tmp_path: Path) -> None:
    cfg = _ladder(tmp_path, _rung("small", openai_server.base_url))
    proc = _cli(["answer", b"caf\xe9 au lait?", "--config", str(cfg)], cwd=tmp_path)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2, err
    assert "not valid UTF-8" in err and "0xe9" in err and "Traceback" not in err
    assert openai_server.requests == []  # refused before anything was paid for


def test_non_utf8_prompt_on_stdin_is_a_usage_error(openai_server: LoopbackServer,
                                                   tmp_path: Path) -> None:
    cfg = _ladder(tmp_path, _rung("small", openai_server.base_url))
    proc = _cli(["answer", "-", "--config", str(cfg)], input=b"\xff\xfe latin-1 caf\xe9",
                cwd=tmp_path)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2, err
    assert "standard input is not valid UTF-8" in err and "0xff" in err
    assert "Traceback" not in err
    assert openai_server.requests == []


def test_utf8_prompt_on_stdin_still_answers(openai_server: LoopbackServer,
                                            tmp_path: Path) -> None:
    openai_server.script(lambda req: openai_reply("Oui."))
    cfg = _ladder(tmp_path, _rung("small", openai_server.base_url))
    proc = _cli(["answer", "-", "--config", str(cfg)], input="café ?".encode(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().strip() == "Oui."
    assert openai_server.requests[0].json["messages"][-1]["content"] == "café ?"


def test_non_utf8_config_file_names_the_file(tmp_path: Path) -> None:
    p = tmp_path / "cascade.toml"
    p.write_bytes(b"[[rungs]]\nmodel = 'caf\xe9'\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "UTF-8" in str(e.value)
    code, _out, err = _run(["answer", "q", "--config", str(p)])
    assert code == 2 and str(p) in err and "UTF-8" in err and "Traceback" not in err


# ------------------------------------------------------------------ cascade health


def _health_ladder(server: LoopbackServer, tmp_path: Path, dead_url: str) -> Path:
    return _ladder(
        tmp_path,
        _rung("small", server.base_url,
              f'[[rungs.fallbacks]]\nmodel = "small-elsewhere"\nbase_url = "{dead_url}"\n'),
        _rung("big", server.base_url),
    )


def test_health_lists_the_configured_endpoints_without_calling_them(
        openai_server: LoopbackServer, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    cfg = _health_ladder(openai_server, tmp_path, dead)
    code, out, err = _run(["health", "--config", str(cfg), "--json"])
    assert code == 0, err
    rows = json.loads(out)["endpoints"]
    assert [(r["rung"], r["label"], r["role"], r["model"], r["base_url"]) for r in rows] == [
        (0, "small", "primary", "small-model", openai_server.base_url),
        (0, "small", "fallback", "small-elsewhere", dead),
        (1, "big", "primary", "big-model", openai_server.base_url),
    ]
    assert all(r["provider"] == "openai-compatible" for r in rows)
    assert rows[0]["fallbacks"] == [f"openai-compatible|{dead}|small-elsewhere"]
    assert all(r["circuit"]["state"] == "closed" for r in rows)
    assert all("probe" not in r for r in rows)
    assert openai_server.requests == []

    code, text, _ = _run(["health", "--config", str(cfg)])
    assert code == 0
    assert "1. small: openai-compatible small-model" in text and "circuit closed" in text
    assert "fallback: openai-compatible small-elsewhere @ " + dead in text


def test_health_probe_calls_each_endpoint_once_and_fails_on_a_dead_one(
        openai_server: LoopbackServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPBACK_KEY", SECRET)

    def handler(req: RecordedRequest) -> Reply:
        return openai_reply("ok", model=req.json["model"], completion_tokens=1)

    openai_server.script(handler)
    dead = f"http://127.0.0.1:{free_port()}/v1"
    cfg = _health_ladder(openai_server, tmp_path, dead)
    code, out, err = _run(["health", "--config", str(cfg), "--probe", "--json"])
    assert code == 3, err
    rows = json.loads(out)["endpoints"]
    probes = [r["probe"] for r in rows]
    assert [p["ok"] for p in probes] == [True, False, True]
    assert probes[0]["error"] is None and probes[0]["latency_ms"] > 0
    assert "TransportError" in probes[1]["error"]
    assert rows[1]["circuit"]["consecutive_failures"] == 1  # the probe went through the breaker
    assert sorted(r.json["model"] for r in openai_server.requests) == ["big-model", "small-model"]
    assert all(r.json["max_tokens"] == 1 for r in openai_server.requests)  # a tiny call
    assert SECRET not in out and SECRET not in err

    code, text, _ = _run(["health", "--config", str(cfg), "--probe"])
    assert code == 3 and "FAILED" in text and "TransportError" in text


def test_health_probe_exits_0_when_every_endpoint_answers(
        openai_server: LoopbackServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPBACK_KEY", SECRET)
    openai_server.script(lambda req: openai_reply("ok", completion_tokens=1))
    cfg = _ladder(tmp_path, _rung("small", openai_server.base_url),
                  _rung("big", openai_server.base_url))
    code, out, err = _run(["health", "--config", str(cfg), "--probe"])
    assert code == 0, err
    assert out.count(" ok ") == 2 and "FAILED" not in out
    assert len(openai_server.requests) == 2


def test_health_probe_reports_a_server_error(openai_server: LoopbackServer, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPBACK_KEY", SECRET)
    openai_server.script(lambda req: Reply(status=503, json={"error": {"message": "down"}}))
    cfg = _ladder(tmp_path, _rung("only", openai_server.base_url))
    code, out, _ = _run(["health", "--config", str(cfg), "--probe", "--json"])
    assert code == 3
    (row,) = json.loads(out)["endpoints"]
    assert not row["probe"]["ok"] and "ServerError" in row["probe"]["error"]
    assert len(openai_server.requests) == 1  # no retries for a probe
