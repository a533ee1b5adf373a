"""Measuring solvers: per-sample RMSE to a converged reference on held-out seeds, and optional metrics.

The reference is a long classic solve (or the model's exact solution where it has one); its
own error is reported as the RMSE between it and the same solve at twice the steps.
Noise comes from per-sample seeds (``Denoiser.noise``), so nothing depends on batch size.

With ``metrics=`` (see :mod:`fewstep.metrics.suite`) every row also gets Frechet distance /
KID, PSNR, sliced Wasserstein and exact log-likelihood where they suit the model, and the
results gain a first row for the reference solve itself (``"role": "reference"``): its
distribution metrics against the same data reference set are the floor for every solver
(model error plus the finite-sample bias at these sample counts), its RMSE is its self-error.

Under several processes (``torchrun``, :mod:`fewstep.distributed`) every solve is shared out by seed and
gathered in seed order, and rank 0 computes the metrics: the report does not depend on the number of
processes, and every process returns it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .denoiser import Denoiser
from .distributed import current
from .errors import ArtifactError, FewstepError, NothingToRunError, SolverNameError
from .grids import grid_names
from .metrics.pixel import per_sample_rmse
from .metrics.reference import DataReference, model_data, user_data
from .metrics.suite import DISTRIBUTION, ROW_KEYS, MetricSuite, parse_metrics, select_metrics
from .report import FD_REF_NOTE, Report, Row, RowKind, render_plain
from .sampling import sample
from .seeds import EVAL_SEED_START, check_seeds
from .solvers.artifact import LoadedSolver
from .solvers.registry import ALL_GRIDS, classic_default, classic_specs
from .solvers.resolve import Solver, resolve_solver, some_scale


def default_reference(model: Denoiser) -> tuple[str, int]:
    """A converged reference solve: (NAME@GRID, NFE)."""
    name, grid, nfe = classic_default(model.schedule, "reference")
    return f"{name}@{grid}", nfe


def check_held_out(solver: Any, lo: int, hi: int) -> None:
    """Refuse to score a learned solver on seeds [lo, hi) that it was fitted or selected on."""
    if not isinstance(solver, LoadedSolver):
        return
    teacher = solver.doc.get("teacher") or {}
    for what in ("train_seeds", "val_seeds", "confirm_seeds"):
        a, b = teacher.get(what) or (0, 0)
        if a < hi and lo < b:
            raise FewstepError(
                f"evaluation seeds [{lo}, {hi}) overlap the {what.replace('_', ' ')} [{a}, {b}) that "
                f"{solver.path or solver.name} was fitted on: numbers on those noises are not "
                f"results; evaluate on seeds from {EVAL_SEED_START} (the default)"
            )


def per_seed(model: Denoiser, seeds: Sequence[int], fn: Callable[[list[int]], Tensor]) -> Tensor:
    """``fn(seeds)`` (rows in seed order, on the CPU) computed under several processes by each on its share of
    the seeds (positions rank, rank + world, ...) and gathered in seed order: every process gets all rows."""
    d = current()
    seeds = list(seeds)
    if d.world == 1:
        return fn(seeds)
    mine = d.share(seeds)
    local = d.agree(lambda: fn(mine) if mine else torch.zeros((0, *(model.sample_shape or ()))))
    return d.gather_rows(local, len(seeds))


def solve_batched(
    model: Denoiser,
    seeds: Sequence[int],
    solver: Any,
    nfe: int | None,
    grid: Any = "logsnr",
    batch_size: int = 500,
    device: str | torch.device = "cpu",
) -> Tensor:
    """Samples for ``seeds`` with ``solver`` in batches; identical for any batch size and, under several
    processes (each solves its share of the seeds; every process gets all samples), for any number of them."""

    def solve(chunk_seeds: list[int]) -> Tensor:
        outs = []
        with torch.no_grad():
            for k in range(0, len(chunk_seeds), batch_size):
                chunk = chunk_seeds[k : k + batch_size]
                noise = model.noise(chunk, device)
                x = sample(model, noise, solver, nfe=nfe, grid=grid, cond=model.cond_for(chunk, device))
                assert isinstance(x, Tensor)  # no trajectory asked for
                outs.append(x.cpu())
        return torch.cat(outs)

    return per_seed(model, seeds, solve)


def _reference_pair(
    model: Denoiser,
    seeds: Sequence[int],
    reference: str | None,
    nfe: int | None,
    batch_size: int,
    device: str | torch.device,
    twice: bool = True,
) -> tuple[Tensor, Tensor, str, int]:
    """(reference samples, the same solve at half the steps, solver label, NFE); exact models: both exact."""
    exact = getattr(model, "exact_solution", None)
    if reference is None and exact is not None:

        def solve(chunk: list[int]) -> Tensor:
            with torch.no_grad():
                return exact(model.noise(chunk, device) * model.schedule.init_noise_scale()).cpu()

        ref = per_seed(model, seeds, solve)
        return ref, ref, "exact", 0
    d_spec, d_nfe = default_reference(model)
    spec, n = reference or d_spec, int(nfe or d_nfe)
    ref2 = solve_batched(model, seeds, spec, 2 * n, batch_size=batch_size, device=device)
    ref = solve_batched(model, seeds, spec, n, batch_size=batch_size, device=device) if twice else ref2
    return ref2, ref, spec, 2 * n


def reference_samples(
    model: Denoiser,
    seeds: Sequence[int],
    reference: str | None = None,
    nfe: int | None = None,
    batch_size: int = 500,
    device: str | torch.device = "cpu",
) -> tuple[Tensor, dict[str, Any]]:
    """Reference samples and {"solver", "nfe", "self_error"}."""
    ref2, ref, spec, n = _reference_pair(model, seeds, reference, nfe, batch_size, device)
    return ref2, {"solver": spec, "nfe": n, "self_error": float(per_sample_rmse(ref, ref2).mean())}


@dataclass
class Run:
    """What one solver did on the evaluation noise: its report row and (if kept) its samples."""

    row: Row
    samples: Tensor | None = field(default=None, repr=False)

    @property
    def rmse(self) -> float | None:
        return self.row.rmse


def run_solver(
    model: Denoiser,
    seeds: Sequence[int],
    solver: Any,
    nfe: int,
    ref: Tensor,
    batch_size: int = 500,
    device: str | torch.device = "cpu",
    keep_samples: bool = False,
    kind: RowKind | None = None,
) -> Run:
    """Evaluate one solver. A solver that cannot run on this model records its error in the row instead
    of raising; a solver that names nothing runnable (an unknown name, another model's artifact) raises.
    A :class:`Sampler` (e.g. a pipeline's own scheduler) is run as it is, at its own NFE."""
    if isinstance(solver, Sampler):
        return _run_sampler(model, seeds, solver, ref, device, keep_samples, kind)
    if isinstance(solver, str) and "@" in solver:
        name, grid = solver.split("@", 1)
    else:
        name, grid = str(solver), None
    try:
        s: Solver = resolve_solver(solver, model, nfe)
        name, grid = s.name, s.grid_label
        used = s.tableau(model, w=some_scale(model, s)).N
    except (ArtifactError, SolverNameError):
        raise  # the user named something that cannot run on this model: stop, do not tabulate
    except FewstepError as e:
        return Run(Row(kind or "classic", name, grid, nfe, error=str(e)))
    row_kind: RowKind = kind or ("learned" if s.kind == "learned" else "classic")
    t0 = time.perf_counter()
    try:
        x = solve_batched(model, seeds, s, used, batch_size=batch_size, device=device)
    except (ArtifactError, SolverNameError):
        raise
    except FewstepError as e:
        return Run(Row(row_kind, name, grid, used, error=str(e)))
    secs = time.perf_counter() - t0
    r = per_sample_rmse(x, ref)
    sem = float(r.std() / math.sqrt(len(r))) if len(r) > 1 else 0.0
    row = Row(row_kind, name, grid, used, float(r.mean()), sem, secs, artifact=_folder(getattr(s, "path", None)))
    return Run(row, x if keep_samples else None)


def _folder(path: Any) -> str | None:
    """A learned solver's artifact folder (its ``path`` may name the folder or its solver.json)."""
    if path is None:
        return None
    p = Path(path)
    return str(p.parent if p.name == "solver.json" else p)


@runtime_checkable
class Sampler(Protocol):
    """Something that is not a fewstep tableau but makes samples at a fixed NFE (a pipeline's own scheduler:
    :class:`fewstep.integrations.native.OwnScheduler`); measured beside the solvers, in a row of its own."""

    @property
    def nfe(self) -> int: ...

    @property
    def grid_label(self) -> str: ...

    def label(self, model: Denoiser) -> str:
        """The row's solver name."""
        ...

    def samples(self, model: Denoiser, seeds: Sequence[int], device: str | torch.device = "cpu") -> Tensor:
        """Samples of ``seeds`` (their noise and conditions), (N, *sample_shape), on the CPU."""
        ...


def _run_sampler(
    model: Denoiser,
    seeds: Sequence[int],
    sampler: Sampler,
    ref: Tensor,
    device: str | torch.device,
    keep_samples: bool,
    kind: RowKind | None,
) -> Run:
    """A :class:`Sampler`'s row (its error in the row when it cannot run on this model)."""
    try:
        name = sampler.label(model)
        t0 = time.perf_counter()
        x = per_seed(model, seeds, lambda chunk: sampler.samples(model, chunk, device))
    except FewstepError as e:
        return Run(Row(kind or "classic", type(sampler).__name__, sampler.grid_label, sampler.nfe, error=str(e)))
    secs = time.perf_counter() - t0
    r = per_sample_rmse(x, ref)
    sem = float(r.std() / math.sqrt(len(r))) if len(r) > 1 else 0.0
    row = Row(kind or "classic", name, sampler.grid_label, sampler.nfe, float(r.mean()), sem, secs)
    return Run(row, x if keep_samples else None)


def evaluate(
    model: Denoiser,
    nfe: int | Iterable[int] = 5,
    solvers: Sequence[Any] | None = None,
    samples: int = 256,
    seed: int = EVAL_SEED_START,
    reference: str | None = None,
    reference_nfe: int | None = None,
    batch_size: int = 500,
    device: str | torch.device = "cpu",
    model_name: str | None = None,
    metrics: str | Sequence[str] | None = None,
    data: Tensor | None = None,
    feature: nn.Module | str | None = None,
    data_samples: int = 2048,
    learned: Sequence[Any] = (),
    samplers: Sequence[Sampler] = (),
) -> Report:
    """Compare solvers on ``samples`` held-out seeds starting at ``seed``.

    Args:
        solvers: "NAME@GRID" strings and/or learned solvers; None means every classic solver
            on every grid.
        nfe: one budget or several.
        metrics: None (RMSE only, the fast path), "auto" (every metric that suits the model), or
            names from ("fd", "kid", "fd_ref", "psnr", "swd", "loglik"); see :mod:`fewstep.metrics.suite`.
        data: the data reference set (M, *sample_shape) for fd / kid / swd; default: the model's
            data where known (:func:`fewstep.metrics.reference.model_data`), else the reference
            solver's samples on the ``data_samples`` seeds after the evaluation seeds.
        feature: feature network for fd / kid (any nn.Module, e.g. Inception with your weights,
            or "digits"); default: the built-in digits classifier for digits models.
        data_samples: size of a drawn data reference set (analytic models, reference-solver fallback).
        learned: learned solvers (artifacts) evaluated once each at their own NFE, beside ``solvers``.
        samplers: other samplers (:class:`Sampler`, e.g. the pipeline's own scheduler) at their own NFE.
    FD is biased upwards at small sample counts (see :mod:`fewstep.metrics.frechet`): compare
    rows at the same ``samples`` and read them against the reference row, which measures the floor.

    Returns:
        the typed :class:`~fewstep.report.Report`, rows sorted by NFE then RMSE; its JSON
        (``Report.as_dict()``) is {"model", "nfe", "samples", "seed", "reference": {...}, "results":
        [{"solver", "grid", "nfe", "rmse", "rmse_sem", "seconds", ("error"), ("artifact": a learned
        solver's folder)}]}.
        With metrics: every result also has "fd", "kid", "kid_std", "fd_ref", "psnr", "swd", "loglik" (None
        where not measured); results[0] is the reference row ({"solver": "reference", "grid": the
        reference solver, "role": "reference", "rmse": its self-error, ...}); and "metrics" says
        what was measured against what ({"names", "feature", "data_reference": {"source", "n"[, "loglik"]}}).
    """
    nfes = [int(nfe)] if isinstance(nfe, int) else [int(n) for n in nfe]
    seeds = list(check_seeds(seed, samples, "seed="))  # one line for a seed torch cannot take
    names = select_metrics(model, metrics, feature) if parse_metrics(metrics) != () else None  # before any solve
    jobs = _jobs(model, solvers, learned, nfes, seed, samples) + [(s, int(s.nfe)) for s in samplers]
    ref = _Reference.solve(model, seeds, reference, reference_nfe, batch_size, device)
    scorer = None
    if names is not None:
        dref = None
        if any(m in DISTRIBUTION for m in names):
            dref = _data_reference(
                model, data, seed + samples, data_samples, reference, reference_nfe, batch_size, device
            )
        scorer = _Scorer(model, names, dref, feature, ref, seeds)
    rows = [_measure(model, seeds, s, n, ref, scorer, batch_size, device) for s, n in jobs]
    rows.sort(key=lambda r: (r.nfe, math.inf if r.rmse is None else r.rmse))
    report = Report(model_name or model.name, nfes[0] if len(nfes) == 1 else nfes, samples, seed, ref.info, rows)
    if scorer is not None:
        rows.insert(0, scorer.reference_row(report))
    return report


def _jobs(
    model: Denoiser, solvers: Sequence[Any] | None, learned: Sequence[Any], nfes: list[int], seed: int, samples: int
) -> list[tuple[Any, int]]:
    """(solver, NFE) of every row: each of ``solvers`` (default: every classic one) at each budget, each learned
    solver at its own; checked before any solve (held-out seeds, at least one runnable)."""
    specs = list(solvers) if solvers is not None else classic_specs(model.schedule)
    for s in [*specs, *learned]:
        check_held_out(s, seed, seed + samples)
    jobs = [(s, n) for n in nfes for s in specs] + [(s, int(s.nfe)) for s in learned]
    _check_runnable(model, jobs)
    return jobs


@dataclass
class _Reference:
    """An evaluation's converged reference solve and the same solve at half the steps (its self-error)."""

    x: Tensor  # (n, ...) the samples every row is scored against
    half: Tensor  # (n, ...) the same solve at half the steps
    self_error: Tensor  # (n,) per-sample RMSE between the two
    spec: str
    nfe: int
    seconds: float
    info: dict[str, Any]  # the report's "reference": {"solver", "nfe", "self_error"}

    @classmethod
    def solve(
        cls,
        model: Denoiser,
        seeds: list[int],
        reference: str | None,
        nfe: int | None,
        batch_size: int,
        device: str | torch.device,
    ) -> _Reference:
        """The reference for ``seeds`` (the model's exact solution where it has one), timed."""
        t0 = time.perf_counter()
        x, half, spec, n = _reference_pair(model, seeds, reference, nfe, batch_size, device)
        secs = time.perf_counter() - t0
        err = per_sample_rmse(half, x)
        return cls(x, half, err, spec, n, secs, {"solver": spec, "nfe": n, "self_error": float(err.mean())})


class _Scorer:
    """The metrics of every row, computed by rank 0 and sent to the other processes (under several processes
    every solve is shared out by seed and gathered: every process returns the same report)."""

    def __init__(
        self,
        model: Denoiser,
        names: Sequence[str],
        dref: DataReference | None,
        feature: nn.Module | str | None,
        ref: _Reference,
        seeds: list[int],
    ) -> None:
        main = current().main
        self.ref = ref
        self.suite = MetricSuite(model, names, dref, feature) if main else None
        self.cond = model.cond_for(seeds) if main else {}

    def metrics(self, samples: Tensor | None) -> dict[str, float | None]:
        """A row's metric columns (all None when its solver did not run)."""
        got = None
        if self.suite is not None:
            got = self.suite.row(samples, self.ref.x, self.cond) if samples is not None else dict.fromkeys(ROW_KEYS)
        return current().broadcast_object(got)

    def reference_row(self, report: Report) -> Row:
        """The reference solve's own row (the floor: its RMSE is its self-error); sets ``report.metrics``."""
        ref, err = self.ref, self.ref.self_error
        sem = float(err.std() / math.sqrt(len(err))) if len(err) > 1 else 0.0
        got = (self.suite.row(ref.x, ref.half, self.cond), self.suite.info()) if self.suite is not None else None
        metrics, report.metrics = current().broadcast_object(got)
        return Row(
            "reference", "reference", ref.spec, ref.nfe, ref.info["self_error"], sem, ref.seconds, metrics=metrics
        )


def _measure(
    model: Denoiser,
    seeds: list[int],
    solver: Any,
    nfe: int,
    ref: _Reference,
    scorer: _Scorer | None,
    batch_size: int,
    device: str | torch.device,
) -> Row:
    """One solver's row: its RMSE to the reference (and, with a scorer, its metrics)."""
    run = run_solver(model, seeds, solver, nfe, ref.x, batch_size, device, keep_samples=scorer is not None)
    if scorer is not None:
        run.row.metrics = scorer.metrics(run.samples)
    return run.row


def _check_runnable(model: Denoiser, jobs: list[tuple[Any, int]]) -> None:
    """Raise NothingToRunError (before the expensive reference solve) if no job can build its tables."""
    first = None
    for s, n in jobs:
        if isinstance(s, Sampler):
            continue
        try:
            r = resolve_solver(s, model, n)
            r.tableau(model, w=some_scale(model, r))
            return
        except (ArtifactError, SolverNameError):
            raise
        except FewstepError as e:
            first = first or e
    if first is not None:
        raise NothingToRunError(
            f"none of the {len(jobs)} requested solver runs can run on this model; the first says: {first}"
        )


def _data_reference(
    model: Denoiser,
    data: Tensor | None,
    first_seed: int,
    n: int,
    reference: str | None,
    reference_nfe: int | None,
    batch_size: int,
    device: str | torch.device,
) -> DataReference:
    """The user's set, the model's data, or the reference solve on seeds [first_seed, first_seed + n)."""
    if data is not None:
        return user_data(data, model.sample_shape)
    own = model_data(model, n)
    if own is not None:
        return own
    seeds = list(range(first_seed, first_seed + int(n)))
    x, _, spec, nfe = _reference_pair(model, seeds, reference, reference_nfe, batch_size, device, twice=False)
    return DataReference(x, f"reference solve {spec} at {nfe} NFE ({n} samples, seeds {seeds[0]}..{seeds[-1]})")


def format_table(report: Report | dict[str, Any], top: int | None = None) -> str:
    """Plain-text table of an :func:`evaluate` report or of its JSON (see :func:`fewstep.report.render_plain`)."""
    return render_plain(report if isinstance(report, Report) else Report.from_dict(report), top)


__all__ = [
    "ALL_GRIDS",
    "FD_REF_NOTE",
    "Run",
    "check_held_out",
    "default_reference",
    "evaluate",
    "format_table",
    "grid_names",
    "per_sample_rmse",
    "per_seed",
    "reference_samples",
    "run_solver",
    "solve_batched",
]
