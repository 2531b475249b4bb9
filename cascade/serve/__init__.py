"""``cascade serve``: the cascade as an OpenAI-compatible HTTP service.

The wire format lives in :mod:`cascade.serve.protocol`, one module per endpoint family
(``chat``, ``models``, ``health``, ``metrics``, ``feedback``), what they share in
:mod:`cascade.serve.service`, and :mod:`cascade.serve.app` only wires them.
"""

from __future__ import annotations

from cascade.serve.app import app_factory, create_app
from cascade.serve.config import ClientConfig, ServerConfig, parse_server

__all__ = ["ClientConfig", "ServerConfig", "app_factory", "create_app", "parse_server"]
