"""A fit's settings (:class:`FitConfig`) and the optimisation phases each method runs (:func:`plan_phases`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from ..seeds import fit_seeds, val_seeds

METHODS = ("s4s", "s4s-alt", "ld3", "dss")
LOSSES = ("l2", "mse", "l1")


@dataclass
class Phase:
    """One stretch of optimisation: which parameter groups move, how, for how many steps."""

    label: str
    lrs: dict[str, float]  # {'grid': lr, 'coef': lr}
    steps: int
    optimizer: str = "adam"
    batch: int = 20
    dss_weights: tuple[float, float] | None = None  # (trajectory, final) weights of DSS's objective
    restore_best: bool = True  # start from the best parameters found so far


@dataclass
class FitConfig:
    """A fit's settings (see :func:`fewstep.fit.api.fit`); :meth:`for_method` gives a method's defaults."""

    method: str = "s4s-alt"
    nfe: int = 5
    start: str | None = None  # NAME@GRID, or a learned-solver folder to refine; None: the best classic on validation
    k: int = 3
    samples: int = 1200  # training noises (defaults per method: METHOD_SIZES, via FitConfig.for_method)
    val_samples: int = 200  # validation noises (checkpoint selection)
    confirm_samples: int = 200  # confirmation noises (does the fit beat its start? 0: decide on validation)
    steps: int = 300  # optimisation steps of the candidate that goes on (screening adds screen_share of them)
    rounds: int | None = None  # S4S-Alt alternations (None: default_rounds(steps))
    batch: int = 40
    lr_coef: float | None = None  # None: 3e-2 with Adam, 1e-2 with Lion (the DSS paper's)
    lr_grid: float | None = None  # None: 5e-2 with Adam, 1e-2 with Lion
    decouple: float = 0.1
    relax: float = 0.0  # LD3 ball radius, relative to the noise norm; 0 disables
    loss: str | Callable = "l2"  # per-sample L2 distance; "mse" (its square), "l1", or a callable
    optimizer: str | None = None  # default: adam (S4S family), lion (DSS)
    eval_every: int = 25
    seed: int = 0
    use_checkpoint: bool | None = None  # recompute activations in backward (None: on CUDA yes, elsewhere no)
    corrector: bool | None = None  # learn a corrector (None: for s4s and s4s-alt, else only if the start has one)
    scale_a: bool | None = None  # also learn a scale of each step's carried state a_i (None: for s4s, s4s-alt)
    polish: float = 0.0  # S4S-Alt: fraction of the steps spent on a final joint phase at a tenth of the rates
    warmup: bool = True  # linear learning-rate warm-up over the first tenth (at most 50 steps) of each phase
    budget: int | None = None  # network evaluations (forward + backward, teacher included) the fit may spend
    micro_batch: int | None = None  # samples per forward/backward pass (gradients accumulated over the batch)
    noise_groups: int | None = None  # noise i in group i % G, each group its own pass (None: one per process)
    screen_starts: int = 2  # the best classic starts a fit screens (a given start alone)
    screen_seeds: int = 2  # batch orders screened per start
    screen_share: float = 0.2  # share of the steps the screened candidates run, together, before the best goes on

    @classmethod
    def for_method(cls, method: str, nfe: int = 5, seed: int = 0) -> FitConfig:
        """The defaults of ``method``: its paper's fit size (:data:`METHOD_SIZES`)."""
        return cls(method=method, nfe=nfe, seed=seed, **METHOD_SIZES.get(method, {}))

    def resolved(self) -> FitConfig:
        """This config checked, with every default that depends on the method filled in (rounds, learning
        rates, optimizer), as the artifact records it."""
        from ..errors import FewstepError

        if self.method not in METHODS:
            raise FewstepError(f"unknown method {self.method!r}; valid: {', '.join(METHODS)}")
        if self.nfe < 1:
            raise FewstepError(f"nfe must be at least 1; got {self.nfe}")
        for name in ("samples", "val_samples", "steps", "batch", "eval_every", "k"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise FewstepError(f"{name} must be a positive integer; got {v!r}")
        if (
            isinstance(self.confirm_samples, bool)
            or not isinstance(self.confirm_samples, int)
            or self.confirm_samples < 0
        ):
            raise FewstepError(f"confirm_samples must be an integer >= 0; got {self.confirm_samples!r}")
        if self.micro_batch is not None and not (isinstance(self.micro_batch, int) and self.micro_batch >= 1):
            raise FewstepError(f"micro_batch must be a positive integer; got {self.micro_batch!r}")
        if self.micro_batch is not None and self.micro_batch > self.batch:
            raise FewstepError(
                f"--micro-batch {self.micro_batch} is larger than the batch ({self.batch}): give a "
                f"micro-batch of at most {self.batch}"
            )
        if self.noise_groups is not None and (
            isinstance(self.noise_groups, bool) or not isinstance(self.noise_groups, int) or self.noise_groups < 1
        ):
            raise FewstepError(f"noise_groups must be a positive integer; got {self.noise_groups!r}")
        if self.budget is not None and (
            isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 1
        ):
            raise FewstepError(f"budget must be a positive number of network evaluations; got {self.budget!r}")
        if not callable(self.loss) and self.loss not in LOSSES:
            raise FewstepError(
                f"unknown loss {self.loss!r}; valid: {', '.join(LOSSES)} or a callable (student, target) -> (B,)"
            )
        lr_coef, lr_grid = learning_rates(self)
        rounds = self.rounds if self.rounds is not None or self.method != "s4s-alt" else default_rounds(self.steps)
        return replace(self, rounds=rounds, lr_coef=lr_coef, lr_grid=lr_grid, optimizer=optimizer_name(self))

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        if callable(d["loss"]):
            d["loss"] = getattr(d["loss"], "__name__", "callable")
        return d

    def fit_settings(self) -> dict[str, Any]:
        """:meth:`as_dict` without the settings that change how the fit runs but not what it computes
        (:data:`EXECUTION_ONLY`): what makes two fits the same fit (a checkpoint to resume, a finished artifact)."""
        return {k: v for k, v in self.as_dict().items() if k not in EXECUTION_ONLY}


#: settings that change how a fit runs, not its result (beyond float rounding): the micro-batch (gradients
#: accumulate over the batch either way) and activation checkpointing (the same forward, recomputed)
EXECUTION_ONLY = ("micro_batch", "use_checkpoint")


#: Default fit size per method: the papers' training cost, counting the screening (``screen_share`` of the
#: steps for each of the 4 screened candidates, so the steps below run about 1.6 times). S4S: 700 noises,
#: batch 20, 10 epochs; S4S-Alt: 1,200 noises, batch 40, 16 epochs (K = 8 alternations of an epoch each
#: in the paper; here 4 alternations); LD3: 100 noises; DSS: about 50k noise draws at batch 32. What they
#: cost and how they compare with one size for every method: BENCHMARKS.md, section 8.
METHOD_SIZES: dict[str, dict[str, Any]] = {  # method -> FitConfig fields
    "s4s": {"samples": 700, "batch": 20, "steps": 220},
    "s4s-alt": {"samples": 1200, "batch": 40, "steps": 300},
    "ld3": {"samples": 100, "batch": 10, "steps": 100},
    "dss": {"samples": 2000, "batch": 32, "steps": 1000},
}


def default_rounds(steps: int) -> int:
    """S4S-Alt's alternations for a budget of ``steps``: 8, but no round (a grid phase and a coefficient
    phase) shorter than 75 steps.

    Short phases do not settle before the other half of the parameters moves (measured: BENCHMARKS.md,
    the image model and the default-size study).
    """
    return max(1, min(8, steps // 75))


def optimizer_name(cfg: FitConfig) -> str:
    """Adam for the S4S family, Lion for DSS (as in their papers), unless ``cfg.optimizer`` says."""
    return cfg.optimizer or ("lion" if cfg.method == "dss" else "adam")


def learning_rates(cfg: FitConfig) -> tuple[float, float]:
    """(coefficients, grid) learning rates: ``cfg``'s, else 3e-2 / 5e-2 with Adam (coefficients want large
    steps; see BENCHMARKS.md) and 1e-2 / 1e-2 with Lion (the DSS paper's constant rate)."""
    lion = optimizer_name(cfg) == "lion"
    coef = cfg.lr_coef if cfg.lr_coef is not None else (1e-2 if lion else 3e-2)
    grid = cfg.lr_grid if cfg.lr_grid is not None else (1e-2 if lion else 5e-2)
    return coef, grid


def plan_phases(cfg: FitConfig) -> list[Phase]:
    """The optimisation phases of ``cfg.method``."""
    opt = optimizer_name(cfg)
    lr_coef, lr_grid = learning_rates(cfg)
    if cfg.method == "s4s":
        return [Phase("coef", {"coef": lr_coef}, cfg.steps, opt, cfg.batch)]
    if cfg.method == "ld3":
        return [Phase("grid", {"grid": lr_grid}, cfg.steps, opt, cfg.batch)]
    if cfg.method == "s4s-alt":
        polish = int(cfg.steps * cfg.polish)
        rounds = cfg.rounds or default_rounds(cfg.steps)
        per = max(1, (cfg.steps - polish) // (2 * rounds))
        out = []
        for r in range(rounds):
            out.append(Phase(f"round {r + 1} grid", {"grid": lr_grid}, per, opt, cfg.batch))
            out.append(Phase(f"round {r + 1} coef", {"coef": lr_coef}, per, opt, cfg.batch))
        if polish:  # grid and coefficients together at a tenth of the rates, from the best so far
            out.append(Phase("polish", {"grid": lr_grid / 10, "coef": lr_coef / 10}, polish, opt, cfg.batch))
        return out
    # dss: grid and coefficients jointly (the paper: Lion at 1e-2), batch at least the paper's 32
    return [
        Phase("dss", {"grid": lr_grid, "coef": lr_coef}, cfg.steps, opt, max(cfg.batch, 32), dss_weights=(1.0, 1000.0))
    ]


def seed_ranges(cfg: FitConfig) -> dict[str, list[int]]:
    """The fit's seed blocks: {"train": [lo, hi], "val": ..., "confirm": ...} (confirmation right after validation)."""
    tr, va = fit_seeds(cfg.samples, cfg.seed), val_seeds(cfg.val_samples, cfg.seed)
    co = val_seeds(cfg.confirm_samples, cfg.seed + cfg.val_samples)
    return {"train": [tr.start, tr.stop], "val": [va.start, va.stop], "confirm": [co.start, co.stop]}
