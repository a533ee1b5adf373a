"""Pipelines in, end to end: a saved tiny diffusers pipeline folder (tests/tiny_pipelines.py) as a fewstep model
through the public entry points only: ``fewstep.specs.load_model("diffusers:" + folder, ...)``,
``fewstep.fit.api.fit``, ``fewstep.evaluate.evaluate``, ``fewstep.sample`` and the ``fewstep`` CLI.

For every kind (SD, SD 2.x-v, SDXL, DiT, PixArt-Sigma, SD3, Flux):
1. load: ``sample_shape`` is the pipeline's own latent shape at the size given (16x24: non-square), the schedule
   and prediction are the scheduler config's, the guidance default is the pipeline's own ``guidance_scale``;
2. prompt sets (.txt, .csv with negative_prompt and guidance columns, .jsonl): per-seed draws that do not depend
   on batching, teacher data that does not depend on the batch size, prompts encoded once (the text encoders'
   calls counted on the instances, across teacher generations, an evaluation and a second load that reads the
   on-disk cache ``<FEWSTEP_CACHE>/embeddings/``);
3. a short fit on the fit part of the prompt set writes an artifact that loads and gets a learned row in an
   evaluation on the held-out part (and through the CLI: solver.json's "conditions", the evaluated model's prompts);
4. the unmodified pipeline with ``FewStepScheduler.from_solver(artifact, model)`` gives ``fewstep.sample``'s latents;
5. the pipeline's own scheduler (DDIM on SD, FlowMatchEuler on SD3 / Flux) with guidance (a negative prompt; Flux's
   embedded guidance) matches ``fewstep.sample`` with the same solver on the same grid;
6. several guidance scales: per-seed scales, one fit across them, an artifact usable inside its range only;
7. bad input: one clear line.

The pipelines decode at the end, so their final latents are read from a recording wrapper on the scheduler
instance's ``step`` (removed afterwards). float32 throughout. Tiny pipelines are saved once per module; teacher
caches are made with small shards first (``generate_teacher(..., shard_size=32)``), which a fit then reuses.
"""

from __future__ import annotations

import inspect
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
import fewstep
import tiny_pipelines as T
from fewstep.conditions import Entry, PromptSet
from fewstep.errors import ArtifactError, FewstepError, ModelSpecError
from fewstep.evaluate import evaluate
from fewstep.fit.api import fit
from fewstep.fit.teacher import generate_teacher
from fewstep.integrations.diffusers_scheduler import FewStepScheduler
from fewstep.integrations.families import FluxFamily
from fewstep.seeds import EVAL_SEED_START, VAL_SEED_START
from fewstep.specs import load_model

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning", "ignore::UserWarning")

F64 = torch.float64
VARIANTS = (*T.KINDS, "sd_v")  # sd_v: SD with prediction_type="v_prediction"
TEXT = tuple(k for k in VARIANTS if k != "dit")
FLOWS = ("sd3", "flux")
SIZE = (16, 24)  # (height, width) of every text pipeline here: non-square catches swapped axes
ATOL = 2e-5  # float32, per unit of latent magnitude (random tiny networks under CFG reach |x| ~ 1e2)
NFE = 3
FIT = {"samples": 32, "val_samples": 16, "confirm_samples": 16, "steps": 20, "batch": 4, "eval_every": 5}  # a short fit
# the guidance scale each pipeline's __call__ uses when none is given
DEFAULT_W = {"sd": 7.5, "sd_v": 7.5, "sdxl": 5.0, "dit": 4.0, "pixart_sigma": 4.5, "sd3": 7.0, "flux": 3.5}
# which prompt file each text kind loads
FORMAT = {"sd": "csv", "sd_v": "txt", "sdxl": "jsonl", "pixart_sigma": "txt", "sd3": "csv", "flux": "jsonl"}
DIT_CLASSES = "0,1,2,3"

# prompts in the tiny tokenizers' vocabulary; PromptSet.split holds out the two marked (by text hash)
PROMPTS = (
    "a photo of a cat",
    "a red car on the road",
    "a painting of a blue house in the snow",
    "a small bird in a green tree",
    "an old boat on the river at night",
    "a white horse in a field",
    "a drawing of a yellow flower",
    "a black dog in the city",
    "the moon over a mountain",
    "a big fish in the river",
    "a green field in the morning",
    "a bright sun in the sky",
)
HELD_OUT = ("a big fish in the river", "a bright sun in the sky")
# (negative prompt, guidance) of some prompts in the .csv / .jsonl files
EXTRA = {0: ("a dog in the snow", 3.0), 2: ("a black car at night", None), 5: (None, 6.0), 9: ("a red tree", 2.5)}

NUMBERS: dict[str, float] = {}  # measured parity numbers, printed (pytest -s) and summarised at the end


def base(kind: str) -> str:
    return "sd" if kind == "sd_v" else kind


def start_of(kind: str) -> str:
    return "euler@shifted" if kind in FLOWS else "ddim@time"


def teacher_of(kind: str, nfe: int | None = None) -> str:
    """A cheap classic teacher (the tiny UNets are the slowest networks here: fewer steps)."""
    if nfe is None:
        nfe = 10 if base(kind) in ("sd", "sdxl") else 20
    return f"{start_of(kind)}:{nfe}"


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    return msg


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return float((a.to(F64) - b.to(F64)).abs().max())


