"""The scenes attribute classifier: images in, every caption attribute out; prompt adherence on top of it.

A small CNN (3x3 convolutions with GroupNorm and SiLU at 32x32, 16x16 and 8x8, each stage max-pooled, then a
128-d feature layer on the 4x4 maps) with one softmax head per label column of :data:`.data.LABELS`; the
columns a scene may lack (the second object's shape, colour and size, the relation) have one more class,
"absent". Its 128-d penultimate features
serve FD / KID as the digits classifier's do (:meth:`SceneClassifier.features`).

Training (:data:`RECIPE`) draws fresh scenes of the whole grammar at every step (split ``"all"``: the
classifier measures held-out captions too, so it sees every combination) from seeds derived from the
recipe's seed, and augments them as samples of a generative model are imperfect: per image, Gaussian
pixel noise of a random level up to ``noise``, a Gaussian blur of random width up to ``blur`` pixels on
half of the images, and a colour offset per channel up to ``shift``. Everything is seeded (parameters
under a forked RNG, batches and augmentation from one generator), so the recipe determines the weights.
The accuracy per label column on fresh clean renders of both splits is stored with the weights (buffer
``accuracy``, rows train / heldout).

Weights are cached as ``<cache root>/metrics/scenes-classifier-<recipe hash>.safetensors`` (written
atomically, read back only when their metadata names the recipe: a damaged or foreign file is retrained).

:func:`prompt_adherence` compares the classifier's reading of images with the attributes their captions
state: the headline figure is the mean, over images, of the share of a caption's attributes (plus the
number of objects) the image shows.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ...errors import FewstepError, ShapeError
from ...training import ForeachAdamW, read_weights, recipe_hash, weights_dir, write_weights
from . import data

RECIPE: dict[str, Any] = {
    "version": 1,
    "data": data.VERSION,
    "arch": {"width": 32, "features": 128, "convs": [1, 2, 1]},
    "seed": 0,
    "steps": 1200,
    "batch": 64,
    "lr": 2e-3,
    "weight_decay": 1e-4,
    "noise": 0.2,
    "blur": 1.2,
    "shift": 0.1,
    "eval": 2000,
}
#: label columns a scene may lack: their heads have one more class, "absent"
OPTIONAL = (3, 4, 5, 6)
HEAD_CLASSES = tuple(k + (i in OPTIONAL) for i, k in enumerate(data.NUM_CLASSES))
EVAL_SEED = 1_000_000  # evaluation scenes are drawn from seeds no training step uses


class SceneClassifier(nn.Module):
    """CNN on (B, 3, 32, 32) scenes in [-1, 1]: ``forward`` -> logits (B, sum(HEAD_CLASSES)), ``features`` -> (B, F),
    ``predict`` -> labels (B, 8) in the layout of :func:`.data.labels`."""

    accuracy: Tensor  # (2, 8) float64 buffer: accuracy per split (train, heldout) and label column, NaN untrained

    def __init__(self, width: int = 32, features: int = 128, convs: Sequence[int] = (1, 1, 1)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c, n in zip((width, 2 * width, 2 * width), convs, strict=True):
            for _ in range(int(n)):
                layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.GroupNorm(8, c), nn.SiLU()]
                c_in = c
            layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c_in * 16, features), nn.SiLU())
        self.head = nn.Linear(features, sum(HEAD_CLASSES))
        self.num_features = int(features)
        self.register_buffer("accuracy", torch.full((2, len(data.LABELS)), float("nan"), dtype=torch.float64))

    def features(self, x: Tensor) -> Tensor:
        """Penultimate-layer features of x (B, 3, 32, 32): shape (B, num_features)."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def heads(self, x: Tensor) -> list[Tensor]:
        """Logits of each label column: a list of (B, HEAD_CLASSES[k])."""
        return list(self(x).split(HEAD_CLASSES, dim=1))

    def predict(self, x: Tensor) -> Tensor:
        """Labels (B, 8) long of images x (B, 3, 32, 32): the second object's columns and the relation are -1 when
        the shape head calls the second object absent, and never -1 when it is present."""
        out = self.heads(x)
        cols = []
        second = out[3].argmax(1) < data.NUM_CLASSES[3]
        for k, logits in enumerate(out):
            if k in OPTIONAL:
                label = logits[:, : data.NUM_CLASSES[k]].argmax(1)
                cols.append(torch.where(second, label, -1))
            else:
                cols.append(logits.argmax(1))
        return torch.stack(cols, 1)


