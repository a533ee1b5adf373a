"""diffusers models in: a diffusers network and its scheduler config as a :class:`fewstep.Denoiser`.

The scheduler config says what the network was trained on; fewstep's solvers pick their own grids.
- DDPM-style configs (DDPM, DDIM, DPM-Solver, UniPC, Euler, ... anything with ``beta_schedule`` /
  ``trained_betas``) map to :class:`~fewstep.VPDiscrete` (the network gets the fractional DDPM
  index); ``prediction_type`` epsilon / v_prediction / sample -> ``eps`` / ``v`` / ``x0``.
- Flow-matching configs (``FlowMatchEulerDiscreteScheduler``, or ``use_flow_sigmas``) map to
  :class:`~fewstep.Flow` with ``time_scale = num_train_timesteps`` (the network gets
  sigma * num_train_timesteps) and prediction ``velocity``: diffusers' flow networks output
  dx/dsigma = eps - x0 (its Euler step is x + (sigma_next - sigma) * out), which is fewstep's
  velocity with t = sigma, so D = x - sigma * out.
- The flow ``shift`` (and dynamic shifting, ``shift_terminal``) change only the sampling grid, not
  the path. They stay in the Denoiser's identity, and :func:`shifted_grid` returns the grid
  FlowMatchEulerDiscreteScheduler would use, to pass as ``fewstep.sample(..., grid=...)``.
- Sampler-only options (``timestep_spacing``, ``steps_offset``, ``clip_sample``, solver orders,
  ``use_karras_sigmas`` and the other sigma-grid choices) do not change the model and are ignored:
  pick the grid in fewstep (``grid="karras"``). Options that change the model's denoiser or that
  fewstep's schedules cannot represent (``thresholding``, ``rescale_betas_zero_snr``, continuous
  EDM timesteps, inverted sigmas, consistency-model schedulers) are refused.
- Networks with learned variance (out_channels = 2 * in_channels, e.g. DiT) keep the first half.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..denoiser import Denoiser
from ..errors import FewstepError, ModelSpecError, ShapeError
from ..grids import shifted, time_shift
from ..schedules import F64, Flow, Schedule, VPDiscrete, schedule_from_config

PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "flow_prediction": "velocity"}
REFUSED_SCHEDULERS = {
    "LCMScheduler": "a consistency-distilled model (its denoiser mixes in c_skip / c_out boundary scalings)",
    "TCDScheduler": "a consistency-distilled model (its denoiser mixes in c_skip / c_out boundary scalings)",
    "CMStochasticIterativeScheduler": "a consistency model, not a diffusion ODE",
    "EDMEulerScheduler": "an EDM-preconditioned model (sigma-conditioned, no DDPM betas)",
    "EDMDPMSolverMultistepScheduler": "an EDM-preconditioned model (sigma-conditioned, no DDPM betas)",
    "ScoreSdeVeScheduler": "a VE score model",
    "KarrasVeScheduler": "a VE score model",
}
FEWSTEP_JSON_KEYS = ("sample_shape", "num_classes", "null_class", "guidance_scale", "class_sampler", "vocabulary")
LABEL_SALT = 7919  # label streams are salted so labels are independent of the noise from the same seed


# ----------------------------------------------------------------------------- scheduler configs
@dataclass
class ModelSchedule:
    """What a diffusers scheduler config says about the model: schedule, prediction, grid settings."""

    schedule: Schedule
    prediction: str
    source: str
    flow_grid: dict[str, Any] | None = None


def scheduler_config(scheduler: Any) -> tuple[str, dict[str, Any]]:
    """(class name, config dict) of a diffusers scheduler object or its config mapping."""
    if hasattr(scheduler, "config") and not isinstance(scheduler, Mapping):
        return type(scheduler).__name__, dict(scheduler.config)
    if isinstance(scheduler, Mapping):
        cfg = dict(scheduler)
        return str(cfg.get("_class_name", "")), cfg
    raise FewstepError(f"scheduler must be a diffusers scheduler or its config dict; got {type(scheduler).__name__}")


def _refuse(cls: str, what: str, fix: str) -> None:
    raise FewstepError(f"{cls or 'scheduler config'}: {what}; {fix}")


def schedule_from_diffusers(scheduler: Any) -> ModelSchedule:
    """Map a diffusers scheduler (object or config dict) to fewstep's schedule and prediction type."""
    cls, cfg = scheduler_config(scheduler)
    if cls in REFUSED_SCHEDULERS:
        _refuse(cls, f"describes {REFUSED_SCHEDULERS[cls]}", "fewstep supports DDPM-style and flow-matching models")
    if "schedule" in cfg and "beta_schedule" not in cfg:  # a FewStepScheduler config
        pred = prediction_name(cls, cfg.get("prediction_type", "epsilon"))
        return ModelSchedule(
            schedule_from_config(cfg["schedule"]), pred, cls or "FewStepScheduler", cfg.get("flow_grid")
        )
    if cfg.get("thresholding"):
        _refuse(
            cls,
            "dynamic thresholding clips the data prediction (not a probability-flow ODE)",
            "set thresholding=False in the scheduler config",
        )
    if cfg.get("timestep_type") == "continuous":
        _refuse(
            cls,
            "continuous (sigma-conditioned) timesteps are an EDM parameterisation fewstep does not map",
            "use a model whose scheduler feeds DDPM indices",
        )
    has_betas = any(k in cfg for k in ("beta_schedule", "trained_betas", "beta_start"))
    # a config mapping (pipe.scheduler.config) carries no class name: a shift without betas is a flow
    if cls.startswith("FlowMatch") or bool(cfg.get("use_flow_sigmas")) or ("shift" in cfg and not has_betas):
        return _flow_schedule(cls, cfg)
    if not has_betas:
        _refuse(
            cls,
            "has neither DDPM betas (beta_schedule / trained_betas) nor a flow-matching shift",
            "pass the scheduler config the model was trained with",
        )
    return _vp_schedule(cls, cfg)


