"""Provider kinds by name: a rung's ``provider`` picks the factory that builds its client.

The built-in kinds import their SDK only when a rung of that kind is built, so ``import
cascade`` stays fast. Other modules add kinds with :func:`register_provider`; a kind that is
not registered yet is looked for in ``cascade.providers.<kind>`` (``-`` read as ``_``), which
registers itself on import (the local llama.cpp and replay providers work this way).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from cascade.config import RungConfig
from cascade.errors import ConfigError
from cascade.providers.base import Completion, ModelCall, Provider, TokenLogprob

__all__ = [
    "Completion",
    "ModelCall",
    "Provider",
    "ProviderFactory",
    "TokenLogprob",
    "known_providers",
    "make_provider",
    "register_provider",
]

ProviderFactory = Callable[[RungConfig], Provider]

_FACTORIES: dict[str, ProviderFactory] = {}

# kind -> "module:attribute", imported on first use. Modules named here register nothing
# themselves; a kind registered explicitly wins over its entry here.
_BUILTIN: dict[str, str] = {
    "openai": "cascade.providers.openai:OpenAIProvider",
    "openai-compatible": "cascade.providers.openai:OpenAIProvider",
    "anthropic": "cascade.providers.anthropic:AnthropicProvider",
    "local": "cascade.providers.local:LocalProvider",
    "replay": "cascade.replay:replay_provider",
}


def register_provider(kind: str, factory: ProviderFactory) -> None:
    """Make rungs with ``provider = kind`` use ``factory`` (replacing any earlier one)."""
    if not kind or not isinstance(kind, str):
        raise ValueError("a provider kind must be a non-empty string")
    _FACTORIES[kind] = factory


def known_providers() -> tuple[str, ...]:
    """Every kind :func:`make_provider` can build, sorted."""
    return tuple(sorted(set(_FACTORIES) | set(_BUILTIN)))


def make_provider(rung: RungConfig) -> Provider:
    """Build the provider for ``rung``; unknown kinds raise ConfigError listing the known ones."""
    kind = rung.provider
    factory = _FACTORIES.get(kind)
    if factory is None and kind in _BUILTIN:
        module, _, name = _BUILTIN[kind].partition(":")
        factory = getattr(importlib.import_module(module), name)
        _FACTORIES[kind] = factory
    if factory is None and kind.replace("-", "_").isidentifier():
        module = f"{__name__}.{kind.replace('-', '_')}"
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
        factory = _FACTORIES.get(kind)
    if factory is None:
        raise ConfigError(
            f"unknown provider {kind!r}; known: {', '.join(known_providers())}",
            key="provider",
        )
    return factory(rung)
