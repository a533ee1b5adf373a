"""One adapter per diffusers pipeline family: a loaded pipeline as fewstep's network, conditioning and decoder.

    >>> fam = family_for(pipe)(pipe)                 # or adapt(pipe, max_sequence_length=...)
    >>> shape = fam.sample_shape(1024, 1024)         # (C, h, w) of one unpacked latent
    >>> cond, null = fam.encode(["a cat"]), fam.null_rows(1)
    >>> out = fam.forward(x, t_net, rows)            # eps / v / velocity, (B, C, h, w)
    >>> images = fam.decode(latents)                 # (B, 3, H, W) in [-1, 1]

Families (:data:`FAMILIES`): ``sd`` and ``sdxl`` (:mod:`.unet`), ``dit`` and ``pixart-sigma``
(:mod:`.dit`), ``sd3`` and ``flux`` (:mod:`.mmdit`). The interface and how guidance maps onto each
pipeline's own are in :mod:`.base`. Nothing here imports diffusers: the pipeline object brings it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...errors import ModelSpecError
from .base import GUIDANCE_MODES, Family
from .dit import DiTFamily, PixArtSigmaFamily
from .mmdit import FluxFamily, SD3Family
from .unet import SDFamily, SDXLFamily

FAMILIES: tuple[type[Family], ...] = (SDFamily, SDXLFamily, DiTFamily, PixArtSigmaFamily, SD3Family, FluxFamily)
_BY_CLASS: dict[str, type[Family]] = {c: fam for fam in FAMILIES for c in fam.pipeline_classes}


def supported_pipelines() -> tuple[str, ...]:
    """The diffusers pipeline class names some family handles."""
    return tuple(_BY_CLASS)


def family_for(pipe_or_class_name: Any) -> type[Family]:
    """The Family class for a pipeline object, a pipeline class, its class name (model_index.json
    ``_class_name``) or a model_index mapping. A subclass of a supported pipeline maps like its base.

    Raises ModelSpecError naming the supported pipeline classes.
    """
    obj = pipe_or_class_name
    if isinstance(obj, str):
        names = [obj]
    elif isinstance(obj, Mapping):
        names = [str(obj.get("_class_name", ""))]
    else:
        cls = obj if isinstance(obj, type) else type(obj)
        names = [c.__name__ for c in cls.__mro__]
    for n in names:
        if n in _BY_CLASS:
            return _BY_CLASS[n]
    raise ModelSpecError(
        f"no fewstep family handles the pipeline class {names[0] or '(none)'!r}; supported: {', '.join(_BY_CLASS)}"
    )


def adapt(pipe: Any, **options: Any) -> Family:
    """``family_for(pipe)(pipe, **options)``: the adapter for a loaded pipeline."""
    return family_for(pipe)(pipe, **options)


__all__ = [
    "FAMILIES",
    "GUIDANCE_MODES",
    "Family",
    "SDFamily",
    "SDXLFamily",
    "DiTFamily",
    "PixArtSigmaFamily",
    "SD3Family",
    "FluxFamily",
    "family_for",
    "adapt",
    "supported_pipelines",
]
