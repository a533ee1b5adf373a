"""The trained scenes pipelines: ``zoo:scenes-sd``, ``-sd3``, ``-pixart``, ``-dit``.

A recipe (:data:`RECIPES`, JSON) fixes everything that determines a pipeline: the training scenes,
the text encoders' seed, the VAE recipe (its hash), the network's architecture and the optimisation.
:func:`train` builds the family's pipeline with a freshly seeded network, encodes the training
captions with the pipeline's own text encoders and the images with the scenes VAE, and trains the
network through fewstep's family adapter (:mod:`.train_denoiser`: resumable from a checkpoint).

Folders: :func:`pipeline_folder` returns a complete ``save_pretrained`` folder that
``DiffusionPipeline.from_pretrained(folder, local_files_only=True)`` loads and runs. It is assembled
under ``$FEWSTEP_CACHE/zoo/scenes-<family>-<hash>/`` from the network weights that ship in the
package (``weights/scenes/<family>.safetensors``, whose metadata names the recipe hash), or trained
when none ship for this recipe. The folder also holds ``prompts/train.txt`` and
``prompts/heldout.txt`` (DiT: ``classes.json``), ``fewstep.json`` and ``recipe.json`` with the sha256 of
every weights file: a cached folder whose files do not match is rebuilt, never trusted.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ...conditions import ConditionSpec, PromptSet
from ...denoiser import Denoiser
from ...errors import ModelSpecError
from ...io import atomic_dir, sha256_file, write_text
from ...training import recipe_hash, weights_dir
from . import data as scenes_data
from .networks import FAMILIES, make_network, make_scheduler, time_shift
from .train_denoiser import TrainingSet, train_network

SHIPPED = Path(__file__).resolve().parent.parent / "weights" / "scenes"
PIPELINES = {
    "sd": "StableDiffusionPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "pixart": "PixArtSigmaPipeline",
    "dit": "DiTPipeline",
}
NETWORK_ATTR = {"sd": "unet", "sd3": "transformer", "pixart": "transformer", "dit": "transformer"}
#: DiT's classes: a single object's (shape, colour)
DIT_CLASSES = tuple(f"{c} {s}" for s in scenes_data.SHAPES for c in scenes_data.COLOURS)
HELDOUT_PROMPTS, TRAIN_PROMPTS = 256, 256
#: the families whose trained network weights ship in ``weights/scenes/`` (the others train on first use)
SHIPPED_FAMILIES = ("sd", "sd3", "pixart", "dit")

_COMMON: dict[str, Any] = {
    "version": 1,
    "data": {"split": "train", "n": 32768, "seed": 0},
    "text_seed": 0,
    "seed": 0,
    "batch": 64,
    "warmup": 200,
    "weight_decay": 0.0,
    "ema": 0.999,
    "grad_clip": 1.0,
    "cond_dropout": 0.1,
    "save_every": 500,
    "log_every": 250,
}
#: step counts sized to about 20 minutes each on one thread of the 2-core machine (measured: BENCHMARKS.md); the
#: transformers use 2x2 patches (16 tokens) at width 128: at the same cost per step, 1x1 patches at width 64
#: (0.65M parameters) left DiT at prompt adherence 0.69 after 6000 steps
RECIPES: dict[str, dict[str, Any]] = {
    "sd": {
        **_COMMON,
        "arch": {"block_out_channels": [48, 96], "layers_per_block": 1, "heads": 4, "norm_num_groups": 16},
        "steps": 5000,
        "lr": 1e-3,
    },
    "sd3": {
        **_COMMON,
        "batch": 32,
        "arch": {"patch_size": 2, "layers": 3, "head_dim": 32, "heads": 4},
        "steps": 4000,
        "lr": 5e-4,
    },
    "pixart": {
        **_COMMON,
        "arch": {"patch_size": 2, "layers": 4, "head_dim": 32, "heads": 4},
        "steps": 6000,
        "lr": 5e-4,
    },
    "dit": {
        **_COMMON,
        "data": {"split": "single", "n": 16384, "seed": 0},
        "arch": {"patch_size": 2, "layers": 4, "head_dim": 32, "heads": 4},
        "steps": 7000,
        "lr": 5e-4,
    },
}


def family_options(family: str) -> dict[str, Any]:
    """Family adapter options the scenes pipelines train and fit with: PixArt's T5 rows at the tokenizers' length
    (its attention mask hides the padding, so the pipeline's default 300 gives the same network output)."""
    from .text import TEXT_LEN

    return {"max_sequence_length": TEXT_LEN} if family == "pixart" else {}


def _family(family: str) -> str:
    if family not in FAMILIES:
        raise ModelSpecError(f"unknown scenes family {family!r}; valid: {', '.join(FAMILIES)}")
    return family


def recipe_for(family: str, **overrides: Any) -> dict[str, Any]:
    """``RECIPES[family]`` with top-level ``overrides`` (``arch`` and ``data`` are merged; None is ignored),
    and the VAE recipe's hash (the latents depend on it)."""
    from .vae import vae_recipe

    r = copy.deepcopy(RECIPES[_family(family)])
    for k, v in overrides.items():
        if v is None:
            continue
        if k not in r:
            raise ModelSpecError(f"unknown recipe field {k!r} for scenes-{family}; valid: {', '.join(sorted(r))}")
        r[k] = {**r[k], **v} if k in ("arch", "data") else v
    r["family"], r["vae"] = family, recipe_hash(vae_recipe())
    r["time_shift"] = time_shift(family)
    return r


# ----------------------------------------------------------------------------- the pipeline in memory
def build_pipeline(family: str, recipe: dict[str, Any], network_state: dict[str, Tensor] | None = None) -> Any:
    """The family's pipeline: seeded text encoders, the trained scenes VAE, the network (fresh under the
    recipe's seed, or ``network_state``) and the family's scheduler."""
    import diffusers

    from .text import family_dims, text_components
    from .vae import load_vae

    parts: dict[str, Any] = {} if family == "dit" else text_components(family, int(recipe["text_seed"]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(recipe["seed"]))
        net = make_network(family, recipe["arch"], {} if family == "dit" else family_dims(family))
    if network_state is not None:
        net.load_state_dict(network_state)
    parts[NETWORK_ATTR[family]] = net.eval()
    parts["vae"], parts["scheduler"] = load_vae(), make_scheduler(family)
    cls = getattr(diffusers, PIPELINES[family])
    if family == "sd":
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if family == "dit":
        labels = dict(enumerate(DIT_CLASSES))
        pipe = cls(**parts, id2label=labels)
        pipe.register_to_config(id2label=labels)
        return pipe
    return cls(**parts)


def _scenes(recipe: dict[str, Any]) -> tuple[Tensor, list[str]]:
    """The training images (N, 3, 32, 32) and, per image, its condition (a caption, or DiT's class name)."""
    d = recipe["data"]
    if d["split"] == "single":  # DiT: one object per scene, every (shape, colour) pair
        picked = [s for s in scenes_data.scenes("all", 3 * d["n"], d["seed"]) if len(s.objects) == 1][: d["n"]]
        if len(picked) < d["n"]:
            raise ModelSpecError(f"only {len(picked)} single-object scenes drawn; lower data.n")
        names = [f"{s.objects[0].colour} {s.objects[0].shape}" for s in picked]
        return scenes_data.render(picked, d["seed"]), names
    images, captions, _ = scenes_data.dataset(d["split"], d["n"], d["seed"])
    return images, captions


def encode_latents(vae: Any, images: Tensor, batch: int = 512) -> Tensor:
    """Latents (N, 4, 8, 8) as the pipelines see them: the posterior mean, shifted and scaled as they decode."""
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    out = []
    with torch.no_grad():
        for i in range(0, images.shape[0], batch):
            z = vae.encode(images[i : i + batch]).latent_dist.mean
            out.append((z - shift) * float(vae.config.scaling_factor))
    return torch.cat(out)


def training_set(fam: Any, recipe: dict[str, Any], vae: Any) -> TrainingSet:
    """Latents of the recipe's scenes and the pipeline's own conditioning rows of their captions."""
    images, conds = _scenes(recipe)
    distinct = list(dict.fromkeys(conds))
    where = {c: i for i, c in enumerate(distinct)}
    with torch.no_grad():
        rows = {k: v.detach() for k, v in fam.encode(distinct).items()}
    index = torch.tensor([where[c] for c in conds], dtype=torch.long)
    return TrainingSet(encode_latents(vae, images), index, rows, fam.null_rows(1))


# ----------------------------------------------------------------------------- training and folders
def train(
    family: str, recipe: dict[str, Any], checkpoint: Path | None = None, log: bool = True, stop_after: int | None = None
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Train ``family``'s network from ``recipe``: (EMA state dict, provenance: seconds, losses, steps)."""
    from ...integrations.diffusers_in import schedule_from_diffusers
    from ...integrations.families import family_for

    pipe = build_pipeline(family, recipe)
    fam = family_for(pipe)(pipe, **family_options(family))
    info = schedule_from_diffusers(fam.scheduler_config)
    data = training_set(fam, recipe, pipe.vae)
    net = getattr(pipe, NETWORK_ATTR[family])
    res = train_network(net, fam.forward, info.schedule, info.prediction, data, recipe, checkpoint, log, stop_after)
    prov = {
        "train_seconds": round(res.seconds, 1),
        "steps_run": res.steps_run,
        "resumed_at": res.resumed_at,
        "losses": [round(x, 5) for x in res.losses],
        "first_losses": res.first_losses,
        "final_loss": round(res.losses[-1], 5) if res.losses else None,
        "threads": torch.get_num_threads(),
    }
    return res.state, prov


def write_network(path: Path, state: dict[str, Tensor], recipe: dict[str, Any], prov: dict[str, Any]) -> None:
    """The trained network as one safetensors file (what ships), recipe and provenance in its metadata."""
    from safetensors.torch import save_file

    from ...io import atomic_path

    meta = {"recipe_hash": recipe_hash(recipe), "recipe": json.dumps(recipe, sort_keys=True), "prov": json.dumps(prov)}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)


def read_network(path: Path, recipe: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """The network weights at ``path`` if trained from ``recipe`` (None: missing, damaged or another recipe)."""
    try:
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("recipe_hash") != recipe_hash(recipe):
            return None
        return load_file(str(path)), json.loads(meta.get("prov", "{}"))
    except Exception:  # noqa: BLE001 - unreadable or partial file: train instead
        return None


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.safetensors") if p.is_file())


def save_folder(
    family: str, recipe: dict[str, Any], state: dict[str, Tensor], prov: dict[str, Any], path: Path
) -> Path:
    """Write the complete pipeline folder at ``path`` atomically (built beside it, then renamed)."""
    pipe = build_pipeline(family, recipe, state)
    with atomic_dir(path) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        _write_conditions(family, tmp)
        info: dict[str, Any] = (
            {"num_classes": len(DIT_CLASSES)} if family == "dit" else {"vocabulary": scenes_data.vocabulary()}
        )
        write_text(tmp / "fewstep.json", json.dumps(info, indent=1) + "\n")
        files = {str(p.relative_to(tmp)): sha256_file(p) for p in _weight_files(tmp)}
        doc = {"recipe_hash": recipe_hash(recipe), "recipe": recipe, "provenance": prov, "sha256": files}
        doc["torch"] = torch.__version__
        write_text(tmp / "recipe.json", json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return path


def _write_conditions(family: str, folder: Path) -> None:
    """Prompt files (train / held-out captions) or, for DiT, the class names."""
    if family == "dit":
        write_text(folder / "classes.json", json.dumps(list(DIT_CLASSES)) + "\n")
        return
    scenes_data.write_prompts(folder / "prompts" / "train.txt", "train", TRAIN_PROMPTS, seed=1)
    scenes_data.write_prompts(folder / "prompts" / "heldout.txt", "heldout", HELDOUT_PROMPTS, seed=1)


def folder_problem(path: Path, recipe: dict[str, Any]) -> str | None:
    """Why the folder at ``path`` cannot be used for ``recipe`` (None: it can): missing, another recipe,
    or a weights file whose sha256 differs from the one recorded when it was written."""
    try:
        doc = json.loads((path / "recipe.json").read_text())
    except (OSError, ValueError):
        return "no readable recipe.json"
    if not isinstance(doc, dict) or doc.get("recipe_hash") != recipe_hash(recipe):
        return "another recipe"
    want = doc.get("sha256")
    have = {str(p.relative_to(path)): p for p in _weight_files(path)}
    if not isinstance(want, dict) or set(want) != set(have):
        return "weights files missing or extra"
    bad = [k for k, p in have.items() if sha256_file(p) != want[k]]
    return f"damaged weights ({', '.join(bad)})" if bad else None


def folder_path(family: str) -> Path:
    """Where ``family``'s pipeline folder is cached (``$FEWSTEP_CACHE/zoo/scenes-<family>-<recipe hash>``)."""
    return weights_dir("zoo") / f"scenes-{family}-{recipe_hash(recipe_for(family))}"


def pipeline_folder(family: str, retrain: bool = False, log: bool = True) -> Path:
    """The pipeline folder of ``family``'s recipe: cached, assembled from shipped weights, or trained now."""
    recipe = recipe_for(family)
    h = recipe_hash(recipe)
    path = folder_path(family)
    problem = folder_problem(path, recipe) if path.exists() else "missing"
    if problem is None and not retrain:
        return path
    if path.exists() and problem != "missing":
        print(f"warning: cached zoo:scenes-{family} at {path}: {problem}; rebuilding it", file=sys.stderr)
    shipped = None if retrain else read_network(SHIPPED / f"{family}.safetensors", recipe)
    if shipped is not None:
        state, prov = shipped
    else:
        state, prov = _train_cached(family, recipe, h, log)
    return save_folder(family, recipe, state, prov, path)


def _train_cached(family: str, recipe: dict[str, Any], h: str, log: bool) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Train (resuming an interrupted run's checkpoint) and cache the network weights."""
    cache = weights_dir("zoo") / f"scenes-{family}-{h}.network.safetensors"
    cached = read_network(cache, recipe)
    if cached is not None:
        return cached
    ckpt = weights_dir("zoo") / f"scenes-{family}-{h}.train.pt"
    print(f"training zoo:scenes-{family} ({recipe['steps']} steps; checkpoint {ckpt})...", file=sys.stderr)
    start = time.perf_counter()
    state, prov = train(family, recipe, ckpt, log)
    prov["wall_seconds"] = round(time.perf_counter() - start, 1)
    write_network(cache, state, recipe, prov)
    if ckpt.exists():
        os.remove(ckpt)
    return state, prov


# ----------------------------------------------------------------------------- zoo models
def prompt_files(family: str) -> dict[str, Path] | None:
    """The pipeline folder's prompt files ({"train": ..., "heldout": ...}; None for class-conditional DiT)."""
    if _family(family) == "dit":
        return None
    folder = pipeline_folder(family)
    return {"train": folder / "prompts" / "train.txt", "heldout": folder / "prompts" / "heldout.txt"}


def build_scenes(
    family: str,
    conditions: ConditionSpec | None = None,
    device: str | torch.device = "cpu",
    dtype: Any = None,
    height: int | None = None,
    width: int | None = None,
    retrain: bool = False,
) -> Denoiser:
    """``zoo:scenes-<family>``: the trained pipeline through fewstep's pipeline adapter.

    Text families draw their prompts from ``conditions.prompts``, by default the folder's training captions
    (``prompts/train.txt``; evaluate on ``prompts/heldout.txt``, whose attribute pairs training never saw).
    """
    from ...integrations.load import load_diffusers
    from ...integrations.pipelines import PipelineDenoiser

    folder = pipeline_folder(family, retrain=bool(retrain))
    spec = conditions or ConditionSpec()
    if family != "dit" and spec.prompts is None:
        spec = replace(spec, prompts=PromptSet.read(folder / "prompts" / "train.txt"))
    size = {k: v for k, v in {"dtype": dtype, "height": height, "width": width}.items() if v is not None}
    name = f"zoo:scenes-{family}"
    den = load_diffusers(folder, device=device, conditions=spec, name=name, **size, **family_options(family))
    den.identity.update(zoo=f"scenes-{family}", recipe_hash=recipe_hash(recipe_for(family)))
    if isinstance(den, PipelineDenoiser) and family != "dit":
        den.held_out_prompts = PromptSet.read(folder / "prompts" / "heldout.txt")
    return den
