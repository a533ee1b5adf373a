"""The fitting methods by name, as data (as :mod:`fewstep.solvers.registry` holds the classic solvers).

A :class:`FitMethod` says everything that tells one method from another: its default fit (:class:`.Sizes`),
its phases, optimiser, the learned solver's form (:class:`SolverForm`), its relaxation, its objective (and so
whether the teacher keeps its states). Nothing else names a method: a fifth method is one more
:func:`register` call.

- ``s4s``: coefficients only (last k evaluations, free rows, a learned corrector), grid fixed.
- ``s4s-alt``: grid (with decoupled evaluation times) and coefficient phases in turn, then a polish.
- ``ld3``: the grid only (the start's normalised coefficients held), relaxed objective.
- ``dss``: grid (softmax steps) and full-history coefficients with rows summing to one, jointly, Lion,
  per-step state MSE to the teacher's states plus 1000 x Huber(1e-3) on the final sample, then a polish.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import FewstepError
from .config import FitConfig, Phase, Sizes
from .objectives import FinalSample, Objective, StatesAndFinal

#: default (coefficient, grid) learning rates per optimiser: coefficients want large Adam steps (BENCHMARKS.md);
#: Lion takes the DSS paper's constant rate
RATES: dict[str, tuple[float, float]] = {"adam": (3e-2, 5e-2), "lion": (1e-2, 1e-2)}


@dataclass(frozen=True)
class SolverForm:
    """The learned solver a method fits from its start (:func:`.methods.from_classic`).

    ``corrector``: True learns one by default (not from a noise-prediction start, where fits diverged:
    BENCHMARKS.md, section 2); None keeps what the start has. ``scale_a``: learn a scale of each step's carried
    state a_i by default (it absorbs the linear part of the ODE a basis does not integrate exactly).
    ``settable``: which of the two the fit's settings may change.
    """

    rows_sum_to_one: bool = False  # DSS's form: full-history coefficients, rows summing to one, predictor only
    decouple: bool = False  # evaluation times move apart from the grid (by the ``decouple`` setting)
    corrector: bool | None = None
    scale_a: bool = False
    settable: frozenset[str] = frozenset({"corrector", "scale_a"})

    def corrector_for(self, setting: bool | None, basis: str) -> bool | None:
        """Learn a corrector for a start of ``basis`` (None: as the start has), given the ``corrector`` setting."""
        if "corrector" in self.settable and setting is not None:
            return setting
        return None if self.corrector and basis == "E" else self.corrector

    def scale_a_for(self, setting: bool | None) -> bool:
        """Learn the carried-state scales, given the ``scale_a`` setting."""
        return self.scale_a if "scale_a" not in self.settable or setting is None else bool(setting)


@dataclass(frozen=True)
class PhaseSettings:
    """What a method's phase plan builds its phases from (the settings resolved for the method)."""

    label: str  # the method's name
    steps: int
    batch: int
    optimizer: str
    lr_coef: float
    lr_grid: float
    rounds: int | None  # alternations (None: the method does not alternate)


PhasePlan = Callable[[PhaseSettings], list[Phase]]


@dataclass(frozen=True)
class FitMethod:
    """One fitting method (see the module's docstring)."""

    name: str
    doc: str
    sizes: Sizes  # the default fit size (the paper's, or measured: below)
    phases: PhasePlan
    form: SolverForm
    optimizer: str = "adam"
    min_batch: int = 1  # training noises per step at least, whatever the batch setting
    rounds: Callable[[int], int] | None = None  # default alternations for a number of steps (alternating plans)
    relax: float = 0.0  # default relaxation ball radius (relative to the noise norm; 0: none)
    objective: Objective = FinalSample()
    polish: float = 0.0  # default share of the steps spent on the last, joint phase at a tenth of the rates
    shapes: tuple[Sizes, ...] = ()  # measured fit shapes for budgets, smallest first (:func:`.budget.plan_for`)
    teacher_nfe: int | None = None  # the default teacher's NFE for this method (None: the schedule's default)

    @property
    def teacher_states(self) -> bool:
        """Does the teacher keep its states for this method's training noises?"""
        return self.objective.needs_states


METHODS: dict[str, FitMethod] = {}


