"""The outcome table the tuner works on: cases × rungs, from recorded suites or shared files.

The shared recorded-outcomes format (``<benchmark>_<chain>_train.jsonl`` with a
``ladder-<chain>.json`` beside it) loads straight into an :class:`OutcomeTable`; a recorded suite
is graded from its recordings. Both carry the answer texts, so the table also holds which rungs
agree with each other (under each built-in normaliser of ``cascade.text``): the signal the
``agreement`` verifier reads in a live climb, and what makes unlabelled cases usable (two
answers equal under the suite's normaliser get the same grade).

Unlabelled cases (recorded traffic nobody graded yet: ``"correct": null`` in every outcome of a
shared-format case, a recorded-suite case without ``expected``) are kept, with
``labelled[i] = False`` and ``correct[i] = False`` as a placeholder that nothing may read as a
grade.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cascade.config import CascadeConfig, RungConfig, VerifierConfig
from cascade.errors import ConfigError
from cascade.messages import Message, normalise_messages
from cascade.suite.cases import Case, load_cases, read_jsonl, unique_cases
from cascade.suite.grading import GRADER_NORMALISER, grade
from cascade.suite.ladder_file import ladder_rungs, read_ladder, read_ladder_file
from cascade.suite.recordings import RecordingStore, answer_call

__all__ = [
    "AGREEMENT_NORMALISERS",
    "OutcomeTable",
    "agreement_arrays",
    "is_shared_outcomes",
    "load_outcome_table",
    "load_shared_outcomes",
    "table_from_recordings",
]

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True, kw_only=True)
class OutcomeTable:
    """Cases × rungs: what each rung would have answered, whether it was right, what it cost,
    and what each verifier said. Rungs are ordered cheapest first.

    ``scores[v][i, j]`` is verifier ``v``'s score of rung ``j`` on case ``i`` (+inf where the
    verifier does not judge that rung, NaN where it gave no score); ``passed[v]`` are the
    pass/fail flags of verifiers without a score.
    """

    case_ids: tuple[str, ...]
    rungs: tuple[RungConfig, ...]
    correct: BoolArray
    cost: FloatArray
    """The rung's answer call plus every verifier call on it, USD."""
    scores: Mapping[str, FloatArray]
    passed: Mapping[str, BoolArray]
    groups: tuple[str, ...]
    verifiers: tuple[VerifierConfig, ...] = ()
    own_passed: Mapping[str, BoolArray] = field(default_factory=dict)
    """Scoring verifiers' own pass/fail (used where no threshold is configured)."""
    unjudged: BoolArray | None = None
    """(case, rung): an answer recorded with no verdict at all although the rung has verifiers
    (the top rung's shadow answer ``suite from-log`` keeps): whether it would verify is
    unknown, which is not the same as failing (None: every answer was judged)."""
    source: str = ""
    base: CascadeConfig | None = None
    """The config the table was built under (sections other than rungs carry into TUNED.toml)."""
    agreement: Mapping[str, BoolArray] = field(default_factory=dict)
    """``agreement[norm][i, a, b]``: rungs ``a`` and ``b`` gave case ``i`` the same answer under
    normaliser ``norm`` (both had one), as :class:`verifiers.agreement.AgreementVerifier`
    decides; the diagonal says whether the rung's answer normalises at all."""
    agreement_normaliser: str | None = None
    """The normaliser that suits the cases' graders (most cases' when they differ): the one the
    tuner's agreement gate uses and writes into TUNED.toml."""
    messages: tuple[tuple[Message, ...], ...] = ()
    """Each case's whole request (system prompt included): what a router learns from; empty
    for tables built in code without them."""
    prompts: tuple[str, ...] = ()
    """Each case's request text (its last user message), for routers and for people reading
    ``cascade label``'s list; empty for tables built in code without them."""
    labelled: BoolArray | None = None
    """Per case, whether ``correct`` holds grades; None: every case is labelled. An unlabelled
    row's ``correct`` is False and means nothing."""
    case_normalisers: tuple[str, ...] = ()
    """Per case, the normaliser that matches its grader (mixed suites mix them); empty: every
    case uses ``agreement_normaliser``."""
    answers: tuple[tuple[str | None, ...], ...] = ()
    """``answers[i][j]``: rung ``j``'s answer text to case ``i`` (None: no answer), what a
    judge model grades and ``cascade label`` shows; empty for tables built in code."""

    def __post_init__(self) -> None:
        n, r = self.correct.shape
        if self.cost.shape != (n, r) or len(self.case_ids) != n or len(self.rungs) != r:
            raise ValueError("outcome table arrays disagree in shape")
        if any(a.shape != (n, r, r) for a in self.agreement.values()):
            raise ValueError("agreement arrays must be cases × rungs × rungs")
        if self.case_normalisers and len(self.case_normalisers) != n:
            raise ValueError("one normaliser per case")
        if self.answers and len(self.answers) != n:
            raise ValueError("one row of answers per case")
        if self.messages and len(self.messages) != n:
            raise ValueError("one request per case")
        if self.prompts and len(self.prompts) != n:
            raise ValueError("one prompt per case")
        if self.labelled is not None and self.labelled.shape != (n,):
            raise ValueError("one labelled flag per case")

    def same_answer(self, ref: int) -> BoolArray | None:
        """Per case and rung: is the rung's answer the same as rung ``ref``'s under the case's
        own normaliser (so it has the same grade)? None when the table holds no agreement."""
        names = self.case_normalisers or (self.agreement_normaliser or "",) * self.n
        out = np.zeros(self.correct.shape, dtype=bool)
        for name in set(names):
            arr = self.agreement.get(name)
            if arr is None:
                return None
            rows = np.array([x == name for x in names], dtype=bool)
            out[rows] = arr[rows][:, :, ref]
        return out

    @property
    def is_labelled(self) -> BoolArray:
        """Per case, whether its grades are known (all True for a fully labelled table)."""
        return np.ones(self.n, dtype=bool) if self.labelled is None else self.labelled

    @property
    def n_labelled(self) -> int:
        return self.n if self.labelled is None else int(self.labelled.sum())

    def with_labels(self, correct: Mapping[str, Mapping[str, bool]]) -> OutcomeTable:
        """A copy where the cases named in ``correct`` (case id -> rung label -> right) are
        labelled: what answers to ``cascade label``'s list look like once graded."""
        if not correct:
            return self
        fixed = self.correct.copy()
        lab = self.is_labelled.copy()
        col = {r.label: j for j, r in enumerate(self.rungs)}
        for i, cid in enumerate(self.case_ids):
            got = correct.get(cid)
            if got is None:
                continue
            for label, ok in got.items():
                fixed[i, col[label]] = bool(ok)
            lab[i] = True
        return replace(self, correct=fixed, labelled=None if lab.all() else lab)

    def agrees(self, a: int, b: int, normaliser: str | None = None) -> BoolArray | None:
        """Per case, whether rungs ``a`` and ``b`` agree; None when the table cannot say."""
        arr = self.agreement.get(normaliser or self.agreement_normaliser or "")
        return None if arr is None else arr[:, a, b]

    @property
    def n(self) -> int:
        return int(self.correct.shape[0])

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(r.label for r in self.rungs)

    def take(self, idx: npt.NDArray[np.int_] | Sequence[int]) -> OutcomeTable:
        """The rows ``idx`` (a resample may repeat rows)."""
        ix = np.asarray(idx, dtype=np.int64)
        return replace(
            self,
            case_ids=tuple(self.case_ids[i] for i in ix),
            correct=self.correct[ix], cost=self.cost[ix],
            scores={k: v[ix] for k, v in self.scores.items()},
            passed={k: v[ix] for k, v in self.passed.items()},
            own_passed={k: v[ix] for k, v in self.own_passed.items()},
            groups=tuple(self.groups[i] for i in ix),
            agreement={k: v[ix] for k, v in self.agreement.items()},
            prompts=tuple(self.prompts[i] for i in ix) if self.prompts else (),
            messages=tuple(self.messages[i] for i in ix) if self.messages else (),
            answers=tuple(self.answers[i] for i in ix) if self.answers else (),
            case_normalisers=(tuple(self.case_normalisers[i] for i in ix)
                              if self.case_normalisers else ()),
            labelled=None if self.labelled is None else self.labelled[ix],
            unjudged=None if self.unjudged is None else self.unjudged[ix],
        )


