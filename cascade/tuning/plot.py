"""The frontier as a PNG (optional: needs matplotlib)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_frontier"]


def plot_frontier(frontier: Sequence[Mapping[str, Any]], report: Mapping[str, Any],
                  path: str | Path) -> bool:
    """Draw the frontier to a PNG; False (and nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, style in (("cascade", "-o"), ("single_rung", "s"), ("oracle", "*")):
        pts = [p for p in frontier if p["kind"] == kind]
        if pts:
            ax.plot([p["mean_cost_usd"] for p in pts], [p["accuracy"] for p in pts], style,
                    label=kind.replace("_", " "), markersize=5)
        if kind == "single_rung":
            for p in pts:
                ax.annotate(p["rungs"][0], (p["mean_cost_usd"], p["accuracy"]), fontsize=7)
    exp = report.get("expected", {})
    if exp:
        ax.plot([exp["mean_cost_usd"]["estimate"]], [exp["accuracy"]["estimate"]], "rX",
                markersize=10, label="recommended")
    ax.set_xscale("log")
    ax.set_xlabel("mean cost per case (USD)")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True

