"""Helpers shared by the zoo models: schedule arguments, batched times, class labels."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..errors import ModelSpecError
from ..schedules import F64, Schedule, schedule_from_config

if TYPE_CHECKING:
    from ..denoiser import Denoiser


def as_schedule(schedule: Schedule | Mapping[str, Any] | None, default: Schedule) -> Schedule:
    """A Schedule from an instance, a ``Schedule.config()`` dict, or None (the default)."""
    if schedule is None:
        return default
    if isinstance(schedule, Schedule):
        return schedule
    if isinstance(schedule, Mapping):
        return schedule_from_config(dict(schedule))
    raise ModelSpecError(f"schedule must be a Schedule or its config dict; got {type(schedule).__name__}")


def batch_times(t: Tensor | float, batch: int, device: torch.device) -> Tensor:
    """Times as a float64 column (B, 1): a scalar is broadcast, a (B,) tensor kept."""
    t = torch.as_tensor(t, dtype=F64, device=device)
    if t.dim() == 0:
        t = t.expand(batch)
    return t.reshape(batch, 1)


def labels_or_none(class_labels: Any, batch: int, device: torch.device) -> Tensor | None:
    """class_labels as a LongTensor (B,) or None (unconditional); -1 entries mean unconditional."""
    if class_labels is None:
        return None
    lab = torch.as_tensor(class_labels, device=device).long()
    if lab.dim() == 0:
        lab = lab.expand(batch)
    lab = lab.reshape(-1)
    if lab.numel() != batch:
        raise ModelSpecError(f"class_labels must hold one label per sample: got {lab.numel()} for a batch of {batch}")
    return lab


def attach(
    den: Denoiser,
    *,
    exact_solution: Callable[[Tensor], Tensor] | None = None,
    exact_map: Callable[[Tensor, Tensor | float, Tensor | float], Tensor] | None = None,
    log_prob: Callable[..., Tensor] | None = None,
    sample_data: Callable[..., Tensor] | None = None,
) -> Denoiser:
    """Give ``den`` the optional methods that evaluation and the metrics look up with ``getattr``.

    ``exact_solution(x_T (B, ...)) -> x_0``, ``exact_map(x (B, ...), t_from, t_to)``,
    ``log_prob(x0 (B, ...), [class_labels]) -> (B,)``, ``sample_data(n, generator=None, ...) -> (n, ...)``.
    A method left None stays absent (``hasattr`` is False), which is how its lack is detected.
    """
    methods = {
        "exact_solution": exact_solution,
        "exact_map": exact_map,
        "log_prob": log_prob,
        "sample_data": sample_data,
    }
    for name, fn in methods.items():
        if fn is not None:
            setattr(den, name, fn)
    return den
