"""Family adapters (fewstep.integrations.families) against the real diffusers pipelines they wrap.

Each tiny pipeline of tests/tiny_pipelines.py runs STEPS steps on two prompts with guidance while a
recording wrapper on the instance's network ``forward`` keeps every call's inputs and outputs (then
the instance is restored; the class is never touched), and callbacks / a wrapper on ``vae.decode``
keep the final latents and the decoded image. Against that record:
1. ``encode`` / ``null_rows`` equal the pipeline's own ``encode_prompt`` (cond / negative) and the rows
   that actually reached the network;
2. ``forward`` on the same x (unpacked for Flux), the equivalent t_net and gathered rows reproduces
   the network's output, cond and uncond halves (<= 1e-5 relative), and the pipeline's guided
   prediction through fewstep's Denoiser;
3. ``decode`` of the final latents equals the pipeline's output_type="pt" image;
4. ``sample_shape`` equals the pipeline's latent shape (its first network input, and
   ``prepare_latents`` at another size);
5. ``family_for`` finds each class and refuses others with one line naming the supported classes.
Also: batch independence at fractional times, dtype handling, Flux noise packing and true CFG, and
PixArt's resolution / aspect-ratio conditions (through PixArtAlphaPipeline, which passes them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
import tiny_pipelines as T
from fewstep.denoiser import Denoiser
from fewstep.errors import FewstepError, ModelSpecError, ShapeError
from fewstep.integrations.diffusers_in import schedule_from_diffusers
from fewstep.integrations.families import (
    FAMILIES,
    DiTFamily,
    FluxFamily,
    PixArtSigmaFamily,
    SD3Family,
    SDFamily,
    SDXLFamily,
    adapt,
    family_for,
)
from fewstep.integrations.families.base import Family

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning", "ignore::UserWarning")

STEPS = 2
W = 4.0  # guidance scale of every run (Flux: the embedded guidance)
VARIANTS = (*T.KINDS, "sd_v")  # sd_v: SD with v_prediction
EXPECTED = {
    "sd": SDFamily,
    "sd_v": SDFamily,
    "sdxl": SDXLFamily,
    "dit": DiTFamily,
    "pixart_sigma": PixArtSigmaFamily,
    "sd3": SD3Family,
    "flux": FluxFamily,
}
SIZE = {"sdxl": (16, 24), "flux": (16, 24)}  # non-square: catches swapped H / W in time_ids, packing, ids
UNCOND_FIRST = {"sd": True, "sd_v": True, "sdxl": True, "pixart_sigma": True, "sd3": True, "dit": False}
TOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny batches: one thread (tests/conftest.py)."""


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def clone(v):
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    if isinstance(v, dict):
        return {k: clone(x) for k, x in v.items()}
    if isinstance(v, (tuple, list)):
        return type(v)(clone(x) for x in v)
    return v


def cat_rows(*parts: dict) -> dict:
    return {k: torch.cat([p[k] for p in parts], 0) for k in parts[0]}


_PIPES: dict = {}


def pipe_of(kind: str):
    if kind not in _PIPES:
        p = T.build("sd", seed=0, prediction_type="v_prediction") if kind == "sd_v" else T.build(kind, seed=0)
        p.set_progress_bar_config(disable=True)
        _PIPES[kind] = p
    return _PIPES[kind]


def base_kind(kind: str) -> str:
    return "sd" if kind == "sd_v" else kind


def family_of(kind: str, pipe=None) -> Family:
    pipe = pipe if pipe is not None else pipe_of(kind)
    opts = {}
    if base_kind(kind) in ("pixart_sigma", "sd3", "flux"):
        opts["max_sequence_length"] = T.TEXT_LEN
    if base_kind(kind) == "pixart_sigma":
        opts["clean_caption"] = False
    return adapt(pipe, **opts)


def prompts_of(kind: str) -> list[str]:
    return list(T.PROMPTS[base_kind(kind)][:2])


@dataclass
class Run:
    """One recorded pipeline run: network calls (args, kwargs, output), timesteps, final latents, image."""

    kind: str
    pipe: object
    fam: Family
    size: tuple[int, int]
    calls: list = field(default_factory=list)
    timesteps: torch.Tensor | None = None
    latents: torch.Tensor | None = None  # final latents, unpacked
    image: torch.Tensor | None = None  # the pipeline's output_type="pt" image, [0, 1]


