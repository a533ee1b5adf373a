"""The trained scenes pipelines (zoo:scenes-sd, -sd3, -pixart, -dit): shipped weights, folders diffusers runs,
prompts they follow, and the ways a user reaches them (zoo:, diffusers:DIR, the CLI, FewStepScheduler)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fewstep import zoo  # noqa: E402
from fewstep.errors import FewstepError  # noqa: E402
from fewstep.specs import load_model  # noqa: E402
from fewstep.training import recipe_hash  # noqa: E402
from fewstep.zoo.scenes import models as M  # noqa: E402
from fewstep.zoo.scenes.measure import adherence, captions_of  # noqa: E402

FAMILIES = M.FAMILIES
REAL_TRAIN = M.train  # the cache fixture replaces M.train so that nothing trains by accident


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One fresh cache for the module: pipeline folders are assembled from the shipped weights, never trained."""
    root = tmp_path_factory.mktemp("cache")
    old = os.environ.get("FEWSTEP_CACHE")
    os.environ["FEWSTEP_CACHE"] = str(root)
    real = M.train
    M.train = lambda *a, **k: pytest.fail("a scenes model was trained instead of assembled from shipped weights")
    yield root
    M.train = real
    if old is None:
        os.environ.pop("FEWSTEP_CACHE")
    else:
        os.environ["FEWSTEP_CACHE"] = old


def test_the_zoo_says_which_families_ship_weights():
    for family in FAMILIES:
        first_use = zoo.INFO[f"scenes-{family}"].first_use
        assert first_use.startswith("ships weights") == (family in M.SHIPPED_FAMILIES), first_use


@pytest.mark.parametrize("family", M.SHIPPED_FAMILIES)
def test_each_family_ships_weights_of_its_current_recipe(family):
    got = M.read_network(M.SHIPPED / f"{family}.safetensors", M.recipe_for(family))
    assert got is not None, f"weights/scenes/{family}.safetensors is missing or of another recipe"
    state, prov = got
    assert prov["steps_run"] + prov["resumed_at"] == M.recipe_for(family)["steps"]
    assert len(prov["first_losses"]) == 8 and prov["final_loss"] < 0.5 * prov["first_losses"][0]


@pytest.mark.parametrize("family", M.SHIPPED_FAMILIES)
def test_the_folder_is_a_pipeline_diffusers_runs_unmodified(cache, family):
    from diffusers import DiffusionPipeline

    folder = M.pipeline_folder(family, log=False)
    assert folder == cache / "zoo" / f"scenes-{family}-{recipe_hash(M.recipe_for(family))}"
    assert M.folder_problem(folder, M.recipe_for(family)) is None
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert type(pipe).__name__ == M.PIPELINES[family]
    g = torch.Generator().manual_seed(0)
    if family == "dit":
        out = pipe(class_labels=[0, 5], num_inference_steps=3, generator=g, output_type="np").images
    else:
        extra = {"use_resolution_binning": False} if family == "pixart" else {}
        prompt = (folder / "prompts" / "heldout.txt").read_text().splitlines()[0]
        out = pipe([prompt] * 2, num_inference_steps=3, generator=g, output_type="np", **extra).images
    assert out.shape == (2, 32, 32, 3) and out.min() >= 0.0 and out.max() <= 1.0


def test_a_damaged_cached_folder_is_rebuilt_not_trusted(cache, capfd):
    folder = M.pipeline_folder("dit", log=False)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert (
        M.folder_problem(folder, M.recipe_for("dit"))
        == "damaged weights (transformer/diffusion_pytorch_model.safetensors)"
    )
    assert M.pipeline_folder("dit", log=False) == folder
    err = capfd.readouterr().err
    assert "damaged weights" in err and "rebuilding it" in err
    assert M.folder_problem(folder, M.recipe_for("dit")) is None


def test_zoo_describes_the_pipelines_without_building_them():
    d = zoo.describe("scenes-sd3")
    assert (d["family"], d["prediction"], d["schedule"], d["sample_shape"]) == ("sd3", "velocity", "flow", [4, 8, 8])
    assert d["pipeline_folder"].endswith(f"scenes-sd3-{recipe_hash(M.recipe_for('sd3'))}")
    assert d["first_use"].startswith("ships weights")
    assert d["prompt_files"]["heldout"].endswith("prompts/heldout.txt")
    assert zoo.describe("scenes-dit")["prompt_files"] is None and zoo.describe("scenes-dit")["classes"] == 24


def test_zoo_and_diffusers_dir_are_the_same_model(cache):
    z = load_model("zoo:scenes-sd", guidance=4.0)
    folder = M.pipeline_folder("sd", log=False)
    d = load_model(f"diffusers:{folder}", prompts=str(folder / "prompts" / "train.txt"), guidance=4.0)
    assert (z.prediction, z.sample_shape, z.schedule) == (d.prediction, d.sample_shape, d.schedule)
    seeds = [3, 4, 5]
    assert captions_of(z, seeds) == captions_of(d, seeds)
    x, t = z.noise(seeds), 0.5
    torch.testing.assert_close(z(x, t, **z.cond_for(seeds)), d(x, t, **d.cond_for(seeds)))


