"""Time grids: N + 1 solver times t_0 = t_max > t_1 > ... > t_N for N steps (float64).

Named grids end at the schedule's clean end (t_end, sigma = 0), so the last step lands on the
data; its evaluations are t_0 .. t_{N-1}.
- ``time``: uniform in t from t_max to t_end.
- ``quadratic``: t_end + (t_max - t_end) (1 - i/N)^2 (dense near the data).
- ``logsnr``: N evaluation points uniform in lambda from the noise end to t_min, then t_end.
- ``karras`` (alias ``edm``): N points s_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho
  in s = sigma / alpha, then t_end (rho = 7).
- ``shifted``: a diffusers flow-matching pipeline's own default grid (static or resolution-dependent time
  shift; only for flows loaded from such a pipeline, whose schedule carries ``grid_shift``).
An explicit grid is any strictly decreasing sequence inside [t_end, t_max].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import Tensor

from .errors import GridError, SolverNameError
from .schedules import F64, Schedule


def time_uniform(schedule: Schedule, n: int) -> Tensor:
    """The ``time`` grid, (n + 1,)."""
    return torch.linspace(schedule.t_max, schedule.t_end, n + 1, dtype=F64)


def time_quadratic(schedule: Schedule, n: int) -> Tensor:
    """The ``quadratic`` grid, (n + 1,)."""
    u = 1.0 - torch.arange(n + 1, dtype=F64) / n
    return schedule.t_end + (schedule.t_max - schedule.t_end) * u**2


def logsnr_uniform(schedule: Schedule, n: int) -> Tensor:
    """The ``logsnr`` grid, (n + 1,)."""
    lo, hi = schedule.lambda_range()
    lam = torch.linspace(lo, hi, n, dtype=F64)
    t = schedule.t_of_lambda(lam)
    t[0] = schedule.t_max
    if n == 1:
        t = torch.tensor([schedule.t_max], dtype=F64)
    return torch.cat([t, torch.tensor([schedule.t_end], dtype=F64)])


def karras(schedule: Schedule, n: int, rho: float = 7.0) -> Tensor:
    """The ``karras`` grid, (n + 1,)."""
    lo, hi = schedule.lambda_range()
    s_max, s_min = torch.exp(torch.tensor(-lo, dtype=F64)), torch.exp(torch.tensor(-hi, dtype=F64))
    u = torch.arange(n, dtype=F64) / max(n - 1, 1)
    s = (s_max ** (1 / rho) + u * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    t = schedule.t_of_lambda(-torch.log(s))
    t[0] = schedule.t_max
    return torch.cat([t, torch.tensor([schedule.t_end], dtype=F64)])


def time_shift(s: Tensor, shift: float = 1.0, mu: float | None = None, kind: str = "exponential") -> Tensor:
    """A flow-matching pipeline's time shift of sigmas s: static ``shift s / (1 + (shift - 1) s)``, or with
    ``mu`` the resolution-dependent one, ``e^mu / (e^mu + 1/s - 1)`` (``kind`` "linear": ``mu / (mu + 1/s - 1)``)."""
    if mu is None:
        return shift * s / (1.0 + (shift - 1.0) * s)
    em = math.exp(mu) if kind == "exponential" else float(mu)
    return em / (em + (1.0 / s - 1.0))


def shifted(schedule: Schedule, n: int) -> Tensor:
    """The grid a diffusers flow-matching pipeline uses by default (``Flow.grid_shift``): n sigmas from 1
    (evenly spaced down to 1/T, or to 1/n for Flux-style pipelines: ``base``), time-shifted, optionally
    stretched to end at ``terminal``, then 0."""
    g = getattr(schedule, "grid_shift", None)
    if not g:
        raise GridError(
            "the 'shifted' grid is a flow-matching pipeline's own: this model's schedule has no shift "
            "(load it with diffusers:DIR from a flow-matching pipeline)"
        )
    T = int(g["num_train_timesteps"])
    dynamic = g.get("mu") is not None
    if g.get("base") == "steps":
        s = torch.linspace(1.0, 1.0 / n, n, dtype=F64)
    else:
        lo = 1.0 / T if dynamic else float(time_shift(torch.tensor(1.0 / T, dtype=F64), float(g["shift"])))
        s = torch.linspace(1.0, lo, n, dtype=F64)
    s = time_shift(s, float(g["shift"]), g.get("mu"), g.get("shift_type", "exponential"))
    if g.get("terminal"):
        one_minus = 1.0 - s
        s = 1.0 - one_minus / (one_minus[-1] / (1.0 - float(g["terminal"])))
    return torch.cat([s, torch.zeros(1, dtype=F64)])


GRIDS = {
    "time": time_uniform,
    "quadratic": time_quadratic,
    "logsnr": logsnr_uniform,
    "karras": karras,
    "shifted": shifted,
}
ALIASES = {
    "edm": "karras",
    "uniform": "time",
    "time_uniform": "time",
    "time_quadratic": "quadratic",
    "logSNR": "logsnr",
    "lambda": "logsnr",
}


def check_grid(t: Tensor, schedule: Schedule) -> Tensor:
    """Validate an explicit grid: 1-D, at least 2 points, strictly decreasing, inside the range."""
    if t.dim() != 1 or t.numel() < 2:
        raise GridError(f"a grid needs at least 2 times in a 1-D list; got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise GridError("grid times must be finite numbers")
    d = t[1:] - t[:-1]
    if not torch.all(d < 0):
        bad = int(torch.nonzero(d >= 0)[0])
        raise GridError(
            f"grid must be strictly decreasing from the noise end to the data end; "
            f"t[{bad}]={float(t[bad]):g} is followed by t[{bad + 1}]={float(t[bad + 1]):g}"
        )
    lo, hi = float(t.min()), float(t.max())
    tol = 1e-9 * max(1.0, abs(schedule.t_max))
    if lo < schedule.t_end - tol or hi > schedule.t_max + tol:
        raise GridError(
            f"grid times must lie in [{schedule.t_end:g}, {schedule.t_max:g}] for {schedule.describe()}; "
            f"got [{lo:g}, {hi:g}]"
        )
    return t


def make_grid(schedule: Schedule, n: int, grid: str | Sequence[float] | Tensor = "logsnr", **kwargs) -> Tensor:
    """Grid of n steps (n + 1 times, float64, decreasing) by name or from an explicit list.

    An explicit list must have exactly n + 1 entries.
    """
    if isinstance(grid, str):
        name = ALIASES.get(grid, grid)
        if name not in GRIDS:
            raise SolverNameError(f"unknown grid {grid!r}; valid: {', '.join(GRIDS)} (or an explicit list of times)")
        if n < 1:
            raise GridError(f"a grid needs at least 1 step; got {n}")
        return _named_grid(name, n, schedule, tuple(sorted(kwargs.items()))).clone()
    t = torch.as_tensor(grid, dtype=F64).detach().clone() if not isinstance(grid, Tensor) else grid.to(F64)
    check_grid(t, schedule)
    if t.numel() != n + 1:
        raise GridError(f"an explicit grid for {n} steps needs {n + 1} times; got {t.numel()}")
    return t


@lru_cache(maxsize=512)
def _named_grid(name: str, n: int, schedule: Schedule, kwargs: tuple) -> Tensor:
    """A named grid, built once per (name, n, schedule, options): a schedule is hashed by its config."""
    return check_grid(GRIDS[name](schedule, n, **dict(kwargs)), schedule)


def grid_names(schedule: Schedule | None = None) -> list[str]:
    """The named grids (those that suit ``schedule``, if given: ``shifted`` needs a flow pipeline's shift)."""
    return [g for g in GRIDS if schedule is None or g != "shifted" or getattr(schedule, "grid_shift", None)]