def record(pipe, net, fn):
    """Run fn() with a recording wrapper on the instance's net.forward; returns the calls."""
    calls = []
    original = net.forward

    def recorder(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append((clone(args), clone(kwargs), clone(out[0] if isinstance(out, tuple) else out.sample)))
        return out

    net.forward = recorder
    try:
        fn()
    finally:
        del net.forward
    assert "forward" not in vars(net)  # the instance is restored to the class's forward
    return calls


def pipeline_call(kind: str, pipe, size, seed: int = 0, **extra):
    """(image [0, 1], final latents unpacked) of a STEPS-step guided run on the two prompts."""
    seen = {}
    gen = torch.Generator().manual_seed(seed)
    k = base_kind(kind)
    if k == "dit":
        decode = pipe.vae.decode

        def rec_decode(z, *a, **kw):  # DiT has no callbacks: read the final latents where they are decoded
            seen["latents"] = z * pipe.vae.config.scaling_factor
            return decode(z, *a, **kw)

        pipe.vae.decode = rec_decode
        try:
            out = pipe(
                class_labels=pipe.get_label_ids(prompts_of(kind)),
                guidance_scale=W,
                generator=gen,
                num_inference_steps=STEPS,
                output_type="pt",
            )
        finally:
            del pipe.vae.decode
        return out.images, seen["latents"]
    kw = {**T.call_kwargs(k), "height": size[0], "width": size[1], **extra}
    if k == "pixart_sigma":  # PixArt-Sigma has only the old-style callback
        kw.update(callback=lambda i, t, lat: seen.__setitem__("latents", lat.clone()), callback_steps=1)
    else:

        def on_step(p, i, t, tensors):
            seen["latents"] = tensors["latents"].clone()
            return tensors

        kw["callback_on_step_end"] = on_step
    out = pipe(prompts_of(kind), guidance_scale=W, generator=gen, num_inference_steps=STEPS, output_type="pt", **kw)
    lat = seen["latents"]
    if k == "flux":
        lat = pipe._unpack_latents(lat, size[0], size[1], pipe.vae_scale_factor)
    return out.images, lat


_RUNS: dict = {}


def run_of(kind: str) -> Run:
    if kind not in _RUNS:
        pipe = pipe_of(kind)
        fam = family_of(kind)
        size = SIZE.get(kind, fam.default_image_size() if kind == "dit" else (T.IMAGE, T.IMAGE))
        r = Run(kind, pipe, fam, size)
        box = {}

        def go():
            box["image"], box["latents"] = pipeline_call(kind, pipe, size)

        r.calls = record(pipe, fam.network, go)
        r.image, r.latents = box["image"], box["latents"]
        r.timesteps = pipe.scheduler.timesteps.clone()
        _RUNS[kind] = r
    return _RUNS[kind]


def network_x(run: Run, call) -> torch.Tensor:
    """The network's x input of a recorded call (Flux: unpacked with the pipeline's own _unpack_latents)."""
    args, kwargs, _ = call
    x = args[0] if args else kwargs["hidden_states"]
    if base_kind(run.kind) == "flux":
        x = run.pipe._unpack_latents(x, run.size[0], run.size[1], run.pipe.vae_scale_factor)
    return x


def network_out(run: Run, call) -> torch.Tensor:
    out = call[2]
    if base_kind(run.kind) == "flux":
        return run.pipe._unpack_latents(out, run.size[0], run.size[1], run.pipe.vae_scale_factor)
    return out[:, : run.fam.latent_channels]


def halves(run: Run, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond) halves of a doubled batch in the pipeline's order."""
    a, b = t.chunk(2)
    return (b, a) if UNCOND_FIRST[run.kind] else (a, b)


# ----------------------------------------------------------------------------- 1. encode / null_rows
def pipeline_encoding(kind: str, pipe, prompts):
    """(cond rows, negative rows) from the pipeline's own encode_prompt, in the family's keys."""
    k, n = base_kind(kind), len(prompts)
    if k == "sd":
        c, u = pipe.encode_prompt(prompts, "cpu", 1, True)
        return {"encoder_hidden_states": c}, {"encoder_hidden_states": u}
    if k == "sdxl":
        c, u, pc, pu = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=True)
        return {"encoder_hidden_states": c, "pooled": pc}, {"encoder_hidden_states": u, "pooled": pu}
    if k == "pixart_sigma":
        c, m, u, mu = pipe.encode_prompt(prompts, True, clean_caption=False, max_sequence_length=T.TEXT_LEN)
        return {"encoder_hidden_states": c, "mask": m}, {"encoder_hidden_states": u, "mask": mu}
    if k == "sd3":
        c, u, pc, pu = pipe.encode_prompt(
            prompts, None, None, do_classifier_free_guidance=True, max_sequence_length=T.TEXT_LEN
        )
        return {"encoder_hidden_states": c, "pooled": pc}, {"encoder_hidden_states": u, "pooled": pu}
    if k == "flux":
        c, pc, _ = pipe.encode_prompt(prompts, None, max_sequence_length=T.TEXT_LEN)
        u, pu, _ = pipe.encode_prompt([""] * n, None, max_sequence_length=T.TEXT_LEN)  # true CFG's negative ""
        return {"encoder_hidden_states": c, "pooled": pc}, {"encoder_hidden_states": u, "pooled": pu}
    ids = torch.tensor(pipe.get_label_ids(prompts))
    return {"class_labels": ids}, {"class_labels": torch.full((n,), 1000)}


