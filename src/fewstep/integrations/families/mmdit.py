"""MMDiT flow-matching families: Stable Diffusion 3 (``sd3``) and Flux (``flux``).

Both predict the flow velocity dx/dsigma = eps - x0 (FlowMatchEulerDiscreteScheduler), and fewstep's
t_net for them is sigma * num_train_timesteps (sigma * 1000).
Network time: SD3's transformer gets ``t_net`` (float32, (B,)) as is, as the pipeline passes
``scheduler.timesteps`` = sigma * 1000. Flux's transformer gets ``t_net / 1000`` (= sigma, in the
network's dtype, as the pipeline divides its timestep by 1000) and multiplies it by 1000 itself.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ...errors import FewstepError, ShapeError
from .base import Family, check_multiple, out_tensor


class _ShiftedVAE(Family):
    """SD3 and Flux: a VAE with a shift factor, T5 text of ``max_sequence_length`` tokens."""

    max_sequence_length: int

    def decode(self, latents: Tensor) -> Tensor:
        """vae.decode(latents / scaling_factor + shift_factor) of unpacked latents, clamped to [-1, 1]."""
        cfg = self.pipe.vae.config
        z = latents / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        return self._run_vae(z).to(latents.device, latents.dtype)

    def _identity_extra(self) -> dict[str, Any]:
        return {"max_sequence_length": self.max_sequence_length, "text_length": int(self.pipe.tokenizer_max_length)}


class SD3Family(_ShiftedVAE):
    """StableDiffusion3Pipeline.

    rows: ``encoder_hidden_states`` (P, 77 + L, D) (both CLIP penultimate states joined, zero-padded to
    the T5 width, then the T5 states) and ``pooled`` (P, P1 + P2) (both CLIP projections). Null rows:
    "" encoded (the pipeline's default negative). Option: ``max_sequence_length`` (T5 length, 256 as
    the pipeline's default).
    """

    name = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    network_attr = "transformer"
    text_encoder_attrs = ("text_encoder", "text_encoder_2", "text_encoder_3")

    def __init__(self, pipe: Any, *, max_sequence_length: int = 256) -> None:
        super().__init__(pipe)
        self.max_sequence_length = int(max_sequence_length)

    @property
    def latent_channels(self) -> int:
        return int(self.network_config.in_channels)

    def default_image_size(self) -> tuple[int, int]:
        s = int(getattr(self.pipe, "default_sample_size", None) or self.network_config.sample_size)
        return s * self.vae_scale_factor, s * self.vae_scale_factor

    def _latent_hw(self, height: int, width: int) -> tuple[int, int]:
        p = int(self.network_config.patch_size)
        check_multiple(self.name, height, width, self.vae_scale_factor * p, "the VAE factor times the patch size")
        h, w = height // self.vae_scale_factor, width // self.vae_scale_factor
        limit = self.network_config.get("pos_embed_max_size")
        if limit is not None and max(h, w) // p > int(limit):
            raise ShapeError(
                f"{self.name}: a {height}x{width} image needs {h // p}x{w // p} patches; the "
                f"transformer's position table holds at most {limit} per side"
            )
        return h, w

    def _encode(self, prompts: list[str], negatives: bool) -> tuple[Tensor, ...]:
        return self.pipe.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=negatives,
            max_sequence_length=self.max_sequence_length,
        )

    def encode(self, prompts: list[str]) -> dict[str, Tensor]:
        with torch.no_grad():
            emb, _, pooled, _ = self._encode(prompts, False)
        return {"encoder_hidden_states": emb, "pooled": pooled}

    def _null_row(self) -> dict[str, Tensor]:
        _, neg, _, neg_pooled = self._encode([""], True)
        return {"encoder_hidden_states": neg, "pooled": neg_pooled}

    def forward(self, x: Tensor, t_net: Tensor, rows: dict[str, Tensor], guidance: Tensor | None = None) -> Tensor:
        """transformer(x, timestep=t_net, encoder_hidden_states, pooled_projections) -> velocity (B, C, h, w)."""
        self._no_guidance(guidance)
        t = self._check_x(x, t_net)
        r = self._rows(rows, x.shape[0], ("encoder_hidden_states", "pooled"))
        dt = self.network_dtype
        out = self.network(
            hidden_states=x.to(self.network_device, dt),
            timestep=t,
            encoder_hidden_states=r["encoder_hidden_states"].to(dt),
            pooled_projections=r["pooled"].to(dt),
            return_dict=False,
        )
        return out_tensor(out)[:, : self.latent_channels].to(x.device, x.dtype)


class FluxFamily(_ShiftedVAE):
    """FluxPipeline (FLUX.1-dev style with ``guidance_embeds``: guidance_mode "distilled"; without it,
    FLUX.1-schnell style: "none").

    fewstep keeps the latent UNPACKED, (C, h, w) with C = in_channels / 4, so the per-seed noise is
    ``torch.randn(C, h, w)``, the same draw as the pipeline's ``randn`` before it packs 2x2 patches
    into tokens. ``forward`` packs x, calls the transformer with ``timestep = t_net / 1000`` (the
    flow sigma; the transformer multiplies by 1000 itself), the guidance scale and the text / image
    position ids, and unpacks the output. To start FluxPipeline from the same noise, pack it and pass
    it as ``latents=``::

        noise = torch.randn((1, *family.sample_shape(H, W)), generator=torch.Generator().manual_seed(s))
        pipe(prompt, height=H, width=W, latents=family.pack(noise), ...)

    (the pipeline uses given latents as they are; for batch 1 this equals ``generator=`` with that seed).
    rows: ``encoder_hidden_states`` (P, L, D) (T5) and ``pooled`` (P, D_clip) (CLIP's pooled output).
    Null rows: "" encoded. The pipeline has no unconditional half by default; with a negative prompt
    and ``true_cfg_scale > 1`` it guides with that negative's rows (``null_rows`` = negative "").
    Option: ``max_sequence_length`` (T5 length, 512 as the pipeline's default).
    """

    name = "flux"
    pipeline_classes = ("FluxPipeline",)
    network_attr = "transformer"
    text_encoder_attrs = ("text_encoder", "text_encoder_2")
    guidance_mode = "distilled"
    shift_base = "steps"

    def __init__(self, pipe: Any, *, max_sequence_length: int = 512) -> None:
        super().__init__(pipe)
        self.max_sequence_length = int(max_sequence_length)
        self.guidance_mode = "distilled" if self.network_config.get("guidance_embeds") else "none"

    @property
    def latent_channels(self) -> int:
        return int(self.network_config.in_channels) // 4

    def default_image_size(self) -> tuple[int, int]:
        s = int(getattr(self.pipe, "default_sample_size", None) or 128)
        return s * self.vae_scale_factor, s * self.vae_scale_factor

    def _latent_hw(self, height: int, width: int) -> tuple[int, int]:
        k = 2 * self.vae_scale_factor  # the pipeline rounds down to whole 2x2 patches (and warns)
        h, w = 2 * (height // k), 2 * (width // k)
        if h == 0 or w == 0:
            raise ShapeError(
                f"{self.name}: a {height}x{width} image is smaller than one 2x2 latent patch ({k}x{k} pixels)"
            )
        return h, w

    def image_tokens(self, shape: tuple[int, int, int]) -> int:
        """(h / 2) (w / 2): the transformer sees 2x2 latent patches (see :meth:`pack`)."""
        return (shape[1] // 2) * (shape[2] // 2)

    # ------------------------------------------------------------------ packing
    @staticmethod
    def pack(x: Tensor) -> Tensor:
        """(B, C, h, w) -> (B, (h/2)(w/2), 4C): 2x2 patches in row-major order, features (c, dy, dx)."""
        B, C, h, w = x.shape
        if h % 2 or w % 2:
            raise ShapeError(f"flux: latent height and width must be even to pack 2x2 patches; got {h}x{w}")
        return x.reshape(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (h // 2) * (w // 2), 4 * C)

    @staticmethod
    def unpack(tokens: Tensor, h: int, w: int) -> Tensor:
        """Inverse of :meth:`pack`: (B, (h/2)(w/2), 4C) -> (B, C, h, w)."""
        B, n, f = tokens.shape
        if n != (h // 2) * (w // 2) or f % 4:
            raise ShapeError(f"flux: {tuple(tokens.shape)} tokens do not unpack to an {h}x{w} latent")
        return tokens.reshape(B, h // 2, w // 2, f // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, f // 4, h, w)

    @staticmethod
    def image_ids(h: int, w: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """((h/2)(w/2), 3) position ids of the packed tokens: (0, row, col)."""
        rows = torch.arange(h // 2, device=device).repeat_interleave(w // 2)
        cols = torch.arange(w // 2, device=device).repeat(h // 2)
        return torch.stack([torch.zeros_like(rows), rows, cols], 1).to(dtype)

    # ------------------------------------------------------------------ conditioning
    def encode(self, prompts: list[str]) -> dict[str, Tensor]:
        with torch.no_grad():
            emb, pooled, _ = self.pipe.encode_prompt(
                prompt=list(prompts),
                prompt_2=None,
                device=self.device,
                num_images_per_prompt=1,
                max_sequence_length=self.max_sequence_length,
            )
        return {"encoder_hidden_states": emb, "pooled": pooled}

    def _null_row(self) -> dict[str, Tensor]:
        return self.encode([""])

    def forward(self, x: Tensor, t_net: Tensor, rows: dict[str, Tensor], guidance: Tensor | None = None) -> Tensor:
        """Pack x, transformer(tokens, timestep=t_net / 1000, guidance, pooled_projections,
        encoder_hidden_states, txt_ids, img_ids), unpack -> velocity (B, C, h, w) in x's dtype.

        ``guidance`` (B,) (or a scalar): the embedded guidance scale, required when guidance_mode is
        "distilled" and refused when it is "none".
        """
        t = self._check_x(x, t_net)
        B, _, h, w = x.shape
        r = self._rows(rows, B, ("encoder_hidden_states", "pooled"))
        dt, dev = self.network_dtype, self.network_device
        if self.guidance_mode == "distilled":
            if guidance is None:
                raise FewstepError(
                    "flux: this transformer embeds the guidance scale (guidance_embeds): pass guidance=(B,) to forward"
                )
            g = torch.as_tensor(guidance).detach().to(dev, torch.float32).reshape(-1)
            g = g.expand(B) if g.numel() == 1 else g
            if g.numel() != B:
                raise ShapeError(f"flux: guidance has {g.numel()} entries for a batch of {B}")
        else:
            self._no_guidance(guidance)
            g = None
        emb = r["encoder_hidden_states"].to(dt)
        out = self.network(
            hidden_states=self.pack(x.to(dev, dt)),
            timestep=t.to(dt) / 1000,
            guidance=g,
            pooled_projections=r["pooled"].to(dt),
            encoder_hidden_states=emb,
            txt_ids=torch.zeros(emb.shape[1], 3, dtype=dt, device=dev),
            img_ids=self.image_ids(h, w, dt, dev),
            return_dict=False,
        )
        return self.unpack(out_tensor(out), h, w).to(x.device, x.dtype)
