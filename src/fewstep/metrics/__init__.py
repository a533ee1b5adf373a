"""Metrics beyond RMSE: Frechet distance and KID in a feature space, PSNR, sliced Wasserstein, exact log-likelihood.

    >>> from fewstep.metrics import frechet_distance, sliced_wasserstein, psnr
    >>> fd = frechet_distance(samples, data, feature=digits_features())   # (N, 1, 8, 8) vs (M, 1, 8, 8)

:func:`fewstep.evaluate.evaluate` computes them per solver with ``metrics="auto"`` (see
:mod:`.suite` for what "auto" picks and :mod:`.reference` for what the distribution metrics
are measured against). torchmetrics is needed for FD / KID only, and imported when they run;
the digits feature network needs scikit-learn and safetensors (``fewstep[zoo]``).
"""

from .classifier import DigitsClassifier, load_digits_classifier
from .features import DigitsFeatures, FeatureMap, digits_features
from .frechet import FeatureDistances, frechet_distance, kernel_distance
from .likelihood import average_log_likelihood, log_likelihood
from .pixel import per_sample_rmse, psnr
from .reference import DataReference, model_data, user_data
from .sliced import projection_directions, sliced_wasserstein, wasserstein2_sq_1d
from .suite import METRICS, MetricSuite, select_metrics

__all__ = [
    "DataReference",
    "DigitsClassifier",
    "DigitsFeatures",
    "FeatureDistances",
    "FeatureMap",
    "METRICS",
    "MetricSuite",
    "average_log_likelihood",
    "digits_features",
    "frechet_distance",
    "kernel_distance",
    "load_digits_classifier",
    "log_likelihood",
    "model_data",
    "per_sample_rmse",
    "projection_directions",
    "psnr",
    "select_metrics",
    "sliced_wasserstein",
    "user_data",
    "wasserstein2_sq_1d",
]