def assert_rows_equal(got: dict, want: dict, tol: float = 0.0):
    assert set(got) == set(want)
    for key in want:
        a, b = got[key], want[key]
        assert a.shape == b.shape and a.dtype == b.dtype, key
        if tol == 0.0:
            assert torch.equal(a, b), key
        else:
            assert rel(a, b) <= tol or torch.equal(a, b), key


@pytest.mark.parametrize("kind", VARIANTS)
def test_encode_and_null_rows_equal_the_pipelines_encode_prompt(kind):
    pipe, fam = pipe_of(kind), family_of(kind)
    prompts = prompts_of(kind) + [T.PROMPTS[base_kind(kind)][2]]
    with torch.no_grad():
        cond, neg = pipeline_encoding(kind, pipe, prompts)
    assert_rows_equal(fam.encode(prompts), cond)
    null = fam.null_rows(len(prompts))
    assert_rows_equal(null, neg, tol=1e-6)  # the pipeline encodes n copies of "" in one batch
    if kind == "sdxl":
        assert all(float(v.abs().max()) == 0.0 for v in null.values())  # force_zeros_for_empty_prompt
    else:
        assert all(torch.equal(null[k][0], null[k][-1]) for k in null)
    # one row per prompt, independent of the other prompts in the call
    one = fam.encode(prompts[1:2])
    assert all(rel(one[k], cond[k][1:2]) <= 1e-6 or torch.equal(one[k], cond[k][1:2]) for k in one)


@pytest.mark.parametrize("kind", VARIANTS)
def test_rows_are_what_reached_the_network(kind):
    run = run_of(kind)
    k = base_kind(kind)
    cond, null = run.fam.encode(prompts_of(kind)), run.fam.null_rows(2)
    args, kwargs, _ = run.calls[0]
    names = {
        "encoder_hidden_states": "encoder_hidden_states",
        "pooled": "pooled_projections",
        "mask": "encoder_attention_mask",
        "class_labels": "class_labels",
    }
    for key in cond:
        got = kwargs["added_cond_kwargs"]["text_embeds"] if (k == "sdxl" and key == "pooled") else kwargs[names[key]]
        if k == "flux":
            assert torch.equal(got, cond[key])
        else:
            c, u = halves(run, got)
            assert torch.equal(c, cond[key]), key
            assert rel(u, null[key]) <= 1e-6 or torch.equal(u, null[key]), key


def test_dit_encode_takes_label_names_and_integer_strings():
    fam = family_of("dit")
    got = fam.encode(["cat", "tree", "7", " 999 "])["class_labels"]
    assert got.dtype == torch.long and got.tolist() == [0, 6, 7, 999]
    assert fam.null_rows(3)["class_labels"].tolist() == [1000] * 3
    with pytest.raises(FewstepError, match="not a class"):
        fam.encode(["zebra"])
    with pytest.raises(FewstepError, match="outside"):
        fam.encode(["1000"])


