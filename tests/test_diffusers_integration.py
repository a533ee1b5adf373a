"""diffusers both ways: models in (from_diffusers / load_diffusers), solvers out (FewStepScheduler).

Tiny seeded diffusers models built from configs, CPU, float32. What is checked:
- the adapter's D equals the scheduler's own conversion (DDPMScheduler's pred_original_sample,
  FlowMatchEuler's step to sigma = 0) to float32 precision;
- FewStepScheduler inside unmodified DDPMPipeline / DiTPipeline reproduces ``fewstep.sample`` on the
  same noise (classic, learned with decoupled evaluation times and a corrector, guided DiT, flow);
- fewstep's Euler on FlowMatchEuler's sigmas reproduces the scheduler's own loop;
- save_pretrained / from_pretrained and load_diffusers round trips; clear errors for bad input.
The pipelines clamp (DDPM) or decode (DiT) at the end: the raw final latents are read from what the
scheduler's ``step`` returned (a recording wrapper on the instance; the pipeline is unmodified).
"""

from __future__ import annotations

import json

import pytest
import torch

import fewstep
from fewstep.errors import ArtifactError, FewstepError, ModelSpecError, ShapeError, SolverNameError
from fewstep.fit.methods import from_classic
from fewstep.integrations.diffusers_in import from_diffusers, shifted_grid
from fewstep.integrations.load import load_diffusers
from fewstep.sampling import build_tableau
from fewstep.solvers.artifact import save_solver, solver_doc
from fewstep.specs import load_model

diffusers = pytest.importorskip("diffusers")
from fewstep.integrations.diffusers_scheduler import FewStepScheduler  # noqa: E402  # imports diffusers: after the skip

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
TOL = 1e-5
F64 = torch.float64


_THREADS = torch.get_num_threads()


def setup_module() -> None:
    torch.set_num_threads(1)  # tiny models: one thread is fastest on a shared machine


def teardown_module() -> None:
    torch.set_num_threads(_THREADS)


# ----------------------------------------------------------------------------- tiny models
def _unet(seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = dict(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    return diffusers.UNet2DModel(**{**cfg, **kw})


def _dit(seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)  # 1000 classes: DiTPipeline hard-codes the null class 1000
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=1000,
    )


def _vae(seed: int = 2) -> torch.nn.Module:
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,),
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=8,
    )


@pytest.fixture(scope="module")
def unet():
    return _unet()


@pytest.fixture(scope="module")
def dit():
    return _dit()


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(x).all() and torch.isfinite(ref).all()
    return float((x.to(F64) - ref.to(F64)).abs().max() / ref.to(F64).abs().max())


def noise_of(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The noise a pipeline draws from torch.Generator().manual_seed(seed) on CPU."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def run_pipeline(pipe, **kwargs) -> tuple[torch.Tensor, list]:
    """Call ``pipe`` and return (the last latents its scheduler produced, the timesteps stepped)."""
    sched = pipe.scheduler
    step = type(sched).step
    seen: list = []

    def recording(model_output, timestep, sample, *a, **kw):
        out = step(sched, model_output, timestep, sample, *a, **kw)
        seen.append((float(timestep), out.prev_sample if hasattr(out, "prev_sample") else out[0]))
        return out

    sched.step = recording
    pipe.set_progress_bar_config(disable=True)
    try:
        images = pipe(generator=torch.Generator().manual_seed(kwargs.pop("seed")), **kwargs).images
    finally:
        del sched.step
    return seen[-1][1], [t for t, _ in seen], images


# ----------------------------------------------------------------------------- D parity
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_D_equals_ddpm_pred_original_sample(unet, prediction):
    sched = diffusers.DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction, clip_sample=False
    )
    den = from_diffusers(unet, sched)
    assert den.prediction == {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}[prediction]
    assert den.schedule.config()["beta_schedule"] == "scaled_linear"
    sched.set_timesteps(1000)
    x = noise_of((3, 3, 8, 8), 5)
    with torch.no_grad():
        for k in (999, 640, 150, 0):
            ref = sched.step(unet(x, k).sample, k, x, generator=torch.Generator().manual_seed(0)).pred_original_sample
            D = den(x, float(den.schedule.t_of_index(k)))
            assert rel_err(D, ref) < 2e-6, (k, rel_err(D, ref))


