"""The fitting methods by name, as data (as :mod:`fewstep.solvers.registry` holds the classic solvers).

A :class:`FitMethod` says everything that tells one method from another: its paper-sized fit (:class:`.Sizes`),
its phases, optimiser, the learned solver's form (:class:`SolverForm`), its relaxation, its objective (and so
whether the teacher keeps its states). Nothing else names a method: a fifth method is one more
:func:`register` call.

- ``s4s``: coefficients only (last k evaluations, free rows, a learned corrector), grid fixed.
- ``s4s-alt``: grid (with decoupled evaluation times) and coefficient phases in turn.
- ``ld3``: the grid only (the start's normalised coefficients held), relaxed objective.
- ``dss``: grid (softmax steps) and full-history coefficients with rows summing to one, jointly, Lion,
  per-step state MSE to the teacher's states plus 1000 x Huber(1e-3) on the final sample.
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
    polish: float


PhasePlan = Callable[[PhaseSettings], list[Phase]]


@dataclass(frozen=True)
class FitMethod:
    """One fitting method (see the module's docstring)."""

    name: str
    doc: str
    sizes: Sizes  # the paper's fit size; a budget scales it (:func:`.budget.plan_for`)
    phases: PhasePlan
    form: SolverForm
    optimizer: str = "adam"
    min_batch: int = 1  # training noises per step at least, whatever the batch setting
    rounds: Callable[[int], int] | None = None  # default alternations for a number of steps (alternating plans)
    relax: float = 0.0  # default relaxation ball radius (relative to the noise norm; 0: none)
    objective: Objective = FinalSample()

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
    """Grid and coefficient phases in turn (``rounds`` of each), then a joint polish at a tenth of the rates from
    the best so far (``polish`` of the steps; none at 0)."""
    polish = int(p.steps * p.polish)
    rounds = p.rounds or 1
    per = max(1, (p.steps - polish) // (2 * rounds))
    out = []
    for r in range(rounds):
        out.append(Phase(f"round {r + 1} grid", {"grid": p.lr_grid}, per, p.optimizer, p.batch))
        out.append(Phase(f"round {r + 1} coef", {"coef": p.lr_coef}, per, p.optimizer, p.batch))
    if polish:
        out.append(Phase("polish", {"grid": p.lr_grid / 10, "coef": p.lr_coef / 10}, polish, p.optimizer, p.batch))
    return out


def joint(p: PhaseSettings) -> list[Phase]:
    """One phase that moves the grid and the coefficients together."""
    return [Phase(p.label, {"grid": p.lr_grid, "coef": p.lr_coef}, p.steps, p.optimizer, p.batch)]


def default_rounds(steps: int) -> int:
    """S4S-Alt's alternations for a budget of ``steps``: 8, but no round (a grid phase and a coefficient
    phase) shorter than 75 steps.

    Short phases do not settle before the other half of the parameters moves (measured: BENCHMARKS.md,
    the image model and the default-size study).
    """
    return max(1, min(8, steps // 75))


# ------------------------------------------------------------------------------------------- methods
#: Sizes: the papers' training cost, counting the screening (``screen_share`` of the steps for each of the 4
#: screened candidates, so the steps run about 1.6 times). S4S: 700 noises, batch 20, 10 epochs; S4S-Alt: 1,200
#: noises, batch 40, 16 epochs (K = 8 alternations of an epoch each in the paper; here 4 alternations); LD3: 100
#: noises; DSS: about 50k noise draws at batch 32. What they cost and how they compare with one size for every
#: method: BENCHMARKS.md, section 8.
register(
    FitMethod(
        "s4s",
        "coefficients only (last k evaluations, free rows, a learned corrector), grid fixed",
        sizes=Sizes(samples=700, batch=20, steps=220),
        phases=coefficients,
        form=SolverForm(corrector=True, scale_a=True),
    )
)
register(
    FitMethod(
        "s4s-alt",
        "grid (with decoupled evaluation times) and coefficient phases in turn",
        sizes=Sizes(samples=1200, batch=40, steps=300),
        phases=alternate,
        form=SolverForm(decouple=True, corrector=True, scale_a=True),
        rounds=default_rounds,
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
    )
)
register(
    FitMethod(
        "dss",
        "grid and full-history coefficients with rows summing to one, jointly; states and final sample",
        sizes=Sizes(samples=2000, batch=32, steps=1000),
        phases=joint,
        form=SolverForm(rows_sum_to_one=True, settable=frozenset()),
        optimizer="lion",
        min_batch=32,  # the paper's
        objective=StatesAndFinal(states=1.0, final=1000.0, delta=1e-3),
    )
)


# ----------------------------------------------------------------------------------- settings per method
def method_defaults(method: str, nfe: int = 5, seed: int = 0) -> FitConfig:
    """The defaults of ``method``: its paper's fit size."""
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
    return cfg.with_options(rounds=rounds, lr_coef=lr_coef, lr_grid=lr_grid, optimizer=optimizer_name(cfg))


def plan_phases(cfg: FitConfig) -> list[Phase]:
    """The optimisation phases of ``cfg``'s method."""
    m = method_info(cfg.method)
    lr_coef, lr_grid = learning_rates(cfg)
    steps = cfg.sizes.steps
    rounds = (cfg.training.rounds or m.rounds(steps)) if m.rounds is not None else None
    return m.phases(
        PhaseSettings(
            label=m.name,
            steps=steps,
            batch=max(cfg.sizes.batch, m.min_batch),
            optimizer=optimizer_name(cfg),
            lr_coef=lr_coef,
            lr_grid=lr_grid,
            rounds=rounds,
            polish=cfg.training.polish,
        )
    )
