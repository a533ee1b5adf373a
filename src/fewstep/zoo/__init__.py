"""Built-in models: analytic problems with exact denoisers and small networks trained on digits.

    >>> from fewstep import zoo
    >>> den = zoo.load("gmm2d")                 # a Denoiser
    >>> den = zoo.load("gmm", guidance_scale=2.0)  # class-conditional, guided

Names (``NAMES``):

* ``gaussian``: x0 ~ N(mu, diag(c^2)), d = 16, exact eps prediction on ``VPLinear()``;
  ``den.exact_solution(x_T)`` is the exact probability-flow ODE map from t_max to 0
  (see :func:`fewstep.zoo.analytic.gaussian_exact_solution`), ``den.log_prob(x0)``.
* ``gmm2d``: 8 isotropic Gaussians on a ring in 2-D; ``gmm``: 10 Gaussians in 32-D. Exact
  x0 prediction on ``VPLinear()``; ``class_labels`` k picks component k, -1 the mixture;
  ``den.log_prob(x0)``. Conditional sampling (per-seed labels through ``cond_for``) when
  ``guidance_scale`` is given or ``conditional=True``.
* ``digits-empirical``: the exact denoiser of scikit-learn's 1797 8x8 digits in [-1, 1]
  (x0 prediction, ``VPLinear()``), shape (1, 8, 8); ``den.data`` holds the training images.
* ``digits-eps``: an MLP trained with eps prediction on ``VPDiscrete("linear")`` (1000 DDPM
  steps, the network gets the DDPM index); ``digits-flow``: the same MLP trained with
  rectified-flow velocity on ``Flow()``. Trained on first use (deterministic, about 40 s on
  two CPU cores) and cached under ``$FEWSTEP_CACHE/zoo`` (default ``~/.cache/fewstep/zoo``).
  Extra kwargs: ``retrain=True`` forces training, ``steps=N`` trains a shorter recipe.
* ``digits-unet``: a class-conditional diffusers ``UNet2DModel`` (eps, ``VPDiscrete("linear")``),
  samples (1, 16, 16) (the digits upsampled), per-seed labels 0..9, ``guidance_scale=`` for
  classifier-free guidance (null class 10). Loaded through the diffusers adapter from weights that
  ship with the package (recipe in :mod:`.unet`; ``retrain=True`` trains it, ~8-12 min on 2 cores).

Every Denoiser has ``name`` ("zoo:NAME"), ``sample_shape`` and ``identity`` (the zoo name and
its parameters, part of the fingerprint). ``INFO`` says what each model is without building it
(``fewstep zoo`` lists it): :func:`describe` adds whether trained weights are already cached.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..denoiser import Denoiser
from ..errors import ModelSpecError
from .analytic import build_gaussian, build_gmm, build_gmm2d, gaussian_exact_solution
from .digits import build_digits_empirical, digits_data
from .unet import build_digits_unet

__all__ = ["NAMES", "INFO", "ZooInfo", "describe", "load", "gaussian_exact_solution", "digits_data"]


def _build_trained(name: str) -> Callable[..., Denoiser]:
    def build(retrain: bool = False, steps: int | None = None, seed: int | None = None) -> Denoiser:
        from .train import make_net, recipe_for, recipe_hash, trained_state

        recipe = recipe_for(name, steps=steps, seed=seed)
        net, sched = make_net(recipe)
        net.load_state_dict(trained_state(name, recipe, retrain=bool(retrain)))
        net.eval().requires_grad_(False)
        pred = "eps" if recipe["objective"] == "eps" else "velocity"
        ident = {"zoo": name, "recipe_hash": recipe_hash(recipe)}
        if steps is not None or seed is not None:
            ident.update(steps=recipe["steps"], seed=recipe["seed"])
        return Denoiser(net, sched, prediction=pred, sample_shape=(1, 8, 8), name=f"zoo:{name}", identity=ident)

    build.__name__ = f"build_{name.replace('-', '_')}"
    return build


def _build_scenes(family: str) -> Callable[..., Denoiser]:
    def build(
        conditions: Any = None,
        device: str | torch.device = "cpu",
        dtype: Any = None,
        height: int | None = None,
        width: int | None = None,
        retrain: bool = False,
    ) -> Denoiser:
        from .scenes.models import build_scenes

        return build_scenes(family, conditions, device, dtype, height, width, retrain)

    build.__name__ = f"build_scenes_{family}"
    return build


_BUILDERS: dict[str, Callable[..., Denoiser]] = {
    "gaussian": build_gaussian,
    "gmm2d": build_gmm2d,
    "gmm": build_gmm,
    "digits-empirical": build_digits_empirical,
    "digits-eps": _build_trained("digits-eps"),
    "digits-flow": _build_trained("digits-flow"),
    "digits-unet": build_digits_unet,
    "scenes-sd": _build_scenes("sd"),
    "scenes-sd3": _build_scenes("sd3"),
    "scenes-pixart": _build_scenes("pixart"),
    "scenes-dit": _build_scenes("dit"),
}
NAMES: tuple[str, ...] = tuple(_BUILDERS)
#: zoo models that are whole diffusers pipelines (they take prompts, classes, image size and dtype as pipelines do)
PIPELINES = ("scenes-sd", "scenes-sd3", "scenes-pixart", "scenes-dit")


@dataclass(frozen=True)
class ZooInfo:
    """What a zoo model is, known without building it (tests check it against the built models and recipes)."""

    kind: str  # analytic (closed-form denoiser), exact (the training set's own denoiser), trained (a network)
    network: str  # what computes the prediction
    prediction: str  # eps, x0 or velocity
    schedule: str  # the schedule's type (Schedule.config()["type"])
    sample_shape: tuple[int, ...]
    classes: int | None  # class labels 0..classes-1 each seed draws (None: unconditional)
    guidance: bool  # takes --guidance (classifier-free guidance)
    first_use: str  # what the first load costs
    first_use_seconds: float  # about how long (0: instant)
    summary: str
    family: str | None = None  # the diffusers pipeline family of a pipeline model (sd, sd3, pixart-sigma, dit)


_TRAINED_ON_FIRST_USE = ("trained on first use, ~40 s on 2 CPU cores, then cached", 40.0)
_SCENES_FIRST_USE = ("ships weights; the pipeline folder is assembled once (~10 s) and cached", 10.0)
INFO: dict[str, ZooInfo] = {
    "gaussian": ZooInfo(
        "analytic",
        "closed form",
        "eps",
        "vp_linear",
        (16,),
        None,
        False,
        "analytic, instant",
        0.0,
        "x0 ~ N(mu, diag(c^2)) with c from 0.05 to 2 (stiff); exact ODE solution and log-density",
    ),
    "gmm2d": ZooInfo(
        "analytic",
        "closed form",
        "x0",
        "vp_linear",
        (2,),
        8,
        True,
        "analytic, instant",
        0.0,
        "8 Gaussians on a ring in 2-D; log-density; class k picks component k",
    ),
    "gmm": ZooInfo(
        "analytic",
        "closed form",
        "x0",
        "vp_linear",
        (32,),
        10,
        True,
        "analytic, instant",
        0.0,
        "10 unequal Gaussians in 32-D; log-density; class k picks component k",
    ),
    "digits-empirical": ZooInfo(
        "exact",
        "the optimal denoiser of the 1797 training digits",
        "x0",
        "vp_linear",
        (1, 8, 8),
        10,
        True,
        "exact, a few seconds (reads scikit-learn's digits)",
        3.0,
        "8x8 digits in [-1, 1]; reproduces training images; class-conditional when guided",
    ),
    "digits-eps": ZooInfo(
        "trained",
        "MLP",
        "eps",
        "vp_discrete",
        (1, 8, 8),
        None,
        False,
        *_TRAINED_ON_FIRST_USE,
        "8x8 digits, DDPM (1000 steps, linear betas); the network gets the DDPM index",
    ),
    "digits-flow": ZooInfo(
        "trained",
        "MLP",
        "velocity",
        "flow",
        (1, 8, 8),
        None,
        False,
        *_TRAINED_ON_FIRST_USE,
        "8x8 digits, rectified flow",
    ),
    "digits-unet": ZooInfo(
        "trained",
        "diffusers UNet2DModel",
        "eps",
        "vp_discrete",
        (1, 16, 16),
        10,
        True,
        "ships weights, a few seconds (imports diffusers)",
        5.0,
        "16x16 digits, class-conditional, classifier-free guidance (null class 10)",
    ),
    "scenes-sd": ZooInfo(
        "trained",
        "diffusers UNet2DConditionModel in a StableDiffusionPipeline (CLIP text, scenes VAE)",
        "eps",
        "vp_discrete",
        (4, 8, 8),
        None,
        True,
        *_SCENES_FIRST_USE,
        "32x32 captioned scenes, text-to-image, scaled-linear DDPM, classifier-free guidance",
        "sd",
    ),
    "scenes-sd3": ZooInfo(
        "trained",
        "diffusers SD3Transformer2DModel in a StableDiffusion3Pipeline (CLIP x2 + T5, scenes VAE)",
        "velocity",
        "flow",
        (4, 8, 8),
        None,
        True,
        *_SCENES_FIRST_USE,
        "32x32 captioned scenes, text-to-image, rectified flow with shift 3, classifier-free guidance",
        "sd3",
    ),
    "scenes-pixart": ZooInfo(
        "trained",
        "diffusers PixArtTransformer2DModel in a PixArtSigmaPipeline (T5, scenes VAE)",
        "eps",
        "vp_discrete",
        (4, 8, 8),
        None,
        True,
        *_SCENES_FIRST_USE,
        "32x32 captioned scenes, text-to-image, linear-beta DDPM, learned sigma, classifier-free guidance",
        "pixart-sigma",
    ),
    "scenes-dit": ZooInfo(
        "trained",
        "diffusers DiTTransformer2DModel in a DiTPipeline (scenes VAE)",
        "eps",
        "vp_discrete",
        (4, 8, 8),
        24,
        True,
        *_SCENES_FIRST_USE,
        "32x32 single-object scenes, 24 classes (colour, shape), linear-beta DDPM, classifier-free guidance",
        "dit",
    ),
}


def _cached(name: str) -> bool | None:
    """Are a trained model's weights ready without training (None: the model has no weights)?"""
    if name in ("digits-eps", "digits-flow"):
        from .train import cache_path, recipe_for

        return cache_path(name, recipe_for(name)).is_file()
    if name == "digits-unet":
        from ..training import recipe_hash
        from .unet import WEIGHTS_DIR, folder_recipe_hash, unet_recipe

        return folder_recipe_hash(WEIGHTS_DIR) == recipe_hash(unet_recipe())
    if name in PIPELINES:
        from .scenes.models import folder_path

        return (folder_path(name.removeprefix("scenes-")) / "recipe.json").is_file()
    return None


