"""Analytic zoo models: a diagonal Gaussian and Gaussian mixtures, with exact denoisers.

With x_t = alpha_t x0 + sigma_t eps:

* Gaussian data x0 ~ N(mu, diag(c^2)): per dimension x_t ~ N(alpha mu, alpha^2 c^2 + sigma^2),
  the posterior mean is D = mu + alpha c^2 (x - alpha mu) / (alpha^2 c^2 + sigma^2) and the
  noise prediction E = (x - alpha D) / sigma = sigma (x - alpha mu) / (alpha^2 c^2 + sigma^2).
  Along the probability-flow ODE, (x_t - alpha_t mu) / sqrt(alpha_t^2 c^2 + sigma_t^2) is
  constant, which gives the exact solution map (:func:`gaussian_exact_solution`).
* A mixture sum_k w_k N(m_k, s_k^2 I): component k's marginal at time t is
  N(alpha m_k, (alpha^2 s_k^2 + sigma^2) I); the responsibilities r_k(x) follow by Bayes
  (logsumexp in float64) and D = sum_k r_k [m_k + alpha s_k^2 / (alpha^2 s_k^2 + sigma^2) (x - alpha m_k)].
  A class label k restricts the mixture to component k (label -1: the full mixture).

All arithmetic is float64 inside; outputs come back in the input dtype and are differentiable
with respect to x (and to the time input).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..denoiser import Denoiser
from ..errors import ModelSpecError
from ..schedules import F64, Schedule, VPLinear
from ..seeds import seeded_labels
from ._common import as_schedule, attach, batch_times, labels_or_none

LOG2PI = math.log(2.0 * math.pi)


# ----------------------------------------------------------------------------- Gaussian
class GaussianEps(nn.Module):
    """Exact noise prediction of x0 ~ N(mu, diag(c^2)) under ``schedule``; x has shape (B, d)."""

    mu: Tensor  # (d,) float64 buffer
    c: Tensor  # (d,) float64 buffer

    def __init__(self, mu: Tensor, c: Tensor, schedule: Schedule) -> None:
        super().__init__()
        mu = torch.as_tensor(mu, dtype=F64).reshape(-1)
        c = torch.as_tensor(c, dtype=F64).reshape(-1)
        if mu.shape != c.shape or not torch.all(c > 0):
            raise ModelSpecError("gaussian: mu and c must have the same length and c must be positive")
        self.register_buffer("mu", mu)
        self.register_buffer("c", c)
        self.schedule = schedule

    def _stats(self, t_net: Tensor, batch: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        t = self.schedule.solver_time(batch_times(t_net, batch, device))
        a, s = self.schedule.alpha(t), self.schedule.sigma(t)
        var = a**2 * self.c.to(device) ** 2 + s**2  # (B, d)
        return a, s, var

    def posterior_mean(self, x: Tensor, t_net: Tensor) -> Tensor:
        """D(x, t) in the dtype of x."""
        x64 = x.reshape(x.shape[0], -1).to(F64)
        a, _, var = self._stats(t_net, x.shape[0], x.device)
        mu, c = self.mu.to(x.device), self.c.to(x.device)
        d = mu + a * c**2 * (x64 - a * mu) / var
        return d.to(x.dtype).reshape(x.shape)

    def forward(self, x: Tensor, t_net: Tensor, **_: Any) -> Tensor:
        x64 = x.reshape(x.shape[0], -1).to(F64)
        a, s, var = self._stats(t_net, x.shape[0], x.device)
        e = s * (x64 - a * self.mu.to(x.device)) / var
        return e.to(x.dtype).reshape(x.shape)

    def log_prob(self, x0: Tensor) -> Tensor:
        """log N(x0; mu, diag(c^2)) per row (float64, shape (B,))."""
        z = (x0.reshape(x0.shape[0], -1).to(F64) - self.mu.to(x0.device)) / self.c.to(x0.device)
        return -0.5 * (z**2).sum(-1) - torch.log(self.c.to(x0.device)).sum() - 0.5 * z.shape[-1] * LOG2PI

    def sample_data(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n draws of x0 (float64, on the CPU)."""
        z = torch.randn(n, self.mu.numel(), generator=generator, dtype=F64)
        return self.mu.cpu() + self.c.cpu() * z


