"""Side-by-side measurements: learned solvers against the best classic solver over NFE budgets,
and a learned solver fitted at one guidance scale evaluated at others.

"Best classic" is always the best over every classic solver and every grid, chosen on the same
held-out noises the learned solvers are measured on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .denoiser import Denoiser
from .distributed import current
from .errors import FewstepError
from .evaluate import evaluate, solve_batched
from .fit.checkpoint import NAME as CHECKPOINT_NAME
from .report import Report, Row, bench_rows, render_bench_markdown, render_guidance_markdown
from .seeds import EVAL_SEED_START
from .solvers.artifact import LoadedSolver, load_solver

PREFERRED_NFE = 5  # the budget whose samples and solver tables the plots show when it is asked


def _fit_or_reuse(
    model: Denoiser,
    method: str,
    nfe: int,
    d: Path,
    reuse: bool,
    progress: bool,
    device: str,
    fit_kwargs: dict[str, Any] | None,
) -> tuple[Any, float, str]:
    """(solver, wall seconds, how): a finished artifact in ``d`` (solver.json and no fit checkpoint) fitted
    with the same settings is loaded when ``reuse``, with its recorded wall time; otherwise fit into ``d``
    (``how`` says which, and why a finished fit was not reused)."""
    from .fit.api import fit, same_fit

    how = "fitted"
    if reuse and (d / "solver.json").exists() and not (d / CHECKPOINT_NAME).exists():
        solver = load_solver(d)
        solver.check(model)
        diff = same_fit(solver.doc, model, method, nfe, device=device, **(fit_kwargs or {}))
        if not diff:
            return solver, float(solver.doc["timing"]["total_s"]), "reused"
        how = f"refitted (its finished fit had other settings: {'; '.join(diff[:4])})"
    t0 = time.perf_counter()
    res = fit(model, method, nfe, out=d, progress=progress, device=device, **(fit_kwargs or {}))
    return res.solver, time.perf_counter() - t0, how


def run_bench(
    model: Denoiser,
    nfes: Sequence[int],
    methods: Sequence[str],
    out: str | Path,
    samples: int = 256,
    metrics: str | Sequence[str] | None = "auto",
    device: str = "cpu",
    progress: bool = True,
    model_name: str | None = None,
    fit_kwargs: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
    eval_kwargs: dict[str, Any] | None = None,
    reuse: bool = False,
    eval_model: Denoiser | None = None,
) -> dict[str, Any]:
    """Fit every method at every NFE (artifacts in ``out/<method>-nfe<N>``) and measure them.

    With ``reuse``, a finished artifact already in its directory (solver.json and no fit
    checkpoint) fitted with the same settings is loaded instead of refitted; its recorded wall time is
    reported. ``eval_model``: the model the table measures (the same network with the prompts the
    fits never saw; default ``model``).

    Returns {"report": the evaluate() report's JSON with classic and learned rows, "rows": one summary per
    NFE ({"nfe", "best_classic", "best_learned", "ratio"}), "fits": per-fit wall times and artifacts,
    "solvers": the loaded learned solvers}.
    """
    out = Path(out)
    fits: list[dict[str, Any]] = []
    arts = []
    for n in nfes:
        for meth in methods:
            d = out / f"{meth}-nfe{n}"
            solver, secs, how = _fit_or_reuse(model, meth, int(n), d, reuse, progress, device, fit_kwargs)
            doc = solver.doc
            fits.append(
                {
                    "method": meth,
                    "nfe": int(n),
                    "seconds": round(secs, 1),
                    "start": doc["start"]["solver"],
                    "kept_start": doc["validation"]["kept_start"],
                    "artifact": str(d),
                }
            )
            log(
                f"{how} {meth} at NFE {n} ({secs:.0f} s, start {doc['start']['solver']}"
                f"{', kept' if doc['validation']['kept_start'] else ''})"
            )
            arts.append(solver)
    rep = evaluate(
        eval_model or model,
        nfe=list(nfes),
        samples=samples,
        seed=EVAL_SEED_START,
        device=device,
        model_name=model_name,
        metrics=metrics,
        learned=arts,
        **(eval_kwargs or {}),
    )
    return {"report": rep.as_dict(), "rows": bench_rows(rep, nfes), "fits": fits, "solvers": arts}


def report_plots(
    rep: Report,
    model: Denoiser,
    out: str | Path,
    learned: Sequence[Any] = (),
    device: str = "cpu",
    show_nfe: int | None = None,
    n_show: int | None = None,
) -> list[Path]:
    """An evaluation's pictures: every metric against NFE, samples side by side (reference, best
    classic, best learned; the same noises) and each learned artifact's tables against its start.
    Under several processes every process takes part in the solves and rank 0 writes the pictures (the
    others return [])."""
    from .plots import METRIC_LABELS, metric_vs_nfe, sample_panels, solver_vs_start

    out = Path(out)
    paths = []
    main = current().main
    for metric in METRIC_LABELS:
        if main and any(r.get(metric) is not None for r in rep.rows):
            paths.append(metric_vs_nfe(rep.as_dict(), out / f"{metric}_vs_nfe.png", metric))
    asked = sorted(set(rep.nfes) | {int(s.nfe) for s in learned})
    show = show_nfe or (PREFERRED_NFE if PREFERRED_NFE in asked else asked[len(asked) // 2])
    shape = model.sample_shape or ()
    n_show = n_show or (36 if len(shape) == 3 else 1000)
    seeds = list(range(rep.seed, rep.seed + n_show))
    ref = rep.reference
    panels = []
    if ref["solver"] != "exact":
        panels.append(
            (
                f"reference {ref['solver']} ({ref['nfe']} NFE)",
                solve_batched(model, seeds, ref["solver"], ref["nfe"], device=device),
            )
        )
    b = rep.best_classic(show)
    if b:
        panels.append(
            (f"best classic {b.label} ({show} NFE)", solve_batched(model, seeds, b.label, show, device=device))
        )
    lrn = rep.best_learned(show)
    pick = [s for s in learned if int(s.nfe) == show and lrn is not None and s.name == lrn.solver]
    if pick:
        panels.append(
            (f"learned {pick[0].name} ({show} NFE)", solve_batched(model, seeds, pick[0], show, device=device))
        )
    if not main:
        return []
    if panels and model.decode is not None:  # a latent model: its decoded images
        with torch.no_grad():
            panels = [(title, model.decode(x)) for title, x in panels]
    if panels:
        paths.append(sample_panels(panels, out / f"samples_nfe{show}.png", title=f"{rep.model}: the same noises"))
    for s in learned:
        if isinstance(s, LoadedSolver):
            paths.append(solver_vs_start(s, out / f"{s.name}-nfe{s.nfe}_vs_start.png"))
    return paths


def format_bench(bench: dict[str, Any]) -> str:
    """Markdown table of a bench (see :func:`fewstep.report.render_bench_markdown`)."""
    return render_bench_markdown(bench)


def guidance_table(
    build: Callable[[float], Denoiser],
    fit_scale: float,
    scales: Sequence[float],
    nfe: int,
    method: str,
    out: str | Path,
    samples: int = 256,
    refit: bool = True,
    device: str = "cpu",
    progress: bool = True,
    fit_kwargs: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
    eval_kwargs: dict[str, Any] | None = None,
    reuse: bool = False,
) -> list[dict[str, Any]]:
    """A solver fitted at guidance ``fit_scale``, evaluated at every scale in ``scales``.

    ``build(w)`` returns the model guided at scale w. Each row: the scale, the best classic
    solver there, the solver fitted at ``fit_scale``, and (``refit``) one fitted at that scale.
    Artifacts go to ``out/<method>-nfe<N>-w<scale>``; with ``reuse``, finished ones are loaded.
    """
    out = Path(out)
    base, _, how = _fit_or_reuse(
        build(fit_scale), method, nfe, out / f"{method}-nfe{nfe}-w{fit_scale:g}", reuse, progress, device, fit_kwargs
    )
    log(f"{how} {method} at guidance {fit_scale:g}")
    base.name = f"{method} fitted at w={fit_scale:g}"
    # the table uses this solver at other scales on purpose, where the model's fingerprint may differ
    # (a diffusers model at w = 1 is unguided: one call per evaluation, another identity)
    base.force = True
    rows = []
    for w in scales:
        m = build(w)
        learned = [base]
        if refit and float(w) != float(fit_scale):
            own, _, how = _fit_or_reuse(
                m, method, nfe, out / f"{method}-nfe{nfe}-w{w:g}", reuse, progress, device, fit_kwargs
            )
            log(f"{how} {method} at guidance {w:g}")
            own.name = f"{method} fitted at w={w:g}"
            learned.append(own)
        rep = evaluate(m, nfe=nfe, samples=samples, device=device, learned=learned, **(eval_kwargs or {}))
        by_name = {r.solver: r for r in rep.rows if r.kind == "learned"}
        b = rep.best_classic(nfe)
        if b is None:
            raise FewstepError(
                f"guidance {w:g}: no classic solver ran at {nfe} NFE: nothing to compare the learned with"
            )
        assert b.rmse is not None  # best_of picks rows with an RMSE only
        fixed = _rmse_at(by_name[base.name], w)
        own = _rmse_at(by_name[learned[-1].name], w)
        rows.append(
            {
                "scale": float(w),
                "best_classic": b.label,
                "best_classic_rmse": b.rmse,
                "fitted_at": float(fit_scale),
                "learned_rmse": fixed,
                "refit_rmse": own,
                "ratio": fixed / b.rmse,
                "refit_ratio": own / b.rmse,
            }
        )
        log(f"guidance {w:g}: best classic {b.rmse:.4g}, fitted at {fit_scale:g} {fixed:.4g}, refit {own:.4g}")
    return rows


def _rmse_at(row: Row, scale: float) -> float:
    """The RMSE of a learned row of the guidance table; FewstepError when that solver did not run."""
    if row.rmse is None:
        raise FewstepError(f"guidance {scale:g}: the solver {row.solver} did not run: {row.error or 'no RMSE'}")
    return row.rmse


def format_guidance(rows: list[dict[str, Any]], nfe: int, method: str) -> str:
    """Markdown table of :func:`guidance_table` rows (see :func:`fewstep.report.render_guidance_markdown`)."""
    return render_guidance_markdown(rows, nfe, method)