def prediction_name(cls: str, kind: Any) -> str:
    """fewstep's name (eps, v, x0, velocity) of a diffusers prediction_type (fewstep names pass through)."""
    if kind in PREDICTION_TYPES.values():
        return str(kind)
    if kind not in PREDICTION_TYPES:
        _refuse(cls, f"unknown prediction_type {kind!r}", f"use one of {', '.join(PREDICTION_TYPES)}")
    return PREDICTION_TYPES[kind]


def _vp_schedule(cls: str, cfg: dict[str, Any]) -> ModelSchedule:
    if cfg.get("rescale_betas_zero_snr"):
        _refuse(
            cls,
            "rescale_betas_zero_snr gives alpha = 0 at the last training step (infinite noise)",
            "fewstep's VP schedules need alpha > 0; use the model's config without zero-SNR rescaling",
        )
    pred = prediction_name(cls, cfg.get("prediction_type", "epsilon"))
    if pred == "velocity":
        _refuse(cls, "flow_prediction without use_flow_sigmas", "set use_flow_sigmas=True with flow_shift")
    T = int(cfg.get("num_train_timesteps", 1000))
    betas = cfg.get("trained_betas")
    try:
        if betas is not None:
            sched = VPDiscrete(betas=betas)
        else:
            sched = VPDiscrete(
                cfg.get("beta_schedule", "linear"),
                T,
                float(cfg.get("beta_start", 1e-4)),
                float(cfg.get("beta_end", 2e-2)),
            )
    except FewstepError as e:
        raise FewstepError(f"{cls or 'scheduler config'}: {e}") from None
    if sched.T != T and betas is not None:
        _refuse(cls, f"trained_betas has {sched.T} entries but num_train_timesteps is {T}", "make them agree")
    return ModelSchedule(sched, pred, cls or "diffusers")


