"""Solvers: the one kernel, the classic coefficient generators and their registry, learned solvers."""

from .kernel import Stepper, Tableau, run_tableau
from .registry import SOLVERS, classic_specs, make_tableau, solver_info, solver_names
from .resolve import Solver, resolve_solver

__all__ = [
    "SOLVERS",
    "Solver",
    "Stepper",
    "Tableau",
    "classic_specs",
    "make_tableau",
    "resolve_solver",
    "run_tableau",
    "solver_info",
    "solver_names",
]