AGREEMENT_NORMALISERS: tuple[str, ...] = ("exact", "normalised", "numeric", "choice")
"""The built-in normalisers whose agreement an outcome table precomputes."""
_BENCH_NORMALISER = {"mmlu": "choice", "medmcqa": "choice", "gsm8k": "numeric",
                     "triviaqa": "normalised", "truthfulqa": "normalised"}
_TOLERANCE = 1e-6
"""The agreement verifier's default numeric tolerance (relative and absolute)."""



def agreement_arrays(texts: Sequence[Sequence[str | None]],
                     normalisers: Sequence[str] = AGREEMENT_NORMALISERS
                     ) -> dict[str, BoolArray]:
    """Cases × rungs × rungs agreement of answer ``texts`` (None: no answer) per normaliser.

    Same rule as the agreement verifier: both answers must normalise (not None) and be equal
    (numbers within a relative and absolute 1e-6). Booleans, so 10,000 cases × 5 rungs take
    250 kB a normaliser.
    """
    from cascade.text import NORMALISERS

    n = len(texts)
    r = len(texts[0]) if n else 0
    out: dict[str, BoolArray] = {}
    for name in normalisers:
        norm = NORMALISERS[name]
        vals = [[None if t is None else norm(t) for t in row] for row in texts]
        if name == "numeric":
            nums: list[list[float]] = [[math.nan if not isinstance(v, (int, float)) else float(v)
                                        for v in row] for row in vals]
            x: FloatArray = np.array(nums, dtype=np.float64).reshape(n, r)
            a, b = x[:, :, None], x[:, None, :]
            with np.errstate(invalid="ignore"):
                tol = np.maximum(_TOLERANCE * np.maximum(np.abs(a), np.abs(b)), _TOLERANCE)
                eq = (a == b) | (np.abs(a - b) <= tol)
            out[name] = eq & ~np.isnan(a) & ~np.isnan(b)
        else:
            codes: dict[Any, int] = {}
            c = np.array([[-1 if v is None else codes.setdefault(v, len(codes)) for v in row]
                          for row in vals], dtype=np.int64).reshape(n, r)
            has = c >= 0
            out[name] = (c[:, :, None] == c[:, None, :]) & has[:, :, None] & has[:, None, :]
    return out


