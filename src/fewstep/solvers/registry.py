"""The classic solvers by name: how each is built, what an NFE budget buys, what it needs of a schedule.

Callers never name a solver: they ask the registry how many grid steps fit in a budget
(:meth:`SolverInfo.steps`), what those steps cost (:meth:`SolverInfo.cost`) and whether a solver
suits a schedule (:meth:`SolverInfo.suits`). ``SOLVERS`` holds the multistep solvers (one evaluation a
step); ``STAGED`` the multi-stage ones (Heun: two); both build a :class:`~.kernel.Tableau`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import NFEError, SolverNameError
from ..grids import grid_names
from ..schedules import F64, Schedule
from .classic import adams, ddim, deis, deis_tab, dpmpp, ipndm, unipc
from .heun import heun, heun_nfe, heun_steps
from .kernel import Tableau

#: grids each classic solver is run on when no solver is named
ALL_GRIDS = ("time", "quadratic", "logsnr", "karras")


def one_a_step(nfe: int) -> int:
    """Grid steps of a one-evaluation-a-step solver for ``nfe`` evaluations: nfe."""
    return nfe


def one_eval_a_step(steps: int, final_zero: bool = True) -> int:
    """Evaluations of ``steps`` grid steps of a one-evaluation-a-step solver: steps."""
    return int(steps)


@dataclass(frozen=True)
class SolverInfo:
    """One classic solver.

    ``stages``: evaluations per grid step (Heun: 2, and 1 on a last step to sigma = 0); ``grid_steps`` and
    ``evaluations``: the solver's own rule between NFE and grid steps (default: one evaluation a step).
    ``needs_alpha``: works in y = x / alpha, so needs alpha > 0 at the noise end (not a flow at t = 1).
    ``alias_of``: another name of that solver (left out of sweeps).
    """

    name: str
    make: Callable[..., Tableau]
    kwargs: dict
    min_nfe: int
    doc: str
    stages: int = 1
    needs_alpha: bool = False
    alias_of: str | None = None
    grid_steps: Callable[[int], int] = one_a_step  # NFE budget -> grid steps (may raise its own NFEError)
    evaluations: Callable[[int, bool], int] = one_eval_a_step  # (grid steps, final_zero) -> NFE

    def steps(self, nfe: int) -> int:
        """Grid steps whose cost fits in ``nfe`` evaluations (NFEError below the solver's minimum)."""
        nfe = int(nfe)
        steps = self.grid_steps(nfe)
        if nfe < self.min_nfe:
            raise NFEError(
                f"{self.name} needs at least {self.min_nfe} NFE (got {nfe}): raise --nfe or use a lower-order solver"
            )
        return steps

    def cost(self, steps: int, final_zero: bool = True) -> int:
        """Evaluations of ``steps`` grid steps (``final_zero``: the grid ends at sigma = 0)."""
        return self.evaluations(steps, final_zero)

    def suits(self, schedule: Schedule) -> bool:
        """Can this solver run on ``schedule`` at all?"""
        return not self.needs_alpha or schedule.alpha_at_t_max() > 0


SOLVERS: dict[str, SolverInfo] = {}
STAGED: dict[str, SolverInfo] = {}


def _reg(
    name: str,
    make: Callable[..., Tableau],
    min_nfe: int,
    doc: str,
    stages: int = 1,
    needs_alpha: bool = False,
    alias_of: str | None = None,
    grid_steps: Callable[[int], int] = one_a_step,
    evaluations: Callable[[int, bool], int] = one_eval_a_step,
    **kwargs,
) -> None:
    (STAGED if stages > 1 else SOLVERS)[name] = SolverInfo(
        name, make, kwargs, min_nfe, doc, stages, needs_alpha, alias_of, grid_steps, evaluations
    )


_reg("ddim", ddim, 1, "DDIM = DPM-Solver++(1), data prediction")
_reg("dpmpp_2m", dpmpp, 2, "DPM-Solver++(2M)", order=2)
_reg("dpmpp_3m", dpmpp, 3, "DPM-Solver++(3M)", order=3)
_reg("unipc", unipc, 2, "UniPC-2, bh2", order=2, variant="bh2")
_reg("unipc_bh1", unipc, 2, "UniPC-2, bh1", order=2, variant="bh1")
_reg("unipc_bh2", unipc, 2, "UniPC-2, bh2", alias_of="unipc", order=2, variant="bh2")
_reg("unipc3", unipc, 3, "UniPC-3, bh2", order=3, variant="bh2")
_reg("ipndm", ipndm, 4, "iPNDM order 4", needs_alpha=True, order=4)
_reg("ipndm2", ipndm, 2, "iPNDM order 2", needs_alpha=True, order=2)
_reg("ipndm3", ipndm, 3, "iPNDM order 3", needs_alpha=True, order=3)
_reg("deis", deis, 3, "DEIS (log-rho AB) order 3", needs_alpha=True, order=3)
_reg("deis2", deis, 2, "DEIS (log-rho AB) order 2", needs_alpha=True, order=2)
_reg("deis_tab", deis_tab, 3, "DEIS tAB order 3 (polynomial in t)", needs_alpha=True, order=3)
_reg("euler", adams, 1, "Euler on dx/dt", order=1)
_reg("adams2", adams, 2, "Adams-Bashforth 2 on dx/dt", order=2)
_reg("adams3", adams, 3, "Adams-Bashforth 3 on dx/dt", order=3)
_reg("adams4", adams, 4, "Adams-Bashforth 4 on dx/dt", order=4)
_reg("heun", heun, 3, "Heun (EDM), 2 evaluations a step", stages=2, grid_steps=heun_steps, evaluations=heun_nfe)


def solver_names() -> list[str]:
    """The names of every registered classic solver."""
    return list(SOLVERS) + list(STAGED)


def solver_info(name: str) -> SolverInfo:
    """The registry entry of ``name`` (SolverNameError naming the valid ones otherwise)."""
    info = SOLVERS.get(name) or STAGED.get(name)
    if info is None:
        raise SolverNameError(f"unknown solver {name!r}; valid: {', '.join(solver_names())}")
    return info


def make_tableau(name: str, schedule: Schedule, t: torch.Tensor, **kwargs) -> Tableau:
    """The classic solver ``name`` on grid t (n + 1 times; n steps cost ``solver_info(name).cost(n)`` NFE)."""
    info = solver_info(name)
    n = int(t.numel()) - 1
    if info.cost(n) < info.min_nfe or n < 1:
        raise NFEError(
            f"{name} needs at least {info.min_nfe} NFE (got {info.cost(n)}): raise --nfe or use a lower-order solver"
        )
    key = (
        name,
        repr(sorted(schedule.config().items())),
        tuple(t.detach().to(F64).tolist()),
        tuple(sorted(kwargs.items())),
    )
    tab = _CACHE.get(key)
    if tab is None:  # tables depend only on (solver, schedule, grid): build once, reuse (read-only)
        tab = info.make(schedule, t, **{**info.kwargs, **kwargs})
        tab.name = name
        if len(_CACHE) > 512:
            _CACHE.clear()
        _CACHE[key] = tab
    return tab


_CACHE: dict[tuple, Tableau] = {}


#: the classic solver each use defaults to, (NAME, GRID, NFE) for a flow and for a diffusion schedule: flows on
#: the time-uniform grid (logSNR grids crowd the steps at the ends of a flow's path), diffusion on the logSNR grid
DEFAULTS: dict[str, tuple[tuple[str, str, int], tuple[str, str, int]]] = {
    "sample": (("adams2", "time", 5), ("dpmpp_3m", "logsnr", 5)),  # sound at few steps
    "teacher": (("adams4", "time", 40), ("unipc3", "logsnr", 40)),  # error far below a learned solver's (BENCHMARKS 8)
    "reference": (("adams4", "time", 400), ("dpmpp_3m", "logsnr", 400)),  # converged, for held-out errors
}


def classic_default(schedule: Schedule, use: str) -> tuple[str, str, int]:
    """(NAME, GRID, NFE) of the classic solver that ``use`` (a key of ``DEFAULTS``) defaults to on ``schedule``."""
    flow, diffusion = DEFAULTS[use]
    return flow if schedule.kind == "flow" else diffusion


def classic_specs(schedule: Schedule) -> list[str]:
    """Every classic solver ('NAME@GRID') on every grid that suits ``schedule`` (a flow pipeline's own
    ``shifted`` grid too), for the solvers that suit it."""
    grids = grid_names(schedule)
    return [
        f"{name}@{g}"
        for name in solver_names()
        for g in grids
        if solver_info(name).alias_of is None and solver_info(name).suits(schedule)
    ]
