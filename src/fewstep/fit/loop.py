"""The optimisation loop shared by every method: phases of steps, losses, the relaxed objective,
validation with keep-the-best, progress, and a state that a checkpoint can restore exactly.

A fit is a list of :class:`~.config.Phase` (S4S: one coefficient phase; S4S-Alt: grid and coefficient
phases in turn; DSS: one joint phase). The training batch of global step k is drawn from a
generator seeded by (seed, k) alone, so a run resumed from a checkpoint takes the same batches,
and ends with the same parameters, as a run that was never interrupted.

Under several processes (:mod:`fewstep.distributed`) every process draws the same batch and takes the rows it
owns (noise i belongs to rank i % world), weighted by their share of the batch; the solver's gradients are
all-reduced before the optimiser step, which is then the same everywhere. Validation errors are gathered in
row order, the budget counts every process's network evaluations, and LD3's relaxed latents are updated by
the process that owns their noise.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..denoiser import Denoiser
from ..distributed import Dist, current, fault
from ..errors import FewstepError, ModelOutputError
from ..metrics.pixel import per_sample_rmse
from ..sampling import guidance_groups, solve, take
from ..solvers.kernel import run_tableau
from ..solvers.learned import LearnedSolver
from .budget import forward_cost, step_cost
from .config import LOSSES, FitConfig, Phase
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


@dataclass
class Relax:
    """LD3's relaxed objective: each training noise owns a latent within ||x' - x|| <= radius.

    radius = r * sigma_T * sqrt(dim) (r is relative to the typical norm of the noise).
    ``offsets`` (K, ...) hold x' - x for the K training noises and persist across phases.
    """

    r: float
    lr: float = 1.0
    offsets: Tensor | None = None
    mine: Tensor | None = None  # (K,) bool: the latents this process updates (None: all, or not fitting yet)

    def radius(self, model: Denoiser, dim: int) -> float:
        return self.r * model.schedule.init_noise_scale() * math.sqrt(dim)

    def project(self, d: Tensor, radius: float) -> Tensor:
        n = d.flatten(1).norm(dim=1).clamp_min(1e-30)
        scale = torch.clamp(radius / n, max=1.0)
        return d * scale.view(-1, *[1] * (d.dim() - 1))


@dataclass
class FitState:
    """Everything a fit needs to continue where it stopped (see :mod:`fewstep.fit.checkpoint`)."""

    step: int = 0  # global optimisation steps done
    phase: int = 0  # index of the phase in progress
    phase_step: int = 0  # steps done in that phase
    best_val: float = math.inf
    best: dict[str, Tensor] | None = None
    history: list[dict[str, float | None]] = field(default_factory=list)  # non-finite values recorded as None
    seconds: float = 0.0
    skipped: int = 0  # steps skipped because the student's solve blew up (NaN/inf) at the parameters of the time
    exhausted: bool = False  # the budget ended the fit early
    opt_state: dict[str, Any] | None = None  # optimizer state of the phase in progress


def student(
    model: Denoiser,
    solver: Any,
    noise: Tensor,
    cond: dict[str, Any],
    trajectory: bool = False,
    use_checkpoint: bool = False,
):
    """Run a (learned) solver from unit noise (B, ...) (per guidance scale for a solver fitted across scales)."""
    x = noise * model.schedule.init_noise_scale()
    return solve(model, x, solver, cond, return_trajectory=trajectory, use_checkpoint=use_checkpoint)


def noise_groups(groups: int | None) -> int:
    """The number of noise groups of a fit (``FitConfig.noise_groups``; default one per process), checked
    against the number of processes."""
    d = current()
    G = d.world if groups is None else int(groups)
    if d.world > G:
        raise FewstepError(
            f"--noise-groups {G} is fewer than the {d.world} processes of this run: give at least "
            f"{d.world}, or drop it for one group per process"
        )
    return G


#: samples per no-gradient solve in validation (a fit sets it to its micro-batch: see :func:`inference_batch`)
_INFERENCE_BATCH: ContextVar[int] = ContextVar("inference_batch", default=256)


@contextmanager
def inference_batch(n: int | None) -> Iterator[None]:
    """Validation solves at most ``n`` noises at once while open (None: 256): a micro-batch that fits with
    gradients fits without them."""
    token = _INFERENCE_BATCH.set(n or 256)
    try:
        yield
    finally:
        _INFERENCE_BATCH.reset(token)


@torch.no_grad()
def val_errors(
    model: Denoiser, solver: Any, val: TeacherData, batch: int | None = None, groups: int | None = None
) -> Tensor:
    """Per-sample RMSE (K,) of the solver to the teacher's outputs on the validation noises.

    The noises are solved in groups (noise i in group i % G, :func:`noise_groups`), each in batches of its own;
    under several processes each solves the groups it owns and the errors are gathered in row order, so every
    process returns the same tensor (and takes the same decisions on it)."""
    d = current()
    G = noise_groups(groups)
    batch = batch or _INFERENCE_BATCH.get()

    def mine() -> list[Tensor] | None:
        parts = []
        for g in d.groups(G):
            rows, out = torch.arange(g, len(val), G), []
            for k in range(0, rows.numel(), batch):
                idx = rows[k : k + batch]
                try:
                    x = student(model, solver, val.noise[idx], take(val.cond, idx, len(val)))
                except ModelOutputError:  # parameters that blow the solve up: infinitely bad, not a crash
                    return None
                out.append(per_sample_rmse(x, val.target[idx]).cpu())
            parts.append(torch.cat(out) if out else torch.zeros(0, dtype=torch.float64))
        return parts

    local = d.agree(mine)  # another error on any process is raised on all of them
    blown = local is None
    if d.world > 1:
        blown = d.sum_ints([int(blown)])[0] > 0
    if blown:
        return torch.full((len(val),), math.inf, dtype=torch.float64)
    return d.gather_groups(local, G, len(val))


def mean_val_error(
    model: Denoiser, solver: Any, val: TeacherData, batch: int | None = None, groups: int | None = None
) -> float:
    """Mean per-sample RMSE of the solver to the teacher's outputs on the validation noises."""
    return float(val_errors(model, solver, val, batch, groups).mean())


