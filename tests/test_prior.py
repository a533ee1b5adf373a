"""A non-Gaussian-standard prior end to end, on a flow with a closed-form answer.

Linear path in fewstep's time (t = 1 at the source): x_t = (1 - t) x1 + t x0 with the source
x0 ~ N(m0, diag(s0^2)) and the target x1 ~ N(m1, diag(s1^2)), independent. Per dimension x_t is
Gaussian with mean mu_t = (1 - t) m1 + t m0 and variance v_t = (1 - t)^2 s1^2 + t^2 s0^2, and the
marginal velocity E[x0 - x1 | x_t = x] is

    dx/dt = (m0 - m1) + (t s0^2 - (1 - t) s1^2) / v_t * (x - mu_t) = mu_t' + (sqrt v_t)' z,

with z = (x - mu_t) / sqrt(v_t). So z is constant along the ODE and the exact map from the source
to the data is x1 = m1 + s1 (x0 - m0) / s0. Every path that draws starting noise must use the
prior: with standard normal noise the samples would miss N(m1, s1^2) by s1 m0 / s0 in the mean.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import textwrap

import pytest
import torch
from torch import Tensor, nn
from typer.testing import CliRunner

from fewstep import Denoiser, Flow
from fewstep.cli import app
from fewstep.evaluate import evaluate, run_solver
from fewstep.fit.api import fit
from fewstep.fit.teacher import generate_teacher
from fewstep.seeds import EVAL_SEED_START, fit_seeds

F64 = torch.float64
M0 = torch.tensor([3.0, -2.0, 0.5], dtype=F64)  # source (prior) mean
S0 = torch.tensor([0.5, 2.0, 1.0], dtype=F64)  # source standard deviations
M1 = torch.tensor([-1.0, 1.0, 4.0], dtype=F64)  # target mean
S1 = torch.tensor([0.3, 1.5, 0.8], dtype=F64)  # target standard deviations


class GaussianBridgeVelocity(nn.Module):
    """Exact marginal velocity dx/dt of the linear path from N(m0, s0^2) (t = 1) to N(m1, s1^2) (t = 0).

    Called as ``net(x (B, d), t (B,))``; float64 inside, returns the dtype of x.
    """

    def __init__(self, m0: Tensor, s0: Tensor, m1: Tensor, s1: Tensor) -> None:
        super().__init__()
        for k, v in dict(m0=m0, s0=s0, m1=m1, s1=s1).items():
            self.register_buffer(k, v.to(F64))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        t = t.to(F64).reshape(-1, 1)
        mu = (1 - t) * self.m1 + t * self.m0
        var = (1 - t) ** 2 * self.s1**2 + t**2 * self.s0**2
        v = (self.m0 - self.m1) + (t * self.s0**2 - (1 - t) * self.s1**2) / var * (x.to(F64) - mu)
        return v.to(x.dtype)


def gaussian_prior(generator: torch.Generator, shape: tuple[int, ...]) -> Tensor:
    """One draw of N(M0, diag(S0^2)), float32 of ``shape``."""
    return (M0 + S0 * torch.randn(shape, generator=generator, dtype=F64)).to(torch.float32)


def make_bridge() -> Denoiser:
    """The Denoiser of the Gaussian-to-Gaussian flow with its prior and exact solution map."""
    den = Denoiser(
        GaussianBridgeVelocity(M0, S0, M1, S1),
        Flow(),
        prediction="velocity",
        sample_shape=(3,),
        name="gauss-bridge",
        prior=gaussian_prior,
    )
    den.exact_solution = exact_map
    return den


def exact_map(x0: Tensor) -> Tensor:
    """The ODE's map from the source (t = 1) to the data (t = 0): (B, 3) -> (B, 3)."""
    return (M1 + S1 * (x0.to(F64) - M0) / S0).to(x0.dtype)


# ----------------------------------------------------------------------------- (a) noise
def test_noise_draws_from_the_prior_per_seed():
    den = make_bridge()
    x = den.noise(range(10, 20))
    by_one = torch.cat([den.noise([s]) for s in range(10, 20)])
    assert torch.equal(x, by_one)  # the same whatever the batching
    g = torch.Generator().manual_seed(13)
    assert torch.equal(x[3], gaussian_prior(g, (3,)))
    big = den.noise(range(4000)).to(F64)
    sem = S0 / math.sqrt(4000)
    assert ((big.mean(0) - M0).abs() < 4 * sem).all()
    assert ((big.std(0) / S0 - 1).abs() < 0.05).all()


def test_the_velocity_field_transports_the_prior_exactly():
    den = make_bridge()
    x0 = den.noise(range(64))
    t = torch.full((64,), 0.37)
    z = (x0.to(F64) - M0) / S0  # constant along the ODE
    mu = 0.63 * M1 + 0.37 * M0
    sd = torch.sqrt(0.63**2 * S1**2 + 0.37**2 * S0**2)
    xt = (mu + sd * z).float()
    h = 1e-4
    mu_h = (0.63 + h) * M1 + (0.37 - h) * M0  # finite difference of the exact trajectory in t
    sd_h = torch.sqrt((0.63 + h) ** 2 * S1**2 + (0.37 - h) ** 2 * S0**2)
    dxdt = ((mu + sd * z) - (mu_h + sd_h * z)) / h
    assert torch.allclose(den.net(xt, t).to(F64), dxdt, atol=2e-3)


