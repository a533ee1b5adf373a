"""What a scenes model's samples show: each seed's caption, its decoded image, and prompt adherence.

A text model draws each seed's prompt from its prompt set (:class:`~fewstep.conditions.Conditioning`), a
class-conditional one its class; :func:`captions_of` gives the caption a seed was conditioned on
(DiT's class "red circle" as "a red circle"), so the attribute classifier can score the image against it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ...conditions import Conditioning
from ...denoiser import Denoiser
from ...errors import FewstepError
from ...sampling import sample
from .classifier import prompt_adherence
from .models import DIT_CLASSES


def captions_of(model: Denoiser, seeds: Sequence[int]) -> list[str]:
    """The caption each seed of ``model`` is conditioned on (its prompt, or its class as a caption)."""
    cond = model.cond_sampler
    if not isinstance(cond, Conditioning):
        raise FewstepError(f"{model.name} draws no prompts or classes per seed: no captions to score against")
    if cond.prompts is not None:
        return [cond.prompts.entries[int(i)].prompt for i in cond.prompts.draw(list(seeds))]
    if cond.classes is not None:
        return [f"a {DIT_CLASSES[int(k)]}" for k in cond.classes.draw(list(seeds))]
    raise FewstepError(f"{model.name} draws no prompts or classes per seed: no captions to score against")


def decoded_samples(
    model: Denoiser, seeds: Sequence[int], solver: Any, nfe: int | None = None, batch: int = 128
) -> Tensor:
    """Images (N, 3, 32, 32) in [-1, 1] of ``seeds`` solved by ``solver`` (a classic ``NAME@GRID`` with ``nfe``,
    an artifact, ...) and decoded by the model's VAE."""
    if model.decode is None:
        raise FewstepError(f"{model.name} has no decoder: prompt adherence needs images")
    out = []
    for i in range(0, len(seeds), batch):
        part = list(seeds[i : i + batch])
        with torch.no_grad():
            x = sample(model, model.noise(part), solver=solver, nfe=nfe, cond=model.cond_for(part))
            assert isinstance(x, Tensor)  # no trajectory asked
            out.append(model.decode(x).float().clamp(-1, 1))
    return torch.cat(out)


def adherence(model: Denoiser, seeds: Sequence[int], solver: Any, nfe: int | None = None) -> dict[str, Any]:
    """Prompt adherence of ``model``'s samples of ``seeds`` under ``solver`` (see
    :func:`~.classifier.prompt_adherence`: ``adherence``, ``all_correct``, ``per_attribute``, ``chance``)."""
    return prompt_adherence(decoded_samples(model, seeds, solver, nfe), captions_of(model, seeds))
