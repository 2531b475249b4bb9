"""The ``cascade`` command line: a parser, a table of commands and one exit-code mapping.

Each command lives in a module of its own with ``add_arguments(parser)`` and ``run(ns) -> int``;
adding a command is one entry in :data:`COMMANDS`. Only the chosen command's module is imported,
so ``cascade answer`` never loads the tuner's numpy stack. Commands write to ``sys.stdout`` and
``sys.stderr``; :func:`main` points those at the streams it is given.

Exit codes: 0 verified answer (or command succeeded); 1 an answer was returned but not verified
(``cascade record``: some calls failed, re-run to fill them in); 2 bad usage or configuration
(also a file given on the command line that cannot be read or written, an address ``cascade
serve`` cannot listen on); 3 no answer (every
rung failed, or a probed endpoint failed); 4 budget or deadline exceeded; 5 the cache cannot be
used; 130 interrupted; 141 standard output was closed early (``cascade cache stats | head``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from importlib import metadata
from typing import TextIO

from cascade.errors import (
    BudgetExceeded,
    CacheError,
    CascadeError,
    ConfigError,
    DeadlineExceeded,
)
from cascade.secrets import CredentialFilter

__all__ = [
    "COMMANDS",
    "EXIT_BUDGET",
    "EXIT_CACHE",
    "EXIT_INTERRUPTED",
    "EXIT_NO_ANSWER",
    "EXIT_OK",
    "EXIT_PIPE_CLOSED",
    "EXIT_UNVERIFIED",
    "EXIT_USAGE",
    "build_parser",
    "main",
]

COMMANDS: dict[str, tuple[str, str]] = {
    "answer": ("cascade.cli.answer", "answer one prompt and show the climb"),
    "cache": ("cascade.cli.cache", "inspect or clear the verified-answer cache"),
    "health": ("cascade.cli.health", "the configured endpoints and their circuits; --probe "
                                     "calls each once"),
    "record": ("cascade.record", "run a suite through every rung and store the responses"),
    "tune": ("cascade.cli.tune", "tune rungs and thresholds on recorded suites"),
    "eval": ("cascade.cli.eval", "replay suites through a config and report quality/cost"),
    "label": ("cascade.cli.label", "name the unlabelled cases whose labels would change tuning"),
    "suite": ("cascade.cli.suite", "build suites from served traffic (from-log: audit logs -> "
                                   "a recorded suite)"),
    "serve": ("cascade.serve.cli", "serve the ladder as an OpenAI-compatible HTTP service"),
}
"""name -> (module with ``add_arguments(parser)`` and ``run(ns) -> int``, one-line help)."""

EXIT_OK, EXIT_UNVERIFIED, EXIT_USAGE, EXIT_NO_ANSWER, EXIT_BUDGET, EXIT_CACHE = 0, 1, 2, 3, 4, 5
EXIT_INTERRUPTED = 130
EXIT_PIPE_CLOSED = 141
"""128 + SIGPIPE, what a shell reports for a tool whose reader went away."""


def _version() -> str:
    try:
        return metadata.version("verified-cascade")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; ``argv`` says which command's module to import for its options (all
    commands are listed either way)."""
    # -v is accepted before and after the command; SUPPRESS keeps a subcommand's absent flag
    # from overwriting one given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log progress (INFO) to standard error")
    p = argparse.ArgumentParser(
        prog="cascade", parents=[common],
        description="Answer through a ladder of LLMs, climbing only as far as verifiers require.",
        epilog="Exit codes: 0 ok/verified, 1 unverified answer (record: some calls failed), "
               "2 usage, config or file error, "
               "3 no answer, 4 budget or deadline exceeded, 5 cache unusable, 130 interrupted, "
               "141 output closed early.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}",
                   help="print the installed version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = next((a for a in argv if not a.startswith("-")), None) if argv is not None else None
    for name, (module, helptext) in COMMANDS.items():
        sp = sub.add_parser(name, help=helptext, description=helptext, parents=[common])
        if name == wanted:
            mod = importlib.import_module(module)
            mod.add_arguments(sp)
            sp.set_defaults(run=mod.run)
    return p


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None,
         err: TextIO | None = None) -> int:
    """Run one command and return its exit code; ``out``/``err`` replace standard output and
    error for the duration (tests pass ``io.StringIO``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    with contextlib.ExitStack() as redirected:
        if out is not None:
            redirected.enter_context(contextlib.redirect_stdout(out))
        if err is not None:
            redirected.enter_context(contextlib.redirect_stderr(err))
        try:
            code = _run(args)
            sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        except KeyboardInterrupt:  # also while parsing: `answer -` reads standard input there
            sys.stderr.write("cascade: interrupted\n")
            return EXIT_INTERRUPTED
        except BrokenPipeError:
            _silence_stdout()
            return EXIT_PIPE_CLOSED
        return code


def _run(args: list[str]) -> int:
    parser = build_parser(args)
    try:
        ns = parser.parse_args(args)
    except SystemExit as e:  # --help, --version and usage errors (already printed)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    verbose = bool(getattr(ns, "verbose", False))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for handler in logging.getLogger().handlers:  # -v: no URL's credentials on stderr
        if not any(isinstance(f, CredentialFilter) for f in handler.filters):
            handler.addFilter(CredentialFilter())
    if not verbose:
        # instructor logs each failed validation at ERROR; here that is a routine rejection,
        # already in the trace with its reason.
        logging.getLogger("instructor").setLevel(logging.CRITICAL)
    err = sys.stderr
    try:
        return int(ns.run(ns))
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
    except BrokenPipeError:  # main() turns it into 141
        raise
    except OSError as e:  # a path given on the command line that cannot be read or written
        err.write(f"cascade: {_os_error(e)}\n")
        return EXIT_USAGE


def _os_error(e: OSError) -> str:
    """One line for an OS-level failure: the path (when the error names one) and the reason."""
    reason = e.strerror or str(e) or type(e).__name__
    if e.filename is None:
        return f"{type(e).__name__}: {reason}"
    where = os.fsdecode(e.filename)
    if e.filename2 is not None:
        where += f" -> {os.fsdecode(e.filename2)}"
    return f"{where}: {reason}"


def _silence_stdout() -> None:
    """After the reader of standard output went away, point it at /dev/null so the flush at
    interpreter exit does not raise a second BrokenPipeError (the recipe in Python's signal
    docs)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (a StringIO in tests)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)
