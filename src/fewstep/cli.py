"""The ``fewstep`` command: eval, sample, fit, show, zoo."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, List, Optional

try:
    import typer
except ImportError:  # pragma: no cover - the cli extra is missing
    sys.stderr.write("the fewstep command needs its CLI extra: pip install 'fewstep[cli]'\n")
    raise SystemExit(2)

from .errors import FewstepError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Learned few-step solvers for diffusion and flow models.")


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def _setup(device: str, threads: Optional[int]) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    if device.startswith("cuda") and not torch.cuda.is_available():
        _fail(f"--device {device}: CUDA is not available on this machine; use --device cpu")


def resolve_solver(spec: str) -> Any:
    """A classic 'NAME@GRID' string, or a learned-solver artifact directory/file."""
    p = Path(spec)
    if p.exists() and (p.is_dir() or p.suffix == ".json"):
        from .solvers.learned import load_solver

        return load_solver(p)
    return spec


def _print_report(report: dict[str, Any], as_json: bool, top: Optional[int] = None) -> None:
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        from .evaluate import format_table

        typer.echo(format_table(report, top))
        return
    ref = report["reference"]
    table = Table(title=f"{report['model']}: RMSE to reference on {report['samples']} held-out samples "
                        f"(seeds from {report['seed']})",
                  caption=f"reference {ref['solver']} at {ref['nfe']} NFE, self-error {ref['self_error']:.3g}")
    for col, just in (("solver", "left"), ("grid", "left"), ("NFE", "right"), ("RMSE", "right"), ("± sem", "right")):
        table.add_column(col, justify=just)
    shown: dict[int, int] = {}
    for r in report["results"]:
        shown[r["nfe"]] = shown.get(r["nfe"], 0) + 1
        if top is not None and shown[r["nfe"]] > top:
            continue
        if r["rmse"] is None:
            table.add_row(r["solver"], str(r["grid"]), str(r["nfe"]), "—", (r.get("error") or "")[:50])
        else:
            table.add_row(r["solver"], str(r["grid"]), str(r["nfe"]), f"{r['rmse']:.4g}", f"{r['rmse_sem']:.2g}")
    Console().print(table)


@app.command("eval")
def eval_cmd(
    model: str = typer.Option(..., help="zoo:NAME, file.py:factory, package.module:factory or diffusers:DIR"),
    nfe: List[int] = typer.Option([5], help="NFE budget (repeat for several)"),
    solver: Optional[List[str]] = typer.Option(None, help="NAME@GRID or a learned-solver directory (repeatable); "
                                                          "default: every classic solver on every grid"),
    samples: int = typer.Option(256, help="held-out samples"),
    seed: Optional[int] = typer.Option(None, help="first per-sample seed (default: the evaluation range)"),
    reference: Optional[str] = typer.Option(None, help="reference solver NAME@GRID (default: a long classic solve)"),
    reference_nfe: Optional[int] = typer.Option(None, help="reference NFE"),
    top: Optional[int] = typer.Option(None, help="show only the best TOP rows per NFE"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
    device: str = typer.Option("cpu"),
    threads: Optional[int] = typer.Option(None, help="torch threads"),
) -> None:
    """RMSE of solvers against a converged reference on held-out noise."""
    from .evaluate import evaluate
    from .seeds import EVAL_SEED_START
    from .specs import load_model

    _setup(device, threads)
    try:
        m = load_model(model, device=device)
        solvers = [resolve_solver(s) for s in solver] if solver else None
        rep = evaluate(m, nfe=nfe, solvers=solvers, samples=samples,
                       seed=EVAL_SEED_START if seed is None else seed, reference=reference,
                       reference_nfe=reference_nfe, device=device, model_name=model)
    except FewstepError as e:
        _fail(str(e))
    _print_report(rep, as_json, top)


@app.command("sample")
def sample_cmd(
    model: str = typer.Option(..., help="model spec"),
    solver: str = typer.Option("dpmpp_3m@logsnr", help="NAME@GRID or a learned-solver directory"),
    nfe: int = typer.Option(5, help="NFE budget"),
    n: int = typer.Option(16, help="number of samples"),
    out: Path = typer.Option(..., help="output .safetensors file (a PNG grid is written beside it for images)"),
    seed: int = typer.Option(0, help="first per-sample seed"),
    device: str = typer.Option("cpu"),
) -> None:
    """Draw samples and write them (safetensors, plus a PNG grid for image-shaped models)."""
    from .io import save_samples
    from .evaluate import solve_batched
    from .specs import load_model

    _setup(device, None)
    try:
        m = load_model(model, device=device)
        s = resolve_solver(solver)
        x = solve_batched(m, list(range(seed, seed + n)), s, nfe, device=device)
        paths = save_samples(x, out, meta={"model": model, "solver": solver, "nfe": str(nfe), "seed": str(seed)})
    except FewstepError as e:
        _fail(str(e))
    for p in paths:
        typer.echo(f"wrote {p}")


@app.command("fit")
def fit_cmd(
    model: str = typer.Option(..., help="model spec"),
    method: str = typer.Option("s4s-alt", help="s4s, s4s-alt, dss or ld3"),
    nfe: int = typer.Option(5, help="NFE budget of the learned solver"),
    out: Path = typer.Option(..., help="output directory for the artifact"),
    teacher: Optional[str] = typer.Option(None, help="teacher NAME@GRID:NFE (default: see docs)"),
    samples: int = typer.Option(700, help="training noises"),
    val_samples: int = typer.Option(200, help="validation noises"),
    seed: int = typer.Option(0, help="first training seed"),
    start: Optional[str] = typer.Option(None, help="starting classic solver NAME@GRID (default: best on validation)"),
    steps: Optional[int] = typer.Option(None, help="optimisation steps"),
    loss: str = typer.Option("l2", help="l2 or l1 (a callable from Python)"),
    relax: Optional[float] = typer.Option(None, help="LD3 relaxation radius (relative to the noise norm; 0 off)"),
    checkpoint: bool = typer.Option(False, "--checkpoint", help="recompute model activations in backward (memory)"),
    restart: bool = typer.Option(False, "--restart", help="ignore a checkpoint of an interrupted fit in OUT and start over"),
    eval_samples: int = typer.Option(256, help="held-out samples for the closing table (0: skip)"),
    as_json: bool = typer.Option(False, "--json", help="print the closing comparison as JSON"),
    device: str = typer.Option("cpu"),
    threads: Optional[int] = typer.Option(None, help="torch threads"),
) -> None:
    """Fit a learned solver, write it to OUT, and compare it with the best classic solvers."""
    from .evaluate import evaluate
    from .fit.api import fit
    from .seeds import EVAL_SEED_START
    from .specs import load_model

    _setup(device, threads)
    over = {k: v for k, v in {"start": start, "steps": steps, "relax": relax}.items() if v is not None}
    over.update(loss=loss, use_checkpoint=checkpoint)
    try:
        m = load_model(model, device=device)
        res = fit(m, method, nfe, out=out, teacher=teacher, samples=samples, val_samples=val_samples, seed=seed,
                  progress=not as_json, device=device, resume=not restart, **over)
    except FewstepError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        typer.echo(f"\ninterrupted: the fit's state is saved in {out}; run the same command again to resume", err=True)
        raise typer.Exit(130)
    if res.outcome.resumed_from and not as_json:
        typer.echo(f"resumed an interrupted fit from step {res.outcome.resumed_from}")
    v = res.doc["validation"]
    if not as_json:
        typer.echo(f"wrote {res.path}  (start {res.doc['start']['solver']}: validation RMSE to teacher "
                   f"{v['start_rmse_to_teacher']:.4g} -> {v['rmse_to_teacher']:.4g}"
                   f"{', kept the start' if v['kept_start'] else ''}; {res.doc['timing']['total_s']:.0f} s)")
    if eval_samples > 0:
        try:
            rep = evaluate(m, nfe=nfe, solvers=None, samples=eval_samples, seed=EVAL_SEED_START, device=device,
                           model_name=model)
            mine = evaluate(m, nfe=nfe, solvers=[res.solver], samples=eval_samples, seed=EVAL_SEED_START,
                            device=device, model_name=model)
        except FewstepError as e:
            _fail(str(e))
        rep["results"] = sorted(mine["results"] + rep["results"],
                                key=lambda r: float("inf") if r["rmse"] is None else r["rmse"])
        rep["artifact"] = str(res.path)
        _print_report(rep, as_json, top=6)


@app.command("show")
def show_cmd(path: Path = typer.Argument(..., help="learned-solver directory"),
             as_json: bool = typer.Option(False, "--json")) -> None:
    """Print a learned solver's grid and coefficients next to the solver it started from."""
    from .show import describe

    try:
        typer.echo(describe(path, as_json=as_json))
    except FewstepError as e:
        _fail(str(e))


