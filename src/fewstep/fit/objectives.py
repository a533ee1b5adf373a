"""What a fit minimises: per-sample losses, and the objectives a method names in :mod:`.registry`.

An objective maps a micro-batch of training rows to a scalar: :class:`FinalSample` (the loss setting between
the student's sample and the teacher's; the S4S family and LD3) or :class:`StatesAndFinal` (DSS: a Huber term on
the final sample plus each state's distance to the teacher's state nearest in time).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from ..denoiser import Denoiser
from ..errors import FewstepError
from ..sampling import guidance_groups, solve, take
from ..solvers.kernel import run_tableau
from ..solvers.learned import LearnedSolver
from .config import LOSSES
from .teacher import TeacherData

LossFn = Callable[[Tensor, Tensor], Tensor]  # (student (B, ...), target (B, ...)) -> (B,)


def per_sample_loss(kind: str | LossFn) -> LossFn:
    """Per-sample losses (B,) between student and teacher samples.

    'l2': the L2 distance ||x - y|| / sqrt(dim), i.e. the per-sample RMSE the evaluation reports
    (default; on digits-eps at NFE 5 it beat its square by 8% on held-out noise: the square lets the
    few worst samples dominate); 'mse': its square; 'l1': mean absolute error; or a user callable
    (student, target) -> (B,), e.g. LPIPS.
    """
    if callable(kind):
        return kind
    if kind == "l2":
        return lambda x, y: (x - y).flatten(1).pow(2).mean(1).clamp_min(1e-20).sqrt()
    if kind == "mse":
        return lambda x, y: (x - y).flatten(1).pow(2).mean(1)
    if kind == "l1":
        return lambda x, y: (x - y).flatten(1).abs().mean(1)
    raise ValueError(
        f"unknown loss {kind!r}; valid: {', '.join(LOSSES)} or a callable (student, target) -> per-sample loss"
    )


def huber(x: Tensor, y: Tensor, delta: float) -> Tensor:
    """Per-sample mean Huber loss (B,)."""
    d = (x - y).flatten(1).abs()
    return torch.where(d < delta, 0.5 * d**2, delta * (d - 0.5 * delta)).mean(1)


def student(
    model: Denoiser,
    solver: Any,
    noise: Tensor,
    cond: dict[str, Any],
    trajectory: bool = False,
    use_checkpoint: bool = False,
) -> Any:
    """Run a (learned) solver from unit noise (B, ...) (per guidance scale for a solver fitted across scales)."""
    x = noise * model.schedule.init_noise_scale()
    return solve(model, x, solver, cond, return_trajectory=trajectory, use_checkpoint=use_checkpoint)


class Objective(Protocol):
    """A training objective: the scalar a micro-batch of training rows contributes (before weighting by its share
    of the batch)."""

    @property
    def needs_states(self) -> bool:
        """Does it need the teacher's states (the teacher data then keeps them)?"""
        ...

    def __call__(
        self,
        model: Denoiser,
        solver: LearnedSolver,
        train: TeacherData,
        idx: Tensor,
        noise: Tensor,
        loss: LossFn,
        use_checkpoint: bool,
    ) -> Tensor:
        """The objective on rows ``idx`` (n,) of ``train``, started from unit ``noise`` (n, ...) (a relaxed
        objective moves it off the rows' own); ``loss`` is the fit's per-sample loss setting."""
        ...


@dataclass(frozen=True)
class FinalSample:
    """The mean per-sample ``loss`` between the student's final sample and the teacher's."""

    @property
    def needs_states(self) -> bool:
        return False

    def __call__(
        self,
        model: Denoiser,
        solver: LearnedSolver,
        train: TeacherData,
        idx: Tensor,
        noise: Tensor,
        loss: LossFn,
        use_checkpoint: bool,
    ) -> Tensor:
        x = student(model, solver, noise, take(train.cond, idx, len(train)), use_checkpoint=use_checkpoint)
        return loss(x, train.target[idx]).mean()


@dataclass(frozen=True)
class StatesAndFinal:
    """DSS's objective: ``final`` x Huber(``delta``) on the final sample plus ``states`` x each inner state's MSE
    to the teacher's state nearest in time, per guidance scale among the rows (one run unless the solver is
    fitted across scales). The loss setting is not used."""

    states: float
    final: float
    delta: float = 1e-3

    @property
    def needs_states(self) -> bool:
        return self.states > 0

    def __call__(
        self,
        model: Denoiser,
        solver: LearnedSolver,
        train: TeacherData,
        idx: Tensor,
        noise: Tensor,
        loss: LossFn,
        use_checkpoint: bool,
    ) -> Tensor:
        cond = take(train.cond, idx, len(train))
        scale, n = model.schedule.init_noise_scale(), idx.numel()
        L: Tensor | float = 0.0
        for w, rows in guidance_groups(model, solver, cond, n):
            sel = torch.arange(n) if rows is None else rows
            x, traj = run_tableau(
                model,
                noise[sel] * scale,
                solver.tableau(model, w=w),
                take(cond, rows, n),
                return_trajectory=True,
                use_checkpoint=use_checkpoint,
            )
            part = idx[sel]
            frac = sel.numel() / n
            L = L + frac * self.final * huber(x, train.target[part], self.delta).mean()
            if self.states > 0 and train.states is not None:
                if train.times is None:
                    raise FewstepError("teacher data holds states but not their times: DSS's state term needs both")
                t = solver.grid(w).detach()
                for i in range(1, len(traj) - 1):  # each inner state against the teacher's nearest in time
                    j = int(torch.argmin((train.times.to(t) - t[i]).abs()))
                    L = L + frac * self.states * (traj[i] - train.states[part, j]).flatten(1).pow(2).mean()
        assert isinstance(L, Tensor)  # guidance_groups gives at least one run, and each adds a tensor
        return L
