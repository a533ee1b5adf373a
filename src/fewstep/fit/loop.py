"""The optimisation loop shared by every method: phases of steps on the method's objective
(:mod:`.objectives`), the relaxed latents, validation with keep-the-best, progress, and a state that a
checkpoint can restore exactly.

A fit is a list of :class:`~.config.Phase` (its method's plan: :mod:`.registry`). The training batch of global
step k is drawn from a
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
from ..sampling import take
from ..solvers.learned import LearnedSolver
from .budget import forward_cost, step_cost
from .config import FitConfig, Phase
from .objectives import LossFn, Objective, per_sample_loss, student
from .registry import method_info
from .teacher import TeacherData


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


@dataclass(frozen=True)
class _Pass:
    """What each forward/backward pass of a phase computes: ``objective`` of ``solver`` on rows of ``train``."""

    model: Denoiser
    solver: LearnedSolver
    train: TeacherData
    objective: Objective
    loss: LossFn
    use_checkpoint: bool
    micro_batch: int | None


def _objective(run: _Pass, idx: Tensor, noise: Tensor) -> Tensor:
    """The objective on the training rows ``idx`` from unit ``noise``: one forward pass."""
    return run.objective(run.model, run.solver, run.train, idx, noise, run.loss, run.use_checkpoint)


def _accumulate(run: _Pass, idx: Tensor, off: Tensor | None, scale: float, batch: int | None = None) -> Tensor:
    """The loss of rows ``idx`` of a batch of ``batch`` rows (default: ``idx`` is the whole batch), weighted by
    their share of it and backpropagated in micro-batches of ``run.micro_batch`` samples (gradients accumulate:
    the same gradient as the whole batch at once, with memory for a micro-batch only). ``off`` (len(idx), ...):
    the rows' relaxed latents less their noise, in units of the schedule's noise ``scale`` (None: no relaxation)."""
    mb = run.micro_batch or max(1, idx.numel())
    batch = batch or idx.numel()
    total = torch.zeros((), dtype=torch.float64)
    for a in range(0, idx.numel(), mb):
        part = idx[a : a + mb]
        noise = run.train.noise[part] if off is None else run.train.noise[part] + off[a : a + mb] / scale
        L = _objective(run, part, noise)
        L = L * (part.numel() / batch)
        L.backward()
        total = total + L.detach().to(total.dtype)
    return total


@dataclass
class Budget:
    """What a fit may still spend: ``limit`` less what was spent before the counter's baseline (``before``:
    the teacher's recorded cost) and what ``model.cost`` recorded since ``base``, keeping ``reserve`` evaluations
    for after the phases (the closing validations)."""

    limit: int
    model: Denoiser
    before: int
    base: int
    reserve: int = 0

    def spent(self) -> int:
        """Spent so far by the whole run (under several processes: summed over them, a collective)."""
        return self.before + current().sum_ints([self.model.cost.total - self.base])[0]

    def allows(self, more: int) -> bool:
        """Can ``more`` evaluations be spent and the reserve still be left?"""
        return self.spent() + (more + self.reserve) <= self.limit


@dataclass
class Hooks:
    """What a fit reports to on its way: a progress bar, a checkpoint after each validation, and the name of
    where a restored state came from (for errors)."""

    progress: Any = None
    on_eval: Callable[[FitState, torch.optim.Optimizer], None] | None = None
    source: str = "the fit checkpoint"


@dataclass
class FitSession:
    """What one fit works on, beside its phases: the model, the solver being fitted, the teacher data, the
    settings, the relaxed latents (LD3), the budget and the hooks."""

    model: Denoiser
    solver: LearnedSolver
    train: TeacherData
    val: TeacherData
    cfg: FitConfig = field(default_factory=FitConfig)
    relax: Relax | None = None
    budget: Budget | None = None
    hooks: Hooks = field(default_factory=Hooks)


def optimise(session: FitSession, phase: Phase, state: FitState | None = None, steps: int | None = None) -> FitState:
    """Run ``phase`` (its parameter groups, learning rates, optimizer and batch) for ``steps`` steps
    (default: the phase's), continuing ``state``, on the objective of ``session.cfg``'s method.

    Keeps (in ``state.best``) the parameters with the best validation RMSE, starting from the current
    parameters, so the result is never worse on validation than the start. ``state.opt_state`` (if set)
    restores the optimizer; ``session.hooks.on_eval(state, opt)`` runs after every validation (a checkpoint hook).
    """
    state = state or FitState()
    run = _PhaseRun.open(session, phase, state)
    if state.best is None and not run.first_validation(state):
        return state  # the budget does not cover even one validation
    run.run_steps(state, phase.steps if steps is None else steps)
    return state


#: one noise group's pass: its rows, their relaxed latents (or None), its loss and its gradients
_GroupPass = tuple[Tensor, Tensor | None, Tensor, list[Tensor | None]]


@dataclass
class _PhaseRun:
    """One call of :func:`optimise`: the optimiser over the phase's parameter groups and the steps' context."""

    session: FitSession
    phase: Phase
    opt: torch.optim.Optimizer
    params: list[Tensor]  # the parameters that move, in the optimiser's order
    groups: int  # noise groups (:func:`noise_groups`)
    work: _Pass
    offsets: Tensor | None  # the relaxed latents less their noise (K, ...), or None
    radius: float  # of the relaxation ball
    base_lrs: list[float]
    bad: int = 0  # failed steps in a row

    @classmethod
    def open(cls, session: FitSession, phase: Phase, state: FitState) -> _PhaseRun:
        """The optimiser of ``phase`` (restored from ``state.opt_state`` if set) and the relaxed latents."""
        cfg, solver, train = session.cfg, session.solver, session.train
        d, G = current(), noise_groups(cfg.execution.noise_groups)
        params, opt = _optimizer(solver, phase, state, session.hooks.source)
        loss = per_sample_loss(cfg.training.loss)
        objective = method_info(cfg.method).objective
        use_checkpoint = bool(cfg.execution.use_checkpoint)
        offsets, relax, radius = None, session.relax, 0.0
        if relax is not None:
            if relax.offsets is None:
                relax.offsets = torch.zeros_like(train.noise)
            offsets = relax.offsets
            relax.mine = torch.arange(len(train)) % G % d.world == d.rank  # the latents this process updates
            radius = relax.radius(session.model, int(train.noise[0].numel()))
        work = _Pass(session.model, solver, train, objective, loss, use_checkpoint, cfg.execution.micro_batch)
        return cls(session, phase, opt, params, G, work, offsets, radius, [g["lr"] for g in opt.param_groups])

    def first_validation(self, state: FitState) -> bool:
        """Validate the start (the best so far); False, with the state exhausted, if the budget does not allow it."""
        s = self.session
        if s.budget is not None and not s.budget.allows(forward_cost(s.cfg, len(s.val))):
            state.exhausted = True
            _freeze(s.solver)
            return False
        state.best_val = mean_val_error(s.model, s.solver, s.val, groups=s.cfg.execution.noise_groups)
        state.best = {k: v.detach().clone() for k, v in s.solver.state_dict().items()}
        return True

    def run_steps(self, state: FitState, steps: int) -> None:
        """Take ``steps`` steps (fewer if the budget runs out), validating every ``eval_every`` and at the end."""
        s, cfg = self.session, self.session.cfg
        warm = max(1, min(50, self.phase.steps // 10)) if cfg.training.warmup else 1
        t0 = time.perf_counter()
        for it in range(steps):
            # linear warm-up: Adam's first steps move every coefficient by about lr at once, which can
            # throw a solver in a sensitive basis (E near the noise end) far from its start
            for group, lr in zip(self.opt.param_groups, self.base_lrs, strict=True):
                group["lr"] = lr * min(1.0, (state.phase_step + 1) / warm)
            idx = _batch_index(len(s.train), self.phase.batch, cfg.seed, state.step)
            validates = (it + 1) % cfg.training.eval_every == 0 or it == steps - 1
            if s.budget is not None and not s.budget.allows(
                step_cost(cfg, idx.numel()) + (forward_cost(cfg, len(s.val)) if validates else 0)
            ):
                state.exhausted = True  # the next step would cross the budget: stop with the best so far
                break
            L = self.step(state, idx)
            state.step += 1
            state.phase_step += 1
            if s.hooks.progress is not None:
                s.hooks.progress.update(1)
                s.hooks.progress.set_postfix_str(
                    f"{self.phase.label} loss {float(L.detach()):.3g} val {state.best_val:.4g}"
                )
            if validates:
                self.validate(state, L)
                state.seconds += time.perf_counter() - t0
                t0 = time.perf_counter()
                if s.hooks.on_eval is not None:
                    s.hooks.on_eval(state, self.opt)
        state.seconds += time.perf_counter() - t0
        state.opt_state = copy.deepcopy(self.opt.state_dict())  # a phase stopped part-way goes on with its moments
        _freeze(s.solver)

    def step(self, state: FitState, idx: Tensor) -> Tensor:
        """One optimisation step on the training rows ``idx``; its loss (inf if the solve blew up)."""
        d = current()
        parts, blew = self.passes(d, idx)
        fault(f"fit step {state.step}")
        L, failed, off_ok = _reduce_step(d, self.groups, self.params, parts, blew)
        if not failed:
            self.opt.step()
            self.bad = 0
        else:
            self.bad += 1
            state.skipped += 1
            if self.bad >= 10 and state.best is not None:  # stuck where every solve blows up: back to the best
                restore_best(self.session.solver, state)
                self.opt.state.clear()
                self.bad = 0
        if self.offsets is not None and not failed and off_ok:
            self.move_latents(parts)
        return L

    def passes(self, d: Dist, idx: Tensor) -> tuple[list[_GroupPass], bool]:
        """The batch's noises in groups (noise i in group i % G), each its own forward/backward pass: this process
        runs the groups it owns (all of them for one process); each group's (rows, latents, loss, gradients), and
        whether a solve blew up (the step is then skipped)."""
        G = self.groups
        parts: list[_GroupPass] = []
        scale = self.session.model.schedule.init_noise_scale()
        for g in d.groups(G):
            rows = idx if G == 1 else idx[idx % G == g]
            off = self.offsets[rows].clone().requires_grad_(True) if self.offsets is not None else None
            self.opt.zero_grad(set_to_none=True)
            try:
                Lg = _accumulate(self.work, rows, off, scale, idx.numel())
            except ModelOutputError:  # the solve blew up at these parameters: skip the step
                return parts, True
            parts.append((rows, off, Lg, [p.grad for p in self.params]))
        return parts, False

    def move_latents(self, parts: list[_GroupPass]) -> None:
        """LD3's latent step: each relaxed latent moves ``relax.lr`` x radius against its normalised gradient,
        projected back into its ball."""
        relax, offsets = self.session.relax, self.offsets
        assert relax is not None and offsets is not None  # only called with relaxed latents
        for rows, off, _, _ in parts:
            if off is None or off.grad is None:
                continue
            with torch.no_grad():
                gn = off.grad.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, *[1] * (off.dim() - 1))
                offsets[rows] = relax.project(off - relax.lr * self.radius * off.grad / gn, self.radius)

    def validate(self, state: FitState, L: Tensor) -> None:
        """Record the validation RMSE in the history; keep the parameters if they are the best so far."""
        s = self.session
        v = mean_val_error(s.model, s.solver, s.val, groups=s.cfg.execution.noise_groups)
        state.history.append({"step": state.step, "loss": finite_or_none(float(L.detach())), "val": finite_or_none(v)})
        if v < state.best_val:  # NaN and inf never win
            state.best_val = v
            state.best = {k: x.detach().clone() for k, x in s.solver.state_dict().items()}


def _optimizer(
    solver: LearnedSolver, phase: Phase, state: FitState, source: str
) -> tuple[list[Tensor], torch.optim.Optimizer]:
    """(the parameters ``phase`` moves, its optimiser): only those require gradients; the optimiser's state is
    restored from ``state.opt_state`` if set (at the phase's base rates, not the saved warm-up ones)."""
    groups = solver.coef_groups()
    params: list[dict[str, Any]] = [{"params": groups[g], "lr": lr} for g, lr in phase.lrs.items() if lr > 0]
    plist: list[Tensor] = [p for group in params for p in group["params"]]
    _freeze(solver)
    for p in plist:
        p.requires_grad_(True)
    opt = _make_optimizer(phase.optimizer, params)
    if state.opt_state is not None:
        _restore_optimizer(opt, state.opt_state, phase, source)
        for restored, group in zip(opt.param_groups, params, strict=True):
            restored["lr"] = group["lr"]
    return plist, opt


def _freeze(solver: LearnedSolver) -> None:
    for p in solver.parameters():
        p.requires_grad_(False)


def _reduce_step(
    d: Dist, G: int, plist: list[Tensor], parts: list[_GroupPass], blew: bool
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
