"""Tiny, seeded, random-weight diffusers pipelines built from configs in code (no hub, no downloads).

Kinds (``KINDS``): ``sd`` (StableDiffusionPipeline), ``sdxl`` (StableDiffusionXLPipeline), ``dit``
(DiTPipeline), ``pixart_sigma`` (PixArtSigmaPipeline), ``sd3`` (StableDiffusion3Pipeline) and ``flux``
(FluxPipeline). Every network has hidden sizes of 16-64 and one or two layers; latents are 8x8 for a
16x16 image (VAEs with two blocks: ``vae_scale_factor`` 2). The component configs copy the *structure*
of the real checkpoints (which encoders, which conditioning inputs, learned sigma, latent channels,
VAE scaling/shift factors, scheduler settings) so that code driving the networks directly sees the
same call signatures and tensor layouts as with the real models.

Tokenizers are made here from a few dozen words (``WORDS``): a byte-level BPE (CLIP) whose merges are
learned on those words by a small deterministic BPE learner below, and a Unigram (T5) whose pieces are
those words. They are saved as ``tokenizer.json`` and load back with ``from_pretrained`` from the
pipeline folder. ``PROMPTS[kind]`` lists prompts (class labels for DiT) that use only that vocabulary,
and ``call_kwargs(kind)`` gives the extra ``__call__`` arguments that keep a run tiny.

Usage::

    pipe = build("flux", seed=0)                    # in memory
    folder = save_pipeline("sd3", tmp_path / "sd3")  # built and saved with save_pretrained
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe(PROMPTS["sd3"][0], num_inference_steps=2, output_type="latent", **call_kwargs("sd3"))
"""

from __future__ import annotations

import os
from collections import Counter
from itertools import pairwise
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub from here

import torch

KINDS = ("sd", "sdxl", "dit", "pixart_sigma", "sd3", "flux")

# ----------------------------------------------------------------------------- vocabulary
WORDS = (
    "a",
    "an",
    "the",
    "of",
    "on",
    "in",
    "with",
    "and",
    "at",
    "by",
    "photo",
    "painting",
    "drawing",
    "picture",
    "cat",
    "dog",
    "bird",
    "horse",
    "fish",
    "house",
    "tree",
    "car",
    "boat",
    "flower",
    "mountain",
    "river",
    "city",
    "field",
    "road",
    "sky",
    "sun",
    "moon",
    "snow",
    "forest",
    "red",
    "blue",
    "green",
    "yellow",
    "black",
    "white",
    "small",
    "big",
    "old",
    "bright",
    "night",
    "morning",
)

_TEXT_PROMPTS = (
    "a photo of a cat",
    "a red car on the road",
    "a painting of a blue house in the snow",
    "a small bird in a green tree",
    "an old boat on the river at night",
)
# DiT is class-conditional: its "prompts" are label names of DIT_LABELS (pipe.get_label_ids maps them)
DIT_LABELS = {0: "cat", 1: "dog", 2: "bird", 3: "horse", 4: "fish", 5: "house", 6: "tree", 7: "car"}
PROMPTS = {kind: _TEXT_PROMPTS for kind in KINDS if kind != "dit"}
PROMPTS["dit"] = ("cat", "dog", "bird", "tree")

TEXT_LEN = 16  # tokenizer model_max_length and T5 max_sequence_length used by call_kwargs
IMAGE = 16  # pixels; every VAE here has vae_scale_factor 2, so latents are 8x8
LATENT = IMAGE // 2

# the real checkpoints' VAE constants
SD_VAE_SCALE = 0.18215  # SD 1.x / 2.x, DiT (sd-vae-ft-ema)
SDXL_VAE_SCALE = 0.13025  # SDXL, PixArt-Sigma (SDXL VAE)
SD3_VAE = {"scaling_factor": 1.5305, "shift_factor": 0.0609}
FLUX_VAE = {"scaling_factor": 0.3611, "shift_factor": 0.1159}


