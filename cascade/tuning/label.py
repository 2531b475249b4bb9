"""Which unlabelled cases would change the tuning decision, and labelling them with a judge model.

The net accuracy change of a cascade against the top rung is decided only by the cases where its
answer differs from the top rung's (a few percent of traffic): an answer equal to the top rung's
under the suite's normaliser has its grade whatever the grade is. So recorded traffic needs
labels only where a cheaper setting's accepted answer disagrees with the answer of a rung that
could be the best, and only for settings that labels could make pass the guard (their bound,
with every such disagreement resolved as a tie, or as a gain where the setting's answer is
another plausible best rung's, clears the promise). :func:`needed_labels`
names those cases, the ones that buy the most saving per label first.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cascade.config import CascadeConfig, RungConfig
from cascade.errors import ConfigError, ProviderError
from cascade.messages import Message
from cascade.providers.base import Provider
from cascade.suite.outcomes import OutcomeTable
from cascade.tuning.choose import guarded_frontier, select
from cascade.tuning.guard import DELTA, MAX_DROP, paired_bound
from cascade.tuning.setting import IntArray
from cascade.tuning.simulate import outcome_of, simulate

__all__ = ["JudgeResult", "JudgingInterrupted", "Need", "judge_labels", "needed_labels",
           "read_labels"]

SEED_SAMPLE = 300
"""With no labelled case at all, ``cascade label`` asks for this many (spread over the suite):
the tuner needs some grades to tell the rungs apart before disagreements can be ranked."""


@dataclass(frozen=True)
class Need:
    """One case whose label would change (or could change) the tuning decision."""

    index: int
    case_id: str
    why: str
    rungs: tuple[str, ...] = ()
    """The rungs whose answers to this case disagree with the top rung's."""
    settings: int = 0
    """How many cheaper settings on the frontier need this label to pass the guard."""
    gain: float = 0.0
    """The mean cost per case the best of those settings would save over the current choice."""

    def to_dict(self, table: OutcomeTable) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.case_id, "why": self.why, "rungs": list(self.rungs),
                             "settings": self.settings, "saving_usd_per_case": self.gain}
        if table.prompts:
            d["prompt"] = table.prompts[self.index]
        if table.answers:
            d["answers"] = {r.label: table.answers[self.index][j]
                            for j, r in enumerate(table.rungs)}
        return d


def _seed_sample(table: OutcomeTable, n: int) -> list[Need]:
    idx = np.unique(np.linspace(0, table.n - 1, min(n, table.n)).round().astype(int))
    return [Need(int(i), table.case_ids[int(i)],
                 "no case is labelled yet: a spread sample tells the rungs apart first")
            for i in idx]


def needed_labels(table: OutcomeTable, *, max_drop: float = MAX_DROP, delta: float = DELTA,
                  agreement: str = "off", max_n: int | None = None) -> list[Need]:
    """The unlabelled cases whose labels could change what :func:`cascade.tuning.tune` would
    recommend, best first (an empty list: no label would change it)."""
    if max_n is not None and max_n < 0:
        raise ConfigError(f"--max must be 0 or more, got {max_n}")
    unl = ~table.is_labelled
    if not unl.any() or max_n == 0:
        return []
    if not table.is_labelled.any():
        return _seed_sample(table, SEED_SAMPLE if max_n is None else max_n)
    current, _ref = select(table, max_accuracy_drop=max_drop, delta=delta, agreement=agreement)
    now = float(simulate(table, current)[1].mean())
    f = guarded_frontier(table, delta=delta, agreement=agreement)
    rivals = f.rivals
    same = {c: m for c in rivals if (m := table.same_answer(c)) is not None}
    rows = np.arange(table.n)
    plans: list[tuple[float, float, int, list[int], IntArray]] = []
    for g, st in enumerate(f.settings):
        gain = now - float(f.cost[g])
        if gain <= 0:
            continue
        ex = simulate(table, st)[2]
        col = np.asarray(st.chain, dtype=np.int64)[ex]
        unknown = np.zeros(table.n, dtype=bool)
        reachable = True
        for c in rivals:
            b, w = outcome_of(table, st, c, ex)
            u = w & unl
            unknown |= u
            # The best labels can do: a disagreement turns out a tie, or a gain where the
            # setting's answer is another plausible best rung's (it ends at 405b while 70b
            # is the rival: 405b may well be the one that is right).
            backed = np.zeros(table.n, dtype=bool)
            for c2, m in same.items():
                if c2 != c:
                    backed |= m[rows, col]
            won = float((u & backed).sum())
            _, _, lo = paired_bound(np.array([float(b.sum()) + won]),
                                    np.array([float(w.sum() - u.sum())]), f.n,
                                    float(f.zs[g]), float(f.pseudo[g]))
            reachable &= bool(lo[0] >= -max_drop - 1e-12)
        if reachable and unknown.any():
            cases = np.nonzero(unknown)[0].tolist()
            plans.append((gain / len(cases), gain, g, cases, ex))
    plans.sort(key=lambda x: (-x[0], x[2]))
    count: dict[int, int] = {}
    for _v, _gain, _g, cases, _ex in plans:
        for i in cases:
            count[i] = count.get(i, 0) + 1
    out: list[Need] = []
    seen: set[int] = set()
    for _v, gain, g, cases, ex in plans:
        st = f.settings[g]
        for i in cases:
            if i in seen:
                continue
            seen.add(i)
            j = int(st.chain[ex[i]])
            off = tuple(table.rungs[c].label for c in rivals
                        if c not in same or not bool(same[c][i, j]))
            why = (f"{table.rungs[j].label}'s accepted answer disagrees with "
                   f"{', '.join(off) or 'the top rung'}'s; its label decides whether "
                   f"{st.describe(table)} passes the guard "
                   f"(saving ${gain:.3g} per case more than the current choice)")
            out.append(Need(i, table.case_ids[i], why, rungs=(table.rungs[j].label,),
                            settings=count[i], gain=gain))
            if max_n is not None and len(out) >= max_n:
                return out
    return out


