"""The latent space of the scenes pipelines: a small diffusers ``AutoencoderKL`` trained on the scenes data set.

Images (3, 32, 32) in [-1, 1] encode to latents (4, 8, 8) (three encoder levels: ``vae_scale_factor`` 4). The
recipe (:data:`RECIPE`) fully determines the weights: parameters initialised under ``torch.manual_seed(seed)`` in
a forked RNG; every batch and posterior sample drawn from one seeded generator. The loss per image is

    mean_pixels |D(z) - x|^p + kl_weight * KL(q(z | x) || N(0, I)) / pixels,   z ~ q(z | x),

with p = 2 (``recon`` "mse") or 1 ("l1"), trained on ``RECIPE["data"]``'s training-split scenes with AdamW
(warm-up, cosine decay, gradient clipping) and an EMA of the weights, which is the model kept. As Stable
Diffusion does, ``scaling_factor`` is 1 / the standard deviation of the trained model's latents (sampled from the
posterior, over ``scale_images`` training scenes); ``shift_factor`` is 0, so every family (SD, PixArt, DiT, SD3,
Flux) reads one latent convention: the network's latent is ``scaling_factor * z``.

Cache: ``$FEWSTEP_CACHE/zoo/scenes-vae-<recipe hash>/`` holds ``vae/`` (diffusers' ``config.json`` +
``diffusion_pytorch_model.safetensors``) and ``recipe.json`` (the recipe, the weights' sha256, what training
measured). A folder whose recipe hash, weights checksum or scaling factor does not match is trained again, never
used. Training writes a checkpoint beside it every ``save_every`` steps (atomically); an interrupted run resumes
from it and gives the weights an uninterrupted run gives.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ...errors import ModelSpecError
from ...io import atomic_dir, atomic_path, sha256_tensors
from ...training import ForeachAdamW, recipe_hash, recipe_lr, weights_dir

NAME = "scenes-vae"
IMAGE_SHAPE = (3, 32, 32)
LATENT_SHAPE = (4, 8, 8)
CHECKPOINT_SCHEMA = "fewstep.scenes-vae-checkpoint/1"
RECON_LOSSES = ("mse", "l1")

RECIPE: dict[str, Any] = {
    "version": 1,
    "data": {"split": "train", "n": 16384, "seed": 0},
    "arch": {
        "block_out_channels": [16, 32, 64],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "mid_attention": True,
    },
    "recon": "mse",  # the reconstruction loss: "mse" or "l1" (mean over pixels)
    "kl_weight": 1e-4,
    "seed": 0,
    "steps": 7000,
    "batch": 8,  # small batches, many steps: at equal time, 8 x 2800 reconstructed shapes better than 16 x 1400
    "lr": 2e-3,
    "warmup": 200,
    "weight_decay": 0.0,
    "ema": 0.995,
    "grad_clip": 1.0,
    "scale_images": 2048,
    "save_every": 500,
}
EXPECTED_SECONDS = 540  # RECIPE on one CPU thread (0.07 s a step); more on a busy machine
#: held-out scenes the reconstruction error is measured on (not part of the recipe: they do not change the weights)
EVAL: dict[str, Any] = {"split": "heldout", "n": 512, "seed": 1}


def vae_recipe(**overrides: Any) -> dict[str, Any]:
    """``RECIPE`` with top-level ``overrides`` (``arch`` and ``data`` are merged; None values are ignored)."""
    r = copy.deepcopy(RECIPE)
    for k, v in overrides.items():
        if v is None:
            continue
        if k not in r:
            raise ModelSpecError(f"unknown recipe field {k!r} for zoo:{NAME}; valid: {', '.join(sorted(r))}")
        r[k] = {**r[k], **v} if isinstance(r[k], dict) else v
    return r


# ----------------------------------------------------------------------------- model and data
def make_vae(recipe: dict[str, Any], scaling_factor: float = 1.0) -> Any:
    """A freshly initialised (global RNG) ``diffusers.AutoencoderKL`` of ``recipe``'s architecture."""
    from diffusers import AutoencoderKL

    a = recipe["arch"]
    levels = len(a["block_out_channels"])
    return AutoencoderKL(
        in_channels=IMAGE_SHAPE[0],
        out_channels=IMAGE_SHAPE[0],
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(a["block_out_channels"]),
        layers_per_block=int(a["layers_per_block"]),
        latent_channels=int(a["latent_channels"]),
        norm_num_groups=int(a["norm_num_groups"]),
        sample_size=IMAGE_SHAPE[1],
        mid_block_add_attention=bool(a["mid_attention"]),
        scaling_factor=float(scaling_factor),
        shift_factor=0.0,
    )


