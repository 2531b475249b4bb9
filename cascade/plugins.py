"""Finding verifiers by name: built-ins, the ``cascade.verifiers`` entry-point group, dotted paths.

A configured name resolves, in order, to

1. a built-in short name (:data:`BUILTINS`);
2. an installed plugin: an entry point in the ``cascade.verifiers`` group, declared by any
   package as ``[project.entry-points."cascade.verifiers"] my_check = "my_pkg.mod:MyVerifier"``;
3. a dotted path ``package.module:factory`` importable from ``sys.path``.

What the name points at is a *factory* (usually a class) called with the verifier's settings as
keyword arguments; or, when it takes a single parameter named ``ctx`` (or annotated
``VerifyContext``), the verify function itself, which reads its settings from ``ctx.settings``.
Installed plugins are only imported when configured.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from cascade.config import VerifierConfig
from cascade.errors import ConfigError, UnknownVerifierError
from cascade.verify import Verifier, as_verifier

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


def _import(path: str) -> Any:
    module_name, _, attr = path.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _unknown(cfg: VerifierConfig, why: str) -> UnknownVerifierError:
    names = ", ".join(sorted(known_verifiers()))
    return UnknownVerifierError(
        f"{why}; known verifiers: {names}; or give 'package.module:factory'",
        source=f"verifier {cfg.key!r}", key="name",
    )


def _resolve(cfg: VerifierConfig) -> Any:
    name = cfg.name
    if name in BUILTINS:
        return _import(BUILTINS[name])
    installed = _installed()
    if name in installed:
        try:
            return installed[name].load()
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"the installed plugin {name!r} ({installed[name].value}) "
                              f"failed to import: {e}", source=f"verifier {cfg.key!r}",
                              key="name") from e
    module_name, sep, attr = name.partition(":")
    if not sep:
        raise _unknown(cfg, f"{name!r} is not a built-in or installed verifier")
    if not module_name or not attr:
        raise _unknown(cfg, f"{name!r} is not of the form 'package.module:factory'")
    try:
        return _import(name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise _unknown(cfg, f"module {e.name!r} of {name!r} is not importable") from None
        raise  # the plugin itself imports something missing: show the real error
    except AttributeError:
        raise _unknown(cfg, f"module {module_name!r} has no attribute {attr!r}") from None


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


def load_verifier(cfg: VerifierConfig) -> Verifier:
    """Build the verifier ``cfg`` names, calling its factory with ``cfg.settings``.

    Raises :class:`UnknownVerifierError` (listing the known names) when the name resolves to
    nothing, and :class:`ConfigError` naming the verifier and key when the settings are wrong.
    """
    target = _resolve(cfg)
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