def clearly_better(new: Tensor, old: Tensor, z: float = 2.0) -> bool:
    """True if per-sample errors ``new`` beat ``old`` (same noises) beyond z standard errors.

    A paired test: the mean of new - old must lie below zero by ``z`` times its standard error.
    Validation noises are few and per-sample errors heavy-tailed (a sample that lands in another
    mode), so a bare "lower mean" picks fits that lose on fresh noise.
    """
    d = (new - old).double()
    if not torch.isfinite(d).all():
        return False
    sem = float(d.std() / math.sqrt(d.numel())) if d.numel() > 1 else 0.0
    return float(d.mean()) + z * sem < 0.0


def _batch_index(n: int, batch: int, seed: int, step: int) -> Tensor:
    """The training rows of global step ``step``: a function of (seed, step) only."""
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step)) % (2**63 - 1))
    return torch.randperm(n, generator=g)[:batch]


def _make_optimizer(name: str, params: list[dict[str, Any]]) -> torch.optim.Optimizer:
    if name == "lion":
        from lion_pytorch import Lion

        return Lion(params, weight_decay=0.0)
    if name == "adam":
        return torch.optim.Adam(params)
    raise ValueError(f"unknown optimizer {name!r}; valid: adam, lion")


def _objective(
    model: Denoiser,
    solver: LearnedSolver,
    train: TeacherData,
    idx: Tensor,
    noise: Tensor,
    loss_fn: LossFn,
    dss_weights: tuple[float, float] | None,
    use_checkpoint: bool,
) -> Tensor:
    cond = take(train.cond, idx, len(train))
    if dss_weights is None:
        x = student(model, solver, noise, cond, use_checkpoint=use_checkpoint)
        return loss_fn(x, train.target[idx]).mean()
    # DSS: the final sample's Huber term and each state's MSE to the teacher's state nearest in time, per
    # guidance scale among the samples (one run unless the solver is fitted across scales)
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
        L = L + frac * dss_weights[1] * huber(x, train.target[part], 1e-3).mean()
        if dss_weights[0] > 0 and train.states is not None:
            if train.times is None:
                raise FewstepError("teacher data holds states but not their times: DSS's state term needs both")
            t = solver.grid(w).detach()
            for i in range(1, len(traj) - 1):
                j = int(torch.argmin((train.times.to(t) - t[i]).abs()))
                L = L + frac * dss_weights[0] * (traj[i] - train.states[part, j]).flatten(1).pow(2).mean()
    assert isinstance(L, Tensor)  # guidance_groups gives at least one run, and each adds a tensor
    return L