def scene_images(split: str, n: int, seed: int) -> Tensor:
    """Images (n, 3, 32, 32) in [-1, 1] of the scenes data set."""
    from .data import dataset

    return dataset(split, n, seed)[0]


# ----------------------------------------------------------------------------- training
@dataclass
class TrainResult:
    """The EMA weights, the mean loss per ``log_every`` steps, the seconds spent here, where the run started."""

    state: dict[str, Tensor]
    losses: list[float]
    seconds: float
    resumed_at: int = 0
    final_loss: float = field(default=float("nan"))


@dataclass
class _State:
    net: Any
    ema: Any
    opt: ForeachAdamW
    g: torch.Generator
    step: int = 0
    losses: list[float] = field(default_factory=list)
    acc: float = 0.0  # sum of the mse since the last logged mean


def loss_terms(vae: Any, x: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """(mean squared error, mean absolute error, KL per pixel), all scalars, of a batch x (B, 3, 32, 32)."""
    post = vae.encode(x).latent_dist
    err = vae.decode(post.sample(generator=g)).sample - x
    return torch.mean(err**2), torch.mean(err.abs()), torch.mean(post.kl()) / x[0].numel()


def train_vae(
    recipe: dict[str, Any], checkpoint: Path | None = None, log: bool = False, stop_after: int | None = None
) -> TrainResult:
    """Train the VAE of ``recipe`` on the CPU; returns its EMA weights (float32).

    ``checkpoint``: resume from it when it holds this recipe's state, and save to it every ``save_every`` steps.
    ``stop_after``: stop (with a checkpoint) after that many steps in total, as an interruption would.
    Deterministic for a given recipe and thread count, resumed or not; works inside ``torch.no_grad()``.
    """
    with torch.inference_mode(False), torch.enable_grad():
        return _train(recipe, checkpoint, log, stop_after)


def _train(recipe: dict[str, Any], checkpoint: Path | None, log: bool, stop_after: int | None) -> TrainResult:
    if recipe["recon"] not in RECON_LOSSES:
        raise ModelSpecError(f"zoo:{NAME}: unknown reconstruction loss {recipe['recon']!r}; valid: mse, l1")
    d = recipe["data"]
    x_all = scene_images(d["split"], int(d["n"]), int(d["seed"]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(recipe["seed"]))
        net = make_vae(recipe)
    net.train()
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    params, ema_params = list(net.parameters()), list(ema.parameters())
    st = _State(net, ema, ForeachAdamW(params, recipe["lr"], recipe["weight_decay"]), torch.Generator())
    st.g.manual_seed(int(recipe["seed"]) + 1)
    start = st.step = _resume(checkpoint, st, recipe)
    if start and log:
        print(f"  resuming zoo:{NAME} at step {start}/{recipe['steps']} from {checkpoint}", file=sys.stderr)
    steps, bs, clip, kl_w = int(recipe["steps"]), int(recipe["batch"]), float(recipe["grad_clip"]), recipe["kl_weight"]
    end = steps if stop_after is None else min(steps, int(stop_after))
    every, save_every = 50, int(recipe["save_every"])
    t0 = time.perf_counter()
    while st.step < end:
        x = x_all[torch.randperm(x_all.shape[0], generator=st.g)[:bs]]
        mse, l1, kl = loss_terms(net, x, st.g)
        loss = (mse if recipe["recon"] == "mse" else l1) + float(kl_w) * kl
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))
            if clip and norm > clip:
                grads = torch._foreach_mul(grads, clip / norm)
            st.opt.step(grads, recipe_lr(recipe, st.step))
            decay = min(float(recipe["ema"]), (1.0 + st.step) / (10.0 + st.step))
            torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        st.step += 1
        st.acc += float(mse.detach())
        if st.step % every == 0:
            st.losses.append(st.acc / every)
            st.acc = 0.0
            if log:
                rate = (st.step - start) / max(time.perf_counter() - t0, 1e-9)
                print(
                    f"  step {st.step}/{steps} mse {st.losses[-1]:.5f} kl/pixel {float(kl.detach()):.4f} "
                    f"({rate:.2f} steps/s, {(steps - st.step) / max(rate, 1e-9) / 60:.1f} min left)",
                    file=sys.stderr,
                )
        if checkpoint is not None and st.step < steps and (st.step % save_every == 0 or st.step == end):
            _save_checkpoint(checkpoint, st, recipe)
    state = {k: v.detach().clone().contiguous() for k, v in ema.state_dict().items()}
    final = st.losses[-1] if st.losses else float("nan")
    return TrainResult(state, st.losses, time.perf_counter() - t0, start, final)


