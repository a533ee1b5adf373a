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
its parameters, part of the fingerprint).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

from ..denoiser import Denoiser
from ..errors import ModelSpecError
from .analytic import build_gaussian, build_gmm, build_gmm2d, gaussian_exact_solution
from .digits import build_digits_empirical, digits_data
from .unet import build_digits_unet

__all__ = ["NAMES", "load", "gaussian_exact_solution", "digits_data"]


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


_BUILDERS: dict[str, Callable[..., Denoiser]] = {
    "gaussian": build_gaussian,
    "gmm2d": build_gmm2d,
    "gmm": build_gmm,
    "digits-empirical": build_digits_empirical,
    "digits-eps": _build_trained("digits-eps"),
    "digits-flow": _build_trained("digits-flow"),
    "digits-unet": build_digits_unet,
}
NAMES: tuple[str, ...] = tuple(_BUILDERS)


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
    return build(**kwargs).to(device)
