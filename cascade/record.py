"""``cascade record``: run every case of a suite through EVERY rung and store what came back.

Each rung answers each case once; the rung's verifiers then judge that answer with no threshold
applied (raw scores and pass/fail), all of them (no short-circuit), and every model call they
make (a self-check, a judge) is recorded too, through the same providers. The tuner re-thresholds
the recorded scores offline; a replay serves the recorded calls, so verifiers see exactly what
they saw when recording. Re-recording fills only what is missing. Agreement-style verifiers that
compare with earlier rungs of a climb see no earlier rungs here (each rung is recorded alone).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio

from cascade.cli._args import int_in
from cascade.config import CascadeConfig, RungConfig
from cascade.defaults import resolve_config
from cascade.engine import Cascade
from cascade.errors import ProviderError
from cascade.messages import Request
from cascade.providers.base import Completion, ModelCall, Provider
from cascade.suite import Case, Recording, RecordingStore, answer_call, load_cases
from cascade.trace import Verdict
from cascade.verify import BoundVerifier, Candidate, VerifyContext, run_verifiers

__all__ = ["add_arguments", "record", "run"]

ProviderFactory = Callable[[RungConfig], Provider]


def missing_verdicts(rec: Recording, rung: RungConfig, config: CascadeConfig) -> set[str]:
    """The rung's verifiers with no verdict in an answer's recording that has others (added
    since). One recorded with none at all (a shadow answer ``suite from-log`` kept, without
    the log-probabilities to judge it by) is left unjudged, not judged blind."""
    if not rec.verdicts:
        return set()
    return {vc.key for vc in config.verifiers_for(rung)} - {v.verifier for v in rec.verdicts}


async def _record_one(case: Case, rung: RungConfig, config: CascadeConfig, engine: Cascade,
                      store: RecordingStore, bound: Sequence[BoundVerifier]) -> None:
    call = answer_call(rung, case.messages)
    # exact only: another rung of the same model has the same messages, and its answer is
    # not this rung's
    kept = store.get(call, exact=True)
    if kept is not None:  # answered already: only the verifiers added since are run
        completion, cost, endpoint = kept.completion(), kept.cost_usd, kept.endpoint
        have = {v.verifier for v in kept.verdicts}
        bound = [bv for bv in bound if bv.id not in have]
    else:
        t0 = time.perf_counter()
        result = await engine.call_model(call, rung)
        completion, endpoint = result.completion, result.endpoint.endpoint
        if not completion.latency_ms:
            completion = replace(completion, latency_ms=(time.perf_counter() - t0) * 1000)
        cost = result.cost_usd

    async def caller(vcall: ModelCall, target: RungConfig) -> tuple[Completion, float]:
        # exact only: a sampling verifier's call has the case's model and messages, and the
        # rung's answer must never be taken for one of its samples
        hit = store.get(vcall, exact=True)
        if hit is not None:
            return hit.completion(), hit.cost_usd
        r = await engine.call_model(vcall, target)
        c, cost = r.completion, r.cost_usd
        store.add(Recording.of(vcall, c, case_id=case.id, kind="verifier", cost_usd=cost,
                               endpoint=r.endpoint.endpoint))
        return c, cost

    request = Request(messages=case.messages)
    candidate = Candidate(text=completion.text, rung=rung, rung_index=config.rungs.index(rung),
                          completion=completion, parsed=completion.parsed)

    def make_ctx(bv: BoundVerifier) -> VerifyContext:
        return VerifyContext(request=request, candidate=candidate, attempts=[],
                             settings=bv.settings, threshold=None, _caller=caller)

    verdicts: list[Verdict] = (await run_verifiers(bound, make_ctx, short_circuit=False)
                               if bound else [])
    if kept is not None:
        verdicts = [*kept.verdicts, *verdicts]
    store.add(Recording.of(call, completion, case_id=case.id, kind="answer", cost_usd=cost,
                           endpoint=endpoint, verdicts=verdicts))


async def record(cases: Sequence[Case], config: CascadeConfig, store: RecordingStore, *,
                 concurrency: int = 4, factory: ProviderFactory | None = None,
                 progress: bool = True) -> dict[str, int]:
    """Record what is missing; returns counts of ``recorded``, ``skipped`` and ``failed``."""
    from cascade.plugins import load_verifier
    from cascade.secrets import Redactor, secret_envs_of

    if factory is None:
        from cascade.providers import make_provider

        factory = make_provider
    # Calls go through the engine: the ladder's retries, breakers and failover apply.
    engine = Cascade(config, provider_factory=factory)
    bound_by_rung: dict[str, list[BoundVerifier]] = {}
    for rung in config.rungs:
        bound_by_rung[rung.label] = [
            BoundVerifier(id=vc.key, verifier=load_verifier(vc, relative_to=config.source),
                          settings=dict(vc.settings),
                          threshold=None, timeout_s=vc.timeout_s)
            for vc in config.verifiers_for(rung)
        ]
    def needed(case: Case, rung: RungConfig) -> bool:
        """Never answered, or answered before some of the rung's verifiers were configured."""
        rec = store.get(answer_call(rung, case.messages))
        return rec is None or bool(missing_verdicts(rec, rung, config))

    todo = [(c, r) for c in cases for r in config.rungs if needed(c, r)]
    counts = {"recorded": 0, "skipped": len(cases) * len(config.rungs) - len(todo), "failed": 0}
    limiter = anyio.CapacityLimiter(max(1, concurrency))
    bar: Any = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), file=sys.stderr, unit="call", desc="recording")
    errors: list[str] = []
    cut = Redactor(secret_envs_of(config))  # a provider plugin's error may quote its key
    fatal: list[Exception] = []  # not one call's failure (a bad key setting, an unwritable file)
    scope = anyio.CancelScope()

    async def one(case: Case, rung: RungConfig) -> None:
        async with limiter:
            try:
                await _record_one(case, rung, config, engine, store,
                                  bound_by_rung[rung.label])
                counts["recorded"] += 1
            except ProviderError as e:
                counts["failed"] += 1
                errors.append(cut(f"case {case.id!r} × {rung.label}: {e}"))
            except Exception as e:  # every other call would fail alike: stop, say it once
                fatal.append(e)
                scope.cancel()
            if bar is not None:
                bar.update(1)

    try:
        with scope:
            async with anyio.create_task_group() as tg:
                for case, rung in todo:
                    tg.start_soon(one, case, rung)
    finally:
        if bar is not None:
            bar.close()
        await engine.aclose()
    for e in errors[:10]:
        print(f"cascade record: {e}", file=sys.stderr)
    if fatal:
        raise fatal[0]  # as itself, not inside an ExceptionGroup: the CLI words it (exit 2)
    return counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``cascade record SUITE --config FILE [--concurrency N]``."""
    parser.add_argument("suite", help="a suite folder (recordings go inside) or JSONL file")
    parser.add_argument("--config", help="the ladder to record (default: $CASCADE_CONFIG, "
                        "./cascade.toml, else the embedded local ladder)")
    parser.add_argument("--concurrency", type=int_in(1), default=4,
                        help="model calls in flight at once (default 4)")
    parser.add_argument("--out", help="recordings file (default: SUITE/recordings.jsonl)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar on standard error")


def run(ns: argparse.Namespace) -> int:
    """Record a suite; exit 1 when some calls failed (re-run to fill them in)."""
    config = resolve_config(ns.config)
    cases = load_cases(ns.suite)
    store = RecordingStore(ns.out) if ns.out else RecordingStore.for_suite(Path(ns.suite))
    store.check_writable()  # before any call is paid for, not at its first recording
    counts = anyio.run(lambda: record(cases, config, store, concurrency=ns.concurrency,
                                      progress=not ns.no_progress))
    print(f"recorded {counts['recorded']}, already there {counts['skipped']}, "
          f"failed {counts['failed']} → {store.path}")
    return 1 if counts["failed"] else 0
