"""The :class:`Family` interface: one loaded diffusers pipeline seen as fewstep needs it.

A family adapter owns everything that differs between pipeline families: how prompts become
conditioning rows, what the unconditional rows are, how the network is called (extra inputs,
packing, time units), the latent shape for an image size, and the VAE decode. fewstep's
:class:`~fewstep.denoiser.Denoiser` then only sees ``forward(x, t_net, rows)``.

Guidance
--------
``forward`` never guides. For ``guidance_mode == "cfg"`` fewstep's Denoiser calls ``forward`` once
on ``cat([x, x])`` with ``cat([cond rows, null rows])`` and combines ``out_u + w (out_c - out_u)``.
That is the guidance of every pipeline handled here:

* SD, SDXL, SD3, PixArt-Sigma batch ``[uncond, cond]`` and form ``u + w (c - u)`` on the whole
  network output; fewstep batches ``[cond, uncond]``. The order does not matter: these networks
  treat every batch row independently (no batch statistics in eval mode), so each row's output is
  the same in either order.
* PixArt-Sigma guides all 2C channels of its learned-sigma output, then keeps the first C. The
  combination acts channel by channel, so keeping the first C channels first (as ``forward``
  does) and guiding them gives the same C channels.
* DiT guides only the first C (eps) channels and passes the variance channels through unguided;
  its scheduler then uses only the first C channels, so the variance channels never reach the
  sample. ``forward`` drops them before guidance: the same eps, the same sample.
* The combination is the same in any prediction space (eps, v, x0, flow velocity): converting an
  output to another space is affine, ``a(t) x + b(t) out``, with the same x and t for both halves,
  and the guidance weights ``(1 - w) + w`` sum to one, so guiding then converting equals converting
  then guiding (SD 2.x-v guides v; fewstep may use it as eps or x0).
* Flux with ``guidance_embeds`` (``guidance_mode == "distilled"``) has no second half: the scale is
  a network input (``guidance``, (B,)). Flux's optional "true CFG" (a negative prompt and
  ``true_cfg_scale > 1``) runs a second call on the negative rows and forms ``neg + s (cond - neg)``,
  which is again the Denoiser's combination, with ``null_rows`` as the negative ("" encoded).
* Not covered (off by default in the pipelines): ``guidance_rescale`` (SD/SDXL), SD3's skip-layer
  guidance, and guidance-embedding UNets (``time_cond_proj_dim``, LCM), which are refused.

``guidance_mode == "none"``: a network with neither a second half nor a guidance input by default
(FLUX.1-schnell-style Flux without ``guidance_embeds``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...conditions import ClassSet, ConditionSpec, PromptSet
from ...errors import FewstepError, ModelSpecError, ShapeError

GUIDANCE_MODES = ("cfg", "distilled", "none")


class Family(ABC):
    """A loaded diffusers pipeline as fewstep sees it (conditioning rows, network call, decode).

    Shapes: ``x`` is (B, C, h, w), one UNPACKED latent per sample; ``rows`` maps each conditioning key
    to a tensor with B rows (row i conditions sample i); ``t_net`` is (B,) float in the network's own
    time units as fewstep's schedule gives them (a fractional DDPM index for DDPM-style schedulers,
    sigma * num_train_timesteps for flow matching). See the module docstring for guidance.

    Attributes:
        name: family name ("sd", "sdxl", "dit", "pixart-sigma", "sd3", "flux").
        pipeline_classes: diffusers pipeline class names handled (model_index.json ``_class_name``).
        guidance_mode: "cfg" (second, unconditional half), "distilled" (guidance scale is a network
            input, no second half) or "none" (neither).
        text_conditional: each sample takes a prompt (else a class label: :attr:`num_classes`).
        shift_base: the grid a dynamically shifted flow pipeline shifts: "train" (its training sigmas) or
            "steps" (sigmas linspace(1, 1/n, n), as FluxPipeline passes them).
        network: the denoising network (``pipe.unet`` or ``pipe.transformer``).
        scheduler_config: ``dict(pipe.scheduler.config)`` (with ``_class_name`` filled in when the
            in-memory config lacks it): what the model was trained with.
        image_size: (H, W) in pixels of the images being made; set by :meth:`sample_shape`
            (default: the pipeline's default size).
    """

    name: ClassVar[str]
    pipeline_classes: ClassVar[tuple[str, ...]]
    guidance_mode: str = "cfg"
    text_conditional: ClassVar[bool] = True
    shift_base: ClassVar[str] = "train"
    network_attr: ClassVar[str] = "unet"  # the pipeline component holding the network
    text_encoder_attrs: ClassVar[tuple[str, ...]] = ()  # pipeline components named in identity()

    def __init__(self, pipe: Any) -> None:
        """``pipe``: a loaded pipeline whose components are already on their device / dtype."""
        net = getattr(pipe, self.network_attr, None)
        if not isinstance(net, nn.Module):
            raise ModelSpecError(
                f"{type(pipe).__name__} has no {self.network_attr} network: the {self.name} "
                f"family needs a loaded pipeline with its {self.network_attr}"
            )
        if getattr(pipe, "vae", None) is None:
            raise ModelSpecError(f"{type(pipe).__name__} has no vae: the {self.name} family needs it to decode")
        self.pipe = pipe
        self.network: nn.Module = net
        cfg = dict(pipe.scheduler.config)
        if not cfg.get("_class_name"):
            cfg["_class_name"] = type(pipe.scheduler).__name__
        self.scheduler_config: dict[str, Any] = cfg
        vae_cfg = pipe.vae.config
        self.vae_scale_factor: int = int(
            getattr(pipe, "vae_scale_factor", None) or 2 ** (len(vae_cfg.block_out_channels) - 1)
        )
        self.image_size: tuple[int, int] = self.default_image_size()
        self._null: dict[str, Tensor] | None = None

    # ------------------------------------------------------------------ to implement
    @abstractmethod
    def default_image_size(self) -> tuple[int, int]:
        """(H, W) in pixels the pipeline makes when no height / width is given."""

    @abstractmethod
    def _latent_hw(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the unpacked latent for an image of height x width (ShapeError where refused)."""

    @property
    @abstractmethod
    def latent_channels(self) -> int:
        """C: channels of one unpacked latent."""

    @abstractmethod
    def encode(self, prompts: list[str]) -> dict[str, Tensor]:
        """Per-prompt conditioning rows from the pipeline's own prompt encoder: {key: (P, ...)}.

        Exactly what the pipeline would pass the network for each prompt (no SDXL time_ids: see forward).
        """

    @abstractmethod
    def _null_row(self) -> dict[str, Tensor]:
        """One row (batch 1) of the unconditional condition the pipeline uses without a negative prompt."""

    @abstractmethod
    def forward(self, x: Tensor, t_net: Tensor, rows: dict[str, Tensor], guidance: Tensor | None = None) -> Tensor:
        """The network's prediction at x (B, C, h, w), network time t_net (B,), rows with B rows each.

        ``guidance`` (B,) only for guidance_mode "distilled". Returns (B, C, h, w) in x's dtype: eps / v /
        x0 / flow velocity as the scheduler's prediction_type says (first C channels of a learned-sigma
        output). Adds whatever else the network needs.
        """

    @abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """Unpacked latents (B, C, h, w) -> images (B, 3, H, W) in [-1, 1], in the latents' dtype."""

    # ------------------------------------------------------------------ shared
    @property
    def network_config(self) -> Any:
        """The network's diffusers config (a FrozenDict that also reads as attributes: ``.in_channels``)."""
        cfg = getattr(self.network, "config", None)
        if cfg is None:
            raise ModelSpecError(
                f"{type(self.network).__name__} has no config: the {self.name} family needs a diffusers model"
            )
        return cfg

    @property
    def num_classes(self) -> int | None:
        """How many class labels a class-conditional family takes; None for a text-conditional one."""
        return None

    def condition_sets(self, spec: ConditionSpec) -> tuple[PromptSet | None, ClassSet | None]:
        """(prompt set, class set) the seeds draw from, of the conditions asked for: a text family takes prompts
        (none: it samples with explicit prompts only) and refuses classes in one line."""
        if spec.classes is not None:
            raise FewstepError(f"{self.name} is text-conditional: give --prompts FILE, not --classes")
        return spec.prompts, None

    def image_tokens(self, shape: tuple[int, int, int]) -> int:
        """The image tokens of one latent (C, h, w), the count a flow pipeline's dynamic shift is computed from:
        (h / p) (w / p) for the network's patch size p (1 without one)."""
        patch = int(getattr(self.network_config, "patch_size", 1) or 1)
        return (shape[1] // patch) * (shape[2] // patch)

    def sample_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """(C, h, w) of one UNPACKED latent for a height x width image (default: the pipeline's size).

        Also makes (height, width) the adapter's ``image_size`` (SDXL's time_ids, PixArt's resolution).
        """
        dh, dw = self.default_image_size()
        H, W = int(height or dh), int(width or dw)
        if H <= 0 or W <= 0:
            raise ShapeError(f"image size must be positive; got {H}x{W}")
        h, w = self._latent_hw(H, W)
        self.image_size = (H, W)
        return (int(self.latent_channels), int(h), int(w))

    def null_rows(self, n: int) -> dict[str, Tensor]:
        """n rows of the unconditional condition the pipeline uses when no negative prompt is given."""
        if self._null is None:
            with torch.no_grad():
                self._null = {k: v.detach() for k, v in self._null_row().items()}
        return {k: v.repeat(int(n), *([1] * (v.dim() - 1))) for k, v in self._null.items()}

    def tokenizers(self) -> list[Any]:
        """The pipeline's tokenizers, one per text encoder it has (none for class-conditional families)."""
        names = [a.replace("text_encoder", "tokenizer") for a in self.text_encoder_attrs]
        return [t for t in (getattr(self.pipe, n, None) for n in names) if t is not None]

    def identity(self) -> dict[str, Any]:
        """JSON-able facts that tell models apart (not the weights): family, network, encoders, size."""
        encoders = [
            type(getattr(self.pipe, a)).__name__
            for a in self.text_encoder_attrs
            if getattr(self.pipe, a, None) is not None
        ]
        return {
            "family": self.name,
            "pipeline": type(self.pipe).__name__,
            "network": type(self.network).__name__,
            "text_encoders": encoders,
            "image_size": list(self.image_size),
            "sample_shape": list(self.sample_shape(*self.image_size)),
            "guidance_mode": self.guidance_mode,
            **self._identity_extra(),
        }

    def _identity_extra(self) -> dict[str, Any]:
        return {}

    @property
    def device(self) -> torch.device:
        """Where the pipeline runs its text encoders (conditioning rows are made there)."""
        return self.pipe._execution_device

    @property
    def network_dtype(self) -> torch.dtype:
        """The dtype of the network's parameters (inputs are cast to it)."""
        return _param(self.network).dtype

    @property
    def network_device(self) -> torch.device:
        """Where the network's parameters are (its inputs are moved there)."""
        return _param(self.network).device

    def _rows(self, rows: dict[str, Tensor], batch: int, keys: tuple[str, ...]) -> dict[str, Tensor]:
        """``rows[k]`` for k in keys on the network's device, each with ``batch`` rows (batch 1 is shared)."""
        missing = [k for k in keys if k not in rows]
        if missing:
            raise FewstepError(
                f"{self.name} needs the conditioning rows {', '.join(keys)}; missing "
                f"{', '.join(missing)} (build them with encode(prompts) / null_rows(n))"
            )
        out = {}
        for k in keys:
            v = rows[k]
            if not isinstance(v, Tensor):
                v = torch.as_tensor(v)
            if v.dim() == 0:
                v = v.reshape(1)
            if v.shape[0] == 1 and batch > 1:
                v = v.expand(batch, *v.shape[1:])
            if v.shape[0] != batch:
                raise ShapeError(
                    f"{self.name}: rows[{k!r}] has {v.shape[0]} rows for a batch of {batch}: give one row per sample"
                )
            out[k] = v.to(self.network_device)
        return out

    def _check_x(self, x: Tensor, t_net: Tensor | float) -> Tensor:
        """Validate x (B, C, h, w) and return t_net as a float32 (B,) tensor on the network's device."""
        if x.dim() != 4 or x.shape[1] != self.latent_channels:
            raise ShapeError(
                f"{self.name}: x must be (B, {self.latent_channels}, h, w) unpacked latents; got {tuple(x.shape)}"
            )
        t = torch.as_tensor(t_net).detach().to(self.network_device, torch.float32).reshape(-1)
        if t.numel() == 1:
            t = t.expand(x.shape[0])
        if t.numel() != x.shape[0]:
            raise ShapeError(f"{self.name}: t_net has {t.numel()} entries for a batch of {x.shape[0]}")
        return t

    def _no_guidance(self, guidance: Tensor | None) -> None:
        if guidance is not None:
            raise FewstepError(
                f"{self.name} ({self.guidance_mode} guidance) takes no guidance input: "
                f"guide with the Denoiser's guidance_scale instead"
            )

    def _run_vae(self, z: Tensor, upcast: bool = False) -> Tensor:
        """``vae.decode(z)`` on the VAE's device and dtype (float32 if ``upcast``), clamped to [-1, 1]."""
        vae = self.pipe.vae
        p = _param(vae)
        dtype = torch.float32 if upcast else p.dtype
        restore = p.dtype if upcast and p.dtype != torch.float32 else None
        if restore is not None:
            vae.to(dtype=torch.float32)
        try:
            with torch.no_grad():
                img = vae.decode(z.to(p.device, dtype), return_dict=False)[0]
        finally:
            if restore is not None:
                vae.to(dtype=restore)
        return img.clamp(-1.0, 1.0)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({type(self.pipe).__name__}, {type(self.network).__name__}, "
            f"image_size={self.image_size})"
        )


def _param(module: nn.Module) -> Tensor:
    try:
        return next(module.parameters())
    except StopIteration:  # pragma: no cover - a network without parameters
        raise ModelSpecError(f"{type(module).__name__} has no parameters") from None


def out_tensor(out: Any) -> Tensor:
    """The tensor of a diffusers model output (tuple or output object)."""
    if isinstance(out, (tuple, list)):
        return out[0]
    return getattr(out, "sample", out)


def check_multiple(name: str, height: int, width: int, k: int, why: str) -> None:
    """ShapeError unless height and width are multiples of k."""
    if height % k or width % k:
        raise ShapeError(f"{name}: height and width must be multiples of {k} ({why}); got {height}x{width}")