def _gaussian_params(model: Any) -> tuple[Tensor, Tensor, Schedule]:
    if isinstance(model, Denoiser):
        model, sched = model.net, model.schedule
        return model.mu, model.c, sched
    if isinstance(model, GaussianEps):
        return model.mu, model.c, model.schedule
    if isinstance(model, (tuple, list)) and len(model) == 3:
        mu, c, sched = model
        return torch.as_tensor(mu, dtype=F64), torch.as_tensor(c, dtype=F64), sched
    raise ModelSpecError("gaussian_exact_solution needs the zoo:gaussian Denoiser, its net, or (mu, c, schedule)")


def gaussian_exact_solution(model: Any, x: Tensor, t_from: Tensor | float, t_to: Tensor | float) -> Tensor:
    """Exact probability-flow ODE map of the Gaussian model from solver time t_from to t_to.

    Args:
        model: the ``zoo:gaussian`` Denoiser, its ``GaussianEps`` net, or a tuple (mu, c, schedule).
        x: states at t_from, shape (B, d).
        t_from, t_to: solver times (scalars or per-row tensors of shape (B,)); either order.

    Per dimension, k = (x - alpha_from mu) / sqrt(alpha_from^2 c^2 + sigma_from^2) is constant along
    the ODE, so x_to = alpha_to mu + sqrt(alpha_to^2 c^2 + sigma_to^2) k. Computed in float64 and
    returned in the dtype of x (differentiable in x).
    """
    mu, c, sched = _gaussian_params(model)
    dev = x.device
    mu, c = mu.to(dev), c.to(dev)
    b = x.shape[0]
    tf, tt = batch_times(t_from, b, dev), batch_times(t_to, b, dev)
    af, sf = sched.alpha(tf), sched.sigma(tf)
    at, st = sched.alpha(tt), sched.sigma(tt)
    x64 = x.reshape(b, -1).to(F64)
    k = (x64 - af * mu) / torch.sqrt(af**2 * c**2 + sf**2)
    out = at * mu + torch.sqrt(at**2 * c**2 + st**2) * k
    return out.to(x.dtype).reshape(x.shape)


def build_gaussian(
    dim: int = 16,
    seed: int = 0,
    c_min: float = 0.05,
    c_max: float = 2.0,
    schedule: Schedule | Mapping[str, Any] | None = None,
) -> Denoiser:
    """zoo:gaussian: x0 ~ N(mu, diag(c^2)) in ``dim`` dimensions with exact eps prediction.

    c is log-spaced over [c_min, c_max] (so the ODE is stiff-ish) and shuffled across
    dimensions; mu ~ N(0, 0.5^2); both from ``seed``.
    """
    dim, seed = int(dim), int(seed)
    if dim < 1 or not 0 < c_min <= c_max:
        raise ModelSpecError(f"gaussian: need dim >= 1 and 0 < c_min <= c_max; got {dim}, {c_min}, {c_max}")
    g = torch.Generator().manual_seed(seed)
    mu = 0.5 * torch.randn(dim, generator=g, dtype=F64)
    c = torch.logspace(math.log10(c_min), math.log10(c_max), dim, dtype=F64)
    c = c[torch.randperm(dim, generator=g)]
    sched = as_schedule(schedule, VPLinear())
    net = GaussianEps(mu, c, sched)
    den = Denoiser(
        net,
        sched,
        prediction="eps",
        sample_shape=(dim,),
        name="zoo:gaussian",
        identity={"zoo": "gaussian", "dim": dim, "seed": seed, "c_min": float(c_min), "c_max": float(c_max)},
    )
    return attach(
        den,
        exact_solution=lambda x_T: gaussian_exact_solution(den, x_T, sched.t_max, sched.t_end),
        exact_map=lambda x, t_from, t_to: gaussian_exact_solution(den, x, t_from, t_to),
        log_prob=net.log_prob,
        sample_data=net.sample_data,
    )


