"""What a config that loads promises: every endpoint in it can be built, and bills what it says.

These pin three defects a black-box review walk found in config validation. A fallback is
checked after inheriting, as a rung of its own kind (an inherited ``structured_output`` that
Anthropic cannot send loaded, and the request then died on a bare error instead of failing
over); one price without the other is a config error unless the built-in table gives the other
(it silently became $0); and ``fallbacks`` inside a fallback are refused (they were validated,
then never used).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from cascade.config import STRUCTURED_OUTPUTS, load_config, parse_config
from cascade.errors import ConfigError
from cascade.providers import make_provider

# ------------------------------------------------------- fallbacks validated after inheriting

JSON_OBJECT_RUNG = '''
[[rungs]]
model = "small"
provider = "openai-compatible"
base_url = "http://127.0.0.1:8000/v1"
input_usd_per_mtok = 1.0
output_usd_per_mtok = 2.0
structured_output = "json_object"

[[rungs.fallbacks]]
provider = "anthropic"
'''


def _refused(tmp_path: Path, toml: str, key: str, *fragments: str) -> str:
    p = tmp_path / "cascade.toml"
    p.write_text(toml)
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert str(p) in msg and f"key '{key}'" in msg, msg
    for f in fragments:
        assert f in msg, msg
    return msg


def test_an_inherited_structured_output_the_fallbacks_kind_cannot_send_fails_at_load(
        tmp_path: Path) -> None:
    """It used to load, then the Anthropic provider's constructor raised a ConfigError naming
    no file at the first failover, and the request died without trying the next rung."""
    _refused(tmp_path, JSON_OBJECT_RUNG, "rungs[0].fallbacks[0].structured_output",
             "'json_object'", "anthropic", "inherited", "json_schema, tools, prompt")
    # The fix the message names: the fallback says its own mode.
    p = tmp_path / "fixed.toml"
    p.write_text(JSON_OBJECT_RUNG + 'structured_output = "tools"\n')
    fb = load_config(p).rungs[0].fallbacks[0]
    assert (fb.provider, fb.structured_output) == ("anthropic", "tools")
    # A rung of the kind is refused at load too, not at its first call.
    _refused(tmp_path, '[[rungs]]\nmodel = "claude-sonnet-4-5"\nprovider = "anthropic"\n'
             'structured_output = "json_object_schema"\n', "rungs[0].structured_output",
             "allowed for anthropic")


def test_a_local_fallback_inheriting_a_model_it_cannot_run_fails_at_load(tmp_path: Path
                                                                         ) -> None:
    """A ``local`` fallback under a vendor rung inherits a name like gpt-4o-mini, which the
    local provider's constructor refuses: at load, naming the fallback's key, instead."""
    _refused(tmp_path, '[[rungs]]\nmodel = "gpt-4o-mini"\n[[rungs.fallbacks]]\n'
             'provider = "local"\n', "rungs[0].fallbacks[0].model", "gpt-4o-mini", "inherited")


_KINDS: dict[str, dict[str, Any]] = {
    "openai": {"provider": "openai"},
    "openai-compatible": {"provider": "openai-compatible", "base_url": "http://127.0.0.1:9/v1"},
    "anthropic": {"provider": "anthropic"},
    "local": {"provider": "local"},
}


@pytest.mark.parametrize(("rung_kind", "fb_kind"), list(itertools.product(_KINDS, _KINDS)))
def test_every_endpoint_of_a_config_that_loads_can_be_built(rung_kind: str, fb_kind: str
                                                            ) -> None:
    """Whatever the rung's mode and a fallback's kind: a config either fails at load, naming a
    key, or every endpoint in it builds (providers are built at the first call, mid-request)."""
    for mode in (None, *STRUCTURED_OUTPUTS):
        rung: dict[str, Any] = {"model": "smollm2-135m", **_KINDS[rung_kind],
                                "input_usd_per_mtok": 1.0, "output_usd_per_mtok": 1.0,
                                "fallbacks": [dict(_KINDS[fb_kind])]}
        if mode is not None:
            rung["structured_output"] = mode
        try:
            cfg = parse_config({"rungs": [rung]}, source="walk.toml")
        except ConfigError as e:
            assert str(e).startswith("walk.toml, key 'rungs[0]."), e
            continue
        for endpoint in (cfg.rungs[0], *cfg.rungs[0].fallbacks):
            make_provider(endpoint)  # raises ConfigError on what should have failed at load


# ------------------------------------------------------------- one price without the other

@pytest.mark.parametrize(("given", "missing"), [("input_usd_per_mtok", "output_usd_per_mtok"),
                                                ("output_usd_per_mtok", "input_usd_per_mtok")])
def test_one_price_of_a_model_the_table_lacks_is_refused(tmp_path: Path, given: str,
                                                         missing: str) -> None:
    """It billed the other at $0: every cap and budget passed on output tokens."""
    msg = _refused(tmp_path, f'[[rungs]]\nmodel = "mystery-model"\n{given} = 3.0\n',
                   f"rungs[0].{missing}", "both", "0 for a free")
    assert given in msg


def test_one_price_of_a_table_model_keeps_the_tables_other() -> None:
    """Setting one price of a priced model zeroed the table's other one."""
    def prices(**keys: float) -> tuple[float, float]:
        r = parse_config({"rungs": [{"model": "claude-sonnet-4-5", "provider": "anthropic",
                                     **keys}]}).rungs[0]
        return r.input_usd_per_mtok, r.output_usd_per_mtok

    assert prices(input_usd_per_mtok=2.5) == (2.5, 15.0)
    assert prices(output_usd_per_mtok=12.0) == (3.0, 12.0)


