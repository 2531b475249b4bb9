"""Code named in config and data files: the one rule for what a dotted path may resolve to.

A config (``name = "my_checks:CitesSource"``) or a data file (a suite case's ``grader``) may name
Python code as ``package.module:attr``. Such files are shared, downloaded and written by tools,
so naming a function must not be enough to run it (``os:system``, ``shutil:rmtree``). A dotted
path resolves only to

1. an object **marked** for its use with ``@cascade.verifier``, ``@cascade.grader`` or
   ``@cascade.normaliser`` (marking a class marks its subclasses and instances);
2. an object that **is one by its type** and is defined in the named module (or a submodule):
   for a verifier, a class with a ``verify(ctx)`` method, or an instance of one; for a schema
   model, a pydantic model class;
3. anything in a module the user **allowed**: ``CASCADE_ALLOW_MODULES="my_checks,lab.graders"``
   (comma-separated; allowing a package allows its submodules).

Installed plugins (the ``cascade.verifiers`` entry-point group) are trusted by installation and
do not pass through here. A standard-library module is never imported through a dotted path
unless allowed (some, like ``antigravity``, act on import); other modules are imported to look at
the object, which is what installing them already trusted. ``search`` (the config file's folder)
is searched after ``sys.path``, so a ``my_checks.py`` next to ``cascade.toml`` is found from any
working directory and never shadows an installed module.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from cascade.errors import ConfigError

__all__ = ["ALLOW_ENV", "config_folder", "grader", "import_object", "normaliser", "verifier"]

ALLOW_ENV = "CASCADE_ALLOW_MODULES"
"""Environment variable: modules whose every object a dotted path may name."""

_MARK = "__cascade_kinds__"
T = TypeVar("T")


def _marker(kind: str) -> Callable[[T], T]:
    def mark(obj: T) -> T:
        kinds = frozenset(getattr(obj, _MARK, frozenset())) | {kind}
        try:
            setattr(obj, _MARK, kinds)
        except (AttributeError, TypeError):
            raise TypeError(f"@cascade.{kind} cannot mark {obj!r}: wrap it in a function "
                            "of your own") from None
        return obj

    mark.__name__ = kind
    mark.__qualname__ = kind
    mark.__doc__ = (f"Mark a function or class as a {kind}, so config and data files may name "
                    f"it by dotted path (see ``cascade.dotted``).")
    return mark


verifier = _marker("verifier")
grader = _marker("grader")
normaliser = _marker("normaliser")


def _allowed_modules() -> list[str]:
    return [m.strip() for m in os.environ.get(ALLOW_ENV, "").split(",") if m.strip()]


def _within(module: str, parent: str) -> bool:
    return module == parent or module.startswith(parent + ".")


def _defined_in(obj: Any, module: str) -> bool:
    owner = obj if isinstance(obj, type) else type(obj)
    return _within(str(getattr(owner, "__module__", "")), module)


def import_object(
    path: str,
    *,
    kind: str,
    implements: Callable[[Any], bool] | None = None,
    search: str | os.PathLike[str] | None = None,
    source: str | None = None,
    key: str | None = None,
) -> Any:
    """The object ``path`` (``package.module:attr``, dotted ``attr`` allowed) names as a ``kind``.

    Raises ImportError when the path names nothing (callers say what else the name could be),
    and :class:`ConfigError` (with ``source``/``key``) when it names code not allowed as a
    ``kind``; the message says how to allow it.
    """
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ImportError(f"{path!r} is not of the form 'package.module:name'")
    allowed = any(_within(module_name, m) for m in _allowed_modules())
    allow = f"allow its module with {ALLOW_ENV}={module_name.split('.')[0]}"
    how = {"verifier": "mark it with @cascade.verifier (or give a class with a verify(ctx) "
                       f"method defined in {module_name!r}), or {allow}",
           "model": f"name the module that defines the model class, or {allow}",
           }.get(kind, f"mark it with @cascade.{kind}, or {allow}")
    if not allowed and module_name.split(".")[0] in sys.stdlib_module_names:
        raise ConfigError(f"{path!r} is in the standard library, which holds no {kind}; "
                          f"name a {kind} of your own ({how})", source=source, key=key)
    if search is not None and str(search) not in sys.path:
        sys.path.append(str(search))
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and _within(module_name, e.name):
            raise ImportError(f"module {e.name!r} of {path!r} is not importable") from None
        raise  # the named module itself imports something missing: show the real error
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ImportError(f"module {module_name!r} has no attribute {attr!r}") from None
    if allowed or kind in getattr(obj, _MARK, ()):
        return obj
    if implements is not None and implements(obj) and _defined_in(obj, module_name):
        return obj
    raise ConfigError(f"{path!r} is not a {kind}: {how}", source=source, key=key)


def config_folder(source: str | os.PathLike[str] | None) -> Path | None:
    """The folder of a config file, when ``source`` names one (else None: a dict, a string)."""
    if source is None:
        return None
    p = Path(source)
    return p.resolve().parent if p.is_file() else None
