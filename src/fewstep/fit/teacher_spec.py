"""Teacher solvers: ``NAME@GRID:NFE`` specs, the defaults, and the times of a teacher's states.

A teacher is a classic solver at a high NFE, written ``NAME@GRID:NFE`` (``unipc@logsnr:20``,
``euler@time:100``, ``ddim@time:100``, ``heun@karras:35``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import Tensor

from ..denoiser import Denoiser
from ..errors import FewstepError
from ..grids import ALIASES, GRIDS
from ..sampling import build_tableau
from ..schedules import F64
from ..solvers.registry import classic_default, solver_info, solver_names

_FORM = "expected NAME@GRID:NFE, e.g. unipc@logsnr:20 or euler@time:100"
_SPEC_RE = re.compile(r"^\s*([A-Za-z][A-Za-z0-9_]*)\s*@\s*([A-Za-z][A-Za-z0-9_]*)\s*:\s*([+-]?\d+)\s*$")


@dataclass(frozen=True)
class TeacherSpec:
    """A teacher solver: a classic solver name, a named grid and an NFE budget."""

    solver: str
    grid: str
    nfe: int

    def key(self) -> str:
        """A file-name-safe identifier, e.g. ``unipc.logsnr.20``."""
        return f"{self.solver}.{self.grid}.{self.nfe}"

    def __str__(self) -> str:
        return f"{self.solver}@{self.grid}:{self.nfe}"


def parse_teacher(spec: str | TeacherSpec) -> TeacherSpec:
    """Parse ``"NAME@GRID:NFE"`` into a :class:`TeacherSpec` (grid aliases are normalised)."""
    if isinstance(spec, TeacherSpec):
        spec = str(spec)
    if not isinstance(spec, str):
        raise FewstepError(f"a teacher must be a string NAME@GRID:NFE; got {type(spec).__name__} ({_FORM})")
    m = _SPEC_RE.match(spec)
    if m is None:
        raise FewstepError(f"malformed teacher spec {spec!r}: {_FORM}")
    name, grid, nfe_s = m.group(1), m.group(2), m.group(3)
    names = solver_names()
    if name not in names:
        raise FewstepError(f"unknown teacher solver {name!r} in {spec!r}; valid: {', '.join(names)} ({_FORM})")
    grid = ALIASES.get(grid, grid)
    if grid not in GRIDS:
        raise FewstepError(f"unknown teacher grid {m.group(2)!r} in {spec!r}; valid: {', '.join(GRIDS)} ({_FORM})")
    nfe = int(nfe_s)
    if nfe < 1:
        raise FewstepError(f"teacher NFE must be a positive integer; got {nfe} in {spec!r} ({_FORM})")
    solver_info(name).steps(nfe)  # raises NFEError naming the minimum
    return TeacherSpec(name, grid, nfe)


def default_teacher(model: Denoiser, nfe: int | None = None) -> TeacherSpec:
    """A near-converged teacher: ``unipc3@logsnr:40`` (diffusion) or ``adams4@time:40`` (flows).

    The S4S paper uses UniPC at 20 NFE for pixel models, but what a teacher leaves unconverged
    bounds how close a learned solver gets to the true ODE solution. At 40 NFE the teachers' own
    errors on the zoo models are 9-22x below a learned NFE-5 solver's, and the evaluations a 100-NFE
    teacher took buy more optimisation instead (BENCHMARKS.md, section 8). Pass ``teacher=`` to choose
    another (a stiffer model, e.g. at a high guidance scale, may need a finer one). ``nfe``: the same solver at
    another NFE (a method's own default, :attr:`fewstep.fit.registry.FitMethod.teacher_nfe`).
    """
    name, grid, default_nfe = classic_default(model.schedule, "teacher")
    return TeacherSpec(name, grid, default_nfe if nfe is None else int(nfe))


def teacher_times(model: Denoiser, spec: str | TeacherSpec) -> Tensor:
    """Solver times (float64, decreasing) of the teacher's states: its grid's solution points (a
    multi-stage teacher's internal stages are not states), M + 1 points."""
    spec = parse_teacher(spec)
    tab = build_tableau(model, spec.solver, spec.nfe, spec.grid)
    return tab.solution_times().detach().to(F64).cpu().clone()