def test_flow_D_and_euler_parity(unet):
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    den = from_diffusers(unet, sched)
    assert den.prediction == "velocity" and den.schedule.time_scale == 1000.0
    assert den.identity["flow_grid"]["shift"] == 3.0
    x = noise_of((3, 3, 8, 8), 6)
    with torch.no_grad():
        for s in (0.9, 0.4, 0.05):
            sched.set_timesteps(sigmas=[s])  # one step from sigma (shifted by the scheduler) to 0: x - sigma v
            sig, ts = float(sched.sigmas[0]), sched.timesteps[0]
            v = unet(x, ts).sample
            ref = sched.step(v, ts, x).prev_sample
            D = den(x, sig)
            assert rel_err(D, ref) < 2e-6
            assert rel_err(D, x - sig * v) < 2e-6
        for n in (4, 8):
            sched.set_timesteps(n)
            assert (shifted_grid(den, n) - sched.sigmas.to(F64)).abs().max() < 1e-6
            noise = noise_of((2, 3, 8, 8), n)
            x = noise.clone()
            for ts in sched.timesteps:
                x = sched.step(unet(x, ts).sample, ts, x).prev_sample
            out = fewstep.sample(den, noise, "euler", nfe=n, grid=sched.sigmas.to(F64))
            assert rel_err(out, x) < TOL
            assert rel_err(fewstep.sample(den, noise, "euler", nfe=n, grid=shifted_grid(den, n)), x) < TOL


def test_text_conditioned_guidance_is_one_call():
    torch.manual_seed(3)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        norm_num_groups=4,
        attention_head_dim=4,
    )
    ehs, u_ehs = torch.randn(1, 5, 16), torch.randn(1, 5, 16)
    den = from_diffusers(
        unet,
        diffusers.DDIMScheduler(),
        guidance_scale=5.0,
        encoder_hidden_states=ehs,
        uncond_encoder_hidden_states=u_ehs,
    )
    x, k = noise_of((3, 4, 8, 8), 7), 700
    with torch.no_grad():
        D = den(x, float(den.schedule.t_of_index(k)))
        assert den.nfe == 1
        e_c = unet(x, k, encoder_hidden_states=ehs.expand(3, 5, 16)).sample
        e_u = unet(x, k, encoder_hidden_states=u_ehs.expand(3, 5, 16)).sample
    eps = e_u + 5.0 * (e_c - e_u)
    ac = den.schedule.alphas_cumprod[k]
    ref = (x - (1 - ac).sqrt().float() * eps) / ac.sqrt().float()
    assert rel_err(D, ref) < 2e-6
    other = from_diffusers(
        unet,
        diffusers.DDIMScheduler(),
        guidance_scale=5.0,
        encoder_hidden_states=u_ehs,
        uncond_encoder_hidden_states=u_ehs,
    )
    assert other.fingerprint() != den.fingerprint()  # the conditioning is part of the identity


# ----------------------------------------------------------------------------- scheduler out
def test_ddpm_pipeline_classic_solver(unet):
    den = from_diffusers(unet, diffusers.DDPMScheduler())
    sched = FewStepScheduler.from_solver("unipc@logsnr", diffusers.DDPMScheduler().config, nfe=5)
    want_t = den.schedule.net_time(fewstep.make_grid(den.schedule, 5, "logsnr")[:-1]).float()
    assert torch.equal(sched.timesteps, want_t) and sched.timesteps[1] % 1 != 0  # fractional DDPM indices
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=sched)
    # the pipeline's default num_inference_steps (1000) is ignored: the tableau fixes 5
    latents, stepped, images = run_pipeline(pipe, batch_size=3, seed=11, output_type="pt")
    assert stepped == sched.timesteps.tolist()
    with torch.no_grad():
        ref = fewstep.sample(den, noise_of((3, 3, 8, 8), 11), "unipc@logsnr", nfe=5)
    assert rel_err(latents, ref) < TOL
    assert (images - (ref / 2 + 0.5).clamp(0, 1)).abs().max() < 1e-5  # the pipeline's own output too