def _most_common(names: Iterable[str]) -> str | None:
    counts: dict[str, int] = {}
    for x in names:
        counts[x] = counts.get(x, 0) + 1
    return max(counts, key=lambda k: counts[k]) if counts else None


_SHARED = re.compile(r"^(?P<stem>.+?)_(?:train|test|val)\.jsonl$")


def _bench_chain(p: Path) -> tuple[str, str] | None:
    """``<bench>_<chain>_train.jsonl``'s two names. Either may hold ``_`` (``qwen_oai``,
    ``hella_swag``): the split is the first whose ``ladder-<chain>.json`` is beside the file,
    else the first ``_`` (the benchmark one word)."""
    m = _SHARED.match(p.name)
    if m is None or "_" not in m["stem"]:
        return None
    stem = m["stem"]
    splits = [(stem[:i], stem[i + 1:]) for i, ch in enumerate(stem) if ch == "_"]
    return next(((b, c) for b, c in splits if p.with_name(f"ladder-{c}.json").is_file()),
                splits[0])


def is_shared_outcomes(path: str | os.PathLike[str]) -> bool:
    """A file in the shared recorded-outcomes format: JSON lines whose first object carries
    ``"outcomes"`` (whatever its name; ``<bench>_<chain>_train.jsonl`` also names its ladder)."""
    p = Path(path)
    if not p.is_file():
        return False
    with p.open("rb") as f:
        first = f.readline(1 << 20)
    try:  # bytes that are not UTF-8 raise here (a ValueError): read_jsonl then names the line
        obj = json.loads(first)
    except ValueError:
        return False
    return isinstance(obj, dict) and isinstance(obj.get("outcomes"), dict)


def _group_of(bench: str, row: Mapping[str, Any]) -> str:
    ref = row.get("reference") or {}
    for k in ("subject", "subject_name", "category"):
        if isinstance(ref, Mapping) and ref.get(k):
            return f"{bench}/{ref[k]}"
    return bench