def _save_checkpoint(path: Path, st: _State, recipe: dict[str, Any]) -> None:
    """The whole training state, written atomically (the previous checkpoint stays until the rename)."""
    doc = {
        "schema": CHECKPOINT_SCHEMA,
        "recipe_hash": recipe_hash(recipe),
        "step": st.step,
        "net": st.net.state_dict(),
        "ema": st.ema.state_dict(),
        "m": st.opt.m,
        "v": st.opt.v,
        "t": st.opt.t,
        "g": st.g.get_state(),
        "losses": st.losses,
        "acc": st.acc,
    }
    with atomic_path(path) as tmp:
        torch.save(doc, tmp)


def _resume(path: Path | None, st: _State, recipe: dict[str, Any]) -> int:
    """Restore ``st`` from the checkpoint at ``path`` if it holds this recipe's state; the step reached (0: none)."""
    if path is None or not path.is_file():
        return 0
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
        if doc.get("schema") != CHECKPOINT_SCHEMA or doc.get("recipe_hash") != recipe_hash(recipe):
            return 0
        step = int(doc["step"])
        shapes = [p.shape for p in st.opt.m]
        if not 0 < step < int(recipe["steps"]) or [p.shape for p in doc["m"]] != shapes:
            return 0
        if [p.shape for p in doc["v"]] != shapes:
            return 0
        net, ema = copy.deepcopy(st.net.state_dict()), copy.deepcopy(st.ema.state_dict())
        try:
            st.net.load_state_dict(doc["net"])
            st.ema.load_state_dict(doc["ema"])
            st.g.set_state(doc["g"])
        except (RuntimeError, TypeError, ValueError):
            st.net.load_state_dict(net)
            st.ema.load_state_dict(ema)
            return 0
        st.opt.m, st.opt.v = [t.clone() for t in doc["m"]], [t.clone() for t in doc["v"]]
        st.opt.t, st.losses, st.acc = int(doc["t"]), [float(v) for v in doc["losses"]], float(doc["acc"])
    except Exception as e:  # noqa: BLE001 - a damaged or foreign checkpoint: start over
        print(
            f"warning: zoo:{NAME} checkpoint {path} is unreadable ({type(e).__name__}); starting over", file=sys.stderr
        )
        return 0
    return step


