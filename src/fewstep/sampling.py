"""``fewstep.sample``: run any solver (classic name, tableau or learned solver) on a model."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .denoiser import Denoiser
from .errors import FewstepError, ShapeError, SolverNameError
from .grids import make_grid
from .solvers.classic import SOLVERS, SPECIAL, make_tableau, solver_names
from .solvers.heun import heun_steps, run_heun
from .solvers.kernel import Tableau, run_tableau


def parse_solver(spec: str) -> tuple[str, str | None]:
    """'NAME@GRID' -> (NAME, GRID); 'NAME' -> (NAME, None)."""
    name, _, grid = spec.partition("@")
    return name.strip(), (grid.strip() or None)


def default_solver(model: Denoiser) -> str:
    """A sound classic default: ``adams2@time`` for flows (logSNR grids crowd the steps at the ends of
    a flow's path), ``dpmpp_3m@logsnr`` otherwise. ``fewstep eval`` finds the best for a model."""
    return "adams2@time" if model.schedule.kind == "flow" else "dpmpp_3m@logsnr"


def build_tableau(model: Denoiser, solver: Any, nfe: int | None, grid: Any = "logsnr", **solver_kwargs: Any) -> Tableau:
    """Resolve ``solver`` (a classic name, a Tableau, or an object with ``.tableau(model)``)."""
    if isinstance(solver, Tableau):
        return solver
    if hasattr(solver, "tableau"):
        return solver.tableau(model)
    if not isinstance(solver, str):
        raise SolverNameError(f"solver must be a name, a Tableau or a learned solver; got {type(solver).__name__}")
    name, g = parse_solver(solver)
    if name not in SOLVERS:
        raise SolverNameError(f"unknown solver {name!r}; valid: {', '.join(solver_names())}")
    if nfe is None:
        raise FewstepError(f"solver {name} needs an NFE budget: pass nfe=N")
    t = make_grid(model.schedule, int(nfe), g or grid)
    return make_tableau(name, model.schedule, t, **solver_kwargs)


def sample(
    model: Denoiser,
    noise: Tensor,
    solver: Any = None,
    nfe: int | None = 5,
    grid: str | Sequence[float] | Tensor = "logsnr",
    callback: Callable[[dict[str, Any]], None] | None = None,
    return_trajectory: bool = False,
    cond: dict[str, Any] | None = None,
    use_checkpoint: bool = False,
    **solver_kwargs: Any,
) -> Tensor | tuple[Tensor, list[Tensor]]:
    """Sample ``model`` from standard ``noise`` with ``nfe`` model evaluations.

    Args:
        model: a :class:`~fewstep.Denoiser`.
        noise: unit-variance starting noise, shape (B, *model.sample_shape).
        solver: a classic solver name (optionally ``NAME@GRID``), a Tableau, or a learned solver;
            None: :func:`default_solver`.
        nfe: number of model evaluations (for ``heun``: the largest count of steps that fits).
        grid: grid name (time, quadratic, logsnr, karras) or an explicit list of nfe + 1 times.
        callback: called after every step with {"i", "t", "x", "F"}.
        return_trajectory: also return the list of states at the grid times.
        cond: conditioning keyword arguments for the network (e.g. class_labels).
    Returns:
        samples of the same shape as ``noise`` (and the trajectory if asked). Differentiable.
    """
    if not isinstance(noise, Tensor):
        raise ShapeError(f"noise must be a torch.Tensor; got {type(noise).__name__}")
    if model.sample_shape is not None and tuple(noise.shape[1:]) != model.sample_shape:
        raise ShapeError(
            f"noise has shape {tuple(noise.shape)} but this model's samples have shape (B, {', '.join(map(str, model.sample_shape))})"
        )
    x = noise * model.schedule.init_noise_scale()
    if solver is None:
        solver = default_solver(model)
    if isinstance(solver, str) and parse_solver(solver)[0] in SPECIAL:
        name, g = parse_solver(solver)
        if nfe is None:
            raise FewstepError("heun needs an NFE budget: pass nfe=N")
        n = heun_steps(int(nfe))
        t = make_grid(model.schedule, n, g or grid)
        return run_heun(model, x, t, cond, callback, return_trajectory)
    tab = build_tableau(model, solver, nfe, grid, **solver_kwargs)
    return run_tableau(model, x, tab, cond, callback, return_trajectory, use_checkpoint=use_checkpoint)