# ----------------------------------------------------------------------------- mixtures
class GMMDenoiser(nn.Module):
    """Exact data prediction of sum_k w_k N(m_k, s_k^2 I) under ``schedule``.

    Called as ``net(x, t_net, class_labels=None)``; x has shape (B, *shape) with prod(shape) = D.
    ``class_labels`` (LongTensor (B,)): k >= 0 restricts row to component k, -1 keeps the mixture.
    """

    means: Tensor  # (K, D) float64 buffer
    stds: Tensor  # (K,) float64 buffer
    log_weights: Tensor  # (K,) float64 buffer, normalised

    def __init__(self, means: Tensor, stds: Tensor, weights: Tensor, schedule: Schedule) -> None:
        super().__init__()
        means = torch.as_tensor(means, dtype=F64)
        if means.dim() != 2:
            raise ModelSpecError("gmm: means must have shape (K, D)")
        k = means.shape[0]
        stds = torch.as_tensor(stds, dtype=F64).reshape(-1).expand(k).clone()
        weights = torch.as_tensor(weights, dtype=F64).reshape(-1)
        if weights.numel() != k or not torch.all(weights > 0) or not torch.all(stds > 0):
            raise ModelSpecError("gmm: need K positive weights and positive stds")
        self.register_buffer("means", means)
        self.register_buffer("stds", stds)
        self.register_buffer("log_weights", torch.log(weights / weights.sum()))
        self.schedule = schedule

    @property
    def weights(self) -> Tensor:
        return self.log_weights.exp()

    def forward(self, x: Tensor, t_net: Tensor, class_labels: Any = None, **_: Any) -> Tensor:
        b = x.shape[0]
        dev = x.device
        x64 = x.reshape(b, -1).to(F64)
        m, s2, lw = self.means.to(dev), self.stds.to(dev) ** 2, self.log_weights.to(dev)
        dim = m.shape[1]
        t = self.schedule.solver_time(batch_times(t_net, b, dev))  # (B, 1)
        a, sg = self.schedule.alpha(t), self.schedule.sigma(t)
        var = a**2 * s2 + sg**2  # (B, K)
        resid = x64[:, None, :] - a[:, :, None] * m  # (B, K, D)
        logits = lw - 0.5 * dim * torch.log(var) - 0.5 * (resid**2).sum(-1) / var
        lab = labels_or_none(class_labels, b, dev)
        if lab is not None:
            keep = (lab[:, None] < 0) | (lab[:, None] == torch.arange(m.shape[0], device=dev))
            logits = logits.masked_fill(~keep, float("-inf"))
        r = torch.softmax(logits, -1)  # (B, K)
        gain = a * s2 / var  # (B, K)
        post = m + gain[:, :, None] * resid  # (B, K, D)
        d = (r[:, :, None] * post).sum(1)
        return d.to(x.dtype).reshape(x.shape)

    def log_prob(self, x0: Tensor, class_labels: Any = None) -> Tensor:
        """log density of the data (the mixture, or component k for label k), float64 (B,)."""
        b = x0.shape[0]
        dev = x0.device
        x64 = x0.reshape(b, -1).to(F64)
        m, s2, lw = self.means.to(dev), self.stds.to(dev) ** 2, self.log_weights.to(dev)
        dim = m.shape[1]
        comp = -0.5 * ((x64[:, None, :] - m) ** 2).sum(-1) / s2 - 0.5 * dim * (torch.log(s2) + LOG2PI)
        lab = labels_or_none(class_labels, b, dev)
        if lab is not None:
            keep = (lab[:, None] < 0) | (lab[:, None] == torch.arange(m.shape[0], device=dev))
            lw = lw.masked_fill(~keep, float("-inf"))  # (B, K): this row's components
            lw = lw - torch.logsumexp(lw, -1, keepdim=True)
        return torch.logsumexp(lw + comp, -1)

    def sample_data(self, n: int, generator: torch.Generator | None = None, class_labels: Any = None) -> Tensor:
        """n draws of x0 (float64, CPU); with class_labels (n,) draws from those components."""
        if class_labels is None:
            k = torch.multinomial(self.weights.cpu(), n, replacement=True, generator=generator)
        else:
            k = torch.as_tensor(class_labels).long().reshape(-1).cpu()
        z = torch.randn(n, self.means.shape[1], generator=generator, dtype=F64)
        return self.means.cpu()[k] + self.stds.cpu()[k, None] * z


