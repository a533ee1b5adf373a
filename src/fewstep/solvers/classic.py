"""Classic solvers as coefficient generators: (schedule, grid) -> Tableau (a, B, C).

All arithmetic is float64. Notation per grid point i: alpha_i, sigma_i, lambda_i,
s_i = sigma_i / alpha_i, h_i = lambda_{i+1} - lambda_i.

- ``ddim``               basis D: a_i = sigma_{i+1}/sigma_i, B[i,i] = alpha_{i+1} (1 - e^{-h_i}).
- ``dpmpp_2m``/``_3m``   basis D: DPM-Solver++ multistep (finite differences of D, r = h_{i-1}/h_i).
- ``unipc*``             basis D: UniP predictor and UniC corrector, B(h) = h (bh1) or e^h - 1 (bh2).
- ``ipndm*``             basis E in (y, s): equal-step Adams-Bashforth rows times (s_{i+1} - s_i).
- ``deis``               basis E in (y, s): Lagrange polynomial of E in log s, integrated over s exactly.
- ``deis_tab``           basis E in (y, s): Lagrange polynomial of E in t, integrated over s (Gauss-Legendre).
- ``euler``, ``adams2..4`` basis v: variable-step Adams-Bashforth in t (a_i = 1).

The registry (names, NFE rules, what a solver needs of the schedule) is :mod:`.registry`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.polynomial import Polynomial

from ..errors import FewstepError
from ..schedules import F64, Schedule
from .kernel import Tableau


@dataclass
class GridPoints:
    """Schedule quantities at the grid points, as float64 numpy arrays of shape (N+1,)."""

    t: np.ndarray
    alpha: np.ndarray
    sigma: np.ndarray
    lambda_: np.ndarray

    @classmethod
    def of(cls, schedule: Schedule, t: torch.Tensor) -> GridPoints:
        """The quantities at grid t (N+1,)."""
        t = t.detach().to(F64)
        with torch.no_grad():
            # lambda is -inf at a noise end with alpha = 0 (flows at t = 1) and +inf at the clean
            # end; the generators take the limits (a difference over an infinite step drops out)
            return cls(
                t.numpy().copy(), schedule.alpha(t).numpy(), schedule.sigma(t).numpy(), schedule.lambda_(t).numpy()
            )

    @property
    def s(self) -> np.ndarray:
        """sigma / alpha at the grid points, (N+1,) (inf where alpha = 0)."""
        with np.errstate(divide="ignore"):
            return self.sigma / self.alpha

    @property
    def N(self) -> int:
        """The number of steps."""
        return len(self.t) - 1

    def history(self, i: int) -> int:
        """How many evaluations up to step i sit at a finite log-SNR (usable in differences)."""
        return int(np.sum(np.isfinite(self.lambda_[: i + 1])))

    def h(self, i: int) -> float:
        """The log-SNR step lambda_{i+1} - lambda_i."""
        return float(self.lambda_[i + 1] - self.lambda_[i])


def step_orders(n: int, order: int, lower_order_final: bool, final_zero: bool, second_lower: bool = True) -> list[int]:
    """Order used at each step: warm start 1, 2, ...; lower order at the end as diffusers does."""
    out = []
    for i in range(n):
        p = min(order, i + 1)
        if lower_order_final and n < 15:
            if i == n - 1:
                p = 1
            elif i == n - 2 and second_lower:
                p = min(p, 2)
        if i == n - 1 and final_zero:
            p = 1
        out.append(p)
    return out


def _empty(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(n), np.zeros((n, n))


def _tableau(
    name: str, basis: str, t: torch.Tensor, a: np.ndarray, B: np.ndarray, C: np.ndarray | None = None, **info: Any
) -> Tableau:
    """The validated tableau of a generator's tables a (N,), B (N, N) and C (N, N+1) on grid t (N+1,)."""
    return Tableau(
        basis=basis,
        t=t.detach().to(F64).clone(),
        a=torch.as_tensor(a, dtype=F64),
        B=torch.as_tensor(B, dtype=F64),
        C=None if C is None else torch.as_tensor(C, dtype=F64),
        name=name,
        info=info,
    ).validate()


