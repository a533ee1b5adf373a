"""A small digits classifier whose penultimate layer is the feature space for Frechet distance / KID.

No standard feature network exists offline for 8x8 digits, so (as FID does with Inception) we
train one on the data itself: an MLP 64 -> 256 -> 64 -> 10 with SiLU activations on
scikit-learn's 1797 digits scaled to [-1, 1] (``fewstep.zoo.digits_data``). The 64-d output of
the second layer (after its activation) is the feature vector.

A seeded permutation holds out ``holdout`` of the images (stratification is not needed at
this size); the rest train it with Adam on minibatches, with small Gaussian pixel noise as
augmentation so that the features stay smooth around slightly imperfect samples. Training is
deterministic (parameters initialised under a forked, seeded RNG; every batch and noise from
one seeded generator) and takes a few seconds on one CPU thread. The held-out accuracy is
stored with the weights (buffer ``heldout_accuracy``).

Weights are cached as ``$FEWSTEP_CACHE/metrics/digits-classifier-<recipe hash>.safetensors``
(default cache ``~/.cache/fewstep``), written to a temporary file and renamed; a missing,
unreadable or other-recipe file means retraining.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import FewstepError
from ..training import ForeachAdamW, read_weights, recipe_hash, weights_dir, write_weights

RECIPE: dict[str, Any] = {
    "version": 1,
    "data": "sklearn-digits-1797/x/8-1",
    "arch": {"hidden": 256, "features": 64},
    "seed": 0,
    "holdout": 0.2,
    "steps": 1500,
    "batch": 128,
    "lr": 3e-3,
    "weight_decay": 1e-4,
    "noise": 0.2,
}
N_CLASSES = 10


class DigitsClassifier(nn.Module):
    """MLP on flattened 8x8 digits: ``forward(x)`` -> logits (B, 10), ``features(x)`` -> (B, F)."""

    heldout_accuracy: Tensor  # () float64 buffer, NaN until trained

    def __init__(self, hidden: int = 256, features: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, hidden), nn.SiLU(), nn.Linear(hidden, features), nn.SiLU())
        self.head = nn.Linear(features, N_CLASSES)
        self.num_features = int(features)
        self.register_buffer("heldout_accuracy", torch.tensor(float("nan"), dtype=torch.float64))

    def features(self, x: Tensor) -> Tensor:
        """Penultimate-layer features of x (B, 1, 8, 8) or (B, 64): shape (B, num_features)."""
        return self.body(x.reshape(x.shape[0], 64))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def recipe_for(**overrides: Any) -> dict[str, Any]:
    """The classifier recipe with top-level ``overrides`` (None values are ignored)."""
    bad = sorted(set(overrides) - set(RECIPE))
    if bad:
        raise FewstepError(f"unknown classifier recipe field {bad[0]!r}; valid: {', '.join(sorted(RECIPE))}")
    r = copy.deepcopy(RECIPE)
    r.update({k: ({**r[k], **v} if k == "arch" else v) for k, v in overrides.items() if v is not None})
    return r


def heldout_split(recipe: dict[str, Any], n: int) -> tuple[Tensor, Tensor]:
    """(train indices, held-out indices) of the ``n`` digits, from the recipe's seed."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(recipe["seed"]) + 17))
    n_test = int(round(float(recipe["holdout"]) * n))
    return perm[n_test:], perm[:n_test]


def accuracy(net: DigitsClassifier, x: Tensor, y: Tensor) -> float:
    """Fraction of x (B, 1, 8, 8) that ``net`` labels as y (B,)."""
    with torch.no_grad():
        return float((net(x.float()).argmax(-1) == y).double().mean())


def train_classifier(recipe: dict[str, Any]) -> dict[str, Tensor]:
    """Train on the CPU from ``recipe``; the state dict (float32 weights, float64 held-out accuracy)."""
    with torch.inference_mode(False), torch.enable_grad():
        return _train(recipe)


def _train(recipe: dict[str, Any]) -> dict[str, Tensor]:
    from ..zoo.digits import digits_data

    x_all, y_all = digits_data(torch.float32)
    tr, te = heldout_split(recipe, x_all.shape[0])
    x, y = x_all[tr].reshape(len(tr), 64), y_all[tr]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(recipe["seed"]))
        net = DigitsClassifier(**recipe["arch"])
    g = torch.Generator().manual_seed(int(recipe["seed"]) + 1)
    params: list[Tensor] = list(net.parameters())
    opt = ForeachAdamW(params, recipe["lr"], recipe["weight_decay"])
    steps, bs, noise = int(recipe["steps"]), int(recipe["batch"]), float(recipe["noise"])
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (bs,), generator=g)
        xb = x[idx] + noise * torch.randn(bs, 64, generator=g)
        loss = nn.functional.cross_entropy(net(xb), y[idx])
        grads = torch.autograd.grad(loss, params)
        lr = recipe["lr"] * 0.5 * (1.0 + math.cos(math.pi * step / steps))
        with torch.no_grad():
            opt.step(grads, lr)
    net.eval()
    net.heldout_accuracy.fill_(accuracy(net, x_all[te], y_all[te]))
    return {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}


def classifier_path(recipe: dict[str, Any]) -> Path:
    """Cache file of the classifier trained from ``recipe``."""
    return weights_dir("metrics") / f"digits-classifier-{recipe_hash(recipe)}.safetensors"


_MEMORY: dict[str, dict[str, Tensor]] = {}


def load_digits_classifier(retrain: bool = False, **overrides: Any) -> DigitsClassifier:
    """The trained digits classifier (eval mode, frozen): from memory, the cache, or trained now."""
    recipe = recipe_for(**overrides)
    h = recipe_hash(recipe)
    state = None if retrain else _MEMORY.get(h)
    path = classifier_path(recipe)
    if state is None and not retrain and path.exists():
        state = read_weights(path, recipe)
    if state is None:
        t0 = time.perf_counter()
        state = train_classifier(recipe)
        try:
            write_weights(path, state, recipe, time.perf_counter() - t0)
        except OSError as e:  # read-only cache: keep it in memory for this process
            print(f"digits classifier not cached ({e.strerror or e}); kept in memory", file=sys.stderr)
    _MEMORY[h] = state
    net = DigitsClassifier(**recipe["arch"])
    net.load_state_dict(state)
    return net.eval().requires_grad_(False)


__all__ = [
    "DigitsClassifier",
    "RECIPE",
    "accuracy",
    "classifier_path",
    "heldout_split",
    "load_digits_classifier",
    "recipe_for",
    "train_classifier",
]
