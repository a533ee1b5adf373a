"""What a solver is to the rest of fewstep, and the one place a spec becomes one.

A :class:`Solver` gives its :class:`~.kernel.Tableau` for a model, its NFE, a label for tables and its
kind: ``"classic"`` (a registry solver on a grid at a budget), ``"learned"`` (an artifact or a solver
being fitted) or ``"tableau"`` (tables given directly). :func:`resolve_solver` turns whatever a user
passes (``"NAME@GRID"``, an artifact folder or file, a Tableau, a Solver) into one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from ..denoiser import Denoiser
from ..errors import FewstepError, SolverNameError
from ..grids import make_grid
from ..schedules import Schedule
from .kernel import Tableau
from .registry import SolverInfo, make_tableau, solver_info

KINDS = ("classic", "learned", "tableau")


@runtime_checkable
class Solver(Protocol):
    """A few-step solver: ``tableau(model)`` for the kernel, ``nfe`` evaluations, a ``label``.

    ``kind`` is one of ``KINDS``; ``name`` and ``grid_label`` are the table columns ("unipc" and
    "logsnr"; a learned solver's grid is "learned"). A solver fitted across guidance scales has a
    ``guidance_range`` and gives its tables at a scale: ``tableau(model, w)``.
    """

    # read-only members: a class attribute, a dataclass field or a property each satisfies them
    @property
    def kind(self) -> str: ...

    @property
    def name(self) -> str: ...

    @property
    def grid_label(self) -> str: ...

    @property
    def nfe(self) -> int: ...

    @property
    def guidance_range(self) -> tuple[float, float] | None:
        """A solver fitted across guidance scales: the (lowest, highest) scale it covers; else None."""
        ...

    def tableau(self, model: Any = None, w: float | None = None) -> Tableau:
        """The kernel tables for ``model`` (a Denoiser or its Schedule), at guidance scale ``w`` if fitted across."""
        ...


def label(solver: Solver) -> str:
    """'NAME@GRID' for classic solvers, the name for the others."""
    return f"{solver.name}@{solver.grid_label}" if solver.kind == "classic" else solver.name


def parse_solver(spec: str) -> tuple[str, str | None]:
    """'NAME@GRID' -> (NAME, GRID); 'NAME' -> (NAME, None)."""
    name, _, grid = spec.partition("@")
    return name.strip(), (grid.strip() or None)


def _schedule(model: Denoiser | Schedule | None) -> Schedule:
    if isinstance(model, Denoiser):
        return model.schedule
    if isinstance(model, Schedule):
        return model
    raise FewstepError("a classic solver needs the model (or its schedule) to build its tables")


@dataclass(frozen=True)
class ClassicSolver:
    """A registry solver on a named or explicit grid at an NFE budget."""

    name: str
    grid: str | tuple[float, ...]
    budget: int
    options: tuple[tuple[str, Any], ...] = ()
    kind: str = field(default="classic", init=False)
    guidance_range: None = field(default=None, init=False)

    @property
    def info(self) -> SolverInfo:
        """The registry entry of the solver."""
        return solver_info(self.name)

    @property
    def grid_label(self) -> str:
        return self.grid if isinstance(self.grid, str) else "custom"

    @property
    def steps(self) -> int:
        """Grid steps the budget buys."""
        return self.info.steps(self.budget)

    @property
    def nfe(self) -> int:
        """Evaluations made on a grid that ends at the clean end (every named grid does)."""
        return self.info.cost(self.steps)

    def grid_times(self, schedule: Schedule) -> Tensor:
        """The grid (steps + 1,) on ``schedule``."""
        return make_grid(schedule, self.steps, self.grid if isinstance(self.grid, str) else list(self.grid))

    def tableau(self, model: Denoiser | Schedule | None = None, w: float | None = None) -> Tableau:
        schedule = _schedule(model)
        return make_tableau(self.name, schedule, self.grid_times(schedule), **dict(self.options))


@dataclass
class TableauSolver:
    """Tables given directly (e.g. a classic start during a fit)."""

    tab: Tableau
    kind: str = field(default="tableau", init=False)
    guidance_range: None = field(default=None, init=False)

    @property
    def name(self) -> str:
        return self.tab.name

    @property
    def grid_label(self) -> str:
        return "custom"

    @property
    def nfe(self) -> int:
        return self.tab.N

    def tableau(self, model: Any = None, w: float | None = None) -> Tableau:
        return self.tab


def some_scale(model: Denoiser, solver: Solver) -> float | None:
    """A guidance scale the model's samples use, for a solver fitted across scales (None for any other): the
    middle of the scales its seeds draw from, else the model's (the tables' shape is the same at all)."""
    return None if solver.guidance_range is None else model.conditions.some_scale()


def is_artifact_spec(spec: str) -> bool:
    """Does a string name a learned-solver artifact (a path) rather than a classic 'NAME@GRID'?"""
    if "@" in spec:
        return False
    p = Path(spec)
    return p.exists() or p.suffix == ".json" or "/" in spec or "\\" in spec


def resolve_solver(
    spec: Any,
    model: Denoiser | Schedule | None = None,
    nfe: int | None = None,
    grid: str | Sequence[float] | Tensor | None = None,
    force: bool = False,
    **options: Any,
) -> Solver:
    """The :class:`Solver` named by ``spec``.

    Args:
        spec: a classic ``"NAME"`` / ``"NAME@GRID"``, a learned-solver folder or solver.json, a
            :class:`~.kernel.Tableau`, or a Solver (returned as is).
        model: the model (or its schedule), to check a classic spec against it now.
        nfe: the budget of a classic solver (a learned solver or a tableau fixes its own).
        grid: the grid of a classic spec without ``@GRID`` (a name or explicit times; default logsnr).
        force: load an artifact fitted for another model anyway.
        options: keyword arguments of the classic solver's generator (e.g. ``order=3``).
    """
    if isinstance(spec, Tableau):
        return TableauSolver(spec)
    if isinstance(spec, Solver):
        return spec
    if isinstance(spec, Path):
        spec = str(spec)
    if not isinstance(spec, str):
        raise SolverNameError(
            f"solver must be a name, a learned-solver folder, a Tableau or a learned solver; got {type(spec).__name__}"
        )
    if is_artifact_spec(spec):
        from .artifact import load_solver

        return load_solver(spec, force=force)
    name, g = parse_solver(spec)
    info = solver_info(name)
    if nfe is None:
        raise FewstepError(f"solver {name} needs an NFE budget: pass nfe=N")
    chosen = g or (grid if grid is not None else "logsnr")
    if not isinstance(chosen, str):
        chosen = tuple(float(v) for v in torch.as_tensor(chosen, dtype=torch.float64).flatten().tolist())
    out = ClassicSolver(info.name, chosen, int(nfe), tuple(sorted(options.items())))
    _ = out.steps  # raises NFEError now, not at the first solve
    if model is not None and not info.suits(_schedule(model)):
        out.tableau(model)  # the generator names what the schedule lacks
    return out