def _learned_solver(den, tmp_path):
    """A decoupled (c != t) predictor-corrector learned solver, perturbed off UniPC and saved."""
    tab = build_tableau(den, "unipc@time", 5)
    solver = from_classic(den, tab, "s4s-alt", decouple=0.3)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in solver.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        lt = solver.tableau()
    save_solver(tmp_path / "solver", solver_doc(lt, den.schedule, den, "s4s-alt"))
    return fewstep.load_solver(tmp_path / "solver")


def test_ddpm_pipeline_learned_solver(unet, tmp_path):
    den = from_diffusers(unet, diffusers.DDPMScheduler(prediction_type="v_prediction"))
    loaded = _learned_solver(den, tmp_path)
    tab = loaded.tableau(den)
    assert (tab.eval_times - tab.t[:-1]).abs().max() > 1e-3 and tab.C is not None
    sched = FewStepScheduler.from_solver(str(tmp_path / "solver"), den)
    assert sched.config.prediction_type == "v_prediction" and sched.config.solver is None
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=sched)
    latents, _, _ = run_pipeline(pipe, batch_size=2, seed=12, output_type="pt", num_inference_steps=5)
    with torch.no_grad():
        ref = fewstep.sample(den, noise_of((2, 3, 8, 8), 12), loaded)
    assert rel_err(latents, ref) < TOL
    with pytest.raises(ArtifactError, match="fingerprint"):  # another model's weights
        FewStepScheduler.from_solver(
            loaded, from_diffusers(_unet(seed=9), diffusers.DDPMScheduler(prediction_type="v_prediction"))
        )
    with pytest.warns(UserWarning, match="only be checked against the schedule"):  # no network to check
        FewStepScheduler.from_solver(loaded, diffusers.DDPMScheduler(prediction_type="v_prediction").config)


def test_dit_pipeline_guided(dit):
    den = from_diffusers(dit, diffusers.DDIMScheduler(), guidance_scale=4.0)
    assert den.identity["null_class"] == 1000 and den.identity["learned_sigma"]
    pipe = diffusers.DiTPipeline(
        transformer=dit, vae=_vae(), scheduler=FewStepScheduler.from_solver("dpmpp_3m@logsnr", den, nfe=6)
    )
    latents, stepped, _ = run_pipeline(pipe, class_labels=[3, 7], guidance_scale=4.0, seed=13, output_type="pt")
    assert len(stepped) == 6 and latents.shape == (4, 4, 8, 8)  # the pipeline steps cond and uncond copies
    den.nfe = 0
    with torch.no_grad():
        ref = fewstep.sample(
            den, noise_of((2, 4, 8, 8), 13), "dpmpp_3m@logsnr", nfe=6, cond={"class_labels": torch.tensor([3, 7])}
        )
    assert den.nfe == 6  # one guided call per evaluation
    assert rel_err(latents[:2], ref) < TOL and rel_err(latents[2:], ref) < TOL
    with pytest.raises(FewstepError, match="class_labels"):
        fewstep.sample(den, noise_of((2, 4, 8, 8), 13), "ddim", nfe=2)


