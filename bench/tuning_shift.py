"""How does the tuned promise hold when the questions shift? Real recorded answers, three shifts.

The tuner promises accuracy within ``--max-accuracy-drop`` of the best single rung for questions
*like the suite's*. Users' traffic is not the suite. On ``../shared/data/cascades``, for our
tuner and the plain grid search, evaluated by the same ``held_out`` as ``bench/tuning.py``:

1. **Unseen subjects** (mmlu, 57 subjects): subjects split into 5 folds; tune on the cases of
   4, evaluate on the subjects of the fifth (× 3 seeds).
2. **Skewed traffic** (mmlu): ordinary 5-fold cross-validation, but the held-out cases are
   weighted as if a few subjects dominated (Zipf weights over a random order of subjects,
   s = 1.2), so the promise is measured on a mix the suite's 5-per-subject never showed.
3. **Unseen benchmark**: per ladder, tune on four benchmarks pooled, evaluate on the fifth.

Printed: held-out accuracy change against the reference (the rung most accurate where tuned,
measured on the held-out cases), cost saving, and whether the promise held, next to the plain
i.i.d. cross-validation figure of the same file for comparison.

    python bench/tuning_shift.py [--max-accuracy-drop 0.01] [--seeds 3] [--shift-guard]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tuning import DATA, Split, case_folds, held_out

from cascade.suite import OutcomeTable, load_shared_outcomes
from cascade.tuning import group_folds
from cascade.tuning.guard import DELTA
from cascade.tuning.setting import FloatArray, IntArray


def _group_splits(groups: list[str], folds: int, seed: int) -> Split:
    gi = group_folds(groups, folds, seed)
    return [(np.nonzero(gi != f)[0], np.nonzero(gi == f)[0]) for f in range(folds)]


def _fixed(tr: IntArray, te: IntArray, _seed: int) -> Split:
    return [(tr, te)]


def _zipf(groups: list[str], seed: int, s: float = 1.2) -> FloatArray:
    """Per case: its subject's weight when subjects, in a random order, get Zipf weights."""
    names = sorted(set(groups))
    order = np.random.default_rng(seed + 1000).permutation(len(names))
    w_of = {names[j]: 1.0 / (rank + 1) ** s for rank, j in enumerate(order)}
    return np.array([w_of[g] for g in groups])


def labels_under_shift(data: Path, *, drop: float, delta: float, draws: int) -> int:
    """Per ladder and held-out benchmark: the learning curve and the labelling bench, drawn
    from the other four benchmarks and judged on the held-out one."""
    from tuning_labels import labelling, learning_curve, summarise

    print(f"tuned on four benchmarks of a ladder, judged on the fifth against its best single "
          f"rung; {draws} draws a row, max accuracy drop {drop:g}, delta {delta:g}")
    for ladder in ("llama", "qwen_oai"):
        files = sorted(data.glob(f"*_{ladder}_train.jsonl"))
        if not files:
            continue
        t = load_shared_outcomes(files)
        bench = np.array([g.split("/")[0] for g in t.groups])
        for out in sorted(set(bench)):
            tr, te = t.take(np.nonzero(bench != out)[0]), t.take(np.nonzero(bench == out)[0])
            print(f"{out}_{ladder} (tuning pool {tr.n})")
            for n, res in learning_curve(tr, te, [300, 1000], draws, drop=drop,
                                         delta=delta).items():
                print(f"  {n:>4} labelled                      {summarise(res, drop)}")
            lab = labelling(tr, te, 300, tr.n - 300, draws, drop=drop, delta=delta)
            asked = summarise(lab["labels where asked"], drop)
            print(f"  300 labelled + pool, where asked  {asked}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--max-accuracy-drop", type=float, default=0.01)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--delta", type=float, default=DELTA, help="the guard's level, as cascade tune")
    ap.add_argument("--labels", action="store_true",
                    help="instead: learning curve and labelling bench, tuned on four benchmarks "
                         "of a ladder and judged on the fifth")
    ap.add_argument("--draws", type=int, default=3, help="with --labels: draws per row")
    ap.add_argument("--shift-guard", action="store_true",
                    help="our tuner as `cascade tune --shift-guard` chooses")
    ns = ap.parse_args(argv)
    if not ns.data.is_dir():
        print(f"no shared data at {ns.data}: nothing to benchmark", file=sys.stderr)
        return 0
    drop = ns.max_accuracy_drop
    if ns.labels:
        return labels_under_shift(ns.data, drop=drop, delta=ns.delta, draws=ns.draws)
    seeds = range(ns.seeds)
    rows: list[tuple[str, str, dict[str, tuple[float, float]]]] = []

    def run(name: str, shift: str, table: OutcomeTable, splits_of: Callable[[int], Split],
            weight_of: Callable[[int], FloatArray] | None = None,
            over: range = seeds) -> None:
        res = {}
        for method in ("ours", "grid"):
            got = [held_out(table, splits_of(s), method, drop=drop, delta=ns.delta,
                            weight=None if weight_of is None else weight_of(s),
                            shift_guard=ns.shift_guard and method == "ours") for s in over]
            res[method] = (statistics.mean(g[0] for g in got), statistics.mean(g[1] for g in got))
        rows.append((name, shift, res))

    for f in sorted(ns.data.glob("mmlu_*_train.jsonl")):
        t = load_shared_outcomes([f])
        groups = list(t.groups)
        name = f.name.removesuffix("_train.jsonl")
        run(name, "i.i.d. 5-fold (for comparison)", t, partial(case_folds, t.n, 5))
        run(name, "unseen subjects", t, partial(_group_splits, groups, 5))
        run(name, "skewed traffic (Zipf over subjects)", t, partial(case_folds, t.n, 5),
            partial(_zipf, groups))
    for ladder in ("llama", "qwen_oai"):
        files = sorted(ns.data.glob(f"*_{ladder}_train.jsonl"))
        if not files:
            continue
        t = load_shared_outcomes(files)
        bench = [g.split("/")[0] for g in t.groups]
        for out in sorted(set(bench)):
            te = np.nonzero(np.array(bench) == out)[0]
            tr = np.nonzero(np.array(bench) != out)[0]
            run(f"{out}_{ladder}", "unseen benchmark (tuned on the other four)", t,
                partial(_fixed, tr, te), over=range(1))
    print(f"max accuracy drop {drop:g}; held-out change vs the best single rung on the held-out "
          "cases (points), "
          f"saving (%); {ns.seeds} seeds where folds are random")
    head = (f"{'file':<20} {'shift':<44} | {'ours Δacc':>9} {'save':>6} {'ok':>3} | "
            f"{'grid Δacc':>9} {'save':>6} {'ok':>3}")
    print(head)
    print("-" * len(head))
    held = {"ours": 0, "grid": 0}
    shifted = 0
    for name, shift, res in rows:
        cells = []
        for method in ("ours", "grid"):
            ch, sv = res[method]
            ok = ch >= -drop - 1e-9
            if not shift.startswith("i.i.d."):
                held[method] += ok
            cells.append(f"{ch * 100:>+9.2f} {sv * 100:>5.1f}% {'yes' if ok else 'NO':>3}")
        shifted += not shift.startswith("i.i.d.")
        print(f"{name:<20} {shift:<44} | {cells[0]} | {cells[1]}")
    print("-" * len(head))
    print(f"promise held under shift: ours {held['ours']}/{shifted}, grid search "
          f"{held['grid']}/{shifted}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
