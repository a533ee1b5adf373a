"""Learned solvers: the kernel's tables as parameters.

One parameterisation covers S4S, S4S-Alt, LD3 and DSS. For step i with grid t_0 > ... > t_N:

    x_{i+1} = a_i x_i + phi_i * sum_j W[i, j] F_j          (predictor)
    x_{i+1} = a_i x_i + phi_i * sum_j V[i, j] F_j          (corrector, optional, j <= i + 1)

with, by basis (all functions of the grid, so a learned grid stays consistent):
    D (data prediction):  a_i = sigma_{i+1}/sigma_i,  phi_i = alpha_{i+1} - sigma_{i+1} alpha_i / sigma_i
                          (= alpha_{i+1} (1 - e^{-h_i}) = sigma_{i+1} (omega_{i+1} - omega_i), omega = alpha/sigma)
    E (noise prediction): a_i = alpha_{i+1}/alpha_i,  phi_i = sigma_{i+1} - alpha_{i+1} sigma_i / alpha_i
    v (velocity):         a_i = 1,                    phi_i = t_{i+1} - t_i
W = I is DDIM (D, E) or Euler (v). S4S leaves W free over the last k evaluations; DSS makes every
row sum to one (the diagonal is 1 - the rest). The grid is t_i = t_max - (t_max - t_end) *
cumsum(w)_i with steps w = eps + (1 - N eps) softmax(r) (eps = MIN_STEP): strictly monotone with
fixed endpoints by construction. Decoupled
evaluation times are c_i = t_i + d_i tanh(delta_i) with d_i a fraction of the neighbouring steps.
Saving and loading solvers is :mod:`.artifact`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..conditions import GuidanceSet
from ..denoiser import Denoiser
from ..errors import FewstepError
from ..schedules import F64, Schedule
from .kernel import Tableau

#: the smallest step of a learned grid, as a fraction of [t_end, t_max] (keeps it strictly monotone)
MIN_STEP = 1e-9


def step_scales(schedule: Schedule, t: Tensor, basis: str) -> tuple[Tensor, Tensor]:
    """(a, phi) of shape (N,) for grid t (N+1,), differentiable in t."""
    if basis == "v":
        return torch.ones_like(t[:-1]), t[1:] - t[:-1]
    al, sg = schedule.alpha(t), schedule.sigma(t)
    if basis == "D":
        a = sg[1:] / sg[:-1]
        return a, al[1:] - a * al[:-1]
    a = al[1:] / al[:-1]
    return a, sg[1:] - a * sg[:-1]


def window_mask(n: int, k: int, corrector: bool = False) -> Tensor:
    """Last-k evaluations per step: (N, N) predictor mask, or (N, N+1) corrector mask (k+1 wide)."""
    if corrector:
        m = torch.zeros(n, n + 1, dtype=torch.bool)
        for i in range(n - 1):
            m[i, max(0, i - k + 1) : i + 2] = True
        return m
    m = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        m[i, max(0, i - k + 1) : i + 1] = True
    return m


class LearnedSolver(nn.Module):
    """A parameterised N-step solver (see the module docstring).

    Args:
        schedule: the model's schedule.
        t_init: starting grid (N+1,), e.g. the grid of the classic starting solver.
        basis: 'D', 'E' or 'v'.
        W_init: (N, N) starting predictor weights (normalised by phi), V_init: (N, N+1) or None.
        mask, V_mask: which weights are free (others are fixed at 0).
        rows_sum_to_one: DSS form (the diagonal is implicit).
        decouple: learn evaluation-time offsets, at most ``decouple`` times the smaller adjacent step.
        guidance: the guidance scales a solver is fitted across (two or more): every raw parameter is then
            a polynomial in the scale, P(w) = sum_k P_k L_k(u), with u = w mapped onto [-1, 1] over the
            scales' range and L_k the Legendre polynomials up to degree min(len(guidance), 3) - 1; the
            start (P_0 = the classic solver, P_k = 0 otherwise) is exact at every w.
    """

    kind = "learned"
    grid_label = "learned"
    # buffers and optional parameters, set in __init__
    mask: Tensor
    V_mask: Tensor | None
    V: nn.Parameter | None
    u: nn.Parameter | None

    def __init__(
        self,
        schedule: Schedule,
        t_init: Tensor,
        basis: str,
        W_init: Tensor,
        mask: Tensor,
        V_init: Tensor | None = None,
        V_mask: Tensor | None = None,
        rows_sum_to_one: bool = False,
        decouple: float = 0.0,
        method: str = "s4s",
        start: str = "",
        scale_a: bool = False,
        guidance: tuple[float, ...] | None = None,
    ) -> None:
        super().__init__()
        self.schedule, self.basis, self.method, self.start = schedule, basis, method, start
        self.rows_sum_to_one, self.decouple = rows_sum_to_one, float(decouple)
        self.guidance = tuple(sorted(float(w) for w in guidance)) if guidance and len(guidance) > 1 else None
        self.degree = 0 if self.guidance is None else min(len(self.guidance), 3) - 1
        t_init = t_init.detach().to(F64)
        n = t_init.numel() - 1
        self.N = n
        self.t_max, self.t_end = float(t_init[0]), float(t_init[-1])
        steps = (t_init[:-1] - t_init[1:]) / (self.t_max - self.t_end)
        free = (steps - MIN_STEP) / (1.0 - n * MIN_STEP)  # inverse of grid()'s floor: the start is exact
        self.r = self._poly(torch.log(free.clamp_min(1e-300)))
        self.delta = self._poly(torch.zeros(n, dtype=F64))
        m = torch.tril(mask.bool(), -1) if rows_sum_to_one else mask.bool()
        self.register_buffer("mask", m.clone())
        self.W = self._poly(W_init.to(F64) * m)
        if V_init is not None:
            if V_mask is None:
                raise FewstepError("a learned corrector (V_init) needs V_mask: which of its weights are free")
            self.register_buffer("V_mask", V_mask.bool().clone())
            self.V = self._poly(V_init.to(F64) * V_mask)
        else:
            self.V_mask, self.V = None, None
        # optional learned scale of the carried state: a_i -> a_i exp(u_i) (starts at 0: the basis' a_i)
        self.u = self._poly(torch.zeros(n, dtype=F64)) if scale_a else None
        self.nfe = n
        self.name = method
        self.info: dict[str, Any] = {}

    # --------------------------------------------------------------------------- guidance
    def _poly(self, init: Tensor) -> nn.Parameter:
        """A raw parameter: ``init`` itself, or (degree + 1, *init.shape) coefficients starting at ``init``."""
        if self.degree == 0:
            return nn.Parameter(init.clone())
        out = torch.zeros(self.degree + 1, *init.shape, dtype=F64)
        out[0] = init
        return nn.Parameter(out)

    @property
    def guidance_range(self) -> tuple[float, float] | None:
        """(lowest, highest) guidance scale this solver is defined for (None: one solver for every scale)."""
        return None if self.guidance is None else (self.guidance[0], self.guidance[-1])

    @property
    def reference_scale(self) -> float | None:
        """The scale an artifact's main tables are written at: the middle of the fitted scales (None: one solver
        for every scale)."""
        return None if self.guidance is None else GuidanceSet(self.guidance).middle

    def _basis(self, w: float | None) -> Tensor | None:
        """The Legendre basis values at scale ``w``, (degree + 1,); None for a solver not fitted across scales."""
        if self.guidance is None:  # degree 0
            return None
        lo, hi = self.guidance[0], self.guidance[-1]
        if w is None:
            raise FewstepError(
                f"solver {self.name} is fitted across guidance scales {lo:g}..{hi:g}: give the scale (w=...)"
            )
        if not lo - 1e-9 * max(1.0, abs(hi)) <= float(w) <= hi + 1e-9 * max(1.0, abs(hi)):
            raise FewstepError(
                f"guidance scale {float(w):g} is outside the range {lo:g}..{hi:g} solver {self.name} "
                f"was fitted across; refit with --guidance covering it"
            )
        u = (2.0 * float(w) - lo - hi) / (hi - lo)
        return torch.tensor([1.0, u, 1.5 * u * u - 0.5][: self.degree + 1], dtype=F64)

    def _at(self, P: Tensor, phi: Tensor | None) -> Tensor:
        """A raw parameter's value at the scale whose basis values are ``phi`` (None: ``P`` itself)."""
        if phi is None:
            return P
        return torch.tensordot(phi.to(P.device), P, dims=1)

    # --------------------------------------------------------------------------- parameters
    def grid(self, w: float | None = None) -> Tensor:
        """t (N+1,), strictly decreasing from t_max to t_end (at guidance scale ``w`` for a solver fitted
        across scales).

        Each step is at least MIN_STEP of the interval, so no step can underflow to a tie
        however far the logits r move.
        """
        r = self._at(self.r, self._basis(w))
        steps = MIN_STEP + (1.0 - self.N * MIN_STEP) * torch.softmax(r, 0)
        cum = torch.cat([torch.zeros(1, dtype=F64, device=steps.device), torch.cumsum(steps, 0)])
        t = self.t_max - (self.t_max - self.t_end) * cum
        ends = torch.tensor([self.t_max, self.t_end], dtype=F64, device=steps.device)  # constants: no gradient path
        return torch.cat([ends[:1], t[1:-1], ends[1:]])

    def eval_times(self, t: Tensor, w: float | None = None) -> Tensor | None:
        """Decoupled evaluation times (N,) for grid t (N+1,); None when they are not learned (c = t[:-1])."""
        if self.decouple <= 0:
            return None
        delta = self._at(self.delta, self._basis(w))
        steps = t[:-1] - t[1:]  # (N,)
        left = torch.cat([steps[:1], steps[:-1]])  # step before point i (point 0: its own step)
        d = self.decouple * torch.minimum(left, steps)
        d = torch.cat([torch.zeros(1, dtype=F64, device=t.device), d[1:]])  # c_0 = t_0: endpoint fixed
        return t[:-1] + d * torch.tanh(delta)

    def weights(self, w: float | None = None) -> Tensor:
        """The predictor weights W (N, N), masked (DSS: the diagonal makes every row sum to one)."""
        W = self._at(self.W, self._basis(w))
        if not self.rows_sum_to_one:
            return W * self.mask
        off = W * self.mask
        return off + torch.diag(1.0 - off.sum(1))

    def coef_groups(self) -> dict[str, list[nn.Parameter]]:
        """The raw parameters by optimiser group: "grid" (grid logits, offsets) and "coef" (weights)."""
        g = {"grid": [self.r] + ([self.delta] if self.decouple > 0 else []), "coef": [self.W]}
        if self.V is not None:
            g["coef"].append(self.V)
        if self.u is not None:
            g["coef"].append(self.u)
        return g

    def structure(self) -> dict[str, Any]:
        """What, besides the parameter tensors, rebuilds this solver (see :func:`save_params`)."""
        return {
            "N": self.N,
            "basis": self.basis,
            "method": self.method,
            "start": self.start,
            "rows_sum_to_one": self.rows_sum_to_one,
            "decouple": self.decouple,
            "t_max": self.t_max,
            "t_end": self.t_end,
            "corrector": self.V is not None,
            "scale_a": self.u is not None,
            "guidance": None if self.guidance is None else list(self.guidance),
        }

    def tableau(self, model: Denoiser | None = None, w: float | None = None) -> Tableau:
        """The kernel tables (differentiable in the parameters), at guidance scale ``w`` for a solver fitted
        across scales."""
        phi = self._basis(w)
        t = self.grid(w)
        a, scale = step_scales(self.schedule, t, self.basis)
        if self.u is not None:
            a = a * torch.exp(self._at(self.u, phi))
        W = self.weights(w)
        B = scale[:, None] * W
        C = None
        if self.V is not None:
            assert self.V_mask is not None  # registered together with V in __init__
            C = scale[:, None] * (self._at(self.V, phi) * self.V_mask)
        bm = torch.diag(torch.ones(self.N, dtype=torch.bool)) | self.mask
        return Tableau(self.basis, t, a, B, C, self.eval_times(t, w), name=self.method, B_mask=bm, C_mask=self.V_mask)
