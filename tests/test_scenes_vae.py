"""The scenes VAE: its recipe gives the same weights twice (and after an interruption), its folder loads with
diffusers unmodified, and a damaged cached folder is trained again, never used. Tiny recipes keep this fast."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("diffusers")

from fewstep.io import sha256_tensors  # noqa: E402 - after the offline switch
from fewstep.training import recipe_hash  # noqa: E402
from fewstep.zoo.scenes import vae as V  # noqa: E402

TINY = {
    "steps": 6,
    "batch": 4,
    "data": {"n": 64},
    "scale_images": 32,
    "save_every": 2,
    "arch": {"block_out_channels": [8, 8, 16], "norm_num_groups": 4},
}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_recipe_reproduces_its_weights_and_resumes_exactly(tmp_path):
    r = V.vae_recipe(**TINY)
    first, second = V.train_vae(r), V.train_vae(r)
    assert _same(first.state, second.state)
    assert not _same(first.state, V.train_vae(V.vae_recipe(**{**TINY, "seed": 1})).state)
    # interrupted after 3 steps (checkpoint at 2 and 3), then resumed: the weights of the uninterrupted run
    ckpt = tmp_path / "vae.ckpt"
    part = V.train_vae(r, checkpoint=ckpt, stop_after=3)
    assert ckpt.is_file() and part.resumed_at == 0 and not _same(part.state, first.state)
    rest = V.train_vae(r, checkpoint=ckpt)
    assert rest.resumed_at == 3 and _same(rest.state, first.state)
    # a checkpoint of another recipe is not resumed from
    other = V.vae_recipe(**{**TINY, "lr": 5e-4})
    assert V.train_vae(other, checkpoint=ckpt, stop_after=1).resumed_at == 0


def test_damaged_checkpoint_starts_over(tmp_path, capsys):
    r = V.vae_recipe(**TINY)
    ckpt = tmp_path / "vae.ckpt"
    ckpt.write_bytes(b"not a checkpoint")
    out = V.train_vae(r, checkpoint=ckpt)
    assert out.resumed_at == 0 and _same(out.state, V.train_vae(r).state)
    assert "checkpoint" in capsys.readouterr().err


def test_folder_loads_with_diffusers_and_round_trips(cache, tmp_path):
    from diffusers import AutoencoderKL

    r = V.vae_recipe(**TINY)
    dst = V.write_vae(tmp_path / "pipe", r)
    assert dst == tmp_path / "pipe" / "vae"
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    vae = AutoencoderKL.from_pretrained(dst, local_files_only=True)
    info = json.loads((V.trained_folder(r) / "recipe.json").read_text())
    assert info["recipe_hash"] == recipe_hash(r)
    # the scaling factor is 1 / the std of the trained latents, as SD sets it
    assert vae.config.scaling_factor == pytest.approx(1.0 / info["latent_std"], rel=1e-12)
    assert vae.config.shift_factor == 0.0
    images = V.scene_images("heldout", 8, seed=3)
    z = V.encode_latents(vae, images, seed=0)
    assert z.shape == (8, *V.LATENT_SHAPE)
    x = V.decode_latents(vae, z)
    assert x.shape == (8, *V.IMAGE_SHAPE) and torch.isfinite(x).all()
    # the folder holds the trained weights: decoding matches the in-memory model's
    state = V.train_vae(r).state
    mem = V._model(state, r, vae.config.scaling_factor)
    assert torch.allclose(V.decode_latents(mem, z), x, atol=1e-5)


def test_interrupted_first_use_resumes_from_its_checkpoint(cache):
    r = V.vae_recipe(**TINY)
    V.train_vae(r, checkpoint=V.checkpoint_path(r), stop_after=3)  # a first use killed after step 3
    folder = V.trained_folder(r, log=False)
    info = json.loads((folder / "recipe.json").read_text())
    assert info["resumed_at"] == 3
    assert info["weights_sha256"] == sha256_tensors(V.train_vae(r).state)  # as if never interrupted
    assert not V.checkpoint_path(r).exists()


def test_damaged_cached_weights_are_retrained_not_trusted(cache, capsys):
    r = V.vae_recipe(**TINY)
    folder = V.trained_folder(r, log=False)
    good = (folder / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert V.verify_folder(folder, r) is None
    # flip bytes inside the weights (the header stays readable): the checksum catches it
    bad = bytearray(good)
    bad[-64:] = bytes(64)
    (folder / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(bytes(bad))
    assert V.verify_folder(folder, r) == "its weights do not match their checksum"
    again = V.trained_folder(r, log=False)
    err = capsys.readouterr().err
    assert "warning: cached zoo:scenes-vae" in err and "checksum" in err and "training it again" in err
    assert again == folder and V.verify_folder(folder, r) is None
    assert (folder / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == good
    # a truncated file, an edited scaling factor, another recipe's folder: each named, none used
    (folder / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(good[:100])
    assert V.verify_folder(folder, r).startswith("unreadable weights")
    V.trained_folder(r, log=False)
    cfg = json.loads((folder / "vae" / "config.json").read_text())
    (folder / "vae" / "config.json").write_text(json.dumps({**cfg, "scaling_factor": 1.0}))
    assert "scaling factor" in V.verify_folder(folder, r)
    assert V.verify_folder(folder, V.vae_recipe(**{**TINY, "steps": 5})) == "made from another recipe"
    assert not list(folder.parent.glob(".*"))  # no temporaries or checkpoints left behind


def test_bad_recipes_are_one_line():
    from fewstep.errors import ModelSpecError

    with pytest.raises(ModelSpecError, match="unknown recipe field 'stesp' for zoo:scenes-vae; valid: "):
        V.vae_recipe(stesp=3)
    with pytest.raises(ModelSpecError, match="unknown reconstruction loss 'l3'; valid: mse, l1"):
        V.train_vae(V.vae_recipe(**{**TINY, "recon": "l3"}))


def test_the_shipped_vae_is_the_current_recipe(tmp_path, monkeypatch):
    """The package's VAE verifies for the default recipe, so a fresh cache loads it without training."""
    from fewstep.zoo.scenes import vae as V

    assert V.verify_folder(V.SHIPPED, V.RECIPE) is None
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path))
    monkeypatch.setattr(V, "train_vae", lambda *a, **k: pytest.fail("trained instead of using the package's VAE"))
    assert V.trained_folder(log=False) == V.SHIPPED
    info = V.folder_info()
    assert info["heldout"]["psnr"] > 28.0 and abs(info["scaling_factor"] * info["latent_std"] - 1.0) < 1e-9
