"""Every ```python block of README.md runs as written: as a script in a fresh interpreter, in a
temporary folder holding a ``cascade.toml`` that points at a loopback OpenAI-compatible server
this test starts, so ``cascade.answer(...)`` and ``Cascade.from_file("cascade.toml")`` work
offline.

Conventions the README may use:
- a block whose first line is ``# NAME.py`` is also saved as that file in the folder before any
  block runs, so a later block can import it (``# my_checks.py``);
- ``<!-- readme-test: needs-server [port=N] -->`` on the line right before a block starts
  ``cascade serve --config cascade.toml --port N`` (default 8000) in that folder, waits for
  ``GET /healthz``, and stops it after the block. Prefer blocks that run alone.

A block that raises fails its test; nothing is skipped.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.loopback import LoopbackServer, RecordedRequest, Reply, openai_reply, reap

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
KEY_ENV = "README_TEST_KEY"

_FENCE = re.compile(r"^```python[ \t]*\n(?P<code>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
_MARKER = re.compile(r"<!--\s*readme-test:\s*(?P<opts>.*?)\s*-->")
_FILE_LINE = re.compile(r"#\s*(?P<name>[A-Za-z_][A-Za-z0-9_]*\.py)\s*$")


@dataclass(frozen=True)
class Block:
    """One ```python block: where it starts, its code, and the marker options before it."""

    line: int
    code: str
    options: frozenset[str]
    filename: str | None

    @property
    def port(self) -> int:
        ports = [o.removeprefix("port=") for o in self.options if o.startswith("port=")]
        return int(ports[0]) if ports else 8000


def python_blocks(text: str) -> list[Block]:
    """The README's python blocks in order, with any ``readme-test`` marker right before one."""
    blocks = []
    for m in _FENCE.finditer(text):
        before = text[: m.start()].rstrip().rsplit("\n", 1)[-1]
        marker = _MARKER.fullmatch(before.strip())
        options = frozenset(marker["opts"].split()) if marker else frozenset()
        unknown = options - {"needs-server"} - {o for o in options if o.startswith("port=")}
        if unknown:
            raise ValueError(f"README line {text.count(chr(10), 0, m.start()) + 1}: unknown "
                             f"readme-test option(s) {sorted(unknown)}")
        code = m["code"]
        first = _FILE_LINE.fullmatch(code.split("\n", 1)[0].strip())
        blocks.append(Block(line=text.count("\n", 0, m.start()) + 1, code=code, options=options,
                            filename=first["name"] if first else None))
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def _reply(req: RecordedRequest) -> Reply:
    """A model that knows one fact: JSON when the request asks for structure, else prose."""
    body = req.json or {}
    wants_json = ("response_format" in body or "tools" in body
                  or "json" in json.dumps(body.get("messages", [])).lower())
    if wants_json:
        return openai_reply(json.dumps({"name": "Canberra", "country": "Australia"}),
                            model=body.get("model", "m"))
    return openai_reply("Canberra is the capital of Australia.", model=body.get("model", "m"))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The folder every block runs in: cascade.toml at a loopback server, and the files that
    blocks declare with a ``# NAME.py`` first line."""
    with LoopbackServer("openai") as server:
        server.script(_reply)
        cwd = tmp_path_factory.mktemp("readme")
        rung = (f'provider = "openai-compatible"\nbase_url = "{server.base_url}"\n'
                f'api_key_env = "{KEY_ENV}"\n')
        (cwd / "cascade.toml").write_text(
            f'[[rungs]]\nmodel = "small"\n{rung}input_usd_per_mtok = 0.1\n'
            f'output_usd_per_mtok = 0.4\n\n'
            f'[[rungs]]\nmodel = "big"\n{rung}input_usd_per_mtok = 2.5\n'
            f'output_usd_per_mtok = 10\n\n'
            f'[cache]\ndirectory = "{cwd / "cache"}"\n', encoding="utf-8")
        for b in BLOCKS:
            if b.filename:
                (cwd / b.filename).write_text(b.code, encoding="utf-8")
        yield cwd


def _env(cwd: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_")}
    env.update(PYTHONPATH=str(REPO), **{KEY_ENV: "sk-readme-test"},
               CASCADE_CACHE_DIR=str(cwd / "cache"))
    return env


@contextmanager
def _server(block: Block, cwd: Path) -> Iterator[None]:
    """``cascade serve`` for a block marked needs-server, ready before the block runs."""
    if "needs-server" not in block.options:
        yield
        return
    proc = subprocess.Popen(
        [sys.executable, "-m", "cascade.cli", "serve", "--config", "cascade.toml", "--port",
         str(block.port)], cwd=cwd, env=_env(cwd), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                out = proc.stdout.read().decode() if proc.stdout else ""
                pytest.fail(f"README line {block.line}: cascade serve exited: {out}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{block.port}/healthz",
                                            timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"README line {block.line}: cascade serve never became ready")
            time.sleep(0.2)
        yield
    finally:
        proc.terminate()
        reap(proc, 15)
        if proc.stdout:
            proc.stdout.close()


def test_the_readme_has_python_examples() -> None:
    """Guards the extraction itself: a README whose blocks no longer parse would test nothing."""
    assert len(BLOCKS) >= 3
    assert any("cascade.answer(" in b.code for b in BLOCKS)
    assert any('from_file("cascade.toml")' in b.code for b in BLOCKS)


@pytest.mark.parametrize("block", BLOCKS, ids=[f"README.md:{b.line}" for b in BLOCKS])
def test_readme_block_runs_as_written(block: Block, workspace: Path) -> None:
    script = workspace / f"readme_block_{block.line}.py"
    script.write_text(block.code, encoding="utf-8")
    with _server(block, workspace):
        proc = subprocess.run([sys.executable, script.name], cwd=workspace, env=_env(workspace),
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (
        f"README.md line {block.line} failed (exit {proc.returncode}):\n{proc.stderr}")


def test_marker_and_file_conventions_are_read() -> None:
    """The conventions above, on a small README of our own."""
    text = ("intro\n\n<!-- readme-test: needs-server port=8123 -->\n```python\nprint(1)\n```\n"
            "\n```python\n# helper.py\nX = 1\n```\n")
    served, helper = python_blocks(text)
    assert served.options == {"needs-server", "port=8123"} and served.port == 8123
    assert served.code == "print(1)\n" and served.filename is None
    assert helper.options == frozenset() and helper.filename == "helper.py"
    with pytest.raises(ValueError, match="skip"):
        python_blocks("<!-- readme-test: skip -->\n```python\nraise SystemExit(1)\n```\n")
