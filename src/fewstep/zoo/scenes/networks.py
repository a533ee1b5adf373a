"""The denoising networks and schedulers of the scenes pipelines, one per family, from a recipe's ``arch``.

Every network sees 4x8x8 latents (32x32 scenes through the scenes VAE, downsampling 4) and is built
as the real checkpoints of its family are, only smaller:

* ``sd``: ``UNet2DConditionModel`` (cross-attention on the CLIP hidden states; eps; PNDM on SD's
  scaled-linear betas 0.00085-0.012, the scheduler SD 1.x ships);
* ``sd3``: ``SD3Transformer2DModel`` (joint attention over CLIP x2 + T5 tokens, pooled CLIP
  projections; rectified flow, ``FlowMatchEulerDiscreteScheduler`` with SD3's shift 3.0);
* ``pixart``: ``PixArtTransformer2DModel`` (adaLN-single, cross-attention on T5; learned sigma, so
  8 output channels; eps, DPM-Solver++ on linear betas 1e-4-0.02 as PixArt-Sigma);
* ``dit``: ``DiTTransformer2DModel`` (adaLN-zero on class labels; learned sigma; eps, DDIM on linear
  betas 1e-4-0.02 as DiT). Its label table has 1000 rows (``DiTPipeline`` passes class 1000 as the
  unconditional half); only the first ``len(DIT_CLASSES)`` are trained.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ...errors import ModelSpecError

FAMILIES = ("sd", "sd3", "pixart", "dit")
LATENT = (4, 8, 8)
#: DiTPipeline's null class is id 1000, so the label table keeps 1000 rows
DIT_TABLE = 1000


def make_network(family: str, arch: dict[str, Any], text_dims: dict[str, int]) -> nn.Module:
    """A freshly initialised (global RNG) network of ``family``.

    ``text_dims``: the widths the family's text encoders fix (``cross_attention_dim`` for sd,
    ``joint_attention_dim`` and ``pooled_projection_dim`` for sd3, ``caption_channels`` for pixart; see
    :func:`fewstep.zoo.scenes.text.family_dims`).
    """
    C, h, _ = LATENT
    if family == "sd":
        from diffusers import UNet2DConditionModel

        levels = len(arch["block_out_channels"])
        return UNet2DConditionModel(
            sample_size=h,
            in_channels=C,
            out_channels=C,
            layers_per_block=arch["layers_per_block"],
            block_out_channels=tuple(arch["block_out_channels"]),
            down_block_types=("CrossAttnDownBlock2D",) * levels,
            up_block_types=("CrossAttnUpBlock2D",) * levels,
            cross_attention_dim=text_dims["cross_attention_dim"],
            attention_head_dim=arch["heads"],
            norm_num_groups=arch["norm_num_groups"],
        )
    if family == "sd3":
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel(
            sample_size=h,
            patch_size=arch["patch_size"],
            in_channels=C,
            out_channels=C,
            num_layers=arch["layers"],
            attention_head_dim=arch["head_dim"],
            num_attention_heads=arch["heads"],
            joint_attention_dim=text_dims["joint_attention_dim"],
            caption_projection_dim=arch["heads"] * arch["head_dim"],
            pooled_projection_dim=text_dims["pooled_projection_dim"],
            pos_embed_max_size=h // arch["patch_size"],
        )
    if family == "pixart":
        from diffusers import PixArtTransformer2DModel

        return PixArtTransformer2DModel(
            num_attention_heads=arch["heads"],
            attention_head_dim=arch["head_dim"],
            in_channels=C,
            out_channels=2 * C,
            num_layers=arch["layers"],
            cross_attention_dim=arch["heads"] * arch["head_dim"],
            sample_size=h,
            patch_size=arch["patch_size"],
            caption_channels=text_dims["caption_channels"],
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_single",
            use_additional_conditions=False,
            interpolation_scale=1,
        )
    if family == "dit":
        from diffusers import DiTTransformer2DModel

        return DiTTransformer2DModel(
            num_attention_heads=arch["heads"],
            attention_head_dim=arch["head_dim"],
            in_channels=C,
            out_channels=2 * C,
            num_layers=arch["layers"],
            sample_size=h,
            patch_size=arch["patch_size"],
            num_embeds_ada_norm=DIT_TABLE,
        )
    raise ModelSpecError(f"unknown scenes family {family!r}; valid: {', '.join(FAMILIES)}")


def make_scheduler(family: str) -> Any:
    """The scheduler the family's pipeline folder ships (what it samples with by default)."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        FlowMatchEulerDiscreteScheduler,
        PNDMScheduler,
    )

    if family == "sd":
        return PNDMScheduler(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            skip_prk_steps=True,
            set_alpha_to_one=False,
            steps_offset=1,
            prediction_type="epsilon",
        )
    if family == "sd3":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    linear = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}
    if family == "pixart":
        return DPMSolverMultistepScheduler(
            **linear, algorithm_type="dpmsolver++", solver_order=2, prediction_type="epsilon", lower_order_final=True
        )
    if family == "dit":
        return DDIMScheduler(**linear, clip_sample=False, set_alpha_to_one=True, prediction_type="epsilon")
    raise ModelSpecError(f"unknown scenes family {family!r}; valid: {', '.join(FAMILIES)}")


def time_shift(family: str) -> float:
    """Where training times concentrate: the flow scheduler's shift (1 for DDPM-style families)."""
    return 3.0 if family == "sd3" else 1.0
