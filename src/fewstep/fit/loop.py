"""The optimisation loop shared by every method: batches, losses, the relaxed objective,
validation with keep-the-best, progress and resumable checkpoints."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from ..denoiser import Denoiser
from ..solvers.kernel import run_tableau
from ..solvers.learned import LearnedSolver
from .teacher import TeacherData

LossFn = Callable[[Tensor, Tensor], Tensor]  # (student (B, ...), target (B, ...)) -> (B,)


def per_sample_loss(kind: str | LossFn) -> LossFn:
    """'l2' (mean squared error), 'l1', or a user callable returning per-sample losses (B,)."""
    if callable(kind):
        return kind
    if kind == "l2":
        return lambda x, y: (x - y).flatten(1).pow(2).mean(1)
    if kind == "l1":
        return lambda x, y: (x - y).flatten(1).abs().mean(1)
    raise ValueError(f"unknown loss {kind!r}; valid: l2, l1 or a callable (student, target) -> per-sample loss")


def huber(x: Tensor, y: Tensor, delta: float) -> Tensor:
    """Per-sample mean Huber loss (B,)."""
    d = (x - y).flatten(1).abs()
    return torch.where(d < delta, 0.5 * d**2, delta * (d - 0.5 * delta)).mean(1)


@dataclass
class Relax:
    """LD3's relaxed objective: each training noise owns a latent within ||x' - x|| <= radius.

    radius = r * sigma_T * sqrt(dim) (r is relative to the typical norm of the noise).
    """

    r: float
    lr: float = 1.0
    offsets: Tensor | None = None

    def radius(self, model: Denoiser, dim: int) -> float:
        return self.r * model.schedule.init_noise_scale() * math.sqrt(dim)

    def project(self, d: Tensor, radius: float) -> Tensor:
        n = d.flatten(1).norm(dim=1).clamp_min(1e-30)
        scale = torch.clamp(radius / n, max=1.0)
        return d * scale.view(-1, *[1] * (d.dim() - 1))


@dataclass
class FitState:
    step: int = 0
    best_val: float = math.inf
    best: dict[str, Tensor] | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def student(model: Denoiser, solver: LearnedSolver, noise: Tensor, cond: dict[str, Any],
            trajectory: bool = False, use_checkpoint: bool = False):
    """Run the learned solver from unit noise (B, ...)."""
    x = noise * model.schedule.init_noise_scale()
    return run_tableau(model, x, solver.tableau(), cond, return_trajectory=trajectory, use_checkpoint=use_checkpoint)


def _cond_rows(cond: dict[str, Any], idx: Tensor) -> dict[str, Any]:
    return {k: (v[idx] if isinstance(v, Tensor) else v) for k, v in cond.items()}


@torch.no_grad()
def validate(model: Denoiser, solver: LearnedSolver, val: TeacherData, batch: int = 256) -> float:
    """Mean per-sample RMSE of the solver to the teacher's outputs on the validation noises."""
    tot, n = 0.0, len(val)
    for k in range(0, n, batch):
        idx = torch.arange(k, min(n, k + batch))
        x = student(model, solver, val.noise[idx], _cond_rows(val.cond, idx))
        tot += float((x - val.target[idx]).double().flatten(1).pow(2).mean(1).sqrt().sum())
    return tot / n