def register(method: FitMethod) -> FitMethod:
    """Add ``method`` to :data:`METHODS` (under its name) and return it."""
    METHODS[method.name] = method
    return method


def method_info(name: str) -> FitMethod:
    """The registry entry of ``name`` (a FewstepError naming the valid ones otherwise)."""
    m = METHODS.get(name)
    if m is None:
        raise FewstepError(f"unknown method {name!r}; valid: {', '.join(METHODS)}")
    return m


# ----------------------------------------------------------------------------------------- phase plans
def coefficients(p: PhaseSettings) -> list[Phase]:
    """One phase that moves the coefficients."""
    return [Phase("coef", {"coef": p.lr_coef}, p.steps, p.optimizer, p.batch)]


def grid(p: PhaseSettings) -> list[Phase]:
    """One phase that moves the grid (and the evaluation times)."""
    return [Phase("grid", {"grid": p.lr_grid}, p.steps, p.optimizer, p.batch)]


def alternate(p: PhaseSettings) -> list[Phase]:
    """Grid and coefficient phases in turn (``rounds`` of each)."""
    rounds = p.rounds or 1
    per = max(1, p.steps // (2 * rounds))
    out = []
    for r in range(rounds):
        out.append(Phase(f"round {r + 1} grid", {"grid": p.lr_grid}, per, p.optimizer, p.batch))
        out.append(Phase(f"round {r + 1} coef", {"coef": p.lr_coef}, per, p.optimizer, p.batch))
    return out


def polish_phase(phases: list[Phase], steps: int) -> Phase:
    """A last phase of ``steps`` steps from the best so far that moves every parameter group ``phases`` move
    together, at a tenth of their rates: the iterate of a constant rate wanders around a minimum, a tenth of it
    settles there (and lets an alternating method move grid and coefficients at once)."""
    lrs: dict[str, float] = {}
    for ph in phases:
        for g, lr in ph.lrs.items():
            lrs[g] = max(lrs.get(g, 0.0), lr / 10)
    last = phases[-1]
    return Phase("polish", lrs, steps, last.optimizer, last.batch)


def joint(p: PhaseSettings) -> list[Phase]:
    """One phase that moves the grid and the coefficients together."""
    return [Phase(p.label, {"grid": p.lr_grid, "coef": p.lr_coef}, p.steps, p.optimizer, p.batch)]


def default_rounds(steps: int) -> int:
    """S4S-Alt's alternations for a fit of ``steps`` steps (its polish included): one per 75 steps, at most 8.

    Short phases do not settle before the other half of the parameters moves (measured: BENCHMARKS.md,
    the image model and the default-size study).
    """
    return max(1, min(8, steps // 75))


# ------------------------------------------------------------------------------------------- methods
#: Sizes: S4S and LD3 at their papers' training cost (S4S: 700 noises, batch 20, about 10 epochs counting the
#: screening; LD3: 100 noises); S4S-Alt and DSS at the shapes measured best for about the same spend (below). What
#: they cost and how they compare: BENCHMARKS.md, section 8.
register(
    FitMethod(
        "s4s",
        "coefficients only (last k evaluations, free rows, a learned corrector), grid fixed",
        sizes=Sizes(samples=700, batch=20, steps=220),
        phases=coefficients,
        form=SolverForm(corrector=True, scale_a=True),
    )
)
#: S4S-Alt's default and budget shapes were measured (BENCHMARKS.md, section 8, "Where a fit's evaluations go"):
#: at its former spend (363k on the zoo models) 400 noises at batch 36 for 600 steps with a 40-NFE teacher and a
#: last quarter polished beat 1,200 noises at batch 40 for 300 steps with a 100-NFE teacher on every zoo model
#: (gmm 0.35x against 0.57x the best classic); at 120k, 256 noises at batch 32 with 100 validation and 100
#: confirmation noises beat the default's shape scaled down (digits-eps 0.54x against 0.69x).
register(
    FitMethod(
        "s4s-alt",
        "grid (with decoupled evaluation times) and coefficient phases in turn",
        sizes=Sizes(samples=400, batch=36, steps=600),
        phases=alternate,
        form=SolverForm(decouple=True, corrector=True, scale_a=True),
        rounds=default_rounds,
        polish=0.25,
        shapes=(Sizes(256, 100, 100, 32, 150), Sizes(400, 200, 200, 36, 600)),
    )
)
register(
    FitMethod(
        "ld3",
        "the grid only (the start's normalised coefficients held), relaxed objective",
        sizes=Sizes(samples=100, batch=10, steps=100),
        phases=grid,
        form=SolverForm(settable=frozenset({"corrector"})),
        relax=0.05,
        # LD3's relaxed latents land each training noise on its teacher sample, so the teacher's error passes
        # straight into the fit; on 100 noises a finer teacher is cheap (digits-empirical NFE 5, 3 seeds: 0.73x
        # the best classic with a 100-NFE teacher, 0.85x with 40; BENCHMARKS.md, section 8)
        teacher_nfe=100,
    )
)
#: DSS's default was measured like S4S-Alt's (BENCHMARKS.md, section 8): 700 noises at batch 48 for 1,000 steps,
#: the last quarter polished, with a 40-NFE teacher (664k evaluations) beat 2,000 noises at batch 32 for 1,000
#: steps with a 100-NFE teacher (685k) on gmm (0.29x against 0.37x, and a fifth of its spread over seeds).
register(
    FitMethod(
        "dss",
        "grid and full-history coefficients with rows summing to one, jointly; states and final sample",
        sizes=Sizes(samples=700, batch=48, steps=1000),
        phases=joint,
        form=SolverForm(rows_sum_to_one=True, settable=frozenset()),
        optimizer="lion",
        min_batch=32,  # the paper's
        objective=StatesAndFinal(states=1.0, final=1000.0, delta=1e-3),
        polish=0.25,
    )
)


# ----------------------------------------------------------------------------------- settings per method
def method_defaults(method: str, nfe: int = 5, seed: int = 0) -> FitConfig:
    """The defaults of ``method``: its default fit size."""
    return FitConfig(method, nfe, seed, sizes=method_info(method).sizes)


def optimizer_name(cfg: FitConfig) -> str:
    """The optimiser setting, else the method's (Adam for the S4S family, Lion for DSS, as in their papers)."""
    return cfg.training.optimizer or method_info(cfg.method).optimizer


def learning_rates(cfg: FitConfig) -> tuple[float, float]:
    """(coefficients, grid) learning rates: ``cfg``'s, else the optimiser's defaults (:data:`RATES`)."""
    opt = optimizer_name(cfg)
    if opt not in RATES:
        raise FewstepError(f"unknown optimizer {opt!r}; valid: {', '.join(RATES)}")
    coef, grid_lr = RATES[opt]
    t = cfg.training
    return (t.lr_coef if t.lr_coef is not None else coef), (t.lr_grid if t.lr_grid is not None else grid_lr)


def resolve(cfg: FitConfig) -> FitConfig:
    """``cfg`` checked, with every default that depends on the method filled in (rounds, learning rates,
    optimiser), as the artifact records it."""
    m = method_info(cfg.method)
    cfg.check()
    lr_coef, lr_grid = learning_rates(cfg)
    rounds = cfg.training.rounds
    if rounds is None and m.rounds is not None:
        rounds = m.rounds(cfg.sizes.steps)
    polish = m.polish if cfg.training.polish is None else cfg.training.polish
    return cfg.with_options(
        rounds=rounds, lr_coef=lr_coef, lr_grid=lr_grid, optimizer=optimizer_name(cfg), polish=polish
    )


def plan_phases(cfg: FitConfig) -> list[Phase]:
    """The optimisation phases of ``cfg``'s method, then its polish (``polish`` of the steps; none at 0)."""
    m = method_info(cfg.method)
    lr_coef, lr_grid = learning_rates(cfg)
    steps = cfg.sizes.steps
    rounds = (cfg.training.rounds or m.rounds(steps)) if m.rounds is not None else None
    share = m.polish if cfg.training.polish is None else cfg.training.polish
    polish = min(steps - 1, int(steps * share))
    phases = m.phases(
        PhaseSettings(
            label=m.name,
            steps=steps - polish,
            batch=max(cfg.sizes.batch, m.min_batch),
            optimizer=optimizer_name(cfg),
            lr_coef=lr_coef,
            lr_grid=lr_grid,
            rounds=rounds,
        )
    )
    return phases + [polish_phase(phases, polish)] if polish > 0 else phases