@app.command("demo")
def demo_cmd(
    model: str = typer.Option("zoo:digits-eps", help="model spec"),
    nfe: int = typer.Option(5, help="NFE of the learned solver"),
    method: str = typer.Option("s4s-alt"),
    out: Path = typer.Option(Path("out/demo"), help="output directory"),
    samples: int = typer.Option(512, help="held-out samples for the comparison"),
    device: str = typer.Option("cpu"),
) -> None:
    """The main job: fit a learned solver, compare it with every classic solver, plot error vs NFE."""
    from .evaluate import best_classic, evaluate
    from .fit.api import fit
    from .plots import error_vs_nfe
    from .seeds import EVAL_SEED_START
    from .specs import load_model

    _setup(device, None)
    try:
        m = load_model(model, device=device)
        res = fit(m, method, nfe, out=out / f"{method}-nfe{nfe}", device=device)
        nfes = [3, 4, 5, 6, 8, 10]
        rep = evaluate(m, nfe=nfes, samples=samples, seed=EVAL_SEED_START, device=device, model_name=model)
        mine = evaluate(m, nfe=nfe, solvers=[res.solver], samples=samples, seed=EVAL_SEED_START, device=device,
                        model_name=model)["results"][0]
    except FewstepError as e:
        _fail(str(e))
    typer.echo(f"\nlearned solver written to {res.path}")
    typer.echo(f"held-out RMSE to the reference ({samples} samples, seeds from {EVAL_SEED_START}; "
               f"reference {rep['reference']['solver']} at {rep['reference']['nfe']} NFE, "
               f"self-error {rep['reference']['self_error']:.2g}):")
    typer.echo(f"  {'solver':<28}{'NFE':>4}{'RMSE':>10}{'vs learned':>12}")
    typer.echo(f"  {method + ' (learned)':<28}{nfe:>4}{mine['rmse']:>10.4g}{1.0:>11.2f}x")
    for n in nfes:
        b = best_classic(rep["results"], n)
        if b:
            typer.echo(f"  {'best classic: ' + b['solver'] + '@' + str(b['grid']):<28}{n:>4}{b['rmse']:>10.4g}"
                       f"{b['rmse'] / mine['rmse']:>11.2f}x")
    png = error_vs_nfe(rep, out / "error_vs_nfe.png", learned=[mine], title=f"{model}: held-out RMSE vs NFE")
    (out / "report.json").write_text(json.dumps({"classic": rep, "learned": mine}, indent=1))
    typer.echo(f"plot: {png}")


@app.command("zoo")
def zoo_cmd() -> None:
    """List the built-in models."""
    from . import zoo

    for name in zoo.NAMES:
        typer.echo(f"zoo:{name}")


def main() -> None:
    try:
        app()
    except FewstepError as e:  # pragma: no cover - safety net
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
