"""Exact log-likelihood of samples under a model whose data density is known (``model.log_prob``)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..errors import FewstepError


def has_log_prob(model: Any) -> bool:
    """Whether ``model`` exposes an exact data log-density ``log_prob(x0)``."""
    return callable(getattr(model, "log_prob", None))


def _takes_labels(log_prob: Callable[..., Tensor]) -> bool:
    try:
        return "class_labels" in inspect.signature(log_prob).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False


def log_likelihood(log_prob: Callable[..., Tensor], x: Tensor, cond: dict[str, Any] | None = None) -> Tensor:
    """log p(x[b]) per sample: shape (B,), float64.

    ``cond`` is the samples' conditioning (``Denoiser.cond_for``); class labels are passed on
    when ``log_prob`` takes them, so conditional samples are scored under their class density.
    """
    labels = (cond or {}).get("class_labels")
    lp = log_prob(x, class_labels=labels) if labels is not None and _takes_labels(log_prob) else log_prob(x)
    lp = torch.as_tensor(lp).to(torch.float64).reshape(-1)
    if lp.numel() != x.shape[0]:
        raise FewstepError(
            f"log_prob returned {lp.numel()} values for {x.shape[0]} samples: it must return one "
            "log-density per sample, shape (B,)"
        )
    return lp


def average_log_likelihood(
    log_prob: Callable[..., Tensor], x: Tensor, cond: dict[str, Any] | None = None
) -> tuple[float, float]:
    """(mean, standard error) over samples x (B, *shape) of log p(x)."""
    lp = log_likelihood(log_prob, x, cond)
    sem = float(lp.std() / math.sqrt(lp.numel())) if lp.numel() > 1 else 0.0
    return float(lp.mean()), sem


__all__ = ["average_log_likelihood", "has_log_prob", "log_likelihood"]
