"""``diffusers:DIR``: a saved diffusers pipeline folder as a Denoiser.

A folder of a pipeline some family handles (StableDiffusion, StableDiffusionXL, DiT, PixArt-Sigma,
StableDiffusion3, Flux: :func:`fewstep.integrations.families.supported_pipelines`) loads through
:func:`~.pipelines.load_pipeline` (the whole pipeline: text encoders, prompts, guidance, the VAE for
pictures); any other folder with a ``unet/`` or ``transformer/`` and a ``scheduler/`` (DDPMPipeline and
friends) loads just its network through :func:`~.diffusers_in.from_diffusers`.
"""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..conditions import ConditionSpec, GuidanceSet
from ..denoiser import Denoiser
from ..errors import ModelSpecError
from .diffusers_in import _fewstep_json, _read_json, from_diffusers, refuse_pickled_weights, uniform_labels
from .families import supported_pipelines
from .pipelines import load_pipeline, pipeline_class

#: options of the pipeline path (see load_pipeline)
PIPELINE_OPTIONS = (
    "prompts",
    "classes",
    "guidance",
    "height",
    "width",
    "dtype",
    "cache_dir",
    "name",
    "max_sequence_length",
    "clean_caption",
)


def load_diffusers(
    path: str | Path, device: str | torch.device = "cpu", conditions: ConditionSpec | None = None, **kwargs: Any
) -> Denoiser:
    """Load a saved diffusers pipeline folder as a Denoiser (local files only, safetensors weights).

    What it is conditioned on: ``conditions`` (a :class:`~fewstep.conditions.ConditionSpec`), or its parts
    ``prompts``, ``classes`` and ``guidance`` (one scale or a set, e.g. "3,7.5,12"; ``guidance_scale`` is the
    same option under the name model builders give it). Pipelines of a supported family take the other
    :data:`PIPELINE_OPTIONS`; a text pipeline loads without prompts too (e.g. to build a FewStepScheduler),
    but then samples only with explicit prompts. Weights load from safetensors only: a folder holding only
    pickle-based ``.bin`` weights is refused. The networks are frozen (eval mode, no gradients).

    Other folders need a ``unet/`` or ``transformer/`` and a ``scheduler/``; an optional DIR/fewstep.json
    gives what their configs do not: ``{"sample_shape": [C, H, W], "num_classes": K, "null_class": K,
    "guidance_scale": w, "class_sampler": "uniform"}`` (``num_classes`` adds a per-seed uniform label
    sampler); ``kwargs`` go to :func:`from_diffusers` and override fewstep.json; ``classes="0,1,2"`` draws
    labels from that set instead.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ModelSpecError(f"diffusers folder {str(path)!r} does not exist (expected a save_pretrained folder)")
    extra = _fewstep_json(root)
    spec = _condition_spec(conditions, kwargs, extra)
    cls = pipeline_class(root)
    if cls and cls not in supported_pipelines() and _has_text_encoder(root):
        raise ModelSpecError(
            f"{root} holds a {cls}, which no fewstep family handles (it takes text through its own "
            f"encoders); supported pipelines: {', '.join(supported_pipelines())}"
        )
    if cls and cls in supported_pipelines():
        bad = sorted(set(kwargs) - set(PIPELINE_OPTIONS))
        if bad:
            raise ModelSpecError(
                f"a {cls} folder does not take {', '.join(bad)}; it takes: {', '.join(PIPELINE_OPTIONS)}"
            )
        if spec.classes is None and extra.get("num_classes"):
            spec = replace(spec, classes=",".join(str(k) for k in range(int(extra["num_classes"]))))
        name = kwargs.pop("name", None) or f"diffusers:{path}"
        vocabulary = extra.get("vocabulary")
        return load_pipeline(root, device=device, conditions=spec, name=name, vocabulary=vocabulary, **kwargs)
    if spec.prompts is not None:
        raise ModelSpecError(f"{root} is not a text-to-image pipeline: load_diffusers does not take prompts here")
    dtype = kwargs.pop("dtype", None)
    den = _load_network(root, path, device, spec.scale, extra, **kwargs).with_conditions(spec)
    return den if dtype is None else den.set_dtype(dtype)


def _condition_spec(given: ConditionSpec | None, kwargs: dict[str, Any], extra: dict[str, Any]) -> ConditionSpec:
    """The one condition spec of a load: ``given``, or the options prompts / classes / guidance (or
    guidance_scale) taken out of ``kwargs``; fewstep.json's guidance_scale when no guidance is asked."""
    opts = {k: kwargs.pop(k) for k in ("prompts", "classes", "guidance", "guidance_scale") if k in kwargs}
    opts = {k: v for k, v in opts.items() if v is not None}
    if "guidance" in opts and "guidance_scale" in opts:
        raise ModelSpecError("give guidance= or guidance_scale= (the same option), not both")
    guidance = opts.pop("guidance", opts.pop("guidance_scale", None))
    if given is not None and (opts or guidance is not None):
        raise ModelSpecError(f"give conditions= or {', '.join(sorted(opts) or ['guidance'])}=, not both")
    spec = given or ConditionSpec.parse(opts.get("prompts"), opts.get("classes"), guidance)
    if spec.guidance is None and extra.get("guidance_scale") is not None:
        spec = replace(spec, guidance=GuidanceSet.parse(extra["guidance_scale"]))
    return spec


