"""fewstep solvers as k-diffusion samplers (fewstep.integrations.kdiffusion), against k-diffusion itself.

A tiny eps network on SD's DDPM betas, wrapped by k-diffusion's own ``DiscreteEpsDDPMDenoiser`` (the VE
denoiser k-diffusion's samplers call), float64 throughout:
- classic: ``sampler("euler")``, ``sampler("heun")`` and ``sampler("dpmpp_2m")`` on k-diffusion's Karras
  sigmas equal ``sample_euler`` / ``sample_heun`` / ``sample_dpmpp_2m`` (to ~1e-13); on sigmas that do not end
  at 0, dpmpp_2m needs ``lower_order_final=False`` to match (k-diffusion never lowers the last step there);
- learned: a learned solver (decoupled evaluation times, corrector, perturbed; saved and loaded as an
  artifact) run through the k-diffusion wrapper on its VE sigmas equals ``fewstep.sample`` on the fewstep
  model from the same start (noise scaled by alpha(c_0)); a flow solver too (VE wrapper written here:
  k-diffusion has none for flows); a flow solver starting at t = 1 is refused;
- the callback is called once per step with k-diffusion's keys; errors are one line.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types

import pytest
import torch
from torch import nn

import fewstep
from fewstep.errors import FewstepError, SolverNameError
from fewstep.fit.methods import from_classic
from fewstep.integrations.kdiffusion import sampler, ve_tableau
from fewstep.sampling import build_tableau
from fewstep.schedules import Flow, VPDiscrete
from fewstep.solvers.artifact import save_solver, solver_doc


def _import_kdiffusion() -> tuple[types.ModuleType, types.ModuleType]:
    """k_diffusion.sampling and k_diffusion.external, as installed (``make setup``: k-diffusion with --no-deps).

    k-diffusion 0.1.1.post1 depends on torchvision, and every torchvision wheel pins its own torch (it does
    not import beside torch 2.13 here), so the package is installed without its dependencies. Two gaps
    follow, and both are bridged only for the import:
    - ``k_diffusion/utils.py`` does ``from torchvision.transforms import functional as TF`` at module level
      for its PIL helpers; the samplers and the external wrappers never call it. If torchvision is not
      importable, a minimal stand-in ``torchvision.transforms.functional`` is put in ``sys.modules`` while
      k-diffusion imports, and removed right after (so nothing else ever sees a fake torchvision).
    - ``k_diffusion/__init__.py`` imports every submodule, among them training and evaluation code needing
      packages left out (scikit-image, CLIP, clean-fid, ...). If that import fails, the package is
      represented by a plain module object pointing at its folder, so that ``k_diffusion.sampling`` and
      ``k_diffusion.external`` (and what they import: ``utils``) load on their own, unchanged.
    """
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        pytest.importorskip("k_diffusion")  # not installed: skip the file
    stand_ins: list[str] = []
    try:
        import torchvision  # noqa: F401  # only whether it imports
    except ImportError:
        for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
            mod = types.ModuleType(name)
            mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=not name.endswith("functional"))
            if mod.__spec__.submodule_search_locations is not None:
                mod.__path__ = []
            sys.modules[name] = mod
            stand_ins.append(name)
        sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
        sys.modules["torchvision.transforms"].functional = sys.modules["torchvision.transforms.functional"]
    try:
        try:
            importlib.import_module("k_diffusion")
        except ImportError:
            for name in [m for m in sys.modules if m == "k_diffusion" or m.startswith("k_diffusion.")]:
                del sys.modules[name]
            pkg = types.ModuleType("k_diffusion")
            pkg.__path__ = list(spec.submodule_search_locations)
            pkg.__spec__, pkg.__file__ = spec, spec.origin
            sys.modules["k_diffusion"] = pkg
        sampling = pytest.importorskip("k_diffusion.sampling")
        external = pytest.importorskip("k_diffusion.external")
    finally:
        for name in stand_ins:
            sys.modules.pop(name, None)
    return sampling, external


K, KX = _import_kdiffusion()

F64 = torch.float64
SHAPE = (3, 8, 8)
NFE = 5
TIGHT = 1e-12  # float64: relative to the sample's magnitude


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny batches: one thread (tests/conftest.py)."""


