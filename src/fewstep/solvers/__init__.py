"""Solvers: the one kernel, classic coefficient generators and Heun."""

from .classic import SOLVERS, make_tableau, solver_names
from .kernel import Tableau, run_tableau

__all__ = ["SOLVERS", "Tableau", "make_tableau", "run_tableau", "solver_names"]
