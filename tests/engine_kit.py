"""Config dicts for engine tests that script their providers (``cascade.testing.Script``): rungs
named after their models, priced per token, and a ladder that retries nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["config", "rung"]


def rung(model: str, price: float, **kw: Any) -> dict[str, Any]:
    """A rung on its own fake URL, ``price`` dollars per million tokens in and out."""
    return {"model": model, "provider": "openai-compatible", "base_url": f"http://{model}/v1",
            "input_usd_per_mtok": price, "output_usd_per_mtok": price, **kw}


def config(tmp_path: Path, rungs: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """A ladder of ``rungs``, its cache in ``tmp_path``, one try per call."""
    return {"rungs": rungs, "cache": {"directory": str(tmp_path / "cache")},
            "retry": {"max_attempts": 1, "base_delay_s": 0.0, "max_delay_s": 0.0}, **extra}
