"""Shared engine state (cache, budgets, breakers, latency, counters): see :mod:`.base`.

Without a ``[store]`` table everything stays in this process (and this host's disk); with
``[store] url = "redis://..."`` it is shared through Redis by every worker using the config.
"""

from __future__ import annotations

from collections.abc import Callable

from cascade.budget import BudgetStore
from cascade.cache import AnswerCache
from cascade.config import CascadeConfig
from cascade.store.base import Store
from cascade.store.local import LocalStore

__all__ = ["LocalStore", "Store", "open_store"]


def open_store(config: CascadeConfig, *, cache: AnswerCache | None = None,
               budget_store: BudgetStore | None = None,
               clock: Callable[[], float] | None = None) -> Store:
    """The store a config asks for: Redis when ``[store] url`` is set, else the local one.

    An explicitly passed ``cache`` / ``budget_store`` (tests, embedding) wins over both.
    """
    if config.store.get("url") and cache is None and budget_store is None:
        from cascade.store.redis import RedisStore  # redis-py loads only when asked

        return RedisStore.from_config(config)
    return LocalStore(config, cache=cache, budget_store=budget_store, clock=clock)
