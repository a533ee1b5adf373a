"""UNet families: Stable Diffusion 1.x / 2.x (``sd``) and SDXL (``sdxl``).

Network time: the UNet gets ``t_net`` itself as a float32 (B,) tensor (a fractional DDPM index; the
pipelines pass the scheduler's integer or float timestep, which the UNet's sinusoidal embedding
turns into float32 the same way).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ...errors import ModelSpecError
from .base import Family, check_multiple, out_tensor


class _UNetFamily(Family):
    network_attr = "unet"

    def __init__(self, pipe: Any) -> None:
        super().__init__(pipe)
        cfg = self.network_config
        if cfg.get("time_cond_proj_dim") is not None:
            raise ModelSpecError(
                f"{type(pipe).__name__}: this UNet embeds the guidance scale (time_cond_proj_dim, "
                f"an LCM-style distilled model); the {self.name} family needs a CFG UNet"
            )

    @property
    def latent_channels(self) -> int:
        return int(self.network_config.in_channels)

    def default_image_size(self) -> tuple[int, int]:
        s = self.network_config.sample_size
        h, w = (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    def _latent_hw(self, height: int, width: int) -> tuple[int, int]:
        check_multiple(self.name, height, width, 8, f"{type(self.pipe).__name__} refuses other sizes")
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    def _unet(
        self, x: Tensor, t_net: Tensor, rows: dict[str, Tensor], keys: tuple[str, ...], added: Any = None
    ) -> Tensor:
        t = self._check_x(x, t_net)
        r = self._rows(rows, x.shape[0], keys)
        dt = self.network_dtype
        out = self.network(
            x.to(self.network_device, dt),
            t,
            encoder_hidden_states=r["encoder_hidden_states"].to(dt),
            added_cond_kwargs=added(r, x.shape[0], dt) if added else None,
            return_dict=False,
        )
        return out_tensor(out)[:, : self.latent_channels].to(x.device, x.dtype)

    def _identity_extra(self) -> dict[str, Any]:
        return {
            "text_length": int(
                self.pipe.tokenizer.model_max_length
                if self.pipe.tokenizer is not None
                else self.pipe.tokenizer_2.model_max_length
            )
        }


class SDFamily(_UNetFamily):
    """StableDiffusionPipeline (SD 1.x, 2.x; epsilon or v_prediction).

    rows: ``encoder_hidden_states`` (P, L, D): the CLIP text encoder's output as ``encode_prompt``
    makes it. Null rows: the empty prompt "" encoded (the pipeline's default negative).
    """

    name = "sd"
    pipeline_classes = ("StableDiffusionPipeline",)
    text_encoder_attrs = ("text_encoder",)

    def encode(self, prompts: list[str]) -> dict[str, Tensor]:
        with torch.no_grad():
            emb, _ = self.pipe.encode_prompt(list(prompts), self.device, 1, False)
        return {"encoder_hidden_states": emb}

    def _null_row(self) -> dict[str, Tensor]:
        _, neg = self.pipe.encode_prompt([""], self.device, 1, True)
        return {"encoder_hidden_states": neg}

    def forward(self, x: Tensor, t_net: Tensor, rows: dict[str, Tensor], guidance: Tensor | None = None) -> Tensor:
        """UNet(x, t_net, encoder_hidden_states) -> (B, C, h, w) in x's dtype."""
        self._no_guidance(guidance)
        return self._unet(x, t_net, rows, ("encoder_hidden_states",))

    def decode(self, latents: Tensor) -> Tensor:
        """vae.decode(latents / scaling_factor), clamped to [-1, 1]."""
        z = latents / self.pipe.vae.config.scaling_factor
        return self._run_vae(z).to(latents.device, latents.dtype)


class SDXLFamily(_UNetFamily):
    """StableDiffusionXLPipeline (base model, text-to-image).

    rows: ``encoder_hidden_states`` (P, L, D1 + D2) (penultimate hidden states of both CLIP encoders) and
    ``pooled`` (P, proj) (the projected pooled output of the second). Null rows: zeros when the
    pipeline has ``force_zeros_for_empty_prompt`` (SDXL base), else "" encoded.
    ``forward`` adds ``time_ids`` = (H, W, 0, 0, H, W) for the image size last given to
    :meth:`sample_shape` (original size = target size, no crop: the pipeline's defaults).
    """

    name = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    text_encoder_attrs = ("text_encoder", "text_encoder_2")

    def __init__(self, pipe: Any) -> None:
        super().__init__(pipe)
        if self.network_config.get("addition_embed_type") != "text_time":
            raise ModelSpecError(
                f"{type(pipe).__name__}: the UNet has addition_embed_type="
                f"{self.network_config.get('addition_embed_type')!r}; SDXL needs 'text_time'"
            )

    def encode(self, prompts: list[str]) -> dict[str, Tensor]:
        with torch.no_grad():
            emb, _, pooled, _ = self.pipe.encode_prompt(
                list(prompts), device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
        return {"encoder_hidden_states": emb, "pooled": pooled}

    def _null_row(self) -> dict[str, Tensor]:
        _, neg, _, neg_pooled = self.pipe.encode_prompt(
            [""], device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=True
        )
        return {"encoder_hidden_states": neg, "pooled": neg_pooled}

    def time_ids(self, batch: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """(batch, 6) micro-conditioning (H, W, 0, 0, H, W) of ``image_size``."""
        H, W = self.image_size
        ids = torch.tensor([[H, W, 0, 0, H, W]], dtype=dtype, device=self.network_device)
        return ids.expand(batch, 6)

    def forward(self, x: Tensor, t_net: Tensor, rows: dict[str, Tensor], guidance: Tensor | None = None) -> Tensor:
        """UNet(x, t_net, encoder_hidden_states, added_cond_kwargs={text_embeds: pooled, time_ids})."""
        self._no_guidance(guidance)

        def added(r: dict[str, Tensor], batch: int, dt: torch.dtype) -> dict[str, Tensor]:
            return {"text_embeds": r["pooled"].to(dt), "time_ids": self.time_ids(batch, dt)}

        return self._unet(x, t_net, rows, ("encoder_hidden_states", "pooled"), added)

    def decode(self, latents: Tensor) -> Tensor:
        """vae.decode(latents * std / scaling_factor + mean) when the VAE has latents_mean / latents_std,
        else vae.decode(latents / scaling_factor); a float16 VAE with force_upcast decodes in float32."""
        vae = self.pipe.vae
        cfg = vae.config
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            c = latents.shape[1]
            m = torch.tensor(mean).view(1, c, 1, 1).to(latents.device, latents.dtype)
            s = torch.tensor(std).view(1, c, 1, 1).to(latents.device, latents.dtype)
            z = latents * s / cfg.scaling_factor + m
        else:
            z = latents / cfg.scaling_factor
        upcast = vae.dtype == torch.float16 and bool(getattr(cfg, "force_upcast", False))
        return self._run_vae(z, upcast=upcast).to(latents.device, latents.dtype)

    def _identity_extra(self) -> dict[str, Any]:
        return {
            **super()._identity_extra(),
            "force_zeros_for_empty_prompt": bool(self.pipe.config.get("force_zeros_for_empty_prompt", False)),
        }