# ----------------------------------------------------------------------------- measuring
@torch.no_grad()
def encode_latents(vae: Any, images: Tensor, seed: int | None = 0, batch: int = 256) -> Tensor:
    """Network latents (N, 4, 8, 8) of ``images`` (N, 3, 32, 32): ``scaling_factor * (z - shift_factor)`` with z
    drawn from the posterior with generator ``seed`` (None: the posterior mean)."""
    g = None if seed is None else torch.Generator().manual_seed(int(seed))
    out = []
    for k in range(0, images.shape[0], batch):
        post = vae.encode(images[k : k + batch]).latent_dist
        out.append(post.mode() if g is None else post.sample(generator=g))
    z = torch.cat(out) if out else torch.zeros(0, *LATENT_SHAPE)
    cfg = vae.config
    return (z - float(cfg.shift_factor or 0.0)) * float(cfg.scaling_factor)


@torch.no_grad()
def decode_latents(vae: Any, latents: Tensor, batch: int = 256) -> Tensor:
    """Images (N, 3, 32, 32) of network latents (N, 4, 8, 8), as the pipelines decode them (not clamped)."""
    cfg = vae.config
    z = latents / float(cfg.scaling_factor) + float(cfg.shift_factor or 0.0)
    parts = [vae.decode(z[k : k + batch]).sample for k in range(0, z.shape[0], batch)]
    return torch.cat(parts) if parts else torch.zeros(0, *IMAGE_SHAPE)


def reconstruction(vae: Any, images: Tensor) -> dict[str, float]:
    """RMSE and PSNR (dB, peak-to-peak 2 for [-1, 1] images) of decoding the posterior mean of ``images``."""
    rec = decode_latents(vae, encode_latents(vae, images, seed=None)).clamp(-1.0, 1.0)
    mse = float(torch.mean((rec - images) ** 2))
    return {"rmse": math.sqrt(mse), "psnr": 10.0 * math.log10(4.0 / max(mse, 1e-20))}


def latent_moments(vae: Any, images: Tensor, seed: int) -> tuple[float, float]:
    """(mean, std) over every element of the unscaled posterior samples of ``images``."""
    cfg = vae.config
    z = encode_latents(vae, images, seed) / float(cfg.scaling_factor) + float(cfg.shift_factor or 0.0)
    return float(z.mean()), float(z.std())


# ----------------------------------------------------------------------------- the cached folder
#: the trained VAE of the default recipe, shipped with the package (used when it verifies for the recipe asked)
SHIPPED = Path(__file__).resolve().parent.parent / "weights" / NAME


def _cache_folder(recipe: dict[str, Any]) -> Path:
    return weights_dir("zoo") / f"{NAME}-{recipe_hash(recipe)}"


def checkpoint_path(recipe: dict[str, Any]) -> Path:
    """Where training ``recipe`` keeps its resumable checkpoint."""
    return weights_dir("zoo") / f".{NAME}-{recipe_hash(recipe)}.checkpoint.pt"


def verify_folder(folder: Path, recipe: dict[str, Any]) -> str | None:
    """None if ``folder`` holds ``recipe``'s trained VAE intact; else what is wrong (one short phrase)."""
    try:
        doc = json.loads((folder / "recipe.json").read_text())
        cfg = json.loads((folder / "vae" / "config.json").read_text())
    except (OSError, ValueError) as e:
        return f"unreadable recipe.json or vae/config.json ({type(e).__name__})"
    if not isinstance(doc, dict) or doc.get("recipe_hash") != recipe_hash(recipe):
        return "made from another recipe"
    scale = cfg.get("scaling_factor") if isinstance(cfg, dict) else None
    if (
        not isinstance(scale, (int, float))
        or not math.isfinite(scale)
        or scale <= 0
        or scale != doc.get("scaling_factor")
    ):
        return "its scaling factor differs from the one training measured"
    try:
        from safetensors.torch import load_file

        state = load_file(str(folder / "vae" / "diffusion_pytorch_model.safetensors"))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
        return f"unreadable weights ({type(e).__name__})"
    if sha256_tensors(state) != doc.get("weights_sha256"):
        return "its weights do not match their checksum"
    return None


