"""What ``tune``, ``label`` and ``eval`` share: reading a ladder given as ``--config`` (a TOML
config, or the shared ``ladder-<chain>.json`` format), the suites under it, and ``--out``.

The README points users of the shared outcome files at ``ladder-<chain>.json``; passing that
file as ``--config`` failed with "not valid TOML", and a TOML ``--config`` was silently ignored
for shared files (all the file's rungs were tuned). Here a ``.json`` ladder replaces the one
beside the files, and a TOML ladder chooses the rungs (matched by model name).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cascade.config import CascadeConfig, load_config
from cascade.errors import ConfigError

if TYPE_CHECKING:
    from cascade.suite import OutcomeTable

__all__ = ["STDOUT", "is_ladder_json", "load_ladder", "load_table", "refuse_stdout"]

STDOUT = "-"
"""``--out -``: standard output, where a command supports it."""


def is_ladder_json(path: str) -> bool:
    """A ``.json`` ``--config``: the shared ladder format, not TOML."""
    return Path(path).suffix.lower() == ".json"


def load_ladder(path: str) -> CascadeConfig:
    """``--config``/``--recorded-with``/``--judge``: a TOML config or a shared ladder JSON."""
    if is_ladder_json(path):
        from cascade.suite.ladder_file import ladder_config

        return ladder_config(path)
    return load_config(path)


def load_table(suites: Sequence[str], ladder: str | None) -> OutcomeTable:
    """The suites as one table under the ladder ``--config`` names (None: recorded suites
    under the default config, shared files under the ladder beside them)."""
    from cascade.suite.ladder_file import ladder_config
    from cascade.suite.outcomes import is_shared_outcomes, load_outcome_table, load_shared_outcomes

    if ladder is None:
        return load_outcome_table(suites)
    shared = bool(suites) and all(is_shared_outcomes(p) for p in suites)
    if is_ladder_json(ladder):
        if shared:  # its prices and providers, the rungs still ordered by recorded cost
            return load_shared_outcomes(suites, ladder_file=ladder)
        return load_outcome_table(suites, ladder_config(ladder))
    config = load_config(ladder)
    if shared:
        return load_shared_outcomes(suites, config)
    return load_outcome_table(suites, config)


def refuse_stdout(flag: str, value: str | None, why: str) -> None:
    """``--out -`` wrote a file named "-": refuse it where standard output cannot hold the
    output (say why), so it is never a surprise file in the working directory."""
    if value == STDOUT:
        raise ConfigError(f"{flag} - (standard output) is not supported here: {why}; give a "
                          "file path")


def check_out_path(flag: str, value: str | None) -> None:
    """A file the command writes at its end: refuse now a path that cannot be one (a folder,
    a folder that does not exist), before the work (a tune of 10,000 cases takes seconds)."""
    if value is None:
        return
    path = Path(value)
    if path.is_dir():
        raise ConfigError(f"{flag} {value} is a folder; give a file path")
    if not path.parent.is_dir():
        raise ConfigError(f"{flag} {value}: the folder {path.parent} does not exist (No such "
                          "file or directory)")