def test_one_price_on_a_fallback() -> None:
    """A fallback of its rung's model inherits the other price (as it inherits both); one
    naming a table model takes the table's; one naming another model the table lacks, or
    under a rung of unknown price, must give both."""
    cfg = parse_config({"rungs": [{"model": "house", "input_usd_per_mtok": 1.0,
                                   "output_usd_per_mtok": 2.0, "fallbacks": [
                                       {"base_url": "http://127.0.0.1:9/v1",
                                        "input_usd_per_mtok": 5.0},
                                       {"model": "gpt-4o", "input_usd_per_mtok": 2.0}]}]})
    assert [(f.input_usd_per_mtok, f.output_usd_per_mtok) for f in cfg.rungs[0].fallbacks] == [
        (5.0, 2.0), (2.0, 10.0)]
    for rung in ({"model": "house", "input_usd_per_mtok": 1.0, "output_usd_per_mtok": 2.0,
                  "fallbacks": [{"model": "other-house", "output_usd_per_mtok": 4.0}]},
                 {"model": "house", "price": "unknown",
                  "fallbacks": [{"base_url": "http://127.0.0.1:9/v1",
                                 "output_usd_per_mtok": 4.0}]}):
        with pytest.raises(ConfigError) as ei:
            parse_config({"rungs": [rung]}, source="walk.toml")
        assert "key 'rungs[0].fallbacks[0].input_usd_per_mtok'" in str(ei.value), ei.value


def test_a_judge_with_one_price_is_refused() -> None:
    """The judge verifier's model is read by the same rung parser."""
    from verifiers.judge import JudgeVerifier

    with pytest.raises(ConfigError, match="output_usd_per_mtok"):
        JudgeVerifier(model="house-judge", input_usd_per_mtok=1.0)
    assert JudgeVerifier(model="gpt-4o", input_usd_per_mtok=1.0).rung.output_usd_per_mtok == 10.0


# ------------------------------------------------------------------ fallbacks do not nest

def test_fallbacks_inside_a_fallback_are_refused(tmp_path: Path) -> None:
    """They were validated and then never tried: only the rung's own list is walked."""
    _refused(tmp_path, '[[rungs]]\nmodel = "gpt-4o-mini"\n[[rungs.fallbacks]]\n'
             'base_url = "http://127.0.0.1:8000/v1"\n[[rungs.fallbacks.fallbacks]]\n'
             'base_url = "http://127.0.0.1:8001/v1"\n', "rungs[0].fallbacks[0].fallbacks",
             "do not nest", "rung's own")


def test_a_shared_ladder_file_without_a_price_is_refused_not_free(tmp_path: Path) -> None:
    """A ``ladder-<chain>.json`` entry without ``output_usd_per_mtok`` read it as 0: the tuner
    then saw that rung's output as free and its saving as larger than it is."""
    from cascade.suite.ladder_file import read_ladder_file

    path = tmp_path / "ladder-mine.json"
    path.write_text(json.dumps({"ladder": [
        {"model": "cheap", "input_usd_per_mtok": 0.1, "output_usd_per_mtok": 0.1},
        {"model": "dear", "input_usd_per_mtok": 5.0}]}))
    with pytest.raises(ConfigError) as ei:
        read_ladder_file(path)
    assert ei.value.key == "ladder[1].output_usd_per_mtok" and "dear" in str(ei.value)
    path.write_text(json.dumps({"ladder": [{"model": "cheap", "price": "unknown"}]}))
    assert read_ladder_file(path)["ladder"][0]["model"] == "cheap"


def test_an_api_key_beside_a_proxys_user_info_is_refused_not_silently_dropped() -> None:
    """httpx sends ``user:password@`` as Basic auth, which replaces the SDK's bearer header:
    the key in ``api_key_env`` was never sent, and nothing said so."""
    rung = {"model": "m", "provider": "openai-compatible", "price": "unknown",
            "base_url": "http://proxyuser:pw@127.0.0.1:9/v1"}
    with pytest.raises(ConfigError) as ei:
        parse_config({"rungs": [{**rung, "api_key_env": "SOME_KEY"}]})
    assert ei.value.key == "rungs[0].api_key_env" and "never be sent" in str(ei.value)
    assert "pw" not in str(ei.value)
    assert parse_config({"rungs": [rung]}).rungs[0].api_key_env is None


def test_a_local_rung_with_one_price_loads_free() -> None:
    """A local rung is known to cost nothing: one price given (0) made the other "required"."""
    [rung] = parse_config({"rungs": [{"provider": "local", "model": "smollm2-135m",
                                      "output_usd_per_mtok": 0}]}).rungs
    assert (rung.input_usd_per_mtok, rung.output_usd_per_mtok) == (0.0, 0.0)


def test_a_ladder_file_entry_behind_a_basic_auth_proxy_gets_no_key_variable(
        tmp_path: Path) -> None:
    """Its user info is the credential (sent as Basic auth, in place of a bearer key): the
    tuned file named a key variable beside it, which the loader refuses."""
    from cascade.suite.ladder_file import ladder_rungs

    entry = {"model": "m", "provider": "vllm", "base_url": "http://u:pw@127.0.0.1:9/v1",
             "input_usd_per_mtok": 1, "output_usd_per_mtok": 1}
    [rung] = ladder_rungs({"ladder": [entry]}, logprobs=False).values()
    assert rung.api_key_env is None
    [plain] = ladder_rungs({"ladder": [{**entry, "base_url": "http://127.0.0.1:9/v1"}]},
                           logprobs=False).values()
    assert plain.api_key_env == "VLLM_API_KEY"