# ----------------------------------------------------------------------------- models
class TinyEps(nn.Module):
    """eps(x, k): two convolutions and a sinusoidal embedding of the (fractional) DDPM index k."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp, self.out = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 3, 3, padding=1)
        self.emb = nn.Linear(8, 16)
        self.double().requires_grad_(False)

    def forward(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        freqs = torch.exp(torch.arange(4, dtype=F64) * -2.0)
        ang = k.to(F64)[:, None] / 1000 * 50 * freqs
        e = self.emb(torch.cat([ang.sin(), ang.cos()], 1))[:, :, None, None]
        return self.out(torch.tanh(self.inp(x) + e)) * 0.8 + 0.2 * x


class TinyVelocity(nn.Module):
    """A flow velocity v(x, t) (t in [0, 1])."""

    def __init__(self, seed: int = 1) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp, self.out = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 3, 3, padding=1)
        self.emb = nn.Linear(2, 16)
        self.double().requires_grad_(False)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = t.to(F64)[:, None]
        e = self.emb(torch.cat([torch.sin(3 * tt), tt], 1))[:, :, None, None]
        return self.out(torch.tanh(self.inp(x) + e)) - 0.5 * x


@pytest.fixture(scope="module")
def vp():
    """(k-diffusion's wrapper of the eps network, the fewstep model of the same network)."""
    schedule = VPDiscrete("scaled_linear", 1000, 0.00085, 0.012)
    eps = TinyEps()
    kd = KX.DiscreteEpsDDPMDenoiser(eps, schedule.alphas_cumprod.clone(), quantize=False)

    # k-diffusion gives the network the DDPM index by interpolating log sigma linearly between indices;
    # fewstep's VPDiscrete is a C1 cubic in log alpha between them (the two agree at whole indices). To
    # compare the solvers and not the interpolations, the fewstep model feeds the network k-diffusion's index.
    def net(x: torch.Tensor, t_net: torch.Tensor) -> torch.Tensor:
        s = schedule.s(schedule.solver_time(t_net.to(F64)))
        return eps(x, kd.sigma_to_t(s))

    model = fewstep.Denoiser(net, schedule, "eps", sample_shape=SHAPE, name="tiny-eps")
    ks = torch.tensor([0.0, 10.0, 500.0, 999.0], dtype=F64)
    assert torch.allclose(kd.sigma_to_t(schedule.s(schedule.t_of_index(ks))), ks, atol=1e-7)
    return kd, model


def noise(seed: int, batch: int = 3) -> torch.Tensor:
    return torch.randn((batch, *SHAPE), generator=torch.Generator().manual_seed(seed), dtype=F64)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and torch.isfinite(a).all() and torch.isfinite(b).all()
    return float((a - b).abs().max() / b.abs().max())


def learned_style(model, start: str, grid, seed: int = 4, decouple: float = 0.2):
    """A learned solver from the classic ``start``: decoupled evaluation times, a corrector, perturbed."""
    tab = build_tableau(model, start, NFE, grid)
    solver = from_classic(model, tab, "s4s-alt", decouple=decouple, corrector=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in solver.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        lt = solver.tableau()
    assert (lt.eval_times - lt.t[:-1]).abs().max() > 1e-4 and lt.C is not None
    return solver


class Recorder:
    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, d: dict) -> None:
        self.calls.append({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in d.items()})


# ----------------------------------------------------------------------------- classic solvers
@pytest.mark.parametrize(
    "name,kd_name,steps", [("euler", "sample_euler", 8), ("heun", "sample_heun", 5), ("dpmpp_2m", "sample_dpmpp_2m", 8)]
)
def test_classic_matches_kdiffusion(vp, name, kd_name, steps):
    kd, _ = vp
    sigmas = K.get_sigmas_karras(steps, float(kd.sigma_min), float(kd.sigma_max)).to(F64)
    x = noise(1) * sigmas[0]
    theirs, ours = Recorder(), Recorder()
    ref = getattr(K, kd_name)(kd, x.clone(), sigmas, callback=theirs, disable=True)
    fn = sampler(name)
    got = fn(kd, x.clone(), sigmas, callback=ours, disable=True)
    d = rel(got, ref)
    print(f"{name} vs k-diffusion {kd_name} ({steps} Karras sigmas): max rel diff {d:.1e}")
    assert d < TIGHT
    assert len(ours.calls) == len(theirs.calls) == steps  # once per step (Heun: not per evaluation)
    for a, b in zip(ours.calls, theirs.calls, strict=True):
        assert set(a) == set(b) == {"x", "i", "sigma", "sigma_hat", "denoised"} and a["i"] == b["i"]
        assert float(a["sigma"]) == float(b["sigma"]) and float(a["sigma_hat"]) == float(b["sigma_hat"])
        assert rel(a["x"], b["x"]) < TIGHT and rel(a["denoised"], b["denoised"]) < TIGHT
    assert fn.kind == "classic" and fn.sigmas is None


def test_dpmpp_2m_final_step_without_zero(vp):
    """On sigmas that stop at sigma_min (no final 0) k-diffusion's DPM++(2M) keeps order 2 on its last step;
    fewstep's dpmpp_2m lowers it by default (lower_order_final, as diffusers does below 15 steps)."""
    kd, _ = vp
    sigmas = K.get_sigmas_karras(6, float(kd.sigma_min), float(kd.sigma_max)).to(F64)[:-1]
    x = noise(2) * sigmas[0]
    ref = K.sample_dpmpp_2m(kd, x.clone(), sigmas, disable=True)
    assert rel(sampler("dpmpp_2m")(kd, x.clone(), sigmas, disable=True), ref) > 1e-6
    d = rel(sampler("dpmpp_2m", lower_order_final=False)(kd, x.clone(), sigmas, disable=True), ref)
    print(f"dpmpp_2m(lower_order_final=False) vs k-diffusion, sigmas ending at sigma_min: max rel diff {d:.1e}")
    assert d < TIGHT


def test_classic_extra_args_and_float32(vp):
    """extra_args reach the model; float32 states and sigmas as UIs pass them."""
    kd, _ = vp
    seen = []

    def model(x, sigma, scale=None):
        seen.append(scale)
        return kd(x.to(F64), sigma.to(F64)).to(x.dtype)

    sigmas = K.get_sigmas_karras(6, float(kd.sigma_min), float(kd.sigma_max))  # float32
    x = (noise(3) * float(sigmas[0])).float()
    out = sampler("unipc@logsnr")(model, x, sigmas, extra_args={"scale": 2.0}, disable=True)
    assert out.dtype == torch.float32 and torch.isfinite(out).all() and seen == [2.0] * 6
    ref = K.sample_euler(model, x.clone(), sigmas, extra_args={"scale": 2.0}, disable=True)
    assert rel(sampler("euler")(model, x.clone(), sigmas, extra_args={"scale": 2.0}, disable=True), ref) < 1e-6


# ----------------------------------------------------------------------------- learned solvers
def test_learned_solver_through_the_kdiffusion_wrapper(vp, tmp_path):
    kd, model = vp
    solver = learned_style(model, "unipc@logsnr", None)
    with torch.no_grad():
        tab = solver.tableau()
    save_solver(tmp_path / "solver", solver_doc(tab, model.schedule, model, "s4s-alt"))
    loaded = fewstep.load_solver(tmp_path / "solver")
    fn = sampler(str(tmp_path / "solver"), model=model)
    assert fn.kind == "learned" and fn.sigmas.shape == (NFE + 1,) and float(fn.sigmas[-1]) == 0.0
    c0 = tab.eval_times[:1]
    assert abs(float(fn.sigmas[0]) - float(model.schedule.s(c0))) < 1e-12
    z = noise(5)
    x = z * fn.sigmas[0]
    calls = Recorder()
    got = fn(kd, x.clone(), fn.sigmas, callback=calls, disable=True)
    # the same solve on the fewstep model: its start x_0 = alpha(c_0) * (VE start) = sigma(c_0) * noise
    with torch.no_grad():
        ref = fewstep.sample(model, x * model.schedule.alpha(c0), loaded)
        classic = fewstep.sample(model, x * model.schedule.alpha(c0), "unipc@logsnr", nfe=NFE)
    d = rel(got, ref)
    print(
        f"learned solver (VP, decoupled + corrector) via DiscreteEpsDDPMDenoiser vs fewstep.sample: "
        f"max rel diff {d:.1e}"
    )
    assert d < 1e-10
    assert rel(classic, ref) > 1e-3  # it is not the classic solver it started from
    assert [c["i"] for c in calls.calls] == list(range(NFE))
    assert all(set(c) == {"x", "i", "sigma", "sigma_hat", "denoised"} for c in calls.calls)
    assert torch.allclose(torch.stack([c["sigma"] for c in calls.calls]), fn.sigmas[:-1])
    # the in-memory LearnedSolver and the loaded artifact are the same sampler
    assert torch.equal(sampler(solver)(kd, x.clone(), fn.sigmas, disable=True), got)
    # float32 sigmas as a UI computes them from k-diffusion's own table: within the tolerance
    assert float(kd.sigma_max) == pytest.approx(float(fn.sigmas[0]), rel=1e-9)
    assert rel(fn(kd, x.clone(), fn.sigmas.float().to(F64), disable=True), got) < 1e-6


def test_ve_tableau_is_the_same_solve():
    """The VE tables applied to y = x / alpha(c) reproduce the source kernel state by state (flow, v basis)."""
    model = fewstep.Denoiser(TinyVelocity(), Flow(t_min=1e-3), "velocity", sample_shape=SHAPE)
    grid = torch.tensor([0.9, 0.7, 0.45, 0.25, 0.1, 0.0], dtype=F64)
    solver = learned_style(model, "adams2", grid)
    with torch.no_grad():
        tab = solver.tableau()
    vtab, c = ve_tableau(tab, model.schedule)
    sched = model.schedule
    r = torch.cat([sched.alpha(c), sched.alpha(tab.t[-1:])])
    assert vtab.c is None and torch.allclose(vtab.t, torch.cat([sched.s(c), sched.s(tab.t[-1:])]))
    assert torch.allclose(vtab.a * r[1:], tab.a * r[:-1]) and torch.allclose(vtab.B * r[1:, None], tab.B)
    assert torch.allclose(vtab.C * r[1:, None], tab.C)


def test_flow_learned_solver_in_the_ve_frame():
    vel = TinyVelocity()
    model = fewstep.Denoiser(vel, Flow(t_min=1e-3), "velocity", sample_shape=SHAPE, name="tiny-flow")

    def kd_flow(y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """A VE denoiser for the flow model (k-diffusion has no flow wrapper): t = s / (1 + s), x = y / (1 + s)."""
        sv = s.to(F64)[:, None, None, None]
        t = sv / (1 + sv)
        xx = y / (1 + sv)
        return xx - t * vel(xx, t.flatten())

    grid = torch.tensor([0.92, 0.75, 0.5, 0.3, 0.12, 0.0], dtype=F64)  # starts below 1: finite VE sigma
    solver = learned_style(model, "adams2", grid)
    fn = sampler(solver)
    with torch.no_grad():
        c0 = solver.tableau().eval_times[:1]
    x = noise(6) * fn.sigmas[0]
    got = fn(kd_flow, x.clone(), fn.sigmas, disable=True)
    with torch.no_grad():
        ref = fewstep.sample(model, x * model.schedule.alpha(c0), solver)
    d = rel(got, ref)
    print(
        f"learned solver (flow, v basis, decoupled + corrector) in the VE frame vs fewstep.sample: max rel diff {d:.1e}"
    )
    assert d < 1e-10
    # a flow solver from the noise end t = 1 (alpha = 0) has no VE sigma: refused in one line
    with pytest.raises(FewstepError, match="alpha = 0") as e:
        sampler(learned_style(model, "adams2", "time"))
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- errors
def test_errors_are_one_line(vp, tmp_path):
    kd, model = vp
    solver = learned_style(model, "dpmpp_2m@logsnr", None)
    fn = sampler(solver, model=model)
    x = noise(7) * fn.sigmas[0]
    sigmas = K.get_sigmas_karras(NFE + 2, float(kd.sigma_min), float(kd.sigma_max)).to(F64)

    def one_line(exc_type, match, call, *args, **kwargs):
        with pytest.raises(exc_type, match=match) as e:
            call(*args, **kwargs)
        assert "\n" not in str(e.value), str(e.value)

    one_line(FewstepError, f"needs sigmas with {NFE} steps", fn, kd, x, sigmas, disable=True)
    wrong_start = fn.sigmas.clone()
    wrong_start[0] *= 1.5
    one_line(FewstepError, "starting at sigma", fn, kd, x, wrong_start, disable=True)
    one_line(FewstepError, "makes 5 evaluations, not nfe=4", sampler, solver, nfe=4)
    with torch.no_grad():
        one_line(FewstepError, "pass model=", sampler, solver.tableau())
    one_line(FewstepError, "apply to classic solvers", sampler, solver, order=3)
    one_line(SolverNameError, "unknown solver", sampler, "nope")
    one_line(SolverNameError, "does not take", sampler, "dpmpp_2m", nope=1)
    one_line(FewstepError, "not nfe=3", sampler("ddim", nfe=3), kd, x, sigmas, disable=True)
    one_line(FewstepError, "decrease strictly", sampler("ddim"), kd, x, sigmas.flip(0), disable=True)
    one_line(FewstepError, "at least 2", sampler("ddim"), kd, x, sigmas[:1], disable=True)
    other = fewstep.Denoiser(TinyEps(seed=5), model.schedule, "eps", sample_shape=SHAPE)
    with torch.no_grad():
        tab = solver.tableau()
    save_solver(tmp_path / "s", solver_doc(tab, model.schedule, model, "s4s-alt"))
    one_line(FewstepError, "fingerprint", sampler, str(tmp_path / "s"), model=other)
