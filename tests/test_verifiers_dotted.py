"""Dotted paths in config and data name only code marked or allowed for it, never just any code.

A config or a suite file is data: it is shared, downloaded, and written by ``cascade tune``. If
naming ``os:system`` or ``shutil:rmtree`` were enough to call it, opening such a file would run
whatever it says. The rule (``cascade.dotted``): a dotted path resolves to an object marked with
``@cascade.verifier`` / ``@cascade.grader`` / ``@cascade.normaliser``, a verifier class of the
named module, or anything in a module listed in ``CASCADE_ALLOW_MODULES``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cascade import Cascade
from cascade.config import VerifierConfig
from cascade.errors import ConfigError, UnknownVerifierError
from cascade.plugins import load_verifier
from cascade.suite import Case, grade
from cascade.testing import FunctionProvider
from tests.loopback import LoopbackServer, RecordedRequest, Reply, openai_reply

ROOT = Path(__file__).resolve().parent.parent

USER_MODULE = '''
import cascade
from cascade.verify import Verdict, VerifyContext


class NeedsCanberra:
    """A verifier class of this module: allowed by its shape."""

    name = "needs_canberra"
    expensive = False

    def __init__(self, word: str = "Canberra") -> None:
        self.word = word

    def verify(self, ctx: VerifyContext) -> Verdict:
        ok = self.word in ctx.candidate.text
        return Verdict(passed=ok, reason=f"mentions {self.word}: {ok}")


READY = NeedsCanberra("Canberra")


@cascade.verifier
def marked_check(ctx: VerifyContext) -> bool:
    return "Canberra" in ctx.candidate.text


def unmarked_check(ctx: VerifyContext) -> bool:
    return "Canberra" in ctx.candidate.text


def wipe(path):
    """A function that happens to take one argument, as a grader or verifier would."""
    raise AssertionError("called")


@cascade.grader
def marked_grader(text, case):
    return text == "yes"


def unmarked_grader(text, case):
    return text == "yes"
'''


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = "h3_user_checks"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("CASCADE_ALLOW_MODULES", raising=False)
    yield name
    sys.modules.pop(name, None)


def _case(grader: str) -> Case:
    return Case(id="c", messages=(), expected=None, grader=grader, source="suite.jsonl:1")


def test_a_config_naming_os_system_runs_nothing_at_load(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    provider = FunctionProvider(lambda call: "Canberra")
    with pytest.raises(ConfigError, match="standard library") as info:
        Cascade.from_dict({"rungs": [{"model": "m", "price": "unknown"}],
                           "verifiers": [{"name": "os:system", "command": f"touch {marker}"}],
                           "cache": {"enabled": False}}, provider_factory=provider.factory)
    assert not marker.exists()
    assert "verifiers[0].name" in str(info.value)
    assert "CASCADE_ALLOW_MODULES" in str(info.value) and "@cascade.verifier" in str(info.value)
    assert provider.calls == []


def test_a_suite_case_naming_shutil_rmtree_is_never_called(tmp_path: Path) -> None:
    victim = tmp_path / "precious"
    victim.mkdir()
    (victim / "thesis.tex").write_text("years of work")
    with pytest.raises(ConfigError, match="standard library") as info:
        grade(_case("shutil:rmtree"), str(victim))
    assert (victim / "thesis.tex").exists()
    assert info.value.key == "grader" and "suite.jsonl:1" in str(info.value)


def test_an_unmarked_function_of_a_user_module_is_no_grader(user_module: str) -> None:
    with pytest.raises(ConfigError) as info:
        grade(_case(f"{user_module}:wipe"), "/")
    message = str(info.value)
    assert "@cascade.grader" in message and f"CASCADE_ALLOW_MODULES={user_module}" in message
    assert grade(_case(f"{user_module}:marked_grader"), "yes")
    assert not grade(_case(f"{user_module}:marked_grader"), "no")


def test_an_allowed_module_may_name_any_of_its_functions(
        user_module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError):
        grade(_case(f"{user_module}:unmarked_grader"), "yes")
    monkeypatch.setenv("CASCADE_ALLOW_MODULES", f"other_pkg, {user_module}")
    assert grade(_case(f"{user_module}:unmarked_grader"), "yes")
    v = load_verifier(VerifierConfig(name=f"{user_module}:unmarked_check"))
    assert v.name == f"{user_module}:unmarked_check"


def test_which_verifiers_a_dotted_path_may_name(user_module: str) -> None:
    for ok in ("NeedsCanberra", "READY", "marked_check"):
        load_verifier(VerifierConfig(name=f"{user_module}:{ok}"))
    for refused in ("unmarked_check", "wipe", "marked_grader"):
        with pytest.raises(ConfigError, match="is not a verifier") as info:
            load_verifier(VerifierConfig(name=f"{user_module}:{refused}"))
        assert info.value.key == "name"
    # a verifier class imported into a module is not that module's verifier
    with pytest.raises(ConfigError, match="is not a verifier"):
        load_verifier(VerifierConfig(name="tests.test_verifiers_plugins:SchemaVerifier"))


def test_a_missing_module_is_still_an_unknown_verifier() -> None:
    with pytest.raises(UnknownVerifierError, match="not importable"):
        load_verifier(VerifierConfig(name="no_such_module_h3:Thing"))


def _handler(req: RecordedRequest) -> Reply:
    text = "Sydney." if req.json["model"] == "small" else "Canberra."
    return openai_reply(text, model=req.json["model"], prompt_tokens=10, completion_tokens=2)


def test_a_dotted_verifier_next_to_the_config_resolves_from_any_folder(
        openai_server: LoopbackServer, tmp_path: Path) -> None:
    """`my_checks.py` beside `cascade.toml` is found by `cascade answer --config` run from
    elsewhere, with no PYTHONPATH pointing at it (it used to need PYTHONPATH=.)."""
    openai_server.script(_handler)
    project = tmp_path / "project"
    project.mkdir()
    (project / "h3_near_checks.py").write_text(USER_MODULE)
    cfg = project / "cascade.toml"
    rungs = "".join(f'''
[[rungs]]
model = "{m}"
provider = "openai-compatible"
base_url = "{openai_server.base_url}"
api_key_env = "LOOPBACK_KEY"
input_usd_per_mtok = 1
output_usd_per_mtok = 1
''' for m in ("small", "big"))
    cfg.write_text(rungs + '''
[[verifiers]]
name = "h3_near_checks:NeedsCanberra"
id = "canberra"

[cache]
enabled = false
''')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "LOOPBACK_KEY": "sk-test", "PYTHONPATH": str(ROOT),
           "TIKTOKEN_CACHE_DIR": os.environ.get("TIKTOKEN_CACHE_DIR", "")}
    env.pop("CASCADE_ALLOW_MODULES", None)
    proc = subprocess.run(
        [sys.executable, "-m", "cascade.cli", "answer", "Capital of Australia?", "--config",
         str(cfg), "--json"], cwd=elsewhere, capture_output=True, text=True, env=env,
        timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert '"model": "big"' in proc.stdout and "mentions Canberra: False" in proc.stdout
