"""The tiny pipelines of tests/tiny_pipelines.py: saved, loaded back offline, run, and conditioned.

For every kind: the folder written by save_pipeline loads with DiffusionPipeline.from_pretrained(...,
local_files_only=True) into the same class; 2 steps on a fixed generator give finite latents of the
expected shape, bit-identical to the in-memory pipeline's; another prompt (class label for DiT) and
another guidance scale (Flux: the embedded guidance, and true CFG with a negative prompt) change them.
Also: tokenizers round-trip and cover the test prompts, builds are seeded, SD's v_prediction option.
DiT always decodes, so its latents are read from what the pipeline hands to ``vae.decode``.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from diffusers import DiffusionPipeline

import tiny_pipelines as T

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning", "ignore::UserWarning")
STEPS = 2
GUIDANCE = 4.0  # every kind guides at this scale (Flux: embedded guidance)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest on a shared machine
    yield
    torch.set_num_threads(n)


_CACHE: dict = {}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """kind -> (in-memory pipeline, pipeline loaded from its saved folder), built once per module."""

    def get(kind):
        if kind not in _CACHE:
            mem = T.build(kind, seed=0)
            folder = T.save_pipeline(kind, tmp_path_factory.mktemp(kind), seed=0)
            loaded = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
            for p in (mem, loaded):
                p.set_progress_bar_config(disable=True)
            _CACHE[kind] = (mem, loaded)
        return _CACHE[kind]

    yield get
    _CACHE.clear()


def run(pipe, kind, prompt, guidance_scale=GUIDANCE, seed=0, **extra):
    """Final latents of a STEPS-step run (Flux: packed, (B, tokens, 64))."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "dit":
        seen = {}
        decode = pipe.vae.decode

        def record(z, *args, **kwargs):  # DiT has no output_type="latent": read what is decoded
            seen["z"] = z * pipe.vae.config.scaling_factor
            return decode(z, *args, **kwargs)

        pipe.vae.decode = record
        try:
            pipe(
                class_labels=pipe.get_label_ids([prompt]),
                guidance_scale=guidance_scale,
                generator=gen,
                num_inference_steps=STEPS,
                output_type="pt",
            )
        finally:
            del pipe.vae.decode
        return seen["z"]
    out = pipe(
        prompt,
        guidance_scale=guidance_scale,
        generator=gen,
        num_inference_steps=STEPS,
        output_type="latent",
        **{**T.call_kwargs(kind), **extra},
    )
    return out.images


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kind", T.KINDS)
def test_loads_back_into_the_same_class(kind, pair):
    mem, loaded = pair(kind)
    assert type(loaded) is type(mem)
    for name, comp in mem.components.items():
        other = loaded.components[name]
        assert type(other) is type(comp), name
        if isinstance(comp, torch.nn.Module):
            a, b = comp.state_dict(), other.state_dict()
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

    def public(cfg):
        return {k: v for k, v in cfg.items() if not k.startswith("_")}

    assert public(loaded.scheduler.config) == public(mem.scheduler.config)


@pytest.mark.parametrize("kind", T.KINDS)
def test_loaded_run_equals_in_memory_run(kind, pair):
    mem, loaded = pair(kind)
    prompt = T.PROMPTS[kind][0]
    a, b = run(mem, kind, prompt), run(loaded, kind, prompt)
    assert tuple(a.shape) == T.latent_shape(kind) and a.dtype == torch.float32
    assert torch.isfinite(a).all()
    # two load paths, two memory layouts: which matmul kernel runs depends on the CPU, so the contract is
    # agreement to float32 rounding (a few steps of a float32 pipeline: ~1e-7 relative), not bit identity
    assert rel(a, b) <= 1e-5
    assert torch.equal(run(loaded, kind, prompt), b)  # deterministic: the same pipeline, generator seed, process
    assert rel(run(loaded, kind, prompt, seed=1), b) > 1e-2  # and the noise does come from it


@pytest.mark.parametrize("kind", T.KINDS)
def test_conditioning_reaches_the_network(kind, pair):
    _, loaded = pair(kind)
    a = run(loaded, kind, T.PROMPTS[kind][0])
    b = run(loaded, kind, T.PROMPTS[kind][1])
    assert torch.isfinite(b).all() and rel(a, b) > 1e-3


@pytest.mark.parametrize("kind", T.KINDS)
def test_guidance_scale_changes_the_output(kind, pair):
    _, loaded = pair(kind)
    prompt = T.PROMPTS[kind][0]
    a, b = run(loaded, kind, prompt), run(loaded, kind, prompt, guidance_scale=7.0)
    assert torch.isfinite(b).all() and rel(a, b) > 1e-3


def test_flux_true_cfg_with_a_negative_prompt(pair):
    _, loaded = pair("flux")
    prompt = T.PROMPTS["flux"][0]
    plain = run(loaded, "flux", prompt)
    assert torch.equal(run(loaded, "flux", prompt, negative_prompt="a dog"), plain)  # true_cfg_scale 1: unused
    cfg = run(loaded, "flux", prompt, negative_prompt="a dog", true_cfg_scale=2.0)
    assert torch.isfinite(cfg).all() and rel(cfg, plain) > 1e-3


@pytest.mark.parametrize("kind", [k for k in T.KINDS if k != "dit"])
def test_tokenizers_round_trip_and_cover_the_prompts(kind, pair):
    mem, loaded = pair(kind)
    names = [n for n in mem.components if n.startswith("tokenizer") and mem.components[n] is not None]
    assert names
    for name in names:
        tok, back = mem.components[name], loaded.components[name]
        assert back.model_max_length == tok.model_max_length == T.TEXT_LEN
        for prompt in T.PROMPTS[kind]:
            ids = tok(prompt, padding="max_length", max_length=T.TEXT_LEN, truncation=True).input_ids
            assert back(prompt, padding="max_length", max_length=T.TEXT_LEN, truncation=True).input_ids == ids
            words = tok(prompt, add_special_tokens=False).input_ids
            assert len(words) == len(prompt.split()) and tok.unk_token_id not in words, (name, prompt)


def test_dit_labels_survive_saving(pair):
    _, loaded = pair("dit")
    assert loaded.get_label_ids(list(T.PROMPTS["dit"])) == [0, 1, 2, 6]
    assert loaded.transformer.config.num_embeds_ada_norm == 1000
    assert loaded.transformer.config.out_channels == 2 * loaded.transformer.config.in_channels


@pytest.mark.parametrize("kind", T.KINDS)
def test_builds_are_seeded(kind):
    a, b, c = T.build(kind, seed=0), T.build(kind, seed=0), T.build(kind, seed=1)
    net = "unet" if kind in ("sd", "sdxl") else "transformer"
    for name in (net, "vae"):
        sa, sb, sc = (p.components[name].state_dict() for p in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
        assert any(not torch.equal(sa[k], sc[k]) for k in sa), name


def test_sd_v_prediction_option(tmp_path, pair):
    folder = T.save_pipeline("sd", tmp_path / "sd-v", prediction_type="v_prediction")
    v = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    v.set_progress_bar_config(disable=True)
    assert v.scheduler.config.prediction_type == "v_prediction"
    _, eps = pair("sd")
    prompt = T.PROMPTS["sd"][0]
    out = run(v, "sd", prompt)
    assert torch.isfinite(out).all() and rel(out, run(eps, "sd", prompt)) > 1e-3


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown kind"):
        T.build("sd4")
