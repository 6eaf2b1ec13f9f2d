"""The memory-health chart, drawn as SVG by matplotlib (no script library to
serve): of what was learned, the share still answered right, by its age."""

from __future__ import annotations

import io
from typing import Any


def memory_svg(by_age: list[dict[str, Any]], per_check: list[dict[str, Any]]) -> bytes:
    """Pooled accuracy by age (versions since a document was learned) as a line,
    each document's checks as dots behind it."""
    from matplotlib.figure import Figure  # no pyplot: its global state is not for a server's threads
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7.0, 3.0), dpi=96)
    ax = fig.subplots()
    if per_check:
        ax.scatter([r["age"] for r in per_check], [100 * r["accuracy"] for r in per_check], s=12,
                   color="#9bb7d4", alpha=0.6, label="a document's check")
    if by_age:
        ax.plot([r["age"] for r in by_age], [100 * r["accuracy"] for r in by_age], marker="o",
                color="#1f4e79", label="all documents")
    else:
        ax.text(0.5, 0.5, "no checks yet: run `seal-agent replay check`, or schedule.replay_check",
                ha="center", va="center", transform=ax.transAxes, fontsize=9, color="#555")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # ages are whole versions
    ax.set_xlabel("age: versions since the document was learned")
    ax.set_ylabel("replay QAs right (%)")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    if by_age or per_check:
        ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="svg")
    return out.getvalue()