def check_close(tag: str, got: torch.Tensor, ref: torch.Tensor) -> None:
    """max |got - ref| <= ATOL * max(1, max |ref|); the numbers are recorded."""
    d, scale = maxdiff(got, ref), max(1.0, float(ref.abs().max()))
    NUMBERS[tag] = d / scale
    print(
        f"{tag}: max |pipeline - fewstep| = {d:.2e} (latents up to {float(ref.abs().max()):.3g}; "
        f"relative {d / scale:.2e})"
    )
    assert d <= ATOL * scale, (tag, d, scale)


# ----------------------------------------------------------------------------- prompt files
def write_prompt_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    txt = folder / "prompts.txt"
    txt.write_text("\n".join(PROMPTS) + "\n\n")  # a blank line is skipped
    rows = ["prompt,negative_prompt,guidance"]
    for i, p in enumerate(PROMPTS):
        neg, w = EXTRA.get(i, (None, None))
        rows.append(f"{p},{neg or ''},{'' if w is None else w}")
    csv = folder / "prompts.csv"
    csv.write_text("\n".join(rows) + "\n")
    lines = []
    for i, p in enumerate(PROMPTS):
        neg, w = EXTRA.get(i, (None, None))
        d = {"prompt": p, **({"negative_prompt": neg} if neg else {}), **({"guidance": w} if w is not None else {})}
        lines.append(json.dumps(d))
    jsonl = folder / "prompts.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    return {"txt": txt, "csv": csv, "jsonl": jsonl}


def expected_entries(fmt: str) -> tuple[Entry, ...]:
    if fmt == "txt":
        return tuple(Entry(p) for p in PROMPTS)
    return tuple(Entry(p, *EXTRA.get(i, (None, None))) for i, p in enumerate(PROMPTS))


# ----------------------------------------------------------------------------- the module's pipelines and models
def load_options(kind: str) -> dict:
    """load_model options: the image size (text families) and a short text length (T5 families)."""
    opts: dict = {} if kind == "dit" else {"height": SIZE[0], "width": SIZE[1]}
    if base(kind) in ("pixart_sigma", "sd3", "flux"):
        opts["max_sequence_length"] = T.TEXT_LEN
    if base(kind) == "pixart_sigma":
        opts["clean_caption"] = False
    return opts


def call_kwargs(kind: str) -> dict:
    """The pipeline __call__ arguments that match load_options."""
    if kind == "dit":
        return {}
    return {**T.call_kwargs(base(kind)), "height": SIZE[0], "width": SIZE[1]}


class Env:
    """Tiny pipeline folders (saved once), prompt files, models (loaded once) and fits (run once) of this module."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files = write_prompt_files(root / "prompts")
        self._folders: dict[str, Path] = {}
        self._models: dict = {}
        self._fits: dict = {}
        self._multi: dict = {}

    def folder(self, kind: str) -> Path:
        if kind not in self._folders:
            opts = {"prediction_type": "v_prediction"} if kind == "sd_v" else {}
            self._folders[kind] = T.save_pipeline(base(kind), self.root / "pipes" / kind, seed=0, **opts)
        return self._folders[kind]

    def prompt_file(self, kind: str) -> Path | None:
        return None if kind == "dit" else self.files[FORMAT[kind]]

    def load(self, kind: str, **over):
        """A fresh load of the kind's folder (its prompt file; DiT: a few classes)."""
        opts = {**load_options(kind), **over}
        if kind == "dit":
            opts.setdefault("classes", DIT_CLASSES)
        else:
            opts.setdefault("prompts", self.prompt_file(kind))
        return load_model("diffusers:" + str(self.folder(kind)), **opts)

    def model(self, kind: str):
        if kind not in self._models:
            self._models[kind] = self.load(kind)
        return self._models[kind]

    def fit(self, kind: str):
        """(the fit's model, the FitResult): s4s at NFE 3 on the fit part of the prompt set."""
        if kind not in self._fits:
            m = self.model(kind)
            if kind != "dit":
                m = m.with_prompts(PromptSet.read(self.prompt_file(kind)).split()[0])
            prefill_teacher(m, teacher_of(kind), FIT["samples"], FIT["val_samples"], FIT["confirm_samples"])
            res = fit(
                m,
                "s4s",
                NFE,
                out=self.root / "fits" / kind,
                teacher=teacher_of(kind),
                start=start_of(kind),
                progress=False,
                **FIT,
            )
            self._fits[kind] = (m, res)
        return self._fits[kind]

    def load_multi(self, kind: str):
        """The kind drawing a guidance scale per seed from {2, 4} (text kinds: the .txt prompt file)."""
        return self.load(kind, guidance="2,4", **({} if kind == "dit" else {"prompts": self.files["txt"]}))

    def multi(self, kind: str):
        """The FitResult of a fit across the guidance scales 2 and 4 (run once)."""
        if kind not in self._multi:
            m = self.load_multi(kind)
            prefill_teacher(m, teacher_of(kind, 10), FIT["samples"], FIT["val_samples"], FIT["confirm_samples"])
            self._multi[kind] = fit(
                m,
                "s4s",
                NFE,
                out=self.root / "multi" / kind,
                teacher=teacher_of(kind, 10),
                start=start_of(kind),
                progress=False,
                **{**FIT, "steps": 40},
            )
        return self._multi[kind]


def prefill_teacher(model, teacher: str, samples: int, val: int, confirm: int) -> None:
    """The teacher data a fit with these counts reads, made in shards of 32 seeds (fit's default shard is 128 seeds:
    a cache keeps the shard size it was made with, so the fit then reads these)."""
    seeds = list(range(samples)) + list(range(VAL_SEED_START, VAL_SEED_START + val + confirm))
    generate_teacher(model, seeds, teacher, shard_size=32, progress=False)


