"""``cascade answer PROMPT``: answer one prompt, the answer on stdout and the climb on stderr."""

from __future__ import annotations

import argparse
import json
import sys

from cascade.cli import EXIT_BUDGET, EXIT_NO_ANSWER, EXIT_OK, EXIT_UNVERIFIED
from cascade.cli._args import finite
from cascade.cli._format import format_climb
from cascade.engine import CacheMode
from cascade.errors import BudgetExceeded, DeadlineExceeded, NoAnswerError, UnverifiedAnswerError

__all__ = ["add_arguments", "prompt_text", "run"]


def prompt_text(arg: str) -> str:
    """The prompt argument as text (``-`` reads standard input), refused with a usage error
    when it is not UTF-8: such bytes cannot be sent to any model faithfully."""
    if arg != "-":
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError as e:  # argv bytes that did not decode arrive as surrogates
            byte = ord(arg[e.start]) - 0xDC00 if 0xDC80 <= ord(arg[e.start]) <= 0xDCFF else None
            what = f"byte 0x{byte:02x}" if byte is not None else f"character {arg[e.start]!r}"
            raise argparse.ArgumentTypeError(
                f"the prompt is not valid UTF-8 ({what} at character {e.start}); pass UTF-8 "
                "text (check the terminal's encoding) or use '-' with a UTF-8 file on "
                "standard input") from None
        return arg
    stream = getattr(sys.stdin, "buffer", None)
    data = stream.read() if stream is not None else sys.stdin.read().encode("utf-8",
                                                                             "surrogateescape")
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError as e:
        raise argparse.ArgumentTypeError(
            f"the prompt on standard input is not valid UTF-8 (byte 0x{data[e.start]:02x} at "
            f"offset {e.start}); convert it first, e.g. iconv -f LATIN1 -t UTF-8") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``cascade answer PROMPT [--config FILE] [--json] [--no-cache] [--refresh] ...``."""
    parser.add_argument("prompt", type=prompt_text,
                        help="the question ('-' reads it from standard input)")
    parser.add_argument("--config", help="TOML config (default: $CASCADE_CONFIG, ./cascade.toml, "
                        "else the embedded local ladder)")
    parser.add_argument("--json", action="store_true", help="print the Answer and trace as JSON")
    parser.add_argument("--no-cache", action="store_true",
                        help="neither read nor write the cache")
    parser.add_argument("--refresh", action="store_true",
                        help="skip the cache lookup, store anew")
    parser.add_argument("--cache-dir", help="override the cache directory")
    parser.add_argument("--max-cost-usd", type=finite("dollars", zero=True), default=None,
                        help="per-request spending cap")
    parser.add_argument("--timeout", type=finite("seconds"), default=None,
                        help="overall deadline in seconds")


def run(ns: argparse.Namespace) -> int:
    """Answer and print; exit 0 verified, 1 unverified, 3 no answer."""
    from cascade.cli.cache import answer_cache
    from cascade.defaults import resolve_config
    from cascade.engine import Cascade

    out, err = sys.stdout, sys.stderr
    config = resolve_config(ns.config)
    c = Cascade(config, cache=answer_cache(ns.cache_dir, config))
    cache: CacheMode = False if ns.no_cache else ("refresh" if ns.refresh else True)
    code = EXIT_OK
    try:
        try:
            ans = c.answer(ns.prompt, cache=cache, max_cost_usd=ns.max_cost_usd,
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
    except (NoAnswerError, BudgetExceeded, DeadlineExceeded) as e:
        # One shape for every request that got no answer: --json readers get the error and,
        # when a climb had begun, its trace (what it paid) on stdout.
        traced = e.answer
        if ns.json:
            out.write(json.dumps({"error": str(e), "error_type": type(e).__name__,
                                  **(traced.to_dict() if traced is not None else {})},
                                 ensure_ascii=False) + "\n")
        err.write(f"cascade: {e}\n")
        if not ns.json and traced is not None:
            err.write(format_climb(traced) + "\n")
        code = EXIT_NO_ANSWER if isinstance(e, NoAnswerError) else EXIT_BUDGET
    finally:
        c.close()
    return code
