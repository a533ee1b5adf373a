"""Which metrics suit a model, and computing them for one solver's samples.

Metric names (``METRICS``) and the row keys they fill (``ROW_KEYS``):

* ``fd``: Frechet distance to the data reference set in a feature network's space (row keys
  ``fd``); ``kid``: kernel distance in the same space (``kid``, ``kid_std``). Lower is better.
* ``fd_ref``: Frechet distance, in the same feature space, to the reference solve's samples from
  the same seeds (``fd_ref``): how close a solver lands to the teacher's distribution, with no
  data set needed (the reference row's figure is its distance to its own half-NFE solve). Only
  when named (not in ``"auto"``). Lower is better.
* ``psnr``: mean over samples of the per-sample PSNR (dB) against the reference solve from the
  same seed (``psnr``), each capped at ``PSNR_CAP`` dB so that samples equal to their reference
  (exact-data models land on training images) count as a finite figure. Higher is better.
* ``swd``: sliced Wasserstein-2 distance to the data reference set (``swd``). Lower is better.
* ``loglik``: mean exact log-density of the samples under the model's data distribution
  (``loglik``). Not "higher is better": a solver that collapses samples onto modes scores above
  the data; compare with the reference row and the data's own figure.

``"auto"`` picks: fd and kid when a feature network is given (any nn.Module, e.g. Inception
with the user's weights) or the model draws digits (the built-in digits classifier); psnr for
image-shaped samples (C, H, W) with C in {1, 3}; swd when a sample has at most
``SWD_MAX_DIM`` numbers; loglik when the model has ``log_prob``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import FewstepError
from ..io import is_image
from .features import check_digits_shape
from .likelihood import average_log_likelihood, has_log_prob
from .pixel import psnr
from .reference import DataReference, is_digits_model
from .sliced import sliced_wasserstein

METRICS: tuple[str, ...] = ("fd", "kid", "fd_ref", "psnr", "swd", "loglik")
ROW_KEYS: tuple[str, ...] = ("fd", "kid", "kid_std", "fd_ref", "psnr", "swd", "loglik")
FEATURE_METRICS: tuple[str, ...] = ("fd", "kid", "fd_ref")  # need a feature network
DISTRIBUTION: tuple[str, ...] = ("fd", "kid", "swd")
SWD_MAX_DIM = 32
PSNR_CAP = 100.0  # dB: an RMS error of 1e-5 of the data range


def _digits_features_fit(model: Any) -> bool:
    shape = tuple(getattr(model, "sample_shape", None) or ())
    try:
        check_digits_shape(shape)
    except FewstepError:
        return False
    return is_digits_model(model)


def parse_metrics(metrics: str | Iterable[str] | None) -> str | tuple[str, ...]:
    """``"auto"``, or the named metrics as a tuple (empty for None / "none" / "")."""
    if metrics is None:
        return ()
    if isinstance(metrics, str):
        if metrics.strip().lower() == "auto":
            return "auto"
        if metrics.strip().lower() in ("", "none"):
            return ()
        metrics = [m for m in metrics.replace(" ", "").split(",") if m]
    names = tuple(dict.fromkeys(str(m).lower() for m in metrics))
    bad = [m for m in names if m not in METRICS]
    if bad:
        raise FewstepError(f"unknown metric {bad[0]!r}; valid: auto, none, or any of {', '.join(METRICS)}")
    return names


def select_metrics(model: Any, metrics: str | Iterable[str] | None, feature: Any = None) -> tuple[str, ...]:
    """The metrics to compute for ``model``: ``"auto"`` resolved, named ones checked (FewstepError if unfit)."""
    req = parse_metrics(metrics)
    shape = tuple(getattr(model, "sample_shape", None) or ())
    has_features = feature is not None or _digits_features_fit(model)
    if isinstance(req, str):  # "auto", the only string parse_metrics returns
        dim = math.prod(shape) if shape else 0
        fit = {
            "fd": has_features,
            "kid": has_features,
            "fd_ref": False,
            "psnr": is_image(shape),
            "swd": 0 < dim <= SWD_MAX_DIM,
            "loglik": has_log_prob(model),
        }
        return tuple(m for m in METRICS if fit[m])
    name = getattr(model, "name", "this model")
    for m in req:
        if m in FEATURE_METRICS and not has_features:
            raise FewstepError(
                f"metric {m!r} needs a feature network for {name}: pass feature=<nn.Module> "
                "(e.g. Inception with your weights), or drop it"
            )
        if m == "loglik" and not has_log_prob(model):
            raise FewstepError(f"metric 'loglik' needs a model with an exact log_prob(x0); {name} has none: drop it")
    return req


class Decoded(nn.Module):
    """``feature(decode(x))``: a feature network over a latent model's decoded images, in chunks."""

    def __init__(self, decode: Any, feature: nn.Module, chunk: int = 64) -> None:
        super().__init__()
        self.decode, self.feature, self.chunk = decode, feature, int(chunk)

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.cat(
                [self.feature(self.decode(x[k : k + self.chunk])) for k in range(0, x.shape[0], self.chunk)]
            )


