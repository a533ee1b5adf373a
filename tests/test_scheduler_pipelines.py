"""FewStepScheduler inside the six tiny diffusers pipelines (tests/tiny_pipelines.py), called the normal way.

For every kind (SD, SD 2.x-v, SDXL, DiT, PixArt-Sigma, SD3, Flux) the fewstep model is a plain
``fewstep.Denoiser`` around the family adapter (``family.forward`` with the encoded prompt rows; CFG with
the null rows concatenated as fewstep does, cond first; Flux's embedded guidance as a network input).

(a) the unmodified pipeline with ``FewStepScheduler.from_solver(...)`` gives the same final latents as
    ``fewstep.sample`` on the same noise, for a classic solver and for a learned-style solver (a classic
    one made learnable with decoupled evaluation times and a corrector, then perturbed);
(b) guidance parity with the pipeline's OWN scheduler where it runs the same solver: DDIM on SD (its
    timesteps mapped to fewstep's VPDiscrete times, a negative prompt), FlowMatchEuler on SD3 (static and
    dynamic shift, CFG on the null rows) and on Flux (its embedded guidance; its grid from the sigmas the
    pipeline passes and mu);
(c) what the scheduler does with what pipelines pass it: another num_inference_steps still runs N steps
    (logged), sigmas= / mu= are accepted and ignored (logged once), img2img part-way is refused in one line.

The pipelines decode at the end, so their final latents are read from a recording wrapper on the
scheduler instance's ``step`` (the class and the pipeline are untouched). float32 throughout.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

import fewstep
import tiny_pipelines as T
from fewstep.errors import FewstepError
from fewstep.fit.methods import from_classic
from fewstep.integrations.diffusers_in import schedule_from_diffusers, shifted_grid
from fewstep.integrations.families import FluxFamily, adapt
from fewstep.sampling import build_tableau

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from fewstep.integrations.diffusers_scheduler import FewStepScheduler  # noqa: E402  # imports diffusers: after the skip

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning", "ignore::UserWarning")

F64 = torch.float64
B = 2  # samples per run (two prompts)
NFE = 4
ATOL = 2e-5  # float32, per unit of latent magnitude (random tiny networks under CFG reach |x| ~ 1e2 on VP models)
W = {"sd": 5.0, "sd_v": 5.0, "sdxl": 5.0, "dit": 4.0, "pixart_sigma": 4.5, "sd3": 6.0, "flux": 3.5}
VARIANTS = (*T.KINDS, "sd_v")
# (classic solver, its grid, the classic start of the learned-style solver): VP models on log-SNR /
# time grids, flows on the shifted grid their own scheduler uses
SOLVERS = {
    "sd": ("unipc", "logsnr", "unipc"),
    "sd_v": ("dpmpp_2m", "logsnr", "ddim"),
    "sdxl": ("dpmpp_2m", "logsnr", "dpmpp_2m"),
    "dit": ("dpmpp_3m", "logsnr", "unipc"),
    "pixart_sigma": ("unipc3", "time", "dpmpp_2m"),
    "sd3": ("adams2", "shifted", "adams2"),
    "flux": ("euler", "shifted", "euler"),
}
LOGGER = "fewstep.integrations.diffusers_scheduler"


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny batches: one thread (tests/conftest.py)."""


def base(kind: str) -> str:
    return "sd" if kind == "sd_v" else kind


# ----------------------------------------------------------------------------- the pipeline and its model
class FamilyNet(torch.nn.Module):
    """``net(x, t_net, **rows)``: the family adapter's network call (Flux: with its embedded guidance)."""

    def __init__(self, fam, guidance: float | None = None) -> None:
        super().__init__()
        self.fam, self.guidance = fam, guidance

    def forward(self, x: torch.Tensor, t_net: torch.Tensor, **rows: torch.Tensor) -> torch.Tensor:
        g = None if self.guidance is None else torch.full((x.shape[0],), float(self.guidance))
        return self.fam.forward(x, t_net, rows, guidance=g)


