"""Tests for zoo:digits-unet (fewstep.zoo.unet): a class-conditional diffusers UNet2DModel on 16x16 digits.

The model is read from the checkpoint committed under src/fewstep/zoo/weights/digits-unet through
fewstep's diffusers adapter, so these tests never train the full recipe. Training itself is
checked on a recipe of a few steps.
"""

from __future__ import annotations

import json
from functools import cache, lru_cache

import pytest
import torch

import fewstep
from fewstep.errors import ModelSpecError
from fewstep.seeds import eval_seeds
from fewstep.zoo import unet as U
from fewstep.zoo.train import recipe_hash

pytest.importorskip("diffusers")
pytest.importorskip("sklearn")

SHORT = {"steps": 3, "batch": 8}
# the committed weights' fingerprint (schedule, prediction, identity and every weight byte)
FINGERPRINT = "57abdc5e0cc05815"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n, _ = torch.get_num_threads(), torch.set_num_threads(1)  # tiny batches: one thread is fastest
    yield
    torch.set_num_threads(n)


@cache
def _model(guidance_scale: float | None = None) -> fewstep.Denoiser:
    return U.build_digits_unet(guidance_scale=guidance_scale)


@lru_cache(maxsize=1)
def _classifier():
    """Logistic regression on the 1797 8x8 digits (pixels in [-1, 1])."""
    from sklearn.linear_model import LogisticRegression

    from fewstep.zoo.digits import digits_data

    x, y = digits_data(torch.float64)
    return LogisticRegression(max_iter=3000).fit(x.reshape(len(y), -1).numpy(), y.numpy())


def _predict(samples: torch.Tensor) -> torch.Tensor:
    """Digit classes of (B, 1, 16, 16) samples, avg-pooled back to 8x8."""
    x8 = torch.nn.functional.avg_pool2d(samples.clamp(-1, 1).double(), 2).reshape(samples.shape[0], -1)
    return torch.as_tensor(_classifier().predict(x8.numpy()))


# ----------------------------------------------------------------------------- recipe and training
def test_short_recipe_is_bit_deterministic():
    r = U.unet_recipe(**SHORT)
    a, b = U.train_unet(r), U.train_unet(r)
    assert a.keys() == b.keys() and len(a) > 100
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = U.train_unet(U.unet_recipe(**SHORT, seed=1))
    assert any(not torch.equal(a[k], c[k]) for k in a)
    # the caller's global RNG is untouched by training
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    U.train_unet(r)
    assert torch.equal(torch.rand(3), before)


def test_recipe_overrides_and_errors():
    r = U.unet_recipe(steps=7, arch={"layers_per_block": 2})
    assert r["steps"] == 7 and r["arch"]["layers_per_block"] == 2
    assert r["arch"]["block_out_channels"] == U.RECIPE["arch"]["block_out_channels"]
    assert recipe_hash(r) != recipe_hash(U.RECIPE) and U.unet_recipe() == U.RECIPE
    with pytest.raises(ModelSpecError, match="unknown recipe field 'stepz'"):
        U.unet_recipe(stepz=3)
    with pytest.raises(ModelSpecError, match="guidance_scale must be a finite number"):
        U.build_digits_unet(guidance_scale="2")


def test_data_is_upsampled_digits():
    x, y = U.digits16()
    assert x.shape == (1797, 1, 16, 16) and y.shape == (1797,)
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    from fewstep.zoo.digits import digits_data

    x8, _ = digits_data()
    # in 1-D, 2x bilinear upsampling then pair averaging is the filter [1/8, 3/4, 1/8] with
    # replicated edges; in 2-D that filter along both axes
    k = torch.tensor([0.125, 0.75, 0.125])
    pad = torch.nn.functional.pad(x8, (1, 1, 1, 1), mode="replicate")
    want = torch.nn.functional.conv2d(pad, (k[:, None] * k[None, :])[None, None])
    assert torch.allclose(torch.nn.functional.avg_pool2d(x, 2), want, atol=1e-6)