# ----------------------------------------------------------------------------- 2. forward parity
@pytest.mark.parametrize("kind", VARIANTS)
def test_forward_reproduces_every_network_call(kind):
    run = run_of(kind)
    fam, k = run.fam, base_kind(kind)
    fam.sample_shape(*run.size)
    assert len(run.calls) == STEPS and len(run.timesteps) == STEPS
    cond, null = fam.encode(prompts_of(kind)), fam.null_rows(2)
    for call, t in zip(run.calls, run.timesteps, strict=True):
        args, kwargs, _ = call
        x, out = network_x(run, call), network_out(run, call)
        t_net = torch.full((x.shape[0],), float(t))
        if k == "flux":  # no second half; guidance is an input; the network gets t_net / 1000
            assert torch.equal(kwargs["timestep"], (t.expand(2) / 1000).to(kwargs["timestep"].dtype))
            assert torch.equal(kwargs["guidance"], torch.full((2,), W))
            got = fam.forward(x, t_net, cond, guidance=torch.full((2,), W))
            assert got.shape == out.shape and rel(got, out) <= TOL
            continue
        # the network time: the scheduler's timestep itself (SD3: sigma * 1000)
        t_in = args[1] if len(args) > 1 else kwargs["timestep"]
        assert torch.allclose(t_in.double().reshape(-1), t.double().reshape(-1).expand(t_in.numel()), rtol=0, atol=0)
        xc, xu = halves(run, x)
        oc, ou = halves(run, out)
        got = fam.forward(torch.cat([xc, xu]), t_net, cat_rows(cond, null))
        gc, gu = got.chunk(2)
        assert got.dtype == x.dtype and gc.shape == oc.shape
        assert rel(gc, oc) <= TOL and rel(gu, ou) <= TOL
        assert rel(gc, gu) > 1e-4  # the two halves do differ: the rows matter


@pytest.mark.parametrize("kind", [v for v in VARIANTS if v != "flux"])
def test_denoiser_guidance_matches_the_pipelines_guided_prediction(kind):
    """fewstep's Denoiser (cond + null rows in one batch, u + w (c - u)) gives the prediction the pipeline
    hands its scheduler (DiT: eps guided, variance dropped; PixArt: guided then first half)."""
    run = run_of(kind)
    fam = run.fam
    fam.sample_shape(*run.size)
    info = schedule_from_diffusers(fam.scheduler_config)
    assert info.prediction == {"sd_v": "v", "sd3": "velocity"}.get(kind, "eps")
    den = Denoiser(
        lambda x, t, **rows: fam.forward(x, t, rows),
        info.schedule,
        info.prediction,
        guidance_scale=W,
        uncond=lambda cond: fam.null_rows(next(iter(cond.values())).shape[0]),
    )
    cond = fam.encode(prompts_of(kind))
    for call, t in zip(run.calls, run.timesteps, strict=True):
        full = call[2]
        if kind == "pixart_sigma":  # the pipeline guides all channels, then keeps the first half
            u, c = full.chunk(2)
            want = (u + W * (c - u))[:, : fam.latent_channels]
        else:
            oc, ou = halves(run, network_out(run, call))
            want = ou + W * (oc - ou)
        xc, _ = halves(run, network_x(run, call))
        got = den.raw(xc, 0.5, t_net=float(t), **cond)
        assert rel(got, want) <= TOL


def test_forward_is_per_sample_at_fractional_times():
    """Each sample's output depends only on its own x, t_net and rows (any batch size), and fractional
    t_net reaches the network unrounded."""
    for kind in VARIANTS:
        fam = family_of(kind)
        C, h, w = fam.sample_shape(*SIZE.get(kind, fam.default_image_size() if kind == "dit" else (16, 16)))
        x = torch.randn(3, C, h, w, generator=torch.Generator().manual_seed(5))
        rows = cat_rows(fam.encode(prompts_of(kind)), fam.null_rows(1))
        t = torch.tensor([10.5, 500.25, 999.0])
        g = torch.tensor([1.0, 4.0, 7.5]) if fam.guidance_mode == "distilled" else None
        batch = fam.forward(x, t, rows, guidance=g)
        for i in range(3):
            one = fam.forward(
                x[i : i + 1],
                t[i : i + 1],
                {k: v[i : i + 1] for k, v in rows.items()},
                guidance=None if g is None else g[i : i + 1],
            )
            assert rel(batch[i : i + 1], one) <= TOL, (kind, i)
        lo, hi = (
            fam.forward(
                x[1:2], torch.tensor([s]), {k: v[1:2] for k, v in rows.items()}, guidance=None if g is None else g[1:2]
            )
            for s in (500.0, 501.0)
        )
        mid = batch[1:2]
        assert rel(mid, lo) > 1e-7 and rel(mid, hi) > 1e-7, kind  # 500.25 is neither 500 nor 501


