"""Parity of fewstep's classic solvers with diffusers' schedulers (DESIGN.md section 3).

For each pair: the same model (zoo ``digits-eps`` / ``digits-flow``), the same timesteps and
the same starting state. The diffusers side runs the scheduler's own loop (set_timesteps,
scale_model_input, model call at the scheduler's timestep, step); the fewstep side runs
``fewstep.sample`` on the equivalent explicit grid. Agreement: max |diff| / max |ref| <= 1e-5.

Conventions matched in the grids (not in the solvers):
- DDPM index k is solver time t = (k + 1) / T; diffusers' sigma at the final point is either
  0 (t = 0, the clean end) or the sigma of index 0 (t = 1 / T).
- diffusers keeps its schedule tables in float32; to compare the solvers and not float32
  rounding, the tables are replaced by fewstep's float64 ones (``_f64_tables``) and the
  per-step sigmas by the float64 sigma at the same index (``_f64_sigmas``, which checks that
  every float32 sigma is that table value to 1e-5). The network runs in float64 (``_f64``).
  DPMSolverMultistep and FlowMatchEuler still round the sample to float32 inside ``step``, so
  those pairs agree to ~1e-7; the others agree to ~1e-15.
- UniPC bh1 cannot end at sigma = 0 in diffusers (its B(h) = -h is -inf there and 0 * inf
  gives NaN), so bh1 is compared with ``final_sigmas_type="sigma_min"`` (final t = 1 / T).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import fewstep
from fewstep import zoo

diffusers = pytest.importorskip("diffusers")

# diffusers' DEIS and Heun feed torch tensors to numpy functions (NumPy 2 deprecation noise)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

F64 = torch.float64
TOL = 1e-5
BATCH = 4


# ----------------------------------------------------------------------------- models
@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny batches: one thread (tests/conftest.py)."""


class _CastIn(torch.nn.Module):
    """Run ``inner`` in float64 on an input of any float dtype."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner.double()

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.inner(e.to(F64))


def _f64(den: fewstep.Denoiser) -> fewstep.Denoiser:
    """A float64 copy of a zoo Denoiser.

    The digits networks build their sinusoidal time embedding in float32 (a function of the
    timestep alone); the MLP reading it is wrapped to run in float64 on it, so every matmul is
    float64 (float32 matmuls round differently for different batch sizes).
    """
    den = copy.deepcopy(den).double().requires_grad_(False)
    probe = torch.zeros(1, *den.sample_shape, dtype=F64), torch.full((1,), 0.5, dtype=F64)
    try:
        den.net(*probe)
    except RuntimeError:
        den.net.time_mlp = _CastIn(den.net.time_mlp)
        assert den.net(*probe).dtype == F64
    return den


@pytest.fixture(scope="module")
def eps_model() -> fewstep.Denoiser:
    return _f64(zoo.load("digits-eps"))


@pytest.fixture(scope="module")
def flow_model() -> fewstep.Denoiser:
    return _f64(zoo.load("digits-flow"))


@pytest.fixture(scope="module")
def noise(eps_model) -> torch.Tensor:
    return eps_model.noise(range(BATCH)).to(F64)


# ----------------------------------------------------------------------------- helpers
def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(x).all() and torch.isfinite(ref).all()
    return float((x.to(F64) - ref.to(F64)).abs().max() / ref.to(F64).abs().max())


def _f64_tables(sched, schedule: fewstep.VPDiscrete):
    """Replace diffusers' float32 alphas_cumprod (and what it derives from it) by fewstep's float64 table."""
    ac = schedule.alphas_cumprod.clone()
    sched.alphas_cumprod = ac
    if hasattr(sched, "final_alpha_cumprod"):  # DDIM
        sched.final_alpha_cumprod = torch.tensor(1.0, dtype=F64) if sched.config.set_alpha_to_one else ac[0]
    if hasattr(sched, "alpha_t"):  # the multistep schedulers
        sched.alpha_t, sched.sigma_t = ac.sqrt(), (1.0 - ac).sqrt()
        sched.lambda_t = torch.log(sched.alpha_t) - torch.log(sched.sigma_t)
    return sched


def _f64_sigmas(sched, schedule: fewstep.VPDiscrete) -> list[float]:
    """Swap each float32 sigma of the scheduler for the float64 table sigma of its DDPM index.

    Returns the fewstep solver time of every entry of ``sched.sigmas`` (0 for sigma = 0).
    """
    ac = schedule.alphas_cumprod
    table = ((1.0 - ac) / ac).sqrt()
    sig, times = [], []
    for s in sched.sigmas.to(F64).tolist():
        if s == 0.0:
            sig.append(0.0)
            times.append(0.0)
            continue
        k = int(torch.argmin((table - s).abs()))
        assert abs(float(table[k]) - s) <= 1e-5 * s, f"sigma {s} is not a table value (nearest index {k})"
        sig.append(float(table[k]))
        times.append(float(schedule.t_of_index(k)))
    sched.sigmas = torch.tensor(sig, dtype=F64)
    return times


def _run_diffusers(sched, net_call, x: torch.Tensor) -> torch.Tensor:
    """diffusers' sampling loop from unit noise x (after set_timesteps), as its pipelines run it."""
    # FlowMatchEuler has neither init_noise_sigma (it is 1) nor scale_model_input (identity)
    x = x * getattr(sched, "init_noise_sigma", 1.0)
    scale = getattr(sched, "scale_model_input", lambda z, _: z)
    for ts in sched.timesteps:
        inp = scale(x, ts)
        out = net_call(inp, ts)
        x = sched.step(out, ts, x).prev_sample
    return x


