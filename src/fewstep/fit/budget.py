"""A fit's cost in network evaluations, and sizing a fit to a budget.

The unit is one sample through the network at one time (:mod:`fewstep.cost`); a fit spends

* teacher:      (training + validation + confirmation noises) x the teacher's evaluations per sample (forward),
* start:        screening the classic starts on a few validation noises, the best few on all of them (forward),
* training:     steps x batch x NFE, forward and backward (a third pass with activation checkpointing),
* validation:   every ``eval_every`` steps and at each phase's end, the validation noises x NFE (forward),
* confirmation: the fitted solver and its start on the confirmation noises, x NFE (forward).

:func:`step_cost`, :func:`forward_cost` and :func:`closing_cost` are the cost of one training step, one
pass over some noises and what a fit keeps for after its phases: the loop checks its budget with them and
:func:`predicted` sums them for a plan. :func:`plan_for` sizes noises, batch and steps so that the sum fits a
budget, from a bound on the teacher (:func:`teacher_noises`: whole shards, whatever the seed);
:func:`cap_teacher` then checks the teacher the sized fit will really solve (:func:`teacher_cost`, its seeds'
shards) and leaves room for the fit. The fit itself counts what it spends where the network is called and
stops before a step that would cross the budget, so a budget is never exceeded whatever the prediction says.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

from ..errors import FewstepError
from ..solvers.registry import solver_info
from .config import FitConfig, Sizes, seed_ranges
from .registry import plan_phases, resolve
from .teacher_spec import TeacherSpec

#: classic starts are screened on this many validation noises; the best SCREEN_KEEP go on to all of them
SCREEN_NOISES = 32
SCREEN_KEEP = 4


@dataclass(frozen=True)
class Parts:
    """A fit's predicted spend by part (network evaluations)."""

    teacher: int
    start: int
    training: int
    validation: int
    confirmation: int

    @property
    def total(self) -> int:
        return self.teacher + self.start + self.training + self.validation + self.confirmation


def passes(cfg: FitConfig) -> int:
    """Network passes per student evaluation in training: forward and backward (and a recomputation with
    activation checkpointing)."""
    return 3 if cfg.execution.use_checkpoint else 2


def step_cost(cfg: FitConfig, batch: int) -> int:
    """Network evaluations of one training step on ``batch`` noises (summed over steps: of all of them)."""
    return batch * cfg.nfe * passes(cfg)


def forward_cost(cfg: FitConfig, noises: int) -> int:
    """Network evaluations of one solve of ``noises`` noises by the student (a validation, a confirmation)."""
    return noises * cfg.nfe


def closing_cost(cfg: FitConfig, val: int, confirm: int) -> int:
    """What a fit keeps for after its phases: the fitted solver and its start on the validation and
    confirmation noises."""
    return 2 * forward_cost(cfg, val + confirm)


def teacher_per_sample(spec: TeacherSpec) -> int:
    """The teacher's network evaluations per noise."""
    info = solver_info(spec.solver)
    return info.cost(info.steps(spec.nfe))


def teacher_noises(sizes: Sizes, shard: int = 1) -> int:
    """The noises a teacher solves for ``sizes`` at most (the planner's bound, the same for every seed): the
    teacher cache works in shards of ``shard`` seeds, so each seed range is rounded up to whole shards (one more
    for a range that does not start on a shard)."""
    n, held_out = sizes.samples, sizes.val_samples + sizes.confirm_samples
    if shard <= 1:
        return n + held_out
    return (math.ceil(n / shard) + math.ceil(held_out / shard) + 2) * shard


