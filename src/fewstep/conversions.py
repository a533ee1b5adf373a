"""A network's output as the data prediction D, the noise prediction E or the velocity dx/dt, from the schedule's
scalars at one time alone (no network, no model object): the Denoiser, FewStepScheduler and the k-diffusion
sampler all convert through here.

With x = alpha x0 + sigma eps, D the data prediction and E the noise prediction:
    eps:      E = out,            D = (x - sigma E) / alpha
    x0:       D = out,            E = (x - alpha D) / sigma
    v:        D = alpha x - sigma v, E = sigma x + alpha v      (v = alpha eps - sigma x0, alpha^2 + sigma^2 = 1)
    velocity: D = x - t v,        E = x + (1 - t) v           (flow x = (1 - t) x0 + t eps, v = dx/dt)
The probability-flow velocity of any schedule is dx/dt = alpha' D + sigma' E.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .errors import FewstepError
from .schedules import TimeScalars

PREDICTIONS = ("eps", "x0", "v", "velocity")
BASES = ("D", "E", "v")
#: (prediction, basis) pairs where the output already is the basis
SAME = (("x0", "D"), ("eps", "E"), ("velocity", "v"))


def check_prediction(prediction: str, schedule_kind: str) -> None:
    """A FewstepError unless ``prediction`` is known and suits a schedule of ``schedule_kind`` (vp, flow, ...)."""
    if prediction not in PREDICTIONS:
        raise FewstepError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")
    if prediction == "v" and schedule_kind != "vp":
        raise FewstepError("prediction 'v' needs a VP schedule (alpha^2 + sigma^2 = 1)")
    if prediction == "velocity" and schedule_kind != "flow":
        raise FewstepError("prediction 'velocity' needs the Flow schedule (x = (1 - t) x0 + t eps)")


def to_basis(prediction: str, out: Tensor, x: Tensor, basis: str, sc: TimeScalars) -> Tensor:
    """A raw output ``out`` at state x (both (B, ...)) as basis 'D', 'E' or 'v' (dx/dt), with the scalars ``sc``
    at that time. Scalars that are 0-d tensors keep autograd (learned evaluation times get exact gradients)."""
    if (prediction, basis) in SAME:
        return out
    if basis not in BASES:
        raise FewstepError(f"unknown basis {basis!r}; valid: {', '.join(BASES)}")
    D, E = to_DE(prediction, out, x, sc.alpha, sc.sigma)
    if basis == "D":
        return D
    if basis == "E":
        return E
    return velocity(D, E, sc.d_alpha, sc.d_sigma)


def to_DE(prediction: str, out: Tensor, x: Tensor, alpha: Any, sigma: Any) -> tuple[Tensor, Tensor]:
    """(D, E) from a raw output at state x, given alpha and sigma at its time (floats, or 0-d tensors)."""
    a, g = alpha, sigma
    if isinstance(a, float) and not (out.requires_grad or x.requires_grad):
        return to_DE_fast(prediction, out, x, a, g)
    if prediction == "eps":
        return (x - g * out) / a, out
    if prediction == "x0":
        return out, (x - a * out) / g
    if prediction == "v":
        return a * x - g * out, g * x + a * out
    return x - g * out, x + a * out  # velocity, flow schedule: alpha = 1 - t, sigma = t


def to_DE_fast(prediction: str, out: Tensor, x: Tensor, a: float, g: float) -> tuple[Tensor, Tensor]:
    """:func:`to_DE` with fused in-place ops and float scalars (no autograd): the sampling hot path."""
    if prediction == "eps":
        return torch.add(x, out, alpha=-g).div_(a), out
    if prediction == "x0":
        return out, torch.add(x, out, alpha=-a).div_(g)
    if prediction == "v":
        return torch.mul(x, a).add_(out, alpha=-g), torch.mul(x, g).add_(out, alpha=a)
    return torch.add(x, out, alpha=-g), torch.add(x, out, alpha=a)


def velocity(D: Tensor, E: Tensor, d_alpha: Any, d_sigma: Any) -> Tensor:
    """The probability-flow velocity dx/dt = alpha' D + sigma' E (VE, alpha' = 0 and sigma' = 1: E itself)."""
    if isinstance(d_alpha, float) and d_alpha == 0.0 and d_sigma == 1.0:
        return E
    return d_alpha * D + d_sigma * E
