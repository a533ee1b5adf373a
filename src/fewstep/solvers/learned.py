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

from ..denoiser import Denoiser
from ..schedules import Schedule
from .kernel import Tableau

F64 = torch.float64
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
            m[i, max(0, i - k + 1): i + 2] = True
        return m
    m = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        m[i, max(0, i - k + 1): i + 1] = True
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
    """

    kind = "learned"
    grid_label = "learned"

    def __init__(self, schedule: Schedule, t_init: Tensor, basis: str, W_init: Tensor, mask: Tensor,
                 V_init: Tensor | None = None, V_mask: Tensor | None = None, rows_sum_to_one: bool = False,
                 decouple: float = 0.0, method: str = "s4s", start: str = "", scale_a: bool = False) -> None:
        super().__init__()
        self.schedule, self.basis, self.method, self.start = schedule, basis, method, start
        self.rows_sum_to_one, self.decouple = rows_sum_to_one, float(decouple)
        t_init = t_init.detach().to(F64)
        n = t_init.numel() - 1
        self.N = n
        self.t_max, self.t_end = float(t_init[0]), float(t_init[-1])
        steps = (t_init[:-1] - t_init[1:]) / (self.t_max - self.t_end)
        free = (steps - MIN_STEP) / (1.0 - n * MIN_STEP)  # inverse of grid()'s floor: the start is exact
        self.r = nn.Parameter(torch.log(free.clamp_min(1e-300)))
        self.delta = nn.Parameter(torch.zeros(n, dtype=F64))
        m = torch.tril(mask.bool(), -1) if rows_sum_to_one else mask.bool()
        self.register_buffer("mask", m.clone())
        self.W = nn.Parameter((W_init.to(F64) * m).clone())
        if V_init is not None:
            self.register_buffer("V_mask", V_mask.bool().clone())
            self.V = nn.Parameter((V_init.to(F64) * V_mask).clone())
        else:
            self.V_mask, self.V = None, None
        # optional learned scale of the carried state: a_i -> a_i exp(u_i) (starts at 0: the basis' a_i)
        self.u = nn.Parameter(torch.zeros(n, dtype=F64)) if scale_a else None
        self.nfe = n
        self.name = method
        self.info: dict[str, Any] = {}

    # --------------------------------------------------------------------------- parameters
    def grid(self) -> Tensor:
        """t (N+1,), strictly decreasing from t_max to t_end.

        Each step is at least MIN_STEP of the interval, so no step can underflow to a tie
        however far the logits r move.
        """
        w = MIN_STEP + (1.0 - self.N * MIN_STEP) * torch.softmax(self.r, 0)
        cum = torch.cat([torch.zeros(1, dtype=F64, device=w.device), torch.cumsum(w, 0)])
        t = self.t_max - (self.t_max - self.t_end) * cum
        ends = torch.tensor([self.t_max, self.t_end], dtype=F64, device=w.device)  # constants: no gradient path
        return torch.cat([ends[:1], t[1:-1], ends[1:]])

    def eval_times(self, t: Tensor) -> Tensor | None:
        if self.decouple <= 0:
            return None
        steps = t[:-1] - t[1:]  # (N,)
        left = torch.cat([steps[:1], steps[:-1]])  # step before point i (point 0: its own step)
        d = self.decouple * torch.minimum(left, steps)
        d = torch.cat([torch.zeros(1, dtype=F64, device=t.device), d[1:]])  # c_0 = t_0: endpoint fixed
        return t[:-1] + d * torch.tanh(self.delta)

    def weights(self) -> Tensor:
        if not self.rows_sum_to_one:
            return self.W * self.mask
        off = self.W * self.mask
        return off + torch.diag(1.0 - off.sum(1))

    def coef_groups(self) -> dict[str, list[nn.Parameter]]:
        g = {"grid": [self.r] + ([self.delta] if self.decouple > 0 else []), "coef": [self.W]}
        if self.V is not None:
            g["coef"].append(self.V)
        if self.u is not None:
            g["coef"].append(self.u)
        return g

    def structure(self) -> dict[str, Any]:
        """What, besides the parameter tensors, rebuilds this solver (see :func:`save_params`)."""
        return {"N": self.N, "basis": self.basis, "method": self.method, "start": self.start,
                "rows_sum_to_one": self.rows_sum_to_one, "decouple": self.decouple, "t_max": self.t_max,
                "t_end": self.t_end, "corrector": self.V is not None, "scale_a": self.u is not None}

    def tableau(self, model: Denoiser | None = None) -> Tableau:
        """The kernel tables (differentiable in the parameters)."""
        t = self.grid()
        a, phi = step_scales(self.schedule, t, self.basis)
        if self.u is not None:
            a = a * torch.exp(self.u)
        W = self.weights()
        B = phi[:, None] * W
        C = None if self.V is None else phi[:, None] * (self.V * self.V_mask)
        bm = torch.diag(torch.ones(self.N, dtype=torch.bool)) | self.mask
        return Tableau(self.basis, t, a, B, C, self.eval_times(t), name=self.method, B_mask=bm,
                       C_mask=self.V_mask)
