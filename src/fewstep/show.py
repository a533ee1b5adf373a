"""Human-readable view of a learned solver next to the classic solver it started from."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import FewstepError
from .solvers.artifact import LoadedSolver, load_solver
from .solvers.kernel import Tableau
from .solvers.resolve import resolve_solver


def _fmt_row(v: list[float]) -> str:
    return " ".join(f"{x:+.4f}" if x != 0 else "   .   " for x in v)


def start_tableau(solver: LoadedSolver) -> Tableau | None:
    """The tableau of the solver a learned artifact started from: a classic NAME@GRID, or the learned
    artifact it refined (None if unknown or gone)."""
    spec = (solver.doc.get("start") or {}).get("solver")
    if not spec:
        return None
    try:
        return resolve_solver(spec, solver.schedule, solver.nfe, force=True).tableau(solver.schedule)
    except (FewstepError, OSError):  # a start that no longer builds is only not shown
        return None


def describe(path: str | Path, as_json: bool = False) -> str:
    """Grid, evaluation times and normalised coefficients of the artifact and of its start."""
    s = load_solver(path)
    doc = s.doc
    tab = s.tableau()
    start_spec = (doc.get("start") or {}).get("solver")
    start_tab = start_tableau(s)
    if as_json:
        out = {
            "learned": {
                "grid": tab.t.tolist(),
                "eval_times": tab.eval_times.tolist(),
                "a": tab.a.tolist(),
                "B": tab.B.tolist(),
                "C": None if tab.C is None else tab.C.tolist(),
            },
            "start": None
            if start_tab is None
            else {
                "solver": start_spec,
                "grid": start_tab.t.tolist(),
                "a": start_tab.a.tolist(),
                "B": start_tab.B.tolist(),
                "C": None if start_tab.C is None else start_tab.C.tolist(),
            },
            "validation": doc.get("validation"),
            "method": doc["method"],
            "nfe": doc["nfe"],
        }
        return json.dumps(out, indent=1)
    lines = [
        f"{Path(path)}: {doc['method']} solver, {doc['nfe']} NFE, basis {tab.basis}, "
        f"model {doc['model'].get('name')} ({doc['model']['fingerprint']}), schedule {s.schedule.describe()}"
    ]
    v = doc.get("validation") or {}
    e = v.get("estimate") if isinstance(v.get("estimate"), dict) else None
    if e:
        lines.append(
            f"RMSE to teacher on {e.get('noises')} {e.get('on')} noises {e.get('rmse_to_teacher', float('nan')):.4g}"
            f" ± {e.get('sem', float('nan')):.2g} (start {e.get('start_rmse_to_teacher', float('nan')):.4g}; "
            f"teacher {doc.get('teacher', {}).get('spec')})"
        )
    elif v:
        lines.append(
            f"validation RMSE to teacher {v.get('rmse_to_teacher', float('nan')):.4g} "
            f"(start {v.get('start_rmse_to_teacher', float('nan')):.4g}; teacher {doc.get('teacher', {}).get('spec')})"
        )
    lines.append("")
    lines.append(f"{'i':>3} {'t learned':>12} {'eval time':>12} {'t start':>12} {'lambda learned':>15}")
    lam = s.schedule.lambda_(tab.t)
    for i in range(tab.N + 1):
        c = f"{float(tab.eval_times[i]):12.6g}" if i < tab.N else f"{'':>12}"
        st = f"{float(start_tab.t[i]):12.6g}" if start_tab is not None else f"{'':>12}"
        lines.append(f"{i:>3} {float(tab.t[i]):12.6g} {c} {st} {float(lam[i]):15.4f}")
    lines.append("")
    lines.append(f"carried state a_i (x_(i+1) = a_i x_i + ...), learned vs start {start_spec}:")
    lines.append(f"     learned {_fmt_row(tab.a.tolist())}")
    if start_tab is not None:
        lines.append(f"     start   {_fmt_row(start_tab.a.tolist())}")
    lines.append(f"predictor coefficients B (row i: weights on F_0..F_i), learned vs start {start_spec}:")
    for i in range(tab.N):
        lines.append(f"  {i:>2} learned {_fmt_row(tab.B[i, : i + 1].tolist())}")
        if start_tab is not None:
            lines.append(f"     start   {_fmt_row(start_tab.B[i, : i + 1].tolist())}")
    if tab.C is not None:
        lines.append("corrector coefficients C (row i: weights on F_0..F_{i+1}):")
        for i in range(tab.N - 1):
            lines.append(f"  {i:>2} learned {_fmt_row(tab.C[i, : i + 2].tolist())}")
            if start_tab is not None and start_tab.C is not None:
                lines.append(f"     start   {_fmt_row(start_tab.C[i, : i + 2].tolist())}")
    return "\n".join(lines)
