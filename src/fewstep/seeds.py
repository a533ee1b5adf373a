"""Seed ranges: every starting noise is drawn from its own seed, and the ranges never overlap.

* fitting (teacher pairs):  seeds ``[FIT_SEED_START, VAL_SEED_START)``
* validation (model choice): seeds ``[VAL_SEED_START, EVAL_SEED_START)``
* evaluation (reported numbers): seeds ``>= EVAL_SEED_START``

Every seed is below ``SEED_LIMIT`` = 2**63 (a torch generator takes a signed 64-bit seed); a command's
first seed (``--seed``) is at most ``FIRST_SEED_MAX`` = 2**62, so that every block of seeds after it (the
samples, then the data-reference samples of an evaluation) stays below that limit.

Numbers measured on the noises a solver was fitted on are not results, so fitting code calls
:func:`check_fit_seeds` and refuses evaluation seeds.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from .errors import FewstepError

FIT_SEED_START = 0
VAL_SEED_START = 500_000
EVAL_SEED_START = 1_000_000
#: every seed is below this (torch.Generator.manual_seed takes a signed 64-bit integer)
SEED_LIMIT = 2**63
#: the largest first seed a command takes (--seed): 2**62 seeds of room after it
FIRST_SEED_MAX = 2**62


def _count(n: int, what: str) -> int:
    if isinstance(n, bool) or int(n) != n or n < 0:
        raise FewstepError(f"the number of {what} seeds must be a non-negative integer; got {n!r}")
    return int(n)


def _block(n: int, start: int, lo_range: int, hi_range: int, what: str) -> range:
    n = _count(n, what)
    lo = lo_range + int(start)
    if lo < lo_range or lo + n > hi_range:
        raise FewstepError(f"{what} seeds [{lo}, {lo + n}) leave the {what} range [{lo_range}, {hi_range})")
    return range(lo, lo + n)


def check_seeds(start: int, n: int, option: str = "--seed") -> range:
    """The seeds ``[start, start + n)``, refused in one line unless they lie in ``[0, SEED_LIMIT)``."""
    n = _count(n, "requested")
    if isinstance(start, bool) or int(start) != start or not 0 <= start <= FIRST_SEED_MAX or start + n > SEED_LIMIT:
        raise FewstepError(f"{option} {start}: a first seed must be an integer in [0, {FIRST_SEED_MAX}] (2**62)")
    return range(int(start), int(start) + n)


def fit_seeds(n: int, start: int = 0) -> range:
    """``n`` fitting seeds, ``start`` counted from FIT_SEED_START (stays below VAL_SEED_START)."""
    return _block(n, start, FIT_SEED_START, VAL_SEED_START, "fit")


def val_seeds(n: int, start: int = 0) -> range:
    """``n`` validation seeds, ``start`` counted from VAL_SEED_START (stays below EVAL_SEED_START)."""
    return _block(n, start, VAL_SEED_START, EVAL_SEED_START, "validation")


def eval_seeds(n: int, start: int = EVAL_SEED_START) -> range:
    """``n`` evaluation seeds from the absolute seed ``start`` (at least EVAL_SEED_START)."""
    n = _count(n, "evaluation")
    start = int(start)
    if start < EVAL_SEED_START:
        raise FewstepError(
            f"evaluation seeds must start at or above EVAL_SEED_START={EVAL_SEED_START}; got start={start}"
        )
    return check_seeds(start, n, "evaluation seeds from")


def check_fit_seeds(seeds: Iterable[int]) -> None:
    """Raise FewstepError if any fitting/validation seed lies in the evaluation range."""
    if isinstance(seeds, range):  # O(1): the largest element is at one end
        top = (seeds[-1] if seeds.step > 0 else seeds[0]) if len(seeds) else None
        bad = [top] if top is not None and top >= EVAL_SEED_START else []
    else:
        bad = [int(s) for s in seeds if int(s) >= EVAL_SEED_START][:1]
    if bad:
        raise FewstepError(
            f"seed {bad[0]} is an evaluation seed (>= {EVAL_SEED_START}): fitting and validation must use "
            f"seeds below {EVAL_SEED_START} (see fewstep.seeds.fit_seeds / val_seeds)"
        )


def seeded_labels(seeds: list[int], weights: Tensor, salt: int) -> Tensor:
    """One label per seed, drawn from ``weights`` with a generator of its own per seed.

    The stream is salted so labels are independent of the starting noise drawn from the
    same seed; the result does not depend on how seeds are batched.
    """
    w = weights.detach().cpu().to(torch.float64)
    out = []
    for seed in seeds:
        g = torch.Generator().manual_seed((int(seed) * 1_000_003 + salt) % (2**63 - 1))
        out.append(int(torch.multinomial(w, 1, generator=g)))
    return torch.tensor(out, dtype=torch.long)
