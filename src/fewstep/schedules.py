"""Noise schedules: x_t = alpha_t * x0 + sigma_t * eps.

Every schedule works in one solver time t, running from ``t_max`` (the noise end) down to
``t_end`` (the clean end, where sigma = 0). Network evaluations happen on [t_min, t_max];
``t_min`` is the smallest time the network was trained on. The log-SNR is
lambda_t = log(alpha_t / sigma_t). All arithmetic is float64.

The network's own time input (a fractional DDPM index, a sigma, a flow time, possibly
reversed) is the schedule's business: :meth:`Schedule.net_time` maps solver time to it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import FewstepError

#: the dtype of solver times and coefficient tables: the one definition every module imports
F64 = torch.float64


def _t(t: Tensor | float | Sequence[float]) -> Tensor:
    """Solver time as a float64 tensor (keeps autograd if ``t`` already is a tensor)."""
    if isinstance(t, Tensor):
        return t if t.dtype == F64 else t.to(F64)
    return torch.as_tensor(t, dtype=F64)


@dataclass
class TimeScalars:
    """Schedule scalars at one solver time: Python floats, or 0-d tensors that carry autograd."""

    alpha: Any
    sigma: Any
    d_alpha: Any
    d_sigma: Any
    t_net: float | None = None  # the network's time input, when no gradient needs to reach it

    @classmethod
    def of(cls, schedule: Schedule, t: Tensor | float) -> TimeScalars:
        """The scalars at one solver time t (a float or a 0-d / 1-element tensor)."""
        t = torch.as_tensor(t, dtype=F64)
        return cls.many(schedule, t.reshape(1))[0]

    @classmethod
    def many(cls, schedule: Schedule, t: Tensor, with_net_time: bool = False) -> list[TimeScalars]:
        """One TimeScalars per entry of the 1-D tensor t, computed in one vectorised pass.

        When t carries autograd (learned times), alpha, sigma and their derivatives stay
        differentiable in t (the derivatives through a double-backward graph).
        """
        t = t.to(F64)
        if t.requires_grad:
            with torch.enable_grad():
                al, sg = schedule.alpha(t), schedule.sigma(t)
                da = _grad_or_zero(al, t)
                ds = _grad_or_zero(sg, t)
            return [cls(al[i], sg[i], da[i], ds[i]) for i in range(t.numel())]
        fa, fs = schedule.alpha(t).tolist(), schedule.sigma(t).tolist()
        fda, fds = schedule.d_alpha(t).tolist(), schedule.d_sigma(t).tolist()
        tn = schedule.net_time(t).tolist() if with_net_time else [None] * t.numel()
        return [cls(fa[i], fs[i], fda[i], fds[i], tn[i]) for i in range(t.numel())]


def _grad_or_zero(y: Tensor, t: Tensor) -> Tensor:
    """dy/dt elementwise for y = f(t) elementwise, keeping the graph (zeros if y is constant)."""
    if not y.requires_grad:
        return torch.zeros_like(t)
    (g,) = torch.autograd.grad(y.sum(), t, create_graph=True, allow_unused=True)
    return torch.zeros_like(t) if g is None else g


class Schedule:
    """Base class. Subclasses define ``log_alpha``, ``log_sigma``, ``t_of_lambda`` and the range."""

    kind: str = "vp"  # "vp", "ve" or "flow"
    t_max: float = 1.0
    t_min: float = 1e-3
    t_end: float = 0.0
    time_scale: float = 1.0

    # --- to override -------------------------------------------------------------------
    def log_alpha(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        """log alpha_t, float64, same shape as t."""
        raise NotImplementedError

    def log_sigma(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        """log sigma_t, float64, same shape as t (-inf at the clean end)."""
        raise NotImplementedError

    def t_of_lambda(self, lambda_: Tensor | float) -> Tensor:  # pragma: no cover - abstract
        """Inverse of :meth:`lambda_` on [t_end, t_max]."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:  # pragma: no cover - abstract
        """JSON-able identity of the schedule (type and parameters)."""
        raise NotImplementedError

    # --- derived -----------------------------------------------------------------------
    def alpha_at_t_max(self) -> float:
        """alpha at the noise end (0 for a flow that starts from pure noise); computed once per schedule."""
        cached = self.__dict__.get("_alpha_max")
        if cached is None or cached[0] != self.t_max:
            cached = (self.t_max, float(self.alpha(torch.tensor(self.t_max, dtype=torch.float64))))
            self.__dict__["_alpha_max"] = cached
        return cached[1]

    def alpha(self, t: Tensor | float) -> Tensor:
        """alpha_t, float64, same shape as t."""
        return torch.exp(self.log_alpha(_t(t)))

    def sigma(self, t: Tensor | float) -> Tensor:
        """sigma_t, float64, same shape as t (exactly 0 at the clean end)."""
        return torch.exp(self.log_sigma(_t(t)))

    def lambda_(self, t: Tensor | float) -> Tensor:
        """Log-SNR lambda_t = log(alpha_t / sigma_t) (+inf at the clean end)."""
        t = _t(t)
        return self.log_alpha(t) - self.log_sigma(t)

    def s(self, t: Tensor | float) -> Tensor:
        """s = sigma / alpha = exp(-lambda): the time of the ODE dy/ds = E in y = x / alpha."""
        t = _t(t)
        return torch.exp(self.log_sigma(t) - self.log_alpha(t))

    def d_alpha(self, t: Tensor | float) -> Tensor:
        """d alpha / dt (float64), by autograd through :meth:`alpha`."""
        return self._derivative(self.alpha, t)

    def d_sigma(self, t: Tensor | float) -> Tensor:
        """d sigma / dt (float64), by autograd through :meth:`sigma`."""
        return self._derivative(self.sigma, t)

    def d_s(self, t: Tensor | float) -> Tensor:
        """d s / dt (float64), by autograd through :meth:`s` (DEIS integrates against it)."""
        return self._derivative(self.s, t)

    @staticmethod
    def _derivative(fn, t: Tensor | float) -> Tensor:
        t = _t(t).detach().clone().requires_grad_(True)
        with torch.enable_grad():
            y = fn(t)
            if not y.requires_grad:  # constant in t (e.g. alpha = 1 for VE)
                return torch.zeros_like(t).detach()
            (g,) = torch.autograd.grad(y.sum(), t)
        return g

    def lambda_range(self) -> tuple[float, float]:
        """Finite (lambda at the noise end, lambda at t_min) for log-SNR grids."""
        lo = float(self.lambda_(self.t_max))
        if not math.isfinite(lo):
            lo = float(self.lambda_(self.t_max - self.t_min))
        return lo, float(self.lambda_(self.t_min))

    def net_time(self, t: Tensor | float) -> Tensor:
        """The network's time input for solver time t (default: ``time_scale * t``)."""
        return _t(t) * self.time_scale

    def solver_time(self, t_net: Tensor | float) -> Tensor:
        """Inverse of :meth:`net_time`: the solver time (float64) of a network time input."""
        return _t(t_net) / self.time_scale

    def scalars(self, t: Tensor) -> list[TimeScalars]:
        """alpha, sigma, their t-derivatives and the network time at each entry of the 1-D tensor t.

        Differentiable in t when t carries autograd; otherwise Python floats, remembered per tuple of
        times (a schedule never changes, and a solve asks for the same evaluation times every time).
        """
        if t.requires_grad:
            return TimeScalars.many(self, t)
        key = tuple(t.detach().to(F64).cpu().tolist())
        cache = self.__dict__.setdefault("_scalars", {})
        got = cache.get(key)
        if got is None:
            if len(cache) > 256:
                cache.clear()
            got = cache[key] = TimeScalars.many(self, t.detach(), with_net_time=True)
        return got

    def init_noise_scale(self) -> float:
        """Scale of x at t_max for unit-variance noise (1 for VP and flow, sigma_max for VE)."""
        return 1.0

    def describe(self) -> str:
        """A one-line name with the parameters, e.g. ``edm(sigma_min=0.002, sigma_max=80.0, time_scale=1.0)``."""
        cfg = self.config()
        args = ", ".join(f"{k}={v}" for k, v in cfg.items() if k not in ("type", "betas"))
        return f"{cfg['type']}({args})"

    def __repr__(self) -> str:
        return self.describe()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schedule) and self.config() == other.config()

    def __hash__(self) -> int:
        return hash(repr(sorted(self.config().items(), key=lambda kv: kv[0])))


