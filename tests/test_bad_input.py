"""Property tests: any config or message shape yields a valid object or a ConfigError, never a
traceback from deep inside."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from cascade.config import parse_config
from cascade.errors import ConfigError
from cascade.messages import normalise_messages

scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8)
rung_keys = st.sampled_from(["model", "provider", "base_url", "api_key_env", "max_tokens",
                             "temperature", "timeout_s", "input_usd_per_mtok", "logprobs",
                             "verifiers", "thresholds", "fallbacks", "name", "bogus"])
rungs = st.dictionaries(rung_keys, st.one_of(values, st.sampled_from(
    ["openai", "anthropic", "openai-compatible", "m", "http://h/v1"])), max_size=6)
configs = st.fixed_dictionaries(
    {},
    optional={
        "rungs": st.one_of(st.lists(rungs, max_size=3), values),
        "verifiers": st.one_of(st.lists(st.one_of(st.text(max_size=5), st.dictionaries(
            st.sampled_from(["name", "id", "threshold", "timeout_s", "x"]), values, max_size=3)),
            max_size=3), values),
        "cache": st.one_of(st.dictionaries(st.sampled_from(["enabled", "directory", "ttl_s",
                                                            "size_limit_mb", "zzz"]), values,
                                           max_size=3), values),
        "policy": st.one_of(st.dictionaries(st.sampled_from(["on_unverified", "short_circuit"]),
                                            values, max_size=2), values),
        "max_cost_usd": values,
        "other": values,
    },
)


@settings(max_examples=200, deadline=None)
@given(configs)
def test_any_config_is_parsed_or_rejected_clearly(data: dict[str, Any]) -> None:
    try:
        cfg = parse_config(data, source="prop.toml")
    except ConfigError as e:
        assert str(e).startswith("prop.toml")
        return
    assert cfg.rungs and all(r.model for r in cfg.rungs)
    for r in cfg.rungs:
        for v in (r.temperature, r.timeout_s, r.input_usd_per_mtok, r.output_usd_per_mtok):
            assert v == v and v >= 0  # no NaN, no negatives


messages = st.one_of(
    values,
    st.lists(st.one_of(values, st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool", 3]),
         "content": st.one_of(st.text(max_size=10), values,
                              st.lists(st.fixed_dictionaries(
                                  {"type": st.sampled_from(["text", "image_url"]),
                                   "text": st.one_of(st.text(max_size=5), values)})))})),
             max_size=4),
)


@settings(max_examples=200, deadline=None)
@given(messages)
def test_any_messages_are_normalised_or_rejected_clearly(data: Any) -> None:
    try:
        out = normalise_messages(messages=data)
    except ConfigError as e:
        assert "messages" in str(e)
        return
    assert any(m.role == "user" for m in out)
    assert all(isinstance(m.content, str) for m in out)
