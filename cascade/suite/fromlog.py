"""Traffic back into the suite: a recorded suite built from audit logs (``cascade suite from-log``).

Each logged request becomes a case (its messages), each answer a rung gave it during the climb
becomes a recording of that rung's call, the top rung's shadow answer a recording of the top
rung, and feedback a label. The result is an ordinary recorded suite (``cases.jsonl`` +
``recordings.jsonl``): ``cascade label`` names the cases worth labelling, ``cascade record``
fills the rungs the climb never reached, ``cascade tune`` retunes.

Rules, in the order they apply:

- **What a line is.** ``answer``, ``shadow`` and ``feedback`` lines keyed by ``request_id``;
  other types and extra fields are ignored, a line that is not JSON (a write cut short) is
  counted and skipped, but a whole line written right after a cut one (another worker
  appended to the shared file after one was killed mid-write) is still read. The trace is
  read from ``answer`` (a dict) or ``trace``.
- **Redacted lines** (``messages_sha256``, no ``messages``) cannot become cases: counted, skipped.
- **--since** keeps requests whose answer line is at or after it; their shadow and feedback
  lines come along whenever they were written.
- **Duplicates merge**: a line read twice (overlapping copies of rotated logs; an answer line
  by its request id) counts once; requests with the same messages are one case. Per rung the
  answer kept is the freshest one seen in a climb, else the top rung's freshest shadow answer.
- **Cache hits** are traffic (they count for merging and sampling, and feedback on them labels
  the case) but not new observations: their trace is the original climb's, so its answers are
  used only for a prompt with no fresh climb in the logs (the original fell before --since or
  out of a rotated file), and never outweigh a fresh answer.
- **Labels**: feedback lines in time order; ``expected`` sets the label; ``correct: true`` without
  one labels the case with the answer that request got; ``correct: false`` without one records
  that answer under ``metadata.wrong_answers`` and removes a label equal to it. A case without
  a label has no ``expected`` (unlabelled: ``cascade label`` asks for it).
- **--sample N** keeps N distinct prompts, drawn with ``random.Random(seed)`` over the prompts
  in first-seen order: the same logs and seed give the same suite.
- **Secrets**: only messages, answer texts, tokens, costs, verdicts and labels are copied (never a
  client, a header or an unknown field), and the values of the key variables the config names
  and of any ``*KEY``/``*TOKEN``/``*SECRET``/``*PASSWORD`` environment variable are cut from each
  line, raw and JSON-escaped, before it is read.
- **Verdicts** are the climb's (thresholded, so ``passed`` reflects the live threshold; the
  tuner re-thresholds scores). Short-circuited (``skipped``) verdicts and the engine's own
  (``drift``, ``shadow``, ``schema``) are dropped; a shadow answer carries none, since the top
  rung's verifiers never judged it.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cascade.config import CascadeConfig, RungConfig
from cascade.errors import ConfigError
from cascade.messages import Message, normalise_messages
from cascade.providers.base import Completion, ModelCall
from cascade.suite import RECORDINGS_FILE, Recording, answer_call, messages_hash
from cascade.trace import Attempt, Verdict

__all__ = ["CASES_FILE", "FromLogStats", "LogSuite", "build_suite", "parse_since",
           "secret_values", "write_suite"]

CASES_FILE = "cases.jsonl"
_REDACTED = "[redacted]"
_SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD)$", re.IGNORECASE)
_ENGINE_VERDICTS = frozenset({"drift", "shadow", "schema", "schema:request"})
_IDS_KEPT = 50
"""Request ids kept per case (a popular prompt would otherwise carry thousands)."""

_FRESH, _SHADOW, _CACHED = 2, 1, 0
"""How much an observed answer is worth when several exist for one rung of one prompt."""


@dataclass
class FromLogStats:
    """What ``from-log`` read, kept and skipped (printed by the command, ``--json`` too)."""

    lines: int = 0
    bad_lines: int = 0
    requests: int = 0
    redacted: int = 0
    before_since: int = 0
    cache_hits: int = 0
    cache_hit_traces_used: int = 0
    shadows: int = 0
    feedback: int = 0
    feedback_unmatched: int = 0
    feedback_other_client: int = 0
    """Feedback a client gave on another client's request: not a label (a request id is all
    it takes to send one)."""
    duplicate_lines: int = 0
    """Lines read twice (overlapping copies of rotated logs), counted once."""
    unknown_rungs: int = 0
    prompts: int = 0
    cases: int = 0
    labelled: int = 0
    recordings: int = 0
    secrets_cut: int = 0

    def to_dict(self) -> dict[str, int]:
        return dict(vars(self))


@dataclass
class _Seen:
    """One observed answer of one rung to a prompt."""

    rank: int
    ts: float
    attempt: Attempt


@dataclass
class _Prompt:
    """Everything the logs say about one distinct prompt."""

    messages: tuple[Message, ...]
    first_ts: float
    last_ts: float
    request_ids: list[str] = field(default_factory=list)
    requests: int = 0
    rungs: dict[str, _Seen] = field(default_factory=dict)
    feedback: list[tuple[float, bool, Any, str | None, str]] = field(default_factory=list)
    """(timestamp, correct, expected, the text that request got, request id)."""

    def see(self, slot: str, seen: _Seen) -> None:
        old = self.rungs.get(slot)
        if old is None or (seen.rank, seen.ts) > (old.rank, old.ts):
            self.rungs[slot] = seen


@dataclass(frozen=True)
class LogSuite:
    """A suite built from logs: case objects as written to ``cases.jsonl``, and recordings."""

    cases: list[dict[str, Any]]
    recordings: list[Recording]
    stats: FromLogStats


# ---------------------------------------------------------------- reading


def parse_since(text: str) -> float:
    """``--since``: Unix seconds, or an ISO date or date-time (UTC when no zone is given)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigError(f"--since {text!r} is neither Unix seconds nor an ISO date/time "
                          "(e.g. 2026-11-30 or 2026-11-30T08:00:00Z)", key="since") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def _timestamp(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            return parse_since(value)
        except ConfigError:
            return None
    return None


def secret_values(config: CascadeConfig | None = None,
                  environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """Values that must never reach a suite file: the config's key variables and every
    environment variable named like a key, raw and JSON-escaped, longest first."""
    env = os.environ if environ is None else environ
    names = {n for n in env if _SECRET_NAME.search(n)}
    if config is not None:
        for r in config.rungs:
            names.update(e.api_key_env for e in (r, *r.fallbacks) if e.api_key_env)
        for v in config.verifiers:
            if isinstance(v.settings.get("api_key_env"), str):
                names.add(v.settings["api_key_env"])
        for c in config.server.get("clients", ()) or ():
            if isinstance(c, Mapping) and isinstance(c.get("key_env"), str):
                names.add(c["key_env"])
    forms: set[str] = set()
    for n in names:
        value = env.get(n, "")
        if len(value) >= 8:  # shorter "keys" (flags, ports) would shred every line
            forms.update({value, json.dumps(value)[1:-1],
                          json.dumps(value, ensure_ascii=False)[1:-1]})
    return tuple(sorted(forms, key=len, reverse=True))


def _read_lines(paths: Sequence[str | os.PathLike[str]], secrets: Sequence[str],
                stats: FromLogStats) -> Iterator[dict[str, Any]]:
    for path in paths:
        p = Path(path)
        try:
            f = p.open(encoding="utf-8", errors="replace")
        except OSError as e:
            raise ConfigError(f"cannot read the audit log: {e.strerror}", source=str(p)
                              ) from None
        with f:
            for raw in f:
                if not raw.strip():
                    continue
                stats.lines += 1
                for s in secrets:
                    if s in raw:
                        stats.secrets_cut += raw.count(s)
                        raw = raw.replace(s, _REDACTED)
                try:
                    obj = json.loads(raw)
                except ValueError:
                    stats.bad_lines += 1
                    obj = _after_cut(raw)
                    if obj is None:
                        continue
                if isinstance(obj, dict) and isinstance(obj.get("request_id"), str):
                    yield obj
                elif not isinstance(obj, dict) or obj.get("type") in ("answer", "shadow",
                                                                       "feedback"):
                    stats.bad_lines += 1


_LINE_START = '{"type":'
"""How every audit line begins (the writer's key order, no spaces)."""


def _after_cut(raw: str) -> Any:
    """The whole line that follows a line cut short: workers share one audit file, and after
    one is killed mid-write the next one's line starts right where the cut one stopped. The
    leftmost start of a line from which the rest parses is that line (None if there is none)."""
    i = raw.find(_LINE_START, 1)
    while i > 0:
        try:
            return json.loads(raw[i:])
        except ValueError:
            i = raw.find(_LINE_START, i + 1)
    return None


def _trace(line: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for k in ("answer", "trace"):
        v = line.get(k)
        if isinstance(v, Mapping) and isinstance(v.get("attempts"), list):
            return v
    return None


def _answered_text(line: Mapping[str, Any], trace: Mapping[str, Any] | None) -> str | None:
    if trace is not None and isinstance(trace.get("text"), str) and trace.get("model"):
        return str(trace["text"])
    return line["answer"] if isinstance(line.get("answer"), str) else None


def _attempt(obj: Any) -> Attempt | None:
    if not isinstance(obj, Mapping):
        return None
    try:
        return Attempt.from_dict(obj)
    except (TypeError, ValueError, KeyError):
        return None


# ---------------------------------------------------------------- building


class _Builder:
    def __init__(self, config: CascadeConfig | None, since: float | None) -> None:
        self.config = config
        self.since = since
        self.stats = FromLogStats()
        self.prompts: dict[str, _Prompt] = {}
        self.of_request: dict[str, tuple[str, str | None, Any]] = {}
        """request id -> (prompt key, the text that request got, the client it came from)."""
        self.answered: set[str] = set()
        """Request ids whose answer line was read (a second copy of one is skipped)."""

    def _slot(self, a: Attempt) -> tuple[str, RungConfig | None] | None:
        """Which rung an attempt belongs to: the config's rung of that label (else of that
        index and model), or, with no config, the label the trace carries."""
        cfg = self.config
        if cfg is None:
            return (a.name or a.model, None)
        for r in cfg.rungs:
            if r.label == a.name:
                return (r.label, r)
        if 0 <= a.rung < len(cfg.rungs) and cfg.rungs[a.rung].model == a.model:
            return (cfg.rungs[a.rung].label, cfg.rungs[a.rung])
        self.stats.unknown_rungs += 1
        return None

    def answer(self, line: Mapping[str, Any]) -> None:
        st = self.stats
        rid = str(line["request_id"])
        if rid in self.answered:  # the same request in two overlapping copies of a log
            st.duplicate_lines += 1
            return
        self.answered.add(rid)
        st.requests += 1
        ts = _timestamp(line.get("timestamp"))
        ts = 0.0 if ts is None else ts
        if self.since is not None and ts < self.since:
            st.before_since += 1
            return
        if "messages" not in line:
            st.redacted += 1
            return
        try:
            msgs = normalise_messages(messages=line["messages"])
        except ConfigError:
            st.bad_lines += 1
            return
        key = messages_hash(msgs)
        trace = _trace(line)
        p = self.prompts.get(key)
        if p is None:
            p = self.prompts[key] = _Prompt(messages=msgs, first_ts=ts, last_ts=ts)
        p.first_ts, p.last_ts = min(p.first_ts, ts), max(p.last_ts, ts)
        p.requests += 1
        if len(p.request_ids) < _IDS_KEPT:
            p.request_ids.append(rid)
        self.of_request[rid] = (key, _answered_text(line, trace), line.get("client"))
        hit = bool(trace is not None and trace.get("cache_hit"))
        st.cache_hits += hit
        for raw in trace.get("attempts", []) if trace is not None else []:
            a = _attempt(raw)
            if a is None or a.text is None or a.status not in ("accepted", "rejected"):
                continue
            slot = self._slot(a)
            if slot is not None:
                p.see(slot[0], _Seen(_CACHED if hit else _FRESH, ts, a))

    def shadow(self, line: Mapping[str, Any]) -> None:
        where = self.of_request.get(str(line["request_id"]))
        a = _attempt(line.get("shadow"))
        if where is None or a is None or a.text is None or a.error:
            return
        slot = self._slot(a)
        if slot is None:
            return
        self.stats.shadows += 1
        ts = _timestamp(line.get("timestamp")) or 0.0
        self.prompts[where[0]].see(slot[0], _Seen(_SHADOW, ts, a))

    def feedback(self, line: Mapping[str, Any]) -> None:
        self.stats.feedback += 1
        rid = str(line["request_id"])
        where = self.of_request.get(rid)
        correct = line.get("correct")
        if where is None or not isinstance(correct, bool):
            self.stats.feedback_unmatched += 1
            return
        # Another client's feedback is not a label; feedback naming no client (the
        # library's Cascade.feedback) is the application's own, as trusted as its requests.
        asker, giver = where[2], line.get("client")
        if asker is not None and giver is not None and giver != asker:
            self.stats.feedback_other_client += 1
            return
        ts = _timestamp(line.get("timestamp")) or 0.0
        self.prompts[where[0]].feedback.append((ts, correct, line.get("expected"), where[1],
                                                rid))


def _label(p: _Prompt) -> tuple[Any, list[str], dict[str, Any] | None]:
    """(expected or None, answers judged wrong, where the label came from)."""
    expected: Any = None
    wrong: list[str] = []
    source: dict[str, Any] | None = None
    for ts, correct, exp, got, rid in sorted(p.feedback, key=lambda f: f[0]):
        if exp is not None and exp != "":
            expected, source = exp, {"source": "feedback", "request_id": rid, "timestamp": ts}
        elif correct and got is not None:
            expected = got
            source = {"source": "feedback", "request_id": rid, "timestamp": ts,
                      "confirmed_answer": True}
        elif not correct and got is not None:
            if got not in wrong:
                wrong.append(got)
            if expected == got:
                expected, source = None, None
    return expected, wrong, source


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _recording(p: _Prompt, case_id: str, slot: str, seen: _Seen,
               config: CascadeConfig | None) -> Recording:
    a = seen.attempt
    rung = next((r for r in config.rungs if r.label == slot), None) if config else None
    call = (answer_call(rung, p.messages) if rung is not None
            else ModelCall(model=a.model, messages=p.messages))
    verdicts: list[Verdict] = [v for v in a.verdicts if not v.skipped
                               and v.verifier not in _ENGINE_VERDICTS]
    model_cost = max(0.0, a.cost_usd - sum(v.cost_usd for v in a.verdicts))
    completion = Completion(text=a.text or "", model=call.model, input_tokens=a.input_tokens,
                            output_tokens=a.output_tokens, finish_reason=a.finish_reason,
                            latency_ms=a.latency_ms)
    return Recording.of(call, completion, case_id=case_id, kind="answer", cost_usd=model_cost,
                        endpoint=rung.endpoint if rung is not None else a.endpoint,
                        verdicts=() if seen.rank == _SHADOW else verdicts)


def build_suite(paths: Sequence[str | os.PathLike[str]], *, since: float | None = None,
                sample: int | None = None, seed: int = 0, config: CascadeConfig | None = None,
                grader: str = "normalised",
                environ: Mapping[str, str] | None = None) -> LogSuite:
    """Read audit logs and build the suite (see the module docstring for the rules)."""
    if not paths:
        raise ConfigError("give at least one audit log", key="AUDIT")
    if sample is not None and sample < 1:
        raise ConfigError("--sample must be at least 1", key="sample")
    b = _Builder(config, since)
    lines = list(_read_lines(paths, secret_values(config, environ), b.stats))
    read: set[str] = set()
    for kind in ("answer", "shadow", "feedback"):  # shadows and feedback need their answer
        for line in lines:
            if line.get("type") != kind:
                continue
            if kind != "answer":  # an answer line is deduplicated by its request id
                text = json.dumps(line, sort_keys=True, default=str)
                if text in read:
                    b.stats.duplicate_lines += 1
                    continue
                read.add(text)
            getattr(b, kind)(line)
    st = b.stats
    st.prompts = len(b.prompts)
    keys = sorted(b.prompts, key=lambda k: (b.prompts[k].first_ts, k))
    if sample is not None and sample < len(keys):
        chosen = set(random.Random(seed).sample(keys, sample))
        keys = [k for k in keys if k in chosen]
    cases: list[dict[str, Any]] = []
    recordings: list[Recording] = []
    for k in keys:
        p = b.prompts[k]
        case_id = f"log-{k[:16]}"
        expected, wrong, source = _label(p)
        meta: dict[str, Any] = {
            "source": "audit-log", "requests": p.requests, "request_ids": p.request_ids,
            "first_seen": _iso(p.first_ts), "last_seen": _iso(p.last_ts)}
        if wrong:
            meta["wrong_answers"] = wrong
        if source is not None:
            meta["label"] = source
        case: dict[str, Any] = {"id": case_id, "messages": [m.to_dict() for m in p.messages]}
        if expected is not None:
            case["expected"] = expected
            st.labelled += 1
        case.update(grader=grader, tags=[], metadata=meta)
        cases.append(case)
        fresh = any(s.rank == _FRESH for s in p.rungs.values())
        st.cache_hit_traces_used += not fresh and any(s.rank == _CACHED
                                                      for s in p.rungs.values())
        for slot, seen in p.rungs.items():
            recordings.append(_recording(p, case_id, slot, seen, config))
    st.cases, st.recordings = len(cases), len(recordings)
    if not cases:
        raise ConfigError(f"no logged request could become a case ({st.requests} answer lines: "
                          f"{st.redacted} redacted, {st.before_since} before --since)",
                          source=", ".join(map(str, paths)))
    return LogSuite(cases=cases, recordings=recordings, stats=st)


def write_suite(out: str | os.PathLike[str], suite: LogSuite, *, force: bool = False) -> Path:
    """Write ``cases.jsonl`` and ``recordings.jsonl`` into ``out``; refuses to overwrite a suite
    (labels may have been added to it by hand) unless ``force``."""
    d = Path(out)
    targets = (d / CASES_FILE, d / RECORDINGS_FILE)
    if not force and any(t.exists() for t in targets):
        raise ConfigError("already holds a suite; give --force to replace it", source=str(d))
    if d.exists() and not d.is_dir():
        raise ConfigError("is not a folder", source=str(d))
    d.mkdir(parents=True, exist_ok=True)
    _write_jsonl(targets[0], suite.cases)
    _write_jsonl(targets[1], (r.to_dict() for r in suite.recordings))
    return d


def _write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