class MetricSuite:
    """Computes the selected metrics for sample sets of one model.

    Args:
        model: the Denoiser (its ``log_prob`` is used for loglik).
        names: metrics to compute (see :func:`select_metrics`).
        data: the data reference set (needed for fd, kid, swd).
        feature: feature network for fd / kid: an nn.Module, "digits", or None (digits when it fits).
        n_projections, seed: sliced Wasserstein directions; seed also fixes KID's subsets.
        kid_subsets, kid_subset_size: KID subset draws.
        data_range: max - min of the data, for PSNR (2 for [-1, 1]).
    """

    def __init__(
        self,
        model: Any,
        names: Sequence[str],
        data: DataReference | None = None,
        feature: nn.Module | str | None = None,
        n_projections: int = 256,
        kid_subsets: int = 20,
        kid_subset_size: int = 1000,
        seed: int = 0,
        data_range: float = 2.0,
    ) -> None:
        self.model, self.names = model, tuple(names)
        self.data = data
        self.n_projections, self.seed, self.data_range = int(n_projections), int(seed), float(data_range)
        if self.needs_data and data is None:
            raise FewstepError(
                f"metrics {', '.join(n for n in self.names if n in DISTRIBUTION)} need a data "
                "reference set: pass data=<samples>"
            )
        self.distances = None
        self.feature_label: str | None = None
        self.kid_subsets, self.kid_subset_size = int(kid_subsets), int(kid_subset_size)
        self._feature: Any = None
        self._to_ref: tuple[Any, int, Any] = (None, -1, None)  # (reference samples, their version, FeatureDistances)
        if any(n in FEATURE_METRICS for n in self.names):
            from .features import FeatureMap, digits_features

            if feature is None or feature == "digits":
                check_digits_shape(tuple(getattr(model, "sample_shape", None) or ()))
                self._feature = digits_features()
            elif isinstance(feature, nn.Module):
                decode = getattr(model, "decode", None)
                # a latent model's samples are decoded (its VAE) before the user's feature network sees them
                self._feature = feature if decode is None else Decoded(decode, feature)
            else:
                raise FewstepError(f"feature must be an nn.Module or 'digits'; got {feature!r}")
            if isinstance(self._feature, FeatureMap):
                self.feature_label = self._feature.label
        if "fd" in self.names or "kid" in self.names:
            from .frechet import FeatureDistances

            assert data is not None  # fd and kid are in DISTRIBUTION: needs_data raised above without data
            self.distances = FeatureDistances(
                data.samples, self._fmap(data.samples), self.kid_subsets, self.kid_subset_size, seed
            )

    def _fmap(self, example: Tensor) -> Any:
        """The feature map (a user's nn.Module is wrapped once, its output shape probed on ``example``)."""
        from .features import FeatureMap

        if not isinstance(self._feature, FeatureMap):
            self._feature = FeatureMap(self._feature, example=example[:1])
            self.feature_label = self._feature.label
        return self._feature

    def _fd_to(self, ref: Tensor, x: Tensor) -> float:
        """FD between x and ``ref`` (the features of ``ref`` are kept while the same tensor comes back)."""
        from .frechet import FeatureDistances

        held, version, dist = self._to_ref
        if held is not ref or version != ref._version:
            dist = FeatureDistances(ref, self._fmap(ref), self.kid_subsets, self.kid_subset_size, self.seed)
            self._to_ref = (ref, ref._version, dist)
        return dist.frechet(x)

    @property
    def needs_data(self) -> bool:
        return any(n in DISTRIBUTION for n in self.names)

    def row(self, x: Tensor, ref: Tensor | None = None, cond: dict[str, Any] | None = None) -> dict[str, Any]:
        """The metrics of samples x (B, *shape); ``ref`` (B, *shape) is the per-seed reference (PSNR, fd_ref).

        Every key of ``ROW_KEYS`` is present; metrics not selected (or samples that are not finite) give None.
        """
        out: dict[str, Any] = dict.fromkeys(ROW_KEYS)
        if not torch.isfinite(x).all():
            return out
        if self.distances is not None:
            if "fd" in self.names:
                out["fd"] = self.distances.frechet(x)
            if "kid" in self.names:
                out["kid"], out["kid_std"] = self.distances.kid(x)
        if "fd_ref" in self.names and ref is not None:
            out["fd_ref"] = self._fd_to(ref, x)
        if "psnr" in self.names and ref is not None:
            out["psnr"] = float(psnr(x, ref, self.data_range).clamp(max=PSNR_CAP).mean())
        if "swd" in self.names:
            assert self.data is not None  # swd is in DISTRIBUTION: __init__ refused a suite without data
            out["swd"] = sliced_wasserstein(x, self.data.samples, self.n_projections, self.seed)
        if "loglik" in self.names:
            out["loglik"] = average_log_likelihood(self.model.log_prob, x, cond)[0]
        return out

    def info(self) -> dict[str, Any]:
        """What was measured against what (for reports)."""
        d: dict[str, Any] = {
            "names": list(self.names),
            "feature": self.feature_label,
            "data_reference": self.data.describe() if self.data is not None else None,
        }
        if "loglik" in self.names and self.data is not None and d["data_reference"] is not None:
            d["data_reference"]["loglik"] = average_log_likelihood(self.model.log_prob, self.data.samples)[0]
        return d


__all__ = [
    "DISTRIBUTION",
    "FEATURE_METRICS",
    "METRICS",
    "MetricSuite",
    "PSNR_CAP",
    "ROW_KEYS",
    "SWD_MAX_DIM",
    "parse_metrics",
    "select_metrics",
]
