"""``fewstep eval``, ``demo``, ``bench`` and ``guidance``: solvers measured side by side on held-out noise."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ..errors import FewstepError, NothingToRunError
from ..integrations.native import OwnScheduler
from .common import (
    CLASSES_OPT,
    DTYPE_OPT,
    EVAL_PROMPTS_OPT,
    FORCE_HELP,
    GUIDANCE_OPT,
    HEIGHT_OPT,
    MODEL_HELP,
    PROMPTS_OPT,
    SEED_MAX,
    SEED_RANGE_HELP,
    WIDTH_OPT,
    app,
    check_out_dir,
    errors,
    eval_model,
    fail,
    fit_kwargs,
    forced_warning,
    is_main,
    load,
    log_line,
    metrics_arg,
    print_report,
    setup,
    solver_option,
)

METRICS_HELP = "auto, none, or a comma list of fd,kid,fd_ref,psnr,swd,loglik"


@app.command("eval")
def eval_cmd(
    model: str = typer.Option(..., help=MODEL_HELP),
    nfe: list[int] = typer.Option([5], min=1, help="NFE budget (repeat for several)"),
    solver: list[str] | None = typer.Option(
        None, help="NAME@GRID or a learned-solver directory (repeatable); default: every classic solver on every grid"
    ),
    samples: int = typer.Option(256, min=1, help="held-out samples"),
    seed: int | None = typer.Option(
        None, min=0, max=SEED_MAX, help=f"first per-sample seed, {SEED_RANGE_HELP} (default: the evaluation range)"
    ),
    reference: str | None = typer.Option(None, help="reference solver NAME@GRID (default: a long classic solve)"),
    reference_nfe: int | None = typer.Option(None, min=1, help="reference NFE"),
    metrics: str = typer.Option("auto", help=METRICS_HELP),
    feature: str | None = typer.Option(
        None,
        help="feature network for FD/KID: digits, file.py:factory or "
        "module:factory returning an nn.Module (e.g. Inception; a "
        "factory spec runs that code)",
    ),
    guidance: str | None = GUIDANCE_OPT,
    prompts: Path | None = PROMPTS_OPT,
    eval_prompts: Path | None = EVAL_PROMPTS_OPT,
    classes: str | None = CLASSES_OPT,
    height: int | None = HEIGHT_OPT,
    width: int | None = WIDTH_OPT,
    dtype: str | None = DTYPE_OPT,
    plot: Path | None = typer.Option(
        None, help="write PNGs here: metrics against NFE, samples side by side, learned solvers against their start"
    ),
    top: int | None = typer.Option(None, min=1, help="show only the best TOP rows per NFE"),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
    device: str = typer.Option("cpu"),
    threads: int | None = typer.Option(None, min=1, help="torch threads"),
) -> None:
    """Solvers against a converged reference on held-out noise: RMSE, and FD / KID / PSNR / SWD / loglik.

    Exit code 1 when no requested solver could run."""
    from ..evaluate import evaluate
    from ..seeds import EVAL_SEED_START

    device = setup(device, threads)
    if plot is not None:
        check_out_dir(plot, "--plot")
    with errors():
        m = load(
            model, device, guidance, prompts, classes, height, width, dtype, role="eval", eval_prompts=eval_prompts
        )
        feat = None
        if feature is not None:
            from ..specs import load_feature

            feat = load_feature(feature, device)
        chosen = [solver_option(s, force) for s in solver] if solver else None
        classic = None if chosen is None else [s for s in chosen if isinstance(s, str)]
        learned = [] if chosen is None else [s for s in chosen if not isinstance(s, str)]
        if force:
            for s in learned:
                forced_warning(s, m, str(getattr(s, "path", None) or s.name))
        try:
            rep = evaluate(
                m,
                nfe=nfe,
                solvers=classic,
                samples=samples,
                seed=EVAL_SEED_START if seed is None else seed,
                reference=reference,
                reference_nfe=reference_nfe,
                device=device,
                model_name=model,
                metrics=metrics_arg(metrics),
                learned=learned,
                feature=feat,
            )
        except NothingToRunError as e:
            fail(str(e), code=1)
        paths = []
        if plot is not None:
            from ..bench import report_plots

            paths = report_plots(rep, m, plot, learned, device=device)
    print_report(rep, as_json, top)
    if not as_json:
        for p in paths:
            typer.echo(f"wrote {p}")
    if all(r.rmse is None for r in rep.rows if r.kind != "reference"):
        fail("no requested solver ran on this model (see the errors in the table)", code=1)


@app.command("demo")
def demo_cmd(
    model: str = typer.Option("zoo:digits-eps", help=MODEL_HELP),
    nfe: int = typer.Option(5, min=1, help="NFE of the learned solver"),
    method: str = typer.Option("s4s-alt"),
    out: Path = typer.Option(Path("out/demo"), help="output directory"),
    samples: int | None = typer.Option(
        None, min=1, help="held-out samples for the comparison (default 512; a pipeline: 32)"
    ),
    guidance: str | None = GUIDANCE_OPT,
    device: str = typer.Option("cpu"),
    threads: int | None = typer.Option(None, min=1, help="torch threads"),
) -> None:
    """The main job: fit a learned solver, compare it with every classic solver, plot error vs NFE. On a
    pipeline (zoo:scenes-*, diffusers:DIR) also its own scheduler, and a picture of the same held-out prompts."""
    from ..evaluate import evaluate
    from ..fit.api import fit
    from ..io import write_text
    from ..plots import error_vs_nfe, solver_vs_start
    from ..report import render_versus
    from ..seeds import EVAL_SEED_START
    from ..showcase import (
        PIPELINE_NFES,
        PIPELINE_REFERENCE_NFE,
        PIPELINE_SAMPLES,
        is_pipeline,
        picture_columns,
        pipeline_fit,
        pipeline_picture,
    )

    device = setup(device, threads)
    check_out_dir(out)
    with errors():
        m = load(model, device, guidance=guidance, role="fit")
        pipeline = is_pipeline(m)
        nfes = sorted({*PIPELINE_NFES, nfe}) if pipeline else [3, 4, 5, 6, 8, 10]
        n_eval = samples or (PIPELINE_SAMPLES if pipeline else 512)
        sizes = pipeline_fit(m) if pipeline else {}
        res = fit(m, method, nfe, out=out / f"{method}-nfe{nfe}", device=device, **sizes)
        held = eval_model(m, None, None)
        extra: dict = {"samplers": [OwnScheduler(nfe)], "reference_nfe": PIPELINE_REFERENCE_NFE} if pipeline else {}
        rep = evaluate(
            held,
            nfe=nfes,
            samples=n_eval,
            seed=EVAL_SEED_START,
            device=device,
            model_name=model,
            learned=[res.solver],
            **extra,
        )
        typer.echo(f"\nlearned solver written to {res.path}")
        typer.echo(
            f"held-out RMSE to the reference ({n_eval} samples, seeds from {EVAL_SEED_START}; "
            f"reference {rep.reference['solver']} at {rep.reference['nfe']} NFE, "
            f"self-error {rep.reference['self_error']:.2g}):"
        )
        mine = rep.best_learned(nfe)
        if mine is None:  # its solve failed on the held-out noise (e.g. NaN/inf): the row holds why
            why = next((r.error for r in rep.rows if r.kind == "learned" and r.error), "no result")
            raise FewstepError(f"the learned solver in {res.path} did not run on the held-out noise: {why}")
        for line in render_versus(rep, mine, nfes):
            typer.echo(line)
        if pipeline:
            own = next((r for r in rep.rows if r.grid == OwnScheduler.grid_label and r.rmse is not None), None)
            if own is not None:
                typer.echo(f"  the pipeline's own scheduler ({own.solver}) at NFE {own.nfe}: RMSE {own.rmse:.4g}")
        if not is_main():
            return
        png = error_vs_nfe(rep.as_dict(), out / "error_vs_nfe.png", title=f"{model}: held-out RMSE vs NFE")
        tables = solver_vs_start(res.solver, out / "solver_vs_start.png")
        write_text(out / "report.json", json.dumps(rep.as_dict(), indent=1))
        if pipeline:
            seeds = list(range(EVAL_SEED_START, EVAL_SEED_START + min(8, n_eval)))
            pic, txt = pipeline_picture(held, seeds, picture_columns(rep, res.solver, nfe), out / "samples.png")
            typer.echo(f"picture: {pic} (rows: reference, own scheduler, best classic, learned; {txt} names them)")
    typer.echo(f"plots: {png} (error against NFE), {tables} (the learned solver against its start)")


@app.command("bench")
def bench_cmd(
    model: str = typer.Option(..., help=MODEL_HELP),
    nfe: list[int] = typer.Option([3, 4, 5, 6, 8, 10], min=1, help="NFE budgets (repeat)"),
    method: list[str] = typer.Option(["s4s-alt", "dss"], help="learned methods (repeat): s4s, s4s-alt, dss, ld3"),
    out: Path = typer.Option(Path("out/bench"), help="artifacts, bench.json and plots go here"),
    samples: int = typer.Option(256, min=1, help="held-out samples"),
    metrics: str = typer.Option("auto", help=METRICS_HELP),
    guidance: str | None = GUIDANCE_OPT,
    prompts: Path | None = PROMPTS_OPT,
    eval_prompts: Path | None = EVAL_PROMPTS_OPT,
    classes: str | None = CLASSES_OPT,
    height: int | None = HEIGHT_OPT,
    width: int | None = WIDTH_OPT,
    dtype: str | None = DTYPE_OPT,
    steps: int | None = typer.Option(None, min=1, help="optimisation steps per fit (default: the method's)"),
    fit_samples: int | None = typer.Option(None, min=1, help="training noises per fit (default: the method's)"),
    plot: bool = typer.Option(False, "--plot", help="write PNGs into OUT"),
    reuse: bool = typer.Option(
        False,
        "--reuse",
        help="load the finished fits already in OUT whose settings match "
        "(after an interruption); others are fitted again",
    ),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
    device: str = typer.Option("cpu"),
    threads: int | None = typer.Option(None, min=1, help="torch threads"),
) -> None:
    """Fit learned solvers at every NFE and compare them with the best classic solver (any solver, any grid)."""
    from ..bench import format_bench, report_plots, run_bench
    from ..io import write_text
    from ..report import Report

    device = setup(device, threads)
    check_out_dir(out)
    log = log_line
    with errors():
        m = load(model, device, guidance, prompts, classes, height, width, dtype, role="fit")
        b = run_bench(
            m,
            nfe,
            method,
            out,
            eval_model=eval_model(m, prompts, eval_prompts),
            samples=samples,
            metrics=metrics_arg(metrics),
            device=device,
            progress=not as_json,
            model_name=model,
            log=log,
            fit_kwargs=fit_kwargs(steps, fit_samples),
            reuse=reuse,
        )
        paths = report_plots(Report.from_dict(b["report"]), m, out, b["solvers"], device=device) if plot else []
        b.pop("solvers")
        if is_main():
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
    scale: list[float] = typer.Option(..., help="guidance scales to evaluate at (repeat)"),
    nfe: int = typer.Option(5, min=1, help="NFE budget"),
    method: str = typer.Option("s4s-alt", help="learned method"),
    out: Path = typer.Option(Path("out/guidance"), help="artifacts go here"),
    samples: int = typer.Option(256, min=1, help="held-out samples per scale"),
    refit: bool = typer.Option(True, "--refit/--no-refit", help="also fit a solver at every scale, for comparison"),
    steps: int | None = typer.Option(None, min=1, help="optimisation steps per fit (default: the method's)"),
    fit_samples: int | None = typer.Option(None, min=1, help="training noises per fit (default: the method's)"),
    reuse: bool = typer.Option(False, "--reuse", help="load the finished fits already in OUT whose settings match"),
    as_json: bool = typer.Option(False, "--json"),
    device: str = typer.Option("cpu"),
    threads: int | None = typer.Option(None, min=1, help="torch threads"),
) -> None:
    """How a solver fitted at one guidance scale does at others: when to refit."""
    from ..bench import format_guidance, guidance_table

    device = setup(device, threads)
    check_out_dir(out)
    with errors():
        rows = guidance_table(
            lambda w: load(model, device, str(w)),
            fit_scale,
            scale,
            nfe,
            method,
            out,
            samples=samples,
            refit=refit,
            device=device,
            progress=not as_json,
            fit_kwargs=fit_kwargs(steps, fit_samples),
            log=log_line,
            reuse=reuse,
        )
    typer.echo(json.dumps(rows, indent=1) if as_json else format_guidance(rows, nfe, method))
