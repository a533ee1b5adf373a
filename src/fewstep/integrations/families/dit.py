"""DiT-style transformer families: DiT (``dit``, class-conditional) and PixArt-Sigma (``pixart-sigma``).

Both networks predict eps and a learned variance (2C output channels); ``forward`` keeps the first C.
Network time: the transformer gets ``t_net`` itself as a float32 (B,) tensor (a fractional DDPM
index; the pipelines pass the scheduler's int64 timestep, embedded in float32 the same way).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ...conditions import ClassSet, ConditionSpec, PromptSet
from ...errors import FewstepError, ShapeError
from .base import Family, check_multiple, out_tensor


class _DiTLike(Family):
    network_attr = "transformer"

    @property
    def latent_channels(self) -> int:
        return int(self.network_config.in_channels)

    def default_image_size(self) -> tuple[int, int]:
        s = int(self.network_config.sample_size)
        return s * self.vae_scale_factor, s * self.vae_scale_factor

    def _first_channels(self, out: Any, x: Tensor) -> Tensor:
        return out_tensor(out)[:, : self.latent_channels].to(x.device, x.dtype)


class DiTFamily(_DiTLike):
    """DiTPipeline (class-conditional DiT, learned sigma).

    ``encode`` takes class label names (``pipe.labels``, from the pipeline's id2label) or integer
    strings: ``{"class_labels": LongTensor (P,)}``. Null rows: class ``num_classes`` (1000 for DiT: the
    row the label table keeps for "no class", which DiTPipeline passes as its unconditional half).
    The pipeline only makes its transformer's sample size, so :meth:`sample_shape` refuses others.
    """

    name = "dit"
    pipeline_classes = ("DiTPipeline",)
    text_conditional = False

    @property
    def num_classes(self) -> int:
        """K, the transformer's class count (its label table has one more row: the null class K)."""
        return int(self.network_config.num_embeds_ada_norm)

    def condition_sets(self, spec: ConditionSpec) -> tuple[PromptSet | None, ClassSet | None]:
        """(None, the class labels asked for: all K by default); prompts are refused in one line."""
        if spec.prompts is not None:
            raise FewstepError(f"{self.name} is class-conditional: give --classes, not --prompts")
        return None, spec.class_set(self.num_classes, default="all")

    def _latent_hw(self, height: int, width: int) -> tuple[int, int]:
        if (height, width) != self.default_image_size():
            H, W = self.default_image_size()
            raise ShapeError(
                f"dit: DiTPipeline makes only {H}x{W} images (its transformer's sample_size); got {height}x{width}"
            )
        s = int(self.network_config.sample_size)
        return s, s

    def encode(self, prompts: list[str]) -> dict[str, Tensor]:
        ids = []
        for p in prompts:
            text = str(p).strip()
            if text in getattr(self.pipe, "labels", {}):
                ids.append(self.pipe.get_label_ids([text])[0])
            elif text.lstrip("-").isdigit():
                ids.append(int(text))
            else:
                known = sorted(getattr(self.pipe, "labels", {}))
                hint = (
                    f" or one of its labels ({', '.join(known[:8])}{', ...' if len(known) > 8 else ''})"
                    if known
                    else " (this pipeline has no id2label names)"
                )
                raise FewstepError(f"dit: {p!r} is not a class: give an integer id 0..{self.num_classes - 1}{hint}")
            if not 0 <= ids[-1] < self.num_classes:
                raise FewstepError(f"dit: class {ids[-1]} is outside 0..{self.num_classes - 1}")
        return {"class_labels": torch.tensor(ids, dtype=torch.long, device=self.device)}

    def _null_row(self) -> dict[str, Tensor]:
        return {"class_labels": torch.tensor([self.num_classes], dtype=torch.long, device=self.device)}

    def forward(self, x: Tensor, t_net: Tensor, rows: dict[str, Tensor], guidance: Tensor | None = None) -> Tensor:
        """transformer(x, timestep=t_net, class_labels) -> first C channels (eps), in x's dtype."""
        self._no_guidance(guidance)
        t = self._check_x(x, t_net)
        r = self._rows(rows, x.shape[0], ("class_labels",))
        out = self.network(
            x.to(self.network_device, self.network_dtype),
            timestep=t,
            class_labels=r["class_labels"].long(),
            return_dict=False,
        )
        return self._first_channels(out, x)

    def decode(self, latents: Tensor) -> Tensor:
        """vae.decode(latents / scaling_factor), clamped to [-1, 1]."""
        z = 1 / self.pipe.vae.config.scaling_factor * latents
        return self._run_vae(z).to(latents.device, latents.dtype)

    def _identity_extra(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "null_class": self.num_classes}


class PixArtSigmaFamily(_DiTLike):
    """PixArtSigmaPipeline (T5 text encoder, learned sigma).

    rows: ``encoder_hidden_states`` (P, L, D) (T5 output, padded to ``max_sequence_length``) and
    ``mask`` (P, L) (the tokenizer's 0/1 attention mask, which the transformer turns into a bias).
    Null rows: "" encoded (the pipeline's default negative prompt).
    Options (the pipeline's ``__call__`` arguments of the same names): ``max_sequence_length`` (300)
    and ``clean_caption`` (True; the pipeline falls back to plain lower-casing when bs4 / ftfy are
    missing). When the transformer uses the resolution / aspect-ratio micro-conditions
    (``use_additional_conditions``), ``forward`` adds them for ``image_size`` the way PixArt-Alpha's
    pipeline does: resolution (H, W) and aspect ratio H / W in pixels.
    """

    name = "pixart-sigma"
    pipeline_classes = ("PixArtSigmaPipeline",)
    text_encoder_attrs = ("text_encoder",)

    def __init__(self, pipe: Any, *, max_sequence_length: int = 300, clean_caption: bool = True) -> None:
        super().__init__(pipe)
        self.max_sequence_length = int(max_sequence_length)
        self.clean_caption = bool(clean_caption)

    def _latent_hw(self, height: int, width: int) -> tuple[int, int]:
        check_multiple(self.name, height, width, 8, f"{type(self.pipe).__name__} refuses other sizes")
        h, w = height // self.vae_scale_factor, width // self.vae_scale_factor
        p = int(self.network_config.patch_size)
        if h % p or w % p:
            raise ShapeError(
                f"{self.name}: the {h}x{w} latent of a {height}x{width} image is not a multiple of the "
                f"transformer's patch size {p}"
            )
        return h, w

    def _encode(self, prompts: list[str], negatives: bool) -> tuple[Tensor, ...]:
        return self.pipe.encode_prompt(
            list(prompts),
            negatives,
            negative_prompt="",
            num_images_per_prompt=1,
            device=self.device,
            clean_caption=self.clean_caption,
            max_sequence_length=self.max_sequence_length,
        )

    def encode(self, prompts: list[str]) -> dict[str, Tensor]:
        with torch.no_grad():
            emb, mask, _, _ = self._encode(prompts, False)
        return {"encoder_hidden_states": emb, "mask": mask}

    def _null_row(self) -> dict[str, Tensor]:
        _, _, neg, neg_mask = self._encode([""], True)
        return {"encoder_hidden_states": neg, "mask": neg_mask}

    def added_conditions(self, batch: int, dtype: torch.dtype) -> dict[str, Tensor | None]:
        """``added_cond_kwargs``: None values unless the transformer uses resolution / aspect ratio."""
        if not getattr(self.network, "use_additional_conditions", False):
            return {"resolution": None, "aspect_ratio": None}
        H, W = self.image_size
        dev = self.network_device
        return {
            "resolution": torch.tensor([[H, W]], dtype=dtype, device=dev).expand(batch, 2),
            "aspect_ratio": torch.tensor([[float(H / W)]], dtype=dtype, device=dev).expand(batch, 1),
        }

    def forward(self, x: Tensor, t_net: Tensor, rows: dict[str, Tensor], guidance: Tensor | None = None) -> Tensor:
        """transformer(x, encoder_hidden_states, encoder_attention_mask=mask, timestep=t_net,
        added_cond_kwargs) -> first C channels, in x's dtype."""
        self._no_guidance(guidance)
        t = self._check_x(x, t_net)
        r = self._rows(rows, x.shape[0], ("encoder_hidden_states", "mask"))
        dt = self.network_dtype
        out = self.network(
            x.to(self.network_device, dt),
            encoder_hidden_states=r["encoder_hidden_states"].to(dt),
            encoder_attention_mask=r["mask"],
            timestep=t,
            added_cond_kwargs=self.added_conditions(x.shape[0], dt),
            return_dict=False,
        )
        return self._first_channels(out, x)

    def decode(self, latents: Tensor) -> Tensor:
        """vae.decode(latents / scaling_factor), clamped to [-1, 1]."""
        z = latents.to(self.pipe.vae.dtype) / self.pipe.vae.config.scaling_factor
        return self._run_vae(z).to(latents.device, latents.dtype)

    def _identity_extra(self) -> dict[str, Any]:
        return {
            "max_sequence_length": self.max_sequence_length,
            "clean_caption": self.clean_caption,
            "additional_conditions": bool(getattr(self.network, "use_additional_conditions", False)),
        }