class Setup:
    """A fresh tiny pipeline of ``kind``, its family adapter, prompts, noise and the fewstep model."""

    def __init__(self, kind: str, seed: int = 0, uncond: dict | None = None, scheduler=None) -> None:
        k = base(kind)
        self.kind, self.k = kind, k
        self.pipe = T.build(k, seed=0, **({"prediction_type": "v_prediction"} if kind == "sd_v" else {}))
        if scheduler is not None:  # another scheduler the model was trained with (e.g. dynamic shifting)
            self.pipe.scheduler = scheduler
        self.pipe.set_progress_bar_config(disable=True)
        fam_opts = {"max_sequence_length": T.TEXT_LEN} if k in ("pixart_sigma", "sd3", "flux") else {}
        if k == "pixart_sigma":
            fam_opts["clean_caption"] = False
        self.fam = adapt(self.pipe, **fam_opts)  # reads the pipeline's own scheduler config
        self.shape = self.fam.sample_shape() if k == "dit" else self.fam.sample_shape(T.IMAGE, T.IMAGE)
        self.prompts = list(T.PROMPTS[k][:B])
        self.rows = self.fam.encode(self.prompts)
        self.w = W[kind]
        self.seed = seed
        self.noise = torch.randn((B, *self.shape), generator=torch.Generator().manual_seed(seed))
        info = schedule_from_diffusers(self.fam.scheduler_config)
        distilled = self.fam.guidance_mode == "distilled"
        self.model = fewstep.Denoiser(
            FamilyNet(self.fam, self.w if distilled else None),
            info.schedule,
            info.prediction,
            self.shape,
            guidance_scale=None if distilled else self.w,
            uncond=None if distilled else (uncond if uncond is not None else self.fam.null_rows(B)),
            name=f"tiny-{kind}",
            identity={"flow_grid": info.flow_grid} if info.flow_grid else {},
        )

    def grid(self, name: str, n: int, mu: float | None = None):
        """A named fewstep grid, or the flow grid of the pipeline's own scheduler ("shifted")."""
        if name != "shifted":
            return name
        if self.k == "flux":
            return flux_grid(n, self.flux_mu())
        return shifted_grid(self.model, n, mu=mu)

    def flux_mu(self) -> float:
        """The mu FluxPipeline computes for this latent size (its calculate_shift on the packed length)."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        cfg = self.fam.scheduler_config
        seq = (self.shape[1] // 2) * (self.shape[2] // 2)
        return float(
            calculate_shift(
                seq, cfg["base_image_seq_len"], cfg["max_image_seq_len"], cfg["base_shift"], cfg["max_shift"]
            )
        )

    def run(self, steps: int = 20, **extra):
        """Call the pipeline; returns (its final latents, unpacked, (B, C, h, w); the timesteps stepped)."""
        sched = self.pipe.scheduler
        step = type(sched).step
        seen: list = []

        def recording(model_output, timestep, sample, *a, **kw):
            out = step(sched, model_output, timestep, sample, *a, **kw)
            seen.append((float(timestep), out[0] if isinstance(out, tuple) else out.prev_sample))
            return out

        sched.step = recording
        try:
            if self.k == "dit":  # DiTPipeline takes no latents: the same seed draws the same noise
                self.pipe(
                    class_labels=self.pipe.get_label_ids(self.prompts),
                    guidance_scale=self.w,
                    num_inference_steps=steps,
                    generator=torch.Generator().manual_seed(self.seed),
                    output_type="np",
                    **extra,
                )
            else:
                lat = FluxFamily.pack(self.noise) if self.k == "flux" else self.noise
                self.pipe(
                    self.prompts,
                    guidance_scale=self.w,
                    num_inference_steps=steps,
                    latents=lat.clone(),
                    output_type="latent",
                    **{**T.call_kwargs(self.k), **extra},
                )
        finally:
            del sched.step
        assert "step" not in vars(sched)
        out = seen[-1][1]
        if self.k == "flux":
            out = FluxFamily.unpack(out, self.shape[1], self.shape[2])
        if self.k == "dit":  # DiT steps its doubled (cond, uncond) batch; both halves are the same sample
            assert torch.equal(out[:B], out[B:])
            out = out[:B]
        return out, [t for t, _ in seen]

    def sample(self, solver, nfe=None, grid="logsnr", noise=None):
        with torch.no_grad():
            return fewstep.sample(
                self.model, self.noise if noise is None else noise, solver, nfe=nfe, grid=grid, cond=self.rows
            )


def flux_grid(n: int, mu: float) -> torch.Tensor:
    """FluxPipeline's flow grid: it passes sigmas = linspace(1, 1/n, n) with mu; FlowMatchEuler time-shifts
    them (exp(mu) / (exp(mu) + 1/s - 1)) and appends 0. (``shifted_grid`` starts from FlowMatchEuler's own
    default linspace(1, 1/T, n), which Flux replaces.)"""
    s = torch.linspace(1.0, 1.0 / n, n, dtype=F64)
    em = math.exp(mu)
    return torch.cat([em / (em + (1.0 / s - 1.0)), torch.zeros(1, dtype=F64)])


def learned_style(su: Setup, start: str, grid, seed: int = 3):
    """A learned solver from the classic ``start``: decoupled evaluation times, a corrector, perturbed."""
    tab = build_tableau(su.model, start, NFE, grid)
    solver = from_classic(su.model, tab, "s4s-alt", decouple=0.1, corrector=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in solver.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        lt = solver.tableau()
    assert (lt.eval_times - lt.t[:-1]).abs().max() > 1e-4 and lt.C is not None and lt.C.abs().sum() > 0
    return solver


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and torch.isfinite(a).all() and torch.isfinite(b).all()
    return float((a.to(F64) - b.to(F64)).abs().max())


def close(a: torch.Tensor, ref: torch.Tensor) -> bool:
    """max |a - ref| <= ATOL * max(1, max |ref|)."""
    return maxdiff(a, ref) <= ATOL * max(1.0, float(ref.abs().max()))


# ----------------------------------------------------------------------------- (a) fewstep inside the pipeline
@pytest.mark.parametrize("kind", VARIANTS)
def test_pipeline_runs_fewstep_solvers(kind):
    su = Setup(kind, seed=21)
    name, grid_name, start = SOLVERS[kind]
    grid = su.grid(grid_name, NFE)
    classic = FewStepScheduler.from_solver(name, su.model, nfe=NFE, grid=grid)
    learned = learned_style(su, start, grid)
    results = {}
    for tag, sched, solver, nfe in (("classic", classic, name, NFE), ("learned", None, learned, None)):
        if sched is None:
            sched = FewStepScheduler.from_solver(learned, su.model)
        su.pipe.scheduler = sched
        got, stepped = su.run(steps=20)  # the pipeline asks for 20 steps: the solver makes NFE
        assert stepped == sched.timesteps.tolist() and len(stepped) == NFE
        ref = su.sample(solver, nfe=nfe, grid=grid)
        d = maxdiff(got, ref)
        print(f"{kind} {tag}: max |pipeline - fewstep.sample| = {d:.2e} (latents up to {float(ref.abs().max()):.2f})")
        assert close(got, ref), (tag, d)
        results[tag] = ref
    assert maxdiff(results["classic"], results["learned"]) > 1e-3  # the learned-style solver is another solver


@pytest.mark.parametrize("kind", ["sd", "sd3", "flux"])
def test_scheduler_attributes_match_what_the_network_gets(kind):
    """timesteps (float32, on the device) are the network's time input; sigmas are the noise levels."""
    su = Setup(kind)
    name, grid_name, _ = SOLVERS[kind]
    sched = FewStepScheduler.from_solver(name, su.model, nfe=NFE, grid=su.grid(grid_name, NFE))
    sched.set_timesteps(device="cpu")
    tab = sched.tab
    assert sched.timesteps.dtype == torch.float32 and sched.timesteps.shape == (NFE,) and sched.order == 1
    assert sched.init_noise_sigma == 1.0 and sched.sigmas.shape == (NFE + 1,) and float(sched.sigmas[-1]) == 0.0
    want = su.model.schedule.net_time(tab.eval_times).float()
    assert torch.equal(sched.timesteps, want)
    if kind == "sd":  # Euler-type sigma = sigma / alpha at each evaluation time
        assert torch.allclose(sched.sigmas[:-1].to(F64), su.model.schedule.s(tab.eval_times), rtol=1e-6)
    else:  # flows: timesteps = sigma * 1000, what SD3 passes and Flux passes divided by 1000
        assert torch.allclose(sched.timesteps, sched.sigmas[:-1] * 1000, rtol=1e-6)
    x = torch.randn(B, 7, 5)  # any layout (Flux's packed tokens): the step is elementwise
    sched.set_begin_index(0)
    prev, D = sched.step(torch.randn(B, 7, 5), sched.timesteps[0], x, return_dict=False)
    assert prev.shape == D.shape == x.shape and sched.step_index == 1 and sched.begin_index == 0


