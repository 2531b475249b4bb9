"""Shared engine state: see :mod:`cascade.store.base`."""
