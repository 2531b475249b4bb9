"""Fixture suites, graders, recorded responses and the outcome table the tuner works on.

A suite is a folder of JSONL files (or one JSONL file); one case a line::

    {"id": "q1", "messages": [{"role": "user", "content": "2+2?"}], "expected": "4",
     "grader": "numeric", "tags": ["arith"], "metadata": {}}

``grader`` is ``exact``, ``normalised``, ``contains`` (an expected answer appears, word for
word after normalising, inside a free-text answer: "The capital is Canberra."), ``numeric``,
``choice``, ``json_schema`` (``expected`` is the schema) or ``package.module:function`` (called
with ``(text, case)``, returns a bool).

Recordings (``recordings.jsonl`` beside the cases) hold every model call made while recording,
keyed by a hash of the call, with the verdicts of the rung's verifiers, so a replay is exact and
the tuner can re-threshold scores without calling anything.

The shared recorded-outcomes format (``<benchmark>_<chain>_train.jsonl`` with a
``ladder-<chain>.json`` beside it) loads straight into an :class:`OutcomeTable`.

Both carry the answer texts, so the table also holds which rungs agree with each other (under
each built-in normaliser of ``verifiers._text``): the signal the ``agreement`` verifier reads
in a live climb, replayable without calling anything.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cascade.config import CascadeConfig, RungConfig, VerifierConfig
from cascade.errors import ConfigError
from cascade.messages import Message, normalise_messages
from cascade.providers.base import Completion, ModelCall, TokenLogprob, rung_call
from cascade.trace import Verdict

__all__ = [
    "AGREEMENT_NORMALISERS",
    "GRADERS",
    "RECORDINGS_FILE",
    "Case",
    "OutcomeTable",
    "Recording",
    "RecordingStore",
    "agreement_arrays",
    "answer_call",
    "grade",
    "is_shared_outcomes",
    "load_cases",
    "load_outcome_table",
    "load_shared_outcomes",
    "messages_hash",
    "messages_text",
    "request_hash",
    "table_from_recordings",
]

RECORDINGS_FILE = "recordings.jsonl"
GRADERS: tuple[str, ...] = ("exact", "normalised", "contains", "numeric", "choice",
                             "json_schema")

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


# ---------------------------------------------------------------- cases


@dataclass(frozen=True, kw_only=True)
class Case:
    """One question of a suite, with what a right answer looks like."""

    id: str
    messages: tuple[Message, ...]
    expected: Any = None
    grader: str = "normalised"
    tags: tuple[str, ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""
    """File and line, for error messages."""

    @property
    def group(self) -> str:
        """The mix the case belongs to (first tag), for distribution-shift checks."""
        return self.tags[0] if self.tags else ""


def _suite_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.glob("*.jsonl") if p.name != RECORDINGS_FILE)
    raise ConfigError("suite not found (give a folder of JSONL files or one JSONL file)",
                      source=str(path))


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror}", source=str(path)) from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise ConfigError(f"line {i} is not valid JSON: {e}", source=str(path)) from None
        if not isinstance(obj, dict):
            raise ConfigError(f"line {i} must be a JSON object", source=str(path))
        yield i, obj


def _parse_case(obj: Mapping[str, Any], where: str) -> Case:
    for k in ("id", "messages"):
        if k not in obj:
            raise ConfigError(f"a case needs {k!r}", source=where)
    grader = obj.get("grader", "normalised")
    if not isinstance(grader, str) or (grader not in GRADERS and ":" not in grader):
        raise ConfigError(f"grader is {grader!r}; allowed: {', '.join(GRADERS)} or "
                          "'package.module:function'", source=where, key="grader")
    if grader == "json_schema" and not isinstance(obj.get("expected"), Mapping):
        raise ConfigError("grader 'json_schema' needs the schema as 'expected'", source=where,
                          key="expected")
    tags = obj.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise ConfigError("tags must be a list of strings", source=where, key="tags")
    try:
        messages = normalise_messages(messages=obj["messages"])
    except ConfigError as e:
        raise ConfigError(str(e), source=where, key="messages") from None
    return Case(id=str(obj["id"]), messages=messages, expected=obj.get("expected"),
                grader=grader, tags=tuple(tags), metadata=dict(obj.get("metadata") or {}),
                source=where)


def load_cases(path: str | os.PathLike[str]) -> list[Case]:
    """Read a suite: every ``*.jsonl`` of a folder (but the recordings) or one file."""
    p = Path(path)
    cases: list[Case] = []
    seen: dict[str, str] = {}
    for f in _suite_files(p):
        for i, obj in _read_jsonl(f):
            case = _parse_case(obj, f"{f}:{i}")
            if case.id in seen:
                raise ConfigError(f"case id {case.id!r} repeats (first at {seen[case.id]})",
                                  source=f"{f}:{i}")
            seen[case.id] = case.source
            cases.append(case)
    if not cases:
        raise ConfigError("the suite holds no cases", source=str(p))
    return cases


# ---------------------------------------------------------------- graders


def grade(case: Case, text: str) -> bool:
    """Whether ``text`` answers ``case`` rightly. Grades never reach verifiers."""
    from verifiers._text import NORMALISERS, import_object, normalise_text, same_answer

    g = case.grader
    if g == "json_schema":
        import jsonschema  # type: ignore[import-untyped,unused-ignore]

        from verifiers._text import JSONExtractError, extract_json

        try:
            value = extract_json(text)
        except JSONExtractError:
            return False
        return bool(jsonschema.Draft202012Validator(case.expected).is_valid(value))
    if ":" in g:
        try:
            fn = import_object(g)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"grader {g!r} cannot be imported: {e}", source=case.source,
                              key="grader") from None
        return bool(fn(text, case))
    if case.expected is None:
        raise ConfigError("has no 'expected' answer to grade against", source=case.source,
                          key="expected")
    expected = case.expected if isinstance(case.expected, list) else [case.expected]
    if g == "contains":
        padded = f" {normalise_text(text)} "
        return any(f" {normalise_text(str(exp))} " in padded for exp in expected)
    norm = NORMALISERS[g]
    got = norm(text)
    for exp in expected:
        want: Any = (float(exp) if g == "numeric" and isinstance(exp, (int, float))
                     else norm(str(exp)))
        if same_answer(got, want):
            return True
    return False


# ---------------------------------------------------------------- recordings


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def messages_text(messages: Sequence[Message]) -> str:
    """The canonical JSON of ``messages``: what ``OutcomeTable.prompts`` holds per case."""
    return _canonical([m.to_dict() for m in messages])


def messages_hash(messages: Sequence[Message]) -> str:
    """Identifies a question across models: the case a recording belongs to."""
    return hashlib.sha256(messages_text(messages).encode()).hexdigest()


def request_hash(call: ModelCall) -> str:
    """Identifies one model call exactly: model, messages and every sampling setting."""
    return hashlib.sha256(_canonical({
        "model": call.model,
        "messages": [m.to_dict() for m in call.messages],
        "max_tokens": call.max_tokens,
        "temperature": call.temperature,
        "logprobs": call.logprobs,
        "top_logprobs": call.top_logprobs,
        "json_schema": call.json_schema,
        "stop": list(call.stop),
        "extra": dict(call.extra),
    }).encode()).hexdigest()


def _loose_hash(model: str, messages: Sequence[Message]) -> str:
    return hashlib.sha256(f"{model}\n{messages_hash(messages)}".encode()).hexdigest()


def answer_call(rung: RungConfig, messages: Sequence[Message]) -> ModelCall:
    """The call a rung makes for a question: what record sends and replay looks up."""
    return rung_call(rung, messages)


@dataclass(frozen=True, kw_only=True)
class Recording:
    """One recorded model call: the reply, its usage and price, and (for answers) the verdicts."""

    key: str
    model: str
    case_id: str
    kind: str
    """``answer`` (the rung's reply to the case) or ``verifier`` (a call a verifier made)."""
    text: str
    input_tokens: int
    output_tokens: int
    cost_usd: float
    latency_ms: float = 0.0
    finish_reason: str | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None
    endpoint: str = ""
    loose_key: str = ""
    messages_key: str = ""
    verdicts: tuple[Verdict, ...] = ()
    """Raw verdicts (no threshold applied) of the rung's verifiers on this answer."""

    def completion(self) -> Completion:
        return Completion(text=self.text, model=self.model, input_tokens=self.input_tokens,
                          output_tokens=self.output_tokens, finish_reason=self.finish_reason,
                          logprobs=self.logprobs, latency_ms=self.latency_ms)

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key, "model": self.model, "case_id": self.case_id, "kind": self.kind,
            "text": self.text, "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens, "cost_usd": self.cost_usd,
            "latency_ms": self.latency_ms, "finish_reason": self.finish_reason,
            "logprobs": None if self.logprobs is None else [
                {"token": t.token, "logprob": t.logprob, "top": dict(t.top)}
                for t in self.logprobs],
            "endpoint": self.endpoint, "loose_key": self.loose_key,
            "messages_key": self.messages_key,
            "verdicts": [v.to_dict() for v in self.verdicts],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Recording:
        lps = d.get("logprobs")
        return cls(
            key=d["key"], model=d["model"], case_id=d.get("case_id", ""),
            kind=d.get("kind", "answer"), text=d["text"],
            input_tokens=int(d.get("input_tokens", 0)),
            output_tokens=int(d.get("output_tokens", 0)),
            cost_usd=float(d.get("cost_usd", 0.0)), latency_ms=float(d.get("latency_ms", 0.0)),
            finish_reason=d.get("finish_reason"),
            logprobs=None if lps is None else tuple(
                TokenLogprob(t["token"], float(t["logprob"]), dict(t.get("top") or {}))
                for t in lps),
            endpoint=d.get("endpoint", ""), loose_key=d.get("loose_key", ""),
            messages_key=d.get("messages_key", ""),
            verdicts=tuple(Verdict.from_dict(v) for v in d.get("verdicts", [])),
        )

    @classmethod
    def of(cls, call: ModelCall, completion: Completion, *, case_id: str, kind: str,
           cost_usd: float, endpoint: str = "",
           verdicts: Sequence[Verdict] = ()) -> Recording:
        return cls(key=request_hash(call), model=call.model, case_id=case_id, kind=kind,
                   text=completion.text, input_tokens=completion.input_tokens,
                   output_tokens=completion.output_tokens, cost_usd=cost_usd,
                   latency_ms=completion.latency_ms, finish_reason=completion.finish_reason,
                   logprobs=completion.logprobs, endpoint=endpoint,
                   loose_key=_loose_hash(call.model, call.messages),
                   messages_key=messages_hash(call.messages), verdicts=tuple(verdicts))


class RecordingStore:
    """Recorded calls of a suite, in memory, appended to a JSONL file as they come."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._by_key: dict[str, Recording] = {}
        self._by_loose: dict[str, Recording] = {}
        self._case_of: dict[str, str] = {}
        if self.path is not None and self.path.is_file():
            for _i, obj in _read_jsonl(self.path):
                self._index(Recording.from_dict(obj))

    @classmethod
    def for_suite(cls, suite: str | os.PathLike[str]) -> RecordingStore:
        """The store of a suite folder (``recordings.jsonl`` inside) or beside a suite file."""
        p = Path(suite)
        return cls(p / RECORDINGS_FILE if p.is_dir() else p.with_name(RECORDINGS_FILE))

    def _index(self, r: Recording) -> None:
        self._by_key[r.key] = r
        if r.loose_key:
            self._by_loose.setdefault(r.loose_key, r)
        if r.messages_key and r.case_id:
            self._case_of.setdefault(r.messages_key, r.case_id)

    def __len__(self) -> int:
        return len(self._by_key)

    def __iter__(self) -> Iterator[Recording]:
        return iter(self._by_key.values())

    def get(self, call: ModelCall) -> Recording | None:
        """The recording of ``call``: exact match first, else same model and messages."""
        r = self._by_key.get(request_hash(call))
        return r if r is not None else self._by_loose.get(_loose_hash(call.model, call.messages))

    def case_for(self, messages: Sequence[Message]) -> str | None:
        return self._case_of.get(messages_hash(messages))

    def add(self, r: Recording) -> None:
        self._index(r)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")


# ---------------------------------------------------------------- outcome table


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
    prompts: tuple[str, ...] = ()
    """Per case, its normalised messages as canonical JSON (``messages_hash``'s text): what a
    router learns from. Empty when the table was built without them."""

    def __post_init__(self) -> None:
        n, r = self.correct.shape
        if self.cost.shape != (n, r) or len(self.case_ids) != n or len(self.rungs) != r:
            raise ValueError("outcome table arrays disagree in shape")
        if any(a.shape != (n, r, r) for a in self.agreement.values()):
            raise ValueError("agreement arrays must be cases × rungs × rungs")

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
        )


AGREEMENT_NORMALISERS: tuple[str, ...] = ("exact", "normalised", "numeric", "choice")
"""The built-in normalisers whose agreement an outcome table precomputes."""
_GRADER_NORMALISER = {"exact": "exact", "normalised": "normalised", "contains": "normalised",
                      "numeric": "numeric",
                      "choice": "choice", "json_schema": "exact"}
"""Which normaliser compares two answers the way a grader compares one with the expected."""
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
    from verifiers._text import NORMALISERS

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


_SHARED = re.compile(r"^(?P<bench>[a-z0-9]+)_(?P<chain>.+)_(?:train|test|val)\.jsonl$")
_FIREWORKS = "https://api.fireworks.ai/inference/v1"


def is_shared_outcomes(path: str | os.PathLike[str]) -> bool:
    """A file in the shared recorded-outcomes format (``<bench>_<chain>_train.jsonl``)."""
    p = Path(path)
    if not p.is_file() or not _SHARED.match(p.name):
        return False
    with p.open(encoding="utf-8") as f:
        first = f.readline()
    try:
        return "outcomes" in json.loads(first)
    except ValueError:
        return False


def _ladder_rungs(ladder: Mapping[str, Any], logprobs: bool) -> dict[str, RungConfig]:
    out: dict[str, RungConfig] = {}
    for m in ladder["ladder"]:
        prov = m.get("provider", "openai")
        kw: dict[str, Any] = {}
        if prov in ("openai", "anthropic"):
            kw["provider"] = prov
        else:
            kw.update(provider="openai-compatible",
                      base_url=_FIREWORKS if prov == "fireworks" else m.get("base_url"),
                      api_key_env=f"{str(prov).upper()}_API_KEY")
        out[m["model"]] = RungConfig(
            model=m["model"], input_usd_per_mtok=float(m.get("input_usd_per_mtok", 0.0)),
            output_usd_per_mtok=float(m.get("output_usd_per_mtok", 0.0)), logprobs=logprobs,
            **kw)
    return out


def _group_of(bench: str, row: Mapping[str, Any]) -> str:
    ref = row.get("reference") or {}
    for k in ("subject", "subject_name", "category"):
        if isinstance(ref, Mapping) and ref.get(k):
            return f"{bench}/{ref[k]}"
    return bench


def load_shared_outcomes(paths: Sequence[str | os.PathLike[str]]) -> OutcomeTable:
    """Load files of the shared recorded-outcomes format; all must come from one ladder.

    The ladder is ordered by mean cost over the loaded cases; the score is the recorded
    confidence, exposed as verifier ``confidence``. Groups are ``benchmark/subject``.
    """
    rows: list[tuple[str, dict[str, Any]]] = []
    chains: set[str] = set()
    sources: set[str] = set()
    for path in paths:
        p = Path(path)
        m = _SHARED.match(p.name)
        if m is None:
            raise ConfigError("not a shared outcomes file (<bench>_<chain>_train.jsonl)",
                              source=str(p))
        chains.add(m["chain"])
        for _i, obj in _read_jsonl(p):
            rows.append((m["bench"], obj))
            for o in obj["outcomes"].values():
                sources.add(str(o.get("confidence_source", "")))
    if len(chains) != 1:
        raise ConfigError(f"files come from different ladders {sorted(chains)}; tune one "
                          "ladder at a time", source=", ".join(map(str, paths)))
    chain = chains.pop()
    ladder_file = Path(paths[0]).with_name(f"ladder-{chain}.json")
    try:
        ladder = json.loads(ladder_file.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read the ladder: {e.strerror}", source=str(ladder_file)
                          ) from None
    logprobs = sources == {"answer_logprob"}
    by_model = _ladder_rungs(ladder, logprobs)
    models = list(rows[0][1]["outcomes"])
    n, r = len(rows), len(models)
    correct = np.zeros((n, r), dtype=bool)
    cost = np.zeros((n, r))
    score = np.full((n, r), np.nan)
    texts: list[list[str | None]] = []
    for i, (_b, row) in enumerate(rows):
        texts.append([])
        for j, model in enumerate(models):
            o = row["outcomes"].get(model)
            if o is None:
                raise ConfigError(f"case {row.get('id')!r} has no outcome for {model!r}",
                                  source=str(paths[0]))
            t = o.get("text")
            texts[i].append(t if isinstance(t, str) else None)
            correct[i, j] = bool(o["correct"])
            cost[i, j] = float(o["cost_usd"])
            c = o.get("confidence")
            score[i, j] = float(c) if c is not None else math.nan
    order = np.argsort(cost.mean(axis=0), kind="stable")
    source = "logprobs" if logprobs else "self_check" if sources == {"self_check"} else "auto"
    verifier = VerifierConfig(name="confidence", id="confidence", settings={"source": source})
    agree = agreement_arrays(texts)
    return OutcomeTable(
        case_ids=tuple(str(row["id"]) for _b, row in rows),
        rungs=tuple(by_model[models[j]] for j in order),
        correct=correct[:, order], cost=cost[:, order],
        scores={"confidence": score[:, order]}, passed={},
        groups=tuple(_group_of(b, row) for b, row in rows),
        verifiers=(verifier,), source=", ".join(str(p) for p in paths),
        agreement={k: v[:, order][:, :, order] for k, v in agree.items()},
        agreement_normaliser=_most_common(_BENCH_NORMALISER.get(b, "normalised")
                                          for b, _row in rows),
        prompts=tuple(messages_text(normalise_messages(messages=row["messages"]))
                      for _b, row in rows),
    )


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
    for i, case in enumerate(cases):
        for j, rung in enumerate(rungs):
            rec = store.get(answer_call(rung, case.messages))
            if rec is None:
                missing.append(f"case {case.id!r} × model {rung.model!r}")
                continue
            texts[i][j] = rec.text
            correct[i, j] = grade(case, rec.text)
            verdicts = {v.verifier: v for v in rec.verdicts}
            cost[i, j] = rec.cost_usd + sum(v.cost_usd for v in rec.verdicts)
            for vc in config.verifiers_for(rung):
                v = verdicts.get(vc.key)
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
    for k in list(flags):
        if k in scoring:  # a verifier that scored some rungs is a scoring verifier throughout
            del flags[k]
    return OutcomeTable(
        case_ids=tuple(c.id for c in cases), rungs=tuple(rungs),
        correct=correct, cost=cost, scores=scoring, passed=flags,
        groups=tuple(c.group for c in cases), verifiers=config.verifiers,
        own_passed={k: v for k, v in own.items() if k in scoring},
        source=source, base=config,
        agreement=agreement_arrays(texts) if n and r else {},
        agreement_normaliser=_most_common(_GRADER_NORMALISER.get(c.grader, "normalised")
                                          for c in cases),
        prompts=tuple(messages_text(c.messages) for c in cases),
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
    cases: list[Case] = []
    recs = RecordingStore()
    for p in ps:
        cases.extend(load_cases(p))
        for rec in RecordingStore.for_suite(p):
            recs._index(rec)
    return table_from_recordings(cases, recs, config, source=", ".join(map(str, ps)))
