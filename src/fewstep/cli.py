"""The ``fewstep`` command: eval, sample, fit, show, zoo."""

from __future__ import annotations

import json
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


def _load(spec: str, device: str, guidance: Optional[float] = None) -> Any:
    from .specs import load_model

    return load_model(spec, device=device, **({"guidance_scale": guidance} if guidance is not None else {}))


def _metrics(value: str) -> Any:
    return None if value.strip().lower() in ("none", "off", "") else value


def _fit_kwargs(steps: Optional[int], samples: int) -> dict[str, Any]:
    return {"samples": samples, **({"steps": steps} if steps else {})}


def resolve_solver(spec: str, force: bool = False) -> Any:
    """A classic 'NAME@GRID' string stays a string (its budget comes with --nfe); a path is a learned artifact."""
    from .solvers.resolve import is_artifact_spec, resolve_solver as resolve

    return resolve(spec, force=force) if is_artifact_spec(spec) else spec


FORCE_HELP = "use a learned solver even if it was fitted for another model or schedule"


def _print_report(report: dict[str, Any], as_json: bool, top: Optional[int] = None) -> None:
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    from .report import Report, render_rich

    render_rich(Report.from_dict(report), top)


@app.command("eval")
def eval_cmd(
    model: str = typer.Option(..., help="zoo:NAME, file.py:factory, package.module:factory, diffusers:DIR or torchcfm:NAME"),
    nfe: List[int] = typer.Option([5], help="NFE budget (repeat for several)"),
    solver: Optional[List[str]] = typer.Option(None, help="NAME@GRID or a learned-solver directory (repeatable); "
                                                          "default: every classic solver on every grid"),
    samples: int = typer.Option(256, help="held-out samples"),
    seed: Optional[int] = typer.Option(None, help="first per-sample seed (default: the evaluation range)"),
    reference: Optional[str] = typer.Option(None, help="reference solver NAME@GRID (default: a long classic solve)"),
    reference_nfe: Optional[int] = typer.Option(None, help="reference NFE"),
    metrics: str = typer.Option("auto", help="auto, none, or a comma list of fd,kid,fd_ref,psnr,swd,loglik"),
    feature: Optional[str] = typer.Option(None, help="feature network for FD/KID: digits, file.py:factory or "
                                                     "module:factory returning an nn.Module (e.g. Inception)"),
    guidance: Optional[float] = typer.Option(None, help="classifier-free guidance scale of the model"),
    plot: Optional[Path] = typer.Option(None, help="write PNGs here: metrics against NFE, samples side by side, "
                                                   "learned solvers against their start"),
    top: Optional[int] = typer.Option(None, help="show only the best TOP rows per NFE"),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
    device: str = typer.Option("cpu"),
    threads: Optional[int] = typer.Option(None, help="torch threads"),
) -> None:
    """Solvers against a converged reference on held-out noise: RMSE, and FD / KID / PSNR / SWD / loglik."""
    from .evaluate import evaluate
    from .seeds import EVAL_SEED_START

    _setup(device, threads)
    try:
        m = _load(model, device, guidance)
        feat = None
        if feature is not None:
            from .specs import load_feature

            feat = load_feature(feature, device)
        chosen = [resolve_solver(s, force) for s in solver] if solver else None
        classic = None if chosen is None else [s for s in chosen if isinstance(s, str)]
        learned = [] if chosen is None else [s for s in chosen if not isinstance(s, str)]
        rep = evaluate(m, nfe=nfe, solvers=classic, samples=samples,
                       seed=EVAL_SEED_START if seed is None else seed, reference=reference,
                       reference_nfe=reference_nfe, device=device, model_name=model, metrics=_metrics(metrics),
                       learned=learned, feature=feat)
        if plot is not None:
            from .bench import report_plots

            paths = report_plots(rep, m, plot, learned, device=device)
    except FewstepError as e:
        _fail(str(e))
    _print_report(rep, as_json, top)
    if plot is not None and not as_json:
        for p in paths:
            typer.echo(f"wrote {p}")


