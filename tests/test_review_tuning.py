"""Review of the tuner's statistics and choice: each test failed on the code before its fix."""

from __future__ import annotations

import numpy as np

from cascade.config import RungConfig, VerifierConfig
from cascade.suite import OutcomeTable, agreement_arrays
from cascade.tuning import select, tune
from cascade.tuning.choose import choose, dominating_rung
from cascade.tuning.simulate import outcome_of


def _lettered(texts: list[list[str]], correct: np.ndarray, conf: np.ndarray,
              labelled: np.ndarray | None = None, costs: tuple[float, ...] = (0.05, 1.0),
              groups: list[str] | None = None) -> OutcomeTable:
    """Multiple-choice answers of rungs ordered cheapest first (agreement under ``choice``)."""
    n, r = correct.shape
    return OutcomeTable(
        case_ids=tuple(f"q{i}" for i in range(n)),
        rungs=tuple(RungConfig(model=m, input_usd_per_mtok=c)
                    for m, c in zip("abcde"[:r], costs, strict=True)),
        correct=correct.astype(bool), cost=np.tile(np.array(costs, dtype=float), (n, 1)),
        scores={"confidence": conf.astype(float)}, passed={},
        groups=tuple(groups or [""] * n),
        verifiers=(VerifierConfig(name="confidence", id="confidence"),), source="synthetic",
        agreement=agreement_arrays(texts), agreement_normaliser="choice", labelled=labelled)


def test_a_rung_that_differs_on_every_unlabelled_case_does_not_replace_a_guarded_cascade(
        ) -> None:
    """1,000 labelled cases: the cheap rung ``a`` agrees with ``b`` on 950 and is wrong on 50,
    always confident; 1,000 unlabelled: ``a`` answers otherwise than ``b``, unconfident. The
    cascade a→b (a accepts at 0.5) passes a 5-point guard (-2.5 pts, 50 losses). ``a`` alone is
    as accurate on the labelled cases and cheaper, but differs from ``b`` on the 1,000
    unlabelled ones (losses under the guard's own rule): it must not replace the cascade."""
    n = 2000
    texts = [["A", "A"]] * 950 + [["B", "A"]] * 50 + [["C", "D"]] * 1000
    correct = np.array([[1, 1]] * 950 + [[0, 1]] * 50 + [[0, 0]] * 1000)
    conf = np.stack([np.where(np.arange(n) < 1000, 0.99, 0.1), np.zeros(n)], axis=1)
    t = _lettered(texts, correct, conf, labelled=np.arange(n) < 1000)
    choice, _ref, _s, _c = choose(t, max_drop=0.05, delta=0.05)
    assert choice.passed and choice.setting.chain == (0, 1)
    for setting in (select(t, max_accuracy_drop=0.05)[0],
                    tune(t, max_accuracy_drop=0.05, shift=False, bootstrap=20).setting):
        assert setting.chain == (0, 1)
        _b, w = outcome_of(t, setting, 1)
        assert int(w.sum()) == 50
    # labelled, the same comparison still finds a rung as accurate and cheaper than a cascade
    lab = t.take(np.arange(1000))
    right = lab.correct[:, 0].copy()
    assert dominating_rung(lab, right, np.full(1000, 0.5), np.zeros(1000, dtype=np.int64)) == 0
    right[950] = True  # the cascade one case better: a no longer dominates it
    assert dominating_rung(lab, right, np.full(1000, 0.5), np.zeros(1000, dtype=np.int64)) is None


def _two_guessers(n: int, seed: int) -> OutcomeTable:
    """Two cheap rungs right 70% of the time independently, with useless confidences, and an
    always-right top rung: the cheap rungs' answers agree (almost) only when both are right,
    so only the agreement gate finds a saving."""
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, 4, n)
    right = np.stack([rng.random(n) < 0.7, rng.random(n) < 0.7, np.ones(n, dtype=bool)], axis=1)
    off_a = rng.integers(1, 4, n)
    off_b = np.where(off_a == 3, 1, off_a + 1)  # wrong answers of a and b never coincide
    texts = [["ABCD"[(g + (0 if right[i, j] else off)) % 4]
              for j, off in enumerate((off_a[i], off_b[i], off_a[i]))]
             for i, g in enumerate(gold)]
    conf = np.stack([rng.random(n), rng.random(n), np.zeros(n)], axis=1)
    return _lettered(texts, right, conf, costs=(0.01, 0.02, 1.0),
                     groups=[f"g{i % 6}" for i in range(n)])


def test_the_shift_section_tunes_its_folds_with_the_agreement_gate_the_tuner_used() -> None:
    """With ``agreement="all"`` the recommendation is gated; the shift section must measure
    that tuner on held-out groups, not the ungated one (it tuned every fold with agreement
    off: its savings and changes were those of another method)."""
    t = _two_guessers(3000, 0)
    off = tune(t, agreement="off", max_accuracy_drop=0.005, bootstrap=20)
    gated = tune(t, agreement="all", max_accuracy_drop=0.005, bootstrap=20)
    assert gated.setting.agree and gated.report["expected"]["cost_saving"]["estimate"] > 0.3
    assert max(off.report["shift"]["cost_saving_by_fold"]) < 0.1
    assert min(gated.report["shift"]["cost_saving_by_fold"]) > 0.3


def test_the_shift_guard_falls_back_to_the_dearest_rival_not_the_rung_a_cascade_ends_at(
        ) -> None:
    """400 cases: ``c`` right on 397, ``b`` on 392 (wrong on 8 where ``c`` is right, right on
    the 3 where it is wrong): both could be the best. a→b (``a`` confident and right on 200,
    the 8 among them) passes against both, and ends at ``b``. Refused by the shift guard (the
    cases carry no groups), the recommendation must be the dearest rival ``c`` alone, as when
    nothing passes: ``b`` alone is 1.25 pts below ``c`` and fails the guard against it."""
    n = 400
    i = np.arange(n)
    correct = np.stack([i < 200, i >= 8, (i < 300) | (i >= 303)], axis=1)
    texts = [["A" if ok else wrong for ok, wrong in zip(row, "BCD", strict=True)]
             for row in correct]
    conf = np.stack([np.where(i < 200, 0.99, 0.1), np.zeros(n), np.zeros(n)], axis=1)
    t = _lettered(texts, correct, conf, costs=(0.01, 0.1, 1.0))
    choice, ref, _s, _c = choose(t, max_drop=0.01, delta=0.05)
    assert choice.passed and choice.setting.chain == (0, 1) and ref == 1
    assert choice.rivals == (1, 2)
    res = tune(t, shift_guard=True, bootstrap=20)
    assert res.setting.chain == (2,)
    assert res.report["shift_guard"]["refused_cascade"]
    assert res.report["reference"]["rung"] == "c"
    assert tune(t, shift=False, bootstrap=20).setting.chain == (0, 1)
