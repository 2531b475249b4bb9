"""Does tuning keep its promise on questions it never saw? Cross-validation on real answers.

For each recorded-outcomes file in ``../shared/data/cascades`` (relative to the repo): k-fold
cross-validation (tune on k-1 folds, answer the held-out fold with the tuned setting), repeated
over a few fold seeds. Printed per file, for our tuner and for the plain grid-search baseline run
on the same folds: held-out accuracy change and cost saving against the best single rung (the
rung most accurate on the tuning folds, measured on the same held-out cases), and whether the
promise (a drop of at most ``--max-accuracy-drop``) held. Then the time to tune 10,000 cases ×
5 rungs. ``--agreement off|all`` switches the agreement gate (a rung must also agree with the
previous one) off (the default, as in ``cascade tune``) or on; ``--z-gate`` overrides its
guard's z, to measure over-fit.
``--seed-offset`` shifts the fold seeds, for a second run on independent folds.

    python bench/tuning.py [--folds 5] [--seeds 3] [--seed-offset 0] [--max-accuracy-drop 0.01]
                           [--agreement all]
    python bench/tuning.py --labels [--draws 5]   # learning curve and labelling bench
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tuning_baseline import grid_search_baseline  # noqa: E402

from cascade.suite import OutcomeTable, load_shared_outcomes  # noqa: E402
from cascade.tuning import Setting, reference_rung, select, tune  # noqa: E402
from cascade.tuning.candidates import candidates, rung_chains  # noqa: E402
from cascade.tuning.guard import DELTA, rivals  # noqa: E402
from cascade.tuning.setting import FloatArray, IntArray  # noqa: E402
from cascade.tuning.shift import shift_breaks, shift_check  # noqa: E402
from cascade.tuning.simulate import mesh_stats, simulate  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "cascades"


def fit(table: OutcomeTable, method: str, *, drop: float, delta: float = DELTA,
        agreement: str = "off", z_gate: float | None = None,
        shift_guard: bool = False) -> tuple[Setting, int]:
    """The setting ``method`` (``"ours"`` or ``"grid"``) tunes on ``table``, and the reference
    rung (the most accurate on ``table``) its promise is measured against; with
    ``shift_guard``, as ``cascade tune --shift-guard`` chooses."""
    if method == "ours":
        setting, ref = select(table, max_accuracy_drop=drop, delta=delta, agreement=agreement,
                              z_gate=z_gate)
        if shift_guard and len(setting.chain) > 1 and shift_breaks(
                shift_check(table, max_drop=drop, delta=delta, seed=0, agreement=agreement)):
            fallback = rivals(table, delta).ref  # as tune(): the dearest plausible best alone
            return Setting((fallback,)), fallback
        return setting, ref
    return grid_search_baseline(table, max_drop=drop), reference_rung(table)


Split = list[tuple[IntArray, IntArray]]


def case_folds(n: int, folds: int, seed: int) -> Split:
    """Ordinary k-fold splits of ``n`` cases: (tuning, held-out) index pairs."""
    fold = np.random.default_rng(seed).permutation(n) % folds
    return [(np.nonzero(fold != f)[0], np.nonzero(fold == f)[0]) for f in range(folds)]


def versus_best(table: OutcomeTable, right: FloatArray, cost: FloatArray,
                weight: FloatArray | None = None) -> tuple[float, float, int]:
    """Accuracy change and cost saving of answers ``right``/``cost`` (per case of ``table``)
    against the best single rung *on these cases* (the most accurate, the cheaper on a tie):
    the promise is "within X points of the best single rung" on new questions, whichever rung
    that turns out to be."""
    w = np.ones(table.n) if weight is None else weight
    acc = (w[:, None] * table.correct).sum(0) / w.sum()
    mc = (w[:, None] * table.cost).sum(0) / w.sum()
    best = int(np.lexsort((mc, -acc))[0])
    change = float(np.sum(w * right) / w.sum() - acc[best])
    return change, 1.0 - float(np.sum(w * cost) / w.sum()) / float(mc[best]), best


def held_out(table: OutcomeTable, splits: Split, method: str, *, drop: float,
             delta: float = DELTA, agreement: str = "off", z_gate: float | None = None,
             weight: FloatArray | None = None,
             shift_guard: bool = False) -> tuple[float, float, int, int]:
    """Tune on each split's first part, answer its second: the held-out accuracy change and
    cost saving against the best single rung on all the held-out cases together (see
    :func:`versus_best`), and how many splits chose a cascade and used the agreement gate.
    ``weight`` (per case of ``table``) weights the held-out cases."""
    w = np.ones(table.n) if weight is None else weight
    right = np.zeros(table.n)
    cost = np.zeros(table.n)
    seen = np.zeros(table.n, dtype=bool)
    cascades = gated = 0
    for tr, te in splits:
        setting, _ref = fit(table.take(tr), method, drop=drop, delta=delta,
                            agreement=agreement, z_gate=z_gate, shift_guard=shift_guard)
        cascades += len(setting.chain) > 1
        gated += bool(setting.agree)
        r, c, _ = simulate(table.take(te), setting)
        right[te], cost[te], seen[te] = r, c, True
    idx = np.nonzero(seen)[0]
    change, saving, _best = versus_best(table.take(idx), right[idx], cost[idx], w[idx])
    return change, saving, cascades, gated


MARGINS = (0.0, 0.005, 0.01)
"""In-sample safety margins of the hindsight ceiling (points of accuracy, as fractions)."""


def _ceiling(table: OutcomeTable, drop: float, gate: bool) -> list[float]:
    """With hindsight (chosen and measured on every case: not a valid procedure, only a bound
    on what a tuner of these settings could show), the largest saving whose in-sample accuracy
    change stays within ``drop`` less each of :data:`MARGINS`. A tuner that must hold the
    promise on unseen cases needs some margin: the held-out noise of a change on 300 cases is
    itself 0.5–1 point."""
    mc = table.cost.mean(0)
    ref = reference_rung(table)
    keys = tuple(sorted(table.scores))
    norm = table.agreement_normaliser or ""
    gate = gate and norm in table.agreement
    order = [int(j) for j in np.argsort(mc, kind="stable")]
    best = [0.0] * len(MARGINS)
    for chain in rung_chains(order, ref, mc):
        if len(chain) < 2:
            continue
        th, ag = candidates(table, chain, keys, gate=gate and len(chain) > 2)
        cost, better, worse, _ = mesh_stats(table, chain, keys, th, ref, ag, norm)
        change = (better - worse) / table.n
        for i, margin in enumerate(MARGINS):
            ok = change >= -drop + margin - 1e-12
            if ok.any():
                best[i] = max(best[i], 1 - float(cost[ok].min()) / float(mc[ref]))
    return best


def _timing(table: OutcomeTable, n: int = 10_000) -> tuple[float, float, int]:
    """Seconds to tune (choice only, and the full report) on ``n`` resampled cases."""
    rng = np.random.default_rng(1)
    big = table.take(rng.integers(0, table.n, size=n))
    t0 = time.perf_counter()
    select(big)
    t1 = time.perf_counter()
    tune(big, shift=False, bootstrap=200)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, len(big.rungs)


def labels_bench(data: Path, *, drop: float, delta: float, draws: int) -> int:
    """Learning curve and labelling bench per ladder, i.i.d. draws from its pooled files."""
    from tuning_labels import labelling, learning_curve, summarise

    print(f"i.i.d. draws from each ladder's five files pooled, {draws} draws a row, max accuracy "
          f"drop {drop:g}, delta {delta:g}; judged on the cases not drawn, against the best "
          "single rung on them")
    for ladder in ("llama", "qwen_oai"):
        files = sorted(data.glob(f"*_{ladder}_train.jsonl"))
        if not files:
            continue
        t = load_shared_outcomes(files)
        print(f"\n{ladder} ({t.n} cases pooled)")
        for n, res in learning_curve(t, None, [100, 300, 600, 1000], draws, drop=drop,
                                     delta=delta).items():
            print(f"  learning curve, {n:>4} labelled        {summarise(res, drop)}")
        for name, res in labelling(t, None, 300, 700, draws, drop=drop, delta=delta).items():
            print(f"  300 labelled + 700 pool: {name:<20} {summarise(res, drop)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--seed-offset", type=int, default=0,
                    help="fold seeds are offset, offset + 1, ...: a second, independent run")
    ap.add_argument("--max-accuracy-drop", type=float, default=0.01)
    ap.add_argument("--delta", type=float, default=DELTA)
    ap.add_argument("--files", nargs="*", help="only these file names")
    ap.add_argument("--agreement", choices=("off", "all"), default="off")
    ap.add_argument("--z-gate", type=float, default=None)
    ap.add_argument("--labels", action="store_true",
                    help="instead: the learning curve and the labelling bench on each ladder's "
                         "files pooled (see bench/tuning_labels.py)")
    ap.add_argument("--draws", type=int, default=5, help="with --labels: random draws per row")
    ns = ap.parse_args(argv)
    if not ns.data.is_dir():
        print(f"no shared data at {ns.data}: nothing to benchmark", file=sys.stderr)
        return 0
    if ns.labels:
        return labels_bench(ns.data, drop=ns.max_accuracy_drop, delta=ns.delta, draws=ns.draws)
    files = sorted(ns.data.glob("*_train.jsonl"))
    if ns.files:
        files = [f for f in files if f.name in ns.files]
    drop = ns.max_accuracy_drop
    print(f"k={ns.folds}-fold CV × {ns.seeds} seeds (from {ns.seed_offset}), max accuracy "
          f"drop {drop:g}, delta {ns.delta:g}, agreement gate {ns.agreement}; held-out change "
          "vs the best single rung (points), saving (%)")
    head = (f"{'file':<31} {'n':>4} | {'ours Δacc':>9} {'save':>6} {'casc':>5} {'gate':>5} "
            f"{'ok':>3} | "
            f"{'grid Δacc':>9} {'save':>6} {'ok':>3} | {'ceiling at margin 0/0.5/1 pt':>29}")
    print(head)
    print("-" * len(head))
    ours_ok = grid_ok = 0
    ceilings: list[list[float]] = []
    ours_save: list[float] = []
    grid_save: list[float] = []
    t0 = time.perf_counter()
    largest: OutcomeTable | None = None
    for f in files:
        table = load_shared_outcomes([f])
        if largest is None or len(table.rungs) > len(largest.rungs):
            largest = table
        res: dict[str, list[tuple[float, float, int, int]]] = {"ours": [], "grid": []}
        for seed in range(ns.seed_offset, ns.seed_offset + ns.seeds):
            for method in res:
                splits = case_folds(table.n, ns.folds, seed)
                res[method].append(held_out(table, splits, method, drop=drop, delta=ns.delta,
                                            agreement=ns.agreement, z_gate=ns.z_gate))
        o_ch = statistics.mean(x[0] for x in res["ours"])
        o_sv = statistics.mean(x[1] for x in res["ours"])
        o_cas = sum(x[2] for x in res["ours"]) / (ns.folds * ns.seeds)
        o_gate = sum(x[3] for x in res["ours"]) / (ns.folds * ns.seeds)
        g_ch = statistics.mean(x[0] for x in res["grid"])
        g_sv = statistics.mean(x[1] for x in res["grid"])
        o_ok, g_ok = o_ch >= -drop - 1e-9, g_ch >= -drop - 1e-9  # exactly 1 point is within
        ours_ok += o_ok
        grid_ok += g_ok
        ours_save.append(o_sv)
        grid_save.append(g_sv)
        ceilings.append(_ceiling(table, drop, gate=True))
        ceiling = " / ".join(f"{c * 100:.0f}%" for c in ceilings[-1])
        print(f"{f.name:<31} {table.n:>4} | {o_ch * 100:>+9.2f} {o_sv * 100:>5.1f}% "
              f"{o_cas:>5.0%} {o_gate:>5.0%} {'yes' if o_ok else 'NO':>3} | {g_ch * 100:>+9.2f} "
              f"{g_sv * 100:>5.1f}% {'yes' if g_ok else 'NO':>3} | {ceiling:>29}")
    print("-" * len(head))
    n = len(files)
    print(f"promise held (held-out drop <= {drop * 100:g} pt): ours {ours_ok}/{n}, "
          f"grid search {grid_ok}/{n}")
    if n:
        print(f"median cost saving: ours {statistics.median(ours_save) * 100:.1f}%, "
              f"grid search {statistics.median(grid_save) * 100:.1f}%; hindsight ceiling at "
              "margin 0 / 0.5 / 1 pt: " + " / ".join(
                  f"{statistics.median(c[i] for c in ceilings) * 100:.1f}%"
                  for i in range(len(MARGINS))))
    print(f"(casc = share of folds where our tuner recommended a cascade, gate = where it also "
          f"used the agreement gate; ceiling = the largest saving among the tuner's candidate "
          f"settings, agreement gate included, whose accuracy change on the whole file is at "
          f"least the margin above -{drop * 100:g} pt, chosen with hindsight on all its cases: "
          f"no honest tuner can show it, and one that holds the promise on unseen cases needs "
          f"a margin about the size of the held-out noise; cross-validation took "
          f"{time.perf_counter() - t0:.1f}s)")
    if largest is not None:
        sel_s, full_s, r = _timing(largest)
        print(f"timing on 10,000 resampled cases × {r} rungs: choice {sel_s:.2f}s, "
              f"full tune with report {full_s:.2f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
