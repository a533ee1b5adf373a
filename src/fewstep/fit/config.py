"""A fit's settings (:class:`FitConfig`) in four parts: :class:`Sizes`, :class:`Training`, :class:`Execution`
and :class:`Screening`; the optimisation phase (:class:`Phase`); the fit's seed ranges.

Every setting has one flat name (the keywords of :func:`fewstep.fit.api.fit` and the command line's options),
which is its field name in its part. What depends on the method (its sizes, its phases, default rates) is in
:mod:`.registry`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

from ..errors import FewstepError
from ..seeds import fit_seeds, val_seeds

LOSSES = ("l2", "mse", "l1")


@dataclass
class Phase:
    """One stretch of optimisation: which parameter groups move, how, for how many steps."""

    label: str
    lrs: dict[str, float]  # {'grid': lr, 'coef': lr}
    steps: int
    optimizer: str = "adam"
    batch: int = 20
    restore_best: bool = True  # start from the best parameters found so far


@dataclass(frozen=True)
class Sizes:
    """How many noises a fit uses and how long it runs: what a budget sizes (:mod:`.budget`)."""

    samples: int = 1200  # training noises
    val_samples: int = 200  # validation noises (checkpoint selection)
    confirm_samples: int = 200  # confirmation noises (does the fit beat its start? 0: decide on validation)
    batch: int = 40  # training noises per step
    steps: int = 300  # optimisation steps of the candidate that goes on (screening adds screen_share of them)

    def check(self) -> None:
        """A FewstepError naming the first size that is not a positive integer (confirmation: >= 0)."""
        for name in ("samples", "val_samples", "steps", "batch"):
            _check_count(name, getattr(self, name), least=1)
        _check_count("confirm_samples", self.confirm_samples, least=0)


@dataclass(frozen=True)
class Training:
    """What the optimisation does: the start, the learned solver's options, rates, loss and validation."""

    start: str | None = None  # NAME@GRID, or a learned-solver folder to refine; None: the best classic on validation
    k: int = 3  # past evaluations each step combines (S4S)
    rounds: int | None = None  # alternations of an alternating method (None: its default for the steps)
    lr_coef: float | None = None  # None: the optimiser's default (:data:`.registry.RATES`)
    lr_grid: float | None = None
    decouple: float = 0.1  # how far evaluation times may move from the grid (methods that decouple them)
    relax: float = 0.0  # relaxation ball radius, relative to the noise norm; 0: the method's default
    loss: str | Callable = "l2"  # per-sample L2 distance; "mse" (its square), "l1", or a callable
    optimizer: str | None = None  # adam or lion; None: the method's
    eval_every: int = 25  # steps between validations
    corrector: bool | None = None  # learn a corrector (None: the method's default)
    scale_a: bool | None = None  # also learn a scale of each step's carried state a_i (None: the method's default)
    polish: float | None = None  # share of the steps in a last joint phase at a tenth of the rates (None: the method's)
    warmup: bool = True  # linear learning-rate warm-up over the first tenth (at most 50 steps) of each phase

    def check(self) -> None:
        """A FewstepError naming the first setting that cannot be used."""
        _check_count("eval_every", self.eval_every, least=1)
        if self.polish is not None and not (
            isinstance(self.polish, int | float) and not isinstance(self.polish, bool) and 0 <= self.polish < 1
        ):
            raise FewstepError(f"polish must be a share of the steps in [0, 1); got {self.polish!r}")
        _check_count("k", self.k, least=1)
        if not callable(self.loss) and self.loss not in LOSSES:
            raise FewstepError(
                f"unknown loss {self.loss!r}; valid: {', '.join(LOSSES)} or a callable (student, target) -> (B,)"
            )


@dataclass(frozen=True)
class Execution:
    """How a fit runs and what it may spend."""

    use_checkpoint: bool | None = None  # recompute activations in backward (None: on CUDA yes, elsewhere no)
    micro_batch: int | None = None  # samples per forward/backward pass (gradients accumulated over the batch)
    noise_groups: int | None = None  # noise i in group i % G, each group its own pass (None: one per process)
    budget: int | None = None  # network evaluations (forward + backward, teacher included) the fit may spend

    def check(self, batch: int) -> None:
        """A FewstepError naming the first setting that cannot be used with training batches of ``batch``."""
        if self.micro_batch is not None and not (isinstance(self.micro_batch, int) and self.micro_batch >= 1):
            raise FewstepError(f"micro_batch must be a positive integer; got {self.micro_batch!r}")
        if self.micro_batch is not None and self.micro_batch > batch:
            raise FewstepError(
                f"--micro-batch {self.micro_batch} is larger than the batch ({batch}): give a "
                f"micro-batch of at most {batch}"
            )
        if self.noise_groups is not None and not _is_count(self.noise_groups, 1):
            raise FewstepError(f"noise_groups must be a positive integer; got {self.noise_groups!r}")
        if self.budget is not None and not _is_count(self.budget, 1):
            raise FewstepError(f"budget must be a positive number of network evaluations; got {self.budget!r}")


@dataclass(frozen=True)
class Screening:
    """The candidates a fit tries for a short stretch before the best goes on."""

    screen_starts: int = 2  # the best classic starts a fit screens (a given start alone)
    screen_seeds: int = 2  # batch orders screened per start
    screen_share: float = 0.2  # share of the steps the screened candidates run, together, before the best goes on


