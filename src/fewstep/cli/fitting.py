"""``fewstep fit`` and ``fewstep show``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    share,
)

if TYPE_CHECKING:
    from ..fit.api import FitResult


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
    polish: float | None = typer.Option(
        None,
        callback=share("--polish"),
        help="share of the steps in a last phase that moves every learned group at a tenth of the rates "
        "(default: the method's, 0.25 for s4s-alt and dss; 0 off)",
    ),
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
    eval_samples: int | None = typer.Option(
        None, min=0, help="held-out samples for the closing table (0: skip; default 256, a pipeline 32)"
    ),
    as_json: bool = typer.Option(False, "--json", help="print the closing comparison as JSON"),
    device: str = typer.Option("cpu"),
    threads: int | None = typer.Option(None, min=1, help="torch threads"),
) -> None:
    """Fit a learned solver, write it to OUT, and compare it with the best classic solvers."""
    from ..fit.api import check_out

    device = setup(device, threads)
    check_out_dir(out, json_ok=True)
    with errors():
        check_out(out)  # a file of the user's is refused before the model loads
    source = ModelArgs(model, guidance, prompts, eval_prompts, classes, height, width, dtype)
    settings = given(
        start=start,
        steps=steps,
        relax=relax,
        batch=batch,
        lr_coef=lr_coef,
        lr_grid=lr_grid,
        k=k,
        polish=polish,
        samples=samples,
        val_samples=val_samples,
        confirm_samples=confirm_samples,
        budget=budget,
        micro_batch=micro_batch,
        noise_groups=noise_groups,
        loss=loss,
        use_checkpoint=True if checkpoint else None,
    )
    request = FitRequest(method, nfe, out, teacher, seed, restart, settings)
    with errors():
        m = source.load(device)
        res = request.run(m, device, quiet=as_json)
    if not as_json:
        echo_fit(res, table=eval_samples != 0)
    if eval_samples != 0:
        closing_table(source, m, res, eval_samples, device, as_json)
    elif as_json:
        typer.echo(json.dumps({"artifact": str(res.path), "solver": res.doc}, indent=2))


@dataclass(frozen=True)
class ModelArgs:
    """The model a command names and what it is conditioned on, as the command line gives them."""

    spec: str
    guidance: str | None
    prompts: Path | None
    eval_prompts: Path | None
    classes: str | None
    height: int | None
    width: int | None
    dtype: str | None

    def load(self, device: str) -> Any:
        """The model a fit trains on (the fitting prompts)."""
        return load(
            self.spec,
            device,
            self.guidance,
            self.prompts,
            self.classes,
            self.height,
            self.width,
            self.dtype,
            role="fit",
        )

    def held_out(self, model: Any) -> Any:
        """The fitted ``model`` with the prompts the fit never saw (the closing table's)."""
        return eval_model(model, self.prompts, self.eval_prompts)


def given(**settings: Any) -> dict[str, Any]:
    """The fit settings given on the command line (:func:`fewstep.fit.api.fit`'s keywords): those not None."""
    return {name: v for name, v in settings.items() if v is not None}


@dataclass(frozen=True)
class FitRequest:
    """What ``fewstep fit`` fits: ``method`` at ``nfe`` into ``out`` from a teacher and a first seed, with the
    ``settings`` given (``restart``: ignore an interrupted or finished fit in ``out``)."""

    method: str
    nfe: int
    out: Path
    teacher: str | None
    seed: int
    restart: bool
    settings: dict[str, Any]

    def run(self, model: Any, device: str, quiet: bool) -> FitResult:
        """The :class:`~fewstep.fit.api.FitResult` (``quiet``: no progress); an interrupt is one line (the state
        is saved)."""
        from ..fit.api import fit

        try:
            return fit(
                model,
                self.method,
                self.nfe,
                out=self.out,
                teacher=self.teacher,
                seed=self.seed,
                progress=not quiet,
                device=device,
                resume=not self.restart,
                reuse=not self.restart,
                **self.settings,
            )
        except KeyboardInterrupt:
            fail(f"interrupted: the fit's state is saved in {self.out}; run the same command again to resume", code=130)
            raise  # not reached: fail() ends the command


def echo_fit(res: FitResult, table: bool) -> None:
    """What a fit did, in a few lines: resumed or reused, the artifact, its error against its start's, notes and
    cost (``table``: the closing table follows)."""
    if res.outcome.resumed_from:
        typer.echo(f"resumed an interrupted fit from step {res.outcome.resumed_from}")
    v = res.doc["validation"]
    e = v["estimate"]
    if res.reused:
        typer.echo(
            f"{res.path} already holds this fit (same model, settings, teacher and seeds): not fitted "
            f"again{', only the table runs' if table else ''} (--restart fits it again)"
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


def closing_table(
    source: ModelArgs, model: Any, res: FitResult, samples: int | None, device: str, as_json: bool
) -> None:
    """The fitted solver beside the classic solvers at its NFE on ``samples`` held-out noises (best first); on a
    pipeline (its network costs far more per evaluation) also its own scheduler, on fewer noises by default
    against a shorter reference (:mod:`fewstep.showcase`)."""
    from ..evaluate import evaluate
    from ..integrations.native import OwnScheduler
    from ..seeds import EVAL_SEED_START
    from ..showcase import PIPELINE_REFERENCE_NFE, PIPELINE_SAMPLES, is_pipeline

    pipeline = is_pipeline(model)
    extra: dict[str, Any] = {}
    if pipeline:
        extra = {"samplers": [OwnScheduler(res.solver.nfe)], "reference_nfe": PIPELINE_REFERENCE_NFE}
    with errors():
        rep = evaluate(
            source.held_out(model),
            nfe=res.solver.nfe,
            solvers=None,
            samples=samples or (PIPELINE_SAMPLES if pipeline else 256),
            seed=EVAL_SEED_START,
            device=device,
            model_name=source.spec,
            learned=[res.solver],
            **extra,
        )
    rep = rep.sorted_by_rmse()
    rep.extra["artifact"] = str(res.path)
    print_report(rep, as_json, top=6)


@app.command("show")
def show_cmd(
    path: Path = typer.Argument(..., help="learned-solver directory"), as_json: bool = typer.Option(False, "--json")
) -> None:
    """Print a learned solver's grid and coefficients next to the solver it started from."""
    from ..show import describe

    with errors():
        typer.echo(describe(path, as_json=as_json))