def _flow_schedule(cls: str, cfg: dict[str, Any]) -> ModelSchedule:
    if cfg.get("invert_sigmas"):
        _refuse(cls, "invert_sigmas (noise at sigma = 0) is not supported", "use a config without invert_sigmas")
    if cfg.get("use_flow_sigmas") and cfg.get("prediction_type", "flow_prediction") != "flow_prediction":
        _refuse(cls, "use_flow_sigmas needs prediction_type='flow_prediction'", "fix the scheduler config")
    T = int(cfg.get("num_train_timesteps", 1000))
    dynamic = bool(cfg.get("use_dynamic_shifting", False))
    shift = float(cfg.get("flow_shift", 1.0) if cfg.get("use_flow_sigmas") else cfg.get("shift", 1.0))
    if shift <= 0:
        _refuse(cls, f"shift must be positive; got {shift}", "fix the scheduler config")
    sigma_grid = next(
        (k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas") if cfg.get(k)), None
    )
    grid = {
        "num_train_timesteps": T,
        "shift": shift,
        "use_dynamic_shifting": dynamic,
        "time_shift_type": str(cfg.get("time_shift_type", "exponential")),
        "shift_terminal": cfg.get("shift_terminal"),
        "sigma_grid": sigma_grid,
    }
    t_min = 1.0 / T if dynamic else float(time_shift(torch.tensor(1.0 / T, dtype=F64), shift))
    # dynamic shifting: mu depends on the image size, known once the pipeline's family sets it (with_mu)
    gs = (
        None
        if sigma_grid or dynamic
        else {
            "num_train_timesteps": T,
            "shift": shift,
            "shift_type": grid["time_shift_type"],
            "terminal": grid["shift_terminal"],
        }
    )
    return ModelSchedule(Flow(t_min=t_min, time_scale=float(T), grid_shift=gs), "velocity", cls or "flow_match", grid)


def flow_with_mu(info: ModelSchedule, mu: float, base: str = "train") -> Flow:
    """The flow schedule of a dynamically shifted model at one image size: its ``shifted`` grid uses ``mu``
    (``base`` "steps": sigmas from linspace(1, 1/n, n), as FluxPipeline passes them)."""
    g = info.flow_grid or {}
    sched = info.schedule
    if not isinstance(sched, Flow):
        raise FewstepError(f"flow_with_mu needs a flow-matching schedule; got {sched.describe()}")
    return Flow(
        t_min=sched.t_min,
        time_scale=sched.time_scale,
        time_reversed=sched.time_reversed,
        grid_shift={
            "num_train_timesteps": int(g["num_train_timesteps"]),
            "shift": float(g["shift"]),
            "mu": float(mu),
            "shift_type": g["time_shift_type"],
            "terminal": g["shift_terminal"],
            "base": base,
        },
    )


def dynamic_mu(scheduler_config: dict[str, Any], image_seq_len: int) -> float:
    """The resolution-dependent shift mu of a flow pipeline for an image of ``image_seq_len`` tokens (linear in
    the token count between base_image_seq_len and max_image_seq_len, as the diffusers pipelines compute it)."""
    c = scheduler_config
    lo_n, hi_n = float(c.get("base_image_seq_len", 256)), float(c.get("max_image_seq_len", 4096))
    lo, hi = float(c.get("base_shift", 0.5)), float(c.get("max_shift", 1.15))
    m = (hi - lo) / (hi_n - lo_n)
    return image_seq_len * m + (lo - m * lo_n)


def shifted_grid(source: Any, nfe: int, mu: float | None = None) -> Tensor:
    """The flow grid diffusers' FlowMatchEulerDiscreteScheduler uses at ``nfe`` steps: (nfe + 1,) float64.

    ``source``: a Denoiser from :func:`from_diffusers` (flow model), a FlowMatch scheduler or its
    config. The times are the sigmas (= fewstep's flow times), ending at 0; pass them as
    ``fewstep.sample(model, noise, solver, nfe=nfe, grid=shifted_grid(model, nfe))``. ``mu`` is
    required for dynamic (resolution-dependent) shifting, as in diffusers.
    """
    g = source.identity.get("flow_grid") if isinstance(source, Denoiser) else schedule_from_diffusers(source).flow_grid
    if not g:
        raise FewstepError("shifted_grid needs a flow-matching model or scheduler config; this one is not a flow")
    if g.get("sigma_grid"):
        raise FewstepError(
            f"the scheduler uses {g['sigma_grid']}: that grid is not reproduced here; "
            f"use fewstep's grid='karras' or an explicit list"
        )
    if int(nfe) < 1:
        raise FewstepError(f"nfe must be at least 1; got {nfe}")
    dyn_mu = None
    if g["use_dynamic_shifting"]:
        if mu is None:
            raise FewstepError("this scheduler uses dynamic shifting: pass mu= (as the pipeline computes it)")
        dyn_mu = float(mu)
    gs = {
        "num_train_timesteps": int(g["num_train_timesteps"]),
        "shift": float(g["shift"]),
        "mu": dyn_mu,
        "shift_type": g["time_shift_type"],
        "terminal": g.get("shift_terminal"),
    }
    return shifted(Flow(grid_shift=gs), int(nfe))


# ----------------------------------------------------------------------------- the network
class DiffusersNet(nn.Module):
    """``net(x, t_net, **cond)`` calling a diffusers model as ``model(x, timestep=t_net, **cond)``.

    x: (B, C, H, W); t_net: (B,) network times; returns (B, C, H, W) (the first C channels of a
    learned-variance output).
    """

    def __init__(self, model: nn.Module, channels: int, learned_sigma: bool) -> None:
        super().__init__()
        self.model, self.channels, self.learned_sigma = model, int(channels), bool(learned_sigma)

    def forward(self, x: Tensor, t_net: Tensor, **cond: Any) -> Tensor:
        out = self.model(x, timestep=t_net, return_dict=False, **cond)
        out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)
        return out[:, : self.channels] if self.learned_sigma else out