def test_forward_runs_the_network_in_its_dtype():
    fam32 = family_of("sd")
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    rows, t = fam32.encode(prompts_of("sd")), torch.tensor([250.5, 700.0])
    ref = fam32.forward(x, t, rows)
    pipe64 = T.build("sd", seed=0)
    pipe64.unet.to(torch.float64)
    fam64 = family_of("sd", pipe64)
    seen = {}
    original = pipe64.unet.forward

    def spy(sample, *a, **kw):
        seen["dtypes"] = (sample.dtype, kw["encoder_hidden_states"].dtype)
        return original(sample, *a, **kw)

    pipe64.unet.forward = spy
    try:
        out = fam64.forward(x, t, rows)  # float32 x and rows, float64 network
        out64 = fam64.forward(x.double(), t, rows)
    finally:
        del pipe64.unet.forward
    assert seen["dtypes"] == (torch.float64, torch.float64)
    assert out.dtype == torch.float32 and out64.dtype == torch.float64
    assert rel(out, ref) <= TOL and rel(out64, ref) <= TOL
    with pytest.raises(ShapeError, match="one row per sample"):
        fam32.forward(x, t, fam32.encode(list(T.PROMPTS["sd"][:3])))
    with pytest.raises(FewstepError, match="takes no guidance"):
        fam32.forward(x, t, rows, guidance=torch.ones(2))


# ----------------------------------------------------------------------------- 3. decode
@pytest.mark.parametrize("kind", VARIANTS)
def test_decode_equals_the_pipelines_image(kind):
    run = run_of(kind)
    assert run.latents.shape == (2, *run.fam.sample_shape(*run.size))
    img = run.fam.decode(run.latents)
    assert img.shape == run.image.shape == (2, 3, *run.size)
    assert float(img.min()) >= -1.0 and float(img.max()) <= 1.0
    assert float((img / 2 + 0.5 - run.image).abs().max()) <= 1e-5
    assert float(run.image.std()) > 1e-3  # a real image, not a constant


# ----------------------------------------------------------------------------- 4. sample_shape
OTHER = {
    "sd": (24, 32),
    "sd_v": (32, 16),
    "sdxl": (32, 16),
    "pixart_sigma": (24, 32),
    "sd3": (24, 32),
    "flux": (20, 28),
}


@pytest.mark.parametrize("kind", VARIANTS)
def test_sample_shape_equals_the_pipelines_latents(kind):
    run, fam, k = run_of(kind), family_of(kind), base_kind(kind)
    pipe = run.pipe
    first_x = network_x(run, run.calls[0])
    assert fam.sample_shape(*run.size) == tuple(first_x.shape[1:])  # the run's own latent
    assert fam.image_size == tuple(run.size)
    default = fam.default_image_size()
    assert fam.sample_shape() == fam.sample_shape(*default)
    if k == "dit":
        assert default == (16, 16) and fam.sample_shape() == (4, 8, 8)
        with pytest.raises(ShapeError, match="only 16x16"):
            fam.sample_shape(32, 32)
        return
    H, Wd = OTHER[kind]
    C = fam.latent_channels
    gen = torch.Generator().manual_seed(0)
    lat = pipe.prepare_latents(1, C, H, Wd, torch.float32, "cpu", gen)
    if k == "flux":
        lat = pipe._unpack_latents(lat[0], H, Wd, pipe.vae_scale_factor)
        assert default == (pipe.default_sample_size * pipe.vae_scale_factor,) * 2
    else:
        assert default == (T.IMAGE, T.IMAGE)  # the pipelines' default: sample_size * vae_scale_factor
    assert fam.sample_shape(H, Wd) == tuple(lat.shape[1:])
    assert fam.image_size == (H, Wd)
    if k in ("sd", "sdxl", "pixart_sigma", "sd3"):
        with pytest.raises(ShapeError, match="multiples of"):
            fam.sample_shape(20, 18)
    if k == "sd3":  # 40x40 latents are 20x20 patches, past the 16-per-side position table: refused, as the network
        with pytest.raises(ShapeError, match="at most 16"):
            fam.sample_shape(80, 80)
        with pytest.raises(ValueError):
            fam.network(
                hidden_states=torch.zeros(1, 16, 40, 40),
                timestep=torch.ones(1),
                encoder_hidden_states=torch.zeros(1, 4, 64),
                pooled_projections=torch.zeros(1, 48),
            )