# ----------------------------------------------------------------------------- tokenizers
def _byte_alphabet() -> list[str]:
    """The 256 printable characters that byte-level BPE uses for the bytes 0..255 (GPT-2's table)."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1))
    keep |= set(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def _learn_merges(words) -> list[tuple[str, str]]:
    """Greedy BPE on ``words`` (each once), CLIP style: the last symbol of a word carries ``</w>``.
    Merges until every word is one symbol; ties broken by the pair itself, so the result is fixed."""
    seqs = [list(w[:-1]) + [w[-1] + "</w>"] for w in words]
    merges: list[tuple[str, str]] = []
    while True:
        counts = Counter(p for s in seqs for p in pairwise(s))
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        new = []
        for s in seqs:
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            new.append(out)
        seqs = new


def make_clip_tokenizer(max_length: int = TEXT_LEN, pad_token: str = "<|endoftext|>"):
    """A CLIPTokenizer over the byte-level alphabet (each character alone and with ``</w>``), the merges
    learned on WORDS, and ``<|startoftext|>`` / ``<|endoftext|>`` as the last two ids (as in CLIP)."""
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges = _learn_merges(sorted(set(WORDS)))
    tokens += [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    tok = CLIPTokenizer(vocab=vocab, merges=list(merges), pad_token=pad_token, model_max_length=max_length)
    return tok


def make_t5_tokenizer(max_length: int = TEXT_LEN):
    """A T5Tokenizer (Unigram, ``<pad>``=0, ``</s>``=1, ``<unk>``=2) whose pieces are ``▁word`` for each
    word of WORDS plus single characters (lower-case letters, digits, a little punctuation) as fallback."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [("▁" + w, -2.0 - 0.01 * i) for i, w in enumerate(sorted(set(WORDS)))]
    pieces += [(c, -10.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,!?-'"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


# ----------------------------------------------------------------------------- text encoders
def _clip_text(
    tok, seed: int, hidden: int = 32, projection: int | None = None, layers: int = 2, act: str = "quick_gelu"
):
    """CLIPTextModel (projection None) or CLIPTextModelWithProjection, sized to ``tok``."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=tok.model_max_length,
        projection_dim=projection or hidden,
        hidden_act=act,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = CLIPTextModel(cfg) if projection is None else CLIPTextModelWithProjection(cfg)
    return model.eval()


def _t5_encoder(tok, seed: int, d_model: int = 32, layers: int = 2):
    """T5EncoderModel (T5 v1.1 style: gated-gelu, no tied embeddings), sized to ``tok``."""
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=len(tok),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=layers,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(cfg).eval()


# ----------------------------------------------------------------------------- VAE
def _vae(seed: int, latent_channels: int = 4, **cfg):
    """AutoencoderKL with two blocks (vae_scale_factor 2) and ``latent_channels`` latent channels."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=IMAGE,
        **cfg,
    ).eval()


def _sd_betas() -> dict:
    return {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def _discrete_scheduler(name: str, prediction_type: str):
    """SD-style scheduler on scaled_linear betas 0.00085..0.012 ('ddim', 'pndm' or 'euler')."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler

    common = {**_sd_betas(), "prediction_type": prediction_type, "steps_offset": 1, "timestep_spacing": "leading"}
    if name == "ddim":
        return DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **common)
    if name == "pndm":
        return PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=False, **common)
    if name == "euler":
        return EulerDiscreteScheduler(interpolation_type="linear", use_karras_sigmas=False, **common)
    raise ValueError(f"unknown scheduler {name!r}: use 'ddim', 'pndm' or 'euler'")


# ----------------------------------------------------------------------------- builders
def build_sd(seed: int = 0, prediction_type: str = "epsilon", scheduler: str = "ddim"):
    """StableDiffusionPipeline: UNet2DConditionModel (4 latent channels, cross-attention dim 32), one
    CLIPTextModel (hidden 32, 2 layers) + CLIPTokenizer (16 tokens), AutoencoderKL (scaling 0.18215),
    and a DDIM / PNDM / Euler scheduler on SD's scaled_linear betas; ``prediction_type`` 'epsilon'
    (SD 1.x) or 'v_prediction' (SD 2.x-v). No safety checker."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    tok = make_clip_tokenizer()
    text = _clip_text(tok, seed + 1, hidden=32)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=LATENT,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    ).eval()
    vae = _vae(seed + 2, scaling_factor=SD_VAE_SCALE)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tok,
        unet=unet,
        scheduler=_discrete_scheduler(scheduler, prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_sdxl(seed: int = 0, prediction_type: str = "epsilon", scheduler: str = "euler"):
    """StableDiffusionXLPipeline: CLIPTextModel (hidden 16) + CLIPTextModelWithProjection (hidden 32,
    projection 32) and two CLIPTokenizers; UNet2DConditionModel with cross-attention dim 16+32=48 and
    ``addition_embed_type="text_time"`` (time-id embedding 8 per id, so the added input is 6*8+32=80);
    AutoencoderKL (scaling 0.13025); Euler (default, as SDXL base) / DDIM / PNDM on scaled_linear betas.
    force_zeros_for_empty_prompt is True, as for SDXL base."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    tok, tok2 = make_clip_tokenizer(), make_clip_tokenizer(pad_token="!")
    text = _clip_text(tok, seed + 1, hidden=16)
    text2 = _clip_text(tok2, seed + 3, hidden=32, projection=32, act="gelu")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=LATENT,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16 + 32,
        attention_head_dim=(2, 4),
        norm_num_groups=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
        transformer_layers_per_block=(1, 1),
    ).eval()
    vae = _vae(seed + 2, scaling_factor=SDXL_VAE_SCALE)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text,
        text_encoder_2=text2,
        tokenizer=tok,
        tokenizer_2=tok2,
        unet=unet,
        scheduler=_discrete_scheduler(scheduler, prediction_type),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def build_dit(seed: int = 0, id2label: dict | bool | None = True):
    """DiTPipeline: DiTTransformer2DModel (2 heads x 8, 1 layer, patch 2, 8x8x4 latents) with learned sigma
    (out_channels 8 = 2 x in_channels) and 1000 classes (the pipeline's null class is id 1000), AutoencoderKL
    (scaling 0.18215), DDIMScheduler on DiT's linear betas 1e-4..0.02. ``id2label``: True for DIT_LABELS,
    a dict of its own, or None/False for none (then labels are plain ids)."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        sample_size=LATENT,
        patch_size=2,
        num_embeds_ada_norm=1000,
    ).eval()
    vae = _vae(seed + 2, scaling_factor=SD_VAE_SCALE)
    sched = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        clip_sample=False,
        set_alpha_to_one=True,
        prediction_type="epsilon",
    )
    labels = DIT_LABELS if id2label is True else (id2label or None)
    labels = {int(k): v for k, v in labels.items()} if labels else None
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=sched, id2label=labels)
    if labels:
        # saved in model_index.json (keys become strings, which DiTPipeline accepts), given back to __init__
        pipe.register_to_config(id2label=labels)
    return pipe