class DiffusersDenoiser(Denoiser):
    """A Denoiser that completes each call's conditioning before guidance batching.

    ``defaults`` fill keys the caller did not pass (e.g. fixed ``encoder_hidden_states``);
    tensors with batch 1 are shared across the batch; ``class_labels`` become a LongTensor (B,).
    """

    def __init__(
        self, *args: Any, defaults: Mapping[str, Any] | None = None, required: tuple[str, ...] = (), **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.defaults = dict(defaults or {})
        self.required = tuple(required)

    def raw(self, x: Tensor, t: Tensor | float, t_net: float | None = None, **cond: Any) -> Tensor:
        return super().raw(x, t, t_net, **self.full_cond(cond, x.shape[0], x.device))

    def full_cond(self, cond: Mapping[str, Any], batch: int, device: torch.device) -> dict[str, Any]:
        """The conditioning for a batch of ``batch`` samples (defaults filled, batch-1 tensors shared)."""
        out = {k: v for k, v in cond.items() if v is not None}
        for k, v in self.defaults.items():
            out.setdefault(k, v)
        missing = [k for k in self.required if k not in out]
        if missing:
            raise FewstepError(
                f"{self.name} needs {', '.join(missing)}: pass cond={{{missing[0]!r}: ...}} to fewstep.sample "
                f"(or give a cond_sampler / encoder_hidden_states when building the Denoiser)"
            )
        for k, v in list(out.items()):
            if k == "class_labels":
                v = torch.as_tensor(v, device=device).long()
                v = v.expand(batch) if v.dim() == 0 else v.reshape(-1)
            elif not isinstance(v, Tensor):
                continue
            v = v.to(device)
            if v.dim() >= 1 and v.shape[0] == 1 and batch > 1:
                v = v.expand(batch, *v.shape[1:])
            if v.dim() >= 1 and v.shape[0] != batch:
                raise ShapeError(
                    f"{k} has batch {v.shape[0]} for a batch of {batch} samples: give one row per "
                    f"sample, or a single row shared by all"
                )
            out[k] = v
        return out


# ----------------------------------------------------------------------------- model inspection
def _conditioning(model: nn.Module) -> tuple[bool, int | None, int | None, list[str]]:
    """(class-conditional?, label-table size, default null class, text-conditioning keys) of a model."""
    cfg = dict(getattr(model, "config", {}) or {})
    tables = [m for m in model.modules() if type(m).__name__ == "LabelEmbedding"]
    if tables:
        emb: Any = tables[0]  # a diffusers LabelEmbedding (matched by class name)
        size, k = int(emb.embedding_table.num_embeddings), int(emb.num_classes)
        return True, size, (k if size > k else None), _text_keys(model, cfg)
    class_emb = getattr(model, "class_embedding", None)
    if class_emb is not None:
        rows = class_emb.num_embeddings if isinstance(class_emb, nn.Embedding) else None
        return True, rows, None, _text_keys(model, cfg)
    return False, None, None, _text_keys(model, cfg)


def _text_keys(model: nn.Module, cfg: dict[str, Any]) -> list[str]:
    params = inspect.signature(model.forward).parameters
    keys = []
    if "encoder_hidden_states" in params and (cfg.get("cross_attention_dim") or cfg.get("joint_attention_dim")):
        keys.append("encoder_hidden_states")
    if "pooled_projections" in params and cfg.get("pooled_projection_dim"):
        keys.append("pooled_projections")
    return keys


def _model_shape(model: nn.Module) -> tuple[int, int, tuple[int, ...] | None]:
    """(in_channels, out_channels, default sample shape or None) from the model config."""
    cfg = dict(getattr(model, "config", {}) or {})
    c_in = cfg.get("in_channels")
    if c_in is None:
        raise ModelSpecError(f"{type(model).__name__} has no in_channels in its config: not a diffusers image model")
    c_out = cfg.get("out_channels") or c_in
    size = cfg.get("sample_size")
    shape = None
    if isinstance(size, int):
        shape = (int(c_in), size, size)
    elif isinstance(size, (list, tuple)) and len(size) == 2:
        shape = (int(c_in), int(size[0]), int(size[1]))
    return int(c_in), int(c_out), shape


def _digest(values: Mapping[str, Any]) -> str:
    h = hashlib.sha256()
    for k, v in sorted(values.items()):
        h.update(k.encode())
        if isinstance(v, Tensor):
            v = v.detach().to("cpu", F64).contiguous()
            h.update(repr(tuple(v.shape)).encode() + v.numpy().tobytes())
        else:
            h.update(repr(v).encode())
    return h.hexdigest()[:16]


def _as_cond(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, Tensor):
        return {"encoder_hidden_states": value}
    if isinstance(value, Mapping):
        return dict(value)
    raise FewstepError(
        f"{what} must be a tensor (B or 1, L, D) or a dict of conditioning tensors; got {type(value).__name__}"
    )


# ----------------------------------------------------------------------------- public API
def from_diffusers(
    model: nn.Module,
    scheduler: Any,
    *,
    sample_shape: tuple[int, ...] | None = None,
    guidance_scale: float | None = None,
    null_class: int | None = None,
    cond_sampler: Callable[[list[int]], dict[str, Any]] | None = None,
    encoder_hidden_states: Tensor | Mapping[str, Tensor] | None = None,
    uncond_encoder_hidden_states: Tensor | Mapping[str, Tensor] | None = None,
    name: str | None = None,
) -> Denoiser:
    """A :class:`fewstep.Denoiser` for a diffusers model and the scheduler (config) it was trained with.

    Args:
        model: UNet2DModel, UNet2DConditionModel, DiTTransformer2DModel / Transformer2DModel or an
            SD3-style flow transformer. It is put in eval mode with frozen weights.
        scheduler: a diffusers scheduler object or its config dict (see the module docstring).
        sample_shape: (C, H, W) of one sample; default from the model config (in_channels, sample_size).
        guidance_scale: classifier-free guidance weight w (cond and uncond in one batched call = 1 NFE).
        null_class: the unconditional class label (default: the model's cfg-embedding row, DiT's K).
        cond_sampler: ``cond_sampler(seeds) -> {"class_labels": LongTensor (len(seeds),)}`` etc.
        encoder_hidden_states: text conditioning (B or 1, L, D), shared across the batch when batch 1;
            a dict passes several keys (e.g. SD3's ``pooled_projections`` too).
        uncond_encoder_hidden_states: the same for the unconditional half under guidance.
        name: label for tables (default ``diffusers:<model class>``).
    """
    if not isinstance(model, nn.Module):
        raise FewstepError(f"model must be a diffusers model (torch.nn.Module); got {type(model).__name__}")
    info = schedule_from_diffusers(scheduler)
    c_in, c_out, default_shape = _model_shape(model)
    if c_out not in (c_in, 2 * c_in):
        raise ShapeError(
            f"{type(model).__name__} outputs {c_out} channels for {c_in} input channels: "
            f"fewstep needs {c_in} (a prediction) or {2 * c_in} (prediction + learned variance)"
        )
    shape = tuple(int(s) for s in sample_shape) if sample_shape is not None else default_shape
    if shape is not None and shape[0] != c_in:
        raise ShapeError(f"sample_shape {shape} has {shape[0]} channels but {type(model).__name__} takes {c_in}")
    class_cond, table, default_null, text_keys = _conditioning(model)
    defaults, uncond = (
        _as_cond(encoder_hidden_states, "encoder_hidden_states"),
        _as_cond(uncond_encoder_hidden_states, "uncond_encoder_hidden_states"),
    )
    for k, v in uncond.items():
        d = defaults.get(k)
        if isinstance(d, Tensor) and isinstance(v, Tensor) and tuple(v.shape[1:]) != tuple(d.shape[1:]):
            raise ShapeError(
                f"uncond {k} has shape {tuple(v.shape)}, the conditional one {tuple(d.shape)}: "
                f"they must agree after the batch dimension"
            )
    scale = None if guidance_scale is None or float(guidance_scale) == 1.0 else float(guidance_scale)
    guided = scale is not None
    if guided:
        if class_cond:
            null_class = default_null if null_class is None else int(null_class)
            if null_class is None:
                raise FewstepError(
                    f"{type(model).__name__} has no null-class row: pass null_class= (the label "
                    f"it was trained with as 'no class') to use guidance"
                )
            if table is not None and not 0 <= null_class < table:
                raise FewstepError(f"null_class {null_class} is outside the model's {table} label embeddings")
            uncond["class_labels"] = null_class
        missing = [k for k in text_keys if k not in uncond]
        if missing:
            raise FewstepError(
                f"guidance on a text-conditioned model needs the unconditional {missing[0]}: "
                f"pass uncond_encoder_hidden_states="
            )
        if not class_cond and not text_keys:
            raise FewstepError(f"{type(model).__name__} takes no class or text conditioning: drop guidance_scale")
    model.eval().requires_grad_(False)
    net = DiffusersNet(model, c_in, c_out == 2 * c_in)
    identity: dict[str, Any] = {
        "diffusers": type(model).__name__,
        "learned_sigma": c_out == 2 * c_in,
        "guided": bool(guided),  # not the scale: a solver fitted at one scale may be used at another
        "null_class": null_class if guided and class_cond else None,
    }
    if info.flow_grid:
        identity["flow_grid"] = info.flow_grid
    if defaults or uncond:
        identity["cond"] = _digest({**defaults, **{f"uncond.{k}": v for k, v in uncond.items()}})
    required = (["class_labels"] if class_cond else []) + text_keys
    return DiffusersDenoiser(
        net,
        info.schedule,
        info.prediction,
        sample_shape=shape,
        guidance_scale=scale,
        uncond=uncond or None,
        name=name or f"diffusers:{type(model).__name__}",
        cond_sampler=cond_sampler,
        identity=identity,
        defaults=defaults,
        required=tuple(required),
    )


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelSpecError(f"{path} is missing: {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelSpecError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ModelSpecError(f"{path} must hold a JSON object")
    return doc


def _fewstep_json(root: Path) -> dict[str, Any]:
    path = root / "fewstep.json"
    if not path.is_file():
        return {}
    doc = _read_json(path, "")
    bad = sorted(set(doc) - set(FEWSTEP_JSON_KEYS))
    if bad:
        raise ModelSpecError(f"{path}: unknown keys {', '.join(bad)}; valid: {', '.join(FEWSTEP_JSON_KEYS)}")
    if doc.get("class_sampler", "uniform") != "uniform":
        raise ModelSpecError(f"{path}: class_sampler must be 'uniform'; got {doc['class_sampler']!r}")
    k = doc.get("num_classes")
    if k is not None and (not isinstance(k, int) or k < 1):
        raise ModelSpecError(f"{path}: num_classes must be a positive integer; got {k!r}")
    words = doc.get("vocabulary")
    if words is not None and (not isinstance(words, list) or not words or not all(isinstance(w, str) for w in words)):
        raise ModelSpecError(f"{path}: vocabulary must be a non-empty list of words; got {str(words)[:60]}")
    return doc


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def refuse_pickled_weights(folder: Path, what: str) -> None:
    """ModelSpecError when ``folder`` holds weights only as pickle files (.bin, .pt, ...), which can run code
    when loaded: fewstep loads safetensors only (a folder with both loads its .safetensors)."""
    if not folder.is_dir():
        return
    files = sorted(f for f in folder.iterdir() if f.is_file())
    if any(f.suffix == ".safetensors" for f in files):
        return
    pickled = [f for f in files if f.suffix in PICKLE_SUFFIXES]
    if pickled:
        raise ModelSpecError(
            f"{pickled[0]} holds pickle-based weights, which can run code when loaded; fewstep loads "
            f"safetensors only: convert the {what} with "
            f"pipe.save_pretrained(DIR, safe_serialization=True)"
        )


def uniform_labels(num_classes: int) -> Callable[[list[int]], dict[str, Tensor]]:
    """cond_sampler drawing one uniform label per seed, each seed its own generator (batch-independent)."""
    from ..seeds import seeded_labels

    weights = torch.ones(int(num_classes), dtype=F64)
    return lambda seeds: {"class_labels": seeded_labels(list(seeds), weights, salt=LABEL_SALT)}