def _a_D(g: GridPoints, i: int) -> float:
    return float(g.sigma[i + 1] / g.sigma[i])


def _phi_D(g: GridPoints, i: int) -> float:
    """alpha_{i+1} (1 - e^{-h_i}) = alpha_{i+1} - sigma_{i+1} alpha_i / sigma_i (exact at sigma_{i+1} = 0)."""
    return float(g.alpha[i + 1] - g.sigma[i + 1] * g.alpha[i] / g.sigma[i])


# ----------------------------------------------------------------------------- data prediction
def ddim(schedule: Schedule, t: torch.Tensor) -> Tableau:
    """DDIM (first-order, data prediction) on grid t (N+1,)."""
    g = GridPoints.of(schedule, t)
    a, B = _empty(g.N)
    for i in range(g.N):
        a[i], B[i, i] = _a_D(g, i), _phi_D(g, i)
    return _tableau("ddim", "D", t, a, B)


def dpmpp(schedule: Schedule, t: torch.Tensor, order: int = 2, lower_order_final: bool = True) -> Tableau:
    """DPM-Solver++(2M) / (3M), midpoint form, data prediction."""
    g = GridPoints.of(schedule, t)
    n = g.N
    a, B = _empty(n)
    orders = step_orders(n, order, lower_order_final, g.sigma[-1] == 0)
    for i in range(n):
        a[i] = _a_D(g, i)
        phi = _phi_D(g, i)  # = -alpha (e^{-h} - 1)
        p = orders[i]
        if p == 1:
            B[i, i] += phi
            continue
        h = g.h(i)
        r0 = g.h(i - 1) / h
        if p == 2:
            B[i, i] += phi * (1 + 0.5 / r0)
            B[i, i - 1] -= phi * 0.5 / r0
            continue
        r1 = g.h(i - 2) / h
        al = float(g.alpha[i + 1])
        em = math.expm1(-h)
        c0 = phi  # D0 coefficient
        c1 = al * (em / h + 1.0)  # D1 coefficient
        c2 = -al * ((em + h) / h**2 - 0.5)  # D2 coefficient
        # D1_0 = (m0 - m1)/r0, D1_1 = (m1 - m2)/r1; D1 = D1_0 + r0/(r0+r1) (D1_0 - D1_1); D2 = (D1_0 - D1_1)/(r0+r1)
        d10 = {i: 1 / r0, i - 1: -1 / r0}
        d11 = {i - 1: 1 / r1, i - 2: -1 / r1}
        diff = {k: d10.get(k, 0) - d11.get(k, 0) for k in (i, i - 1, i - 2)}
        for k in (i, i - 1, i - 2):
            d1 = d10.get(k, 0) + r0 / (r0 + r1) * diff[k]
            d2 = diff[k] / (r0 + r1)
            B[i, k] += c1 * d1 + c2 * d2
        B[i, i] += c0
    return _tableau(f"dpmpp_{order}m", "D", t, a, B, orders=orders)


def _unipc_rows(g: GridPoints, i: int, p: int, variant: str, corrector: bool) -> dict[int, float]:
    """Coefficients on F_j of UniP (corrector=False) or UniC (corrector=True) from x_i to x_{i+1}.

    The corrector also weights F_{i+1}, evaluated at the predicted x_{i+1}.
    """
    h = g.h(i)
    al = float(g.alpha[i + 1])
    hh = -h
    h_phi_1 = math.expm1(hh)
    B_h = hh if variant == "bh1" else math.expm1(hh)
    out: dict[int, float] = {i: -al * h_phi_1}
    k_max = p - 1
    rks = [(g.lambda_[i - k] - g.lambda_[i]) / h for k in range(1, k_max + 1)] + [1.0]
    # b_q = h phi_q(h) q! / B(h), with h phi_{q+1} = h phi_q / hh - 1/(q+1)!
    b, h_phi_k, fact = [], h_phi_1 / hh - 1.0, 1.0
    for q in range(1, p + 1):
        b.append(h_phi_k * fact / B_h)
        fact *= q + 1
        h_phi_k = h_phi_k / hh - 1.0 / fact
    R = np.array([[r ** (q - 1) for r in rks] for q in range(1, p + 1)])
    if corrector:
        rhos = [0.5] if p == 1 else list(np.linalg.solve(R, np.array(b)))
    else:
        if p == 1:
            return out
        rhos = [0.5] if p == 2 else list(np.linalg.solve(R[:-1, :-1], np.array(b[:-1])))
    for k in range(1, k_max + 1):  # D1_k = (F_{i-k} - F_i) / r_k
        w = -al * B_h * rhos[k - 1] / rks[k - 1]
        out[i - k] = out.get(i - k, 0.0) + w
        out[i] -= w
    if corrector:  # rho_last (F_{i+1} - F_i)
        w = -al * B_h * rhos[-1]
        out[i + 1] = w
        out[i] -= w
    return out