def _mixture_denoiser(
    net: GMMDenoiser,
    name: str,
    sample_shape: tuple[int, ...],
    identity: dict[str, Any],
    guidance_scale: float | None,
    conditional: bool | None,
) -> Denoiser:
    if conditional is None:
        conditional = guidance_scale is not None
    if guidance_scale is not None and not conditional:
        raise ModelSpecError(f"{name}: guidance_scale needs conditional sampling; drop conditional=False")
    k = net.means.shape[0]
    cond_sampler = (lambda seeds: {"class_labels": seeded_labels(seeds, net.weights, salt=k)}) if conditional else None
    den = Denoiser(
        net,
        net.schedule,
        prediction="x0",
        sample_shape=sample_shape,
        name=name,
        guidance_scale=guidance_scale,
        uncond={"class_labels": -1},
        cond_sampler=cond_sampler,
        identity={**identity, "conditional": bool(conditional)},
        num_classes=k,
    )
    return attach(
        den, log_prob=lambda x0, class_labels=None: net.log_prob(x0, class_labels), sample_data=net.sample_data
    )


def build_gmm2d(
    n_components: int = 8,
    radius: float = 2.0,
    std: float = 0.15,
    schedule: Schedule | Mapping[str, Any] | None = None,
    guidance_scale: float | None = None,
    conditional: bool | None = None,
) -> Denoiser:
    """zoo:gmm2d: ``n_components`` equal-weight isotropic Gaussians evenly on a ring (2-D)."""
    k = int(n_components)
    if k < 1 or radius < 0 or std <= 0:
        raise ModelSpecError(f"gmm2d: need n_components >= 1, radius >= 0, std > 0; got {k}, {radius}, {std}")
    ang = 2.0 * math.pi * torch.arange(k, dtype=F64) / k
    means = float(radius) * torch.stack([torch.cos(ang), torch.sin(ang)], -1)
    sched = as_schedule(schedule, VPLinear())
    net = GMMDenoiser(means, torch.full((k,), float(std), dtype=F64), torch.ones(k, dtype=F64), sched)
    ident = {"zoo": "gmm2d", "n_components": k, "radius": float(radius), "std": float(std)}
    return _mixture_denoiser(net, "zoo:gmm2d", (2,), ident, guidance_scale, conditional)


def build_gmm(
    dim: int = 32,
    n_components: int = 10,
    seed: int = 0,
    schedule: Schedule | Mapping[str, Any] | None = None,
    guidance_scale: float | None = None,
    conditional: bool | None = None,
) -> Denoiser:
    """zoo:gmm: ``n_components`` isotropic Gaussians in ``dim`` dimensions, parameters from ``seed``.

    Means ~ N(0, 0.6^2 I), per-component std uniform in [0.1, 0.4], weights proportional to
    exp(N(0, 0.5^2)) (unequal, normalised).
    """
    dim, k, seed = int(dim), int(n_components), int(seed)
    if dim < 1 or k < 1:
        raise ModelSpecError(f"gmm: need dim >= 1 and n_components >= 1; got {dim}, {k}")
    g = torch.Generator().manual_seed(seed)
    means = 0.6 * torch.randn(k, dim, generator=g, dtype=F64)
    stds = 0.1 + 0.3 * torch.rand(k, generator=g, dtype=F64)
    weights = torch.exp(0.5 * torch.randn(k, generator=g, dtype=F64))
    sched = as_schedule(schedule, VPLinear())
    net = GMMDenoiser(means, stds, weights, sched)
    ident = {"zoo": "gmm", "dim": dim, "n_components": k, "seed": seed}
    return _mixture_denoiser(net, "zoo:gmm", (dim,), ident, guidance_scale, conditional)
