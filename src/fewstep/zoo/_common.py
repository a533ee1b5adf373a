"""Helpers shared by the zoo models: schedule arguments, batched times, class labels."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from ..errors import ModelSpecError
from ..schedules import Schedule, schedule_from_config

F64 = torch.float64


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


def seeded_labels(seeds: list[int], weights: Tensor, salt: int) -> Tensor:
    """One label per seed, drawn from ``weights`` with a generator of its own per seed.

    The stream is salted so labels are independent of the starting noise drawn from the
    same seed; the result does not depend on how seeds are batched.
    """
    w = weights.detach().cpu().to(F64)
    out = []
    for seed in seeds:
        g = torch.Generator().manual_seed((int(seed) * 1_000_003 + salt) % (2**63 - 1))
        out.append(int(torch.multinomial(w, 1, generator=g)))
    return torch.tensor(out, dtype=torch.long)
