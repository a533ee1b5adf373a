"""The one solver kernel: a linear multistep method given by coefficient tables.

With grid t_0 > ... > t_N, evaluation times c_i (= t_i unless decoupled) and F_j the model
output at step j in the solver's basis (D, E or velocity v):

    predictor:  x_{i+1} = a_i x_i + sum_{j <= i}   B[i, j] F_j
    corrector:  x_{i+1} = a_i x_i + sum_{j <= i+1} C[i, j] F_j   (i < N - 1; F_{i+1} is the
                evaluation at the predicted x_{i+1}, reused as the next step's F: no extra NFE)

N steps cost exactly N model evaluations. Classic solvers and learned solvers are both a
:class:`Tableau`; the tables may carry autograd (learned parameters train through here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..denoiser import BASES, Denoiser, TimeScalars, check_finite
from ..errors import FewstepError, ModelOutputError

F64 = torch.float64


@dataclass
class Tableau:
    """Coefficient tables of one N-step solver.

    Shapes: t (N+1,), a (N,), B (N, N) lower triangular, C (N, N+1) or None, c (N,) or None.
    ``B_mask``/``C_mask`` mark the structurally non-zero entries (default: entries != 0);
    learned solvers set them so a coefficient that passes through 0 keeps its gradient.
    """

    basis: str
    t: Tensor
    a: Tensor
    B: Tensor
    C: Tensor | None = None
    c: Tensor | None = None
    name: str = "custom"
    B_mask: Tensor | None = None
    C_mask: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)
    _plans: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def N(self) -> int:
        return int(self.a.shape[0])

    @property
    def eval_times(self) -> Tensor:
        return self.t[:-1] if self.c is None else self.c

    def validate(self) -> "Tableau":
        n = self.N
        if self.basis not in BASES:
            raise FewstepError(f"tableau basis must be one of {', '.join(BASES)}; got {self.basis!r}")
        if tuple(self.t.shape) != (n + 1,):
            raise FewstepError(f"tableau grid has {tuple(self.t.shape)} times for {n} steps; need ({n + 1},)")
        if tuple(self.B.shape) != (n, n):
            raise FewstepError(f"tableau B has shape {tuple(self.B.shape)}; need ({n}, {n})")
        if self.C is not None and tuple(self.C.shape) != (n, n + 1):
            raise FewstepError(f"tableau C has shape {tuple(self.C.shape)}; need ({n}, {n + 1})")
        if self.c is not None and tuple(self.c.shape) != (n,):
            raise FewstepError(f"tableau eval times have shape {tuple(self.c.shape)}; need ({n},)")
        if torch.triu(self._mask(self.B, self.B_mask), 1).any():
            raise FewstepError("tableau B must be lower triangular (a step can only use past evaluations)")
        return self

    @staticmethod
    def _mask(M: Tensor, mask: Tensor | None) -> Tensor:
        return (M.detach() != 0) if mask is None else mask.bool()

    def rows(self) -> tuple[list[list[int]], list[list[int]] | None]:
        """Per step, the indices j of the evaluations the predictor (and corrector) use."""
        bm = self._mask(self.B, self.B_mask)
        b_rows = [torch.nonzero(bm[i]).flatten().tolist() for i in range(self.N)]
        if self.C is None:
            return b_rows, None
        cm = self._mask(self.C, self.C_mask)
        c_rows = [torch.nonzero(cm[i]).flatten().tolist() if i < self.N - 1 else [] for i in range(self.N)]
        return b_rows, c_rows


def _coefs(v: Tensor, dtype: torch.dtype, device: torch.device) -> Any:
    """Python floats when no gradient is needed (fast), else a tensor in the state's dtype."""
    if v.requires_grad:
        return v.to(device=device, dtype=dtype)
    return v.tolist()


