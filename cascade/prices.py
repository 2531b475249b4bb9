"""A small built-in price table for well-known models (USD per million tokens, input/output).

Rungs that set ``input_usd_per_mtok``/``output_usd_per_mtok`` override it. Prices change: check
your provider's page and set them in config for anything that matters.
"""

from __future__ import annotations

__all__ = ["PRICES", "lookup_price"]

PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1": (2.00, 8.00),
    "o4-mini": (1.10, 4.40),
    "claude-3-5-haiku-latest": (0.80, 4.00),
    "claude-3-5-sonnet-latest": (3.00, 15.00),
    "claude-haiku-4-5": (1.00, 5.00),
    "claude-sonnet-4-5": (3.00, 15.00),
    "claude-opus-4-1": (15.00, 75.00),
}


def lookup_price(model: str) -> tuple[float, float] | None:
    """The built-in (input, output) price of ``model``, or None when it is not in the table."""
    return PRICES.get(model)
