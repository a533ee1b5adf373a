"""Faults of the diffusers integrations (issue 20, rows 18-21), on tiny random-weight pipelines saved in a tmp folder.

18. a pipeline model's networks are frozen: a fit leaves no ``.grad`` on any weight, ``fewstep.sample`` returns a
    tensor that does not track gradients (pipelines, plain ``diffusers:DIR`` networks, the zoo's digits UNet);
19. a pipeline folder whose weights are only pickle-based ``.bin`` files is refused in one line naming the file and
    the fix, and a folder with both loads its safetensors (diffusers is asked for safetensors only);
20. ``FewStepScheduler.from_solver(ART, model)`` with a model that is not the fitted one names what differs (size,
    weights, schedule, prediction); another guidance than the fit's gives one warning, not an error;
21. a text pipeline loads without prompts (to build a scheduler); drawing per-seed conditions from it is refused
    in one line, and explicit prompts sample.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
import fewstep
import tiny_pipelines as T
from fewstep.errors import ArtifactError, FewstepError, ModelSpecError
from fewstep.fit.api import fit
from fewstep.integrations.diffusers_scheduler import FewStepScheduler
from fewstep.integrations.load import load_diffusers
from fewstep.sampling import build_tableau
from fewstep.solvers.artifact import save_solver, solver_doc
from fewstep.specs import load_model
from fewstep.zoo.unet import WEIGHTS_DIR

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
PROMPTS = ["a photo of a cat", "a red car on the road", "a small bird in a green tree"]
SIZE = {"height": 16, "width": 16}


@pytest.fixture(scope="module")
def sd(tmp_path_factory) -> Path:
    """A saved tiny StableDiffusionPipeline folder (safetensors)."""
    return T.save_pipeline("sd", tmp_path_factory.mktemp("pipes") / "sd")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    return msg


def weights(model) -> list[torch.Tensor]:
    """Every weight of every network of a pipeline model (or of a plain network model)."""
    fam = getattr(model, "family", None)
    if fam is None:
        return list(model.net.parameters())
    mods = [m for m in fam.pipe.components.values() if isinstance(m, torch.nn.Module)]
    return [p for m in mods for p in m.parameters()]


def artifact(model, folder: Path, solver: str = "euler@time") -> Path:
    """A learned-solver artifact for ``model`` (a classic tableau saved as one: no fit needed)."""
    save_solver(folder, solver_doc(build_tableau(model, solver, 3), model.schedule, model, "s4s"))
    return folder


# ============================================================================= 18. frozen networks
def test_a_pipeline_model_is_frozen_and_a_fit_leaves_no_gradients(sd, tmp_path):
    model = load_model(f"diffusers:{sd}", prompts=PROMPTS, **SIZE)
    params = weights(model)
    assert len(params) > 100 and not any(p.requires_grad for p in params)
    assert not any(m.training for m in model.family.pipe.components.values() if isinstance(m, torch.nn.Module))
    x = fewstep.sample(model, model.noise(range(2)), "euler@time", nfe=2, cond=model.cond_for(range(2)))
    assert x.shape == (2, 4, 8, 8) and not x.requires_grad and x.grad_fn is None
    res = fit(
        model,
        "s4s",
        2,
        teacher="ddim@time:4",
        start="ddim@time",
        samples=8,
        val_samples=4,
        confirm_samples=4,
        steps=3,
        batch=4,
        eval_every=3,
        progress=False,
    )
    assert res.solver.nfe == 2
    assert all(p.grad is None for p in params), sum(p.grad is not None for p in params)


def test_plain_network_folders_and_the_zoo_unet_are_frozen():
    for spec in (f"diffusers:{WEIGHTS_DIR}", "zoo:digits-unet"):
        model = load_model(spec)
        params = weights(model)
        assert len(params) > 100 and not any(p.requires_grad for p in params), spec
        x = fewstep.sample(model, model.noise(range(2)), "euler@time", nfe=2, cond=model.cond_for(range(2)))
        assert torch.isfinite(x).all() and not x.requires_grad, spec


# ============================================================================= 19. safetensors only
def _as_bin(folder: Path, component: str) -> Path:
    """Re-save one component's weights as a pickle-based .bin (what save_pretrained(safe_serialization=False)
    writes) and remove its safetensors; returns the .bin file."""
    from safetensors.torch import load_file

    st = next((folder / component).glob("*.safetensors"))
    pt = st.with_name("diffusion_pytorch_model.bin" if st.name.startswith("diffusion") else "pytorch_model.bin")
    torch.save(load_file(str(st)), pt)
    st.unlink()
    return pt


@pytest.mark.parametrize("component", ["unet", "text_encoder"])
def test_a_pipeline_with_bin_weights_is_refused(sd, tmp_path, component):
    folder = tmp_path / "sd_bin"
    shutil.copytree(sd, folder)
    pt = _as_bin(folder, component)
    with pytest.raises(ModelSpecError) as e:
        load_model(f"diffusers:{folder}", prompts=PROMPTS, **SIZE)
    msg = one_line(e)
    assert str(pt) in msg and "pickle" in msg and "safe_serialization=True" in msg


def test_a_plain_network_folder_with_bin_weights_is_refused(tmp_path):
    folder = tmp_path / "digits"
    shutil.copytree(WEIGHTS_DIR, folder)
    pt = _as_bin(folder, "unet")
    with pytest.raises(ModelSpecError) as e:
        load_diffusers(folder)
    msg = one_line(e)
    assert str(pt) in msg and "safe_serialization=True" in msg


def test_diffusers_is_asked_for_safetensors_only(sd, monkeypatch):
    """diffusers is told never to fall back to pickle files (use_safetensors=True)."""
    from diffusers import DiffusionPipeline

    seen = {}
    real = DiffusionPipeline.from_pretrained.__func__

    def spy(cls, *a, **kw):
        seen.update(kw)
        return real(cls, *a, **kw)

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", classmethod(spy))
    load_model(f"diffusers:{sd}", prompts=PROMPTS, **SIZE)
    assert seen.get("use_safetensors") is True


# ============================================================================= 20. which property differs
def test_scheduler_for_a_model_at_another_size_names_the_size(sd, tmp_path):
    model = load_diffusers(sd, **SIZE)
    art = artifact(model, tmp_path / "art")
    assert FewStepScheduler.from_solver(str(art), model).num_inference_steps == 3
    wide = load_diffusers(sd, height=16, width=24)
    with pytest.raises(ArtifactError) as e:
        FewStepScheduler.from_solver(str(art), wide)
    msg = one_line(e)
    assert "size: fitted for 16x16 images (latent 4x8x8), this one 16x24 (latent 4x8x12)" in msg
    assert "weights:" not in msg and "schedule:" not in msg and "fingerprint" in msg


def test_scheduler_for_a_model_with_other_weights_names_the_weights(sd, tmp_path):
    model = load_diffusers(sd, **SIZE)
    art = artifact(model, tmp_path / "art")
    with torch.no_grad():
        model.family.network.conv_in.bias.add_(0.5)
    with pytest.raises(ArtifactError) as e:
        FewStepScheduler.from_solver(str(art), model)
    msg = one_line(e)
    assert "weights: another network's" in msg and "size:" not in msg


def test_another_prediction_schedule_or_size_is_named(tmp_path):
    from fewstep import VPLinear
    from gauss import make_gauss

    solver = fewstep.load_solver(artifact(make_gauss(VPLinear(), "eps", d=4), tmp_path / "art"))
    with pytest.raises(ArtifactError, match="prediction: fitted for eps, this one x0") as e:
        solver.tableau(make_gauss(VPLinear(), "x0", d=4))
    one_line(e)
    with pytest.raises(ArtifactError, match=r"schedule: beta_max fitted 20, this one 10") as e:
        solver.tableau(make_gauss(VPLinear(beta_max=10.0), "eps", d=4))
    with pytest.raises(ArtifactError, match=r"size: fitted for samples 4, this one 5"):
        solver.tableau(make_gauss(VPLinear(), "eps", d=5))


def test_a_model_at_another_guidance_gets_one_warning(sd, tmp_path):
    model = load_diffusers(sd, **SIZE)  # the pipeline's own scale, 7.5
    art = artifact(model, tmp_path / "art")
    other = load_diffusers(sd, guidance=3.0, **SIZE)
    solver = fewstep.load_solver(art)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        FewStepScheduler.from_solver(solver, other)
        fewstep.sample(other, other.noise(range(2)), solver, cond=other.prompt_cond(PROMPTS[:2]))
    notes = [str(w.message) for w in caught if "guidance" in str(w.message)]
    assert len(notes) == 1 and "fitted at scale 7.5, this model samples at 3" in notes[0], notes
    with warnings.catch_warnings(record=True) as caught:  # the fitted scale: nothing to say
        warnings.simplefilter("always")
        FewStepScheduler.from_solver(str(art), model)
    assert not [w for w in caught if "guidance" in str(w.message)]


def test_a_guided_network_model_takes_an_unguided_fit_with_a_warning(tmp_path):
    """zoo:digits-unet guided and unguided have other fingerprints (the unconditional class is part of the
    guided model), but the same network: one warning, not an error; another network is still refused."""
    plain = load_model("zoo:digits-unet")
    art = artifact(plain, tmp_path / "art")
    guided = load_model("zoo:digits-unet", guidance=2.0)
    assert guided.fingerprint() != plain.fingerprint()
    with pytest.warns(UserWarning, match=r"another guidance \(fitted at scale 1, this model samples at 2\): its"):
        sched = FewStepScheduler.from_solver(str(art), guided)
    assert sched.num_inference_steps == 3
    with torch.no_grad():
        next(guided.net.parameters()).add_(0.1)
    with pytest.raises(ArtifactError, match="weights: another network's"):
        FewStepScheduler.from_solver(str(art), guided)


def test_an_artifact_without_parts_still_loads_and_refuses_by_fingerprint(sd, tmp_path):
    model = load_diffusers(sd, **SIZE)
    art = artifact(model, tmp_path / "art")
    doc = json.loads((art / "solver.json").read_text())
    del doc["model"]["parts"]  # written before the parts were recorded
    (art / "solver.json").write_text(json.dumps(doc))
    assert FewStepScheduler.from_solver(str(art), model).num_inference_steps == 3
    with pytest.raises(ArtifactError, match="not this one") as e:
        FewStepScheduler.from_solver(str(art), load_diffusers(sd, height=16, width=24))
    one_line(e)


# ============================================================================= 21. text pipelines without prompts
def test_a_text_pipeline_loads_without_prompts_for_a_scheduler(sd, tmp_path):
    with_prompts = load_diffusers(sd, prompts=PROMPTS, **SIZE)
    art = artifact(with_prompts, tmp_path / "art")
    bare = load_diffusers(sd, **SIZE)  # no prompts: only to build a scheduler
    assert bare.fingerprint() == with_prompts.fingerprint()
    sched = FewStepScheduler.from_solver(str(art), bare)
    assert sched.num_inference_steps == 3
    with pytest.raises(FewstepError, match="loaded without prompts: give a prompt set") as e:
        bare.cond_for(range(2))
    one_line(e)
    with pytest.raises(FewstepError, match="each sample needs a prompt") as e:
        fewstep.sample(bare, bare.noise(range(2)), "euler@time", nfe=2)
    one_line(e)
    x = fewstep.sample(bare, bare.noise(range(2)), "euler@time", nfe=2, cond=bare.prompt_cond(PROMPTS[:2]))
    ref = fewstep.sample(
        with_prompts, with_prompts.noise(range(2)), "euler@time", nfe=2, cond=with_prompts.prompt_cond(PROMPTS[:2])
    )
    torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-5)
    drawn = bare.with_prompts(fewstep.conditions.PromptSet.of(PROMPTS))
    assert drawn.cond_for(range(3))["prompt"].shape == (3,)


def test_fitting_a_text_pipeline_without_prompts_is_one_line(sd, tmp_path):
    bare = load_model(f"diffusers:{sd}", **SIZE)
    with pytest.raises(FewstepError, match="loaded without prompts") as e:
        fit(
            bare,
            "s4s",
            2,
            out=tmp_path / "never",
            teacher="ddim@time:4",
            start="ddim@time",
            samples=4,
            val_samples=4,
            confirm_samples=4,
            steps=2,
            batch=4,
            progress=False,
        )
    one_line(e)
    assert not (tmp_path / "never").exists()
