"""A Gaussian data model with its exact denoiser and exact ODE flow, for any schedule and prediction."""

from __future__ import annotations

import math

import torch

from fewstep import Denoiser
from fewstep.schedules import Schedule

F64 = torch.float64


class GaussNet(torch.nn.Module):
    """Exact network output for data N(mu, diag(c^2)); recovers solver time from the schedule."""

    def __init__(self, schedule: Schedule, prediction: str, mu: torch.Tensor, c: torch.Tensor):
        super().__init__()
        self.schedule, self.prediction = schedule, prediction
        self.register_buffer("mu", mu)
        self.register_buffer("c", c)
        self.t = None

    def forward(self, x, t_net):
        t = self.t
        a, g = self.schedule.alpha(t), self.schedule.sigma(t)  # 0-d, differentiable in t
        xd = x.to(F64)
        D = self.mu + (a * self.c**2 / (a * a * self.c**2 + g * g)) * (xd - a * self.mu)
        E = (xd - a * D) / g
        out = {"x0": D, "eps": E, "v": a * E - g * D, "velocity": E - D}[self.prediction]
        return out.to(x.dtype)


class GaussDenoiser(Denoiser):
    """Passes the exact solver time to the analytic net (the net time may be clamped or scaled)."""

    def raw(self, x, t, t_net=None, **cond):
        self.net.t = torch.as_tensor(t, dtype=F64)
        return super().raw(x, t, t_net, **cond)

    def flow_map(self, x: torch.Tensor, t_from: float, t_to: float) -> torch.Tensor:
        """Exact ODE solution: (x_t - alpha_t mu) / sqrt(alpha_t^2 c^2 + sigma_t^2) is constant."""
        s = self.schedule
        a1, g1, a2, g2 = (float(v) for v in (s.alpha(t_from), s.sigma(t_from), s.alpha(t_to), s.sigma(t_to)))
        mu, c = self.net.mu, self.net.c
        k = torch.sqrt(a2 * a2 * c**2 + g2 * g2) / torch.sqrt(a1 * a1 * c**2 + g1 * g1)
        return (a2 * mu + k * (x.to(F64) - a1 * mu)).to(x.dtype)


def make_gauss(schedule: Schedule, prediction: str = "eps", d: int = 6, seed: int = 0) -> GaussDenoiser:
    g = torch.Generator().manual_seed(seed)
    mu = 0.5 * torch.randn(d, generator=g, dtype=F64)
    c = torch.exp(torch.linspace(math.log(0.2), math.log(1.5), d, dtype=F64))
    return GaussDenoiser(GaussNet(schedule, prediction, mu, c), schedule, prediction, sample_shape=(d,), name="gauss")
