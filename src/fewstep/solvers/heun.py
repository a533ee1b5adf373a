"""Heun's method (EDM) as a two-stage tableau: 2 evaluations per step, Euler on a last step to sigma = 0.

For schedules with alpha > 0 at the start it integrates dy/ds = E in y = x / alpha, s = sigma / alpha
(EDM's form, and what diffusers' HeunDiscreteScheduler does); for a flow schedule starting at
alpha = 0 it integrates dx/dt = v in (x, t). With u the integration variable and r_i the scale of
x (alpha_i, or 1), Heun's step i from x_i is, in kernel states:

    stage    x'      = (r_{i+1} / r_i) x_i + r_{i+1} du_i F(x_i, t_i)                   (Euler)
    solution x_{i+1} = x' - r_{i+1} du_i / 2 F(x_i, t_i) + r_{i+1} du_i / 2 F(x', t_{i+1})

The stage sits at t_{i+1}, a repeated time, and is marked as not a solution point.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..errors import NFEError
from ..schedules import F64, Schedule
from .kernel import Tableau


def heun_steps(nfe: int, final_zero: bool = True) -> int:
    """Largest number of Heun steps whose cost fits in ``nfe`` evaluations."""
    n = (nfe + 1) // 2 if final_zero else nfe // 2
    if n < 2 and final_zero or n < 1:
        raise NFEError(f"heun needs at least 3 NFE (got {nfe}): 2 per step and 1 on the last step")
    return n


def heun_nfe(n_steps: int, final_zero: bool = True) -> int:
    """Evaluations of ``n_steps`` Heun steps (one fewer when the last step ends at sigma = 0)."""
    return 2 * n_steps - (1 if final_zero else 0)


def heun(schedule: Schedule, t: Tensor) -> Tableau:
    """Heun's tableau on grid t (n + 1 times): 2n evaluations, 2n - 1 when t ends at sigma = 0."""
    t = t.detach().to(F64)
    with torch.no_grad():
        alpha, sigma = schedule.alpha(t).numpy(), schedule.sigma(t).numpy()
    xt_space = bool(alpha[0] <= 0)
    u = t.numpy() if xt_space else sigma / alpha  # integration variable: t or s
    r = np.ones_like(alpha) if xt_space else alpha  # x = r y
    n = t.numel() - 1
    two = [bool(sigma[i + 1] > 0) for i in range(n)]
    m = sum(2 if s else 1 for s in two)
    a, B = np.zeros(m), np.zeros((m, m))
    times, points = [float(t[0])], [True]
    k = 0
    for i in range(n):
        du, ratio, rn = float(u[i + 1] - u[i]), float(r[i + 1] / r[i]), float(r[i + 1])
        a[k], B[k, k] = ratio, rn * du
        times.append(float(t[i + 1]))
        points.append(not two[i])  # the Euler stage, or the solution of a last Euler step
        k += 1
        if two[i]:
            a[k], B[k, k - 1], B[k, k] = 1.0, -0.5 * rn * du, 0.5 * rn * du
            times.append(float(t[i + 1]))
            points.append(True)
            k += 1
    return Tableau(
        basis="v" if xt_space else "E",
        t=torch.as_tensor(times, dtype=F64),
        a=torch.as_tensor(a, dtype=F64),
        B=torch.as_tensor(B, dtype=F64),
        name="heun",
        points=torch.tensor(points),
        info={"steps": n},
    ).validate()
