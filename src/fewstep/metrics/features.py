"""Feature maps for distribution metrics: any user network, or the digits classifier's penultimate layer.

torchmetrics' FrechetInceptionDistance / KernelInceptionDistance take a custom ``feature``
module that maps a batch to an (N, d) matrix and has ``num_features``. :class:`FeatureMap`
makes any network fit that contract (flattened float64 output, no gradients, eval mode,
batched on the network's device), so an Inception network whose weights the user has, or a
classifier of their own, works exactly like the built-in one. Nothing is ever downloaded.

The built-in digits features (:func:`digits_features`) serve 8x8 digits and digits
upsampled to any multiple of 8 (16x16, 32x32; one channel, [-1, 1]): inputs are averaged over
k x k blocks back to 8x8 before the classifier. Block averaging undoes nearest-neighbour
upsampling exactly and gives a close, slightly blurred 8x8 for smooth (bilinear) upsampling;
an upsampled digit carries no information beyond its 8x8 source, so one classifier trained
at the data's own resolution serves every size and the features stay comparable across them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..errors import FewstepError, ShapeError

if TYPE_CHECKING:
    from .classifier import DigitsClassifier


class FeatureMap(nn.Module):
    """Wrap ``net`` (B, *in_shape) -> (B, ...) as the (B, num_features) float64 map torchmetrics uses.

    Args:
        net: any feature network; switched to eval mode and called under ``torch.no_grad`` on its
            own device (its parameters' dtype).
        num_features: the feature width; inferred from ``net.num_features`` or from one call on
            ``example`` (a batch of at least one input) when not given.
        batch_size: inputs per call of ``net``.
        label: a short name for reports.
    """

    def __init__(
        self,
        net: nn.Module,
        num_features: int | None = None,
        example: Tensor | None = None,
        batch_size: int = 256,
        label: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise FewstepError(f"a feature network must be a torch.nn.Module; got {type(net).__name__}")
        self.net = net.eval()
        self.batch_size = int(batch_size)
        self.label = label or type(net).__name__
        self._memo: tuple[Tensor, int, Tensor] | None = None  # (last input, its version, its features)
        if num_features is None:
            num_features = getattr(net, "num_features", None)
        if num_features is None:
            if example is None:
                raise ShapeError(f"feature network {self.label}: pass num_features= or an example input batch")
            num_features = self.forward(example[:1]).shape[1]
        self.num_features = int(num_features)

    def _device(self) -> torch.device:
        p = next(self.net.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def prepare(self, x: Tensor) -> Tensor:
        """Input transform applied before ``net`` (identity here)."""
        return x

    def forward(self, x: Tensor) -> Tensor:
        """Features of x (B, *in_shape): shape (B, num_features), float64, on the CPU.

        The last input's features are remembered, so FD and KID of one sample set cost one pass.
        """
        if self._memo is not None and self._memo[0] is x and self._memo[1] == x._version:
            return self._memo[2]
        f = self._features(x)
        self._memo = (x, x._version, f)
        return f

    def _features(self, x: Tensor) -> Tensor:
        dev = self._device()
        p = next(self.net.parameters(), None)
        dtype = p.dtype if p is not None and p.is_floating_point() else x.dtype
        out = []
        with torch.no_grad():
            for k in range(0, x.shape[0], self.batch_size):
                xb = self.prepare(x[k : k + self.batch_size]).to(device=dev, dtype=dtype)
                out.append(self.net(xb).reshape(xb.shape[0], -1).double().cpu())
        return torch.cat(out) if out else torch.zeros(0, getattr(self, "num_features", 0), dtype=torch.float64)


class Identity(nn.Module):
    """The identity feature: Frechet distance / KID of the raw (flattened) vectors."""

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1)


class _Penultimate(nn.Module):
    def __init__(self, classifier: DigitsClassifier) -> None:
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.num_features

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier.features(x)


class DigitsFeatures(FeatureMap):
    """The digits classifier's penultimate features (64-d) of digits at 8x8 or upsampled by k.

    Inputs: (B, 1, 8k, 8k) in [-1, 1] (k = 1, 2, 4, ...), averaged over k x k blocks to 8x8.
    """

    def __init__(self, classifier: DigitsClassifier, batch_size: int = 2048) -> None:
        super().__init__(
            _Penultimate(classifier), classifier.num_features, batch_size=batch_size, label="digits-classifier"
        )

    def prepare(self, x: Tensor) -> Tensor:
        check_digits_shape(tuple(x.shape[1:]))
        k = x.shape[-1] // 8
        return nn.functional.avg_pool2d(x, k) if k > 1 else x


def check_digits_shape(shape: tuple[int, ...]) -> None:
    """Raise ShapeError unless ``shape`` is (1, 8k, 8k): what the digits features accept."""
    if not (len(shape) == 3 and shape[0] == 1 and shape[1] == shape[2] and shape[1] % 8 == 0 and shape[1] > 0):
        raise ShapeError(
            f"the digits feature network takes one-channel square images of side 8, 16, 32, ...; "
            f"got samples of shape {shape}: pass feature=<your nn.Module> for other data"
        )


def digits_features(**classifier_overrides: Any) -> DigitsFeatures:
    """The built-in digits feature map (trains and caches the classifier on first use, a few seconds)."""
    from .classifier import load_digits_classifier

    return DigitsFeatures(load_digits_classifier(**classifier_overrides))


def as_feature_map(feature: nn.Module | None, example: Tensor | None = None) -> FeatureMap:
    """``feature`` as a FeatureMap: None is the identity on flattened samples."""
    if isinstance(feature, FeatureMap):
        return feature
    if feature is None:
        dim = None if example is None else int(example[0].numel())
        return FeatureMap(Identity(), dim, example, label="identity")
    return FeatureMap(feature, example=example)


__all__ = ["DigitsFeatures", "FeatureMap", "Identity", "as_feature_map", "check_digits_shape", "digits_features"]