def load_shared_outcomes(paths: Sequence[str | os.PathLike[str]],
                         config: CascadeConfig | None = None, *,
                         ladder_file: str | os.PathLike[str] | None = None) -> OutcomeTable:
    """Load files of the shared recorded-outcomes format; all must come from one ladder.

    The ladder is ``ladder_file`` (a shared ladder JSON), else the ``ladder-<chain>.json``
    beside the files, ordered by mean cost over the loaded cases. A ``config`` instead chooses
    the rungs: its rungs in its order, each matched to the file's model of the same name (a
    model the files do not record is an error), as a recorded suite's ``--config`` does. The
    score is the recorded confidence, exposed as verifier ``confidence``. Groups are
    ``benchmark/subject``.
    """
    rows: list[tuple[str, dict[str, Any]]] = []
    where: list[str] = []
    chains: set[str] = set()
    sources: set[str] = set()
    ps = [Path(x) for x in paths]
    for p in ps:
        named = _bench_chain(p)
        if named is not None:
            chains.add(named[1])
        elif not is_shared_outcomes(p):
            raise ConfigError('not a shared outcomes file (JSON lines with "outcomes")',
                              source=str(p))
        for line, obj in read_jsonl(p):
            if "id" not in obj:  # labels, NEEDS lines and error messages name cases by id
                raise ConfigError(f"line {line}: a case needs 'id'", source=str(p))
            outs = obj.get("outcomes")
            if not isinstance(outs, Mapping) or not all(isinstance(o, Mapping)
                                                        for o in outs.values()):
                raise ConfigError(f"line {line}, case {obj.get('id')!r}: \"outcomes\" must be "
                                  "an object holding one object per model", source=str(p))
            rows.append((named[0] if named is not None else p.stem, obj))
            where.append(f"{p}:{line}")
            for o in outs.values():
                sources.add(str(o.get("confidence_source", "")))
    if not rows:
        raise ConfigError("no cases", source=", ".join(map(str, ps)))
    seen: dict[str, str] = {}
    for (_b, row), at in zip(rows, where, strict=True):  # labels are keyed by id; a file
        cid = str(row.get("id"))                         # given twice doubled the evidence
        if cid in seen:
            raise ConfigError(f"case id {cid!r} repeats (first at {seen[cid]}; a file given "
                              "twice, or two cases with one id)", source=at)
        seen[cid] = at
    logprobs = sources == {"answer_logprob"}
    # every model any case records, in order of first sight: one missing from the first case
    # (and only there) would otherwise vanish from the ladder, top rung and all, silently;
    # a case that lacks one is an error below
    recorded = list(dict.fromkeys(m for _b, row in rows for m in row["outcomes"]))
    if config is not None:
        models = [r.model for r in config.rungs]
        lacking = [(k, r) for k, r in enumerate(config.rungs) if r.model not in recorded]
        if lacking:
            k, bad = lacking[0]
            raise ConfigError(f"rung {bad.label!r}: model {bad.model!r} is not recorded in "
                              f"{where[0].rsplit(':', 1)[0]}; recorded: {', '.join(recorded)}",
                              source=config.source, key=f"rungs[{k}]")
        # the recorded confidence is the signal: the config's own verifiers and thresholds
        # do not apply, and an answer_logprob confidence needs the log-probabilities served
        chosen = tuple(replace(r, verifiers=None, thresholds={},
                               logprobs=r.logprobs or logprobs) for r in config.rungs)
    else:
        models = recorded
        if ladder_file is not None:
            ladder, ladder_source = read_ladder_file(ladder_file), str(ladder_file)
        else:
            ladder, ladder_source = read_ladder(ps, chains, models)
        by_model = ladder_rungs(ladder, logprobs)
        missing = [x for x in models if x not in by_model]
        if missing:
            raise ConfigError(f"the ladder file has no entry for {missing}",
                              source=ladder_source)
        chosen = tuple(by_model[x] for x in models)
    n, r = len(rows), len(models)
    correct = np.zeros((n, r), dtype=bool)
    labelled = np.ones(n, dtype=bool)
    cost = np.zeros((n, r))
    score = np.full((n, r), np.nan)
    texts: list[list[str | None]] = []
    for i, (_b, row) in enumerate(rows):
        texts.append([])
        for model, o in row["outcomes"].items():  # each an object: checked as it was read
            if o.get("correct") is not None and not isinstance(o["correct"], bool):
                raise ConfigError(f"case {row.get('id')!r}, model {model!r}: \"correct\" must "
                                  f"be true, false or null, got {o['correct']!r}",
                                  source=where[i])
        grades = [o.get("correct") for o in row["outcomes"].values()]
        if all(g is None for g in grades):
            labelled[i] = False  # recorded, not labelled
        elif any(g is None for g in grades):
            raise ConfigError(f"case {row.get('id')!r} labels some outcomes and not others "
                              "(\"correct\": null in every outcome means not labelled)",
                              source=where[i])
        for j, model in enumerate(models):
            o = row["outcomes"].get(model)
            if o is None:
                raise ConfigError(f"case {row.get('id')!r} has no outcome for {model!r}",
                                  source=where[i])
            t = o.get("text")
            texts[i].append(t if isinstance(t, str) else None)
            correct[i, j] = bool(o["correct"])
            cost[i, j] = _outcome_number(o, "cost_usd", row, model, [where[i]])
            c = o.get("confidence")
            score[i, j] = (math.nan if c is None else
                           _outcome_number(o, "confidence", row, model, [where[i]], upper=1.0))
    # a config's rungs keep its order, as a recorded suite's do (the tuner sorts by cost)
    order = (np.arange(r) if config is not None
             else np.argsort(cost.mean(axis=0), kind="stable"))
    source = "logprobs" if logprobs else "self_check" if sources == {"self_check"} else "auto"
    verifier = VerifierConfig(name="confidence", id="confidence", settings={"source": source})
    agree = agreement_arrays(texts)
    return OutcomeTable(
        case_ids=tuple(str(row["id"]) for _b, row in rows),
        rungs=tuple(chosen[int(j)] for j in order),
        correct=correct[:, order], cost=cost[:, order],
        scores={"confidence": score[:, order]}, passed={},
        groups=tuple(_group_of(b, row) for b, row in rows),
        verifiers=(verifier,), source=", ".join(str(p) for p in paths),
        agreement={k: v[:, order][:, :, order] for k, v in agree.items()},
        agreement_normaliser=_most_common(_BENCH_NORMALISER.get(b, "normalised")
                                          for b, _row in rows),
        prompts=tuple(_prompt_of(row) for _b, row in rows),
        messages=tuple(_messages_of(row) for _b, row in rows),
        answers=tuple(tuple(t[int(j)] for j in order) for t in texts),
        case_normalisers=tuple(_BENCH_NORMALISER.get(b, "normalised") for b, _row in rows),
        labelled=None if labelled.all() else labelled,
        # a config's other tables ([server], [policy], ...) go into TUNED.toml as written
        base=None if config is None else config.replace(rungs=chosen, verifiers=(verifier,)),
    )