def recipe_for(**overrides: Any) -> dict[str, Any]:
    """The classifier recipe with top-level ``overrides`` (None values are ignored; ``arch`` is merged)."""
    bad = sorted(set(overrides) - set(RECIPE))
    if bad:
        raise FewstepError(f"unknown scenes classifier recipe field {bad[0]!r}; valid: {', '.join(sorted(RECIPE))}")
    r = copy.deepcopy(RECIPE)
    r.update({k: ({**r[k], **v} if k == "arch" else v) for k, v in overrides.items() if v is not None})
    return r


def targets(labels: Tensor) -> Tensor:
    """Head targets (B, 8): the labels with -1 (absent) mapped to each optional head's last class."""
    absent = torch.tensor(data.NUM_CLASSES)
    return torch.where(labels < 0, absent, labels)


def loss_of(net: SceneClassifier, x: Tensor, labels: Tensor) -> Tensor:
    """Sum over label columns of the cross-entropy of ``net`` on x (B, 3, 32, 32) against labels (B, 8)."""
    t = targets(labels)
    return sum(
        (nn.functional.cross_entropy(logits, t[:, k]) for k, logits in enumerate(net.heads(x))),
        torch.zeros(()),
    )


def augment(x: Tensor, recipe: dict[str, Any], g: torch.Generator) -> Tensor:
    """x (B, 3, 32, 32) with a random colour offset, blur (half of the images) and pixel noise, drawn from g."""
    b = x.shape[0]
    u = torch.rand(b, 3, generator=g)
    shift = float(recipe["shift"]) * (2 * torch.rand(b, 3, 1, 1, generator=g) - 1)
    x = blur(x, float(recipe["blur"]) * u[:, 0] * (u[:, 1] < 0.5)) + shift
    return x + float(recipe["noise"]) * u[:, 2, None, None, None] * torch.randn(x.shape, generator=g)


