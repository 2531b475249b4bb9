"""Finding verifiers by name: built-ins, the ``cascade.verifiers`` entry-point group, dotted paths.

A configured name resolves, in order, to

1. a built-in short name (:data:`BUILTINS`);
2. an installed plugin: an entry point in the ``cascade.verifiers`` group, declared by any
   package as ``[project.entry-points."cascade.verifiers"] my_check = "my_pkg.mod:MyVerifier"``;
3. a dotted path ``package.module:factory`` importable from ``sys.path`` or the config file's
   folder, which must name a verifier under the rule of :mod:`cascade.dotted` (marked with
   ``@cascade.verifier``, a verifier class of that module, or a module the user allowed).

What the name points at is a *factory* (usually a class) called with the verifier's settings as
keyword arguments; or, when it takes a single parameter named ``ctx`` (or annotated
``VerifyContext``), the verify function itself, which reads its settings from ``ctx.settings``.
Installed plugins are only imported when configured. Settings are checked against the
factory's type annotations before it is called, so ``min_chars = "x"`` fails at load, before any
model call is paid, and never halfway through a request.
"""

from __future__ import annotations

import inspect
import os
import typing
from collections.abc import Callable, Mapping
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, TypeAdapter, ValidationError

from cascade.config import VerifierConfig
from cascade.dotted import config_folder, import_object
from cascade.errors import ConfigError, UnknownVerifierError
from cascade.verify import Verifier, as_verifier, implements_verifier

__all__ = ["BUILTINS", "ENTRY_POINT_GROUP", "known_verifiers", "load_verifier"]

ENTRY_POINT_GROUP = "cascade.verifiers"

BUILTINS: dict[str, str] = {
    "schema": "verifiers.schema:SchemaVerifier",
    "confidence": "verifiers.confidence:ConfidenceVerifier",
    "judge": "verifiers.judge:JudgeVerifier",
    "refusal": "verifiers.refusal:RefusalVerifier",
    "agreement": "verifiers.agreement:AgreementVerifier",
}
"""Built-in short names and the factories they stand for."""


def _installed() -> dict[str, EntryPoint]:
    # Read anew on every call: a plugin installed while the process runs is found too.
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def known_verifiers() -> dict[str, str]:
    """Every name a config may use, with the factory it resolves to (built-ins win clashes)."""
    known = {name: ep.value for name, ep in sorted(_installed().items())}
    known.update(BUILTINS)
    return known


def _unknown(cfg: VerifierConfig, why: str) -> UnknownVerifierError:
    names = ", ".join(sorted(known_verifiers()))
    return UnknownVerifierError(
        f"{why}; known verifiers: {names}; or give 'package.module:factory'",
        source=f"verifier {cfg.key!r}", key="name",
    )


def _resolve(cfg: VerifierConfig, search: Path | None) -> Any:
    name = cfg.name
    where = f"verifier {cfg.key!r}"
    if name in BUILTINS:
        return import_object(BUILTINS[name], kind="verifier", implements=implements_verifier)
    installed = _installed()
    if name in installed:
        try:
            return installed[name].load()
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"the installed plugin {name!r} ({installed[name].value}) "
                              f"failed to import: {e}", source=where, key="name") from e
    if ":" not in name:
        raise _unknown(cfg, f"{name!r} is not a built-in or installed verifier")
    try:
        return import_object(name, kind="verifier", implements=implements_verifier,
                             search=search, source=where, key="name")
    except ImportError as e:
        raise _unknown(cfg, str(e)) from None


def _is_verify_function(fn: Callable[..., Any]) -> bool:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    if len(params) != 1 or params[0].kind not in (
        inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD
    ):
        return False
    annotation = params[0].annotation
    return params[0].name == "ctx" or annotation == "VerifyContext" or (
        getattr(annotation, "__name__", None) == "VerifyContext")


def _check_settings(cfg: VerifierConfig, factory: Callable[..., Any],
                    settings: Mapping[str, Any]) -> None:
    """Name the bad key before calling, so a TypeError raised *inside* a factory stays a bug."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return
    params = sig.parameters
    where = f"verifier {cfg.key!r} ({cfg.name})"
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        accepted = [n for n, p in params.items() if p.kind in (
            inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
        unknown = sorted(set(settings) - set(accepted))
        if unknown:
            raise ConfigError(f"unknown setting(s) {unknown}; allowed: {sorted(accepted)}",
                              source=where, key=unknown[0])
    try:
        sig.bind(**settings)
    except TypeError as e:
        missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty
                   and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                  inspect.Parameter.KEYWORD_ONLY) and n not in settings]
        raise ConfigError(f"bad settings: {e}" + (
            f"; required: {missing}" if missing else ""), source=where,
            key=missing[0] if missing else None) from None
    _check_types(factory, settings, where)


_STRICT = ConfigDict(strict=True, allow_inf_nan=False, arbitrary_types_allowed=True)


def _check_types(factory: Callable[..., Any], settings: Mapping[str, Any], where: str) -> None:
    """Each setting against the factory's annotation: strict (no "3" for 3, no "abc" for a
    list of patterns, no NaN), so a value that would misbehave later fails here, by key."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # unresolvable annotations (a plugin's own business): nothing to check
        return
    for key, value in settings.items():
        hint = hints.get(key)
        if hint is None or hint is Any:
            continue
        try:
            TypeAdapter(hint, config=_STRICT).validate_python(value)
        except ValidationError:
            raise ConfigError(_type_message(hint, value), source=where, key=key) from None
        except Exception:  # a type pydantic cannot check: leave it to the factory
            continue


def _type_message(hint: Any, value: Any) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return f"is {value!r}; allowed: {', '.join(str(a) for a in typing.get_args(hint))}"
    if isinstance(hint, type):
        name = {"int": "an integer", "float": "a finite number", "str": "a string",
                "bool": "true or false"}.get(hint.__name__, hint.__name__)
    else:
        name = str(hint).replace("typing.", "").replace("collections.abc.", "")
    return f"must be {name}, got {value!r}"


def load_verifier(cfg: VerifierConfig, *,
                  relative_to: str | os.PathLike[str] | None = None) -> Verifier:
    """Build the verifier ``cfg`` names, calling its factory with ``cfg.settings``.

    ``relative_to`` is the config file (its ``source``): a dotted path is also searched in its
    folder. Raises :class:`UnknownVerifierError` (listing the known names) when the name
    resolves to nothing, and :class:`ConfigError` naming the verifier and key when the name is
    not allowed or the settings are wrong.
    """
    target = _resolve(cfg, config_folder(relative_to))
    settings = dict(cfg.settings)
    where = f"verifier {cfg.key!r} ({cfg.name})"
    if not inspect.isclass(target) and hasattr(target, "verify"):
        if settings:  # an instance is already configured
            raise ConfigError(f"{cfg.name!r} is a ready verifier object and takes no settings; "
                              f"got {sorted(settings)}", source=where, key=sorted(settings)[0])
        return as_verifier(target, name=cfg.key)
    if not callable(target):
        raise ConfigError(f"{cfg.name!r} is neither a verifier nor a factory",
                          source=where, key="name")
    if not inspect.isclass(target) and _is_verify_function(target):
        return as_verifier(target, name=cfg.key)
    _check_settings(cfg, target, settings)
    try:
        built = target(**settings)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"rejected its settings: {e}", source=where) from e
    try:
        return as_verifier(built, name=cfg.key)
    except TypeError as e:
        raise ConfigError(f"factory {cfg.name!r} returned {built!r}, not a verifier",
                          source=where, key="name") from e