def build_pixart_sigma(seed: int = 0):
    """PixArtSigmaPipeline: PixArtTransformer2DModel (2 heads x 8, 1 layer, patch 2, caption_channels = T5
    d_model 32, learned sigma: out_channels 8, no resolution/aspect-ratio micro-conditions as in Sigma),
    T5EncoderModel (d_model 32, 2 layers) + T5Tokenizer, AutoencoderKL (scaling 0.13025),
    DPMSolverMultistepScheduler (dpmsolver++, order 2) on linear betas 1e-4..0.02. Call it with
    ``use_resolution_binning=False``: the bins only exist for sample sizes 32/64/128/256."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    tok = make_t5_tokenizer()
    text = _t5_encoder(tok, seed + 1, d_model=32)
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        cross_attention_dim=16,
        sample_size=LATENT,
        patch_size=2,
        caption_channels=32,
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
        interpolation_scale=1,
    ).eval()
    vae = _vae(seed + 2, scaling_factor=SDXL_VAE_SCALE)
    sched = DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        algorithm_type="dpmsolver++",
        solver_order=2,
        prediction_type="epsilon",
        lower_order_final=True,
    )
    return PixArtSigmaPipeline(tokenizer=tok, text_encoder=text, vae=vae, transformer=transformer, scheduler=sched)


def build_sd3(seed: int = 0, shift: float = 3.0):
    """StableDiffusion3Pipeline: SD3Transformer2DModel (2 heads x 8, 1 joint layer, patch 2, 16 latent
    channels, joint_attention_dim = T5 d_model 64, pooled_projection_dim 16+32=48), two
    CLIPTextModelWithProjection (hidden/projection 16 and 32) + T5EncoderModel (d_model 64) with their
    three tokenizers, AutoencoderKL with 16 latent channels and SD3's scaling 1.5305 / shift 0.0609
    (no quant convs), FlowMatchEulerDiscreteScheduler with ``shift`` (3.0 as SD3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tok, tok2, tok3 = make_clip_tokenizer(), make_clip_tokenizer(pad_token="!"), make_t5_tokenizer()
    text = _clip_text(tok, seed + 1, hidden=16, projection=16)
    text2 = _clip_text(tok2, seed + 3, hidden=32, projection=32, act="gelu")
    text3 = _t5_encoder(tok3, seed + 4, d_model=64)  # CLIP states (16+32) are zero-padded to 64
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=LATENT,
        patch_size=2,
        in_channels=16,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=64,
        caption_projection_dim=16,
        pooled_projection_dim=16 + 32,
        out_channels=16,
        pos_embed_max_size=16,
    ).eval()
    vae = _vae(seed + 2, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, **SD3_VAE)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=sched,
        vae=vae,
        text_encoder=text,
        tokenizer=tok,
        text_encoder_2=text2,
        tokenizer_2=tok2,
        text_encoder_3=text3,
        tokenizer_3=tok3,
    )