#: the parts of a FitConfig by attribute name
PARTS: dict[str, type] = {"sizes": Sizes, "training": Training, "execution": Execution, "screening": Screening}
#: every setting's flat name -> the part that holds it
OPTIONS: dict[str, str] = {f.name: part for part, cls in PARTS.items() for f in fields(cls)}
#: the settings an artifact records (its "fit"), in this order
RECORDED = (
    "method",
    "nfe",
    "start",
    "k",
    "samples",
    "val_samples",
    "confirm_samples",
    "steps",
    "rounds",
    "batch",
    "lr_coef",
    "lr_grid",
    "decouple",
    "relax",
    "loss",
    "optimizer",
    "eval_every",
    "seed",
    "use_checkpoint",
    "corrector",
    "scale_a",
    "polish",
    "warmup",
    "budget",
    "micro_batch",
    "noise_groups",
    "screen_starts",
    "screen_seeds",
    "screen_share",
)
#: settings that change how a fit runs, not its result (beyond float rounding): the micro-batch (gradients
#: accumulate over the batch either way) and activation checkpointing (the same forward, recomputed)
RESULT_NEUTRAL = ("micro_batch", "use_checkpoint")


@dataclass(frozen=True, init=False)
class FitConfig:
    """A fit's settings: the method, NFE and first seed, and four parts (see :func:`fewstep.fit.api.fit`).

    ``FitConfig(method, nfe, seed, **options)`` takes every setting by its flat name (``samples``, ``lr_coef``,
    ``micro_batch``, ...) as well as whole parts; :func:`.registry.method_defaults` gives a method's defaults and
    :func:`.registry.resolve` fills in what depends on the method.
    """

    method: str
    nfe: int
    seed: int
    sizes: Sizes
    training: Training
    execution: Execution
    screening: Screening

    def __init__(
        self,
        method: str = "s4s-alt",
        nfe: int = 5,
        seed: int = 0,
        sizes: Sizes | None = None,
        training: Training | None = None,
        execution: Execution | None = None,
        screening: Screening | None = None,
        **options: Any,
    ) -> None:
        parts: dict[str, Any] = {
            "sizes": sizes or Sizes(),
            "training": training or Training(),
            "execution": execution or Execution(),
            "screening": screening or Screening(),
        }
        for name, given in _by_part(options).items():
            parts[name] = replace(parts[name], **given)
        for name, value in {"method": method, "nfe": nfe, "seed": seed, **parts}.items():
            object.__setattr__(self, name, value)

    def with_options(self, **options: Any) -> FitConfig:
        """This config with the settings named in ``options`` (flat names, or method / nfe / seed) replaced."""
        top = {k: options.pop(k) for k in ("method", "nfe", "seed") if k in options}
        parts = {name: replace(getattr(self, name), **given) for name, given in _by_part(options).items()}
        return replace(self, **top, **parts)

    def check(self) -> None:
        """A FewstepError naming the first setting that cannot be used (what does not depend on the method)."""
        if self.nfe < 1:
            raise FewstepError(f"nfe must be at least 1; got {self.nfe}")
        self.sizes.check()
        self.training.check()
        self.execution.check(self.sizes.batch)

    def as_dict(self) -> dict[str, Any]:
        """Every setting by its flat name, as an artifact records it (a callable loss by its name)."""
        flat = {"method": self.method, "nfe": self.nfe, "seed": self.seed}
        for name in PARTS:
            flat.update(getattr(self, name).__dict__)
        if callable(flat["loss"]):
            flat["loss"] = getattr(flat["loss"], "__name__", "callable")
        return {k: flat[k] for k in RECORDED}

    def fit_settings(self) -> dict[str, Any]:
        """:meth:`as_dict` without the settings that change how the fit runs but not what it computes
        (:data:`RESULT_NEUTRAL`): what makes two fits the same fit (a checkpoint to resume, a finished artifact)."""
        return {k: v for k, v in self.as_dict().items() if k not in RESULT_NEUTRAL}


def check_options(options: dict[str, Any]) -> None:
    """A FewstepError naming the settings in ``options`` that no part holds, and the valid ones."""
    bad = sorted(set(options) - set(OPTIONS))
    if bad:
        raise FewstepError(f"unknown fit settings {bad}; valid: {', '.join(RECORDED)}")


def _by_part(options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Flat settings grouped by the part that holds them (a FewstepError for a name no part holds)."""
    check_options(options)
    grouped: dict[str, dict[str, Any]] = {}
    for name, value in options.items():
        grouped.setdefault(OPTIONS[name], {})[name] = value
    return grouped


def _is_count(v: Any, least: int) -> bool:
    return not isinstance(v, bool) and isinstance(v, int) and v >= least


def _check_count(name: str, v: Any, least: int) -> None:
    if not _is_count(v, least):
        if least == 0:
            raise FewstepError(f"{name} must be an integer >= 0; got {v!r}")
        raise FewstepError(f"{name} must be a positive integer; got {v!r}")


def seed_ranges(cfg: FitConfig) -> dict[str, list[int]]:
    """The fit's seed blocks: {"train": [lo, hi], "val": ..., "confirm": ...} (confirmation right after validation)."""
    s = cfg.sizes
    tr, va = fit_seeds(s.samples, cfg.seed), val_seeds(s.val_samples, cfg.seed)
    co = val_seeds(s.confirm_samples, cfg.seed + s.val_samples)
    return {"train": [tr.start, tr.stop], "val": [va.start, va.stop], "confirm": [co.start, co.stop]}
