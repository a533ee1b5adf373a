"""The one solver kernel: a linear multistep method given by coefficient tables.

With states x_0 .. x_N at times t_0 .. t_N, evaluation times c_i (= t_i unless decoupled) and F_j
the model output at step j in the solver's basis (D, E or velocity v):

    predictor:  x_{i+1} = a_i x_i + sum_{j <= i}   B[i, j] F_j
    corrector:  x_{i+1} = a_i x_i + sum_{j <= i+1} C[i, j] F_j   (i < N - 1; F_{i+1} is the
                evaluation at the predicted x_{i+1}, reused as the next step's F: no extra NFE)

N steps cost exactly N model evaluations. Classic solvers and learned solvers are both a
:class:`Tableau`; the tables may carry autograd (learned parameters train through here).
A multi-stage method (Heun) is a tableau too: its internal stages are states at repeated times,
and ``points`` marks which states are the solution (the others stay out of trajectories).

:class:`Stepper` advances a tableau one evaluation at a time (``step(i, F_i) -> next evaluation
point``); :func:`run_tableau` is a loop over it that calls the model, and the diffusers scheduler is
the same stepper fed by the pipeline's network calls.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from ..denoiser import BASES, Denoiser, check_finite
from ..errors import FewstepError, ModelOutputError
from ..recompute import Recompute
from ..schedules import Schedule


@dataclass
class Tableau:
    """Coefficient tables of one N-evaluation solver.

    Shapes: t (N+1,), a (N,), B (N, N) lower triangular, C (N, N+1) or None, c (N,) or None,
    points (N+1,) bool or None (every state is a solution point).
    ``B_mask``/``C_mask`` mark the structurally non-zero entries (default: entries != 0);
    learned solvers set them so a coefficient that passes through 0 keeps its gradient.
    Tables are read-only once built (classic tables are shared between solves).
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
    points: Tensor | None = None
    _static: Any = field(default=None, init=False, repr=False, compare=False)  # float tables, filled on first use

    @property
    def N(self) -> int:
        """The number of model evaluations (steps of the kernel)."""
        return int(self.a.shape[0])

    @property
    def eval_times(self) -> Tensor:
        """The times the model is evaluated at, (N,): ``c`` if decoupled, else t_0 .. t_{N-1}."""
        return self.t[:-1] if self.c is None else self.c

    @property
    def staged(self) -> bool:
        """True if some states are internal stages (a multi-stage method such as Heun)."""
        return self.points is not None and not bool(self.points.all())

    def solution_times(self) -> Tensor:
        """The times of the solution points (t without internal stages), (M + 1,)."""
        return self.t if self.points is None else self.t[self.points]

    def solution_index(self) -> list[int | None]:
        """Per state k = 0 .. N, its place m among the solution points (0 .. M), None for an internal stage:
        solution point m closes solution step m - 1, and an evaluation there opens step m."""
        if self.points is None:
            return list(range(self.N + 1))
        out: list[int | None] = []
        m = -1
        for p in self.points.tolist():
            m += p
            out.append(m if p else None)
        return out

    def detached(self, name: str | None = None) -> Tableau:
        """A copy whose tables are detached from autograd and own their memory (``name``: renamed)."""

        def own(v: Tensor | None) -> Tensor | None:
            return None if v is None else v.detach().clone()

        return replace(
            self,
            t=self.t.detach().clone(),
            a=self.a.detach().clone(),
            B=self.B.detach().clone(),
            C=own(self.C),
            c=own(self.c),
            name=self.name if name is None else name,
            B_mask=own(self.B_mask),
            C_mask=own(self.C_mask),
            info=dict(self.info),
            points=own(self.points),
        )

    def requires_grad(self) -> bool:
        """Do the tables carry autograd (a learned solver being fitted)?"""
        return (
            self.B.requires_grad
            or self.a.requires_grad
            or (self.C is not None and self.C.requires_grad)
            or self.eval_times.requires_grad
        )

    def validate(self) -> Tableau:
        """``self`` if the tables' shapes and structure fit N steps, else a FewstepError naming the defect."""
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
        if self.points is not None and tuple(self.points.shape) != (n + 1,):
            raise FewstepError(f"tableau points have shape {tuple(self.points.shape)}; need ({n + 1},)")
        if self.points is not None and not bool(self.points[0]):
            raise FewstepError("tableau points must mark the first state (the starting noise) as a solution point")
        if torch.triu(self._mask(self.B, self.B_mask), 1).any():
            raise FewstepError("tableau B must be lower triangular (a step can only use past evaluations)")
        if self.C is not None and torch.triu(self._mask(self.C, self.C_mask), 2).any():
            raise FewstepError("tableau C may use evaluations up to the next one only (row i: j <= i + 1)")
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