def _write_folder(folder: Path, result: TrainResult, recipe: dict[str, Any]) -> None:
    """Measure the trained weights (latent scale, held-out reconstruction) and write the cache folder atomically."""
    vae = _model(result.state, recipe, 1.0)
    d = recipe["data"]
    mean, std = latent_moments(
        vae, scene_images(d["split"], int(recipe["scale_images"]), int(d["seed"])), recipe["seed"] + 2
    )
    scale = 1.0 / std
    vae.register_to_config(scaling_factor=scale)
    rec = reconstruction(vae, scene_images(EVAL["split"], EVAL["n"], EVAL["seed"]))
    info = {
        "recipe_hash": recipe_hash(recipe),
        "recipe": recipe,
        "weights_sha256": sha256_tensors(result.state),
        "scaling_factor": scale,
        "shift_factor": 0.0,
        "latent_mean": mean,
        "latent_std": std,
        "parameters": sum(p.numel() for p in vae.parameters()),
        "train_seconds": round(result.seconds, 1),
        "resumed_at": result.resumed_at,
        "final_mse": result.final_loss,
        "losses": result.losses,
        "heldout": {**EVAL, **rec},
        "torch": torch.__version__,
    }
    with atomic_dir(folder) as tmp:
        vae.save_pretrained(tmp / "vae", safe_serialization=True)
        (tmp / "recipe.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")


def _model(state: dict[str, Tensor], recipe: dict[str, Any], scaling_factor: float) -> Any:
    with torch.random.fork_rng(devices=[]):
        vae = make_vae(recipe, scaling_factor)
    vae.load_state_dict(state)
    return vae.eval().requires_grad_(False)


def trained_folder(recipe: dict[str, Any] | None = None, retrain: bool = False, log: bool = True) -> Path:
    """The folder of ``recipe``'s trained VAE (default :data:`RECIPE`), verified: the shipped one, the cache's, or
    trained now into the cache if missing, damaged or ``retrain``. Holds ``vae/`` and ``recipe.json``."""
    recipe = RECIPE if recipe is None else recipe
    if not retrain and SHIPPED.is_dir() and verify_folder(SHIPPED, recipe) is None:
        return SHIPPED
    folder = _cache_folder(recipe)
    if not retrain:
        problem = verify_folder(folder, recipe) if folder.exists() else "missing"
        if problem is None:
            return folder
        if problem != "missing":
            print(f"warning: cached zoo:{NAME} at {folder}: {problem}; training it again", file=sys.stderr)
    ckpt = checkpoint_path(recipe)
    if log:
        minutes = EXPECTED_SECONDS * recipe["steps"] / RECIPE["steps"] / 60.0
        print(f"training zoo:{NAME} (about {minutes:.0f} min on the CPU) into {folder}...", file=sys.stderr)
    result = train_vae(recipe, checkpoint=ckpt, log=log)
    _write_folder(folder, result, recipe)
    ckpt.unlink(missing_ok=True)
    if log:
        print(f"trained zoo:{NAME} in {result.seconds:.0f} s", file=sys.stderr)
    return folder


def load_vae(recipe: dict[str, Any] | None = None, retrain: bool = False) -> Any:
    """The trained ``AutoencoderKL`` (frozen, eval), from the cache or trained now."""
    from diffusers import AutoencoderKL

    folder = trained_folder(recipe, retrain)
    return AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True).eval().requires_grad_(False)


def folder_info(recipe: dict[str, Any] | None = None) -> dict[str, Any]:
    """What training measured (``recipe.json`` of the cache folder; trains first if needed)."""
    info: dict[str, Any] = json.loads((trained_folder(recipe) / "recipe.json").read_text())
    return info


def write_vae(folder: str | os.PathLike, recipe: dict[str, Any] | None = None) -> Path:
    """Write the trained VAE as ``folder/vae`` (diffusers' layout, atomically); returns that path."""
    src = trained_folder(recipe) / "vae"
    dst = Path(folder) / "vae"
    with atomic_dir(dst) as tmp:
        for f in sorted(src.iterdir()):
            shutil.copyfile(f, tmp / f.name)
    return dst
