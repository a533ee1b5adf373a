"""``fewstep fit`` and ``fewstep show``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from .common import (
    CLASSES_OPT,
    DTYPE_OPT,
    EVAL_PROMPTS_OPT,
    GUIDANCE_OPT,
    HEIGHT_OPT,
    MODEL_HELP,
    PROMPTS_OPT,
    WIDTH_OPT,
    app,
    check_out_dir,
    cost_line,
    errors,
    eval_model,
    fail,
    load,
    nonneg_float,
    positive_float,
    print_report,
    setup,
)


@app.command("fit")
def fit_cmd(
    model: str = typer.Option(..., help=MODEL_HELP),
    method: str = typer.Option("s4s-alt", help="s4s, s4s-alt, dss or ld3"),
    nfe: int = typer.Option(5, min=1, help="NFE budget of the learned solver"),
    out: Path = typer.Option(..., help="output directory for the artifact"),
    teacher: str | None = typer.Option(None, help="teacher NAME@GRID:NFE (default: see docs)"),
    samples: int | None = typer.Option(None, min=1, help="training noises (default: the method's)"),
    val_samples: int | None = typer.Option(None, min=1, help="validation noises (checkpoint selection)"),
    confirm_samples: int | None = typer.Option(None, min=0, help="confirmation noises (does the fit beat its start?)"),
    budget: int | None = typer.Option(
        None,
        min=1,
        help="network evaluations the fit may spend (forward + "
        "backward, teacher included): noises, batch and steps "
        "are sized to it, and it is never exceeded",
    ),
    micro_batch: int | None = typer.Option(
        None,
        min=1,
        help="samples per forward/backward pass (gradients accumulate over the batch: memory of a micro-batch)",
    ),
    noise_groups: int | None = typer.Option(
        None,
        min=1,
        help="split every batch (and the validation noises) into "
        "this many groups by noise, each its own pass, summed "
        "in order: any number of processes up to it (torchrun) "
        "gives the same fit, bit for bit (default: one group "
        "per process)",
    ),
    seed: int = typer.Option(0, min=0, help="first training seed"),
    start: str | None = typer.Option(
        None,
        help="starting classic solver NAME@GRID (default: best on validation), or a learned-solver directory to refine",
    ),
    steps: int | None = typer.Option(None, min=1, help="optimisation steps"),
    batch: int | None = typer.Option(None, min=1, help="training noises per step"),
    lr_coef: float | None = typer.Option(
        None, callback=positive_float("--lr-coef"), help="learning rate of the coefficients"
    ),
    lr_grid: float | None = typer.Option(
        None, callback=positive_float("--lr-grid"), help="learning rate of the grid and evaluation times"
    ),
    k: int | None = typer.Option(None, min=1, help="past evaluations each step combines (S4S)"),
    loss: str = typer.Option("l2", help="l2 (per-sample L2 distance), mse or l1 (a callable, e.g. LPIPS, from Python)"),
    relax: float | None = typer.Option(
        None, callback=nonneg_float("--relax"), help="LD3 relaxation radius (relative to the noise norm; 0 off)"
    ),
    checkpoint: bool = typer.Option(
        False, "--checkpoint", help="recompute model activations in backward (saves memory; on by default on CUDA)"
    ),
    restart: bool = typer.Option(
        False,
        "--restart",
        help="ignore a checkpoint of an interrupted fit in OUT (or the "
        "finished artifact of this same fit) and fit from the start",
    ),
    guidance: str | None = GUIDANCE_OPT,
    prompts: Path | None = PROMPTS_OPT,
    eval_prompts: Path | None = EVAL_PROMPTS_OPT,
    classes: str | None = CLASSES_OPT,
    height: int | None = HEIGHT_OPT,
    width: int | None = WIDTH_OPT,
    dtype: str | None = DTYPE_OPT,
    eval_samples: int = typer.Option(256, min=0, help="held-out samples for the closing table (0: skip)"),
    as_json: bool = typer.Option(False, "--json", help="print the closing comparison as JSON"),
    device: str = typer.Option("cpu"),
    threads: int | None = typer.Option(None, min=1, help="torch threads"),
) -> None:
    """Fit a learned solver, write it to OUT, and compare it with the best classic solvers."""
    from ..evaluate import evaluate
    from ..fit.api import check_out, fit
    from ..seeds import EVAL_SEED_START

    device = setup(device, threads)
    check_out_dir(out, json_ok=True)
    with errors():
        check_out(out)  # a file of the user's is refused before the model loads
    over: dict[str, Any] = {  # FitConfig fields given on the command line (fit's **overrides)
        name: v
        for name, v in {
            "start": start,
            "steps": steps,
            "relax": relax,
            "batch": batch,
            "lr_coef": lr_coef,
            "lr_grid": lr_grid,
            "k": k,
            "samples": samples,
            "val_samples": val_samples,
            "confirm_samples": confirm_samples,
            "budget": budget,
            "micro_batch": micro_batch,
            "noise_groups": noise_groups,
        }.items()
        if v is not None
    }
    over.update(loss=loss)
    if checkpoint:
        over["use_checkpoint"] = True
    with errors():
        m = load(model, device, guidance, prompts, classes, height, width, dtype, role="fit")
        try:
            res = fit(
                m,
                method,
                nfe,
                out=out,
                teacher=teacher,
                seed=seed,
                progress=not as_json,
                device=device,
                resume=not restart,
                reuse=not restart,
                **over,
            )
        except KeyboardInterrupt:
            fail(f"interrupted: the fit's state is saved in {out}; run the same command again to resume", code=130)
    if res.outcome.resumed_from and not as_json:
        typer.echo(f"resumed an interrupted fit from step {res.outcome.resumed_from}")
    v = res.doc["validation"]
    if not as_json:
        e = v["estimate"]
        if res.reused:
            typer.echo(
                f"{res.path} already holds this fit (same model, settings, teacher and seeds): not fitted "
                f"again{', only the table runs' if eval_samples > 0 else ''} (--restart fits it again)"
            )
        else:
            typer.echo(f"wrote {res.path}  (start {res.doc['start']['solver']}; {res.doc['timing']['total_s']:.0f} s)")
        typer.echo(
            f"RMSE to the teacher on {e['noises']} {e['on']} noises: start {e['start_rmse_to_teacher']:.4g}"
            f" -> {e['rmse_to_teacher']:.4g} ± {e['sem']:.2g}{', kept the start' if v['kept_start'] else ''}"
            f" (validation, which chose the checkpoint: {v['rmse_to_teacher']:.4g})"
        )
        for note in v.get("notes") or []:
            typer.echo(f"note: {note}")
        typer.echo(cost_line(res.doc["cost"]))
    if eval_samples <= 0:
        if as_json:
            typer.echo(json.dumps({"artifact": str(res.path), "solver": res.doc}, indent=2))
        return
    with errors():
        rep = evaluate(
            eval_model(m, prompts, eval_prompts),
            nfe=nfe,
            solvers=None,
            samples=eval_samples,
            seed=EVAL_SEED_START,
            device=device,
            model_name=model,
            learned=[res.solver],
        )
    rep["results"] = sorted(rep["results"], key=lambda r: float("inf") if r["rmse"] is None else r["rmse"])
    rep["artifact"] = str(res.path)
    print_report(rep, as_json, top=6)


@app.command("show")
def show_cmd(
    path: Path = typer.Argument(..., help="learned-solver directory"), as_json: bool = typer.Option(False, "--json")
) -> None:
    """Print a learned solver's grid and coefficients next to the solver it started from."""
    from ..show import describe

    with errors():
        typer.echo(describe(path, as_json=as_json))
