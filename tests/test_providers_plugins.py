"""The provider seam: a third-party package installed by entry point answers by name.

``tests/provider_pkg`` is built into a wheel here and installed for real by pip (``--no-deps
--no-index``, into a temporary directory), then ``cascade answer --config`` runs in a fresh
process with that directory on its path and ``provider = "shout"`` in its config.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from cascade.config import RungConfig, parse_config
from cascade.errors import ConfigError
from cascade.providers import Provider, known_providers, make_provider
from tests.wheels import build_wheel, pip_install

PKG_DIR = Path(__file__).parent / "provider_pkg"
MODULE = "cascade_provider_example"
ROOT = Path(__file__).resolve().parents[1]


def _wheel(dest: Path) -> Path:
    return build_wheel(PKG_DIR, MODULE, dest)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("provider_site")
    target = tmp / "site"
    pip_install(_wheel(tmp), target)
    assert (target / f"{MODULE}.py").is_file()
    return target


@pytest.fixture
def installed(site: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    yield site
    sys.modules.pop(MODULE, None)


CONFIG = """
[[rungs]]
model = "loud-1"
provider = "shout"
input_usd_per_mtok = 0.0
output_usd_per_mtok = 0.0
extra = { prefix = "HEARD: " }

[[verifiers]]
name = "refusal"

[cache]
enabled = false
"""


def test_installed_provider_answers_through_cascade_answer(site: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "cascade.toml"
    cfg.write_text(CONFIG)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    proc = subprocess.run(
        [sys.executable, "-m", "cascade.cli", "answer", "--config", str(cfg), "--json",
         "where is the moon"],
        capture_output=True, text=True, timeout=120, check=False, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["text"] == "HEARD: WHERE IS THE MOON"
    assert out["verified"] is True


def test_installed_provider_is_known_and_validates_in_config(installed: Path) -> None:
    assert "shout" in known_providers()
    config = parse_config(tomllib.loads(CONFIG))
    provider = make_provider(config.rungs[0])
    assert isinstance(provider, Provider) and type(provider).__name__ == "ShoutProvider"


def test_unknown_provider_in_config_lists_installed_ones(installed: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"rungs": [{"model": "m", "provider": "shuot"}]})
    assert info.value.key == "rungs[0].provider"
    for known in ("openai", "anthropic", "openai-compatible", "local", "replay", "shout"):
        assert known in str(info.value)


def test_without_the_package_the_name_is_unknown() -> None:
    with pytest.raises(ConfigError, match="'shout'; allowed: openai"):
        parse_config({"rungs": [{"model": "m", "provider": "shout"}]})


def test_a_factory_must_return_a_provider() -> None:
    from cascade.providers import register_provider

    register_provider("not-a-provider-kind", lambda rung: "oops")  # type: ignore[arg-type,return-value]
    with pytest.raises(ConfigError, match=r"returned str, not a cascade\.providers\.Provider"):
        make_provider(RungConfig(model="m", provider="not-a-provider-kind"))