def optimise(
    model: Denoiser,
    solver: LearnedSolver,
    train: TeacherData,
    val: TeacherData,
    lrs: dict[str, float],
    steps: int,
    batch: int = 20,
    loss: str | LossFn = "l2",
    optimizer: str = "adam",
    relax: Relax | None = None,
    dss_weights: tuple[float, float] | None = None,
    eval_every: int = 25,
    seed: int = 0,
    state: FitState | None = None,
    progress: Any = None,
    label: str = "",
    use_checkpoint: bool = False,
    on_eval: Callable[[FitState], None] | None = None,
    cosine: bool = False,
) -> FitState:
    """Optimise the parameter groups named in ``lrs`` ({'grid': lr, 'coef': lr}) for ``steps`` steps.

    ``dss_weights=(w_traj, w_final)`` switches to DSS's objective: per-step state MSE to the
    teacher's nearest state plus w_final * Huber(1e-3) on the final sample.
    Keeps (in ``state.best``) the parameters with the best validation RMSE, starting from the
    current parameters, so the result is never worse on validation than the start.
    """
    state = state or FitState()
    groups = solver.coef_groups()
    params = []
    for g, lr in lrs.items():
        if lr > 0:
            params.append({"params": groups[g], "lr": lr})
    for p in solver.parameters():
        p.requires_grad_(False)
    for g in params:
        for p in g["params"]:
            p.requires_grad_(True)
    if optimizer == "lion":
        from lion_pytorch import Lion

        opt = Lion(params, weight_decay=0.0)
    elif optimizer == "adam":
        opt = torch.optim.Adam(params)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; valid: adam, lion")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps), eta_min=0.0) if cosine else None
    loss_fn = per_sample_loss(loss)
    gen = torch.Generator().manual_seed(seed + state.step)
    n = len(train)
    dim = int(train.noise[0].numel())
    if relax is not None and relax.offsets is None:
        relax.offsets = torch.zeros_like(train.noise)
    radius = relax.radius(model, dim) if relax is not None else 0.0
    if state.best is None:
        state.best_val = validate(model, solver, val)
        state.best = {k: v.detach().clone() for k, v in solver.state_dict().items()}
    t0 = time.perf_counter()
    for it in range(steps):
        idx = torch.randperm(n, generator=gen)[:batch]
        noise = train.noise[idx]
        cond = _cond_rows(train.cond, idx)
        if relax is not None:
            off = relax.offsets[idx].clone().requires_grad_(True)
            noise = noise + off / model.schedule.init_noise_scale()
        if dss_weights is None:
            x = student(model, solver, noise, cond, use_checkpoint=use_checkpoint)
            L = loss_fn(x, train.target[idx]).mean()
        else:
            x, traj = student(model, solver, noise, cond, trajectory=True, use_checkpoint=use_checkpoint)
            L = dss_weights[1] * huber(x, train.target[idx], 1e-3).mean()
            if dss_weights[0] > 0 and train.states is not None:
                t = solver.grid().detach()
                tt = train.times.to(t)
                for i in range(1, len(traj) - 1):
                    j = int(torch.argmin((tt - t[i]).abs()))
                    L = L + dss_weights[0] * (traj[i] - train.states[idx, j]).flatten(1).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        L.backward()
        bad = any(p.grad is not None and not torch.isfinite(p.grad).all() for g in params for p in g["params"])
        if not bad:
            opt.step()
        if sched is not None:
            sched.step()
        if relax is not None and off.grad is not None and torch.isfinite(off.grad).all():
            with torch.no_grad():
                new = relax.project(off - relax.lr * radius * off.grad / off.grad.flatten(1).norm(dim=1).clamp_min(1e-30)
                                    .view(-1, *[1] * (off.dim() - 1)), radius)
                relax.offsets[idx] = new
        state.step += 1
        if progress is not None:
            progress.update(1)
            progress.set_postfix_str(f"{label} loss {float(L.detach()):.3g} val {state.best_val:.4g}")
        if (it + 1) % eval_every == 0 or it == steps - 1:
            v = validate(model, solver, val)
            state.history.append({"step": state.step, "loss": float(L.detach()), "val": v})
            if v < state.best_val:
                state.best_val = v
                state.best = {k: x.detach().clone() for k, x in solver.state_dict().items()}
            if on_eval is not None:
                on_eval(state)
    state.seconds += time.perf_counter() - t0
    for p in solver.parameters():
        p.requires_grad_(False)
    return state


def restore_best(solver: LearnedSolver, state: FitState) -> None:
    if state.best is not None:
        solver.load_state_dict(state.best)
