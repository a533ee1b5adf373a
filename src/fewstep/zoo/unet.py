"""``zoo:digits-unet``: a small class-conditional diffusers ``UNet2DModel`` trained on the digits.

The data are scikit-learn's 1797 8x8 digits in [-1, 1], upsampled bilinearly to 16x16 (shape
(1, 16, 16)). The network predicts eps on the DDPM linear-beta schedule (1000 steps; it gets the
fractional DDPM index, as :class:`~fewstep.schedules.VPDiscrete` feeds it) and takes
``class_labels`` 0..9, or 10: the null class, used for 10% of the training labels so that
classifier-free guidance works.

Like :mod:`.train`, the recipe (``RECIPE``) fully determines the weights: parameters are
initialised under ``torch.manual_seed(seed)`` in a forked RNG and every batch, label drop, time
and noise comes from one seeded generator. The trained model is saved as a diffusers pipeline
folder (``DDPMPipeline.save_pretrained``) plus ``fewstep.json`` (sample shape and classes, read
by the adapter) and ``recipe.json`` (recipe hash, full recipe, training time, torch version).
The builder uses the folder committed under ``weights/digits-unet`` when its recipe hash is the
current recipe's, else ``$FEWSTEP_CACHE/zoo/digits-unet-<hash>/`` (trained on first use, written
atomically), and loads it through :func:`fewstep.integrations.diffusers_in.load_diffusers`.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..denoiser import Denoiser
from ..errors import ModelSpecError
from ..io import atomic_dir
from ..schedules import VPDiscrete, schedule_from_config
from ..training import ForeachAdamW, recipe_hash, weights_dir

NAME = "digits-unet"
SHAPE = (1, 16, 16)
NUM_CLASSES = 10
NULL_CLASS = 10
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights" / NAME

RECIPE: dict[str, Any] = {
    "version": 1,
    "data": "sklearn-digits-1797/x/8-1/bilinear-16",
    "arch": {
        "block_out_channels": [32, 48, 48],
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "mid_attention": True,  # the one attention block: UNet mid block, 4x4 tokens
        "attention_head_dim": 16,
    },
    "schedule": VPDiscrete("linear").config(),
    "objective": "eps",
    "null_class": NULL_CLASS,
    "label_dropout": 0.1,
    "seed": 0,
    "steps": 3000,
    "batch": 64,
    "lr": 2e-3,
    "warmup": 100,
    "weight_decay": 0.0,
    "ema": 0.999,
    "grad_clip": 1.0,
}
EXPECTED_SECONDS = 600  # RECIPE on the CPU: 720 s measured on one thread of a busy 2-core machine


def unet_recipe(**overrides: Any) -> dict[str, Any]:
    """``RECIPE`` with top-level ``overrides`` (``arch`` is merged; None values are ignored)."""
    r = copy.deepcopy(RECIPE)
    for k, v in overrides.items():
        if v is None:
            continue
        if k not in r:
            raise ModelSpecError(f"unknown recipe field {k!r} for zoo:{NAME}; valid: {', '.join(sorted(r))}")
        r[k] = {**r[k], **v} if k == "arch" else v
    return r


# ----------------------------------------------------------------------------- data and model
def digits16(dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """(images (1797, 1, 16, 16) in [-1, 1], labels (1797,)): the digits upsampled bilinearly."""
    from .digits import digits_data

    x, y = digits_data(torch.float32)
    x16 = torch.nn.functional.interpolate(x, size=SHAPE[1:], mode="bilinear", align_corners=False)
    return x16.clamp(-1.0, 1.0).to(dtype), y


def make_unet(recipe: dict[str, Any]) -> Any:
    """A freshly initialised (global RNG) ``diffusers.UNet2DModel`` for ``recipe``."""
    from diffusers import UNet2DModel

    a = recipe["arch"]
    levels = len(a["block_out_channels"])
    return UNet2DModel(
        sample_size=SHAPE[1],
        in_channels=SHAPE[0],
        out_channels=SHAPE[0],
        block_out_channels=tuple(a["block_out_channels"]),
        layers_per_block=a["layers_per_block"],
        down_block_types=("DownBlock2D",) * levels,
        up_block_types=("UpBlock2D",) * levels,
        add_attention=bool(a["mid_attention"]),
        attention_head_dim=a["attention_head_dim"],
        norm_num_groups=a["norm_num_groups"],
        num_class_embeds=NUM_CLASSES + 1,
    )


def ddpm_scheduler(recipe: dict[str, Any]) -> Any:
    """The ``diffusers.DDPMScheduler`` of ``recipe``'s schedule (eps prediction)."""
    from diffusers import DDPMScheduler

    s = recipe["schedule"]
    return DDPMScheduler(
        num_train_timesteps=s["num_train_timesteps"],
        beta_schedule=s["beta_schedule"],
        beta_start=s["beta_start"],
        beta_end=s["beta_end"],
        prediction_type="epsilon",
        clip_sample=False,
    )


