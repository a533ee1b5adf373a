"""Fitting one method (:mod:`.registry` says what tells the methods apart) on the one learned-solver
parameterisation: the learned solver at a classic start (:func:`from_classic`), the classic starts ranked
(:func:`rank_classic`), candidates screened, the best run to the end (:func:`fit_solver`).

Every method starts from a classic solver (by default the best one on the validation noises) and keeps its
starting point when it cannot clearly beat it on the confirmation noises.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from ..cost import Cost
from ..denoiser import Denoiser
from ..distributed import current
from ..errors import FewstepError
from ..io import sha256_tensors
from ..sampling import build_tableau
from ..schedules import F64
from ..solvers.artifact import load_solver
from ..solvers.kernel import Tableau
from ..solvers.learned import LearnedSolver, step_scales, window_mask
from ..solvers.registry import classic_specs
from ..solvers.resolve import TableauSolver, is_artifact_spec
from .budget import SCREEN_KEEP, SCREEN_NOISES, closing_cost
from .checkpoint import FitCheckpoint, spent_before
from .config import FitConfig, Phase
from .loop import (
    Budget,
    FitSession,
    FitState,
    Hooks,
    Relax,
    clearly_better,
    finite_or_none,
    inference_batch,
    mean_val_error,
    restore_best,
    run_phases,
    val_errors,
)
from .registry import method_info, plan_phases
from .teacher import TeacherData


def from_classic(
    model: Denoiser,
    tab: Tableau,
    method: str,
    k: int = 3,
    rows_sum_to_one: bool = False,
    decouple: float = 0.0,
    corrector: bool | None = None,
    start: str = "",
    scale_a: bool = False,
    guidance: tuple[float, ...] | None = None,
) -> LearnedSolver:
    """A learned solver that reproduces the classic tableau ``tab`` exactly at initialisation."""
    n = tab.N
    a, phi = step_scales(model.schedule, tab.t, tab.basis)
    if not torch.allclose(a, tab.a, rtol=1e-9, atol=1e-12):
        raise FewstepError(f"cannot start from {tab.name}: its a_i are not those of basis {tab.basis}")
    W = tab.B / phi[:, None]
    if rows_sum_to_one:
        if tab.basis not in DSS_FORMS:
            raise FewstepError(
                f"DSS works in the velocity form (start from euler or adams2) or the data-prediction "
                f"form (ddim, dpmpp_2m); {tab.name} predicts noise: start from a solver of either form"
            )
        mask = dss_mask(n)
        outside = (tab.B != 0) & ~(mask | torch.eye(n, dtype=torch.bool))
        if outside.any():
            i = int(torch.nonzero(outside)[0, 0])
            raise FewstepError(
                f"cannot start DSS from {tab.name}: its step {i} uses evaluations that DSS's form leaves "
                f"out (at N <= 6 the last two steps use only the current and previous one); start "
                f"from a lower-order solver (e.g. ddim, dpmpp_2m, euler, adams2)"
            )
    else:
        mask = window_mask(n, k) | (tab.B != 0)
    use_c = tab.C is not None if corrector is None else corrector
    V = V_mask = None
    if use_c:
        # a step without a classic corrector starts with the corrector equal to its predictor
        # (the corrected state is then the predicted one), so the start stays exact
        V = torch.cat([W, torch.zeros(n, 1, dtype=F64)], 1)
        if tab.C is not None:
            has = (tab.C != 0).any(1)
            V[has] = tab.C[has] / phi[has, None]
        V_mask = window_mask(n, k, corrector=True) | (V != 0)
        V_mask[n - 1] = False
    s = LearnedSolver(
        model.schedule,
        tab.t,
        tab.basis,
        W,
        mask,
        V,
        V_mask,
        rows_sum_to_one=rows_sum_to_one,
        decouple=decouple,
        method=method,
        start=start,
        scale_a=scale_a,
        guidance=guidance,
    )
    if rows_sum_to_one:
        off = torch.tril(W, -1)
        if not torch.allclose(torch.diag(W), 1.0 - off.sum(1), atol=1e-8):
            raise FewstepError(f"cannot start DSS from {tab.name}: its rows do not sum to one")
    return s


def dss_mask(n: int) -> Tensor:
    """DSS's free coefficients (N, N): the full history, but at N <= 6 the last two steps use only
    the previous evaluation beside the current one (the diagonal is implicit: rows sum to one)."""
    mask = window_mask(n, n)
    if n <= 6:
        mask[max(0, n - 2) :] &= window_mask(n, 2)[max(0, n - 2) :]
    return torch.tril(mask, -1)


#: DSS's two forms: the flow form (velocity, x_{i+1} = x_i + dt_i vhat_i) and the VP form (data
#: prediction, x_{i+1} = sigma_{i+1}/sigma_i x_i + sigma_{i+1} (omega_{i+1} - omega_i) sum_j M_ij D_j).
#: Either applies to any schedule; a fit takes the form of its start, so the better start decides
#: (on digits-eps the flow form wins clearly: BENCHMARKS.md, section 2).
DSS_FORMS = ("v", "D")


def dss_start_ok(model: Denoiser, tab: Tableau) -> bool:
    """Can DSS start from ``tab``: a predictor in one of DSS's forms whose rows fit DSS's mask."""
    n = tab.N
    allowed = dss_mask(n) | torch.eye(n, dtype=torch.bool)
    return tab.C is None and tab.basis in DSS_FORMS and not ((tab.B != 0) & ~allowed).any()


@torch.no_grad()
def rank_classic(
    model: Denoiser,
    nfe: int,
    val: TeacherData,
    predictor_only: bool = False,
    candidates: list[str] | None = None,
    accept: Callable[[Tableau], bool] | None = None,
    groups: int | None = None,
) -> list[tuple[float, str]]:
    """(validation RMSE to the teacher, 'NAME@GRID') of the best classic starts at ``nfe``, best first.

    Every candidate is screened on the first SCREEN_NOISES validation noises; the best SCREEN_KEEP are then
    ranked on all of them (the spend :mod:`.budget` predicts). ``accept(tableau)`` filters the candidates
    (e.g. the starts a method can represent).
    """
    tabs = []
    for spec in candidates or classic_specs(model.schedule):
        try:
            tab = build_tableau(model, spec, nfe)
        except FewstepError:
            continue
        if tab.staged or nfe != tab.N:  # internal stages: no learned solver starts from them
            continue
        if (predictor_only and tab.C is not None) or (accept is not None and not accept(tab)):
            continue
        tabs.append((spec, tab))
    screen = val if len(val) <= SCREEN_NOISES else val[:SCREEN_NOISES]
    scored = sorted(
        (v, i) for i, (spec, tab) in enumerate(tabs) for v in [_score(model, tab, screen, groups)] if math.isfinite(v)
    )
    if len(screen) == len(val):
        return [(v, tabs[i][0]) for v, i in scored]
    kept = [(_score(model, tabs[i][1], val, groups), tabs[i][0]) for _, i in scored[:SCREEN_KEEP]]
    return sorted(r for r in kept if math.isfinite(r[0]))


def _score(model: Denoiser, tab: Tableau, val: TeacherData, groups: int | None = None) -> float:
    try:
        return mean_val_error(model, TableauSolver(tab), val, groups=groups)
    except FewstepError:
        return math.inf


@dataclass
class FitOutcome:
    """What :func:`fit_solver` returns: the solver (the fitted one, or its start if the fit did not clearly help),
    its validation and confirmation RMSE to the teacher against its start's, and how the fit went."""

    solver: LearnedSolver
    start: str
    start_val: float
    val: float
    kept_start: bool
    state: FitState
    ranking: list[tuple[float, str]] = field(default_factory=list)
    resumed_from: int = 0  # the global step a checkpoint restored (0: a fresh fit)
    confirm: float | None = None  # RMSE to the teacher on the confirmation noises (None: no confirmation set)
    confirm_start: float | None = None
    notes: list[str] = field(default_factory=list)  # what went wrong on the way (blown-up solves), in words
    screened: list[dict[str, Any]] = field(default_factory=list)  # the candidates screened and their validation
    seed: int = 0  # the batch order of the candidate that went on
    estimate: dict[str, Any] = field(default_factory=dict)  # the fit's RMSE to the teacher on noises nothing chose on
    spent_before: Cost = field(default_factory=Cost)  # what the interrupted runs spent up to the checkpoint resumed


