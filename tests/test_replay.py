"""The replay provider serves recorded calls exactly and refuses to guess."""

from __future__ import annotations

from pathlib import Path

import pytest

from cascade.config import RungConfig
from cascade.errors import ConfigError, ProviderError
from cascade.messages import Message
from cascade.providers.base import Completion, ModelCall
from cascade.providers.replay import MissingRecording, ReplayProvider, replay_provider
from cascade.suite import Recording, RecordingStore, answer_call

MSGS = (Message("system", "Be brief."), Message("user", "Capital of France?"))


def _store(tmp_path: Path) -> RecordingStore:
    store = RecordingStore(tmp_path / "recordings.jsonl")
    rung = RungConfig(model="small")
    store.add(Recording.of(answer_call(rung, MSGS),
                           Completion(text="Paris", model="small", input_tokens=9,
                                      output_tokens=1, latency_ms=40.0),
                           case_id="fact-1", kind="answer", cost_usd=1e-6))
    check = ModelCall(model="small", messages=(Message("user", "Is Paris right? yes/no"),),
                      max_tokens=1)
    store.add(Recording.of(check, Completion(text="yes", model="small", input_tokens=6,
                                             output_tokens=1),
                           case_id="fact-1", kind="verifier", cost_usd=5e-7))
    return store


@pytest.mark.anyio
async def test_serves_answers_and_verifier_calls(tmp_path: Path) -> None:
    p = ReplayProvider(_store(tmp_path))
    c = await p.complete(answer_call(RungConfig(model="small"), MSGS))
    assert (c.text, c.input_tokens, c.output_tokens, c.latency_ms) == ("Paris", 9, 1, 40.0)
    check = ModelCall(model="small", messages=(Message("user", "Is Paris right? yes/no"),),
                      max_tokens=1)
    assert (await p.complete(check)).text == "yes"


@pytest.mark.anyio
async def test_missing_recording_names_case_and_model(tmp_path: Path) -> None:
    p = ReplayProvider(_store(tmp_path))
    with pytest.raises(MissingRecording, match=r"case 'fact-1' for model 'big'") as e:
        await p.complete(answer_call(RungConfig(model="big"), MSGS))
    assert isinstance(e.value, ProviderError) and not e.value.retryable
    unknown = (Message("user", "What is the tallest mountain?"),)
    with pytest.raises(MissingRecording, match="tallest mountain"):
        await p.complete(ModelCall(model="small", messages=unknown))


@pytest.mark.anyio
async def test_registered_for_replay_rungs(tmp_path: Path) -> None:
    _store(tmp_path)
    from cascade.providers import make_provider

    rung = RungConfig(model="small", provider="replay", base_url=str(tmp_path))
    prov = make_provider(rung)
    assert isinstance(prov, ReplayProvider)
    assert (await prov.complete(answer_call(rung, MSGS))).text == "Paris"
    with pytest.raises(ConfigError, match="not found"):
        replay_provider(RungConfig(model="small", provider="replay",
                                   base_url=str(tmp_path / "nowhere.jsonl")))


class _Echo:
    """A provider double that answers with the model name and counts its calls."""

    name = "echo"

    def __init__(self) -> None:
        self.calls = 0

    async def complete(self, call: ModelCall) -> Completion:
        self.calls += 1
        return Completion(text=f"{call.model}:{call.messages[-1].content}", model=call.model,
                          input_tokens=10, output_tokens=2)

    async def aclose(self) -> None:
        pass


@pytest.mark.anyio
async def test_record_fills_only_what_is_missing_then_replays(tmp_path: Path) -> None:
    import json

    from cascade.config import parse_config
    from cascade.record import record
    from cascade.suite import load_cases

    (tmp_path / "cases.jsonl").write_text("\n".join(json.dumps(
        {"id": f"q{i}", "messages": [{"role": "user", "content": f"q{i}"}], "expected": "x"})
        for i in range(3)) + "\n")
    cfg = parse_config({"rungs": [
        {"model": "s", "input_usd_per_mtok": 1.0, "output_usd_per_mtok": 0.0},
        {"model": "l", "input_usd_per_mtok": 10.0, "output_usd_per_mtok": 0.0}]})
    echo = _Echo()
    store = RecordingStore.for_suite(tmp_path)
    cases = load_cases(tmp_path)
    counts = await record(cases[:2], cfg, store, factory=lambda r: echo,  # type: ignore[arg-type,return-value]
                          progress=False)
    assert counts == {"recorded": 4, "skipped": 0, "failed": 0} and echo.calls == 4
    again = RecordingStore.for_suite(tmp_path)
    counts = await record(cases, cfg, again, factory=lambda r: echo,  # type: ignore[arg-type,return-value]
                          progress=False)
    assert counts == {"recorded": 2, "skipped": 4, "failed": 0} and echo.calls == 6
    replay = ReplayProvider(RecordingStore.for_suite(tmp_path))
    c = await replay.complete(answer_call(cfg.rungs[1], cases[2].messages))
    assert c.text == "l:q2"
    rec = RecordingStore.for_suite(tmp_path).get(answer_call(cfg.rungs[1], cases[2].messages))
    assert rec is not None and rec.cost_usd == pytest.approx(10 * 10 / 1e6)