# ----------------------------------------------------------------------------- training
def train_unet(recipe: dict[str, Any], log: bool = False) -> dict[str, Tensor]:
    """Train the UNet of ``recipe`` on the CPU; returns its EMA state dict (float32).

    Deterministic for a given recipe and thread count; works inside ``torch.no_grad()``.
    """
    with torch.inference_mode(False), torch.enable_grad():
        return _train(recipe, log)


def _batches(n: int, batch: int, g: torch.Generator) -> Iterator[Tensor]:
    """Endless mini-batches of row indices (batch,): a new permutation of range(n) when one runs short."""
    perm, pos = torch.randperm(n, generator=g), 0
    while True:
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=g), 0
        yield perm[pos : pos + batch]
        pos += batch


def _train(recipe: dict[str, Any], log: bool) -> dict[str, Tensor]:
    x_all, y_all = digits16()
    n = x_all.shape[0]
    sched = schedule_from_config(recipe["schedule"])
    if not isinstance(sched, VPDiscrete):
        raise ModelSpecError(
            f"zoo:{NAME} trains on a DDPM index and needs a VPDiscrete schedule; got {sched.describe()}"
        )
    T = sched.T
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(recipe["seed"]))
        net = make_unet(recipe)
    ema = copy.deepcopy(net).requires_grad_(False)
    params, ema_params = list(net.parameters()), list(ema.parameters())
    opt = ForeachAdamW(params, recipe["lr"], recipe["weight_decay"])
    g = torch.Generator().manual_seed(int(recipe["seed"]) + 1)
    steps, bs, warm = int(recipe["steps"]), int(recipe["batch"]), max(1, int(recipe["warmup"]))
    clip = float(recipe["grad_clip"])
    batches = _batches(n, bs, g)
    net.train()
    t0 = time.perf_counter()
    for step, idx in zip(range(steps), batches, strict=False):  # batches is endless: range(steps) ends the loop
        x0, labels = x_all[idx], y_all[idx].clone()
        labels[torch.rand(bs, generator=g) < float(recipe["label_dropout"])] = int(recipe["null_class"])
        eps = torch.randn(x0.shape, generator=g)
        k = torch.rand(bs, generator=g, dtype=torch.float64) * (T - 1)  # fractional DDPM index
        t = (k + 1.0) / T
        a, s = sched.alpha(t).float()[:, None, None, None], sched.sigma(t).float()[:, None, None, None]
        out = net(a * x0 + s * eps, k.float(), class_labels=labels).sample
        loss = torch.mean((out - eps) ** 2)
        grads = torch.autograd.grad(loss, params)
        lr = recipe["lr"] * min(1.0, (step + 1) / warm) * 0.5 * (1.0 + math.cos(math.pi * step / steps))
        with torch.no_grad():
            norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))
            if clip and norm > clip:
                grads = torch._foreach_mul(grads, clip / norm)
            opt.step(grads, lr)
            torch._foreach_lerp_(ema_params, params, 1.0 - min(float(recipe["ema"]), (1.0 + step) / (10.0 + step)))
        if log and (step + 1) % 250 == 0:
            print(
                f"  step {step + 1}/{steps} loss {loss.item():.4f} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr
            )
    return {k: v.detach().clone().contiguous() for k, v in ema.state_dict().items()}