def _betas(name: str, n: int, beta_start: float, beta_end: float) -> Tensor:
    """DDPM beta tables under diffusers' names, float64, shape (n,)."""
    if name == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=F64)
    if name == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=F64) ** 2
    if name == "squaredcos_cap_v2":

        def f(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        return torch.tensor([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=F64)
    raise FewstepError(
        f"unknown beta schedule {name!r}: use 'linear', 'scaled_linear', 'squaredcos_cap_v2' or pass betas"
    )


class VPDiscrete(Schedule):
    """Discrete-time VP (DDPM) schedule from a beta table.

    Solver time t in [0, 1]: the DDPM index k sits at t = (k + 1) / T, and t = 0 is the clean
    end (alpha = 1). log(alpha) is a C1 cubic Hermite interpolant through those points. The network
    gets the fractional index t * T - 1 (clamped at 0).
    """

    kind = "vp"

    def __init__(
        self,
        beta_schedule: str = "linear",
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 2e-2,
        betas: Sequence[float] | Tensor | None = None,
    ) -> None:
        if betas is not None:
            b = torch.as_tensor(betas, dtype=F64).flatten()
            self.beta_schedule = "custom"
        else:
            b = _betas(beta_schedule, num_train_timesteps, beta_start, beta_end)
            self.beta_schedule = beta_schedule
        if b.numel() < 2 or not torch.all((b > 0) & (b < 1)):
            raise FewstepError("betas must be a table of at least 2 values inside (0, 1)")
        self.betas = b
        self.T = int(b.numel())
        self.beta_start, self.beta_end = float(beta_start), float(beta_end)
        self.alphas_cumprod = torch.cumprod(1.0 - b, 0)
        la = 0.5 * torch.log(self.alphas_cumprod)
        self._knots_t = torch.arange(0, self.T + 1, dtype=F64) / self.T  # (T+1,)
        self._knots_la = torch.cat([torch.zeros(1, dtype=F64), la])  # (T+1,)
        y = self._knots_la
        m = torch.empty_like(y)  # slopes per knot interval (Catmull-Rom; one-sided at the ends)
        m[1:-1] = 0.5 * (y[2:] - y[:-2])
        m[0], m[-1] = y[1] - y[0], y[-1] - y[-2]
        self._knots_m = m
        self.t_max, self.t_min, self.t_end = 1.0, 1.0 / self.T, 0.0

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"type": "vp_discrete", "num_train_timesteps": self.T}
        if self.beta_schedule == "custom":
            cfg["betas"] = [float(v) for v in self.betas]
        else:
            cfg.update(beta_schedule=self.beta_schedule)
            if self.beta_schedule != "squaredcos_cap_v2":
                cfg.update(beta_start=self.beta_start, beta_end=self.beta_end)
        return cfg

    def t_of_index(self, k: Tensor | float | Sequence[float]) -> Tensor:
        """Solver time of DDPM index k (k = -1 is the clean end)."""
        return (_t(k) + 1.0) / self.T

    def _hermite(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """log(alpha) and d log(alpha)/dt: C1 cubic Hermite through the knots (exact at them).

        A C1 interpolant keeps the probability-flow velocity continuous in t, which the
        velocity-basis solvers and gradient-based grid learning need.
        """
        u = (t * self.T).clamp(0, self.T)
        i = torch.floor(u.detach()).clamp(0, self.T - 1).long()
        w = u - i.to(F64)
        y = self._knots_la.to(t.device)
        m = self._knots_m.to(t.device)
        y0, y1, m0, m1 = y[i], y[i + 1], m[i], m[i + 1]
        w2, w3 = w * w, w * w * w
        val = (2 * w3 - 3 * w2 + 1) * y0 + (w3 - 2 * w2 + w) * m0 + (-2 * w3 + 3 * w2) * y1 + (w3 - w2) * m1
        der = (6 * w2 - 6 * w) * y0 + (3 * w2 - 4 * w + 1) * m0 + (-6 * w2 + 6 * w) * y1 + (3 * w2 - 2 * w) * m1
        return val, der * self.T

    def log_alpha(self, t: Tensor) -> Tensor:
        return self._hermite(_t(t))[0]

    def log_sigma(self, t: Tensor) -> Tensor:
        return 0.5 * torch.log(-torch.expm1(2.0 * self.log_alpha(t)))

    def t_of_lambda(self, lambda_: Tensor | float) -> Tensor:
        lam = _t(lambda_)
        la = -0.5 * torch.nn.functional.softplus(-2.0 * lam)  # log alpha for that lambda
        knots = self._knots_la.to(lam.device)
        # start from the piecewise-linear inverse (knots decrease with t), then Newton on the Hermite
        neg = (-knots).contiguous()
        j = torch.searchsorted(neg, (-la).detach().contiguous()).clamp(1, self.T)
        l0, l1 = knots[j - 1], knots[j]
        t = ((j - 1).to(F64) + ((la - l0) / (l1 - l0)).clamp(0, 1)) / self.T
        for _ in range(4):
            val, der = self._hermite(t)
            t = (t - (val - la) / der).clamp(0.0, 1.0)
        return t

    def net_time(self, t: Tensor | float) -> Tensor:
        return (_t(t) * self.T - 1.0).clamp_min(0.0)

    def solver_time(self, t_net: Tensor | float) -> Tensor:
        """The solver time of a DDPM index (the clamp below t_min is not inverted: index 0 is t_min)."""
        return (_t(t_net) + 1.0) / self.T


class VPLinear(Schedule):
    """Continuous VP schedule with linear beta(t) = beta_min + t (beta_max - beta_min), t in [0, 1]."""

    kind = "vp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3, time_scale: float = 1.0):
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)
        self.t_max, self.t_min, self.t_end, self.time_scale = 1.0, float(t_min), 0.0, float(time_scale)

    def config(self) -> dict[str, Any]:
        return {
            "type": "vp_linear",
            "beta_min": self.beta_min,
            "beta_max": self.beta_max,
            "t_min": self.t_min,
            "time_scale": self.time_scale,
        }

    def log_alpha(self, t: Tensor) -> Tensor:
        t = _t(t)
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def log_sigma(self, t: Tensor) -> Tensor:
        return 0.5 * torch.log(-torch.expm1(2.0 * self.log_alpha(t)))

    def t_of_lambda(self, lambda_: Tensor | float) -> Tensor:
        lam = _t(lambda_)
        tmp = torch.nn.functional.softplus(-2.0 * lam)  # = -2 log alpha
        b0, db = self.beta_min, self.beta_max - self.beta_min
        return 2.0 * tmp / (torch.sqrt(b0**2 + 2.0 * db * tmp) + b0)


class EDM(Schedule):
    """VE / EDM schedule: alpha = 1, sigma = t, t in [0, sigma_max]; network gets sigma."""

    kind = "ve"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, time_scale: float = 1.0):
        if not 0 < sigma_min < sigma_max:
            raise FewstepError(f"EDM needs 0 < sigma_min < sigma_max; got {sigma_min}, {sigma_max}")
        self.t_max, self.t_min, self.t_end, self.time_scale = float(sigma_max), float(sigma_min), 0.0, float(time_scale)

    def config(self) -> dict[str, Any]:
        return {"type": "edm", "sigma_min": self.t_min, "sigma_max": self.t_max, "time_scale": self.time_scale}

    def log_alpha(self, t: Tensor) -> Tensor:
        return torch.zeros_like(_t(t))

    def log_sigma(self, t: Tensor) -> Tensor:
        return torch.log(_t(t))

    def t_of_lambda(self, lambda_: Tensor | float) -> Tensor:
        return torch.exp(-_t(lambda_))

    def init_noise_scale(self) -> float:
        return self.t_max