def _build(
    model: Denoiser, cfg: FitConfig, start: str, tab: Tableau | None = None, learn: bool = True
) -> LearnedSolver:
    """The learned solver of ``cfg``'s method at ``start`` (``learn=False``: exactly the start, no extra
    corrector)."""
    tab = tab if tab is not None else build_tableau(model, start, cfg.nfe)
    form, t = method_info(cfg.method).form, cfg.training
    return from_classic(
        model,
        tab,
        cfg.method,
        k=t.k,
        rows_sum_to_one=form.rows_sum_to_one,
        decouple=t.decouple if learn and form.decouple else 0.0,
        corrector=form.corrector_for(t.corrector, tab.basis) if learn else None,
        start=start,
        scale_a=learn and form.scale_a_for(t.scale_a),
        guidance=model.guidance_scales() if learn else None,
    )


def _from_artifact(model: Denoiser, cfg: FitConfig, path: str) -> LearnedSolver:
    """The trainable solver saved in a learned-solver artifact, checked against the model and ``cfg``."""
    loaded = load_solver(path)
    loaded.check(model)
    if loaded.nfe != cfg.nfe or loaded.doc["method"] != cfg.method:
        raise FewstepError(
            f"{path} is a {loaded.doc['method']} solver at NFE {loaded.nfe}; refine it with "
            f"--method {loaded.doc['method']} --nfe {loaded.nfe}"
        )
    s = loaded.learned()
    s.start = str(path)
    return s


