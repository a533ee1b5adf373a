"""Classic solvers on analytic Gaussian problems: conversions, local and global order, errors."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import fewstep
from fewstep import EDM, Flow, VPDiscrete, VPLinear, make_grid, make_tableau, sample
from fewstep.errors import GridError, ModelOutputError, NFEError, ShapeError, SolverNameError
from fewstep.solvers.heun import heun
from fewstep.solvers.kernel import run_tableau
from fewstep.solvers.registry import SOLVERS
from gauss import make_gauss

F64 = torch.float64

SCHEDULES = {"vp_discrete": VPDiscrete(), "vp_linear": VPLinear(), "edm": EDM(), "flow": Flow()}
PREDICTIONS = {
    "vp_discrete": ["eps", "x0", "v"],
    "vp_linear": ["eps", "x0", "v"],
    "edm": ["eps", "x0"],
    "flow": ["velocity", "eps", "x0"],
}


def _marginal(model, t: float, n: int = 64, seed: int = 1) -> torch.Tensor:
    """Exact draws of x_t (float64)."""
    g = torch.Generator().manual_seed(seed)
    d = model.sample_shape[0]
    x0 = model.net.mu + model.net.c * torch.randn(n, d, generator=g, dtype=F64)
    s = model.schedule
    return float(s.alpha(t)) * x0 + float(s.sigma(t)) * torch.randn(n, d, generator=g, dtype=F64)


@pytest.mark.parametrize("sname", list(SCHEDULES))
def test_conversions_are_exact(sname):
    s = SCHEDULES[sname]
    for pred in PREDICTIONS[sname]:
        m = make_gauss(s, pred)
        ref = make_gauss(s, "x0")
        for t in (s.t_max * 0.8937, s.t_max * 0.3117, s.t_min * 3.3):
            x = _marginal(m, t)
            D = ref.predict(x, t, "D")
            a, g = float(s.alpha(t)), float(s.sigma(t))
            E = (x - a * D) / g
            assert torch.allclose(m.predict(x, t, "D"), D, rtol=1e-10, atol=1e-10), (sname, pred, t)
            assert torch.allclose(m.predict(x, t, "E"), E, rtol=1e-10, atol=1e-10), (sname, pred, t)
            # the velocity basis is the probability-flow ODE's dx/dt: compare with the exact flow
            v = m.predict(x, t, "v")
            dt = 1e-6 * s.t_max
            fd = (m.flow_map(x, t, t + dt) - m.flow_map(x, t, t - dt)) / (2 * dt)
            assert torch.allclose(v, fd, rtol=1e-5, atol=1e-5 * float(fd.abs().max())), (sname, pred, t)


def _local_errors(model, tab, i):
    """One step of row i from exact history: (predictor error, corrector error)."""
    t = tab.t
    x0 = _marginal(model, float(t[0]), n=32)
    X = [model.flow_map(x0, float(t[0]), float(tj)) for tj in t]
    F = [model.predict(X[j], float(t[j]), tab.basis) for j in range(i + 1)]
    a, B = tab.a.tolist(), tab.B.tolist()
    pred = a[i] * X[i] + sum(B[i][j] * F[j] for j in range(i + 1))
    err_p = float((pred - X[i + 1]).abs().max())
    if tab.C is None:
        return err_p, None
    C = tab.C.tolist()
    F.append(model.predict(pred, float(t[i + 1]), tab.basis))
    corr = a[i] * X[i] + sum(C[i][j] * F[j] for j in range(i + 2))
    return err_p, float((corr - X[i + 1]).abs().max())


# solver -> (order of the step's local error exponent minus one, the variable the grid is uniform in)
# dpmpp_3m is DPM-Solver's published multistep third-order update (and diffusers'): its second
# difference D2 = h^2 D''/2 is weighted by h phi_3(-h) where the exact expansion needs 2 h phi_3(-h),
# so quadratics in lambda are not integrated exactly and its local error falls as h^3, not h^4.
LOCAL = {
    "ddim": (1, "lambda"),
    "dpmpp_2m": (2, "lambda"),
    "dpmpp_3m": (2, "lambda"),
    "unipc_bh1": (3, "lambda"),
    "unipc": (3, "lambda"),
    "unipc3": (4, "lambda"),
    "ipndm2": (2, "s"),
    "ipndm3": (3, "s"),
    "ipndm": (4, "s"),
    "deis2": (2, "lambda"),
    "deis": (3, "lambda"),
    "deis_tab": (3, "t"),
    "euler": (1, "t"),
    "adams2": (2, "t"),
    "adams3": (3, "t"),
    "adams4": (4, "t"),
}


def _uniform_grid(s, n, var, lo_t, hi_t):
    if var == "t":
        return torch.linspace(hi_t, lo_t, n + 1, dtype=F64)
    if var == "lambda":
        return s.t_of_lambda(torch.linspace(float(s.lambda_(hi_t)), float(s.lambda_(lo_t)), n + 1, dtype=F64))
    sv = torch.linspace(float(s.s(hi_t)), float(s.s(lo_t)), n + 1, dtype=F64)
    return s.t_of_lambda(-torch.log(sv))


def test_every_classic_solver_is_tested_for_order():
    assert set(SOLVERS) - {"unipc_bh2"} <= set(LOCAL)


@pytest.mark.parametrize("name", list(LOCAL))
def test_local_order_matches_nominal(name):
    """One step from exact history: the local error falls as h^(p+1) (UniPC's corrector: p+1 -> p+2)."""
    p, var = LOCAL[name]
    s = VPLinear()
    m = make_gauss(s, "eps")
    errs = []
    for n in (16, 32, 64):
        t = _uniform_grid(s, n, var, 0.05, 0.6)
        tab = make_tableau(
            name,
            s,
            t,
            **({"lower_order_final": False} if "lower_order_final" in SOLVERS[name].make.__code__.co_varnames else {}),
        )
        ep, ec = _local_errors(m, tab, n // 2)
        errs.append(ec if ec is not None else ep)
    rate = math.log2(errs[-2] / errs[-1])
    assert abs(rate - (p + 1)) < 0.35, (name, errs, rate)


GLOBAL = (
    [("vp_linear", "eps", n) for n in LOCAL if n not in ("euler", "adams2", "adams3", "adams4")]
    + [("flow", "velocity", n) for n in ("euler", "adams2", "adams3", "adams4", "ddim", "dpmpp_2m", "unipc")]
    + [("edm", "x0", n) for n in ("ddim", "dpmpp_3m", "ipndm", "deis")]
    + [("edm", "x0", "heun")]
)


@pytest.mark.parametrize("sname,pred,name", GLOBAL)
def test_global_error_falls_with_nfe(sname, pred, name):
    """Whole solves to the exact ODE map: error falls at least at order min(p, 2) as N doubles.

    Warm-started multisteps take order-1 and order-2 steps first; their local errors bound the
    global order at 2 (the nominal order shows in the local test above).
    """
    s = SCHEDULES[sname]
    m = make_gauss(s, pred)
    noise = torch.randn(64, 6, generator=torch.Generator().manual_seed(3), dtype=F64)
    t_lo = s.t_min * 20
    errs = []
    for n in (16, 32, 64):
        if name == "heun":
            t = torch.cat([torch.linspace(s.t_max, t_lo, n + 1, dtype=F64)])
            grid = s.t_of_lambda(torch.linspace(float(s.lambda_(s.t_max)), float(s.lambda_(t_lo)), n + 1, dtype=F64))
            grid[0] = s.t_max
            x = run_tableau(m, noise * s.init_noise_scale(), heun(m.schedule, grid))
            del t
        else:
            if sname == "flow":
                grid = torch.linspace(s.t_max, t_lo, n + 1, dtype=F64)
            else:
                grid = s.t_of_lambda(
                    torch.linspace(float(s.lambda_(s.t_max)), float(s.lambda_(t_lo)), n + 1, dtype=F64)
                )
                grid[0] = s.t_max
            x = sample(m, noise, name, nfe=n, grid=grid)
        exact = m.flow_map(noise * s.init_noise_scale(), s.t_max, t_lo)
        errs.append(float((x - exact).pow(2).mean().sqrt()))
    want = 1 if name in ("ddim", "euler") else 2
    rates = [math.log2(errs[k] / errs[k + 1]) for k in range(2)]
    assert rates[-1] > want - 0.25, (name, errs, rates)
    assert errs[-1] < errs[0]


def test_final_step_to_clean_end_matches_exact_map():
    """The default grids land on sigma = 0; a long solve matches the exact map to t = 0."""
    s = VPLinear()
    m = make_gauss(s, "eps")
    noise = torch.randn(32, 6, generator=torch.Generator().manual_seed(5), dtype=F64)
    x = sample(m, noise, "dpmpp_3m", nfe=200, grid="logsnr")
    exact = m.flow_map(noise, s.t_max, 0.0)
    assert float((x - exact).pow(2).mean().sqrt()) < 5e-4


def test_unipc_corrector_costs_no_extra_evaluation():
    m = make_gauss(VPLinear(), "eps")
    noise = torch.randn(4, 6, dtype=F64)
    for name, nfe in (("unipc", 7), ("dpmpp_3m", 5), ("ipndm", 6), ("heun", 5)):
        m.nfe = 0
        sample(m, noise, name, nfe=nfe)
        assert m.nfe == nfe, name


def test_sample_is_differentiable():
    m = make_gauss(VPLinear(), "eps")
    noise = torch.randn(4, 6, dtype=F64, requires_grad=True)
    x = sample(m, noise, "unipc", nfe=5)
    x.sum().backward()
    assert noise.grad is not None and torch.isfinite(noise.grad).all() and noise.grad.abs().sum() > 0


def test_trajectory_and_callback():
    m = make_gauss(VPLinear(), "eps")
    noise = torch.randn(4, 6, dtype=F64)
    seen = []
    x, traj = sample(m, noise, "dpmpp_2m", nfe=5, return_trajectory=True, callback=lambda d: seen.append(d["i"]))
    assert len(traj) == 6 and torch.equal(traj[-1], x) and seen == [0, 1, 2, 3, 4]


def test_a_staged_solve_reports_solution_points_only():
    """Heun on 3 grid steps ending at sigma = 0: 5 evaluations, states x0 | stage, x1 | stage, x2 | x3; the
    callback and the trajectory see the 4 solution points, numbered by the step each closes."""
    m = make_gauss(VPLinear(), "eps")
    tab = heun(m.schedule, make_grid(m.schedule, 3, "logsnr"))
    assert tab.N == 5 and tab.solution_index() == [0, None, 1, None, 2, 3]
    assert make_tableau("ddim", m.schedule, make_grid(m.schedule, 3, "logsnr")).solution_index() == [0, 1, 2, 3]
    seen = []
    noise = torch.randn(4, 6, dtype=F64)
    x, traj = sample(m, noise, "heun", nfe=5, return_trajectory=True, callback=lambda d: seen.append((d["i"], d["t"])))
    assert [i for i, _ in seen] == [0, 1, 2] and len(traj) == 4 and torch.equal(traj[-1], x)
    assert [t for _, t in seen] == tab.solution_times()[1:].tolist()


def test_a_tableau_must_start_at_a_solution_point():
    m = make_gauss(VPLinear(), "eps")
    tab = heun(m.schedule, make_grid(m.schedule, 3, "logsnr"))
    points = tab.points.clone()
    points[0] = False
    with pytest.raises(fewstep.FewstepError, match="first state"):
        dataclasses.replace(tab, points=points).validate()


# ------------------------------------------------------------------------------------- bad input
class _Bad(torch.nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.mode = mode

    def forward(self, x, t):
        if self.mode == "nan" and float(t[0]) < 500:
            return x * float("nan")
        if self.mode == "shape":
            return x[:, :2]
        return torch.zeros_like(x)


def test_nan_names_step_time_and_solver():
    m = fewstep.Denoiser(_Bad("nan"), VPDiscrete(), "eps", sample_shape=(3,))
    with pytest.raises(ModelOutputError, match=r"NaN at step \d+ \(t=[0-9.]+\) of solver dpmpp_2m"):
        sample(m, torch.randn(2, 3), "dpmpp_2m", nfe=6, grid="time")


class _Echo(torch.nn.Module):
    """A network that passes its input through (NaN in, NaN out), as real networks do."""

    def forward(self, x, t):
        return x.clone()


@pytest.mark.parametrize("step", [1, 3])
def test_unstable_coefficients_blame_the_solver_not_the_model(step):
    """A state that overflows through the solver's own coefficients is named as the solver's fault, both
    mid-solve (found at the next model call) and at the last step (checked once at the end)."""
    import dataclasses

    from fewstep.solvers.kernel import run_tableau

    m = fewstep.Denoiser(_Echo(), VPDiscrete(), "eps", sample_shape=(3,))
    tab = make_tableau("ddim", m.schedule, make_grid(m.schedule, 4, "time"))
    a = tab.a.clone()
    a[step] = float("inf")
    bad = dataclasses.replace(tab, a=a)
    x = torch.randn(2, 3, dtype=F64)
    assert torch.isfinite(run_tableau(m, x, tab)).all()
    with pytest.raises(ModelOutputError, match=rf"solver ddim produced NaN/inf at step {step} .*unstable"):
        run_tableau(m, x, bad)


def test_wrong_output_shape():
    m = fewstep.Denoiser(_Bad("shape"), VPDiscrete(), "eps", sample_shape=(3,))
    with pytest.raises(ShapeError, match="returned shape"):
        sample(m, torch.randn(2, 3), "ddim", nfe=3)


def test_wrong_noise_shape():
    m = fewstep.Denoiser(_Bad("ok"), VPDiscrete(), "eps", sample_shape=(3,))
    with pytest.raises(ShapeError, match=r"noise has shape \(2, 4\)"):
        sample(m, torch.randn(2, 4), "ddim", nfe=3)


def test_unknown_names_list_the_valid_ones():
    m = fewstep.Denoiser(_Bad("ok"), VPDiscrete(), "eps", sample_shape=(3,))
    with pytest.raises(SolverNameError, match="valid: .*dpmpp_3m.*heun"):
        sample(m, torch.randn(2, 3), "dpm3", nfe=3)
    with pytest.raises(SolverNameError, match="valid: time, quadratic, logsnr, karras"):
        sample(m, torch.randn(2, 3), "ddim", nfe=3, grid="cosine")


def test_nfe_below_solver_needs():
    m = fewstep.Denoiser(_Bad("ok"), VPDiscrete(), "eps", sample_shape=(3,))
    with pytest.raises(NFEError, match="dpmpp_3m needs at least 3 NFE"):
        sample(m, torch.randn(2, 3), "dpmpp_3m", nfe=2)
    with pytest.raises(NFEError, match="heun needs at least 3 NFE"):
        sample(m, torch.randn(2, 3), "heun", nfe=2)


def test_grid_checks():
    s = VPDiscrete()
    with pytest.raises(GridError, match="strictly decreasing"):
        make_grid(s, 3, [1.0, 0.5, 0.6, 0.0])
    with pytest.raises(GridError, match=r"must lie in \[0, 1\]"):
        make_grid(s, 2, [1.5, 0.5, 0.0])
    with pytest.raises(GridError, match="needs 4 times"):
        make_grid(s, 3, [1.0, 0.5, 0.0])
    for name in ("time", "quadratic", "logsnr", "karras"):
        for sch in SCHEDULES.values():
            t = make_grid(sch, 5, name)
            assert t.shape == (6,) and float(t[0]) == sch.t_max and float(t[-1]) == sch.t_end
            assert torch.all(t[1:] < t[:-1])


def test_lambda_inverse_round_trips():
    for s in SCHEDULES.values():
        t = torch.linspace(s.t_max * 0.999, s.t_min, 50, dtype=F64)
        assert torch.allclose(s.t_of_lambda(s.lambda_(t)), t, rtol=1e-9, atol=1e-12), s
