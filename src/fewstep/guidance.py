"""Guidance around a network call, and what a model's samples are conditioned on.

:class:`Guidance` calls a network ``net(x, t_net, **cond)`` guided at a scale w in one of three forms:

- classifier-free guidance: cond and uncond halves in one batched call, E = E_u + w (E_c - E_u) (any
  prediction: the combination is affine with weights summing to one, so it commutes with the conversions);
- the same with one scale per sample: ``cond["guidance_scale"]`` a (B,) tensor (a model fitted across
  several scales sees several at once);
- a guidance-input network (guidance-distilled, FLUX.1-dev): the scale goes in as ``guidance=`` (B,), no
  second half.

:class:`Conditions` is the one object a :class:`~fewstep.denoiser.Denoiser` keeps about its conditions: the
guidance, the per-seed condition sampler and the class count; :meth:`Conditions.narrowed` applies a
:class:`~fewstep.conditions.ConditionSpec` (classes and sets of scales drawn per seed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .conditions import Conditioning, ConditionSpec
from .errors import FewstepError, ShapeError

Uncond = Mapping[str, Any] | Callable[[dict], dict]


def guided(w: Any) -> bool:
    """Does a scale (None, a number, or a (B,) tensor) ask for classifier-free guidance?"""
    if w is None:
        return False
    if isinstance(w, Tensor):
        return bool((w != 1.0).any())
    return float(w) != 1.0


def cat_cond(cond: Mapping[str, Any], uncond: Mapping[str, Any]) -> dict[str, Any]:
    """Concatenate cond and uncond keyword arguments along the batch dimension.

    A tensor only the unconditional half names (a flag such as ``negative``) is zero in the conditional half.
    """
    out: dict[str, Any] = {}
    for k, u in uncond.items():
        if k not in cond and isinstance(u, Tensor) and u.dim() > 0:
            out[k] = torch.cat([torch.zeros_like(u), u], 0)
    for k, v in cond.items():
        u = uncond.get(k, v)
        if isinstance(v, Tensor):
            u = u if isinstance(u, Tensor) else torch.as_tensor(u, dtype=v.dtype, device=v.device)
            if u.shape != v.shape:
                u = u.expand_as(v) if u.dim() == v.dim() or u.numel() == 1 else u
            out[k] = torch.cat([v, u.to(v.device, v.dtype)], 0)
        else:
            out[k] = v
    return out


def check_output(out: Any, want: tuple[int, ...], prediction: str) -> None:
    """A ShapeError unless a network returned a tensor (or an output with ``.sample``) of shape ``want``."""
    if not isinstance(out, Tensor):
        out = getattr(out, "sample", out)
        if not isinstance(out, Tensor):
            raise ShapeError(f"the network must return a tensor; got {type(out).__name__}")
    if tuple(out.shape) != want:
        raise ShapeError(
            f"the network returned shape {tuple(out.shape)} for input shape {want}: "
            f"it must return one {prediction} prediction shaped like its input"
        )


@dataclass
class Guidance:
    """How a network is guided (see the module docstring).

    ``scale``: the model's scale w (None: unguided); ``uncond``: the unconditional half's keyword arguments (or
    ``uncond(cond) -> dict``); ``takes_scale``: the network takes the scale itself (``guidance=`` (B,)).
    """

    scale: float | None = None
    uncond: Uncond | None = None
    takes_scale: bool = False

    def __call__(
        self, net: Callable[..., Tensor], x: Tensor, t_net: Tensor, cond: dict[str, Any], prediction: str = "eps"
    ) -> tuple[Tensor, int]:
        """(the guided output (B, ...), the rows that went through ``net``: B or 2B). ``cond`` is consumed:
        its ``guidance_scale`` (a number or (B,) tensor) overrides ``scale``."""
        w = cond.pop("guidance_scale", self.scale)
        b = x.shape[0]
        if self.takes_scale:  # one call, no unconditional half
            scale = torch.as_tensor(1.0 if w is None else w, dtype=torch.float32, device=x.device)
            out = net(x, t_net, guidance=scale.expand(b) if scale.dim() == 0 else scale, **cond)
            check_output(out, tuple(x.shape), prediction)
            return out, b
        if not guided(w):
            out = net(x, t_net, **cond)
            check_output(out, tuple(x.shape), prediction)
            return out, b
        unc = self.uncond(cond) if callable(self.uncond) else dict(self.uncond or {})
        out = net(torch.cat([x, x], 0), torch.cat([t_net, t_net], 0), **cat_cond(cond, unc))
        check_output(out, (2 * b, *x.shape[1:]), prediction)
        out_c, out_u = out.chunk(2, 0)
        if isinstance(w, Tensor):  # one scale per sample
            w = w.to(device=out.device, dtype=out.dtype).reshape(-1, *[1] * (out.dim() - 1))
        return out_u + w * (out_c - out_u), 2 * b


@dataclass
class Conditions:
    """What a model's samples are conditioned on: how its network is guided (``guidance``), the per-seed keyword
    arguments of its network (``sampler(seeds) -> dict``; a :class:`~fewstep.conditions.Conditioning` for prompt,
    class and guidance sets) and how many class labels it takes (``num_classes``, for ``classes="all"``)."""

    guidance: Guidance = field(default_factory=Guidance)
    sampler: Callable[[list[int]], dict[str, Any]] | None = None
    num_classes: int | None = None

    def draw(self, seeds: Sequence[int], device: str | torch.device = "cpu") -> dict[str, Any]:
        """The keyword arguments for samples drawn from ``seeds`` (empty if unconditional)."""
        if self.sampler is None:
            return {}
        return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in self.sampler(list(seeds)).items()}

    def scales(self) -> tuple[float, ...] | None:
        """The guidance scales the seeds draw from when there are several (a fit covers them all), else None."""
        c = self.sampler
        if isinstance(c, Conditioning) and c.guidance is not None and len(c.guidance.scales) > 1:
            return c.guidance.scales
        return None

    def some_scale(self) -> float:
        """A scale the samples use: the middle of the scales the seeds draw from, else the model's (1: unguided)."""
        c = self.sampler
        if isinstance(c, Conditioning) and c.guidance is not None and len(c.guidance.scales) > 1:
            return c.guidance.middle
        return 1.0 if self.guidance.scale is None else float(self.guidance.scale)

    def scale_of(self, cond: Mapping[str, Any]) -> float | Tensor:
        """The scale of a batch's samples: ``cond``'s per-sample ``guidance_scale`` (a number or (B,) tensor),
        else the model's (1: unguided)."""
        w = cond.get("guidance_scale", self.guidance.scale)
        return 1.0 if w is None else w

    def key(self) -> str:
        """A name for the set conditions are drawn from ('' when the sampler does not name it)."""
        return self.sampler.digest() if isinstance(self.sampler, Conditioning) else ""

    def narrowed(self, spec: ConditionSpec, model: str) -> Conditions:
        """These conditions drawing class labels from ``spec.classes`` and, for several scales, a guidance scale per
        seed from ``spec.guidance`` (self when the spec asks for neither). ``model`` names the model in errors."""
        several = spec.guidance if spec.guidance is not None and len(spec.guidance.scales) > 1 else None
        if spec.classes is None and several is None:
            return self
        if spec.classes is not None and self.num_classes is None and self.sampler is None:
            raise FewstepError(f"{model} takes no class labels: drop --classes")
        if several is not None and self.guidance.uncond is None and not self.guidance.takes_scale:
            raise FewstepError(f"{model} has no unconditional half for guidance: give one scale or none")
        cset = spec.class_set(self.num_classes)
        sampler = Conditioning(
            classes=cset,
            guidance=several,
            base=self.sampler if cset is None else None,
            default_guidance=float(self.guidance.scale or 1.0),
        )
        return dataclasses.replace(self, sampler=sampler)