def run_tableau(
    model: Denoiser,
    x: Tensor,
    tab: Tableau,
    cond: dict[str, Any] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    return_trajectory: bool = False,
    use_checkpoint: bool = False,
    check: bool = True,
) -> Tensor | tuple[Tensor, list[Tensor]]:
    """Integrate from x at t_0 to t_N with the tableau: N model evaluations.

    Args:
        model: the Denoiser.
        x: the state at t_0 (already scaled), shape (B, ...).
        tab: the coefficient tables.
        cond: conditioning keyword arguments passed to every model call.
        callback: called after every step with {"i", "t", "x", "F"}.
        return_trajectory: also return the N + 1 states [x_0, ..., x_N].
        use_checkpoint: recompute each model call in the backward pass (saves memory).
        check: stop with a clear error if the model returns NaN or inf.
    Returns:
        x_N, shape (B, ...), or (x_N, trajectory).
    """
    cond = cond or {}
    n = tab.N
    dt, dev = x.dtype, x.device
    grad = tab.B.requires_grad or tab.a.requires_grad or (tab.C is not None and tab.C.requires_grad) \
        or tab.eval_times.requires_grad
    key = (id(model.schedule), dt, str(dev))
    plan = None if grad else tab._plans.get(key)
    if plan is None:
        c_all = tab.eval_times
        b_rows, c_rows = tab.rows()
        # the last step that needs F_j: drop it afterwards to keep memory flat on long solves
        last_use = [0] * (n + 1)
        for i in range(n):
            for j in b_rows[i] + (c_rows[i] if c_rows else []):
                last_use[j] = max(last_use[j], i)
        plan = (_coefs(tab.a, dt, dev), _coefs(tab.B, dt, dev),
                _coefs(tab.C, dt, dev) if tab.C is not None else None,
                c_all, TimeScalars.many(model.schedule, c_all, with_net_time=not grad),  # once per tableau
                b_rows, c_rows, last_use)
        if not grad:
            tab._plans[key] = plan
    a, B, C, c_all, scal, b_rows, c_rows, last_use = plan
    c_times = c_all.detach()
    name = tab.name

    def evaluate(xi: Tensor, j: int) -> Tensor:
        tj = c_all[j] if c_all.requires_grad else c_times[j]
        if use_checkpoint and torch.is_grad_enabled():
            out = checkpoint(lambda z: model.predict(z, tj, tab.basis, scal[j], **cond), xi, use_reentrant=False)
        else:
            out = model.predict(xi, tj, tab.basis, scal[j], **cond)
        if check and not math.isfinite(float(out.detach().sum())):
            try:
                check_finite(out, f"at step {j} (t={float(tj):.6g}) of solver {name}")
            except ModelOutputError as e:
                raise ModelOutputError(str(e)) from None
        return out

    def combine(coef_a: Any, M: Any, i: int, js: list[int], xi: Tensor, F: dict[int, Tensor]) -> Tensor:
        if grad:
            acc = xi * coef_a[i]
            for j in js:
                acc = acc + M[i][j] * F[j]
            return acc
        acc = torch.mul(xi, coef_a[i])
        for j in js:
            acc.add_(F[j], alpha=M[i][j])
        return acc

    traj = [x] if return_trajectory else None
    F: dict[int, Tensor] = {0: evaluate(x, 0)}
    for i in range(n):
        x_new = combine(a, B, i, b_rows[i], x, F)
        if i < n - 1:
            F[i + 1] = evaluate(x_new, i + 1)
            if C is not None and c_rows[i]:
                x_new = combine(a, C, i, c_rows[i], x, F)
        for j in [j for j in F if last_use[j] <= i and j <= i]:
            del F[j]
        x = x_new
        if check and not math.isfinite(float(x.detach().sum())):
            raise ModelOutputError(
                f"solver {name} produced NaN/inf at step {i} (t={float(tab.t[i + 1]):.6g}) from finite model outputs: "
                f"its coefficients are unstable on this grid; try another solver or grid"
            )
        if traj is not None:
            traj.append(x)
        if callback is not None:
            callback({"i": i, "t": float(tab.t[i + 1]), "x": x, "F": F.get(i + 1)})
    return (x, traj) if return_trajectory else x