def teacher_cost(cfg: FitConfig, per_sample: int, shard: int) -> int:
    """What the teacher of ``cfg``'s noises costs made from scratch: the whole shards of ``shard`` seeds (the
    teacher cache's unit) its seed ranges touch, at ``per_sample`` evaluations each (at most
    ``teacher_noises`` x ``per_sample``)."""
    blocks = {s // shard for lo, hi in seed_ranges(cfg).values() for s in range(lo, hi)}
    return len(blocks) * shard * per_sample


def predicted(cfg: FitConfig, sizes: Sizes, teacher_evals: int, candidates: int, shard: int = 1) -> Parts:
    """The spend of a fit with ``cfg`` and ``sizes`` (``teacher_evals`` per sample; ``candidates`` classic
    starts to screen, 0 with a given start; teacher noises rounded to whole shards of ``shard``)."""
    cfg = replace(cfg, sizes=sizes)  # the method's settings as they are (S4S-Alt's rounds included)
    phases, scr = plan_phases(cfg), cfg.screening
    screened = (1 if cfg.training.start else max(1, scr.screen_starts)) * max(1, scr.screen_seeds)
    extra = 1.0 + (screened - 1) * scr.screen_share / screened if screened > 1 else 1.0  # losers' screening
    training = math.ceil(step_cost(cfg, sum(p.steps * min(p.batch, sizes.samples) for p in phases)) * extra)
    checks = math.ceil((sum(math.ceil(p.steps / cfg.training.eval_every) for p in phases) + 1) * extra) + 1
    val = sizes.val_samples
    screen = min(SCREEN_NOISES, val)
    start = forward_cost(cfg, candidates * screen + min(candidates, SCREEN_KEEP) * val) if candidates else 0
    return Parts(
        teacher=teacher_noises(sizes, shard) * teacher_evals,
        start=start,
        training=training,
        validation=(checks + 2) * forward_cost(cfg, val),
        confirmation=2 * forward_cost(cfg, sizes.confirm_samples),
    )


def option_names(fixed: set[str] | frozenset[str], sizes: Sizes) -> str:
    """The command-line options of the ``fixed`` Sizes fields with their values, e.g. ``--samples 300 --steps 40``."""
    names = [f.name for f in fields(Sizes) if f.name in fixed]
    return " ".join(f"--{name.replace('_', '-')} {getattr(sizes, name)}" for name in names)


def plan_for(
    budget: int,
    cfg: FitConfig,
    base: Sizes,
    teacher_evals: int,
    candidates: int,
    shard: int = 1,
    fixed: set[str] | frozenset[str] = frozenset(),
    shapes: tuple[Sizes, ...] = (),
) -> Sizes:
    """The fit ``budget`` affords. With ``shapes`` (a method's measured fit shapes, smallest first:
    :attr:`.registry.FitMethod.shapes`), the largest shape whose predicted spend is within ``budget`` keeps its
    noises and batch and gets the steps the rest of the budget pays for (:func:`fill_steps`); a budget below the
    smallest shape (or no shapes) gets the largest fit like ``base`` (the smallest shape, if any: noises, batch and
    steps scaled together). The Sizes fields named in ``fixed`` (given by the user) keep ``base``'s values. A
    FewstepError names the smallest budget that works (and the fixed sizes) when even one step does not fit."""

    def keep(s: Sizes) -> Sizes:
        s = replace(s, **{f: getattr(base, f) for f in fixed})
        if "batch" in fixed and "samples" not in fixed:  # a given batch needs as many noises
            s = replace(s, samples=max(s.samples, s.batch))
        return s if "batch" in fixed else replace(s, batch=min(s.batch, s.samples))

    def cost(s: Sizes) -> int:
        return predicted(cfg, s, teacher_evals, candidates, shard).total

    fitting = [keep(s) for s in shapes if cost(keep(s)) <= budget]
    if fitting:
        return fill_steps(budget, fitting[-1], cost, "steps" in fixed)
    return _scaled(budget, cfg, keep(shapes[0]) if shapes else base, keep, cost, fixed)


def fill_steps(budget: int, shape: Sizes, cost: Callable[[Sizes], int], steps_fixed: bool = False) -> Sizes:
    """``shape`` with as many steps as ``budget`` pays for (at least its own; as given when ``steps_fixed``)."""
    if steps_fixed:
        return shape
    lo, hi = shape.steps, shape.steps * 2
    while cost(replace(shape, steps=hi)) <= budget and hi < 10**7:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # cost(lo) within the budget, cost(hi) not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if cost(replace(shape, steps=mid)) <= budget else (lo, mid)
    return replace(shape, steps=lo)


def _scaled(
    budget: int,
    cfg: FitConfig,
    base: Sizes,
    keep: Callable[[Sizes], Sizes],
    cost: Callable[[Sizes], int],
    fixed: set[str] | frozenset[str],
) -> Sizes:
    """The largest fit like ``base`` (noises, batch and steps scaled together, validation and confirmation noises
    with the square root) whose predicted spend is within ``budget``; ``keep`` puts back the fixed sizes."""

    def sized(theta: float) -> Sizes:
        samples = max(8, round(base.samples * theta))
        val = max(8, round(base.val_samples * math.sqrt(theta)))
        confirm = 0 if base.confirm_samples == 0 else max(16, round(base.confirm_samples * math.sqrt(theta)))
        return keep(Sizes(samples, val, confirm, min(base.batch, samples), max(1, round(base.steps * theta))))

    smallest = keep(Sizes(8, 8, 0, 8, 1))
    floor = cost(smallest)
    if budget < floor and fixed:
        raise FewstepError(
            f"--budget {budget:,} does not cover {option_names(fixed, base)}: with them the smallest "
            f"fit costs {floor:,} network evaluations; give a budget of at least that, or leave those "
            f"options out for the budget to size them"
        )
    if budget < floor:
        raise FewstepError(
            f"--budget {budget:,} is too small for one step of {cfg.method} at NFE {cfg.nfe}: the "
            f"smallest fit (8 noises, 1 step, its teacher and start search) costs {floor:,} network "
            f"evaluations"
        )
    if cost(sized(1.0)) <= budget:
        lo = 1.0
        while cost(sized(lo * 2)) <= budget and lo < 1e6:
            lo *= 2
        hi = lo * 2
    else:
        lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(sized(mid)) <= budget else (lo, mid)
    return sized(lo) if lo > 0 and cost(sized(lo)) <= budget else smallest


def with_sizes(cfg: FitConfig, sizes: Sizes) -> FitConfig:
    """``cfg`` with the noises, batch and steps of ``sizes``, resolved again (S4S-Alt's rounds follow the steps)."""
    return resolve(replace(cfg, sizes=sizes).with_options(rounds=None))


def cap_teacher(
    budget: int, cfg: FitConfig, per_sample: int, shard: int, fixed: set[str] | frozenset[str]
) -> FitConfig:
    """``cfg`` (sized by :func:`plan_for`, ``fixed`` as there) with as many training noises as the teacher of its
    real seeds (:func:`teacher_cost`) and the closing validations leave within ``budget``. The loop stops before a
    step that would cross the budget, but the teacher comes first: whatever the plan says, it must leave room for
    the fit. A FewstepError when even the fewest training noises do not fit."""
    sizes = cfg.sizes
    closing = closing_cost(cfg, sizes.val_samples, sizes.confirm_samples)

    def fits(n: int) -> bool:
        return teacher_cost(cfg.with_options(samples=n), per_sample, shard) + closing <= budget

    if fits(sizes.samples):
        return cfg
    least = sizes.batch if "batch" in fixed else 8
    if "samples" in fixed or not fits(least):
        given = option_names(fixed, sizes)
        raise FewstepError(
            f"--budget {budget:,} does not cover the teacher of the validation and "
            f"confirmation noises and {sizes.samples if 'samples' in fixed else least} training "
            f"noises ({per_sample} evaluations each)" + (f": raise it, or leave out {given}" if given else "")
        )
    lo, hi = least, sizes.samples  # fits(lo), not fits(hi): the largest that fits, by bisection
    while hi - lo > 1:
        lo, hi = ((lo + hi) // 2, hi) if fits((lo + hi) // 2) else (lo, (lo + hi) // 2)
    return resolve(cfg.with_options(samples=lo, batch=min(sizes.batch, lo)))