# ----------------------------------------------------------------------------- (b) the pipelines' own schedulers
def test_sd_ddim_guided_parity_with_negative_prompt():
    """The pipeline's own DDIM (SD's leading spacing, steps_offset 1, final alpha = alphas_cumprod[0])
    against fewstep's ddim on the same timesteps as VPDiscrete times, with CFG on a negative prompt."""
    negatives = ["a dog in the snow", "a black car at night"]
    probe = Setup("sd", seed=31)
    su = Setup("sd", seed=31, uncond=probe.fam.encode(negatives))
    cfg = su.pipe.scheduler.config
    assert type(su.pipe.scheduler).__name__ == "DDIMScheduler" and not cfg.set_alpha_to_one
    got, stepped = su.run(steps=NFE, negative_prompt=negatives, eta=0.0)
    ks = torch.tensor(stepped, dtype=F64)
    assert ks.tolist() == [751.0, 501.0, 251.0, 1.0]
    # index k is solver time (k + 1) / T; the last step lands on alphas_cumprod[0]: index 0
    grid = su.model.schedule.t_of_index(torch.cat([ks, torch.zeros(1, dtype=F64)]))
    ref = su.sample("ddim", nfe=NFE, grid=grid)
    d = maxdiff(got, ref)
    print(
        f"sd own DDIM vs fewstep ddim (negative prompt, w={su.w}): max |diff| = {d:.2e} "
        f"(latents up to {float(ref.abs().max()):.2f})"
    )
    assert close(got, ref), d
    # and FewStepScheduler running that same ddim grid inside the pipeline
    su.pipe.scheduler = FewStepScheduler.from_solver("ddim", su.model, nfe=NFE, grid=grid)
    again, stepped2 = su.run(steps=NFE, negative_prompt=negatives)
    assert stepped2 == stepped and close(again, ref)