@dataclass
class _Candidate:
    """One way a fit can go: a start and a batch order, with its solver and its state."""

    start: str
    seed: int
    solver: LearnedSolver
    start_solver: LearnedSolver
    relax: Relax | None
    state: FitState = field(default_factory=FitState)


def _candidate(model: Denoiser, cfg: FitConfig, start: str, seed: int) -> _Candidate:
    if is_artifact_spec(start):  # refine a learned solver: its own parameters are the start
        start_solver = _from_artifact(model, cfg, start)
        solver = copy.deepcopy(start_solver)
    else:
        tab = build_tableau(model, start, cfg.nfe)
        start_solver = _build(model, cfg, start, tab, learn=False)
        solver = _build(model, cfg, start, tab)
    radius = cfg.training.relax if cfg.training.relax > 0 else method_info(cfg.method).relax
    return _Candidate(start, seed, solver, start_solver, Relax(radius) if radius > 0 else None)


def screen_seeds(cfg: FitConfig) -> list[int]:
    """The batch orders a fit screens: cfg.seed and ``screen_seeds - 1`` others derived from it."""
    return [cfg.seed + 7919 * k for k in range(max(1, cfg.screening.screen_seeds))]


def screen_steps(cfg: FitConfig, candidates: int) -> int:
    """Steps each screened candidate runs before the best on validation goes on (0: no screening)."""
    share = cfg.screening.screen_share
    return 0 if candidates < 2 else max(cfg.training.eval_every, int(cfg.sizes.steps * share / candidates))