def test_flow_model_in_pipeline(unet):
    """FlowMatchEuler and FewStepScheduler in the same unmodified pipeline, and fewstep.sample."""
    config = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).config
    den = from_diffusers(unet, config)
    own_sched = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
    flow_pipe = diffusers.DDPMPipeline(unet=unet, scheduler=own_sched)
    own, _, _ = run_pipeline(flow_pipe, batch_size=2, seed=14, output_type="pt", num_inference_steps=6)
    noise = noise_of((2, 3, 8, 8), 14)
    for solver in ("euler", "adams2"):
        sched = FewStepScheduler.from_solver(solver, config, nfe=6, grid=shifted_grid(den, 6))
        latents, _, _ = run_pipeline(
            diffusers.DDPMPipeline(unet=unet, scheduler=sched), batch_size=2, seed=14, output_type="pt"
        )
        with torch.no_grad():
            ref = fewstep.sample(den, noise, solver, nfe=6, grid=shifted_grid(den, 6))
        assert rel_err(latents, ref) < TOL
        if solver == "euler":
            assert rel_err(latents, own) < TOL
        else:
            assert rel_err(latents, own) > 1e-3  # a different solver does differ


def test_scheduler_save_load_round_trip(unet, tmp_path):
    den = from_diffusers(unet, diffusers.DDPMScheduler(prediction_type="v_prediction"))
    grid = [1.0, 0.7, 0.45, 0.2, 0.05, 0.0]

    def public(config):
        return {k: v for k, v in config.items() if not k.startswith("_")}

    for tag, sched in (
        ("learned", FewStepScheduler.from_solver(_learned_solver(den, tmp_path), den)),
        ("classic", FewStepScheduler.from_solver("unipc3", den, nfe=5, grid=grid, order=3)),
    ):
        sched.save_pretrained(tmp_path / tag)
        again = FewStepScheduler.from_pretrained(tmp_path / tag)
        assert public(again.config) == public(sched.config)
        assert torch.equal(again.timesteps, sched.timesteps)
        outs = [
            run_pipeline(diffusers.DDPMPipeline(unet=unet, scheduler=s), batch_size=2, seed=15, output_type="pt")[0]
            for s in (sched, again)
        ]
        assert torch.equal(outs[0], outs[1])
    assert json.loads((tmp_path / "classic" / "scheduler_config.json").read_text())["grid"] == grid
    # a whole pipeline saved with FewStepScheduler loads back in diffusers, and as a fewstep model
    diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(tmp_path / "pipe")
    pipe = diffusers.DDPMPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(pipe.scheduler, FewStepScheduler) and torch.equal(pipe.scheduler.timesteps, sched.timesteps)
    assert load_diffusers(tmp_path / "pipe").fingerprint() == den.fingerprint()


def test_scheduler_errors(unet, tmp_path):
    cfg = diffusers.DDPMScheduler().config
    with pytest.raises(SolverNameError, match="heun"):
        FewStepScheduler.from_solver("heun", cfg, nfe=5)
    with pytest.raises(SolverNameError, match="unknown solver"):
        FewStepScheduler.from_solver("nope@time", cfg, nfe=5)
    with pytest.raises(FewstepError, match="nfe"):
        FewStepScheduler.from_solver("ddim", cfg)
    with pytest.raises(FewstepError, match="from_solver"):
        FewStepScheduler.from_config(cfg)  # no schedule: refuse rather than guess one
    sched = FewStepScheduler.from_solver("ddim@time", cfg, nfe=3)
    with pytest.raises(FewstepError, match="timesteps"):
        sched.set_timesteps(3, timesteps=[999, 500, 1])
    sched.set_timesteps(50)
    x = torch.zeros(1, 3, 8, 8)
    with pytest.raises(FewstepError, match="step 0 got timestep"):
        sched.step(x, 500, x)
    for t in sched.timesteps:
        sched.step(x, t, x)
    with pytest.raises(FewstepError, match="set_timesteps"):
        sched.step(x, sched.timesteps[0], x)
    den = from_diffusers(unet, diffusers.DDPMScheduler())
    with pytest.raises(FewstepError, match="makes 5 evaluations"):
        FewStepScheduler.from_solver(_learned_solver(den, tmp_path), den, nfe=6)


