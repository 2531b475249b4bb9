"""``cascade cache stats|clear``: inspect or empty the verified-answer cache."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cascade.cache import AnswerCache
    from cascade.config import CascadeConfig

__all__ = ["add_arguments", "answer_cache", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``cascade cache stats|clear [--config FILE] [--cache-dir DIR] [--json] [--force]``."""
    parser.add_argument("cache_command", choices=["stats", "clear"], metavar="stats|clear",
                        help="stats: entries and size; clear: remove every entry")
    parser.add_argument("--config", help="TOML config whose [cache] to use (default: "
                        "$CASCADE_CONFIG, ./cascade.toml, else the embedded local ladder)")
    parser.add_argument("--cache-dir", help="use this cache directory instead of the config's")
    parser.add_argument("--json", action="store_true",
                        help="print the stats (or, with clear, what was removed) as JSON")
    parser.add_argument("--force", action="store_true",
                        help="with clear: remove the directory even if the cache is damaged")


def answer_cache(cache_dir: str | None, config: CascadeConfig) -> AnswerCache:
    """The cache the config names, or the one ``--cache-dir`` points at instead."""
    from cascade.cache import AnswerCache

    c = config.cache
    return AnswerCache(cache_dir or c.directory, ttl_s=c.ttl_s, size_limit_mb=c.size_limit_mb)


def run(ns: argparse.Namespace) -> int:
    """Print the stats or clear the cache."""
    from cascade.defaults import resolve_config

    out = sys.stdout
    cache = answer_cache(ns.cache_dir, resolve_config(ns.config))
    try:
        if ns.cache_command == "stats":
            stats = cache.stats()
            if ns.json:
                out.write(json.dumps(stats) + "\n")
            else:
                for k, v in stats.items():
                    out.write(f"{k:18s} {v}\n")
        else:
            # The cache deletes only what it owns: with --force a damaged cache's own files
            # go, and a directory holding anything else is refused either way.
            n = cache.clear(force=ns.force)
            if ns.json:
                out.write(json.dumps({"cleared": n, "directory": str(cache.directory)}) + "\n")
            else:
                out.write(f"cleared {n} entries from {cache.directory}\n")
    finally:
        cache.close()
    return 0
