"""``cascade tune`` on ladders unlike the two shared ones, from a black-box walk: a model one
case lacks, providers the ladder file names without a URL, benchmark names with ``_``, a
reference that is not the suite's most accurate rung, and checks that must come before the
work, not after it."""

from __future__ import annotations

import io
import json
import math
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cascade.cli import main
from cascade.config import parse_config

LETTERS = "ABCD"


def _rows(n: int, models: dict[str, tuple[float, float]], seed: int = 0
          ) -> list[dict[str, Any]]:
    """``n`` multiple-choice cases: per model (accuracy, cost per case); a confidence that
    says something (right answers score higher)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        gold = LETTERS[int(rng.integers(0, 4))]
        outs = {}
        for j, (model, (accuracy, cost)) in enumerate(models.items()):
            right = bool(rng.random() < accuracy)
            conf = float(np.clip(rng.normal(0.75 if right else 0.45, 0.2), 0, 1))
            text = gold if right else LETTERS[(LETTERS.index(gold) + 1 + (i + j) % 3) % 4]
            outs[model] = {"text": text, "correct": right, "confidence": conf,
                           "confidence_source": "answer_logprob", "input_tokens": 100,
                           "output_tokens": 1, "cost_usd": cost, "latency_ms": 100.0}
        rows.append({"id": f"q{i}", "messages": [{"role": "user", "content": f"q {i}?"}],
                     "outcomes": outs})
    return rows


def _write(folder: Path, rows: list[dict[str, Any]], name: str,
           ladder: list[dict[str, Any]] | None, chain: str = "toy") -> Path:
    if ladder is not None:
        (folder / f"ladder-{chain}.json").write_text(json.dumps({"chain": chain,
                                                                  "ladder": ladder}))
    f = folder / name
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


_MODELS = {"a": (0.6, 1e-5), "b": (0.75, 1e-4), "c": (0.85, 1e-3)}


def _ladder(**providers: str) -> list[dict[str, Any]]:
    return [{"model": m, "provider": providers.get(m, "openai"),
             "input_usd_per_mtok": p, "output_usd_per_mtok": p}
            for m, p in zip(_MODELS, (0.1, 1.0, 10.0), strict=True)]


def _run(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(args), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_a_model_the_first_case_lacks_is_an_error_not_a_vanished_rung(tmp_path: Path) -> None:
    """The rungs were the first case's models: the top rung missing there (and only there)
    vanished from the ladder, and the second rung alone was recommended, silently; missing
    from any later case it was the error it should be."""
    rows = _rows(60, _MODELS)
    del rows[0]["outcomes"]["c"]
    suite = _write(tmp_path, rows, "mmlu_toy_train.jsonl", _ladder())
    code, out, err = _run("tune", str(suite), "--out", str(tmp_path / "T.toml"))
    assert code == 2 and not (tmp_path / "T.toml").exists(), out
    assert "case 'q0' has no outcome for 'c'" in err


@pytest.mark.parametrize(("provider", "url"), [("together", "https://api.together.xyz/v1"),
                                              ("my-vllm", "http://127.0.0.1:8000/v1")])
def test_a_ladder_files_other_provider_still_gets_a_tuned_file_that_loads(
        tmp_path: Path, provider: str, url: str, caplog: pytest.LogCaptureFixture) -> None:
    """A provider beside fireworks, openai and anthropic had no base_url: the whole tune ran,
    then writing TUNED.toml failed (base_url is required), so nothing was written at all."""
    suite = _write(tmp_path, _rows(120, _MODELS), "mmlu_toy_train.jsonl",
                   _ladder(a=provider))
    tuned = tmp_path / "T.toml"
    code, _out, err = _run("tune", str(suite), "--router", "off", "--out", str(tuned))
    assert code == 0, err
    cfg = parse_config(tomllib.loads(tuned.read_text()), source=str(tuned))
    [a] = [r for r in cfg.rungs if r.model == "a"]
    assert a.provider == "openai-compatible" and a.base_url == url
    assert a.api_key_env == provider.upper().replace("-", "_") + "_API_KEY"
    warned = provider == "my-vllm"
    assert warned == any("set base_url" in r.getMessage() for r in caplog.records)


def test_a_benchmark_name_with_an_underscore_finds_the_ladder_beside_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``hella_swag_toy_train.jsonl`` was read as benchmark "hella", ladder "swag_toy": the
    ladder-toy.json beside it was missed, and the rungs were written as openai models of
    unknown price, without a word."""
    suite = _write(tmp_path, _rows(120, _MODELS), "hella_swag_toy_train.jsonl",
                   _ladder(a="together"))
    tuned = tmp_path / "T.toml"
    assert _run("tune", str(suite), "--router", "off", "--out", str(tuned))[0] == 0
    rungs = tomllib.loads(tuned.read_text())["rungs"]
    assert {r["model"]: r.get("input_usd_per_mtok") for r in rungs} == {
        "a": 0.1, "b": 1.0, "c": 10.0}
    assert not any("unknown prices" in r.getMessage() for r in caplog.records)
    # no ladder file at all: said, not silent
    (tmp_path / "ladder-toy.json").unlink()
    assert _run("tune", str(suite), "--router", "off", "--out", str(tuned))[0] == 0
    assert any("unknown prices" in r.getMessage() for r in caplog.records)


