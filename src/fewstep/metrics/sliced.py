"""Sliced Wasserstein-2 distance between sample sets: exact 1-D W2 on seeded random projections.

SW2(X, Y)^2 = E_theta[ W2^2(theta.X, theta.Y) ] over directions theta on the unit sphere,
estimated with ``n_projections`` fixed directions drawn from ``seed`` (the same directions for
every call with the same (dim, n_projections, seed), so figures are comparable across
solvers). In one dimension the only direction is 1 and the result is the exact W2.

The 1-D W2 between the empirical measures of u (n points) and v (m points) is the L2
distance between their quantile functions, both piecewise constant: with the breakpoints
{i/n} and {j/m} merged, W2^2 = sum over the merged pieces of (width) x (u_(i) - v_(j))^2,
exact for equal or unequal counts (for n = m it is the mean squared difference of the
sorted values).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import FewstepError
from ..schedules import F64


def projection_directions(dim: int, n_projections: int = 256, seed: int = 0) -> Tensor:
    """Unit directions (P, dim), float64; for dim = 1 the single direction [[1]]."""
    if dim < 1 or n_projections < 1:
        raise FewstepError(f"sliced Wasserstein needs dim >= 1 and n_projections >= 1; got {dim}, {n_projections}")
    if dim == 1:
        return torch.ones(1, 1, dtype=F64)
    g = torch.Generator().manual_seed(int(seed))
    th = torch.randn(int(n_projections), int(dim), generator=g, dtype=F64)
    return th / th.norm(dim=1, keepdim=True)


def wasserstein2_sq_1d(u: Tensor, v: Tensor) -> Tensor:
    """Exact squared W2 between the empirical measures of the rows: u (P, n), v (P, m) -> (P,)."""
    n, m = u.shape[-1], v.shape[-1]
    us, vs = torch.sort(u.to(F64), dim=-1).values, torch.sort(v.to(F64), dim=-1).values
    levels = torch.sort(
        torch.cat([torch.arange(1, n + 1, dtype=F64) / n, torch.arange(1, m + 1, dtype=F64) / m])
    ).values
    widths = torch.diff(levels, prepend=levels.new_zeros(1))
    mid = levels - 0.5 * widths  # inside each piece (zero-width pieces carry no weight)
    i = torch.clamp((mid * n).floor().long(), 0, n - 1)
    j = torch.clamp((mid * m).floor().long(), 0, m - 1)
    return ((us[..., i] - vs[..., j]) ** 2 * widths).sum(-1)


def sliced_wasserstein(x: Tensor, y: Tensor, n_projections: int = 256, seed: int = 0) -> float:
    """SW2 between sample sets x (N, *shape) and y (M, *shape) (rows flattened)."""
    x2, y2 = x.reshape(x.shape[0], -1).to(F64), y.reshape(y.shape[0], -1).to(F64)
    if x2.shape[1] != y2.shape[1]:
        raise FewstepError(
            f"sliced Wasserstein: the sets have {x2.shape[1]} and {y2.shape[1]} dimensions; "
            "pass samples of the same shape"
        )
    if x2.shape[0] < 1 or y2.shape[0] < 1:
        raise FewstepError("sliced Wasserstein needs at least one sample in each set")
    th = projection_directions(x2.shape[1], n_projections, seed)
    return float(wasserstein2_sq_1d(th @ x2.T, th @ y2.T).mean().sqrt())


__all__ = ["projection_directions", "sliced_wasserstein", "wasserstein2_sq_1d"]