def _accumulate(
    model: Denoiser,
    solver: LearnedSolver,
    train: TeacherData,
    idx: Tensor,
    off: Tensor | None,
    scale: float,
    loss_fn: LossFn,
    dss_weights: tuple[float, float] | None,
    cfg: FitConfig,
    batch: int | None = None,
) -> Tensor:
    """The loss of rows ``idx`` of a batch of ``batch`` rows (default: ``idx`` is the whole batch), weighted by
    their share of it and backpropagated in micro-batches of ``cfg.micro_batch`` samples (gradients accumulate:
    the same gradient as the whole batch at once, with memory for a micro-batch only)."""
    mb = cfg.micro_batch or max(1, idx.numel())
    batch = batch or idx.numel()
    total = torch.zeros((), dtype=torch.float64)
    for a in range(0, idx.numel(), mb):
        part = idx[a : a + mb]
        noise = train.noise[part] if off is None else train.noise[part] + off[a : a + mb] / scale
        L = _objective(model, solver, train, part, noise, loss_fn, dss_weights, bool(cfg.use_checkpoint))
        L = L * (part.numel() / batch)
        L.backward()
        total = total + L.detach().to(total.dtype)
    return total


@dataclass
class Budget:
    """What a fit may still spend: ``limit`` less what was spent before the counter's baseline (``before``:
    the teacher's recorded cost) and what ``model.cost`` recorded since ``base``."""

    limit: int
    model: Denoiser
    before: int
    base: int

    def spent(self) -> int:
        """Spent so far by the whole run (under several processes: summed over them, a collective)."""
        return self.before + current().sum_ints([self.model.cost.total - self.base])[0]

    def allows(self, more: int) -> bool:
        return self.spent() + more <= self.limit


@dataclass
class FitSession:
    """What one fit works on, beside its phases: the model, the solver being fitted, the teacher data,
    the settings, the relaxed latents (LD3) and the hooks (progress bar, checkpoint after validation)."""

    model: Denoiser
    solver: LearnedSolver
    train: TeacherData
    val: TeacherData
    cfg: FitConfig = field(default_factory=FitConfig)
    relax: Relax | None = None
    progress: Any = None
    on_eval: Callable[[FitState, torch.optim.Optimizer], None] | None = None
    budget: Budget | None = None
    reserve: int = 0  # evaluations kept for after the phases (final validation, confirmation)
    source: str = "the fit checkpoint"  # where a restored state came from (named in errors)


