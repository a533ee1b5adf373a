"""S4S, S4S-Alt, LD3 and DSS on the one learned-solver parameterisation.

- ``s4s``: coefficients only (last k evaluations, free rows, optional corrector), grid fixed.
- ``ld3``: the grid only (the starting solver's normalised coefficients held), relaxed objective.
- ``s4s-alt``: alternate grid (with decoupled evaluation times) and coefficient phases.
- ``dss``: grid (softmax steps) and full-history coefficients with rows summing to one, jointly,
  Lion, per-step trajectory MSE to the teacher's states plus 1000 x Huber(1e-3) on the final sample.
Every method starts from a classic solver (by default the best one on the validation noises)
and keeps its starting point when it cannot beat it on validation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from ..denoiser import Denoiser
from ..errors import FewstepError
from ..evaluate import classic_specs
from ..sampling import build_tableau
from ..solvers.kernel import Tableau
from ..solvers.learned import LearnedSolver, step_scales, window_mask
from .loop import FitState, Relax, optimise, restore_best, validate
from .teacher import TeacherData

METHODS = ("s4s", "s4s-alt", "ld3", "dss")
F64 = torch.float64


def from_classic(model: Denoiser, tab: Tableau, method: str, k: int = 3, rows_sum_to_one: bool = False,
                 decouple: float = 0.0, corrector: bool | None = None, start: str = "") -> LearnedSolver:
    """A learned solver that reproduces the classic tableau ``tab`` exactly at initialisation."""
    n = tab.N
    a, phi = step_scales(model.schedule, tab.t, tab.basis)
    if not torch.allclose(a, tab.a, rtol=1e-9, atol=1e-12):
        raise FewstepError(f"cannot start from {tab.name}: its a_i are not those of basis {tab.basis}")
    W = tab.B / phi[:, None]
    mask = (window_mask(n, n) if rows_sum_to_one else window_mask(n, k)) | (tab.B != 0)
    use_c = tab.C is not None if corrector is None else corrector
    V = V_mask = None
    if use_c:
        V = (tab.C / phi[:, None]) if tab.C is not None else torch.zeros(n, n + 1, dtype=F64)
        V_mask = window_mask(n, k, corrector=True) | ((tab.C != 0) if tab.C is not None else False)
        V_mask[n - 1] = False
    s = LearnedSolver(model.schedule, tab.t, tab.basis, W, mask, V, V_mask, rows_sum_to_one=rows_sum_to_one,
                      decouple=decouple, method=method, start=start)
    if rows_sum_to_one:
        off = torch.tril(W, -1)
        if not torch.allclose(torch.diag(W), 1.0 - off.sum(1), atol=1e-8):
            raise FewstepError(f"cannot start DSS from {tab.name}: its rows do not sum to one")
    return s


@torch.no_grad()
def rank_classic(model: Denoiser, nfe: int, val: TeacherData, predictor_only: bool = False,
                 candidates: list[str] | None = None) -> list[tuple[float, str]]:
    """(validation RMSE to the teacher, 'NAME@GRID') for classic solvers at ``nfe``, best first."""
    out = []
    for spec in candidates or classic_specs(model):
        if spec.startswith("heun"):
            continue
        try:
            tab = build_tableau(model, spec, nfe)
        except FewstepError:
            continue
        if predictor_only and tab.C is not None:
            continue
        try:
            v = validate(model, _Fixed(tab), val)
        except FewstepError:
            continue
        if math.isfinite(v):
            out.append((v, spec))
    out.sort()
    return out


class _Fixed:
    """A fixed tableau seen through the learned-solver interface (for validation)."""

    def __init__(self, tab: Tableau):
        self._tab = tab

    def tableau(self, model=None) -> Tableau:
        return self._tab


@dataclass
class FitConfig:
    method: str = "s4s-alt"
    nfe: int = 5
    start: str | None = None  # NAME@GRID; None: the best classic on validation
    k: int = 3
    steps: int = 600  # optimisation steps in total
    rounds: int = 4  # S4S-Alt alternations
    batch: int = 20
    lr_coef: float = 3e-2
    lr_grid: float = 5e-2
    decouple: float = 0.1
    relax: float = 0.0  # LD3 ball radius, relative to the noise norm; 0 disables
    loss: str | Callable = "l2"
    optimizer: str | None = None  # default: adam (S4S family), lion (DSS)
    eval_every: int = 25
    seed: int = 0
    use_checkpoint: bool = False

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        if callable(d["loss"]):
            d["loss"] = getattr(d["loss"], "__name__", "callable")
        return d


@dataclass
class FitOutcome:
    solver: LearnedSolver
    start: str
    start_val: float
    val: float
    kept_start: bool
    state: FitState
    ranking: list[tuple[float, str]] = field(default_factory=list)


def fit_solver(model: Denoiser, train: TeacherData, val: TeacherData, cfg: FitConfig, progress: Any = None) -> FitOutcome:
    """Fit one method; returns the learned solver (or its start if the fit did not help)."""
    if cfg.method not in METHODS:
        raise FewstepError(f"unknown method {cfg.method!r}; valid: {', '.join(METHODS)}")
    dss = cfg.method == "dss"
    ranking = rank_classic(model, cfg.nfe, val, predictor_only=dss) if cfg.start is None else []
    start = cfg.start or (ranking[0][1] if ranking else None)
    if start is None:
        raise FewstepError(f"no classic solver runs at NFE {cfg.nfe} on this model to start from")
    tab = build_tableau(model, start, cfg.nfe)
    solver = from_classic(model, tab, cfg.method, k=cfg.k, rows_sum_to_one=dss,
                          decouple=cfg.decouple if cfg.method in ("s4s-alt",) else 0.0, start=start)
    start_val = validate(model, solver, val)
    state = FitState()
    relax = Relax(cfg.relax) if cfg.relax > 0 else None
    common = dict(batch=cfg.batch, loss=cfg.loss, eval_every=cfg.eval_every, seed=cfg.seed, progress=progress,
                  use_checkpoint=cfg.use_checkpoint)
    if cfg.method == "s4s":
        state = optimise(model, solver, train, val, {"coef": cfg.lr_coef}, cfg.steps, relax=relax,
                         optimizer=cfg.optimizer or "adam", state=state, label="coef", **common)
    elif cfg.method == "ld3":
        state = optimise(model, solver, train, val, {"grid": cfg.lr_grid}, cfg.steps, relax=relax or Relax(0.05),
                         optimizer=cfg.optimizer or "adam", state=state, label="grid", **common)
    elif cfg.method == "s4s-alt":
        per = max(1, cfg.steps // (2 * cfg.rounds))
        for r in range(cfg.rounds):
            restore_best(solver, state)  # each phase starts from the best so far
            state = optimise(model, solver, train, val, {"grid": cfg.lr_grid}, per, relax=relax,
                             optimizer=cfg.optimizer or "adam", state=state, label=f"round {r + 1} grid", **common)
            restore_best(solver, state)
            state = optimise(model, solver, train, val, {"coef": cfg.lr_coef}, per, relax=relax,
                             optimizer=cfg.optimizer or "adam", state=state, label=f"round {r + 1} coef", **common)
    else:  # dss
        lr = 1e-2 if cfg.optimizer in (None, "lion") else cfg.lr_coef
        state = optimise(model, solver, train, val, {"grid": lr, "coef": lr}, cfg.steps,
                         optimizer=cfg.optimizer or "lion", dss_weights=(1.0, 1000.0), state=state, label="dss",
                         **{**common, "batch": max(cfg.batch, 32)})
    restore_best(solver, state)
    val_rmse = validate(model, solver, val)
    kept = not val_rmse < start_val
    if kept:  # the fit did not help on validation: return the starting solver itself
        solver = from_classic(model, tab, cfg.method, k=cfg.k, rows_sum_to_one=dss, start=start)
        val_rmse = start_val
    return FitOutcome(solver, start, start_val, val_rmse, kept, state, ranking)