def test_the_report_says_the_change_against_the_most_accurate_rung_when_it_ends_elsewhere(
        tmp_path: Path) -> None:
    """A cascade ending at a rival of the suite's most accurate rung was reported only against
    the rung it ends at, which flatters it: the figures against the most accurate one are
    given too."""
    models = {"a": (0.7, 1e-5), "b": (0.86, 1e-4), "c": (0.87, 1e-3)}
    rows = _rows(400, models, seed=2)  # b looks a hair below c; the cascade ends at b
    acc = {m: np.mean([r["outcomes"][m]["correct"] for r in rows]) for m in models}
    suite = _write(tmp_path, rows, "mmlu_toy_train.jsonl",
                   [{"model": m, "provider": "openai", "input_usd_per_mtok": p,
                     "output_usd_per_mtok": p} for m, p in zip(models, (0.1, 1, 10), strict=True)])
    code, out, err = _run("tune", str(suite), "--router", "off", "--json",
                          "--out", str(tmp_path / "T.toml"))
    assert code == 0, err
    rep = json.loads(out)
    best = max(acc, key=lambda m: acc[m])
    most = rep["against_most_accurate"]
    assert rep["reference"]["rung"] == "b" != best
    assert most["rung"] == best == rep["reference"]["looks_best"]
    assert most["accuracy_change"] < rep["expected"]["accuracy_change"]["estimate"]
    assert "against c (the suite's most accurate rung" in _run(
        "tune", str(suite), "--router", "off", "--out", str(tmp_path / "T.toml"))[1]
    assert rep["objective"]["max_accuracy_drop"] == 0.01  # the default, not null


def test_an_out_path_that_cannot_be_written_fails_before_the_tuning(tmp_path: Path) -> None:
    suite = _write(tmp_path, _rows(60, _MODELS), "mmlu_toy_train.jsonl", _ladder())
    for out in (tmp_path / "no-such-folder" / "T.toml", tmp_path):
        code, stdout, err = _run("tune", str(suite), "--out", str(out))
        assert code == 2 and stdout == "", err  # no report: the tuning never ran
        assert "--out" in err


def test_a_ladder_where_nothing_can_save_says_so(tmp_path: Path) -> None:
    """Every rung free: the note said the guard kept no setting, not that nothing is cheaper."""
    rows = _rows(120, {m: (acc, 0.0) for m, (acc, _c) in _MODELS.items()})
    suite = _write(tmp_path, rows, "mmlu_toy_train.jsonl",
                   [{"model": m, "provider": "openai", "input_usd_per_mtok": 0,
                     "output_usd_per_mtok": 0} for m in _MODELS])
    code, out, err = _run("tune", str(suite), "--router", "off",
                          "--out", str(tmp_path / "T.toml"))
    assert code == 0, err
    assert "nothing to save" in out and "guarded accuracy change" not in out


def test_a_long_ladders_chains_try_at_most_max_early_rungs_first() -> None:
    """The candidate chains grew as 2^rungs: a 12-rung ladder took over 3 minutes and 1.3 GB to
    tune. Ladders of up to 8 rungs keep every subset."""
    from cascade.tuning.candidates import ALL_SUBSETS_UP_TO, MAX_EARLY, rung_chains

    for k in (6, ALL_SUBSETS_UP_TO + 1, 12):
        cost = np.array([2.0 ** j for j in range(k)])
        chains = rung_chains(range(k), k - 1, cost)
        assert all(c[-1] == k - 1 for c in chains)
        if k - 1 <= ALL_SUBSETS_UP_TO:
            assert len(chains) == 2 ** (k - 1)
        else:
            assert max(len(c) for c in chains) == MAX_EARLY + 1
            assert len(chains) == sum(math.comb(k - 1, r) for r in range(MAX_EARLY + 1))


def test_no_figures_against_a_rung_that_only_ties_the_reference() -> None:
    """On a tie the cheaper rung "looks best": the report said "best single rung: big
    (100.0%)", then "against small (the suite's most accurate rung, 100.0%): -42.9 pts"."""
    from typing import cast

    from cascade.tuning.report import _against_most_accurate

    unused = cast(Any, None)
    tie, mean_cost = np.array([1.0, 1.0]), np.array([0.001, 0.1])
    assert _against_most_accurate(unused, unused, 1, unused, unused, 0, tie,
                                  mean_cost) is None