def test_sdxl_time_ids_follow_sample_shape():
    fam = family_of("sdxl")
    fam.sample_shape(32, 16)
    assert fam.time_ids(2).tolist() == [[32, 16, 0, 0, 32, 16]] * 2
    assert fam.identity()["image_size"] == [32, 16]


# ----------------------------------------------------------------------------- 5. family_for
@pytest.mark.parametrize("kind", VARIANTS)
def test_family_for_each_pipeline(kind):
    pipe = pipe_of(kind)
    name = type(pipe).__name__
    want = EXPECTED[kind]
    assert family_for(name) is want and family_for(pipe) is want and family_for(type(pipe)) is want
    assert family_for({"_class_name": name}) is want
    assert name in want.pipeline_classes
    sub = type("MyPipeline", (type(pipe),), {})
    assert family_for(sub) is want  # a subclass maps like its base
    fam = family_of(kind)
    ident = fam.identity()
    assert ident["family"] == want.name and ident["network"] == type(fam.network).__name__
    assert ident["pipeline"] == name and ident["sample_shape"] == list(fam.sample_shape(*fam.image_size))
    assert json.loads(json.dumps(ident)) == ident


def test_family_for_refuses_other_pipelines():
    supported = [c for fam in FAMILIES for c in fam.pipeline_classes]
    assert len(supported) == 6 and len(set(f.name for f in FAMILIES)) == 6
    for bad in ("KandinskyV22Pipeline", object(), {"_class_name": "StableDiffusionImg2ImgPipeline"}, {}):
        with pytest.raises(ModelSpecError) as e:
            family_for(bad)
        msg = str(e.value)
        assert "\n" not in msg and all(c in msg for c in supported)
    assert "KandinskyV22Pipeline" in str(pytest.raises(ModelSpecError, family_for, "KandinskyV22Pipeline").value)


def test_names_and_guidance_modes():
    assert [f.name for f in FAMILIES] == ["sd", "sdxl", "dit", "pixart-sigma", "sd3", "flux"]
    for kind in T.KINDS:
        fam = family_of(kind)
        assert fam.guidance_mode == ("distilled" if kind == "flux" else "cfg")
        assert fam.scheduler_config["_class_name"] == type(fam.pipe.scheduler).__name__
        assert {k: v for k, v in fam.scheduler_config.items() if k != "_class_name"} == {
            k: v for k, v in fam.pipe.scheduler.config.items() if k != "_class_name"
        }
    schnell = T.build("flux", seed=0, guidance_embeds=False)
    fam = family_of("flux", schnell)
    assert fam.guidance_mode == "none"
    x = torch.randn(1, 16, 8, 8)
    rows = fam.encode(prompts_of("flux")[:1])
    assert fam.forward(x, torch.tensor([500.0]), rows).shape == x.shape
    with pytest.raises(FewstepError, match="takes no guidance"):
        fam.forward(x, torch.tensor([500.0]), rows, guidance=torch.ones(1))
    with pytest.raises(FewstepError, match="guidance="):
        family_of("flux").forward(x, torch.tensor([500.0]), rows)


# ----------------------------------------------------------------------------- Flux specifics
def test_flux_noise_is_the_pipelines_randn_before_packing():
    pipe, fam = pipe_of("flux"), family_of("flux")
    H, Wd = SIZE["flux"]
    shape = fam.sample_shape(H, Wd)
    for seed in (0, 3):
        noise = torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed))
        packed, ids = pipe.prepare_latents(
            1, shape[0], H, Wd, torch.float32, "cpu", torch.Generator().manual_seed(seed)
        )
        assert torch.equal(fam.pack(noise), packed)
        assert torch.equal(fam.unpack(packed, *shape[1:]), noise)
        assert torch.equal(fam.image_ids(*shape[1:], torch.float32, torch.device("cpu")), ids)
    # a pipeline given latents=pack(noise) makes exactly the generator run
    gen_run = pipe(
        prompts_of("flux")[0],
        num_inference_steps=1,
        generator=torch.Generator().manual_seed(3),
        output_type="latent",
        height=H,
        width=Wd,
        max_sequence_length=T.TEXT_LEN,
    ).images
    noise = torch.randn((1, *shape), generator=torch.Generator().manual_seed(3))
    lat_run = pipe(
        prompts_of("flux")[0],
        num_inference_steps=1,
        latents=fam.pack(noise),
        output_type="latent",
        height=H,
        width=Wd,
        max_sequence_length=T.TEXT_LEN,
    ).images
    assert torch.equal(gen_run, lat_run)


