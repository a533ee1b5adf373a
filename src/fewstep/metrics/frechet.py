"""Frechet distance and kernel (KID) distance between sample sets in a feature space, via torchmetrics.

Frechet distance (FD; FID when the features are Inception's): fit a Gaussian to each set's
features, FD = ||mu_x - mu_y||^2 + tr(S_x + S_y - 2 (S_x S_y)^(1/2)).
KID: the unbiased estimate of MMD^2 with the polynomial kernel k(a, b) = (a.b / d + 1)^3,
averaged over random subsets (mean and std over ``subsets`` draws of ``subset_size`` rows).

Sample size. The FD estimate is biased upwards with few samples: for two independent draws of
n and m samples from one distribution with feature covariance S, the mean term alone adds
tr(S) (1/n + 1/m) in expectation, and the covariance term adds a bias that grows with the
feature width d (roughly like d / n). So FD(x, y) > 0 even when x and y come from the same
distribution, and figures are only comparable at the same sample counts. Measured in the
digits classifier's 64-d features, n random digits against all 1797 (mean of 5 draws): FD 36 at
n = 64, 17 at 128, 8.3 at 256, 3.0 at 512, 1.0 at 1024 (about 1/n); two disjoint halves of the
digits: 6.0. A difference between two solvers means little unless it exceeds this floor's
spread at the sample count used (use 512 or more samples where FD matters). KID is unbiased
(about 0 for equal distributions at any n, with a larger spread at small n). In
:func:`fewstep.evaluate.evaluate`, the reference row measures this floor at the very sample
counts used (``samples``, and the data reference set's size).

torchmetrics is imported only when these functions run.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import FewstepError
from .features import FeatureMap, as_feature_map


def _torchmetrics_image() -> tuple[Any, Any]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchmetrics.image.fid import FrechetInceptionDistance
            from torchmetrics.image.kid import KernelInceptionDistance
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise FewstepError("Frechet distance and KID need torchmetrics: pip install torchmetrics") from e
    return FrechetInceptionDistance, KernelInceptionDistance


def _need_rows(x: Tensor, what: str, least: int = 2) -> None:
    if x.shape[0] < least:
        raise FewstepError(f"{what} needs at least {least} samples per set; got {x.shape[0]}: draw more samples")


class FeatureDistances:
    """FD and KID of sample sets against one fixed set ``y`` (its features are computed once).

    Args:
        y: the reference set (M, *shape), e.g. the data or a converged solver's samples.
        feature: a feature network (nn.Module or :class:`FeatureMap`); None: the raw vectors.
        kid_subsets, kid_subset_size: KID's subset draws (the size is capped at the smaller set).
        seed: seeds KID's subset draws (the global RNG is left untouched).
    """

    def __init__(
        self,
        y: Tensor,
        feature: nn.Module | None = None,
        kid_subsets: int = 20,
        kid_subset_size: int = 1000,
        seed: int = 0,
    ) -> None:
        _need_rows(y, "a distribution metric")
        fid_cls, kid_cls = _torchmetrics_image()
        self.feature: FeatureMap = as_feature_map(feature, y)
        self.n_ref = int(y.shape[0])
        self.kid_subsets, self.kid_subset_size, self.seed = int(kid_subsets), int(kid_subset_size), int(seed)
        self._fid = fid_cls(feature=self.feature, reset_real_features=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # KID warns that it keeps all features in memory
            self._kid = kid_cls(
                feature=self.feature, reset_real_features=False, subsets=self.kid_subsets, subset_size=2
            )
        self._fid.update(y, real=True)  # the feature map remembers its last input: y runs through it once
        self._kid.update(y, real=True)

    def frechet(self, x: Tensor) -> float:
        """FD between x (N, *shape) and the reference set."""
        _need_rows(x, "Frechet distance")
        self._fid.reset()
        self._fid.update(x, real=False)
        return float(self._fid.compute())

    def kid(self, x: Tensor) -> tuple[float, float]:
        """(KID mean, KID std over subsets) between x (N, *shape) and the reference set."""
        _need_rows(x, "KID")
        self._kid.reset()
        self._kid.update(x, real=False)
        self._kid.subset_size = max(2, min(self.kid_subset_size, self.n_ref, int(x.shape[0])))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            mean, std = self._kid.compute()
        return float(mean), float(std)


def frechet_distance(x: Tensor, y: Tensor, feature: nn.Module | None = None) -> float:
    """FD between sample sets x (N, ...) and y (M, ...) in ``feature`` space (None: raw vectors)."""
    return FeatureDistances(y, feature).frechet(x)


def kernel_distance(
    x: Tensor, y: Tensor, feature: nn.Module | None = None, subsets: int = 20, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """(KID mean, std) between x (N, ...) and y (M, ...) in ``feature`` space (None: raw vectors)."""
    return FeatureDistances(y, feature, subsets, subset_size, seed).kid(x)


__all__ = ["FeatureDistances", "frechet_distance", "kernel_distance"]