def _ddpm_net(model: fewstep.Denoiser):
    """The network called as a diffusers pipeline calls it: at the scheduler's (DDPM index) timestep."""
    return lambda x, ts: model.net(x, torch.as_tensor(ts).to(F64).expand(x.shape[0]))


def _index_grid(model: fewstep.Denoiser, timesteps, final: float) -> list[float]:
    """Solver times of DDPM indices ``timesteps`` followed by ``final``."""
    return [float(model.schedule.t_of_index(int(k))) for k in timesteps] + [final]


def _multistep_parity(model, noise, sched, solver: str, nfe: int, final: str) -> float:
    """Run a DDPM multistep scheduler and fewstep's ``solver`` on its grid; return the relative error."""
    _f64_tables(sched, model.schedule)
    sched.set_timesteps(nfe)
    times = _f64_sigmas(sched, model.schedule)
    fin = 0.0 if final == "zero" else float(model.schedule.t_of_index(0))
    grid = _index_grid(model, sched.timesteps, fin)
    assert times == pytest.approx(grid, rel=1e-12, abs=0), "scheduler sigmas are not at its timesteps"
    ref = _run_diffusers(sched, _ddpm_net(model), noise)
    out = fewstep.sample(model, noise, solver=solver, nfe=nfe, grid=grid)
    return rel_err(out, ref)


# ----------------------------------------------------------------------------- DDIM
@pytest.mark.parametrize("nfe", [5, 10])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("alpha_to_one", [True, False])
def test_ddim(eps_model, noise, nfe, spacing, alpha_to_one):
    m = eps_model
    sched = _f64_tables(
        diffusers.DDIMScheduler(timestep_spacing=spacing, set_alpha_to_one=alpha_to_one, clip_sample=False),
        m.schedule,
    )
    sched.set_timesteps(nfe)
    ts = sched.timesteps.tolist()
    ref = _run_diffusers(sched, _ddpm_net(m), noise)
    if alpha_to_one:  # the last step lands on alpha = 1: the clean end t = 0
        grid, n = _index_grid(m, ts, 0.0), nfe
    elif ts[-1] == 0:
        # "leading" ends its timesteps at index 0 and then steps from index 0 to alpha_cumprod[0],
        # the same point: an evaluation with an identity step. fewstep reproduces it with
        # nfe - 1 steps whose grid ends at index 0.
        grid, n = _index_grid(m, ts[:-1], float(m.schedule.t_of_index(0))), nfe - 1
    else:  # "trailing": the last step lands on index 0's alpha, t = 1 / T
        grid, n = _index_grid(m, ts, float(m.schedule.t_of_index(0))), nfe
    out = fewstep.sample(m, noise, solver="ddim", nfe=n, grid=grid)
    assert rel_err(out, ref) < TOL


# ----------------------------------------------------------------------------- DPM-Solver++
@pytest.mark.parametrize(
    "nfe,spacing",
    # 3 (warm start only), 5 and 10 (lower order at the end), 20 (no lower order before the last step)
    [
        (3, "linspace"),
        (5, "linspace"),
        (5, "leading"),
        (5, "trailing"),
        (10, "linspace"),
        (10, "leading"),
        (10, "trailing"),
        (20, "linspace"),
    ],
)
@pytest.mark.parametrize("order", [2, 3])
def test_dpmpp(eps_model, noise, nfe, spacing, order):
    sched = diffusers.DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver++",
        solver_order=order,
        final_sigmas_type="zero",
        lower_order_final=True,
        timestep_spacing=spacing,
    )
    assert _multistep_parity(eps_model, noise, sched, f"dpmpp_{order}m", nfe, "zero") < TOL