# ----------------------------------------------------------------------------- (b) teacher
def test_teacher_targets_are_the_exact_map(tmp_path):
    den = make_bridge()
    seeds = fit_seeds(96)
    # the default teacher adams4@time:40 (measured RMSE 1.8e-4, max 7.6e-4 at |x| up to 5.8), and at 100 NFE
    # (2.7e-5, 1.1e-4): a fourth-order solve converging on the exact map
    for spec, rmse, worst in ((None, 4e-4, 2e-3), ("adams4@time:100", 1e-4, 3e-4)):
        data = generate_teacher(den, seeds, spec, cache_dir=tmp_path, progress=False)
        assert torch.equal(data.noise, den.noise(seeds))
        err = data.target.to(F64) - exact_map(data.noise).to(F64)
        assert err.pow(2).mean().sqrt() < rmse and err.abs().max() < worst
        again = generate_teacher(den, seeds, spec, cache_dir=tmp_path, progress=False)  # from the cache
        assert torch.equal(again.target, data.target)


def test_a_changed_prior_does_not_reuse_cached_teacher_pairs(tmp_path):
    den = make_bridge()
    first = generate_teacher(den, fit_seeds(8), cache_dir=tmp_path, progress=False)
    fp = den.fingerprint()
    den.prior = lambda g, shape: torch.randn(shape, generator=g)  # same net, standard noise
    assert den.fingerprint() != fp  # the prior is part of the model's identity
    second = generate_teacher(den, fit_seeds(8), cache_dir=tmp_path, progress=False)
    assert torch.equal(second.noise, den.noise(fit_seeds(8)))
    assert not torch.allclose(second.noise, first.noise)


# ----------------------------------------------------------------------------- (c) evaluate
def test_evaluation_errors_shrink_with_nfe():
    den = make_bridge()
    rep = evaluate(den, nfe=[2, 4, 8, 16], solvers=["euler@time", "adams2@time", "unipc@time"], samples=64).as_dict()
    assert rep["reference"]["solver"] == "exact"
    for name in ("euler", "adams2", "unipc"):
        errs = [r["rmse"] for r in sorted(rep["results"], key=lambda r: r["nfe"]) if r["solver"] == name]
        assert len(errs) == 4 and all(b < 0.7 * a for a, b in itertools.pairwise(errs)), (name, errs)
    euler = [r["rmse"] for r in sorted(rep["results"], key=lambda r: r["nfe"]) if r["solver"] == "euler"]
    assert 1.6 < euler[2] / euler[3] < 2.4  # first order


def test_evaluated_samples_come_from_the_prior():
    den = make_bridge()
    seeds = range(EVAL_SEED_START, EVAL_SEED_START + 2000)
    ref = exact_map(den.noise(seeds))
    run = run_solver(den, seeds, "adams4@time", 200, ref, keep_samples=True)
    assert run.rmse < 1e-4
    x = run.samples.to(F64)
    assert ((x.mean(0) - M1).abs() < 4 * S1 / math.sqrt(2000)).all()
    assert ((x.std(0) / S1 - 1).abs() < 0.06).all()


# ----------------------------------------------------------------------------- (d) fit
@pytest.mark.parametrize("method", ["s4s-alt", "dss"])
def test_a_tiny_fit_does_not_end_worse_than_its_start(method, tmp_path):
    den = make_bridge()
    res = fit(den, method, 3, samples=64, val_samples=32, steps=30, progress=False, cache_dir=tmp_path)
    val = res.doc["validation"]
    assert val["rmse_to_teacher"] <= val["start_rmse_to_teacher"] + 1e-9
    assert val["start_rmse_to_teacher"] > 1e-3  # 3 NFE are far from converged on this field
    assert (
        val["kept_start"] is False and val["rmse_to_teacher"] < 0.8 * val["start_rmse_to_teacher"]
    )  # a better fit is kept
    start = res.doc["start"]["solver"]
    rep = evaluate(den, nfe=3, solvers=[res.solver, start], samples=64).as_dict()
    rmse = {r["grid"] == "learned": r["rmse"] for r in rep["results"]}
    # held-out, against the exact map: measured adams3@time 0.069 -> s4s-alt 0.014, dss 0.0064
    assert rmse[True] < 0.5 * rmse[False], (start, rmse)


# ----------------------------------------------------------------------------- (e) CLI
FACTORY = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from test_prior import make_bridge

    def model():
        return make_bridge()
""")


def test_cli_sample_draws_from_the_prior(tmp_path):
    from safetensors.torch import load_file

    f = tmp_path / "bridge.py"
    f.write_text(FACTORY.format(tests=os.path.dirname(__file__)))
    out = tmp_path / "s.safetensors"
    r = CliRunner().invoke(
        app,
        [
            "sample",
            "--model",
            f"{f}:model",
            "--solver",
            "adams4@time",
            "--nfe",
            "200",
            "--n",
            "32",
            "--seed",
            "7",
            "--out",
            str(out),
        ],
    )
    assert r.exit_code == 0, (r.output, r.exception)
    x = load_file(str(out))["samples"]
    want = exact_map(make_bridge().noise(range(7, 39)))
    assert x.shape == (32, 3) and (x - want).abs().max() < 1e-4
    rep = CliRunner().invoke(
        app, ["eval", "--model", f"{f}:model", "--nfe", "4", "--solver", "unipc@time", "--samples", "16", "--json"]
    )
    assert rep.exit_code == 0, (rep.output, rep.exception)
    assert json.loads(rep.stdout)["reference"]["solver"] == "exact"