def test_a_prompt_outside_the_vocabulary_is_one_line(cache):
    for spec in ("zoo:scenes-sd", f"diffusers:{M.pipeline_folder('sd', log=False)}"):
        with pytest.raises(FewstepError) as e:
            load_model(spec, prompts=["a small purple star on a grey background"])
        msg = str(e.value)
        assert "\n" not in msg and "'star'" in msg and "'purple'" not in msg and "it knows:" in msg


def test_guided_samples_follow_held_out_prompts_and_guidance_helps(cache):
    """On captions whose (shape, colour) pairs training never saw, a few-step solve at guidance 4 shows most
    stated attributes, far above chance, and more than without guidance."""
    folder = M.pipeline_folder("sd", log=False)
    held = str(folder / "prompts" / "heldout.txt")
    seeds = list(range(5000, 5048))
    guided = adherence(load_model("zoo:scenes-sd", prompts=held, guidance=4.0), seeds, "dpmpp_3m@logsnr", 20)
    plain = adherence(load_model("zoo:scenes-sd", prompts=held, guidance=1.0), seeds, "dpmpp_3m@logsnr", 20)
    assert guided["adherence"] > 0.7 and guided["adherence"] > plain["adherence"] + 0.05
    assert guided["chance"] < 0.4


def test_the_recipe_reproduces_the_start_of_the_shipped_run(cache):
    """Training the recipe again starts as the shipped weights' run started (its first losses): the recipe, data,
    encoders and VAE are the ones that made them."""
    for family in ("dit",):  # sd and pixart reproduce too (checked by hand): each costs ~30 s of encoding
        recipe = M.recipe_for(family)
        _, prov = M.read_network(M.SHIPPED / f"{family}.safetensors", recipe)
        _, again = REAL_TRAIN(family, recipe, log=False, stop_after=3)
        torch.testing.assert_close(
            torch.tensor(again["first_losses"]), torch.tensor(prov["first_losses"][:3]), rtol=1e-4, atol=0
        )


def test_fewstep_scheduler_inside_the_unmodified_sd_pipeline_matches_fewstep_sample(cache):
    from diffusers import DiffusionPipeline

    from fewstep.integrations.diffusers_scheduler import FewStepScheduler
    from fewstep.sampling import sample

    folder = M.pipeline_folder("sd", log=False)
    model = load_model(f"diffusers:{folder}", guidance=4.0)
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.scheduler = FewStepScheduler.from_solver("dpmpp_3m@logsnr", model, nfe=5)
    prompt = (folder / "prompts" / "heldout.txt").read_text().splitlines()[0]
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    got = pipe([prompt] * 2, guidance_scale=4.0, num_inference_steps=5, latents=noise.clone(), output_type="latent")
    with torch.no_grad():
        ref = sample(model, noise, "dpmpp_3m@logsnr", nfe=5, cond=model.prompt_cond([prompt] * 2))
    torch.testing.assert_close(got.images, ref, rtol=1e-4, atol=1e-4)


def test_cli_fit_and_eval_on_the_dit_pipeline(cache, tmp_path):
    from typer.testing import CliRunner

    from fewstep.cli import app

    runner = CliRunner()
    out = tmp_path / "solver"
    fit_args = ["fit", "--model", "zoo:scenes-dit", "--method", "s4s", "--nfe", "4", "--samples", "16"]
    fit_args += ["--val-samples", "8", "--confirm-samples", "8", "--steps", "6", "--teacher", "dpmpp_3m@logsnr:20"]
    r = runner.invoke(app, [*fit_args, "--eval-samples", "0", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "solver.json").read_text())["nfe"] == 4
    eval_args = ["eval", "--model", "zoo:scenes-dit", "--solver", "ddim", "--solver", str(out), "--nfe", "4"]
    eval_args += ["--samples", "8", "--reference-nfe", "50", "--metrics", "none", "--json"]
    r = runner.invoke(app, eval_args)
    assert r.exit_code == 0, r.output
    rows = [row for row in json.loads(r.stdout)["results"] if row.get("role") != "reference"]
    assert sorted(row["solver"] == "ddim" for row in rows) == [False, True]  # the classic row and the learned one
    assert [row.get("artifact") for row in rows if row["solver"] != "ddim"] == [str(out)]  # which artifact it was
    assert all(math.isfinite(row["rmse"]) and row["rmse"] > 0 for row in rows)


def test_a_text_pipeline_is_evaluated_on_its_held_out_captions_by_default(cache):
    """Fits draw the training captions; `fewstep eval` and a fit's closing table, given no prompt file, the
    held-out ones (attribute pairs training never saw)."""
    from fewstep.cli.common import eval_model, load

    fitted = load("zoo:scenes-sd", "cpu", role="fit")
    assert fitted.cond_sampler.prompts.source.endswith("prompts/train.txt")
    assert eval_model(fitted, None, None).cond_sampler.prompts.source.endswith("prompts/heldout.txt")
    assert load("zoo:scenes-sd", "cpu", role="eval").cond_sampler.prompts.source.endswith("prompts/heldout.txt")