def blur(x: Tensor, width: Tensor) -> Tensor:
    """x (B, C, H, W) blurred by a Gaussian of standard deviation ``width`` (B,) pixels (0: unchanged), reflected
    at the borders."""
    b, c, h, w = x.shape
    taps = torch.arange(-3.0, 4.0)
    k = torch.exp(-0.5 * (taps / width.clamp_min(1e-3)[:, None]) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*C, 7)
    y = nn.functional.pad(x.reshape(1, b * c, h, w), (3, 3, 3, 3), mode="reflect")
    y = nn.functional.conv2d(y, k[:, None, None, :], groups=b * c)
    y = nn.functional.conv2d(y, k[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def train_classifier(recipe: dict[str, Any], log: bool = False) -> dict[str, Tensor]:
    """Train on the CPU from ``recipe``; the state dict (float32 weights, float64 accuracy (2, 8))."""
    with torch.inference_mode(False), torch.enable_grad():
        return _train(recipe, log)


def _train(recipe: dict[str, Any], log: bool) -> dict[str, Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(recipe["seed"]))
        net = SceneClassifier(**recipe["arch"])
    g = torch.Generator().manual_seed(int(recipe["seed"]) + 1)
    params: list[Tensor] = list(net.parameters())
    opt = ForeachAdamW(params, recipe["lr"], recipe["weight_decay"])
    steps, bs = int(recipe["steps"]), int(recipe["batch"])
    for step in range(steps):
        x, _, y = data.dataset("all", bs, seed=int(recipe["seed"]) * 100_003 + step)
        loss = loss_of(net, augment(x, recipe, g), y)
        grads = torch.autograd.grad(loss, params)
        lr = recipe["lr"] * 0.5 * (1.0 + math.cos(math.pi * step / steps))
        with torch.no_grad():
            opt.step(grads, lr)
        if log and (step % 100 == 0 or step == steps - 1):
            print(f"scenes classifier step {step}/{steps}: loss {float(loss.detach()):.4f}", file=sys.stderr)
    net.eval()
    with torch.no_grad():
        for row, split in enumerate(("train", "heldout")):
            x, _, y = data.dataset(split, int(recipe["eval"]), seed=EVAL_SEED + int(recipe["seed"]))
            net.accuracy[row] = column_accuracy(net.predict(x), y)
    return {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}


def column_accuracy(pred: Tensor, labels: Tensor) -> Tensor:
    """Share (8,) float64 of rows where ``pred`` (N, 8) equals ``labels`` (N, 8), per column (-1 counts as a value)."""
    return (pred == labels).double().mean(0)


#: the classifier of the default recipe, shipped with the package (used when its recipe hash is the recipe's)
SHIPPED = Path(__file__).resolve().parent.parent / "weights" / "scenes" / "classifier.safetensors"


def classifier_path(recipe: dict[str, Any]) -> Path:
    """Cache file of the classifier trained from ``recipe``."""
    return weights_dir("metrics") / f"scenes-classifier-{recipe_hash(recipe)}.safetensors"


_MEMORY: dict[str, dict[str, Tensor]] = {}


def attribute_classifier(
    device: str | torch.device = "cpu", retrain: bool = False, **overrides: Any
) -> SceneClassifier:
    """The trained scenes classifier (eval mode, frozen) on ``device``: from memory, the cache, or trained now
    (about a minute and a half on one CPU thread)."""
    recipe = recipe_for(**overrides)
    h = recipe_hash(recipe)
    state = None if retrain else _MEMORY.get(h)
    path = classifier_path(recipe)
    for where in (SHIPPED, path):
        if state is None and not retrain and where.exists():
            state = _checked(read_weights(where, recipe), recipe)
    if state is None:
        print("training the scenes attribute classifier (once; cached)", file=sys.stderr)
        t0 = time.perf_counter()
        state = train_classifier(recipe)
        try:
            write_weights(path, state, recipe, time.perf_counter() - t0)
        except OSError as e:  # read-only cache: keep it in memory for this process
            print(f"scenes classifier not cached ({e.strerror or e}); kept in memory", file=sys.stderr)
    _MEMORY[h] = state
    net = SceneClassifier(**recipe["arch"])
    net.load_state_dict(state)
    return net.eval().requires_grad_(False).to(device)


def _checked(state: dict[str, Tensor] | None, recipe: dict[str, Any]) -> dict[str, Tensor] | None:
    """``state`` if it has exactly the network's tensors, with their shapes, all finite (else None: retrain)."""
    if state is None:
        return None
    want = SceneClassifier(**recipe["arch"]).state_dict()
    if set(state) != set(want):
        return None
    for k, v in want.items():
        if state[k].shape != v.shape or state[k].dtype != v.dtype or not torch.isfinite(state[k]).all():
            return None
    return state


def _net(classifier: SceneClassifier | None) -> SceneClassifier:
    return classifier if classifier is not None else attribute_classifier()


def _images(images: Tensor, net: SceneClassifier) -> Tensor:
    if images.ndim != 4 or tuple(images.shape[1:]) != data.SHAPE:
        raise ShapeError(
            f"the scenes classifier takes images (N, 3, 32, 32) in [-1, 1]; got shape {tuple(images.shape)}"
        )
    p = next(net.parameters())
    return images.to(device=p.device, dtype=p.dtype)


def features(images: Tensor, classifier: SceneClassifier | None = None, batch_size: int = 1024) -> Tensor:
    """Penultimate features (N, 128) float64 on the CPU of images (N, 3, 32, 32) in [-1, 1] (for FD / KID)."""
    net = _net(classifier)
    with torch.no_grad():
        out = [
            net.features(_images(images[i : i + batch_size], net)).double().cpu()
            for i in range(0, len(images), batch_size)
        ]
    return torch.cat(out) if out else torch.zeros(0, net.num_features, dtype=torch.float64)


def predict(images: Tensor, classifier: SceneClassifier | None = None, batch_size: int = 1024) -> Tensor:
    """Attribute labels (N, 8) long on the CPU of images (N, 3, 32, 32) (layout of :func:`.data.labels`)."""
    net = _net(classifier)
    with torch.no_grad():
        out = [net.predict(_images(images[i : i + batch_size], net)).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, len(data.LABELS), dtype=torch.long)


def caption_labels(captions: Sequence[str] | Tensor) -> Tensor:
    """Labels (N, 8) of captions (parsed; FewstepError naming words outside the vocabulary), or labels as given."""
    if isinstance(captions, Tensor):
        if captions.ndim != 2 or captions.shape[1] != len(data.LABELS):
            raise ShapeError(f"caption labels must be (N, {len(data.LABELS)}); got {tuple(captions.shape)}")
        return captions.long().cpu()
    return data.labels([data.parse_caption(c) for c in captions])


def adherence_of(pred: Tensor, want: Tensor) -> dict[str, Any]:
    """Prompt adherence of predicted labels ``pred`` (N, 8) to the captions' labels ``want`` (N, 8).

    A caption states its objects' attributes, its relation and background when it names them (labels >= 0),
    and how many objects there are (column ``objects``). Returns ``adherence``: the mean over images of the share
    of its caption's stated attributes the image shows (the headline figure); ``all_correct``: the share of
    images showing every one; ``per_attribute``: the accuracy of each column over the images whose caption
    states it; ``chance``: the adherence of uniform guessing, for comparison; ``n``.
    """
    if pred.shape != want.shape:
        raise ShapeError(f"{pred.shape[0]} images but {want.shape[0]} captions")
    stated = want >= 0
    hit = (pred == want) & stated
    count_hit = (pred[:, 3] >= 0) == (want[:, 3] >= 0)
    n_stated = stated.sum(1) + 1
    per_image = (hit.sum(1) + count_hit) / n_stated
    classes = torch.tensor(data.NUM_CLASSES, dtype=torch.float64)
    chance = ((stated / classes).sum(1) + 0.5) / n_stated
    per_attr = {
        name: (float(hit[:, k].sum() / stated[:, k].sum()) if stated[:, k].any() else float("nan"))
        for k, name in enumerate(data.LABELS)
    }
    per_attr["objects"] = float(count_hit.double().mean()) if len(want) else float("nan")
    return {
        "adherence": float(per_image.double().mean()) if len(want) else float("nan"),
        "all_correct": float((hit.sum(1) + count_hit == n_stated).double().mean()) if len(want) else float("nan"),
        "per_attribute": per_attr,
        "chance": float(chance.mean()) if len(want) else float("nan"),
        "n": int(len(want)),
    }


def prompt_adherence(
    images: Tensor, captions: Sequence[str] | Tensor, classifier: SceneClassifier | None = None
) -> dict[str, Any]:
    """Prompt adherence of images (N, 3, 32, 32) in [-1, 1] to their captions (N strings, or labels (N, 8)):
    see :func:`adherence_of` for the figures."""
    want = caption_labels(captions)
    if len(want) != len(images):
        raise ShapeError(f"{len(images)} images but {len(want)} captions: give one caption per image")
    return adherence_of(predict(images, classifier), want)


class Features(nn.Module):
    """The classifier's penultimate layer as a feature network (``num_features`` = 128) for FD / KID
    (``fewstep.metrics.features.FeatureMap`` takes it as is)."""

    def __init__(self, classifier: SceneClassifier | None = None) -> None:
        super().__init__()
        self.classifier = _net(classifier)
        self.num_features = self.classifier.num_features

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier.features(x)


__all__ = [
    "Features",
    "HEAD_CLASSES",
    "RECIPE",
    "SceneClassifier",
    "adherence_of",
    "attribute_classifier",
    "augment",
    "blur",
    "caption_labels",
    "classifier_path",
    "column_accuracy",
    "features",
    "predict",
    "prompt_adherence",
    "recipe_for",
    "train_classifier",
]