# ----------------------------------------------------------------------------- UniPC
@pytest.mark.parametrize("nfe", [5, 10])
@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
@pytest.mark.parametrize(
    "solver,variant,order,final",
    [
        ("unipc", "bh2", 2, "zero"),
        ("unipc3", "bh2", 3, "zero"),
        ("unipc_bh2", "bh2", 2, "sigma_min"),
        ("unipc_bh1", "bh1", 2, "sigma_min"),  # diffusers' bh1 gives NaN when ending at sigma = 0
    ],
)
def test_unipc(eps_model, noise, nfe, spacing, solver, variant, order, final):
    sched = diffusers.UniPCMultistepScheduler(
        solver_order=order,
        solver_type=variant,
        predict_x0=True,
        lower_order_final=True,
        final_sigmas_type=final,
        timestep_spacing=spacing,
    )
    assert _multistep_parity(eps_model, noise, sched, solver, nfe, final) < TOL


# ----------------------------------------------------------------------------- DEIS
@pytest.mark.parametrize("nfe", [5, 10, 20])
@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_deis(eps_model, noise, nfe, spacing):
    # DEISMultistepScheduler ends at the sigma of index 0 (t = 1 / T), not at the clean end
    sched = diffusers.DEISMultistepScheduler(
        algorithm_type="deis",
        solver_order=3,
        lower_order_final=True,
        timestep_spacing=spacing,
    )
    assert _multistep_parity(eps_model, noise, sched, "deis", nfe, "sigma_min") < TOL


# ----------------------------------------------------------------------------- Heun
@pytest.mark.parametrize(
    "timesteps",
    [[999, 700, 400, 200, 50], [900, 500, 100], [999, 899, 799, 600, 500, 300, 250, 100, 40, 10, 0]],
)
def test_heun(eps_model, noise, timesteps):
    m = eps_model
    sched = _f64_tables(diffusers.HeunDiscreteScheduler(), m.schedule)
    sched.set_timesteps(timesteps=timesteps)
    times = _f64_sigmas(sched, m.schedule)
    grid = _index_grid(m, timesteps, 0.0)  # n steps, the last one (Euler) to sigma = 0
    assert times == pytest.approx([grid[0]] + [g for g in grid[1:-1] for _ in (0, 1)] + [0.0], rel=1e-12, abs=0)
    ref = _run_diffusers(sched, _ddpm_net(m), noise)
    assert len(sched.timesteps) == 2 * len(timesteps) - 1
    # diffusers starts from y = noise * init_noise_sigma in y = x / alpha: start fewstep at the same x
    x0 = noise * float(sched.init_noise_sigma) * float(m.schedule.alpha(grid[0]))
    out = fewstep.sample(m, x0, solver="heun", nfe=2 * len(timesteps) - 1, grid=grid)
    assert rel_err(out, ref) < TOL


# ----------------------------------------------------------------------------- flow Euler
@pytest.mark.parametrize("nfe", [5, 10, 20])
def test_flow_euler(flow_model, noise, nfe):
    m = flow_model
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0)
    sched.set_timesteps(nfe)
    T = sched.config.num_train_timesteps
    # shift 1: sigmas uniform from 1 to 1 / T, then 0; the flow time is sigma
    grid = np.append(np.linspace(1.0, 1.0 / T, nfe), 0.0).tolist()
    assert sched.sigmas.to(F64).tolist() == pytest.approx(grid, rel=1e-6, abs=1e-7)

    # diffusers passes timestep = sigma * T; the network's own time input is net_time(sigma)
    def net(x, ts):
        return m.net(x, m.schedule.net_time(torch.as_tensor(ts).to(F64) / T).to(x.dtype).expand(x.shape[0]))

    ref = _run_diffusers(sched, net, noise)
    out = fewstep.sample(m, noise, solver="euler", nfe=nfe, grid=grid)
    assert rel_err(out, ref) < TOL


# ----------------------------------------------------------------------------- batch size
@pytest.mark.parametrize(
    "solver,model_fixture", [("dpmpp_3m", "eps_model"), ("unipc", "eps_model"), ("heun", "flow_model")]
)
def test_batch_size_invariance(request, solver, model_fixture):
    """Same seeds in one batch of 5 or in five batches of 1 give the same samples.

    Float64 model: in float32, CPU matmuls on 1 and on 5 rows round differently (~1e-7 per call),
    which 1 / alpha ~ 150 at the noise end of the DDPM schedule amplifies past 1e-6.
    """
    m = request.getfixturevalue(model_fixture)
    seeds = list(range(100, 105))
    together = fewstep.sample(m, m.noise(seeds).to(F64), solver=solver, nfe=7)
    alone = torch.cat([fewstep.sample(m, m.noise([s]).to(F64), solver=solver, nfe=7) for s in seeds])
    assert together.shape == alone.shape == (5, *m.sample_shape)
    assert not torch.allclose(together[0], together[1])  # the seeds do differ
    torch.testing.assert_close(together, alone, rtol=1e-6, atol=1e-6)
