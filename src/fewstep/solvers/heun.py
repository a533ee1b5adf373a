"""Heun's method (EDM): 2 evaluations per step, Euler on a final step to sigma = 0.

For schedules with alpha > 0 at the start it integrates dy/ds = E in y = x / alpha,
s = sigma / alpha (EDM's form, and what diffusers' HeunDiscreteScheduler does); for a flow
schedule starting at alpha = 0 it integrates dx/dt = v in (x, t).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ..denoiser import Denoiser
from ..errors import ModelOutputError, NFEError

F64 = torch.float64


def heun_steps(nfe: int, final_zero: bool = True) -> int:
    """Largest number of Heun steps whose cost fits in ``nfe`` evaluations."""
    n = (nfe + 1) // 2 if final_zero else nfe // 2
    if n < 2 and final_zero or n < 1:
        raise NFEError(f"heun needs at least 3 NFE (got {nfe}): 2 per step and 1 on the last step")
    return n


def heun_nfe(n_steps: int, final_zero: bool = True) -> int:
    return 2 * n_steps - (1 if final_zero else 0)


def run_heun(
    model: Denoiser,
    x: Tensor,
    t: Tensor,
    cond: dict[str, Any] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    return_trajectory: bool = False,
) -> Tensor | tuple[Tensor, list[Tensor]]:
    """Heun from x at t[0] through the grid t (n + 1 times). Shapes: x (B, ...), t (n+1,)."""
    cond = cond or {}
    sch = model.schedule
    t = t.detach().to(F64)
    alpha, sigma = sch.alpha(t), sch.sigma(t)
    xt_space = bool(alpha[0] <= 0)
    basis = "v" if xt_space else "E"
    u = t if xt_space else sigma / alpha  # integration variable: t or s
    scale = torch.ones_like(alpha) if xt_space else alpha

    def f(z: Tensor, i: int) -> Tensor:
        out = model.predict(z, t[i], basis, **cond)
        if not torch.isfinite(out).all():
            raise ModelOutputError(f"the model returned NaN/inf at t={float(t[i]):.6g} of solver heun")
        return out

    y = x / float(scale[0])
    traj = [x] if return_trajectory else None
    n = t.numel() - 1
    for i in range(n):
        du = float(u[i + 1] - u[i])
        d = f(y * float(scale[i]), i)
        y_new = y + du * d
        if float(sigma[i + 1]) > 0:
            d2 = f(y_new * float(scale[i + 1]), i + 1)
            y_new = y + du * 0.5 * (d + d2)
        y = y_new
        xi = y * float(scale[i + 1])
        if traj is not None:
            traj.append(xi)
        if callback is not None:
            callback({"i": i, "t": float(t[i + 1]), "x": xi, "F": d})
    x = y * float(scale[-1])
    return (x, traj) if return_trajectory else x