@dataclass
class _Fit:
    """What every candidate of one fit shares: the model, settings, teacher data, phases, budget and hooks; the
    checkpoint and what it held when the fit began (None: a fresh fit); the classic ranking and the screened
    candidates, which the checkpoint records beside the state."""

    model: Denoiser
    cfg: FitConfig
    train: TeacherData
    val: TeacherData
    phases: list[Phase]
    budget: Budget | None
    hooks: Hooks
    checkpoint: FitCheckpoint | None
    saved: dict[str, Any] | None
    ranking: list[tuple[float, str]] = field(default_factory=list)
    screened: list[dict[str, Any]] = field(default_factory=list)

    def session(self, cand: _Candidate, on_eval: Callable[[FitState, Any], None] | None = None) -> FitSession:
        """The loop's session of ``cand`` (its solver, latents and batch order)."""
        cfg = replace(self.cfg, seed=cand.seed)
        hooks = replace(self.hooks, on_eval=on_eval)
        return FitSession(self.model, cand.solver, self.train, self.val, cfg, cand.relax, self.budget, hooks)

    def record(self, cand: _Candidate) -> dict[str, Any]:
        """What a checkpoint records beside ``cand``'s state: its start and batch order, the ranking, the screening."""
        return {
            "start": cand.start,
            "seed": cand.seed,
            "ranking": [list(r) for r in self.ranking],
            "screened": self.screened,
        }

    def resume(self, cand: _Candidate) -> FitState:
        """``cand``'s state (and parameters) restored from the checkpoint :meth:`FitCheckpoint.peek` found."""
        assert self.checkpoint is not None  # only called when the checkpoint held this fit
        got = self.checkpoint.load(cand.solver, cand.relax)
        if got is None:
            raise FewstepError(
                f"fit checkpoint {self.checkpoint.path} went away while this fit resumed from it (another fit in the "
                f"same folder?): run the command again"
            )
        return got[0]


def _screen(fit: _Fit, cands: list[_Candidate]) -> _Candidate:
    """Run each candidate for a short stretch; the best on validation (ties: the first) goes on. A checkpoint
    after each candidate keeps the best finished one, so an interrupted screening goes on where it stopped."""
    until = screen_steps(fit.cfg, len(cands))
    if not until:
        return cands[0]
    steps = sum(p.steps for p in fit.phases)
    each = min(until, steps)  # a screening longer than the fit runs the whole fit
    progress = fit.hooks.progress
    if progress is not None:
        progress.total = steps + (len(cands) - 1) * each
        progress.refresh()
    best_k, done = None, 0
    if fit.saved is not None:  # resumed in the middle of screening
        scr = fit.saved["screening"]
        done, best_k = int(scr["done"]), int(scr["best"])
        fit.screened += list(fit.saved.get("screened", []))
        cands[best_k].state = fit.resume(cands[best_k])
        if progress is not None:
            progress.update(done * each)
    for k in range(done, len(cands)):
        c = cands[k]
        c.state = run_phases(fit.session(c), fit.phases, c.state, until=until)
        fit.screened.append({"start": c.start, "seed": c.seed, "val_rmse": finite_or_none(c.state.best_val)})
        if best_k is None or c.state.best_val < cands[best_k].state.best_val:
            best_k = k
        if fit.checkpoint is not None:
            b = cands[best_k]
            fit.checkpoint.save(
                b.state, b.solver, None, b.relax, {**fit.record(b), "screening": {"done": k + 1, "best": best_k}}
            )
    assert best_k is not None  # screening runs at least two candidates (until > 0), or resumes with its best
    return cands[best_k]


def _check_same_everywhere(solver: LearnedSolver) -> None:
    """Under several processes: every process must hold the same fitted parameters (they take the same steps
    from the same all-reduced gradients); a difference would be a bug, not a result."""
    d = current()
    if d.world == 1:
        return
    if len(set(d.all_gather_object(sha256_tensors(solver.state_dict())))) > 1:
        raise FewstepError(
            "the processes of this run ended with different solver parameters (a collective that is "
            "not deterministic?): run it again with one process and report this"
        )