def build_flux(seed: int = 0, guidance_embeds: bool = True):
    """FluxPipeline: FluxTransformer2DModel (2 heads x 16, 1 double + 1 single block, in_channels 64 = 16
    latent channels x 2x2 packing, RoPE axes (4, 6, 6), ``guidance_embeds`` True as FLUX.1-dev),
    CLIPTextModel (hidden 32: its pooled output is pooled_projections) + T5EncoderModel (d_model 32 =
    joint_attention_dim) and tokenizers, AutoencoderKL with 16 latent channels and Flux's scaling 0.3611 /
    shift 0.1159 (no quant convs), FlowMatchEulerDiscreteScheduler with dynamic shifting (shift 3.0,
    base_shift 0.5, max_shift 1.15, base_image_seq_len 256, max_image_seq_len 4096, as FLUX.1-dev)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tok, tok2 = make_clip_tokenizer(), make_t5_tokenizer()
    text = _clip_text(tok, seed + 1, hidden=32)
    text2 = _t5_encoder(tok2, seed + 4, d_model=32)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    vae = _vae(seed + 2, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, **FLUX_VAE)
    sched = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=sched,
        vae=vae,
        text_encoder=text,
        tokenizer=tok,
        text_encoder_2=text2,
        tokenizer_2=tok2,
        transformer=transformer,
    )


BUILDERS = {
    "sd": build_sd,
    "sdxl": build_sdxl,
    "dit": build_dit,
    "pixart_sigma": build_pixart_sigma,
    "sd3": build_sd3,
    "flux": build_flux,
}


def build(kind: str, seed: int = 0, **options):
    """The tiny pipeline of ``kind`` (one of KINDS), built in memory with ``seed``."""
    if kind not in BUILDERS:
        raise ValueError(f"unknown kind {kind!r}: one of {', '.join(KINDS)}")
    return BUILDERS[kind](seed=seed, **options)


def save_pipeline(kind: str, folder, seed: int = 0, **options) -> Path:
    """Build the tiny pipeline of ``kind`` and ``save_pretrained`` it (safetensors) into ``folder``."""
    folder = Path(folder)
    build(kind, seed=seed, **options).save_pretrained(str(folder), safe_serialization=True)
    return folder


# ----------------------------------------------------------------------------- running
def call_kwargs(kind: str) -> dict:
    """Extra ``__call__`` arguments that keep a run tiny (image size, text length, no resolution bins)."""
    if kind == "dit":
        return {}  # size comes from transformer.config.sample_size
    kw = {"height": IMAGE, "width": IMAGE}
    if kind in ("sd3", "flux", "pixart_sigma"):
        kw["max_sequence_length"] = TEXT_LEN
    if kind == "pixart_sigma":
        kw["use_resolution_binning"] = False
        kw["clean_caption"] = False
    return kw


def latent_shape(kind: str, batch: int = 1) -> tuple[int, ...]:
    """Shape of ``output_type="latent"`` output (Flux returns packed 2x2 patches: (B, 16, 64))."""
    if kind in ("sd3",):
        return (batch, 16, LATENT, LATENT)
    if kind == "flux":
        return (batch, (LATENT // 2) ** 2, 16 * 4)
    return (batch, 4, LATENT, LATENT)
