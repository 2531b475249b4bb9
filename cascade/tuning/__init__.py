"""The tuner: the cheapest rungs and thresholds whose accuracy holds on questions it never saw.

Why not a plain grid search: choosing the cheapest of thousands of threshold settings whose
accuracy *on the suite* is within the allowed drop picks the setting that was luckiest on those
few hundred cases, and its accuracy drops on new ones (on the shared recorded data it broke a
1-point promise on 6 of 10 benchmarks, see ``bench/tuning.py``).

What we do instead:

1. Which rung is best is estimated too: the *rivals* are the rung most accurate on the suite's
   labelled cases and every rung not credibly below it (one-sided at ``delta``, Bonferroni over
   the comparisons with the other rungs: :mod:`~cascade.tuning.guard`). A
   cascade ends at one of them and may start at any subset of the rungs that cost at most half
   as much; each rival but the dearest is also a candidate alone.
2. Candidate thresholds are fixed in advance and never fitted to labels: for a confidence in
   [0, 1], ``0.5 … 0.999, 1.0``; for other scores, quantiles of the scores. Every rung subset ×
   every combination of its rungs' levels is one candidate (coarser levels when that would
   exceed a few thousand per subset).
3. A model ranks them: per rung, the expected net loss against the reference of accepting its
   answer, as a non-increasing step function of its score (isotonic, fitted on every case).
   Summed over the cases a candidate accepts early, that is its expected loss; only the
   model's frontier (from the safest up, each candidate cheaper than every safer one: some
   tens of the thousands) goes on. A handful of steps per rung stand in for one noisy count
   per candidate, so a candidate that only looks good because of a few lucky cases does not
   reach the frontier.
4. Each frontier candidate gets its *net* accuracy change against the reference on the suite,
   ``(better - worse) / n`` (cases it gets right where the reference is wrong offset those it
   gets wrong where the reference is right: cheap rungs are often right where the top one is
   not), and that change's paired standard error. The guard: ``change - z(1 - delta) × se >=
   -max_accuracy_drop`` against **every** rival. The cheapest frontier candidate that passes is
   recommended; when none does, the dearest rival alone is, and the report says so (and how
   many cases the most promising candidate would need). Unlabelled cases count exactly where
   an answer equals the reference's under the case's normaliser, and as losses elsewhere
   (:func:`~cascade.tuning.simulate.versus`); :mod:`~cascade.tuning.label` names the ones
   whose labels would change the decision.
5. With ``agreement="all"`` (off by default) a rung after the first may also be *gated on
   agreement*: it accepts only when its confidence passes AND its normalised answer agrees with
   the previous rung's in the chain (the engine's ``agreement`` verifier, mode ``previous``;
   TUNED.toml lists it on that rung). A rung that never accepts may stay as the witness the
   next rung agrees with. Gated candidates have their own frontier (the model fitted on the
   cases that agree) and a stricter guard: two pseudo-discordant cases instead of one, and z
   at ``delta / F`` where F counts the gate patterns examined.

What the promise means: an *estimate*, not a guarantee. The guard is a one-sided ``1 - delta``
normal-approximation bound for the one setting chosen, not a family-wise guarantee over the
selection; choosing the cheapest of the frontier still makes the in-sample estimate somewhat
optimistic, and the margin (z standard errors plus pseudo-cases) is sized to absorb that, which
cross-validation on the shared recorded data checks (``bench/tuning.py``: against the best
single rung on the held-out cases, the 1-point promise held on 9 of 10 files; see the README).
What is exact:
the simulated accuracy and cost of a setting on the suite (the engine's policy replayed), and
that the recommendation is never dearer and no more accurate than a single rung on the suite.
What is not covered: questions unlike the suite's (the report's ``shift`` section measures
held-out groups), and suites of a few hundred cases cannot certify settings whose only evidence
is zero observed disagreement with the reference; such suites get small savings or the
reference alone. Measured, not shipped (same cross-validation): choosing among *all* candidates
rather than the frontier saved a little more but broke a 2-point promise on mmlu_llama (-2.3 to
-2.9 points); the agreement gate, even on its own frontier and guard, broke it there too
(llama models agree on the same wrong letter); fixed-sequence testing along a label-free path
ordered by the rungs' own confidences held everywhere but stopped at the first noisy step
(median saving 3%); an OR rule (confidence OR agreement, which the engine's all-verdicts policy
cannot run) saved less than AND.

Simulation is vectorised: for a setting, each case exits at the first rung whose every
verifier passes (score >= threshold), the last rung of the cascade accepting everything.
"""

from __future__ import annotations

from cascade.tuning.candidates import reference_rung
from cascade.tuning.choose import select
from cascade.tuning.output import to_config, to_toml
from cascade.tuning.report import format_report
from cascade.tuning.setting import Setting
from cascade.tuning.shift import group_folds
from cascade.tuning.tuner import TuneResult, tune

__all__ = [
    "Setting",
    "TuneResult",
    "format_report",
    "group_folds",
    "reference_rung",
    "select",
    "to_config",
    "to_toml",
    "tune",
]
