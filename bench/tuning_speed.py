"""How fast ``cascade tune`` is on replayed suites: cases × rungs per second.

    python bench/tuning_speed.py [--cases 10000] [--chain llama] [--repeat 3]

A suite of ``--cases`` cases is synthesised by resampling (with replacement) the recorded
outcomes of one ladder in ``../shared/data/cascades`` (the five-rung ``llama`` chain by
default: every ``*_llama_train.jsonl``). Timed on it, best of ``--repeat``:

* ``cascade tune`` end to end (the CLI's ``run``: read the JSONL, tune with the default
  1,000-sample bootstrap and shift check, write TUNED.toml, print the report), with the
  router (``--router auto``, the default: fitted, cross-fitted and tuned on the prompts) and
  without it (``--router off``); the difference is what the router costs;
* ``tune()`` on the loaded table (the same work without reading and writing files);
* ``select()``, the choice alone (what cross-validation calls per fold);
* ``needed_labels()`` (what ``cascade label`` computes) with 10% of the cases labelled;
* the baseline: ``grid_search_baseline()``, every rung subset × a grid of thresholds.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from _common import REPO, machine, print_table
from tuning_baseline import grid_search_baseline

from cascade.cli.tune import add_arguments, run
from cascade.suite import load_shared_outcomes
from cascade.tuning import select, tune
from cascade.tuning.label import needed_labels

DATA = REPO.parent / "shared" / "data" / "cascades"


def synthesise(chain: str, cases: int, out_dir: Path, seed: int = 0) -> Path:
    """Write ``cases`` rows resampled from the chain's recorded files; returns the file."""
    rows: list[str] = []
    for f in sorted(DATA.glob(f"*_{chain}_train.jsonl")):
        rows += [line for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        raise SystemExit(f"no recorded outcomes for chain {chain!r} in {DATA}")
    rng = np.random.default_rng(seed)
    path = out_dir / f"resampled_{chain}_train.jsonl"
    with path.open("w", encoding="utf-8") as out:
        for i, j in enumerate(rng.integers(0, len(rows), size=cases)):
            obj = json.loads(rows[int(j)])
            obj["id"] = f"{obj['id']}-r{i}"  # resampled rows are distinct cases
            out.write(json.dumps(obj) + "\n")
    shutil.copy(DATA / f"ladder-{chain}.json", out_dir / f"ladder-{chain}.json")
    return path


def best_of(fn: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=10_000)
    ap.add_argument("--chain", default="llama")
    ap.add_argument("--repeat", type=int, default=3)
    ns = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        suite = synthesise(ns.chain, ns.cases, Path(d))
        table = load_shared_outcomes([suite])
        n, r = table.correct.shape
        lab = np.arange(n) % 10 == 0
        partly = replace(table, labelled=lab, correct=np.where(lab[:, None], table.correct,
                                                               False))
        cli = argparse.ArgumentParser()
        add_arguments(cli)

        def cli_run(*extra: str) -> Callable[[], None]:
            cli_ns = cli.parse_args([str(suite), "--out", str(Path(d) / "TUNED.toml"), *extra])

            def go() -> None:
                with contextlib.redirect_stdout(io.StringIO()):
                    run(cli_ns)
            return go

        timings = [
            ("cascade tune (CLI, end to end), router auto", best_of(cli_run(), ns.repeat)),
            ("cascade tune (CLI, end to end), --router off",
             best_of(cli_run("--router", "off"), ns.repeat)),
            ("tune() on the loaded table", best_of(lambda: tune(table), ns.repeat)),
            ("select() (the choice alone)", best_of(lambda: select(table), ns.repeat)),
            ("needed_labels() (cascade label), 10% labelled",
             best_of(lambda: needed_labels(partly), ns.repeat)),
            ("grid_search_baseline()", best_of(lambda: grid_search_baseline(table),
                                                 ns.repeat)),
        ]
    print(f"tuning speed on {n:,} cases × {r} rungs (resampled from the {ns.chain} chain's "
          f"recorded outcomes), best of {ns.repeat}")
    print(f"({machine()})")
    print_table(("what", "seconds", "cases × rungs / s"),
                [(name, s, f"{n * r / s:,.0f}") for name, s in timings])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
