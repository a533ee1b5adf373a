"""Plots (matplotlib, the ``plot`` extra): a metric against NFE, samples side by side, and a
learned solver's grid and coefficients against the classic solver it started from.

Every function writes one PNG atomically and returns its path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import FewstepError
from .io import atomic_path, is_image

METRIC_LABELS = {
    "rmse": "held-out RMSE to the reference",
    "fd": "Frechet distance to the data",
    "kid": "KID to the data",
    "fd_ref": "Frechet distance to the reference solve",
    "swd": "sliced Wasserstein distance to the data",
    "psnr": "PSNR to the reference (dB)",
    "loglik": "average log-likelihood",
}
#: True for the distances, which metric plots also draw on a log axis
LOWER_IS_BETTER = {"rmse": True, "fd": True, "kid": True, "fd_ref": True, "swd": True, "psnr": False, "loglik": False}


def _plt() -> Any:
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise FewstepError("plots need matplotlib: pip install 'fewstep[plot]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, out: str | Path) -> Path:
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    _plt().close(fig)
    return out


def _rows(report: dict[str, Any], metric: str) -> tuple[list[dict], list[dict], dict | None]:
    """(classic rows, learned rows, reference row) of a report that carry ``metric``."""
    classic, learned, ref = [], [], None
    for r in report["results"]:
        if r.get(metric) is None:
            continue
        if r.get("role") == "reference":
            ref = r
        elif r.get("grid") == "learned":
            learned.append(r)
        else:
            classic.append(r)
    return classic, learned, ref


def classic_lines(
    classic: Sequence[dict[str, Any]], metric: str, asked: Sequence[int]
) -> tuple[dict[str, dict[int, dict[str, Any]]], dict[int, dict[str, Any]], str]:
    """Which classic rows a metric plot draws: ({solver: {nfe: row at its best grid}}, {nfe: best row
    over every solver and grid at an asked NFE}, the key they were chosen by).

    Rows are chosen by RMSE when every row has one, as in the tables: the lowest FD / KID / SWD can
    sit below the reference's own figure, by chance or by a bias that happens to move samples
    towards the data, so choosing by the metric itself would flatter it.
    """
    key = "rmse" if all(r.get("rmse") is not None for r in classic) else metric
    sign = 1.0 if key == "rmse" or LOWER_IS_BETTER.get(metric, True) else -1.0
    best: dict[str, dict[int, dict[str, Any]]] = {}
    for r in classic:
        d = best.setdefault(r["solver"], {})
        if r["nfe"] not in d or sign * r[key] < sign * d[r["nfe"]][key]:
            d[r["nfe"]] = r
    overall: dict[int, dict[str, Any]] = {}
    for d in best.values():
        for x, r in d.items():  # heun lands on odd NFE below an even budget: not a budget that was asked
            if x in asked and (x not in overall or sign * r[key] < sign * overall[x][key]):
                overall[x] = r
    return best, overall, key


def metric_vs_nfe(
    report: dict[str, Any],
    out: str | Path,
    metric: str = "rmse",
    learned: Sequence[dict[str, Any]] = (),
    title: str | None = None,
) -> Path:
    """Per classic solver (best grid at each NFE) ``metric`` against NFE; learned solvers as stars.

    ``report``: an :func:`fewstep.evaluate.evaluate` result over several NFE; ``learned``: extra
    result rows (e.g. from evaluating artifacts). The reference solve's figure (the floor) is
    drawn as a horizontal line when the report has one.
    """
    plt = _plt()
    classic, own, ref = _rows(report, metric)
    learned = list(own) + [r for r in learned if r.get(metric) is not None]
    if not classic and not learned:
        raise FewstepError(f"the report has no {metric!r} values to plot (evaluate with metrics=...)")
    asked = report["nfe"] if isinstance(report["nfe"], list) else [report["nfe"]]
    best, overall, key = classic_lines(classic, metric, asked)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, d in sorted(best.items()):
        xs = sorted(d)
        ax.plot(xs, [d[x][metric] for x in xs], lw=1, alpha=0.45, label=name)
    xs = sorted(overall)
    if xs:
        how = "any solver, any grid" + (", chosen by RMSE" if key == "rmse" and metric != "rmse" else "")
        ax.plot(xs, [overall[x][metric] for x in xs], "k--", lw=2, label=f"best classic ({how})")
    by_name: dict[str, list[dict]] = {}
    for r in learned:
        by_name.setdefault(r["solver"], []).append(r)
    for k, (name, rs) in enumerate(sorted(by_name.items())):
        rs = sorted(rs, key=lambda r: r["nfe"])
        ax.plot(
            [r["nfe"] for r in rs],
            [r[metric] for r in rs],
            marker="*",
            ms=13,
            lw=1.5,
            color=plt.cm.autumn(k / max(1, len(by_name))),
            label=f"learned: {name}",
        )
    if ref is not None:
        ax.axhline(ref[metric], color="green", lw=1, ls=":", label=f"reference solve (floor): {ref['grid']}")
    if LOWER_IS_BETTER.get(metric, False) and all(v > 0 for r in classic + learned for v in [r[metric]]):
        ax.set_yscale("log")
        shown = [r[metric] for r in list(overall.values()) + learned] + ([ref[metric]] if ref else [])
        top = 30 * max(shown)  # a diverging solver (Adams-2 at NFE 3 on a UNet: FD 4e5) would flatten the rest
        if ax.get_ylim()[1] > top:
            ax.set_ylim(top=top)
    ax.set_xlabel("NFE (network evaluations)")
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.set_title(title or f"{report['model']}: {metric} against NFE")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return _save(fig, out)


def error_vs_nfe(
    report: dict[str, Any], out: str | Path, learned: Sequence[dict[str, Any]] | None = None, title: str | None = None
) -> Path:
    """RMSE against NFE (see :func:`metric_vs_nfe`)."""
    return metric_vs_nfe(report, out, "rmse", learned or (), title)


def sample_panels(panels: Sequence[tuple[str, Tensor]], out: str | Path, title: str | None = None) -> Path:
    """Samples side by side, one panel per (title, samples (B, ...)), all from the same noises.

    Image-shaped samples (C, H, W) become image grids; other samples are drawn as points in their
    first two coordinates.
    """
    plt = _plt()
    if not panels:
        raise FewstepError("sample_panels needs at least one (title, samples) panel")
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    shape = tuple(panels[0][1].shape[1:])
    lim = None
    if not is_image(shape):
        allx = torch.cat([p[1].detach().cpu().double().flatten(1)[:, :2] for p in panels])
        lo, hi = allx.min(0).values, allx.max(0).values
        pad = 0.05 * (hi - lo)
        lim = (lo - pad, hi + pad)
    for ax, (name, x) in zip(axes[0], panels, strict=True):
        x = x.detach().cpu().float()
        if is_image(shape):
            from .io import image_grid

            img = image_grid(x, nrow=int(max(1, round(x.shape[0] ** 0.5))))
            ax.imshow((img.squeeze(-1) if img.shape[-1] == 1 else img).numpy(), cmap="gray", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        else:
            p = x.flatten(1)
            assert lim is not None  # set above for samples that are not images
            ax.scatter(p[:, 0].numpy(), (p[:, 1] if p.shape[1] > 1 else torch.zeros(len(p))).numpy(), s=3, alpha=0.6)
            ax.set_xlim(float(lim[0][0]), float(lim[1][0]))
            if p.shape[1] > 1:
                ax.set_ylim(float(lim[0][1]), float(lim[1][1]))
            ax.set_aspect("equal", adjustable="box")
        ax.set_title(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


def solver_vs_start(solver: Any, out: str | Path, start_tableau: Any = None) -> Path:
    """A learned solver's grid, evaluation times and predictor coefficients next to its start.

    ``solver``: a loaded artifact (:func:`fewstep.load_solver`); ``start_tableau``: the tableau of
    its starting classic solver (default: rebuilt from the artifact's ``start`` field).
    """
    plt = _plt()
    tab = solver.tableau()
    if start_tableau is None:
        from .show import start_tableau as _start

        start_tableau = _start(solver)
    start = start_tableau
    n = tab.N
    fig, axes = plt.subplots(1, 3 if start is not None else 2, figsize=(13, 4), squeeze=False)
    ax = axes[0][0]
    i = list(range(n + 1))
    ax.plot(i, tab.t.tolist(), "o-", color="C3", label="learned grid t_i")
    ax.plot(i[:-1], tab.eval_times.tolist(), "x", color="C3", ms=8, label="learned evaluation times c_i")
    if start is not None:
        ax.plot(
            i,
            start.t.tolist(),
            "s--",
            color="C0",
            alpha=0.7,
            label=f"start grid ({solver.doc.get('start', {}).get('solver')})",
        )
    ax.set_xlabel("step i")
    ax.set_ylabel("solver time t")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    mats = [("learned B", tab.B)] + ([("start B", start.B)] if start is not None else [])
    vmax = max(float(m.abs().max()) for _, m in mats) or 1.0
    for ax, (name, M) in zip(axes[0][1:], mats, strict=True):
        Mm = M.clone().double()
        Mm[torch.triu(torch.ones(n, n, dtype=torch.bool), 1)] = float("nan")
        im = ax.imshow(Mm.numpy(), cmap="coolwarm", vmin=-vmax, vmax=vmax)
        for r in range(n):
            for c in range(r + 1):
                if float(M[r, c]) != 0.0:
                    ax.text(c, r, f"{float(M[r, c]):.3f}", ha="center", va="center", fontsize=6)
        ax.set_title(f"{name} (basis {tab.basis if 'learned' in name else start.basis})", fontsize=9)
        ax.set_xlabel("evaluation j")
        ax.set_ylabel("step i")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"{solver.doc.get('method')} at {n} NFE on {solver.doc.get('model', {}).get('name')}", fontsize=10)
    fig.tight_layout()
    return _save(fig, out)