def _outcome_number(o: Mapping[str, Any], key: str, row: Mapping[str, Any], model: str,
                    paths: Sequence[str | os.PathLike[str]], *,
                    upper: float = math.inf) -> float:
    """A recorded number that must be finite, >= 0 and <= ``upper``: a NaN cost made a rung's
    mean cost NaN (and the reference rung another one), a negative one made a rung look free,
    a confidence above 1 passed every threshold; none of them may pass silently."""
    v = o.get(key)
    if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            and 0.0 <= v <= upper):
        allowed = "a number in [0, 1] or null" if upper == 1.0 else "a finite number >= 0"
        raise ConfigError(f"case {row.get('id')!r}, model {model!r}: {key!r} must be "
                          f"{allowed}, got {v!r}", source=", ".join(map(str, paths)))
    return float(v)


def _messages_of(row: Mapping[str, Any]) -> tuple[Message, ...]:
    try:
        return normalise_messages(messages=row.get("messages") or [])
    except ConfigError:
        return ()


def _prompt_of(row: Mapping[str, Any]) -> str:
    msgs = row.get("messages") or []
    users = [str(m.get("content", "")) for m in msgs
             if isinstance(m, Mapping) and m.get("role") == "user"]
    return users[-1] if users else ""


def table_from_recordings(cases: Sequence[Case], store: RecordingStore,
                          config: CascadeConfig, *, source: str = "") -> OutcomeTable:
    """Grade every rung's recorded answer to every case and collect its recorded verdicts.

Rungs keep the config's order (the tuner sorts candidates by cost itself).

    Raises a :class:`ConfigError` naming the first case and model that were never recorded.
    """
    rungs = config.rungs
    n, r = len(cases), len(rungs)
    correct = np.zeros((n, r), dtype=bool)
    cost = np.zeros((n, r))
    scoring: dict[str, FloatArray] = {}
    flags: dict[str, BoolArray] = {}
    own: dict[str, BoolArray] = {}
    texts: list[list[str | None]] = [[None] * r for _ in cases]
    missing: list[str] = []
    unverified: list[str] = []  # verifiers configured after the answer was recorded
    unjudged = np.zeros((n, r), dtype=bool)
    for i, case in enumerate(cases):
        for j, rung in enumerate(rungs):
            rec = store.get(answer_call(rung, case.messages))
            if rec is None:
                missing.append(f"case {case.id!r} × model {rung.model!r}")
                continue
            texts[i][j] = rec.text
            unjudged[i, j] = not rec.verdicts and bool(config.verifiers_for(rung))
            correct[i, j] = case.labelled and grade(case, rec.text)
            verdicts = {v.verifier: v for v in rec.verdicts}
            # Priced at the config's prices (what TUNED.toml will pay), from the recorded
            # tokens, unless a fallback answered (it bills at its own price) or the price is
            # unknown: a price changed since recording was reported at the old one.
            answer_cost = (rung.cost_usd(rec.input_tokens, rec.output_tokens)
                           if rung.price_known and rec.endpoint in ("", rung.endpoint)
                           else rec.cost_usd)
            cost[i, j] = answer_cost + sum(v.cost_usd for v in rec.verdicts)
            bad = [f"verifier {v.verifier!r} score {v.score!r}" for v in rec.verdicts
                   if v.score is not None and math.isinf(v.score)]
            if not (math.isfinite(cost[i, j]) and rec.cost_usd >= 0
                    and all(v.cost_usd >= 0 for v in rec.verdicts)) or bad:
                what = bad[0] if bad else f"cost {cost[i, j]!r} (must be finite and >= 0)"
                raise ConfigError(f"the recording of case {case.id!r} × model {rung.model!r} "
                                  f"holds {what}", source=source or str(store.path))
            for vc in config.verifiers_for(rung):
                v = verdicts.get(vc.key)
                if v is None and rec.verdicts:
                    unverified.append(f"verifier {vc.key!r} on case {case.id!r} × model "
                                      f"{rung.model!r}")
                own.setdefault(vc.key, np.ones((n, r), dtype=bool))[i, j] = bool(
                    v is not None and v.passed)
                if v is not None and v.score is not None:
                    arr = scoring.setdefault(vc.key, np.full((n, r), np.inf))
                    arr[i, j] = v.score
                else:
                    flag = flags.setdefault(vc.key, np.ones((n, r), dtype=bool))
                    flag[i, j] = bool(v is not None and v.passed)
                    if vc.key in scoring:
                        scoring[vc.key][i, j] = math.nan
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConfigError(f"no recording for {missing[0]}{more}; run `cascade record` first",
                          source=source or str(store.path))
    if unverified:  # read as a rejection, it made every answer of that rung look refused
        more = f" (and {len(unverified) - 1} more)" if len(unverified) > 1 else ""
        raise ConfigError(f"no recorded verdict of {unverified[0]}{more}: the verifier was "
                          "configured after the suite was recorded; run `cascade record` again "
                          "(it runs only the missing verifiers)", source=source or str(store.path))
    for k in list(flags):
        if k in scoring:  # a verifier that scored some rungs is a scoring verifier throughout
            del flags[k]
    return OutcomeTable(
        case_ids=tuple(c.id for c in cases), rungs=tuple(rungs),
        correct=correct, cost=cost, scores=scoring, passed=flags,
        groups=tuple(c.group for c in cases), verifiers=config.verifiers,
        own_passed={k: v for k, v in own.items() if k in scoring},
        unjudged=unjudged if unjudged.any() else None,
        source=source, base=config,
        agreement=agreement_arrays(texts) if n and r else {},
        agreement_normaliser=_most_common(GRADER_NORMALISER.get(c.grader, "normalised")
                                          for c in cases),
        prompts=tuple(c.prompt for c in cases),
        messages=tuple(c.messages for c in cases),
        answers=tuple(tuple(t) for t in texts),
        case_normalisers=tuple(GRADER_NORMALISER.get(c.grader, "normalised") for c in cases),
        labelled=None if all(c.labelled for c in cases) else np.array(
            [c.labelled for c in cases], dtype=bool),
    )


def load_outcome_table(paths: Iterable[str | os.PathLike[str]],
                       config: CascadeConfig | None = None) -> OutcomeTable:
    """Shared outcome files, or recorded suites replayed under ``config``."""
    ps = [Path(p) for p in paths]
    if not ps:
        raise ConfigError("give at least one suite")
    if all(is_shared_outcomes(p) for p in ps):
        return load_shared_outcomes(ps)
    if config is None:
        from cascade.defaults import resolve_config

        config = resolve_config()  # the ladder `cascade record` used when given no --config
    cases = unique_cases((c for p in ps for c in load_cases(p)),  # across the suites too
                         "; a suite given twice, or two cases with one id")
    recs = RecordingStore()
    for p in ps:
        for rec in RecordingStore.for_suite(p):
            recs.remember(rec)
    return table_from_recordings(cases, recs, config, source=", ".join(map(str, ps)))
