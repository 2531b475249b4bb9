"""How well the embedded local ladder knows when it does not know, on questions it was not tuned on.

    python bench/local_ladder.py [--cases fixtures/local_eval] [--config FILE] [--limit N]
    python bench/local_ladder.py --repetition [--cases fixtures/suite] [--tokens 128]

The first form climbs the ladder (default: the embedded one) for every case, with the cache
off, and prints precision (verified answers that are right), verified-right rate (questions
answered verified and right), the share verified wrong, and latency percentiles, overall and
per tag. Nothing is tuned here: the held-out cases in ``fixtures/local_eval`` were written
apart from ``fixtures/suite``, on which the thresholds were tuned.

The second form measures repetition loops of plain greedy decoding (no system prompt, up to
``--tokens`` tokens) with llama.cpp's repeat penalty off (1.0) and at each ``--penalty``: an
answer loops when some three-word sequence occurs three times or more. Needs the ``[local]``
extra; the model runs on this machine's CPU.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from cascade.defaults import resolve_config  # noqa: E402
from cascade.engine import Cascade  # noqa: E402
from cascade.suite import Case, grade, load_cases  # noqa: E402


def loops(text: str, n: int = 3, times: int = 3) -> bool:
    """Whether some ``n``-word sequence occurs ``times`` times or more in ``text``."""
    words = re.findall(r"\w+", text.casefold())
    grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return bool(grams) and max(grams.values()) >= times


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def held_out(cases: list[Case], config_path: str | None) -> None:
    cascade = Cascade(resolve_config(config_path))
    rows: list[tuple[Case, bool, bool, float, int]] = []
    try:
        for case in cases:
            start = time.perf_counter()
            ans = cascade.answer(messages=[m.to_dict() for m in case.messages], cache=False)
            ms = (time.perf_counter() - start) * 1000
            right = grade(case, ans.text)
            rows.append((case, ans.verified, right, ms, len(ans.attempts)))
            mark = ("verified " if ans.verified else "unverified") + (" right" if right
                                                                      else " WRONG")
            print(f"  {case.id:14s} {mark:17s} {ms:6.0f} ms  {ans.text[:70]!r}", flush=True)
    finally:
        cascade.close()

    def line(name: str, sub: list[tuple[Case, bool, bool, float, int]]) -> None:
        n = len(sub)
        verified = [r for r in sub if r[1]]
        vr = sum(1 for r in verified if r[2])
        right = sum(1 for r in sub if r[2])
        prec = f"{vr / len(verified):6.1%}" if verified else "   n/a"
        print(f"{name:12s} {n:4d} {prec} ({vr}/{len(verified)})  verified-right "
              f"{vr / n:6.1%}  verified-wrong {(len(verified) - vr) / n:6.1%}  "
              f"right {right / n:6.1%}")

    print(f"\n{'':12s} {'n':>4s} precision        ")
    line("all", rows)
    for tag in sorted({t for c, *_ in rows for t in c.tags}):
        line(tag, [r for r in rows if tag in r[0].tags])
    lat = [r[3] for r in rows]
    climbed = sum(1 for r in rows if r[4] > 1)
    print(f"latency: median {statistics.median(lat):.0f} ms, p90 {_pct(lat, 0.9):.0f} ms, "
          f"max {max(lat):.0f} ms; climbed to rung 2: {climbed}/{len(rows)}")


def repetition(cases: list[Case], tokens: int, penalties: list[float]) -> None:
    from cascade.providers.local import resolve_model
    from cascade.providers.local_server import LocalModel

    model = LocalModel(resolve_model("smollm2-135m"), n_ctx=2048)
    questions = [[m.to_dict() for m in c.messages if m.role != "system"] for c in cases]
    for penalty in [1.0, *penalties]:
        looped = capped = 0
        t = time.perf_counter()
        for msgs in questions:
            reply = model.chat({"messages": msgs, "temperature": 0.0, "max_tokens": tokens,
                                "repeat_penalty": penalty})
            choice: Any = reply["choices"][0]
            looped += loops(choice["message"]["content"])
            capped += choice["finish_reason"] == "length"
        s = (time.perf_counter() - t) / len(questions)
        print(f"repeat_penalty {penalty:.2f}: {looped}/{len(questions)} answers loop, "
              f"{capped}/{len(questions)} hit {tokens} tokens, {s:.2f} s/answer")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=None, help="a suite folder or JSONL file")
    p.add_argument("--config", default=None, help="a ladder (default: the embedded one)")
    p.add_argument("--limit", type=int, default=None, help="only the first N cases")
    p.add_argument("--repetition", action="store_true", help="measure repetition loops")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--penalty", type=float, action="append", default=None)
    args = p.parse_args()
    default = "fixtures/suite" if args.repetition else "fixtures/local_eval"
    cases = load_cases(REPO / (args.cases or default))[: args.limit]
    if args.repetition:
        repetition(cases, args.tokens, args.penalty or [1.1])
    else:
        held_out(cases, args.config)


if __name__ == "__main__":
    main()