def describe(name: str) -> dict[str, Any]:
    """``INFO[name]`` as a JSON-able dict with ``name`` ("zoo:NAME") and ``cached`` (trained weights on disk
    now; None for models without weights). Builds nothing."""
    key = name[4:] if name.startswith("zoo:") else name
    if key not in INFO:
        raise ModelSpecError(f"unknown zoo model {name!r}; valid: {', '.join(NAMES)}")
    d = asdict(INFO[key])
    d["sample_shape"] = list(d["sample_shape"])
    out = {"name": f"zoo:{key}", **d, "cached": _cached(key)}
    if key in PIPELINES:
        from .scenes.models import folder_path

        folder = folder_path(key.removeprefix("scenes-"))
        out["pipeline_folder"] = str(folder)
        text = key != "scenes-dit"
        out["prompt_files"] = (
            {"train": str(folder / "prompts" / "train.txt"), "heldout": str(folder / "prompts" / "heldout.txt")}
            if text
            else None
        )
    return out


def load(name: str, device: str | torch.device = "cpu", **kwargs: Any) -> Denoiser:
    """Build zoo model ``name`` (a :class:`~fewstep.denoiser.Denoiser`) on ``device``.

    ``kwargs`` go to the model's builder (e.g. ``guidance_scale`` for the mixtures, ``retrain``
    for the trained networks); an unknown name or keyword raises ``ModelSpecError``.
    """
    key = str(name)
    if key.startswith("zoo:"):
        key = key[4:]
    if key not in _BUILDERS:
        raise ModelSpecError(f"unknown zoo model {name!r}; valid: {', '.join(NAMES)}")
    build = _BUILDERS[key]
    params = inspect.signature(build).parameters
    bad = [k for k in kwargs if k not in params]
    if bad:
        raise ModelSpecError(
            f"zoo:{key} does not take {', '.join(map(repr, bad))}; it takes: {', '.join(params) or 'nothing'}"
        )
    if "device" in params:
        return build(device=device, **kwargs)
    return build(**kwargs).to(device)