# ----------------------------------------------------------------------------- loading folders
def test_load_diffusers_round_trip(dit, tmp_path):
    folder = tmp_path / "dit"
    diffusers.DiTPipeline(transformer=dit, vae=_vae(), scheduler=diffusers.DDIMScheduler()).save_pretrained(folder)
    (folder / "fewstep.json").write_text(json.dumps({"num_classes": 10, "guidance_scale": 2.0}))
    den = load_diffusers(folder)
    assert den.name == f"diffusers:{folder}" and den.guidance_scale == 2.0 and den.sample_shape == (4, 8, 8)
    assert load_model(f"diffusers:{folder}").fingerprint() == den.fingerprint()
    ref = from_diffusers(dit, diffusers.DDIMScheduler(), guidance_scale=2.0)
    labels = den.cond_for(range(20, 26))["class_labels"]
    assert labels.dtype == torch.long and int(labels.min()) >= 0 and int(labels.max()) < 10
    assert len(set(labels.tolist())) > 1
    assert torch.equal(labels, torch.cat([den.cond_for([s])["class_labels"] for s in range(20, 26)]))
    x = noise_of((6, 4, 8, 8), 16)
    with torch.no_grad():
        # the folder's network and the in-memory one: equal weights in two memory layouts, so agreement to
        # float32 rounding (which matmul kernel runs depends on the CPU)
        torch.testing.assert_close(
            den(x, 0.5, class_labels=labels), ref(x, 0.5, class_labels=labels), rtol=1e-5, atol=1e-6
        )
        out = fewstep.sample(den, den.noise(range(20, 26)), "unipc", nfe=4, cond=den.cond_for(range(20, 26)))
    assert out.shape == (6, 4, 8, 8) and torch.isfinite(out).all()
    # the scale is not part of the model: a solver fitted at 2 may be tried at 3 (its artifact records 2)
    assert load_diffusers(folder, guidance_scale=3.0).fingerprint() == den.fingerprint()

    unet_dir = tmp_path / "ddpm"
    diffusers.DDPMPipeline(unet=_unet(), scheduler=diffusers.DDPMScheduler()).save_pretrained(unet_dir)
    plain = load_diffusers(unet_dir)
    assert plain.cond_sampler is None and plain.prediction == "eps"
    assert plain.fingerprint() == from_diffusers(_unet(), diffusers.DDPMScheduler()).fingerprint()