def test_flux_true_cfg_uses_null_rows_as_the_negative():
    pipe, fam = pipe_of("flux"), family_of("flux")
    H, Wd = SIZE["flux"]
    fam.sample_shape(H, Wd)
    calls = record(
        pipe,
        fam.network,
        lambda: pipe(
            prompts_of("flux"),
            negative_prompt=["", ""],
            true_cfg_scale=2.0,
            guidance_scale=W,
            num_inference_steps=1,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
            height=H,
            width=Wd,
            max_sequence_length=T.TEXT_LEN,
        ),
    )
    assert len(calls) == 2  # cond, then negative
    t = float(pipe.scheduler.timesteps[0])

    def unpack(z):
        return pipe._unpack_latents(z, H, Wd, pipe.vae_scale_factor)

    x = unpack(calls[1][1]["hidden_states"])
    g = torch.full((4,), W)
    both = fam.forward(
        torch.cat([x, x]), torch.full((4,), t), cat_rows(fam.encode(prompts_of("flux")), fam.null_rows(2)), guidance=g
    )
    assert rel(both[:2], unpack(calls[0][2])) <= TOL and rel(both[2:], unpack(calls[1][2])) <= TOL


# ----------------------------------------------------------------------------- PixArt added conditions
def test_pixart_resolution_conditions_match_pixart_alpha():
    """A transformer with use_additional_conditions gets resolution (H, W) and aspect ratio H / W of the
    image size, as PixArtAlphaPipeline passes them (PixArtSigmaPipeline cannot run such a transformer).
    PixArtAlphaPipeline passes them only for sample_size 128 (PixArt-Alpha 1024, the one checkpoint that uses
    them), so the test transformer says 128 and is run at a small size (its position table is recomputed)."""
    from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel

    sigma = pipe_of("pixart_sigma")
    torch.manual_seed(0)
    net = PixArtTransformer2DModel(  # width 24: the resolution and aspect-ratio embeddings take a third each
        num_attention_heads=3,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        cross_attention_dim=24,
        sample_size=128,
        patch_size=2,
        caption_channels=32,
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        use_additional_conditions=True,
        interpolation_scale=1,
    ).eval()
    alpha = PixArtAlphaPipeline(
        tokenizer=sigma.tokenizer,
        text_encoder=sigma.text_encoder,
        vae=sigma.vae,
        transformer=net,
        scheduler=sigma.scheduler,
    )
    alpha.set_progress_bar_config(disable=True)
    fam = PixArtSigmaFamily(alpha, max_sequence_length=T.TEXT_LEN, clean_caption=False)
    H, Wd = 16, 24
    calls = record(
        alpha,
        net,
        lambda: alpha(
            prompts_of("pixart_sigma"),
            guidance_scale=W,
            num_inference_steps=2,
            height=H,
            width=Wd,
            use_resolution_binning=False,
            clean_caption=False,
            max_sequence_length=T.TEXT_LEN,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        ),
    )
    args, kwargs, out = calls[0]  # (2 steps: PixArtAlphaPipeline's 1-step path reads another scheduler output)
    assert kwargs["added_cond_kwargs"]["resolution"][0].tolist() == [H, Wd]
    fam.sample_shape(H, Wd)
    rows = cat_rows(fam.null_rows(2), fam.encode(prompts_of("pixart_sigma")))  # the pipeline's order
    t = torch.full((4,), float(alpha.scheduler.timesteps[0]))
    got = fam.forward(args[0], t, rows)
    assert rel(got, out[:, :4]) <= TOL
    fam.sample_shape(24, 16)  # another size: other conditions, another output
    assert rel(fam.forward(args[0], t, rows), out[:, :4]) > 1e-4