def unipc(
    schedule: Schedule,
    t: torch.Tensor,
    order: int = 2,
    variant: str = "bh2",
    lower_order_final: bool = True,
    corrector: bool = True,
) -> Tableau:
    """UniPC (data prediction): UniP-p predictor and UniC corrector, variant bh1 or bh2."""
    if variant not in ("bh1", "bh2"):
        raise FewstepError(f"unipc variant must be 'bh1' or 'bh2'; got {variant!r}")
    g = GridPoints.of(schedule, t)
    n = g.N
    a, B = _empty(n)
    C = np.zeros((n, n + 1))
    orders = [min(order, n - i) if lower_order_final else order for i in range(n)]
    orders = [max(1, min(p, i + 1, g.history(i))) for i, p in enumerate(orders)]
    if g.sigma[-1] == 0:
        orders[-1] = 1
    for i in range(n):
        a[i] = _a_D(g, i)
        for j, w in _unipc_rows(g, i, orders[i], variant, False).items():
            B[i, j] += w
        if variant == "bh1" and not math.isfinite(g.h(i)):
            continue  # B(h) = h is unbounded over an infinite step: no corrector there
        if corrector and i < n - 1:
            for j, w in _unipc_rows(g, i, orders[i], variant, True).items():
                C[i, j] += w
    name = f"unipc_{variant}" + (f"_p{order}" if order != 2 else "")
    return _tableau(name, "D", t, a, B, C if corrector else None, orders=orders)


# ----------------------------------------------------------------------------- noise prediction, (y, s)
IPNDM_ROWS = ([1.0], [3 / 2, -1 / 2], [23 / 12, -16 / 12, 5 / 12], [55 / 24, -59 / 24, 37 / 24, -9 / 24])


def _check_alpha(g: GridPoints, name: str) -> None:
    if g.alpha[0] <= 0:
        raise FewstepError(
            f"{name} works in y = x / alpha and needs alpha > 0 at the first grid time "
            f"(t={g.t[0]:g} has alpha = 0); use euler/adams, ddim or the dpmpp/unipc solvers for this flow schedule"
        )


def ipndm(schedule: Schedule, t: torch.Tensor, order: int = 4) -> Tableau:
    """iPNDM: Adams-Bashforth in (y, s) with the published equal-step rows, warm start."""
    if not 1 <= order <= 4:
        raise FewstepError(f"ipndm order must be 1..4; got {order}")
    g = GridPoints.of(schedule, t)
    _check_alpha(g, "ipndm")
    s = g.s
    n = g.N
    a, B = _empty(n)
    for i in range(n):
        a[i] = float(g.alpha[i + 1] / g.alpha[i])
        row = IPNDM_ROWS[min(order, i + 1) - 1]
        for k, w in enumerate(row):
            B[i, i - k] = float(g.alpha[i + 1] * (s[i + 1] - s[i])) * w
    return _tableau(f"ipndm{order}" if order != 4 else "ipndm", "E", t, a, B)


def _lagrange(nodes: np.ndarray, k: int) -> Polynomial:
    """Lagrange basis polynomial k over ``nodes`` (local variable)."""
    p = Polynomial([1.0])
    for m, u in enumerate(nodes):
        if m != k:
            p = p * Polynomial([-u, 1.0]) / (nodes[k] - u)
    return p