def test_cli_fits_and_evaluates_a_diffusers_folder(dit, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from fewstep.cli import app

    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "dit"
    diffusers.DiTPipeline(transformer=dit, vae=_vae(), scheduler=diffusers.DDIMScheduler()).save_pretrained(folder)
    (folder / "fewstep.json").write_text(json.dumps({"num_classes": 10, "guidance_scale": 2.0}))
    art = tmp_path / "solver"
    r = CliRunner().invoke(
        app,
        [
            "fit",
            "--model",
            f"diffusers:{folder}",
            "--method",
            "s4s",
            "--nfe",
            "3",
            "--out",
            str(art),
            "--samples",
            "24",
            "--val-samples",
            "12",
            "--confirm-samples",
            "12",
            "--steps",
            "6",
            "--batch",
            "8",
            "--teacher",
            "dpmpp_2m@logsnr:12",
            "--eval-samples",
            "0",
            "--json",
        ],
    )
    assert r.exit_code == 0, (r.output, r.exception)
    doc = json.loads((art / "solver.json").read_text())
    assert doc["model"]["fingerprint"] == load_diffusers(folder).fingerprint() and doc["model"]["guidance_scale"] == 2.0
    r = CliRunner().invoke(
        app,
        [
            "eval",
            "--model",
            f"diffusers:{folder}",
            "--solver",
            str(art),
            "--solver",
            "ddim@time",
            "--nfe",
            "3",
            "--samples",
            "6",
            "--reference-nfe",
            "10",
            "--metrics",
            "none",
            "--json",
        ],
    )
    assert r.exit_code == 0, (r.output, r.exception)
    rows = json.loads(r.stdout)["results"]
    assert {x["grid"] for x in rows} == {"time", "learned"} and all(x["rmse"] > 0 for x in rows)


def test_load_diffusers_errors(tmp_path):
    with pytest.raises(ModelSpecError, match="does not exist"):
        load_diffusers(tmp_path / "missing")
    (tmp_path / "empty" / "scheduler").mkdir(parents=True)
    diffusers.DDPMScheduler().save_pretrained(tmp_path / "empty" / "scheduler")
    with pytest.raises(ModelSpecError, match="no unet/ or transformer/"):
        load_diffusers(tmp_path / "empty")
    _unet().save_pretrained(tmp_path / "nosched" / "unet")
    with pytest.raises(ModelSpecError, match="scheduler"):
        load_diffusers(tmp_path / "nosched")
    diffusers.DDPMScheduler().save_pretrained(tmp_path / "nosched" / "scheduler")
    (tmp_path / "nosched" / "fewstep.json").write_text(json.dumps({"classes": 3}))
    with pytest.raises(ModelSpecError, match="unknown keys classes"):
        load_diffusers(tmp_path / "nosched")
    (tmp_path / "nosched" / "fewstep.json").unlink()
    with pytest.raises(ModelSpecError, match="does not take"):
        load_diffusers(tmp_path / "nosched", sampleshape=(3, 8, 8))
    with pytest.raises(ShapeError, match="channels"):
        load_diffusers(tmp_path / "nosched", sample_shape=(4, 8, 8))


@pytest.mark.parametrize(
    "config,match",
    [
        (dict(thresholding=True), "thresholding"),
        (dict(rescale_betas_zero_snr=True), "zero"),
        (dict(beta_schedule="sigmoid"), "beta schedule"),
        (dict(prediction_type="score"), "prediction_type"),
    ],
)
def test_unsupported_configs(unet, config, match):
    with pytest.raises(FewstepError, match=match):
        from_diffusers(
            unet,
            diffusers.DDPMScheduler(**config).config
            if "prediction_type" not in config
            else {**diffusers.DDPMScheduler().config, **config},
        )


def test_model_errors(unet):
    with pytest.raises(FewstepError, match="consistency"):
        from_diffusers(unet, diffusers.LCMScheduler())
    with pytest.raises(ShapeError, match="channels"):
        from_diffusers(unet, diffusers.DDPMScheduler(), sample_shape=(4, 8, 8))
    with pytest.raises(ShapeError, match="outputs 5 channels"):
        from_diffusers(_unet(out_channels=5), diffusers.DDPMScheduler())
    with pytest.raises(FewstepError, match="drop guidance_scale"):
        from_diffusers(unet, diffusers.DDPMScheduler(), guidance_scale=3.0)
    labelled = _unet(num_class_embeds=4)
    with pytest.raises(FewstepError, match="null_class"):
        from_diffusers(labelled, diffusers.DDPMScheduler(), guidance_scale=3.0)
    with pytest.raises(FewstepError, match="outside"):
        from_diffusers(labelled, diffusers.DDPMScheduler(), guidance_scale=3.0, null_class=4)
    den = from_diffusers(labelled, diffusers.DDPMScheduler(), guidance_scale=3.0, null_class=0)
    x = noise_of((2, 3, 8, 8), 17)
    with torch.no_grad():
        D = den(x, 0.5, class_labels=2)  # a scalar label is shared by the batch
        with pytest.raises(ShapeError, match="class_labels has batch 3"):
            den(x, 0.5, class_labels=torch.tensor([1, 2, 3]))
    assert D.shape == x.shape
    with pytest.raises(FewstepError, match="not a flow"):
        shifted_grid(den, 5)
