"""fewstep: learned few-step solvers for pretrained diffusion and flow models."""

from .denoiser import Denoiser
from .errors import FewstepError
from .grids import make_grid
from .sampling import sample
from .schedules import EDM, Flow, Schedule, VPDiscrete, VPLinear
from .solvers import Tableau, make_tableau, solver_names
from .solvers.artifact import load_solver

__all__ = [
    "Denoiser",
    "EDM",
    "FewstepError",
    "Flow",
    "Schedule",
    "Tableau",
    "VPDiscrete",
    "VPLinear",
    "load_solver",
    "make_grid",
    "make_tableau",
    "sample",
    "solver_names",
]
__version__ = "0.1.0"