def optimise(session: FitSession, phase: Phase, state: FitState | None = None, steps: int | None = None) -> FitState:
    """Run ``phase`` (its parameter groups, learning rates, optimizer and batch) for ``steps`` steps
    (default: the phase's), continuing ``state``.

    A phase with ``dss_weights=(w_traj, w_final)`` uses DSS's objective: per-step state MSE to the
    teacher's nearest state plus w_final * Huber(1e-3) on the final sample. Keeps (in ``state.best``)
    the parameters with the best validation RMSE, starting from the current parameters, so the result
    is never worse on validation than the start. ``state.opt_state`` (if set) restores the optimizer;
    ``session.on_eval(state, opt)`` runs after every validation (a checkpoint hook).
    """
    model, solver, train, val, cfg, relax = (
        session.model,
        session.solver,
        session.train,
        session.val,
        session.cfg,
        session.relax,
    )
    d = current()
    G = noise_groups(cfg.noise_groups)
    state = state or FitState()
    steps = phase.steps if steps is None else steps
    groups = solver.coef_groups()
    params: list[dict[str, Any]] = [{"params": groups[g], "lr": lr} for g, lr in phase.lrs.items() if lr > 0]
    plist: list[Tensor] = [p for group in params for p in group["params"]]
    for p in solver.parameters():
        p.requires_grad_(False)
    for group in params:
        for p in group["params"]:
            p.requires_grad_(True)
    opt = _make_optimizer(phase.optimizer, params)
    if state.opt_state is not None:
        _restore_optimizer(opt, state.opt_state, phase, session.source)
        # the checkpoint holds a warm-up lr: restart from the base
        for restored, group in zip(opt.param_groups, params, strict=True):
            restored["lr"] = group["lr"]
    loss_fn = per_sample_loss(cfg.loss)
    n = len(train)
    dim = int(train.noise[0].numel())
    offsets = None
    if relax is not None:
        if relax.offsets is None:
            relax.offsets = torch.zeros_like(train.noise)
        offsets = relax.offsets
        relax.mine = torch.arange(len(train)) % G % d.world == d.rank  # the latents this process updates: its groups
    radius = relax.radius(model, dim) if relax is not None else 0.0
    scale = model.schedule.init_noise_scale()
    if state.best is None:
        if session.budget is not None and not session.budget.allows(forward_cost(cfg, len(val)) + session.reserve):
            state.exhausted = True
            for p in solver.parameters():
                p.requires_grad_(False)
            return state
        state.best_val = mean_val_error(model, solver, val, groups=cfg.noise_groups)
        state.best = {k: v.detach().clone() for k, v in solver.state_dict().items()}
    base = [g["lr"] for g in opt.param_groups]
    warm = max(1, min(50, phase.steps // 10)) if cfg.warmup else 1
    t0 = time.perf_counter()
    bad = 0
    for it in range(steps):
        # linear warm-up: Adam's first steps move every coefficient by about lr at once, which can
        # throw a solver in a sensitive basis (E near the noise end) far from its start
        for group, lr in zip(opt.param_groups, base, strict=True):
            group["lr"] = lr * min(1.0, (state.phase_step + 1) / warm)
        idx = _batch_index(n, phase.batch, cfg.seed, state.step)
        validates = (it + 1) % cfg.eval_every == 0 or it == steps - 1
        if session.budget is not None and not session.budget.allows(
            step_cost(cfg, idx.numel()) + (forward_cost(cfg, len(val)) if validates else 0) + session.reserve
        ):
            state.exhausted = True  # the next step would cross the budget: stop with the best so far
            break
        # the batch's noises in groups (noise i in group i % G), each its own forward/backward pass; this process
        # runs the groups it owns (all of them for one process) and the groups' gradients are added in order
        parts: list[tuple[Tensor, Tensor | None, Tensor, list[Tensor | None]]] = []
        blew = False
        for g in d.groups(G):
            rows = idx if G == 1 else idx[idx % G == g]
            off = offsets[rows].clone().requires_grad_(True) if offsets is not None else None
            opt.zero_grad(set_to_none=True)
            try:
                Lg = _accumulate(model, solver, train, rows, off, scale, loss_fn, phase.dss_weights, cfg, idx.numel())
            except ModelOutputError:  # the solve blew up at these parameters: skip the step
                blew = True
                break
            parts.append((rows, off, Lg, [p.grad for p in plist]))
        fault(f"fit step {state.step}")
        L, failed, off_ok = _reduce_step(d, G, plist, parts, blew)
        if not failed:
            opt.step()
            bad = 0
        else:
            bad += 1
            state.skipped += 1
            if bad >= 10 and state.best is not None:  # stuck where every solve blows up: back to the best
                restore_best(solver, state)
                opt.state.clear()
                bad = 0
        if relax is not None and offsets is not None and not failed and off_ok:
            for rows, off, _, _ in parts:
                if off is None or off.grad is None:
                    continue
                with torch.no_grad():
                    gn = off.grad.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, *[1] * (off.dim() - 1))
                    offsets[rows] = relax.project(off - relax.lr * radius * off.grad / gn, radius)
        state.step += 1
        state.phase_step += 1
        if session.progress is not None:
            session.progress.update(1)
            session.progress.set_postfix_str(f"{phase.label} loss {float(L.detach()):.3g} val {state.best_val:.4g}")
        if validates:
            v = mean_val_error(model, solver, val, groups=cfg.noise_groups)
            state.history.append(
                {"step": state.step, "loss": finite_or_none(float(L.detach())), "val": finite_or_none(v)}
            )
            if v < state.best_val:  # NaN and inf never win
                state.best_val = v
                state.best = {k: x.detach().clone() for k, x in solver.state_dict().items()}
            state.seconds += time.perf_counter() - t0
            t0 = time.perf_counter()
            if session.on_eval is not None:
                session.on_eval(state, opt)
    state.seconds += time.perf_counter() - t0
    state.opt_state = copy.deepcopy(opt.state_dict())  # a phase stopped part-way goes on with its moments
    for p in solver.parameters():
        p.requires_grad_(False)
    return state


def _reduce_step(
    d: Dist, G: int, plist: list[Tensor], parts: list[tuple[Tensor, Tensor | None, Tensor, list]], blew: bool
) -> tuple[Tensor, bool, bool]:
    """The step's loss and gradients from every group's (each process ran its own groups): sets each parameter's
    gradient to the sum of the groups' in group order, and returns (loss, failed, the relaxed latents'
    gradients are finite). With several processes this is one gather of a few hundred bytes per group: the
    gradients, which parameters have one, the loss and two flags; every process then takes the same optimiser
    step, and the same as one process with the same groups, bit for bit."""
    off_ok = all(off is None or off.grad is None or bool(torch.isfinite(off.grad).all()) for _, off, _, _ in parts)
    if d.world == 1 and G == 1:  # the batch in one pass: its gradients are the step's
        L = torch.tensor(math.inf) if blew else parts[0][2]
        failed = blew or not all(p.grad is None or torch.isfinite(p.grad).all() for p in plist)
        return L, failed, off_ok
    sizes = [p.numel() for p in plist]
    width = sum(sizes) + len(plist) + 3
    local = torch.zeros((len(d.groups(G)), width), dtype=torch.float64)
    for j, (_, _, Lg, grads) in enumerate(parts):
        local[j, : sum(sizes)] = torch.cat(
            [
                torch.zeros(n, dtype=torch.float64) if g is None else g.detach().reshape(-1).to(torch.float64).cpu()
                for g, n in zip(grads, sizes, strict=True)
            ]
        )
        local[j, sum(sizes) : sum(sizes) + len(plist)] = torch.tensor(
            [float(g is not None) for g in grads], dtype=torch.float64
        )
        local[j, -3] = float(Lg)
    local[:, -2] = float(blew)
    local[:, -1] = float(not off_ok)
    full = d.gather_rows(local, G, kind="gradients")  # (G, width): every group's, in group order
    blew, off_ok = bool((full[:, -2] > 0).any()), not bool((full[:, -1] > 0).any())
    L = torch.tensor(math.inf) if blew else sum((full[g, -3] for g in range(1, G)), full[0, -3])
    offs = [0]
    for n in sizes:
        offs.append(offs[-1] + n)
    for i, p in enumerate(plist):
        acc = None
        for g in range(G):
            if full[g, offs[-1] + i] > 0:
                v = full[g, offs[i] : offs[i + 1]]
                acc = v if acc is None else acc + v
        p.grad = None if acc is None else acc.view(p.shape).to(device=p.device, dtype=p.dtype)
    failed = blew or not all(p.grad is None or torch.isfinite(p.grad).all() for p in plist)
    return L, failed, off_ok


def _restore_optimizer(opt: torch.optim.Optimizer, saved: dict[str, Any], phase: Phase, source: str) -> None:
    """Load a checkpoint's optimiser state, checked against the optimiser it must fit (groups, hyperparameter
    types, state shapes): a mismatch is one line naming the checkpoint and --restart."""
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    try:
        opt.load_state_dict(saved)
        for g, f in zip(opt.param_groups, fresh, strict=True):  # load_state_dict checked the group count
            for k, v in f.items():
                got, kinds = g.get(k), ((int, float), (list, tuple), (bool,), (str,))
                if v is not None and not any(isinstance(v, t) and isinstance(got, t) for t in kinds):
                    raise ValueError(f"{k} is {got!r}")
                if isinstance(v, (list, tuple)) and (
                    not isinstance(got, (list, tuple))
                    or len(got) != len(v)
                    or not all(isinstance(a, (int, float)) for a in got)
                ):
                    raise ValueError(f"{k} is {got!r}")
        for g in opt.param_groups:
            for p in g["params"]:
                for k, v in opt.state.get(p, {}).items():
                    if isinstance(v, Tensor) and k != "step" and v.shape != p.shape:
                        raise ValueError(f"{k} has shape {tuple(v.shape)} for a parameter of shape {tuple(p.shape)}")
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as e:
        raise FewstepError(
            f"{source}: its optimiser state does not fit phase {phase.label!r} "
            f"({' '.join(str(e).split())[:160]}); run the same command with --restart to start "
            f"the fit over"
        ) from None


def run_phases(session: FitSession, phases: list[Phase], state: FitState, until: int | None = None) -> FitState:
    """Run ``phases`` in order from ``state`` (a fresh state, or one restored from a checkpoint), up to global
    step ``until`` if given (the state then continues from there); a budget that runs out ends them all."""
    while state.phase < len(phases) and not state.exhausted and (until is None or state.step < until):
        ph = phases[state.phase]
        if state.phase_step == 0:
            state.opt_state = None
            if ph.restore_best:
                restore_best(session.solver, state)
        left = ph.steps - state.phase_step
        if until is not None:
            left = min(left, until - state.step)
        if left > 0:
            state = optimise(session, ph, state, steps=left)
        if state.phase_step < ph.steps and not state.exhausted:
            break  # stopped inside the phase at ``until``: it goes on from here
        state.phase += 1
        state.phase_step = 0
        state.opt_state = None
    return state


def finite_or_none(v: float) -> float | None:
    """``v``, or None if it is NaN or infinite (how JSON files record a value that blew up)."""
    return v if math.isfinite(v) else None


def restore_best(solver: LearnedSolver, state: FitState) -> None:
    """Load ``state.best`` (the best parameters on validation so far) into ``solver``, if there are any."""
    if state.best is not None:
        solver.load_state_dict(state.best)