# ----------------------------------------------------------------------------- pipeline folders
def save_pipeline(
    state: dict[str, Tensor], recipe: dict[str, Any], path: str | os.PathLike, seconds: float | None = None
) -> Path:
    """Write ``state`` as a DDPMPipeline folder at ``path`` (atomically: built beside it, then renamed).

    The folder holds ``model_index.json``, ``unet/``, ``scheduler/`` (diffusers' layout, safetensors
    weights), ``fewstep.json`` (what the configs do not say) and ``recipe.json`` (provenance).
    """
    from diffusers import DDPMPipeline

    path = Path(path)
    with atomic_dir(path) as tmp:
        with torch.random.fork_rng(devices=[]):
            net = make_unet(recipe)
        net.load_state_dict(state)
        DDPMPipeline(unet=net, scheduler=ddpm_scheduler(recipe)).save_pretrained(tmp, safe_serialization=True)
        info = {
            "sample_shape": list(SHAPE),
            "num_classes": NUM_CLASSES,
            "null_class": NULL_CLASS,
            "class_sampler": "uniform",
        }
        (tmp / "fewstep.json").write_text(json.dumps(info) + "\n")
        prov = {
            "recipe_hash": recipe_hash(recipe),
            "recipe": recipe,
            "torch": torch.__version__,
            "train_seconds": None if seconds is None else round(seconds, 1),
        }
        (tmp / "recipe.json").write_text(json.dumps(prov, indent=1, sort_keys=True) + "\n")
    return path


def folder_recipe_hash(path: str | os.PathLike) -> str | None:
    """The recipe hash recorded in ``path/recipe.json`` (None if missing or unreadable)."""
    try:
        h = json.loads((Path(path) / "recipe.json").read_text()).get("recipe_hash")
    except (OSError, ValueError, AttributeError):
        return None
    return h if isinstance(h, str) else None


_TRAINED: dict[str, Path] = {}  # recipe hash -> folder trained by this process


def trained_pipeline(recipe: dict[str, Any], retrain: bool = False) -> Path:
    """The pipeline folder for ``recipe``: committed, cached, or trained now (and cached).

    The committed folder ``WEIGHTS_DIR`` is used when its recipe hash is ``recipe``'s; otherwise
    ``$FEWSTEP_CACHE/zoo/digits-unet-<hash>``. ``retrain=True`` always trains (into the cache).
    A read-only cache falls back to a temporary folder kept for this process.
    """
    h = recipe_hash(recipe)
    if not retrain:
        if folder_recipe_hash(WEIGHTS_DIR) == h:
            return WEIGHTS_DIR
        if h in _TRAINED and folder_recipe_hash(_TRAINED[h]) == h:
            return _TRAINED[h]
    path = weights_dir("zoo") / f"{NAME}-{h}"
    if not retrain and folder_recipe_hash(path) == h:
        return path
    minutes = EXPECTED_SECONDS * recipe["steps"] / RECIPE["steps"] / 60.0
    print(
        f"training zoo:{NAME} ({'retrain' if retrain else 'first use'}; about {minutes:.0f} min on "
        f"two CPU cores) into {path}...",
        file=sys.stderr,
    )
    start = time.perf_counter()
    state = train_unet(recipe)
    seconds = time.perf_counter() - start
    try:
        _TRAINED[h] = save_pipeline(state, recipe, path, seconds)
    except OSError as e:  # read-only cache: a temporary folder for this process
        _TRAINED[h] = save_pipeline(state, recipe, Path(tempfile.mkdtemp(prefix=f"fewstep-{NAME}-")) / h, seconds)
        print(f"zoo cache not writable ({e.strerror or e}): using {_TRAINED[h]}", file=sys.stderr)
    print(f"trained zoo:{NAME} in {seconds:.0f} s", file=sys.stderr)
    return _TRAINED[h]


# ----------------------------------------------------------------------------- builder
def build_digits_unet(guidance_scale: float | None = None, retrain: bool = False) -> Denoiser:
    """zoo:digits-unet: the class-conditional UNet, through fewstep's diffusers adapter.

    Samples have shape (1, 16, 16); every seed gets its own class label 0..9 (``cond_for``).
    ``guidance_scale`` w turns on classifier-free guidance against the null class 10.
    """
    w = guidance_scale
    if w is not None and (isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)):
        raise ModelSpecError(f"zoo:{NAME}: guidance_scale must be a finite number or None; got {w!r}")
    if importlib.util.find_spec("diffusers") is None:
        raise ModelSpecError(f"zoo:{NAME} needs diffusers: pip install 'fewstep[diffusers]'")
    from ..integrations.load import load_diffusers

    recipe = unet_recipe()
    folder = trained_pipeline(recipe, retrain=bool(retrain))
    den = load_diffusers(folder, device="cpu", guidance_scale=guidance_scale, name=f"zoo:{NAME}")
    # the adapter's identity holds no path: committed and cached copies share one fingerprint
    den.identity.update(zoo=NAME, recipe_hash=recipe_hash(recipe))
    return den