class Flow(Schedule):
    """Rectified flow: alpha = 1 - t, sigma = t, t in [0, 1] (t = 1 is noise).

    ``time_reversed=True`` feeds the network 1 - t (torchcfm-style models where 0 is the noise);
    ``time_scale`` multiplies what the network gets (diffusers' flow models take 1000 * t).
    """

    kind = "flow"
    #: the keys of ``grid_shift`` (the sampling grid a flow-matching pipeline uses by default; see grids.shifted)
    SHIFT_KEYS = ("num_train_timesteps", "shift", "mu", "shift_type", "terminal", "base")

    def __init__(
        self,
        t_min: float = 1e-3,
        time_scale: float = 1.0,
        time_reversed: bool = False,
        grid_shift: dict[str, Any] | None = None,
    ):
        self.t_max, self.t_min, self.t_end = 1.0, float(t_min), 0.0
        self.time_scale, self.time_reversed = float(time_scale), bool(time_reversed)
        if grid_shift is not None:
            bad = sorted(set(grid_shift) - set(self.SHIFT_KEYS))
            if bad or not isinstance(grid_shift.get("num_train_timesteps"), int):
                raise FewstepError(
                    f"grid_shift needs num_train_timesteps and takes {', '.join(self.SHIFT_KEYS)}; "
                    f"got {sorted(grid_shift)}"
                )
            grid_shift = {
                "shift": 1.0,
                "mu": None,
                "shift_type": "exponential",
                "terminal": None,
                "base": "train",
                **grid_shift,
            }
            if (
                grid_shift["base"] not in ("train", "steps")
                or grid_shift["shift_type"] not in ("exponential", "linear")
                or not float(grid_shift["shift"]) > 0
            ):
                raise FewstepError(f"bad grid_shift {grid_shift}")
        self.grid_shift = grid_shift

    def config(self) -> dict[str, Any]:
        cfg = {"type": "flow", "t_min": self.t_min, "time_scale": self.time_scale, "time_reversed": self.time_reversed}
        if self.grid_shift is not None:
            cfg["grid_shift"] = dict(self.grid_shift)
        return cfg

    def log_alpha(self, t: Tensor) -> Tensor:
        return torch.log1p(-_t(t))

    def log_sigma(self, t: Tensor) -> Tensor:
        return torch.log(_t(t))

    def t_of_lambda(self, lambda_: Tensor | float) -> Tensor:
        return torch.sigmoid(-_t(lambda_))

    def net_time(self, t: Tensor | float) -> Tensor:
        t = _t(t)
        return (1.0 - t if self.time_reversed else t) * self.time_scale

    def solver_time(self, t_net: Tensor | float) -> Tensor:
        t = _t(t_net) / self.time_scale
        return 1.0 - t if self.time_reversed else t


SCHEDULES = {"vp_discrete": VPDiscrete, "vp_linear": VPLinear, "edm": EDM, "flow": Flow}


def schedule_from_config(cfg: dict[str, Any]) -> Schedule:
    """Rebuild a schedule from :meth:`Schedule.config` output."""
    cfg = dict(cfg)
    kind = cfg.pop("type", None)
    if kind not in SCHEDULES:
        raise FewstepError(f"unknown schedule type {kind!r}; valid: {', '.join(SCHEDULES)}")
    if kind == "edm":
        cfg = {"sigma_min": cfg["sigma_min"], "sigma_max": cfg["sigma_max"], "time_scale": cfg.get("time_scale", 1.0)}
    return SCHEDULES[kind](**cfg)