def test_pipeline_folder_cache_and_retrain(tmp_path, monkeypatch):
    from diffusers import DDPMScheduler, UNet2DModel

    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path))
    monkeypatch.setattr(U, "_TRAINED", {})
    r = U.unet_recipe(**SHORT)
    path = U.trained_pipeline(r)
    assert path == tmp_path / "zoo" / f"digits-unet-{recipe_hash(r)}"
    assert U.folder_recipe_hash(path) == recipe_hash(r)
    assert json.loads((path / "fewstep.json").read_text()) == {
        "sample_shape": [1, 16, 16],
        "num_classes": 10,
        "null_class": 10,
        "class_sampler": "uniform",
    }
    unet = UNet2DModel.from_pretrained(str(path / "unet"), use_safetensors=True)
    state = U.train_unet(r)
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in state.items())
    sched = DDPMScheduler.from_pretrained(str(path / "scheduler"))
    assert sched.config.prediction_type == "epsilon" and sched.config.num_train_timesteps == 1000
    # a second use reads the cache (no training); retrain=True trains again into the same folder
    monkeypatch.setattr(U, "_TRAINED", {})
    calls = []
    monkeypatch.setattr(U, "train_unet", lambda rec: calls.append(rec) or state)
    assert U.trained_pipeline(r) == path and calls == []
    assert U.trained_pipeline(r, retrain=True) == path and len(calls) == 1
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary folders left
    # the current recipe uses the committed folder
    assert U.trained_pipeline(U.unet_recipe()) == U.WEIGHTS_DIR and len(calls) == 1


# ----------------------------------------------------------------------------- the committed model
def test_committed_checkpoint_is_the_current_recipe():
    doc = json.loads((U.WEIGHTS_DIR / "recipe.json").read_text())
    assert doc["recipe_hash"] == recipe_hash(U.RECIPE) == U.folder_recipe_hash(U.WEIGHTS_DIR)
    assert doc["recipe"] == U.RECIPE
    weights = U.WEIGHTS_DIR / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size <= 3_000_000
    files = sorted(str(p.relative_to(U.WEIGHTS_DIR)) for p in U.WEIGHTS_DIR.rglob("*") if p.is_file())
    assert files == [
        "fewstep.json",
        "model_index.json",
        "recipe.json",
        "scheduler/scheduler_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    ]


def test_denoiser_metadata_and_fingerprint():
    den = _model()
    assert den.name == "zoo:digits-unet" and den.prediction == "eps" and den.sample_shape == (1, 16, 16)
    assert den.schedule == fewstep.VPDiscrete("linear")
    assert den.identity["zoo"] == "digits-unet" and den.identity["recipe_hash"] == recipe_hash(U.RECIPE)
    assert den.fingerprint() == U.build_digits_unet().fingerprint() == FINGERPRINT
    # guided is another model than unguided; the scale is not (a solver may be tried at another scale)
    assert _model(2.0).fingerprint() != FINGERPRINT and _model(2.0).fingerprint() == _model(3.0).fingerprint()
    # one label 0..9 per seed, independent of batching and of guidance
    seeds = range(100, 140)
    lab = den.cond_for(seeds)["class_labels"]
    assert lab.shape == (40,) and int(lab.min()) >= 0 and int(lab.max()) <= 9 and len(set(lab.tolist())) >= 8
    parts = torch.cat([den.cond_for(range(100, 113))["class_labels"], den.cond_for(range(113, 140))["class_labels"]])
    assert torch.equal(parts, lab) and torch.equal(_model(2.0).cond_for(seeds)["class_labels"], lab)


def test_guided_samples_are_the_asked_digits():
    """64 samples, DDIM with 100 NFE on a time-uniform grid, guidance 2: a digits classifier agrees."""
    den = _model(2.0)
    seeds = eval_seeds(64)
    cond = den.cond_for(seeds)
    with torch.no_grad():
        x = fewstep.sample(den, den.noise(seeds), "ddim@time", nfe=100, cond=cond)
    acc = float((_predict(x) == cond["class_labels"]).double().mean())
    assert acc > 0.9, acc
    # the samples live in the data range: few pixels beyond [-1, 1] by more than 0.2
    assert float((x.abs() > 1.2).double().mean()) < 0.01


def test_guidance_changes_the_output_and_costs_one_nfe_per_call():
    seeds = eval_seeds(6, start=2_000_000)
    plain, one, two = _model(), _model(1.0), _model(2.0)
    noise, cond = plain.noise(seeds), plain.cond_for(seeds)
    batches: list[int] = []
    hook = two.net.model.register_forward_hook(
        lambda m, args, kw, out: batches.append(args[0].shape[0]), with_kwargs=True
    )
    with torch.no_grad():
        x0 = fewstep.sample(plain, noise, "unipc@logsnr", nfe=5, cond=cond)
        x1 = fewstep.sample(one, noise, "unipc@logsnr", nfe=5, cond=cond)
        two.nfe = 0
        x2 = fewstep.sample(two, noise, "unipc@logsnr", nfe=5, cond=cond)
    hook.remove()
    assert torch.equal(x0, x1)  # w = 1 is the conditional model itself
    assert float((x2 - x0).abs().max()) > 0.1
    assert two.nfe == 5 and batches == [12] * 5  # cond and uncond halves in one batched call per NFE