@pytest.mark.parametrize("dynamic", [False, True])
def test_sd3_flow_euler_guided_parity(dynamic):
    """SD3's own FlowMatchEuler (shift 3, or dynamic shifting with the mu the pipeline computes) against
    fewstep's euler on shifted_grid, with CFG on the null rows."""
    own = (
        diffusers.FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
        if dynamic
        else None
    )
    su = Setup("sd3", seed=32, scheduler=own)
    assert su.model.identity["flow_grid"]["use_dynamic_shifting"] == dynamic
    sched = su.pipe.scheduler
    asked = {}
    original = type(sched).set_timesteps

    def spy(*a, **kw):
        asked.update(kw)
        return original(sched, *a, **kw)

    sched.set_timesteps = spy
    try:
        got, _ = su.run(steps=NFE)
    finally:
        del sched.set_timesteps
    mu = asked.get("mu")
    assert (mu is not None) == dynamic
    grid = shifted_grid(su.model, NFE, mu=mu)
    assert (grid - sched.sigmas.to(F64)).abs().max() < 1e-6
    ref = su.sample("euler", nfe=NFE, grid=grid)
    d = maxdiff(got, ref)
    print(
        f"sd3 own FlowMatchEuler ({f'dynamic mu={mu:.4f}' if dynamic else 'shift 3'}) vs fewstep euler: "
        f"max |diff| = {d:.2e}"
    )
    assert close(got, ref), d


def test_flux_flow_euler_embedded_guidance_parity():
    """Flux's own FlowMatchEuler (the sigmas and mu the pipeline passes) against fewstep's euler on that grid,
    with the guidance scale embedded in the network."""
    su = Setup("flux", seed=33)
    assert su.fam.guidance_mode == "distilled"
    got, _ = su.run(steps=NFE)
    grid = flux_grid(NFE, su.flux_mu())
    assert (grid - su.pipe.scheduler.sigmas.to(F64)).abs().max() < 1e-6
    ref = su.sample("euler", nfe=NFE, grid=grid)
    d = maxdiff(got, ref)
    print(f"flux own FlowMatchEuler (mu={su.flux_mu():.4f}, guidance {su.w}) vs fewstep euler: max |diff| = {d:.2e}")
    assert close(got, ref), d
    other = Setup("flux", seed=33)
    other.model.net.guidance = 1.0  # the embedded guidance matters: another scale, another sample
    assert maxdiff(other.sample("euler", nfe=NFE, grid=grid), ref) > 1e-3