def _has_text_encoder(root: Path) -> bool:
    """Does a pipeline folder name text encoders or tokenizers (a pipeline fewstep cannot drive by its network)?"""
    index = _read_json(root / "model_index.json", "")
    return any(
        k.startswith(("text_encoder", "tokenizer", "prior", "image_encoder")) and isinstance(v, list) and v[0]
        for k, v in index.items()
    )


def _load_network(
    root: Path,
    path: str | Path,
    device: str | torch.device,
    guidance_scale: float | None,
    extra: dict[str, Any],
    **kwargs: Any,
) -> Denoiser:
    """A folder whose network alone fewstep drives (unet/ or transformer/ plus scheduler/)."""
    allowed = set(inspect.signature(from_diffusers).parameters) - {"model", "scheduler", "guidance_scale"}
    bad = sorted(set(kwargs) - allowed)
    if bad:
        raise ModelSpecError(
            f"load_diffusers does not take {', '.join(bad)}; it takes: {', '.join(sorted(allowed | {'classes'}))}"
        )
    sub = next((root / n for n in ("unet", "transformer") if (root / n / "config.json").is_file()), None)
    if sub is None:
        raise ModelSpecError(
            f"{root} has no unet/ or transformer/ model folder with a config.json: "
            f"save the pipeline with save_pretrained"
        )
    sched_cfg = _read_json(
        root / "scheduler" / "scheduler_config.json", "the folder needs scheduler/ from save_pretrained"
    )
    cls_name = _read_json(sub / "config.json", "").get("_class_name", "")
    import diffusers

    found = getattr(diffusers, str(cls_name), None)
    if not (isinstance(found, type) and issubclass(found, diffusers.ModelMixin)):
        raise ModelSpecError(f"{sub}/config.json names {cls_name!r}, not a diffusers model class")
    cls: Any = found  # a diffusers ModelMixin subclass (checked above): diffusers is Any to mypy
    refuse_pickled_weights(sub, "pipeline")
    try:
        lean = importlib.util.find_spec("accelerate") is not None  # without it diffusers warns, then loads plainly
        model = cls.from_pretrained(str(sub), local_files_only=True, use_safetensors=True, low_cpu_mem_usage=lean)
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelSpecError(f"cannot load {cls_name} from {sub} ({first}); it needs safetensors weights") from None
    opts: dict[str, Any] = {k: extra[k] for k in ("sample_shape", "null_class") if k in extra}
    num_classes = extra.get("num_classes")
    if num_classes:
        opts["cond_sampler"] = uniform_labels(num_classes)
    opts.update(kwargs)
    name = opts.pop("name", None) or f"diffusers:{path}"
    den = from_diffusers(model.to(device), sched_cfg, guidance_scale=guidance_scale, name=name, **opts)
    den.num_classes = int(num_classes) if num_classes else None
    if num_classes and "cond_sampler" not in kwargs:
        den.identity.update(num_classes=int(num_classes), class_sampler="uniform")
    return den