@app.command("sample")
def sample_cmd(
    model: str = typer.Option(..., help="model spec"),
    solver: Optional[str] = typer.Option(None, help="NAME@GRID or a learned-solver directory "
                                                    "(default: adams2@time for flows, dpmpp_3m@logsnr otherwise)"),
    nfe: int = typer.Option(5, help="NFE budget"),
    n: int = typer.Option(16, help="number of samples"),
    out: Path = typer.Option(..., help="output .safetensors file (a PNG grid is written beside it for images)"),
    seed: int = typer.Option(0, help="first per-sample seed"),
    guidance: Optional[float] = typer.Option(None, help="classifier-free guidance scale of the model"),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    device: str = typer.Option("cpu"),
) -> None:
    """Draw samples and write them (safetensors, plus a PNG grid for image-shaped models)."""
    from .io import save_samples
    from .evaluate import solve_batched

    _setup(device, None)
    try:
        m = _load(model, device, guidance)
        from .sampling import default_solver

        solver = solver or default_solver(m)
        s = resolve_solver(solver, force)
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
    val_samples: int = typer.Option(200, help="validation noises (checkpoint selection)"),
    confirm_samples: int = typer.Option(200, help="confirmation noises (does the fit beat its start?)"),
    seed: int = typer.Option(0, help="first training seed"),
    start: Optional[str] = typer.Option(None, help="starting classic solver NAME@GRID (default: best on validation), "
                                                   "or a learned-solver directory to refine"),
    steps: Optional[int] = typer.Option(None, help="optimisation steps"),
    batch: Optional[int] = typer.Option(None, help="training noises per step"),
    lr_coef: Optional[float] = typer.Option(None, help="learning rate of the coefficients"),
    lr_grid: Optional[float] = typer.Option(None, help="learning rate of the grid and evaluation times"),
    k: Optional[int] = typer.Option(None, help="past evaluations each step combines (S4S)"),
    loss: str = typer.Option("l2", help="l2 (per-sample L2 distance), mse or l1 (a callable, e.g. LPIPS, from Python)"),
    relax: Optional[float] = typer.Option(None, help="LD3 relaxation radius (relative to the noise norm; 0 off)"),
    checkpoint: bool = typer.Option(False, "--checkpoint", help="recompute model activations in backward (memory)"),
    restart: bool = typer.Option(False, "--restart", help="ignore a checkpoint of an interrupted fit in OUT and start over"),
    guidance: Optional[float] = typer.Option(None, help="fit at this classifier-free guidance scale"),
    eval_samples: int = typer.Option(256, help="held-out samples for the closing table (0: skip)"),
    as_json: bool = typer.Option(False, "--json", help="print the closing comparison as JSON"),
    device: str = typer.Option("cpu"),
    threads: Optional[int] = typer.Option(None, help="torch threads"),
) -> None:
    """Fit a learned solver, write it to OUT, and compare it with the best classic solvers."""
    from .evaluate import evaluate
    from .fit.api import fit
    from .seeds import EVAL_SEED_START

    _setup(device, threads)
    over = {name: v for name, v in {"start": start, "steps": steps, "relax": relax, "batch": batch, "lr_coef": lr_coef,
                                    "lr_grid": lr_grid, "k": k}.items() if v is not None}
    over.update(loss=loss, use_checkpoint=checkpoint)
    try:
        m = _load(model, device, guidance)
        res = fit(m, method, nfe, out=out, teacher=teacher, samples=samples, val_samples=val_samples,
                  confirm_samples=confirm_samples, seed=seed,
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
    if eval_samples <= 0 and as_json:
        typer.echo(json.dumps({"artifact": str(res.path), "solver": res.doc}, indent=2))
    if eval_samples > 0:
        try:
            rep = evaluate(m, nfe=nfe, solvers=None, samples=eval_samples, seed=EVAL_SEED_START, device=device,
                           model_name=model, learned=[res.solver])
        except FewstepError as e:
            _fail(str(e))
        rep["results"] = sorted(rep["results"], key=lambda r: float("inf") if r["rmse"] is None else r["rmse"])
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
    from .evaluate import evaluate
    from .fit.api import fit
    from .io import write_text
    from .plots import error_vs_nfe, solver_vs_start
    from .report import Report, render_versus
    from .seeds import EVAL_SEED_START

    _setup(device, None)
    try:
        m = _load(model, device)
        res = fit(m, method, nfe, out=out / f"{method}-nfe{nfe}", device=device)
        nfes = [3, 4, 5, 6, 8, 10]
        rep = evaluate(m, nfe=nfes, samples=samples, seed=EVAL_SEED_START, device=device, model_name=model,
                       learned=[res.solver])
        typed = Report.from_dict(rep)
        mine = typed.best_learned(nfe)
    except FewstepError as e:
        _fail(str(e))
    typer.echo(f"\nlearned solver written to {res.path}")
    typer.echo(f"held-out RMSE to the reference ({samples} samples, seeds from {EVAL_SEED_START}; "
               f"reference {rep['reference']['solver']} at {rep['reference']['nfe']} NFE, "
               f"self-error {rep['reference']['self_error']:.2g}):")
    for line in render_versus(typed, mine, nfes):
        typer.echo(line)
    png = error_vs_nfe(rep, out / "error_vs_nfe.png", title=f"{model}: held-out RMSE vs NFE")
    tables = solver_vs_start(res.solver, out / "solver_vs_start.png")
    write_text(out / "report.json", json.dumps(rep, indent=1))
    typer.echo(f"plots: {png} (error against NFE), {tables} (the learned solver against its start)")


@app.command("bench")
def bench_cmd(
    model: str = typer.Option(..., help="model spec"),
    nfe: List[int] = typer.Option([3, 4, 5, 6, 8, 10], help="NFE budgets (repeat)"),
    method: List[str] = typer.Option(["s4s-alt", "dss"], help="learned methods (repeat): s4s, s4s-alt, dss, ld3"),
    out: Path = typer.Option(Path("out/bench"), help="artifacts, bench.json and plots go here"),
    samples: int = typer.Option(256, help="held-out samples"),
    metrics: str = typer.Option("auto", help="auto, none, or a comma list of fd,kid,fd_ref,psnr,swd,loglik"),
    guidance: Optional[float] = typer.Option(None, help="classifier-free guidance scale"),
    steps: Optional[int] = typer.Option(None, help="optimisation steps per fit (default: the method's)"),
    fit_samples: int = typer.Option(700, help="training noises per fit"),
    plot: bool = typer.Option(False, "--plot", help="write PNGs into OUT"),
    reuse: bool = typer.Option(False, "--reuse", help="load the finished fits already in OUT (after an interruption)"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
    device: str = typer.Option("cpu"),
    threads: Optional[int] = typer.Option(None, help="torch threads"),
) -> None:
    """Fit learned solvers at every NFE and compare them with the best classic solver (any solver, any grid)."""
    from .bench import format_bench, report_plots, run_bench
    from .io import write_text

    _setup(device, threads)
    log = (lambda msg: typer.echo(msg, err=True))
    try:
        m = _load(model, device, guidance)
        b = run_bench(m, nfe, method, out, samples=samples, metrics=_metrics(metrics), device=device,
                      progress=not as_json, model_name=model, log=log, fit_kwargs=_fit_kwargs(steps, fit_samples),
                      reuse=reuse)
        paths = report_plots(b["report"], m, out, b["solvers"], device=device) if plot else []
    except FewstepError as e:
        _fail(str(e))
    b.pop("solvers")
    write_text(out / "bench.json", json.dumps(b, indent=1))
    if as_json:
        typer.echo(json.dumps(b, indent=1))
        return
    typer.echo(format_bench(b))
    for p in [out / "bench.json", *paths]:
        typer.echo(f"wrote {p}")


@app.command("guidance")
def guidance_cmd(
    model: str = typer.Option(..., help="model spec of a guided model (its factory takes guidance_scale)"),
    fit_scale: float = typer.Option(..., help="guidance scale the solver is fitted at"),
    scale: List[float] = typer.Option(..., help="guidance scales to evaluate at (repeat)"),
    nfe: int = typer.Option(5, help="NFE budget"),
    method: str = typer.Option("s4s-alt", help="learned method"),
    out: Path = typer.Option(Path("out/guidance"), help="artifacts go here"),
    samples: int = typer.Option(256, help="held-out samples per scale"),
    refit: bool = typer.Option(True, "--refit/--no-refit", help="also fit a solver at every scale, for comparison"),
    steps: Optional[int] = typer.Option(None, help="optimisation steps per fit (default: the method's)"),
    fit_samples: int = typer.Option(700, help="training noises per fit"),
    reuse: bool = typer.Option(False, "--reuse", help="load the finished fits already in OUT (after an interruption)"),
    as_json: bool = typer.Option(False, "--json"),
    device: str = typer.Option("cpu"),
    threads: Optional[int] = typer.Option(None, help="torch threads"),
) -> None:
    """How a solver fitted at one guidance scale does at others: when to refit."""
    from .bench import format_guidance, guidance_table

    _setup(device, threads)
    try:
        rows = guidance_table(lambda w: _load(model, device, w), fit_scale, scale, nfe, method, out, samples=samples,
                              refit=refit, device=device, progress=not as_json,
                              fit_kwargs=_fit_kwargs(steps, fit_samples),
                              log=lambda msg: typer.echo(msg, err=True), reuse=reuse)
    except FewstepError as e:
        _fail(str(e))
    typer.echo(json.dumps(rows, indent=1) if as_json else format_guidance(rows, nfe, method))


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
