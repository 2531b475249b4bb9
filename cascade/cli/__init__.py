"""The ``cascade`` command line: answer, cache, record, tune, eval, health.

Exit codes: 0 verified answer (or command succeeded); 1 an answer was returned but not verified;
2 bad usage or configuration; 3 no answer (every rung failed); 4 budget or deadline exceeded;
5 the cache cannot be used.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import shutil
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, TextIO

from cascade.errors import (
    BudgetExceeded,
    CacheError,
    CascadeError,
    ConfigError,
    DeadlineExceeded,
    NoAnswerError,
    UnverifiedAnswerError,
)
from cascade.trace import Answer

if TYPE_CHECKING:
    from cascade.cache import AnswerCache
    from cascade.config import CascadeConfig

__all__ = ["format_climb", "main"]

COMMANDS: dict[str, tuple[str, str]] = {
    "record": ("cascade.record", "run a suite through every rung and store the responses"),
    "tune": ("cascade.tune", "tune rungs and thresholds on recorded suites"),
    "eval": ("cascade.evaluate", "replay suites through a config and report quality/cost"),
    "serve": ("cascade.serve.cli", "serve the ladder as an OpenAI-compatible HTTP service"),
}
"""Commands in modules of their own: name -> (module with add_arguments(parser) and run(ns),
help). Only the chosen command's module is imported."""

EXIT_OK, EXIT_UNVERIFIED, EXIT_USAGE, EXIT_NO_ANSWER, EXIT_BUDGET, EXIT_CACHE = 0, 1, 2, 3, 4, 5


def format_climb(answer: Answer) -> str:
    """A compact, human view of the climb: rungs, verdicts, tokens, cost, latency."""
    lines = []
    for a in answer.attempts:
        cost = f"${a.cost_usd:.6f}" if a.cost_usd else "$0"
        label = a.model if a.name in ("", a.model) else f"{a.name} [{a.model}]"
        head = (f"  {a.rung + 1}. {label} ({a.provider})  {a.status.upper():8s} "
                f"tokens {a.input_tokens}→{a.output_tokens}  {cost}  {a.latency_ms:.0f} ms")
        if a.tries > 1:
            head += f"  ({a.tries} tries)"
        lines.append(head)
        if a.error:
            lines.append(f"       ! {a.error}")
        for v in a.verdicts:
            mark = "-" if v.skipped else ("✓" if v.passed else "✗")
            score = f" {v.score:.3f}" if v.score is not None else ""
            lines.append(f"       {mark} {v.verifier}{score}: {v.reason}")
    state = "verified" if answer.verified else "NOT verified"
    source = "cache hit (no model called)" if answer.cache_hit else "cache miss"
    lines.append(f"  → {state} by {answer.model or '-'} · ${answer.cost_usd:.6f} · "
                 f"{answer.latency_ms:.0f} ms · {source}")
    return "\n".join(lines)


def _answer_cache(ns: argparse.Namespace, config: CascadeConfig) -> AnswerCache:
    """The cache the config names, or the one ``--cache-dir`` points at instead."""
    from cascade.cache import AnswerCache

    c = config.cache
    return AnswerCache(ns.cache_dir or c.directory, ttl_s=c.ttl_s, size_limit_mb=c.size_limit_mb)