@dataclass
class _Static:
    """What stepping needs of a tableau alone: rows, last uses and (without autograd) float tables."""

    b_rows: list[list[int]]
    c_rows: list[list[int]] | None
    last_use: list[int]  # the step after which F_j is no longer needed (a corrector row i is used at step i + 1)
    a: Any
    B: Any
    C: Any


def _static(tab: Tableau, grad: bool) -> _Static:
    if not grad and tab._static is not None:
        return tab._static
    b_rows, c_rows = tab.rows()
    last_use = [0] * (tab.N + 1)
    for i in range(tab.N):
        for j in b_rows[i]:
            last_use[j] = max(last_use[j], i)
        for j in c_rows[i] if c_rows else []:
            last_use[j] = max(last_use[j], i + 1)
    if grad:
        return _Static(b_rows, c_rows, last_use, tab.a, tab.B, tab.C)
    st = _Static(b_rows, c_rows, last_use, tab.a.tolist(), tab.B.tolist(), None if tab.C is None else tab.C.tolist())
    tab._static = st
    return st


class Stepper:
    """Advance a tableau one evaluation at a time.

        stepper = Stepper(tab, schedule)
        x = stepper.start(x0)                    # the first evaluation point, x_0
        for i in range(tab.N):
            F = <model output at (x, stepper.times[i]) in tab.basis>
            x = stepper.step(i, F)               # the next evaluation point; after the last step, x_N
            # stepper.state: the corrected x_i (the solution at t_i)

    ``step(i, F_i, x_eval)`` takes the evaluation point from the caller when it differs from the one
    returned (e.g. a pipeline that casts its latents). Without autograd the combinations run in place
    with float coefficients (the sampling hot path); with it (learned tables) they stay differentiable.
    """

    def __init__(self, tab: Tableau, schedule: Schedule) -> None:
        self.tab = tab
        self.grad = tab.requires_grad()
        st = _static(tab, self.grad)
        self.b_rows, self.c_rows, self.last_use = st.b_rows, st.c_rows, st.last_use
        self._a, self._B, self._C = st.a, st.B, st.C
        self.times = tab.eval_times
        self.scalars = schedule.scalars(self.times)  # differentiable when the times are learned
        self.F: dict[int, Tensor] = {}
        # set by start(): the corrected state x_i of the step in progress, and the next evaluation point
        self.state: Tensor
        self._x_eval: Tensor

    def start(self, x0: Tensor) -> Tensor:
        """Begin a solve at x0 (the state at t_0); returns the first evaluation point."""
        self.F = {}
        self.state, self._x_eval = x0, x0
        if self.grad:  # the tables' autograd carries over into the state's dtype and device
            dev, dt = x0.device, x0.dtype
            self._a, self._B = self.tab.a.to(device=dev, dtype=dt), self.tab.B.to(device=dev, dtype=dt)
            self._C = None if self.tab.C is None else self.tab.C.to(device=dev, dtype=dt)
        return x0

    def state_at_eval(self) -> Tensor:
        """The next evaluation point x_{i+1}, as the last :meth:`step` returned it (x_0 after :meth:`start`)."""
        return self._x_eval

    def step(self, i: int, F_i: Tensor, x_eval: Tensor | None = None) -> Tensor:
        """Record F_i (the output at the evaluation point x_i), correct x_i, predict x_{i+1}."""
        if x_eval is None:
            x_eval = self._x_eval
        self.F[i] = F_i
        x = x_eval
        if i >= 1 and self.c_rows is not None and self.c_rows[i - 1]:
            x = self._combine(self._C, i - 1, self.c_rows[i - 1], self.state)
        x_next = self._combine(self._B, i, self.b_rows[i], x)
        for j in [j for j in self.F if self.last_use[j] <= i]:
            del self.F[j]
        self.state, self._x_eval = x, x_next
        return x_next

    def _combine(self, M: Any, i: int, js: list[int], x: Tensor) -> Tensor:
        """a_i x + sum_j M[i, j] F_j."""
        if self.grad:
            acc = x * self._a[i]
            for j in js:
                acc = acc + M[i][j] * self.F[j]
            return acc
        acc = torch.mul(x, self._a[i])
        for j in js:
            acc.add_(self.F[j], alpha=M[i][j])
        return acc


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
        callback: called after every solution step with {"i", "t", "x", "F"}.
        return_trajectory: also return the states at the solution points [x_0, ..., x_N].
        use_checkpoint: recompute each model call in the backward pass, and each block of a diffusers
            network inside it (:class:`~fewstep.recompute.Recompute`): memory of one block, not of NFE calls.
        check: stop with a clear error if the model returns NaN or inf.
    Returns:
        x_N, shape (B, ...), or (x_N, trajectory).
    """
    stepper = Stepper(tab, model.schedule)
    predict = _predictor(model, stepper, cond or {}, use_checkpoint)
    guard = _Guard(tab, stepper.times, check)
    points = _Points(tab, x, callback, return_trajectory)
    xe = stepper.start(x)
    for i in range(tab.N):
        F = predict(xe, i)
        guard.output(F, xe, i)
        xe = stepper.step(i, F)
        if i >= 1:
            points.reached(i, stepper.state, F)
    guard.end(xe)
    points.reached(tab.N, xe, None)
    return points.result(xe)


def _predictor(
    model: Denoiser, stepper: Stepper, cond: dict[str, Any], use_checkpoint: bool
) -> Callable[[Tensor, int], Tensor]:
    """``predict(x_j, j)``: the model's output F_j at evaluation point x_j in the tableau's basis (with
    ``use_checkpoint``, recomputed in the backward pass)."""
    times = stepper.times if stepper.times.requires_grad else stepper.times.detach()
    scal, basis = stepper.scalars, stepper.tab.basis

    def predict(xj: Tensor, j: int) -> Tensor:
        return model.predict(xj, times[j], basis, scal[j], **cond)

    if not use_checkpoint:
        return predict
    recompute = Recompute(model.net)

    def predict_recomputed(xj: Tensor, j: int) -> Tensor:
        tj = times[j]
        return recompute(lambda z: model.predict(z, tj, basis, scal[j], **cond), xj)

    return predict_recomputed


class _Guard:
    """Stops a solve at the first NaN or inf with an error naming where it came from: the starting noise, the
    model, or the solver's own coefficients. One reduction per model call, none per state: a non-finite state
    reaches the next model call, whose check names the solver; only the last state is checked on its own."""

    def __init__(self, tab: Tableau, times: Tensor, on: bool) -> None:
        self.tab, self.times, self.on = tab, times, on

    def output(self, F: Tensor, x_eval: Tensor, j: int) -> None:
        """Check F_j, the model's output at x_j."""
        if not self.on or math.isfinite(float(F.detach().sum())):
            return
        if not bool(torch.isfinite(x_eval.detach()).all()):
            if j == 0:  # the starting state, not the model: checked here only once something is wrong
                raise FewstepError("the starting noise holds NaN or inf: pass finite noise (e.g. torch.randn)")
            raise self.unstable(j - 1)  # the solver's own state went first, not the model
        try:
            check_finite(F, f"at step {j} (t={float(self.times[j].detach()):.6g}) of solver {self.tab.name}")
        except ModelOutputError as e:
            raise ModelOutputError(str(e)) from None

    def end(self, x: Tensor) -> None:
        """Check the last state x_N."""
        if self.on and not math.isfinite(float(x.detach().sum())):
            raise self.unstable(self.tab.N - 1)

    def unstable(self, i: int) -> ModelOutputError:
        t = float(self.tab.t[i + 1].detach())  # a learned grid carries gradients
        return ModelOutputError(
            f"solver {self.tab.name} produced NaN/inf at step {i} (t={t:.6g}) from finite "
            f"model outputs: its coefficients are unstable on this grid; try another solver or grid"
        )


class _Points:
    """The solution points of a solve as they become final: the trajectory kept, the callback told."""

    def __init__(self, tab: Tableau, x0: Tensor, callback: Callable[[dict[str, Any]], None] | None, keep: bool) -> None:
        self.index, self.t, self.callback = tab.solution_index(), tab.t, callback
        self.traj = [x0] if keep else None

    def reached(self, k: int, x: Tensor, F: Tensor | None) -> None:
        """State k (k >= 1) is final (F: the model's output there, if evaluated); internal stages are skipped."""
        m = self.index[k]
        if m is None:
            return
        if self.traj is not None:
            self.traj.append(x)
        if self.callback is not None:
            self.callback({"i": m - 1, "t": float(self.t[k]), "x": x, "F": F})

    def result(self, x: Tensor) -> Tensor | tuple[Tensor, list[Tensor]]:
        return x if self.traj is None else (x, self.traj)