@pytest.fixture(scope="module")
def env(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("pipelines_in")
    mp = pytest.MonkeyPatch()
    mp.setenv("FEWSTEP_CACHE", str(root / "cache"))
    mp.setenv("HF_HUB_OFFLINE", "1")
    try:
        yield Env(root)
    finally:
        mp.undo()
        if NUMBERS:
            print("\nparity (max |diff| / max(1, max |ref|)): " + ", ".join(f"{k} {v:.1e}" for k, v in NUMBERS.items()))


# ----------------------------------------------------------------------------- running the real pipeline
def run_pipeline(
    kind: str,
    model,
    steps: int,
    scheduler=None,
    prompt: str | None = None,
    label: int | None = None,
    negative: str | None = None,
    noise: torch.Tensor | None = None,
    seed: int = 0,
    w: float | None = None,
):
    """Call the model's own pipeline object the normal way (its own scheduler, or ``scheduler`` for this call);
    returns (its final latents unpacked, (1, C, h, w); the timesteps it stepped)."""
    pipe = model.family.pipe
    own = pipe.scheduler
    if scheduler is not None:
        pipe.scheduler = scheduler
    sched = pipe.scheduler
    step = type(sched).step
    seen: list = []

    def recording(model_output, timestep, sample, *a, **kw):
        out = step(sched, model_output, timestep, sample, *a, **kw)
        seen.append((float(timestep), (out[0] if isinstance(out, tuple) else out.prev_sample).detach().clone()))
        return out

    sched.step = recording
    w = model.guidance_scale if w is None else w
    try:
        if kind == "dit":  # DiTPipeline draws its noise from the generator (batch 1: the same draw as model.noise)
            pipe(
                class_labels=[label],
                guidance_scale=w,
                num_inference_steps=steps,
                generator=torch.Generator().manual_seed(seed),
                output_type="np",
            )
        else:
            kw = call_kwargs(kind)
            if noise is not None:
                kw["latents"] = FluxFamily.pack(noise) if base(kind) == "flux" else noise.clone()
            else:
                kw["generator"] = torch.Generator().manual_seed(seed)
            if negative is not None:
                kw["negative_prompt"] = negative
            pipe(prompt, guidance_scale=w, num_inference_steps=steps, output_type="latent", **kw)
    finally:
        del sched.step
        pipe.scheduler = own
    assert "step" not in vars(sched)
    out = seen[-1][1]
    if kind == "flux":
        out = pipe._unpack_latents(out, SIZE[0], SIZE[1], pipe.vae_scale_factor)
    if kind == "dit":  # DiT steps its doubled (cond, uncond) batch: both halves are the same sample
        assert torch.equal(out[:1], out[1:])
        out = out[:1]
    return out, [t for t, _ in seen]


def cond_of(kind: str, model, prompt_or_label, negative: str | None = None) -> dict:
    if kind == "dit":
        return {"class_labels": torch.tensor([int(prompt_or_label)])}
    return model.prompt_cond([prompt_or_label], negative=None if negative is None else [negative])


# ============================================================================= 1. load
@pytest.mark.parametrize("kind", VARIANTS)
def test_load_shape_schedule_and_default_guidance(env, kind):
    model = env.model(kind)
    pipe = model.family.pipe
    cfg = pipe.scheduler.config
    # the pipeline's own latent shape at this size: one step of its own run
    lat, _ = run_pipeline(kind, model, steps=1, prompt=PROMPTS[0], label=1)
    assert tuple(lat.shape[1:]) == model.sample_shape
    want = (4, 8, 8) if kind == "dit" else ((16 if kind in FLOWS else 4), SIZE[0] // 2, SIZE[1] // 2)
    assert model.sample_shape == want
    assert tuple(model.noise([3]).shape) == (1, *want)
    # schedule and prediction as the scheduler config says
    if kind in FLOWS:
        assert model.schedule.kind == "flow" and model.prediction == "velocity"
        gs = model.schedule.grid_shift
        assert gs["shift"] == cfg.shift and gs["num_train_timesteps"] == cfg.num_train_timesteps
        if kind == "flux":  # dynamic shifting: the mu FluxPipeline computes for this latent size
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            seq = (SIZE[0] // 4) * (SIZE[1] // 4)
            mu = calculate_shift(seq, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
            assert cfg.use_dynamic_shifting and math.isclose(gs["mu"], mu, rel_tol=1e-12)
        else:
            assert not cfg.use_dynamic_shifting and gs["mu"] is None
    else:
        sc = model.schedule.config()
        assert sc["type"] == "vp_discrete" and model.schedule.kind != "flow"
        for key in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end"):
            assert sc[key] == cfg[key], key
        assert model.prediction == {"epsilon": "eps", "v_prediction": "v"}[cfg.prediction_type]
        assert model.prediction == ("v" if kind == "sd_v" else "eps")
    # the default guidance is the pipeline's own
    own = inspect.signature(type(pipe).__call__).parameters["guidance_scale"].default
    assert model.guidance_scale == own == DEFAULT_W[kind]
    assert model.guidance_input == (kind == "flux")
    assert model.guidance_scales() is None


# ============================================================================= 2. prompt sets
@pytest.mark.parametrize("fmt", ["txt", "csv", "jsonl"])
def test_prompt_files_read(env, fmt):
    ps = PromptSet.read(env.files[fmt])
    assert ps.entries == expected_entries(fmt)
    fit_part, held = ps.split()
    assert [e.prompt for e in held.entries] == list(HELD_OUT)
    assert [e.prompt for e in fit_part.entries] == [p for p in PROMPTS if p not in HELD_OUT]
    assert ps.split() == (fit_part, held)  # deterministic


def effective(model, cond: dict) -> dict:
    """cond with the scale each sample is guided at made explicit (absent: the model's scale)."""
    out = dict(cond)
    n = next(iter(cond.values())).shape[0]
    w = cond.get("guidance_scale", model.guidance_scale)
    out["guidance_scale"] = torch.as_tensor(w, dtype=F64).reshape(-1).expand(n).clone()
    return out


@pytest.mark.parametrize("kind", VARIANTS)
def test_conditions_drawn_per_seed(env, kind):
    """Each seed's prompt / class and guidance scale are its own: the same asked together, alone or reversed."""
    model = env.model(kind)
    seeds = list(range(100, 140))
    together = effective(model, model.cond_for(seeds))
    alone = [effective(model, model.cond_for([s])) for s in seeds]
    backwards = effective(model, model.cond_for(seeds[::-1]))
    for key, v in together.items():
        assert torch.equal(v, torch.cat([a[key] for a in alone])), key
        assert torch.equal(v, backwards[key].flip(0)), key
    if kind == "dit":
        assert set(together["class_labels"].tolist()) == {0, 1, 2, 3}
        return
    idx = together["prompt"]
    assert len(set(idx.tolist())) >= 6 and int(idx.max()) < len(PROMPTS)
    entries = expected_entries(FORMAT[kind])
    # a per-prompt scale where the file gives one, else the pipeline's default
    want = [entries[i].guidance if entries[i].guidance is not None else DEFAULT_W[kind] for i in idx.tolist()]
    assert together["guidance_scale"].tolist() == want
    assert (len(set(want)) > 1) == (FORMAT[kind] != "txt")
    if FORMAT[kind] == "txt":
        return
    # a seed drawing the first prompt runs with the file's negative prompt and scale
    seed = next(s for s in range(1000) if int(model.cond_for([s])["prompt"]) == 0)
    neg, w = EXTRA[0]
    x = model.noise([seed])
    t = torch.tensor(0.5, dtype=F64)
    with torch.no_grad():
        drawn = model(x, t, **model.cond_for([seed]))
        asked = model(x, t, **model.prompt_cond([PROMPTS[0]], None if kind == "flux" else [neg], guidance=w))
        plain = model(x, t, **model.prompt_cond([PROMPTS[0]], guidance=w))
        default = model(x, t, **model.prompt_cond([PROMPTS[0]], None if kind == "flux" else [neg]))
    assert torch.equal(drawn, asked)
    assert maxdiff(default, drawn) > 1e-4  # the file's scale, not the pipeline's default
    if kind != "flux":  # Flux has no unconditional half: a negative prompt does not enter
        assert maxdiff(plain, drawn) > 1e-4


@pytest.mark.parametrize("kind", TEXT)
def test_cond_keys_do_not_depend_on_the_batch(env, kind, tmp_path):
    model = env.model(kind)
    entries = expected_entries(FORMAT[kind])
    seeds = list(range(100, 140))
    own = [s for s in seeds if entries[int(model.cond_for([s])["prompt"])].guidance is not None]
    plain = [s for s in seeds if s not in own]
    assert plain and (own or FORMAT[kind] == "txt")
    pair = [plain[0], *own[:1]]
    together = model.cond_for(pair)
    alone = [model.cond_for([s]) for s in pair]
    assert all(set(a) == set(together) for a in alone)
    for key, v in together.items():
        assert torch.equal(v, torch.cat([a[key] for a in alone])), key
    # teacher data made one seed per shard keeps every seed's scale
    data = generate_teacher(model, pair, teacher_of(kind, 1), shard_size=1, cache_dir=tmp_path, progress=False)
    assert set(data.cond) == set(together)
    for key, v in together.items():
        assert torch.equal(data.cond[key], v), key


@pytest.mark.parametrize("kind", VARIANTS)
def test_teacher_data_independent_of_batch_size(env, kind, tmp_path):
    model = env.model(kind)
    seeds = list(range(8))
    spec = teacher_of(kind, 4)
    one = generate_teacher(model, seeds, spec, batch_size=1, shard_size=8, cache_dir=tmp_path / "b1", progress=False)
    eight = generate_teacher(model, seeds, spec, batch_size=8, shard_size=8, cache_dir=tmp_path / "b8", progress=False)
    assert one.seeds == eight.seeds == seeds
    assert torch.equal(one.noise, eight.noise) and torch.equal(one.noise, model.noise(seeds))
    for key in one.cond:
        assert torch.equal(one.cond[key], eight.cond[key]), key
    d = maxdiff(one.target, eight.target)
    scale = max(1.0, float(eight.target.abs().max()))
    NUMBERS[f"{kind} teacher batch 1 vs 8"] = d / scale
    print(f"{kind}: teacher batch 1 vs 8: max |diff| = {d:.2e} (targets up to {scale:.3g})")
    assert d <= 1e-5 * scale


class EncoderCalls:
    """Counts calls of the text encoders of every pipeline DiffusionPipeline.from_pretrained loads (wrapped on
    each instance as it is loaded)."""

    ATTRS = ("text_encoder", "text_encoder_2", "text_encoder_3")

    def __init__(self, monkeypatch) -> None:
        import diffusers

        self.calls = 0
        original = diffusers.DiffusionPipeline.from_pretrained.__func__
        counter = self

        def loading(cls, *a, **kw):
            pipe = original(cls, *a, **kw)
            for attr in counter.ATTRS:
                enc = getattr(pipe, attr, None)
                if enc is not None:
                    counter.wrap(enc)
            return pipe

        monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", classmethod(loading))

    def wrap(self, enc) -> None:
        forward = enc.forward

        def counting(*a, **kw):
            self.calls += 1
            return forward(*a, **kw)

        enc.forward = counting


@pytest.mark.parametrize("kind", TEXT)
def test_prompts_encoded_once(env, kind, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("FEWSTEP_CACHE", str(cache))
    enc = EncoderCalls(monkeypatch)
    model = env.load(kind)
    texts = {e.prompt for e in expected_entries(FORMAT[kind])} | {
        e.negative for e in expected_entries(FORMAT[kind]) if e.negative
    }
    assert enc.calls > 0 and model.net.table.encoded == len(texts)
    files = sorted((cache / "embeddings").rglob("*.safetensors"))
    assert len(files) == len(texts) + 1  # and the pipeline's own unconditional rows
    loaded_calls = enc.calls
    # two teacher generations (fit part), an evaluation (held-out part), a prompt asked for again: nothing encoded
    fit_part, held = PromptSet.read(env.prompt_file(kind)).split()
    fm = model.with_prompts(fit_part)
    spec = teacher_of(kind, 2)
    generate_teacher(fm, range(4), spec, shard_size=4, progress=False)
    generate_teacher(fm, range(4, 8), teacher_of(kind, 3), shard_size=4, progress=False)
    rep = evaluate(
        model.with_prompts(held), nfe=2, solvers=[start_of(kind)], samples=2, reference=start_of(kind), reference_nfe=4
    ).as_dict()
    assert [r["rmse"] is not None for r in rep["results"]] == [True]
    model.prompt_cond([PROMPTS[3]])
    assert enc.calls == loaded_calls and model.net.table.encoded == len(texts)
    # a second load of the same folder reads the on-disk cache: it encodes nothing
    again = env.load(kind)
    assert enc.calls == loaded_calls and again.net.table.encoded == 0
    assert sorted((cache / "embeddings").rglob("*.safetensors")) == files
    rows_a = model.net.table.rows([PROMPTS[4], PROMPTS[0]], "cpu")
    rows_b = again.net.table.rows([PROMPTS[4], PROMPTS[0]], "cpu")
    assert rows_a.keys() == rows_b.keys() and all(torch.equal(rows_a[k], rows_b[k]) for k in rows_a)
    with torch.no_grad():  # guided sampling with the second load: its unconditional rows came from the cache too
        x = fewstep.sample(again, again.noise([1, 2]), start_of(kind), nfe=2, cond=again.cond_for([1, 2]))
    assert torch.isfinite(x).all() and enc.calls == loaded_calls
    # a new prompt is encoded (once)
    model.prompt_cond(["a white cat in the snow"])
    model.prompt_cond(["a white cat in the snow"])
    assert model.net.table.encoded == len(texts) + 1 and enc.calls > loaded_calls


# ============================================================================= 3. fit, artifact, evaluation
@pytest.mark.parametrize("kind", VARIANTS)
def test_fit_artifact_and_learned_row(env, kind):
    _, res = env.fit(kind)
    model = env.model(kind)
    assert res.path is not None and res.path.is_file() and (res.path.parent / "params.safetensors").is_file()
    doc = json.loads(res.path.read_text())
    assert doc["nfe"] == NFE and doc["method"] == "s4s" and doc["start"]["solver"] == start_of(kind)
    assert doc["teacher"]["spec"] == teacher_of(kind) and doc["model"]["guidance_scale"] == DEFAULT_W[kind]
    assert "guidance" not in doc
    cond = doc["conditions"]
    if kind == "dit":
        assert cond["classes"] == [0, 1, 2, 3] and "prompts" not in cond
    else:  # the fit part of the prompt set
        fit_part = PromptSet.read(env.prompt_file(kind)).split()[0]
        assert cond["prompts"]["count"] == len(PROMPTS) - len(HELD_OUT) == len(fit_part)
        assert cond["prompts"]["digest"] == fit_part.digest() and "(fit part)" in cond["prompts"]["source"]
    solver = fewstep.load_solver(res.path.parent)
    assert solver.nfe == NFE and solver.kind == "learned"
    tab = solver.tableau(model)  # the model with the whole prompt set: the same network, the artifact applies
    assert tab.N == NFE and torch.isfinite(tab.B).all()
    ev = model if kind == "dit" else model.with_prompts(PromptSet.read(env.prompt_file(kind)).split()[1])
    rep = evaluate(
        ev, nfe=NFE, solvers=[start_of(kind)], samples=6, reference=start_of(kind), reference_nfe=10, learned=[solver]
    ).as_dict()
    rows = {r["grid"]: r for r in rep["results"]}
    assert set(rows) == {"learned", start_of(kind).split("@")[1]}
    learned = rows["learned"]
    assert learned["solver"] == solver.name and learned["nfe"] == NFE
    assert learned["rmse"] is not None and math.isfinite(learned["rmse"]) and learned["rmse"] > 0
    print(
        f"{kind}: kept start {doc['validation']['kept_start']}; held-out RMSE learned {learned['rmse']:.4g} vs "
        f"{start_of(kind)} {rows[start_of(kind).split('@')[1]]['rmse']:.4g} at NFE {NFE}"
    )


def cli(args: list[str]):
    from typer.testing import CliRunner

    from fewstep.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def assert_error_line(r, match: str) -> None:
    """The command failed with one 'error: ...' line and no traceback (diffusers' loading progress bars aside)."""
    errors = [ln for ln in r.output.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1 and errors[0].startswith("error:") and match in errors[0], r.output
    assert "Traceback" not in r.output and (r.exception is None or isinstance(r.exception, SystemExit))


class Evaluations:
    """Records the model every ``fewstep.evaluate.evaluate`` call gets; runs it with a short reference and one
    classic solver (the CLI's closing table asks for every classic solver at a 400-NFE reference)."""

    def __init__(self, monkeypatch, kind: str) -> None:
        import fewstep.evaluate as ev

        self.models: list = []
        real = ev.evaluate

        def recording(model, *a, **kw):
            self.models.append(model)
            kw.update(solvers=[start_of(kind)], reference=start_of(kind), reference_nfe=10)
            return real(model, *a, **kw)

        monkeypatch.setattr(ev, "evaluate", recording)


@pytest.mark.parametrize("kind", ["sd3", "dit"])
def test_cli_fit_uses_the_fit_part_and_evaluates_the_held_out_part(env, kind, tmp_path, monkeypatch):
    folder = env.folder(kind)
    out = tmp_path / "solver"
    cond_args = (
        ["--classes", DIT_CLASSES]
        if kind == "dit"
        else ["--prompts", env.files["csv"], "--height", SIZE[0], "--width", SIZE[1]]
    )
    # the teacher data the CLI fit reads, in small shards (its own would be 128 seeds each): the same model as the
    # CLI loads (the fit part of the file, the pipeline's default text length), so the same teacher cache folder
    same = (
        env.load(kind)
        if kind == "dit"
        else load_model(
            f"diffusers:{folder}", prompts=PromptSet.read(env.files["csv"]).split()[0], height=SIZE[0], width=SIZE[1]
        )
    )
    prefill_teacher(same, teacher_of(kind, 10), 16, 8, 8)
    caches = sorted((env.root / "cache" / "teacher").iterdir())
    evals = Evaluations(monkeypatch, kind)
    r = cli(
        [
            "fit",
            "--model",
            f"diffusers:{folder}",
            "--method",
            "s4s",
            "--nfe",
            NFE,
            "--out",
            out,
            "--samples",
            16,
            "--val-samples",
            8,
            "--confirm-samples",
            8,
            "--steps",
            10,
            "--batch",
            4,
            "--start",
            start_of(kind),
            "--teacher",
            teacher_of(kind, 10),
            "--eval-samples",
            4,
            "--json",
            "--threads",
            1,
            *cond_args,
        ]
    )
    assert r.exit_code == 0, (r.output, r.exception)
    doc = json.loads((out / "solver.json").read_text())
    assert sorted((env.root / "cache" / "teacher").iterdir()) == caches  # it read the teacher data made above
    rep = json.loads(r.stdout[r.stdout.index("{") :])
    assert any(row["grid"] == "learned" and row["rmse"] > 0 for row in rep["results"])
    assert len(evals.models) == 1
    seen = evals.models[0].cond_sampler
    if kind == "dit":
        assert doc["conditions"]["classes"] == [0, 1, 2, 3]
        assert seen.classes.labels == (0, 1, 2, 3)
    else:
        fit_part, held = PromptSet.read(env.files["csv"]).split()
        assert doc["conditions"]["prompts"]["digest"] == fit_part.digest()
        assert doc["conditions"]["prompts"]["count"] == len(fit_part)
        assert seen.prompts.digest() == held.digest()  # the closing table: prompts the fit never saw
        assert [e.prompt for e in seen.prompts.entries] == list(HELD_OUT)
    # fewstep eval with the same prompt file evaluates on its held-out part too
    r = cli(
        [
            "eval",
            "--model",
            f"diffusers:{folder}",
            "--solver",
            out,
            "--solver",
            start_of(kind),
            "--nfe",
            NFE,
            "--samples",
            4,
            "--reference-nfe",
            10,
            "--metrics",
            "none",
            "--json",
            "--threads",
            1,
            *cond_args,
        ]
    )
    assert r.exit_code == 0, (r.output, r.exception)
    rows = json.loads(r.stdout[r.stdout.index("{") :])["results"]
    assert {row["grid"] for row in rows} == {"learned", start_of(kind).split("@")[1]}
    if kind != "dit":
        assert evals.models[-1].cond_sampler.prompts.digest() == held.digest()


# ============================================================================= 4. FewStepScheduler in the pipeline
@pytest.mark.parametrize("kind", VARIANTS)
def test_pipeline_with_fewstep_scheduler_matches_sample(env, kind):
    _, res = env.fit(kind)
    model = env.model(kind)
    art = res.path.parent
    seed, what = 7, (2 if kind == "dit" else PROMPTS[1])
    noise = model.noise([seed])
    sched = FewStepScheduler.from_solver(str(art), model)
    got, stepped = run_pipeline(kind, model, steps=25, scheduler=sched, prompt=what, label=what, noise=noise, seed=seed)
    assert stepped == sched.timesteps.tolist() and len(stepped) == NFE
    with torch.no_grad():
        ref = fewstep.sample(model, noise, art, cond=cond_of(kind, model, what))
    check_close(f"{kind} FewStepScheduler(learned)", got, ref)
    # and a classic solver through the same scheduler
    classic = "dpmpp_2m@logsnr" if kind not in FLOWS else "adams2@shifted"
    sched = FewStepScheduler.from_solver(classic, model, nfe=4)
    got, stepped = run_pipeline(kind, model, steps=25, scheduler=sched, prompt=what, label=what, noise=noise, seed=seed)
    with torch.no_grad():
        ref2 = fewstep.sample(model, noise, classic, nfe=4, cond=cond_of(kind, model, what))
    check_close(f"{kind} FewStepScheduler({classic})", got, ref2)
    assert maxdiff(ref, ref2) > 1e-4


# ============================================================================= 5. the pipelines' own schedulers, guided
@pytest.mark.parametrize("kind", ["sd", "sd_v", "sd3", "flux"])
def test_own_scheduler_guided_parity(env, kind):
    model = env.model(kind)
    pipe = model.family.pipe
    steps, seed, prompt = 4, 11, PROMPTS[2]
    negative = None if kind == "flux" else "a dog in the snow"  # Flux: no unconditional half (embedded guidance)
    noise = model.noise([seed])
    got, stepped = run_pipeline(kind, model, steps=steps, prompt=prompt, negative=negative, noise=noise)
    if kind in FLOWS:  # FlowMatchEuler on its own (shifted) grid; Flux with the mu of this size
        assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
        grid = fewstep.make_grid(model.schedule, steps, "shifted")
        assert (grid - pipe.scheduler.sigmas.to(F64)).abs().max() < 1e-6
        solver, grid_arg = "euler", "shifted"
    else:  # DDIM's timesteps as fewstep's VPDiscrete times; its last step lands on alphas_cumprod[0]: index 0
        assert type(pipe.scheduler).__name__ == "DDIMScheduler" and not pipe.scheduler.config.set_alpha_to_one
        ks = torch.tensor(stepped, dtype=F64)
        assert ks.tolist() == [751.0, 501.0, 251.0, 1.0]
        grid_arg = model.schedule.t_of_index(torch.cat([ks, torch.zeros(1, dtype=F64)]))
        solver = "ddim"
    with torch.no_grad():
        ref = fewstep.sample(
            model, noise, solver, nfe=steps, grid=grid_arg, cond=cond_of(kind, model, prompt, negative)
        )
    check_close(f"{kind} own {type(pipe.scheduler).__name__} (w={model.guidance_scale})", got, ref)
    # guidance matters here: unguided is another sample
    with torch.no_grad():
        other = fewstep.sample(
            model,
            noise,
            solver,
            nfe=steps,
            grid=grid_arg,
            cond=model.prompt_cond([prompt], None if negative is None else [negative], guidance=1.5),
        )
    assert maxdiff(other, ref) > 1e-3


# ============================================================================= 6. several guidance scales
@pytest.mark.parametrize("kind", ["sd3", "flux", "dit"])
def test_fit_across_guidance_scales(env, kind, tmp_path):
    model = env.load_multi(kind)
    assert model.guidance_scales() == (2.0, 4.0)
    seeds = list(range(200, 240))
    w = model.cond_for(seeds)["guidance_scale"]
    assert set(w.tolist()) == {2.0, 4.0}
    assert torch.equal(w, torch.cat([model.cond_for([s])["guidance_scale"] for s in seeds]))
    res = env.multi(kind)
    doc = json.loads(res.path.read_text())
    # the fit beats its start (40 steps: a start kept is the classic solver itself, saved without a guidance range)
    assert not doc["validation"]["kept_start"]
    assert doc["guidance"]["scales"] == [2.0, 4.0] and set(doc["guidance"]["tableaus"]) == {"2", "4"}
    art = res.path.parent
    solver = fewstep.load_solver(art)
    assert solver.guidance_range == (2.0, 4.0)
    noise = model.noise([EVAL_SEED_START, EVAL_SEED_START + 1])

    def at(w):
        if kind == "dit":
            return {"class_labels": torch.tensor([1, 2]), "guidance_scale": torch.as_tensor(w, dtype=F64).expand(2)}
        return model.prompt_cond(PROMPTS[:2], guidance=w)

    with torch.no_grad():
        at3 = fewstep.sample(model, noise, art, cond=at(3.0))
        tab3 = fewstep.sample(model, noise, solver.tableau(model, w=3.0), cond=at(3.0))
        at2 = fewstep.sample(model, noise, art, cond=at(2.0))
        # per-sample scales: each sample runs the tables of its own scale
        mixed = fewstep.sample(model, noise, art, cond=at(torch.tensor([2.0, 3.0], dtype=F64)))
    assert torch.isfinite(at3).all() and torch.equal(at3, tab3) and maxdiff(at2, at3) > 1e-4
    scale = max(1.0, float(at3.abs().max()))
    assert maxdiff(mixed[:1], at2[:1]) < 1e-5 * scale and maxdiff(mixed[1:], at3[1:]) < 1e-5 * scale  # batch 1 vs 2
    with pytest.raises(ArtifactError, match="2..4") as e:
        fewstep.sample(model, noise, art, cond=at(5.0))
    one_line(e)
    if kind != "dit":
        return
    # the CLI (DiT: the CLI loads the same model; it has no --max-sequence-length for the text kinds' models above):
    # a scale outside the range is one line, inside it samples
    base_args = [
        "sample",
        "--model",
        f"diffusers:{env.folder(kind)}",
        "--classes",
        DIT_CLASSES,
        "--solver",
        art,
        "--n",
        2,
    ]
    r = cli([*base_args, "--guidance", "5", "--out", tmp_path / "x5.safetensors"])
    assert r.exit_code == 2, (r.output, r.exception)
    assert_error_line(r, "2..4")
    r = cli([*base_args, "--guidance", "3", "--out", tmp_path / "x3.safetensors"])
    assert r.exit_code == 0 and (tmp_path / "x3.safetensors").is_file(), (r.output, r.exception)


def test_scheduler_runs_a_multi_scale_artifact_at_the_models_scale(env):
    art = env.multi("dit").path.parent
    model = env.load("dit", guidance="3")
    assert model.guidance_scale == 3.0
    noise = model.noise([5])
    with torch.no_grad():
        ref = fewstep.sample(model, noise, art, cond={"class_labels": torch.tensor([2])})
    sched = FewStepScheduler.from_solver(str(art), model)
    got, stepped = run_pipeline("dit", model, steps=25, scheduler=sched, label=2, seed=5)
    assert len(stepped) == NFE
    check_close("dit FewStepScheduler(learned across scales, w=3)", got, ref)


# ============================================================================= 7. bad input, one line each
def _kandinsky(env) -> Path:
    folder = env.root / "kandinsky"
    if not folder.is_dir():
        shutil.copytree(env.folder("sd"), folder)
        idx = json.loads((folder / "model_index.json").read_text())
        idx["_class_name"] = "KandinskyPipeline"
        (folder / "model_index.json").write_text(json.dumps(idx))
    return folder


def test_unsupported_pipeline_class_with_prompts(env):
    with pytest.raises(ModelSpecError) as e:
        load_model(f"diffusers:{_kandinsky(env)}", prompts=list(PROMPTS[:2]))
    msg = one_line(e)
    assert "KandinskyPipeline" in msg and "StableDiffusionPipeline" in msg


def test_unsupported_pipeline_class_is_refused(env):
    with pytest.raises(ModelSpecError) as e:
        load_model(f"diffusers:{_kandinsky(env)}")
    msg = one_line(e)
    assert "KandinskyPipeline" in msg and "StableDiffusionPipeline" in msg


def test_plain_unet_pipeline_still_loads_the_old_way(env):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    folder = env.root / "ddpm"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(str(folder))
    m = load_model(f"diffusers:{folder}")
    assert m.sample_shape == (3, 8, 8) and m.cond_sampler is None
    with pytest.raises(ModelSpecError) as e:
        load_model(f"diffusers:{folder}", prompts=list(PROMPTS[:2]))
    one_line(e)


def test_bad_prompt_files(env, tmp_path):
    folder = f"diffusers:{env.folder('sd')}"
    cases = []
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n")
    cases.append((empty, "no prompt"))
    header_only = tmp_path / "header.csv"
    header_only.write_text("prompt,negative_prompt\n")
    cases.append((header_only, "no prompt"))
    undecodable = tmp_path / "latin1.txt"
    undecodable.write_bytes(b"\xff\xfe a cat\n")
    cases.append((undecodable, "cannot be read"))
    a_folder = tmp_path / "folder.txt"
    a_folder.mkdir()
    cases.append((a_folder, "cannot be read"))
    cases.append((tmp_path / "missing.txt", "does not exist"))
    no_column = tmp_path / "nocol.csv"
    no_column.write_text("text,guidance\na photo of a cat,3\n")
    cases.append((no_column, "'prompt' column"))
    bad_scale = tmp_path / "scale.csv"
    bad_scale.write_text("prompt,guidance\na photo of a cat,lots\n")
    cases.append((bad_scale, "not a number"))
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": "a photo of a cat"}\n{"text": "a dog"}\n')
    cases.append((bad_json, "line 2"))
    for path, match in cases:
        with pytest.raises(FewstepError, match=match) as e:
            load_model(folder, prompts=path, height=16, width=16)
        assert str(path) in one_line(e), path
    with pytest.raises(FewstepError, match="empty") as e:
        load_model(folder, prompts=[], height=16, width=16)
    one_line(e)


def test_missing_text_encoder(env):
    folder = env.root / "sdxl_without_te2"
    if not folder.is_dir():
        shutil.copytree(env.folder("sdxl"), folder)
        shutil.rmtree(folder / "text_encoder_2")
    with pytest.raises(ModelSpecError, match="text_encoder_2") as e:
        load_model(f"diffusers:{folder}", prompts=list(PROMPTS[:2]), height=16, width=16)
    one_line(e)


def test_wrong_condition_kind_and_missing_prompts(env):
    with pytest.raises(FewstepError, match="class-conditional") as e:
        load_model(f"diffusers:{env.folder('dit')}", prompts=list(PROMPTS[:2]))
    one_line(e)
    with pytest.raises(FewstepError, match="text-conditional") as e:
        load_model(f"diffusers:{env.folder('sd3')}", prompts=list(PROMPTS[:2]), classes="0,1")
    one_line(e)
    for kind in TEXT:
        with pytest.raises(FewstepError, match="prompt") as e:  # loads (e.g. for a scheduler); drawing is refused
            load_model(f"diffusers:{env.folder(kind)}", **load_options(kind)).cond_for(range(2))
        one_line(e)


def test_cli_bad_input_is_one_line(env, tmp_path):
    dit, sd3 = f"diffusers:{env.folder('dit')}", f"diffusers:{env.folder('sd3')}"
    common = ["--method", "s4s", "--nfe", NFE, "--out", tmp_path / "never", "--samples", 4, "--val-samples", 4]
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    for args, match in (
        (["fit", "--model", dit, "--prompts", env.files["txt"], *common], "class-conditional"),
        (["fit", "--model", sd3, "--classes", "0,1", *common], "text-conditional"),
        (["fit", "--model", sd3, *common], "prompt set"),
        (["eval", "--model", sd3, "--prompts", empty, "--samples", 2], "holds no prompt"),
    ):
        r = cli(args)
        assert r.exit_code == 2, (args, r.output, r.exception)
        assert_error_line(r, match)
        assert not (tmp_path / "never").exists()