def _cmd_answer(ns: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from cascade.defaults import resolve_config
    from cascade.engine import Cascade

    config = resolve_config(ns.config)
    c = Cascade(config, cache=_answer_cache(ns, config))
    prompt = ns.prompt if ns.prompt != "-" else sys.stdin.read()
    cache: bool | str = False if ns.no_cache else ("refresh" if ns.refresh else True)
    code = EXIT_OK
    try:
        try:
            ans = c.answer(prompt, cache=cache, max_cost_usd=ns.max_cost_usd,
                           timeout_s=ns.timeout)
        except UnverifiedAnswerError as e:
            ans = e.answer
        if not ans.verified:
            code = EXIT_UNVERIFIED
        if ns.json:
            out.write(json.dumps(ans.to_dict(), ensure_ascii=False) + "\n")
        else:
            out.write(ans.text + "\n")
            err.write(format_climb(ans) + "\n")
    except NoAnswerError as e:
        if ns.json:
            out.write(json.dumps({"error": str(e), "error_type": type(e).__name__,
                                  **e.answer.to_dict()}) + "\n")
        err.write(f"cascade: {e}\n")
        if not ns.json:
            err.write(format_climb(e.answer) + "\n")
        code = EXIT_NO_ANSWER
    finally:
        c.close()
    return code


def _cmd_cache(ns: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from cascade.defaults import resolve_config

    cache = _answer_cache(ns, resolve_config(ns.config))
    try:
        if ns.cache_command == "stats":
            stats = cache.stats()
            if ns.json:
                out.write(json.dumps(stats) + "\n")
            else:
                for k, v in stats.items():
                    out.write(f"{k:18s} {v}\n")
        else:
            try:
                n = cache.clear()
                out.write(f"cleared {n} entries from {cache.directory}\n")
            except CacheError:
                if not ns.force:
                    raise
                cache.close()
                shutil.rmtree(cache.directory, ignore_errors=True)
                out.write(f"removed the damaged cache directory {cache.directory}\n")
    finally:
        cache.close()
    return EXIT_OK


def _cmd_health(ns: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from cascade.engine import health

    out.write(json.dumps(health(), indent=2) + "\n")
    return EXIT_OK


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cascade",
        description="Answer through a ladder of LLMs, climbing only as far as verifiers require.",
        epilog="Exit codes: 0 ok/verified, 1 unverified answer, 2 usage or config error, "
               "3 no answer, 4 budget or deadline exceeded, 5 cache unusable.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log to stderr")
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("answer", help="answer one prompt and show the climb")
    a.add_argument("prompt", help="the question ('-' reads it from standard input)")
    a.add_argument("--config", help="TOML config (default: $CASCADE_CONFIG, ./cascade.toml, "
                   "else the embedded local ladder)")
    a.add_argument("--json", action="store_true", help="print the Answer and trace as JSON")
    a.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    a.add_argument("--refresh", action="store_true", help="skip the cache lookup, store anew")
    a.add_argument("--cache-dir", help="override the cache directory")
    a.add_argument("--max-cost-usd", type=float, default=None, help="per-request spending cap")
    a.add_argument("--timeout", type=float, default=None, help="overall deadline in seconds")
    a.set_defaults(func=_cmd_answer)

    c = sub.add_parser("cache", help="inspect or clear the verified-answer cache")
    c.add_argument("cache_command", choices=["stats", "clear"])
    c.add_argument("--config")
    c.add_argument("--cache-dir")
    c.add_argument("--json", action="store_true")
    c.add_argument("--force", action="store_true",
                   help="with clear: remove the directory even if the cache is damaged")
    c.set_defaults(func=_cmd_cache)

    h = sub.add_parser("health", help="circuit breaker and latency snapshot of this process")
    h.set_defaults(func=_cmd_health)

    # Only the chosen suite command's module is imported: the tuner's numpy stack need not
    # load for `cascade answer`.
    wanted = next((a for a in argv if not a.startswith("-")), None) if argv is not None else None
    for name, (module, helptext) in COMMANDS.items():
        sp = sub.add_parser(name, help=helptext)
        if name == wanted:
            mod = importlib.import_module(module)
            mod.add_arguments(sp)
            sp.set_defaults(func=lambda ns, out, err, m=mod: m.run(ns))
    return p


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None,
         err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    args = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(args)
    ns = parser.parse_args(args)
    logging.basicConfig(level=logging.INFO if ns.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=err)
    if not ns.verbose:
        # instructor logs each failed validation at ERROR; here that is a routine rejection,
        # already in the trace with its reason.
        logging.getLogger("instructor").setLevel(logging.CRITICAL)
    try:
        return int(ns.func(ns, out, err))
    except ConfigError as e:
        err.write(f"cascade: configuration error: {e}\n")
        return EXIT_USAGE
    except (BudgetExceeded, DeadlineExceeded) as e:
        err.write(f"cascade: {e}\n")
        return EXIT_BUDGET
    except CacheError as e:
        err.write(f"cascade: cache error: {e}\n")
        return EXIT_CACHE
    except CascadeError as e:
        err.write(f"cascade: {type(e).__name__}: {e}\n")
        return EXIT_NO_ANSWER
    except KeyboardInterrupt:
        err.write("cascade: interrupted\n")
        return 130
