"""Plugin discovery: built-in names, an installed entry point, dotted paths, helpful errors.

The example plugin in ``tests/plugin_pkg`` is installed for real into a temporary directory that
goes on ``sys.path``: by pip from a wheel built here (pip needs no build backend for a wheel), and,
fast, by writing its ``.dist-info`` by hand. ``importlib.metadata`` then finds its entry point.
"""

from __future__ import annotations

import importlib
import inspect
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import cascade
from cascade.config import VerifierConfig
from cascade.errors import ConfigError, UnknownVerifierError
from cascade.plugins import BUILTINS, known_verifiers, load_verifier
from cascade.trace import Verdict
from cascade.verify import VerifyContext
from tests.verifier_kit import make_ctx
from tests.wheels import build_wheel, dist_files, pip_install
from verifiers import (
    AgreementVerifier,
    ConfidenceVerifier,
    JudgeVerifier,
    RefusalVerifier,
    SchemaVerifier,
)

PLUGIN_DIR = Path(__file__).parent / "plugin_pkg"
MODULE = "cascade_plugin_example"


def _dist_files() -> dict[str, bytes]:
    return dist_files(PLUGIN_DIR, MODULE)


def _wheel(dest: Path) -> Path:
    return build_wheel(PLUGIN_DIR, MODULE, dest)


@pytest.fixture
def on_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    yield
    sys.modules.pop(MODULE, None)


@pytest.fixture
def hand_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, on_path: None) -> Path:
    site = tmp_path / "site"
    for rel, data in _dist_files().items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_bytes(data)
    monkeypatch.syspath_prepend(str(site))
    return site


def _check_min_length_plugin() -> None:
    assert known_verifiers()["min_length"] == f"{MODULE}:MinLengthVerifier"
    v = load_verifier(VerifierConfig(name="min_length", settings={"min_words": 2}))
    assert type(v).__name__ == "MinLengthVerifier"
    verdict = v.verify(make_ctx("Canberra"))
    assert isinstance(verdict, Verdict)
    assert not verdict.passed and verdict.score == 0.5
    assert v.verify(make_ctx("It is Canberra")).passed  # type: ignore[union-attr]


def test_entry_point_plugin_written_by_hand(hand_installed: Path) -> None:
    _check_min_length_plugin()


def test_entry_point_plugin_installed_by_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             on_path: None) -> None:
    site = tmp_path / "site"
    pip_install(_wheel(tmp_path), site)
    assert (site / f"{MODULE}.py").is_file()
    monkeypatch.syspath_prepend(str(site))
    _check_min_length_plugin()


def test_dotted_path_loads_the_same_plugin(hand_installed: Path) -> None:
    v = load_verifier(VerifierConfig(name=f"{MODULE}:MinLengthVerifier",
                                     settings={"min_words": 1}))
    assert v.verify(make_ctx("Canberra")).passed  # type: ignore[union-attr]


