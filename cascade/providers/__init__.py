"""Provider kinds by name: a rung's ``provider`` picks the factory that builds its client.

One registry answers "which kinds exist" for both config validation and construction, from
three sources: the built-in kinds, kinds added with :func:`register_provider`, and installed
packages that declare a ``cascade.providers`` entry point (value: a factory called with the
rung's :class:`~cascade.config.RungConfig`, returning a :class:`Provider`). Built-ins import
their SDK only when a rung of that kind is built, and entry points are loaded only when their
kind is used, so ``import cascade`` stays fast.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points

from cascade.config import RungConfig
from cascade.errors import ConfigError
from cascade.providers.base import Completion, ModelCall, Provider, TokenLogprob

__all__ = [
    "ENTRY_POINT_GROUP",
    "Completion",
    "ModelCall",
    "Provider",
    "ProviderFactory",
    "TokenLogprob",
    "has_provider",
    "known_providers",
    "make_provider",
    "register_provider",
]

ENTRY_POINT_GROUP = "cascade.providers"

ProviderFactory = Callable[[RungConfig], Provider]

_FACTORIES: dict[str, ProviderFactory] = {}
"""Kinds added with register_provider."""
_LOADED: dict[str, ProviderFactory] = {}
"""Built-ins and entry points already imported, by kind (an entry point by its value too)."""

# kind -> "module:attribute", imported on first use; a kind registered explicitly wins.
_BUILTIN: dict[str, str] = {
    "openai": "cascade.providers.openai:OpenAIProvider",
    "anthropic": "cascade.providers.anthropic:AnthropicProvider",
    "openai-compatible": "cascade.providers.openai:OpenAIProvider",
    "local": "cascade.providers.local:LocalProvider",
    "replay": "cascade.providers.replay:replay_provider",
}


def register_provider(kind: str, factory: ProviderFactory) -> None:
    """Make rungs with ``provider = kind`` use ``factory`` (replacing any earlier one)."""
    if not kind or not isinstance(kind, str):
        raise ValueError("a provider kind must be a non-empty string")
    _FACTORIES[kind] = factory


def _installed() -> dict[str, EntryPoint]:
    """Entry points of installed packages, read afresh (a package may be installed at run time)."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def has_provider(kind: str) -> bool:
    """Whether :func:`make_provider` can build ``kind``; installed packages are scanned only for
    a name that is neither built in nor registered (the scan costs milliseconds)."""
    return kind in _BUILTIN or kind in _FACTORIES or kind in _installed()


def known_providers() -> tuple[str, ...]:
    """Every kind :func:`make_provider` can build: the built-ins, then the registered and
    installed ones, sorted."""
    others = (set(_FACTORIES) | set(_installed())) - set(_BUILTIN)
    return (*_BUILTIN, *sorted(others))


def _factory(kind: str) -> ProviderFactory:
    factory: ProviderFactory | None = _FACTORIES.get(kind)
    if factory is not None:
        return factory
    if kind in _BUILTIN:
        where = _BUILTIN[kind]
        factory = _LOADED.get(where)
        if factory is None:
            module, _, name = where.partition(":")
            factory = _LOADED[where] = getattr(importlib.import_module(module), name)
        return factory
    ep = _installed().get(kind)
    if ep is None:
        raise ConfigError(f"is {kind!r}; allowed: {', '.join(known_providers())}",
                          key="provider")
    factory = _LOADED.get(f"{kind}={ep.value}")
    if factory is None:
        try:
            factory = ep.load()
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"the provider {kind!r} is installed ({ep.value}) but does not "
                              f"load: {type(e).__name__}: {e}", key="provider") from None
        if not callable(factory):
            raise ConfigError(f"the provider entry point {kind!r} = {ep.value} is not "
                              "callable; it must name a factory taking a RungConfig",
                              key="provider")
        _LOADED[f"{kind}={ep.value}"] = factory
    return factory


def make_provider(rung: RungConfig) -> Provider:
    """Build the provider for ``rung``; unknown kinds raise ConfigError listing the known ones."""
    provider = _factory(rung.provider)(rung)
    if not isinstance(provider, Provider):
        raise ConfigError(f"the factory for provider {rung.provider!r} returned "
                          f"{type(provider).__name__}, not a cascade.providers.Provider",
                          key="provider")
    return provider
