"""Plots (matplotlib, the ``plot`` extra): error against NFE."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .io import atomic_path


def error_vs_nfe(report: dict[str, Any], out: str | Path, learned: list[dict[str, Any]] | None = None,
                 title: str | None = None) -> Path:
    """Per classic solver (best grid at each NFE) RMSE against NFE, learned solvers as markers.

    ``report`` is an :func:`fewstep.evaluate.evaluate` result over several NFE.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best: dict[str, dict[int, float]] = {}
    for r in report["results"]:
        if r["rmse"] is None or r.get("grid") == "learned":
            continue
        d = best.setdefault(r["solver"], {})
        d[r["nfe"]] = min(d.get(r["nfe"], float("inf")), r["rmse"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    asked = report["nfe"] if isinstance(report["nfe"], list) else [report["nfe"]]
    overall: dict[int, float] = {}
    for name, d in sorted(best.items()):
        xs = sorted(d)
        ax.plot(xs, [d[x] for x in xs], lw=1, alpha=0.45, label=name)
        for x in xs:
            if x in asked:  # heun lands on odd NFE below an even budget: not a budget that was asked
                overall[x] = min(overall.get(x, float("inf")), d[x])
    xs = sorted(overall)
    ax.plot(xs, [overall[x] for x in xs], "k--", lw=2, label="best classic (any solver, any grid)")
    for r in learned or []:
        ax.plot([r["nfe"]], [r["rmse"]], "r*", ms=14, label=f"learned: {r['solver']} ({r['nfe']} NFE)")
    ax.set_yscale("log")
    ax.set_xlabel("NFE (network evaluations)")
    ax.set_ylabel("held-out RMSE to the reference")
    ax.set_title(title or f"{report['model']}: error against NFE")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out