def test_plugin_setting_typo_names_the_key(hand_installed: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_verifier(VerifierConfig(name="min_length", id="long_enough",
                                     settings={"min_word": 2}))
    assert info.value.key == "min_word"
    assert "long_enough" in str(info.value) and "min_words" in str(info.value)


@pytest.mark.parametrize(("name", "settings", "cls"), [
    ("schema", {"schema": {"type": "object"}}, SchemaVerifier),
    ("confidence", {"source": "logprobs", "threshold": 0.6}, ConfidenceVerifier),
    ("judge", {"model": "gpt-4o-mini"}, JudgeVerifier),
    ("refusal", {}, RefusalVerifier),
    ("agreement", {"normaliser": "numeric"}, AgreementVerifier),
])
def test_builtins_load_by_short_name(name: str, settings: dict[str, object], cls: type) -> None:
    assert isinstance(load_verifier(VerifierConfig(name=name, settings=settings)), cls)
    assert known_verifiers()[name] == BUILTINS[name]


def test_bad_builtin_settings_are_config_errors_naming_verifier_and_key() -> None:
    with pytest.raises(ConfigError) as info:
        load_verifier(VerifierConfig(name="refusal", id="no_refusals",
                                     settings={"min_char": 3}))
    assert info.value.key == "min_char" and "no_refusals" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_verifier(VerifierConfig(name="judge"))
    assert info.value.key == "model"
    with pytest.raises(ConfigError, match="allowed: logprobs"):
        load_verifier(VerifierConfig(name="confidence", settings={"source": "vibes"}))


def test_unknown_name_lists_known_verifiers(hand_installed: Path) -> None:
    with pytest.raises(UnknownVerifierError) as info:
        load_verifier(VerifierConfig(name="refusals"))
    message = str(info.value)
    for known in (*BUILTINS, "min_length"):
        assert known in message


@pytest.mark.parametrize(("name", "fragment"), [
    ("no_such_pkg_xyz.mod:Verifier", "not importable"),
    ("tests.test_verifiers_plugins:NoSuchThing", "no attribute 'NoSuchThing'"),
    ("no_colon.here", "not a built-in or installed"),
    (":Thing", "not of the form"),
])
def test_bad_dotted_paths(name: str, fragment: str) -> None:
    with pytest.raises(UnknownVerifierError, match=fragment):
        load_verifier(VerifierConfig(name=name))


@cascade.verifier
def shouty(ctx: VerifyContext) -> bool:
    """A verify function: settings arrive through ctx.settings at run time."""
    return ctx.candidate.text.isupper() or bool(ctx.settings.get("allow_lower"))


@cascade.verifier
def make_prefix_check(prefix: str) -> object:
    """A factory function returning a verify function."""
    def check(ctx: VerifyContext) -> Verdict:
        ok = ctx.candidate.text.startswith(prefix)
        return Verdict(passed=ok, reason=f"starts with {prefix!r}: {ok}")
    return check


@pytest.mark.anyio
async def test_functions_are_verifiers_or_factories() -> None:
    fn = load_verifier(VerifierConfig(name="tests.test_verifiers_plugins:shouty", id="caps"))
    assert fn.name == "caps" and not fn.expensive
    assert (await fn.verify(make_ctx("CANBERRA"))).passed  # type: ignore[misc]
    assert not (await fn.verify(make_ctx("Canberra"))).passed  # type: ignore[misc]
    built = load_verifier(VerifierConfig(name="tests.test_verifiers_plugins:make_prefix_check",
                                         settings={"prefix": "Can"}))
    assert (await built.verify(make_ctx("Canberra"))).passed  # type: ignore[misc]


# (built-in, setting, a wrong value that TOML can produce); other required settings below.
WRONG_TYPES: list[tuple[str, str, object]] = [
    ("schema", "schema", "abc"), ("schema", "model", 3), ("schema", "check_formats", "no"),
    ("schema", "name", 1),
    ("confidence", "source", "vibes"), ("confidence", "threshold", "0.7"),
    ("confidence", "threshold", math.nan), ("confidence", "field", ["confidence"]),
    ("confidence", "aggregate", 1), ("confidence", "short_tokens", 2.5),
    ("confidence", "self_check_fallback", "false"), ("confidence", "prompt", 7),
    ("confidence", "top_logprobs", True), ("confidence", "name", None),
    ("judge", "model", 4), ("judge", "provider", ["openai"]), ("judge", "base_url", 1),
    ("judge", "api_key_env", 1), ("judge", "input_usd_per_mtok", "2.5"),
    ("judge", "output_usd_per_mtok", math.inf), ("judge", "rubric", {"a": 1}),
    ("judge", "threshold", "high"), ("judge", "reference", 42), ("judge", "max_tokens", "256"),
    ("judge", "timeout_s", "60"), ("judge", "extra", "abc"), ("judge", "name", 0),
    ("refusal", "extra_patterns", "abc"), ("refusal", "extra_patterns", [1]),
    ("refusal", "min_chars", "x"), ("refusal", "head_sentences", 2.0),
    ("refusal", "min_substance", False), ("refusal", "name", 3),
    ("agreement", "mode", "vote"), ("agreement", "samples", "3"),
    ("agreement", "normaliser", 1), ("agreement", "min_agreement", "half"),
    ("agreement", "temperature", math.nan), ("agreement", "tolerance", "1e-6"),
    ("agreement", "no_previous", True), ("agreement", "name", 2),
]
REQUIRED: dict[str, dict[str, object]] = {"judge": {"model": "gpt-4o-mini"}}


@pytest.mark.parametrize(("name", "key", "value"), WRONG_TYPES)
def test_wrongly_typed_builtin_settings_fail_at_load_naming_the_key(
        name: str, key: str, value: object) -> None:
    """A value that validates nowhere else ("abc" as a list becomes three regexes, "x" as
    min_chars crashes after the rung was paid) must fail when the verifier is built."""
    settings = {**REQUIRED.get(name, {}), key: value}
    with pytest.raises(ConfigError) as info:
        load_verifier(VerifierConfig(name=name, id=f"my_{name}", settings=settings))
    assert info.value.key == key and f"my_{name}" in str(info.value)
    assert repr(value) in str(info.value)


def test_every_builtin_setting_has_a_wrong_type_case() -> None:
    covered = {(n, k) for n, k, _ in WRONG_TYPES}
    for name in BUILTINS:
        module, _, attr = BUILTINS[name].partition(":")
        factory = getattr(importlib.import_module(module), attr)
        params = [p for p in inspect.signature(factory).parameters if p != "self"]
        missing = [p for p in params if (name, p) not in covered]
        assert not missing, f"{name}: no wrong-type case for {missing}"


def test_well_typed_toml_values_still_load() -> None:
    """Strict, but not pedantic: TOML integers are fine where numbers are expected."""
    load_verifier(VerifierConfig(name="confidence", settings={"threshold": 1, "top_logprobs": 5}))
    load_verifier(VerifierConfig(name="refusal", settings={"extra_patterns": ["nope"],
                                                           "min_chars": 3}))
    load_verifier(VerifierConfig(name="judge", settings={"model": "m", "extra": {"seed": 1},
                                                         "input_usd_per_mtok": 0,
                                                         "output_usd_per_mtok": 0}))


def test_a_bad_setting_fails_before_any_model_call_is_paid() -> None:
    from cascade import Cascade
    from cascade.testing import FunctionProvider

    provider = FunctionProvider(lambda call: "I can't help with that.")
    with pytest.raises(ConfigError, match="min_chars"):
        Cascade.from_dict({"rungs": [{"model": "small", "price": "unknown"}],
                           "verifiers": [{"name": "refusal", "min_chars": "x"}],
                           "cache": {"enabled": False}}, provider_factory=provider.factory)
    assert provider.calls == []
