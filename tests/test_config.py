"""Config files: the documented format parses; every mistake names the file, the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from cascade.config import load_config, parse_config
from cascade.errors import ConfigError

FULL = '''
max_cost_usd = 0.05
timeout_s = 30

[[rungs]]
model = "gpt-4o-mini"
provider = "openai"
api_key_env = "OPENAI_API_KEY"
logprobs = true
thresholds = { confidence = 0.8 }

[[rungs]]
name = "sonnet"
model = "claude-sonnet-4-5"
provider = "anthropic"
api_key_env = "ANTHROPIC_API_KEY"
input_usd_per_mtok = 3.0
output_usd_per_mtok = 15.0
max_tokens = 1024
temperature = 0.2
timeout_s = 45
verifiers = ["refusal"]

[[rungs.fallbacks]]
provider = "openai-compatible"
base_url = "http://127.0.0.1:8000/v1"

[[verifiers]]
name = "refusal"

[[verifiers]]
name = "confidence"
threshold = 0.7
source = "logprobs"

[policy]
on_unverified = "raise"

[cache]
directory = "/tmp/x"
ttl_s = 3600

[retry]
max_attempts = 4

[breaker]
failure_threshold = 3
cooldown_s = 10
'''


def test_full_example_parses(tmp_path: Path) -> None:
    p = tmp_path / "cascade.toml"
    p.write_text(FULL)
    cfg = load_config(p)
    assert [r.label for r in cfg.rungs] == ["gpt-4o-mini", "sonnet"]
    mini, sonnet = cfg.rungs
    assert (mini.input_usd_per_mtok, mini.output_usd_per_mtok) == (0.15, 0.60)  # price table
    assert sonnet.fallbacks[0].model == "claude-sonnet-4-5"  # inherits from its rung
    assert sonnet.fallbacks[0].provider == "openai-compatible"
    assert cfg.threshold(mini, cfg.verifiers[1]) == 0.8
    assert cfg.threshold(sonnet, cfg.verifiers[1]) == 0.7
    assert [v.key for v in cfg.verifiers_for(sonnet)] == ["refusal"]
    assert cfg.verifiers[1].settings == {"source": "logprobs"}
    assert cfg.policy.on_unverified == "raise" and cfg.cache.ttl_s == 3600.0
    assert cfg.retry.max_attempts == 4 and cfg.breaker.cooldown_s == 10.0
    assert cfg.max_cost_usd == 0.05


@pytest.mark.parametrize(
    ("toml", "key", "fragment"),
    [
        ("[[rungs]]\nprovider='openai'", "rungs[0].model", "required"),
        ("[[rungs]]\nmodel='gpt-4o'\nprovider='azure'", "rungs[0].provider", "allowed: openai"),
        ("[[rungs]]\nmodel='gpt-4o'\nprovider='openai-compatible'", "rungs[0].base_url",
         "required"),
        ("[[rungs]]\nmodel='gpt-4o'\nmax_tokens=-1", "rungs[0].max_tokens", ">= 1"),
        ("[[rungs]]\nmodel='gpt-4o'\nmax_tokens='lots'", "rungs[0].max_tokens", "integer"),
        ("[[rungs]]\nmodel='gpt-4o'\ntemprature=0.1", "rungs[0].temprature", "unknown key"),
        ("[[rungs]]\nmodel='gpt-4o'\nverifiers=['nope']", "rungs[0].verifiers", "not configured"),
        ("[[rungs]]\nmodel='gpt-4o'\n[[verifiers]]\nthreshold=0.5", "verifiers[0].name",
         "required"),
        ("[[rungs]]\nmodel='gpt-4o'\n[[verifiers]]\nname='x'\nthreshold=3",
         "verifiers[0].threshold", "[0, 1]"),
        ("[[rungs]]\nmodel='gpt-4o'\n[cache]\nttl=3", "cache.ttl", "allowed"),
        ("[[rungs]]\nmodel='gpt-4o'\n[policy]\non_unverified='shrug'", "policy.on_unverified",
         "allowed: return, raise"),
        ("[[rungs]]\nmodel='gpt-4o'\n[policy]\nshadow_rate=2", "policy.shadow_rate", "[0, 1]"),
        ("rungs = []", "rungs", "at least one"),
        ("[[rungs]]\nmodel='gpt-4o'\n[[rungs]]\nmodel='gpt-4o'", "rungs", "unique"),
    ],
)
def test_bad_files_name_file_key_and_fix(tmp_path: Path, toml: str, key: str, fragment: str
                                         ) -> None:
    p = tmp_path / "bad.toml"
    p.write_text(toml)
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert str(p) in msg and f"key '{key}'" in msg and fragment in msg, msg


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "broken.toml"
    p.write_text("[[rungs]\nmodel=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.toml")


def test_identity_excludes_secrets_and_labels() -> None:
    a = parse_config({"rungs": [{"model": "gpt-4o", "api_key_env": "A", "name": "one"}]})
    b = parse_config({"rungs": [{"model": "gpt-4o", "api_key_env": "B", "name": "two"}]})
    assert a.identity() == b.identity()
    c = parse_config({"rungs": [{"model": "gpt-4o", "temperature": 0.5}]})
    assert c.identity() != a.identity()


def test_a_fallback_bills_at_its_own_models_table_price() -> None:
    """A fallback to another model the price table knows must not bill at its rung's (a
    gpt-4o fallback under gpt-4o-mini was billed 16x too low); one that does not name a model,
    or names one the table lacks, bills like its rung (as documented)."""
    cfg = parse_config({"rungs": [
        {"model": "gpt-4o-mini", "fallbacks": [
            {"model": "gpt-4o"}, {"model": "my-finetune"},
            {"provider": "openai-compatible", "base_url": "http://127.0.0.1:8000/v1"},
            {"model": "gpt-4o", "input_usd_per_mtok": 1.0, "output_usd_per_mtok": 4.0}]},
        {"model": "house", "price": "unknown", "fallbacks": [{"model": "gpt-4o"}]}]})
    prices = [[(f.input_usd_per_mtok, f.output_usd_per_mtok, f.price) for f in r.fallbacks]
              for r in cfg.rungs]
    assert prices == [[(2.5, 10.0, None), (0.15, 0.6, None), (0.15, 0.6, None),
                       (1.0, 4.0, None)], [(2.5, 10.0, None)]]