def fit_solver(
    model: Denoiser,
    train: TeacherData,
    val: TeacherData,
    cfg: FitConfig,
    progress: Any = None,
    checkpoint: FitCheckpoint | None = None,
    confirm: TeacherData | None = None,
    already_spent: int = 0,
) -> FitOutcome:
    """Fit one method; returns the learned solver (or its start if the fit did not clearly help).

    A fit screens candidates first: the best ``screen_starts`` classic starts (on the validation
    noises; a given start alone), each with ``screen_seeds`` batch orders, run for a short stretch
    (``screen_share`` of the steps, shared among them); the best on validation continues to the end.
    The best parameters are chosen on ``val``; whether they beat the start is decided by a paired
    test on ``confirm`` (noises the choice never saw: choosing the best of many checkpoints on the
    same noises flatters it), or on ``val`` when no confirmation set is given.
    With ``checkpoint``, the state is saved after every validation after screening and a matching
    checkpoint is resumed from; the result is the same as that of an uninterrupted fit. With a
    ``budget``, the fit stops before a step that would spend more than the budget (``already_spent``
    counts toward it: the teacher; so does what a resumed fit's earlier runs spent, which the checkpoint
    records and ``FitOutcome.spent_before`` returns). Validation solves in ``micro_batch`` noises at a
    time when one is set.
    """
    method_info(cfg.method)  # a known method, before any work
    with inference_batch(cfg.execution.micro_batch):
        saved = checkpoint.peek() if checkpoint is not None else None
        before = spent_before(saved)  # a resumed fit's earlier runs count: toward its budget and in its cost
        if checkpoint is not None:
            checkpoint.count_from(model, before)
        fit = _Fit(
            model,
            cfg,
            train,
            val,
            plan_phases(cfg),
            _budget(model, cfg, len(val), len(confirm) if confirm is not None else 0, already_spent + before.total),
            Hooks(progress, None, str(checkpoint.path) if checkpoint is not None else "the fit checkpoint"),
            checkpoint,
            saved,
        )
        best, resumed = _winner(fit)
        state = run_phases(fit.session(best, _checkpoint_hook(fit, best)), fit.phases, best.state)
        outcome = _close(fit, best, state, confirm)
        outcome.resumed_from, outcome.spent_before = resumed, before
        return outcome


def _budget(model: Denoiser, cfg: FitConfig, val: int, confirm: int, spent: int) -> Budget | None:
    """The fit's budget (None without one): what is left after ``spent``, keeping the closing validations of the
    fitted solver and its start on ``val`` and ``confirm`` noises."""
    limit = cfg.execution.budget
    if limit is None:
        return None
    return Budget(limit, model, spent, model.cost.total, reserve=closing_cost(cfg, val, confirm))


def _winner(fit: _Fit) -> tuple[_Candidate, int]:
    """(the candidate that goes on to the end, the global step it resumes from): the one a checkpoint taken after
    screening holds, or the best of the screening (resumed where it stopped, if it did)."""
    cfg, saved = fit.cfg, fit.saved
    if saved is not None and saved.get("screening") is None:  # screening was done: go on with its winner
        fit.ranking = [tuple(r) for r in saved["ranking"]]
        best = _candidate(fit.model, cfg, saved["start"], int(saved.get("seed", cfg.seed)))
        best.state = fit.resume(best)
        fit.screened = saved.get("screened", [])
        if fit.hooks.progress is not None:
            fit.hooks.progress.update(best.state.step)
        return best, best.state.step
    fit.ranking = [tuple(r) for r in saved["ranking"]] if saved is not None else _ranking(fit)
    t = cfg.training
    starts = [t.start] if t.start else [s for _, s in fit.ranking[: max(1, cfg.screening.screen_starts)]]
    if not starts:
        raise FewstepError(f"no classic solver runs at NFE {cfg.nfe} on this model to start from")
    cands = [_candidate(fit.model, cfg, st, seed) for st in starts for seed in screen_seeds(cfg)]
    return _screen(fit, cands), int(saved["step"]) if saved is not None else 0