# ----------------------------------------------------------------------------- (c) what pipelines pass, and refusals
def test_other_num_inference_steps_still_runs_the_solver(caplog):
    su = Setup("sdxl", seed=34)
    sched = FewStepScheduler.from_solver("dpmpp_2m", su.model, nfe=3)
    su.pipe.scheduler = sched
    with caplog.at_level(logging.INFO, logger=LOGGER):
        got, stepped = su.run(steps=30)
        again, _ = su.run(steps=30)  # the same call again: no second log line
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(lines) == 1 and "num_inference_steps=30" in lines[0] and "3 evaluations" in lines[0]
    assert len(stepped) == 3 and torch.equal(got, again)
    assert close(got, su.sample("dpmpp_2m", nfe=3))


def test_pipeline_sigmas_and_mu_are_accepted_and_ignored(caplog):
    """Flux always passes sigmas= and mu=; SD3 passes them when the caller gives them: one log line each."""
    flux = Setup("flux", seed=35)
    flux.pipe.scheduler = FewStepScheduler.from_solver("adams2", flux.model, nfe=NFE, grid=flux.grid("shifted", NFE))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        got, stepped = flux.run(steps=28)
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(lines) == 1 and "sigmas (28 values)" in lines[0] and "mu=" in lines[0]
    assert len(stepped) == NFE
    assert close(got, flux.sample("adams2", nfe=NFE, grid=flux.grid("shifted", NFE)))

    sd3 = Setup("sd3", seed=35)
    sd3.pipe.scheduler = FewStepScheduler.from_solver("euler", sd3.model, nfe=NFE, grid=shifted_grid(sd3.model, NFE))
    plain, _ = sd3.run(steps=NFE)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        custom, stepped = sd3.run(steps=NFE, sigmas=[1.0, 0.8, 0.5, 0.3, 0.1, 0.05], mu=0.7)
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(lines) == 1 and "sigmas (6 values)" in lines[0] and "mu=0.7" in lines[0]
    assert len(stepped) == NFE and torch.equal(custom, plain)


def test_img2img_part_way_is_refused_in_one_line():
    su = Setup("sd", seed=36)
    sched = FewStepScheduler.from_solver("unipc", su.model, nfe=NFE)
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**{**su.pipe.components, "scheduler": sched})
    img2img.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, T.IMAGE, T.IMAGE)
    with pytest.raises(FewstepError, match="strength") as e:
        img2img(su.prompts[0], image=image, strength=0.5, num_inference_steps=10, output_type="latent")
    assert "\n" not in str(e.value)
    with pytest.raises(FewstepError, match="cannot start at step 2"):
        sched.set_begin_index(2)
    sched.set_begin_index(0)
    # at strength 1 the pipeline starts from add_noise at the first timestep and runs the whole solve
    out = img2img(su.prompts[0], image=image, strength=1.0, num_inference_steps=10, output_type="latent").images
    assert out.shape == (1, *su.shape) and torch.isfinite(out).all()
    x0, eps = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    t0 = su.model.schedule.solver_time(sched.timesteps[:1].to(F64))
    al, sg = float(su.model.schedule.alpha(t0)), float(su.model.schedule.sigma(t0))
    assert torch.allclose(sched.add_noise(x0, eps, sched.timesteps[:1]), al * x0 + sg * eps, atol=1e-6)


def test_set_timesteps_refusals_are_one_line():
    su = Setup("sd3")
    sched = FewStepScheduler.from_solver("euler", su.model, nfe=NFE, grid=shifted_grid(su.model, NFE))
    with pytest.raises(FewstepError, match="not both") as e:
        sched.set_timesteps(3, timesteps=[999.0, 500.0, 1.0])
    assert "\n" not in str(e.value)
    sched.set_timesteps(timesteps=[999.0, 500.0, 1.0], sigmas=[0.999, 0.5, 0.001])  # cogview-style: accepted
    assert sched.timesteps.shape == (NFE,)
    x = torch.zeros(1, 16, 8, 8)
    with pytest.raises(FewstepError, match="step 0 got timestep") as e:
        sched.step(x, 123.0, x)
    assert "\n" not in str(e.value)
