"""The data reference set that distribution metrics (FD, KID, sliced Wasserstein) compare samples with.

Per model, in this order:

1. a set the user passes (``data=``), shape (M, *sample_shape);
2. the model's own training set when it carries one (a tensor ``model.data`` of shape
   (M, *sample_shape), as ``zoo:digits-empirical`` does);
3. for digits models (``zoo:digits-*``, or any model whose identity names a ``digits`` zoo
   entry) the 1797 scikit-learn digits; when the model draws (1, 8k, 8k) images, upsampled
   bilinearly (``align_corners=False``, clamped to [-1, 1]): how the repo's image models make
   their training data. A model trained on digits upsampled another way should carry its
   training set as ``model.data`` (case 2), or the user passes it: a mismatch shows up as a
   raised floor in the reference row (bilinear vs nearest costs about 53 FD in digits features);
4. exact draws ``model.sample_data(M, generator)`` for the analytic models (gaussian, gmm,
   gmm2d), from a fixed seed;
5. otherwise none: :func:`fewstep.evaluate.evaluate` then uses the reference solver's samples
   on a block of seeds disjoint from the evaluation seeds (see there).

Measuring against the data (not against the reference solver's samples on the same seeds)
answers "how far is this solver from the data?", and the reference solve's own figure,
reported beside it, is the floor no solver of this model can beat: model error plus the
finite-sample bias of the metric at these sample counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import ShapeError


@dataclass
class DataReference:
    """Samples (M, *sample_shape) that stand for the data, and where they came from."""

    samples: Tensor
    source: str

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "n": int(self.samples.shape[0])}


def is_digits_model(model: Any) -> bool:
    """Whether ``model`` draws scikit-learn digits (a zoo digits model, by name or identity)."""
    zoo_name = str(getattr(model, "identity", {}).get("zoo", ""))
    return zoo_name.startswith("digits") or str(getattr(model, "name", "")).startswith("zoo:digits")


def upsample_digits(x: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Digits x (N, 1, 8, 8) to (N, *shape) with shape (1, 8k, 8k): bilinear, clamped to [-1, 1]."""
    k = shape[-1] // 8 if shape else 0
    if tuple(shape) != (1, 8 * k, 8 * k) or k < 1:
        raise ShapeError(
            f"digits can be upsampled to (1, 8k, 8k) only; the model draws {tuple(shape)}: "
            "pass data=<your reference samples>"
        )
    if k == 1:
        return x
    up = torch.nn.functional.interpolate(x, size=tuple(shape[1:]), mode="bilinear", align_corners=False)
    return up.clamp(-1.0, 1.0)


def user_data(data: Tensor, shape: tuple[int, ...] | None) -> DataReference:
    """A user-supplied reference set, checked against the model's sample shape."""
    data = torch.as_tensor(data)
    if shape is not None and tuple(data.shape[1:]) != tuple(shape):
        raise ShapeError(
            f"data reference set has shape {tuple(data.shape)}; the model draws samples of shape "
            f"{tuple(shape)}: pass a tensor of shape (M, {', '.join(map(str, shape))})"
        )
    return DataReference(data.detach().cpu(), f"user ({data.shape[0]} samples)")


def model_data(model: Any, n: int = 2048, seed: int = 0) -> DataReference | None:
    """The model's data reference set (cases 2 to 4 above), or None when it has none."""
    shape = tuple(getattr(model, "sample_shape", None) or ())
    own = getattr(model, "data", None)
    if isinstance(own, Tensor) and own.dim() >= 1 and tuple(own.shape[1:]) == shape:
        return DataReference(own.detach().cpu(), f"model.data ({own.shape[0]} training samples)")
    if is_digits_model(model):
        from ..zoo.digits import digits_data

        x, _ = digits_data(torch.float32)
        return DataReference(upsample_digits(x, shape), f"sklearn digits ({x.shape[0]})")
    draw = getattr(model, "sample_data", None)
    if callable(draw):
        x = draw(int(n), generator=torch.Generator().manual_seed(int(seed)))
        return DataReference(
            torch.as_tensor(x).reshape(int(n), *shape).cpu(), f"model.sample_data ({int(n)} draws, seed {int(seed)})"
        )
    return None


__all__ = ["DataReference", "is_digits_model", "model_data", "upsample_digits", "user_data"]