# ---------------------------------------------------------------- the judge


_JUDGE_SYSTEM = ("You grade answers to questions. Reply with one word on the last line: yes if "
                 "the proposed answer is correct, no if it is not.")
_FENCE = "=" * 12


def _judge_prompt(question: str, answer: str) -> str:
    """The candidate is fenced and its own fence removed, so it cannot close its section."""
    clean = answer.replace(_FENCE, "")
    return (f"Question:\n{question}\n\nProposed answer (between the fences):\n{_FENCE}\n"
            f"{clean}\n{_FENCE}\n\nIs the proposed answer correct? Reply yes or no.")


def _verdict(text: str) -> bool | None:
    """The judge's final line only: yes / no (anything else: no verdict)."""
    lines = [ln.strip().strip(".!*\"' ").lower() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return None
    last = lines[-1].split()[-1] if lines[-1].split() else ""
    return True if last == "yes" else False if last == "no" else None


@dataclass
class JudgeResult:
    """Labels a judge model gave (case id -> rung label -> right), at what cost."""

    labels: dict[str, dict[str, bool]]
    cost_usd: float
    calls: int
    model: str
    unjudged: list[str]
    """Cases the judge gave no clear verdict on (left unlabelled)."""
    price_known: bool = True
    """False when the judge rung's price is unknown: ``cost_usd`` is then no cost (0), and
    must not be shown as one."""
    error: ProviderError | None = None
    """The call that failed, when the judge endpoint failed (refused, 401, ...): judging
    stopped there, and ``labels`` holds the verdicts obtained (and paid for) before it."""
    interrupted: int | None = None
    """When judging was interrupted (Ctrl-C): how many calls were then in flight, sent and cut
    off, so neither in ``cost_usd`` nor in ``calls``; ``labels`` holds the verdicts before it."""
    endpoint: str = ""
    """Where the judge was called (its ``base_url``, or the provider's default), for the
    error message."""


def judge_labels(table: OutcomeTable, needs: Sequence[Need], config: CascadeConfig, *,
                 provider_factory: Callable[[RungConfig], Provider] | None = None,
                 concurrency: int = 8) -> JudgeResult:
    """Grade every rung's answer to each needed case with the judge config's last rung (one
    call per distinct answer under the suite's normaliser: equal answers share a grade).

    Each call gets the config's retries. When the endpoint still fails, no new case is started
    (cases already started finish, so verdicts paid for are kept) and the result carries the
    first error: it never raises a provider error, which lost every verdict obtained so far.
    """
    import anyio

    from cascade.providers import make_provider
    from cascade.providers.base import rung_call
    from cascade.retry import call_with_retry
    from cascade.text import NORMALISERS

    if not config.rungs:
        raise ConfigError("the judge config has no rung", source=config.source)
    if not table.answers or not table.prompts or (needs and all(
            t is None for n in needs for t in table.answers[n.index])):
        raise ConfigError("the suite carries no answer texts to judge", source=table.source)
    rung = config.rungs[-1]
    names = table.case_normalisers or (table.agreement_normaliser or "normalised",) * table.n
    factory = provider_factory or make_provider
    retry = config.retry
    attempts = rung.max_retries + 1 if rung.max_retries is not None else retry.max_attempts
    labels: dict[str, dict[str, bool]] = {}
    unjudged: list[str] = []
    spent = [0.0, 0.0]
    failed: list[ProviderError] = []
    in_flight = [0]

    async def one(need: Need, provider: Provider, limit: anyio.CapacityLimiter) -> None:
        groups: dict[Any, list[int]] = {}
        texts = table.answers[need.index]
        norm = NORMALISERS.get(names[need.index], NORMALISERS["exact"])
        for j, t in enumerate(texts):
            key = None if t is None else norm(t)
            groups.setdefault(("none", j) if key is None else key, []).append(j)
        got: dict[str, bool] = {}
        started = False
        if all(t is None for t in texts):  # nothing recorded to judge: not "all wrong"
            unjudged.append(need.case_id)
            return
        for key, cols in groups.items():
            text = texts[cols[0]]
            if text is None or (isinstance(key, tuple) and key[0] == "none"):
                got.update({table.rungs[j].label: False for j in cols})  # no answer: wrong
                continue
            msgs = (Message("system", _JUDGE_SYSTEM),
                    Message("user", _judge_prompt(table.prompts[need.index], text)))
            async with limit:
                if failed and not started:  # the endpoint failed: start no new case
                    return
                started = True
                in_flight[0] += 1
                try:
                    reply, tries = await call_with_retry(
                        functools.partial(provider.complete, rung_call(rung, msgs)),
                        max_attempts=attempts, base_delay_s=retry.base_delay_s,
                        max_delay_s=retry.max_delay_s, jitter=retry.jitter)
                except ProviderError as e:
                    in_flight[0] -= 1
                    spent[0] += e.billed_usd + (rung.cost_usd(*e.billed_tokens)
                                                if e.billed_tokens is not None else 0.0)
                    spent[1] += e.tries
                    failed.append(e)
                    return
                in_flight[0] -= 1
            spent[0] += rung.cost_usd(reply.input_tokens, reply.output_tokens)
            spent[1] += tries
            v = _verdict(reply.text)
            if v is None:
                unjudged.append(need.case_id)
                return
            got.update({table.rungs[j].label: v for j in cols})
        labels[need.case_id] = got

    async def main() -> None:
        try:
            provider = factory(rung)  # an unset API key may fail here
        except ProviderError as e:
            failed.append(e)
            return
        limit = anyio.CapacityLimiter(concurrency)
        try:
            async with anyio.create_task_group() as tg:
                for need in needs:
                    tg.start_soon(one, need, provider, limit)
        finally:
            await provider.aclose()

    def result(interrupted: int | None = None) -> JudgeResult:
        return JudgeResult(
            labels=labels, cost_usd=spent[0], calls=int(spent[1]), model=rung.model,
            unjudged=sorted(set(unjudged)), price_known=rung.price != "unknown",
            error=failed[0] if failed else None, interrupted=interrupted,
            endpoint=rung.base_url or f"the {rung.provider} provider's default URL")

    try:
        anyio.run(main)
    except KeyboardInterrupt:  # still an interrupt, carrying the verdicts paid for so far
        raise JudgingInterrupted(result(in_flight[0])) from None
    return result()


class JudgingInterrupted(KeyboardInterrupt):
    """Ctrl-C while :func:`judge_labels` ran: ``result`` holds the verdicts obtained (and paid
    for) before it, ``result.interrupted`` the calls then in flight."""

    def __init__(self, result: JudgeResult) -> None:
        super().__init__()
        self.result = result


def read_labels(rows: Sequence[Mapping[str, Any]], source: str = ""
                ) -> dict[str, dict[str, bool]]:
    """Labels from NEEDS.jsonl-style rows that carry ``"correct": {rung label: bool}``.

    A row without ``correct`` (or null) is not labelled yet; any other ``correct`` (a rung left
    null, a string, one grade for the whole case) is a ConfigError: dropping it silently left
    a case the user believed labelled unlabelled."""
    out: dict[str, dict[str, bool]] = {}
    for row in rows:
        c = row.get("correct")
        if c is None and row.get("expected") is not None:  # a suite case's key, not a label's
            raise ConfigError(f"the line of case {row.get('id')!r} gives \"expected\"; a label "
                              "is \"correct\": {rung: true|false} for every rung (an expected "
                              "answer goes in the suite's case)", source=source)
        if c is None:
            continue
        if "id" not in row:
            raise ConfigError("a label line has no \"id\"", source=source)
        if not (isinstance(c, Mapping) and c and all(isinstance(v, bool) for v in c.values())):
            raise ConfigError(f"the label of case {row['id']!r} must be \"correct\": "
                              f"{{rung: true|false}} for every rung, got {c!r}", source=source)
        if str(row["id"]) in out:
            raise ConfigError(f"case {row['id']!r} is labelled twice", source=source)
        out[str(row["id"])] = {str(k): bool(v) for k, v in c.items()}
    return out