def _ranking(fit: _Fit) -> list[tuple[float, str]]:
    """The classic starts the method can represent, best first on validation ([] when a start is given)."""
    cfg = fit.cfg
    if cfg.training.start is not None:
        return []
    rows_sum_to_one = method_info(cfg.method).form.rows_sum_to_one  # DSS's form takes only some starts
    model = fit.model
    accept = (lambda tab: dss_start_ok(model, tab)) if rows_sum_to_one else None
    return rank_classic(
        model, cfg.nfe, fit.val, predictor_only=rows_sum_to_one, accept=accept, groups=cfg.execution.noise_groups
    )


def _checkpoint_hook(fit: _Fit, best: _Candidate) -> Callable[[FitState, Any], None] | None:
    """Save the state of ``best`` after every validation (None without a checkpoint)."""
    checkpoint = fit.checkpoint
    if checkpoint is None:
        return None
    extra = fit.record(best)

    def on_eval(st: FitState, opt: Any) -> None:
        checkpoint.save(st, best.solver, opt, best.relax, extra)

    return on_eval


def _close(fit: _Fit, best: _Candidate, state: FitState, confirm: TeacherData | None) -> FitOutcome:
    """The best parameters on validation, or the start if they do not clearly beat it (on the confirmation noises
    if there are some), with the errors of both and notes on what went wrong."""
    solver = best.solver
    restore_best(solver, state)
    _check_same_everywhere(solver)
    model, val, G = fit.model, fit.val, fit.cfg.execution.noise_groups
    start_err = val_errors(model, best.start_solver, val, groups=G)
    err = val_errors(model, solver, val, groups=G)
    co = co_start = None
    if confirm is not None:
        co = val_errors(model, solver, confirm, groups=G)
        co_start = val_errors(model, best.start_solver, confirm, groups=G)
        kept = not clearly_better(co, co_start)
    else:
        kept = not clearly_better(err, start_err)
    if kept:  # the fit did not clearly help: return the starting solver itself
        solver, err, co = best.start_solver, start_err, co_start
    if co is not None and co_start is not None:  # on the confirmation noises, which chose nothing
        estimate = fit_estimate(co, co_start, True)
    else:
        estimate = fit_estimate(err, start_err, False)
    return FitOutcome(
        solver,
        best.start,
        float(start_err.mean()),
        float(err.mean()),
        kept,
        state,
        fit.ranking,
        confirm=None if co is None else float(co.mean()),
        confirm_start=None if co_start is None else float(co_start.mean()),
        notes=_notes(state, kept),
        screened=fit.screened,
        seed=best.seed,
        estimate=estimate,
    )


def _notes(state: FitState, kept: bool) -> list[str]:
    """What went wrong on the way, in words: steps and validations where the student's solve blew up."""
    blown = sum(1 for h in state.history if h.get("val") is None)
    if not state.skipped and not blown:
        return []
    return [
        f"the student's solve blew up (NaN/inf) at {state.skipped} of {state.step} steps and "
        f"{blown} of {len(state.history)} validations; those were skipped and never chosen"
        + ("; the start was kept" if kept else "")
        + " (lower --lr-coef / --lr-grid if this persists)"
    ]


def fit_estimate(errors: Tensor, start_errors: Tensor, unseen: bool) -> dict[str, Any]:
    """The fit's own estimate of its RMSE to the teacher, with its standard error: on the confirmation
    noises (``unseen``: neither the checkpoint nor the start was chosen on them), else on the validation
    noises, which chose the checkpoint and so flatter it."""
    n = errors.numel()
    sem = float(errors.std() / math.sqrt(n)) if n > 1 else float("nan")
    return {
        "rmse_to_teacher": float(errors.mean()),
        "sem": sem,
        "start_rmse_to_teacher": float(start_errors.mean()),
        "noises": n,
        "on": "confirmation" if unseen else "validation (it chose the checkpoint: optimistic)",
    }