def _int_exp(p: Polynomial, v0: float, v1: float) -> float:
    """Integral of p(v) e^v dv over [v0, v1] (v1 may be -inf), exactly."""

    def anti(v: float) -> float:
        if v == -math.inf:
            return 0.0
        tot, q, sign = 0.0, p, 1.0
        while True:
            tot += sign * q(v)
            if q.degree() == 0:
                break
            q, sign = q.deriv(), -sign
        return math.exp(v) * tot

    return anti(v1) - anti(v0)


def deis(schedule: Schedule, t: torch.Tensor, order: int = 3, lower_order_final: bool = True) -> Tableau:
    """DEIS (log-rho AB): E interpolated by a polynomial in u = log s, y_{i+1} = y_i + int E ds."""
    if not 1 <= order <= 3:
        raise FewstepError(f"deis order must be 1..3; got {order}")
    g = GridPoints.of(schedule, t)
    _check_alpha(g, "deis")
    n = g.N
    with np.errstate(divide="ignore"):
        u = np.log(g.s)
    a, B = _empty(n)
    orders = step_orders(n, order, lower_order_final, False)
    for i in range(n):
        a[i] = float(g.alpha[i + 1] / g.alpha[i])
        p = orders[i]
        nodes = np.array([u[i - k] for k in range(p)]) - u[i]
        for k in range(p):
            # int_{s_i}^{s_{i+1}} L_k(log s) ds = s_i int_0^{u_{i+1}-u_i} L_k(v) e^v dv
            w = float(g.s[i]) * _int_exp(_lagrange(nodes, k), 0.0, float(u[i + 1] - u[i]))
            B[i, i - k] = float(g.alpha[i + 1]) * w
    return _tableau(f"deis{order}" if order != 3 else "deis", "E", t, a, B, orders=orders)


def _gauss(lo: float, hi: float, m: int = 24) -> tuple[np.ndarray, np.ndarray]:
    x, w = np.polynomial.legendre.leggauss(m)
    return 0.5 * (hi - lo) * x + 0.5 * (hi + lo), 0.5 * (hi - lo) * w


def deis_tab(schedule: Schedule, t: torch.Tensor, order: int = 3, lower_order_final: bool = True) -> Tableau:
    """DEIS tAB: E interpolated by a polynomial in t, integrated against ds/dt (Gauss-Legendre)."""
    g = GridPoints.of(schedule, t)
    _check_alpha(g, "deis_tab")
    n = g.N
    a, B = _empty(n)
    orders = step_orders(n, order, lower_order_final, False)
    for i in range(n):
        a[i] = float(g.alpha[i + 1] / g.alpha[i])
        p = orders[i]
        nodes = np.array([g.t[i - k] for k in range(p)]) - g.t[i]
        tq, wq = _gauss(0.0, float(g.t[i + 1] - g.t[i]))
        ds = schedule.d_s(torch.as_tensor(tq + g.t[i], dtype=F64)).numpy()
        for k in range(p):
            B[i, i - k] = float(g.alpha[i + 1]) * float(np.sum(wq * ds * _lagrange(nodes, k)(tq)))
    return _tableau(f"deis_tab{order}" if order != 3 else "deis_tab", "E", t, a, B, orders=orders)


# ----------------------------------------------------------------------------- velocity
def adams(schedule: Schedule, t: torch.Tensor, order: int = 1) -> Tableau:
    """Variable-step Adams-Bashforth on dx/dt = v (order 1 is Euler); warm start."""
    if not 1 <= order <= 4:
        raise FewstepError(f"adams order must be 1..4; got {order}")
    g = GridPoints.of(schedule, t)
    n = g.N
    a, B = np.ones(n), np.zeros((n, n))
    for i in range(n):
        p = min(order, i + 1)
        nodes = np.array([g.t[i - k] for k in range(p)]) - g.t[i]
        for k in range(p):
            B[i, i - k] = float(_lagrange(nodes, k).integ()(g.t[i + 1] - g.t[i]))
    return _tableau("euler" if order == 1 else f"adams{order}", "v", t, a, B)
