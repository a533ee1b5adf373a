"""Does a learned solver's model match this one: what an artifact records about its model, and what differs.

An artifact records the model's fingerprint and, beside it, the parts the fingerprint is made of
(:func:`model_parts`: prediction, sample shape, identity, digests of the weights and of the prior's noise; the
schedule is recorded on its own). :func:`check_model` refuses a model with another fingerprint in one line
naming the parts that differ (size, schedule, weights, prediction, ...); guidance alone (another scale, or
guided against unguided with the same network) does not make it another model: a warning line, not an error.

Another sample size alone (a pipeline's ``--height/--width``) is refused too, its fix a fit at that size (or
``force``): on zoo:scenes-sd, S4S-Alt NFE 5 at guidance 4 fitted at 32x32 and used at 64x64 had a held-out RMSE
of 0.308 against 0.279 for fits at 64x64 (two fit seeds: +5% and +16%), still below the best classic's 0.368. A
flow pipeline with dynamic shifting moves its schedule with the size too (another ``mu``); the size line says so.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any

import torch

from ..denoiser import Denoiser
from ..errors import ArtifactError
from ..fingerprint import weights_digest

SIZE_KEYS = ("image_size", "sample_shape")  # identity entries that are the sample size
GUIDANCE_KEYS = ("guided", "null_class")  # identity entries that only say how the model is guided
MU_KEY = "grid_shift.mu"  # the schedule entry a flow pipeline with dynamic shifting sets from the image size
SIZE_NOTE = "size: "  # how a model_mismatch line about the sample size starts


def _plain(v: Any) -> Any:
    """A JSON-able copy of an identity value (tuples as lists; anything else as its repr)."""
    if v is None or isinstance(v, (str, bool, int)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else repr(v)
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return repr(v)


def model_parts(model: Denoiser) -> dict[str, Any]:
    """What the fingerprint is made of, as an artifact records it (``model.parts``): prediction, sample shape,
    identity, a digest of the weights and of the prior's noise; the schedule is recorded on its own."""
    prior = None
    if model.prior is not None:
        prior = hashlib.sha256(model.noise([0, 1]).to(torch.float64).numpy().tobytes()).hexdigest()[:16]
    return {
        "prediction": model.prediction,
        "sample_shape": None if model.sample_shape is None else [int(v) for v in model.sample_shape],
        "identity": _plain(model.identity),
        "weights": weights_digest(model),
        "prior": prior,
    }


def _flat(identity: Any, prefix: str = "", depth: int = 0) -> dict[str, Any]:
    """Identity entries by dotted key (two levels: a pipeline's identity nests its family's facts)."""
    if not isinstance(identity, Mapping):
        return {}
    out: dict[str, Any] = {}
    for k, v in identity.items():
        if isinstance(v, Mapping) and depth < 1:
            out.update(_flat(v, f"{prefix}{k}.", depth + 1))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _show(v: Any) -> str:
    """A recorded value in a message: sizes as 16x24, floats to 6 digits, at most 60 characters."""
    if isinstance(v, list) and v and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        text = "x".join(str(x) for x in v)
    else:
        text = "none" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v))
    return text if len(text) <= 60 else text[:57] + "..."


def _scale(w: Any) -> float:
    return 1.0 if w is None or isinstance(w, bool) or not isinstance(w, (int, float)) else float(w)


def _guidance_scale_note(doc: Mapping[str, Any], model: Denoiser) -> str | None:
    """'fitted at scale A, this model samples at B' when a single-scale solver meets another scale."""
    if doc.get("guidance") is not None:  # fitted across scales: the scale picks the tables
        return None
    fitted = _scale(doc["model"].get("guidance_scale"))
    several = model.conditions.scales()
    if several:
        return f"fitted at scale {fitted:g}, this model samples at {several[0]:g}..{several[-1]:g}"
    now = _scale(model.guidance_scale)
    return None if now == fitted else f"fitted at scale {fitted:g}, this model samples at {now:g}"


def _size_note(parts: Mapping[str, Any], now: dict[str, Any], a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """'size: ...' when the sample shape (or a pipeline's image size) differs."""
    img_a = next((v for k, v in a.items() if k.rsplit(".", 1)[-1] == "image_size"), None)
    img_b = next((v for k, v in b.items() if k.rsplit(".", 1)[-1] == "image_size"), None)
    shape_a, shape_b = parts.get("sample_shape"), now["sample_shape"]
    if img_a == img_b and shape_a == shape_b:
        return None
    if img_a is not None or img_b is not None:
        return (
            f"size: fitted for {_show(img_a)} images (latent {_show(shape_a)}), this one {_show(img_b)} "
            f"(latent {_show(shape_b)})"
        )
    return f"size: fitted for samples {_show(shape_a)}, this one {_show(shape_b)}"


def _schedule_diffs(fitted: Any, now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The schedule settings that differ, by dotted key: (fitted, this one); {"config": ...} when the two
    differ in no setting the flattening shows."""
    if fitted == now:
        return {}
    a, b = _flat(fitted), _flat(_plain(now))
    keys = [k for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
    return {k: (a.get(k), b.get(k)) for k in keys} or {"config": (None, None)}


def _schedule_notes(diffs: Mapping[str, tuple[Any, Any]]) -> list[str]:
    """'schedule: KEY fitted A, this one B' for each schedule setting that differs (three at most)."""
    return [f"schedule: {k} fitted {_show(a)}, this one {_show(b)}" for k, (a, b) in list(diffs.items())[:3]]


def _shift_note(diffs: Mapping[str, tuple[Any, Any]]) -> str:
    """', and this pipeline shifts its flow schedule with the image size (mu A fitted, B here): ...' when the
    resolution-dependent shift differs (a flow pipeline with dynamic shifting), else ''."""
    if MU_KEY not in diffs:
        return ""
    a, b = diffs[MU_KEY]
    return (
        f", and this pipeline shifts its flow schedule with the image size (mu {_show(a)} fitted, {_show(b)} "
        f"here): the fitted times were placed for the other shift"
    )


def _identity_diffs(a: dict[str, Any], b: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(guidance, other) differences between two flattened identities (sizes are left to :func:`_size_note`).

    Guided against unguided is one "guided" line: the null class and the unconditional rows (in ``cond``)
    come with it."""
    guidance, other = [], []
    guided = [k for k in a.keys() | b.keys() if k.rsplit(".", 1)[-1] == "guided" and a.get(k) != b.get(k)]
    for k in sorted(a.keys() | b.keys()):
        leaf = k.rsplit(".", 1)[-1]
        if a.get(k) == b.get(k) or leaf in SIZE_KEYS:
            continue
        line = f"{k}: fitted {_show(a.get(k))}, this one {_show(b.get(k))}"
        if guided and (leaf in GUIDANCE_KEYS or leaf == "cond"):
            if leaf == "guided":
                guidance.append(line)
        elif leaf in GUIDANCE_KEYS:
            guidance.append(line)
        else:
            other.append(line)
    return guidance, other


def model_mismatch(doc: Mapping[str, Any], model: Denoiser) -> tuple[list[str], list[str]]:
    """What differs between the model a solver.json records and ``model``: (differences that make it another
    model, guidance differences), each ``"what: fitted A, this one B"``. Both empty: the same model.

    Only a model with another fingerprint is another model; an artifact from before the parts were recorded
    names only the schedule, else just "fingerprint"."""
    rec = doc["model"]
    guidance = [n for n in [_guidance_scale_note(doc, model)] if n]
    if rec.get("fingerprint") == model.fingerprint():
        return [], guidance
    diffs = _schedule_diffs(doc.get("schedule"), model.schedule.config())
    parts = rec.get("parts")
    if not isinstance(parts, Mapping):
        return _schedule_notes(diffs) or ["fingerprint"], guidance
    now = model_parts(model)
    a, b = _flat(parts.get("identity")), _flat(now["identity"])
    guided, other = _identity_diffs(a, b)
    size = _size_note(parts, now, a, b)
    if size:  # the size explains a dynamic shift's other mu, and another shape of source noise
        size += _shift_note(diffs)
        diffs = {k: v for k, v in diffs.items() if k != MU_KEY}
    block = [n for n in [size] if n] + _schedule_notes(diffs) + other
    if parts.get("prediction") != now["prediction"]:
        block.append(f"prediction: fitted for {_show(parts.get('prediction'))}, this one {now['prediction']}")
    if parts.get("prior") != now["prior"] and not size:
        block.append("prior: another source noise")
    if parts.get("weights") != now["weights"]:
        dtype = str(model.dtype or torch.float32).replace("torch.", "")
        block.append(
            "weights: another network's"
            if rec.get("dtype", dtype) == dtype
            else f"weights or precision: fitted with {_show(rec.get('dtype'))} weights, this one {dtype}"
        )
    return (block or ([] if guided else ["fingerprint"])), guidance + (guided if not guidance else [])


def check_model(doc: Mapping[str, Any], model: Denoiser, what: str) -> str | None:
    """Refuse (ArtifactError, one line naming what differs) a model the solver recorded in ``doc`` was not fitted
    for; returns a warning line when only guidance differs (None when nothing does)."""
    block, guidance = model_mismatch(doc, model)
    if block:
        rec = doc["model"]
        detail = "; ".join(b for b in block if b != "fingerprint")
        raise ArtifactError(
            f"{what} was fitted for model {rec.get('name')} (fingerprint {rec.get('fingerprint')}), "
            f"not this one (fingerprint {model.fingerprint()}){': ' + detail if detail else ''}; "
            f"{refit_hint(block, model)}"
        )
    if not guidance:
        return None
    return (
        f"{what} was fitted for this model at another guidance ({'; '.join(guidance)}): its tables may suit "
        f"this guidance less well; fit one at this scale (or across scales with --guidance LO:HI)"
    )


def _image_size(model: Denoiser) -> list[int] | None:
    """A pipeline model's (height, width) in pixels, from its identity (None for other models)."""
    size = next((v for k, v in _flat(_plain(model.identity)).items() if k.rsplit(".", 1)[-1] == "image_size"), None)
    return size if isinstance(size, list) and len(size) == 2 else None


def refit_hint(block: list[str], model: Denoiser) -> str:
    """The fix a refusal names: for another size alone, a fit at this size (``--height/--width`` for a pipeline)
    or ``force`` to use it anyway; otherwise a refit for this model (or ``force``)."""
    if not block or not all(b.startswith(SIZE_NOTE) for b in block):
        return "refit it for this model (or force=True / --force)"
    size = _image_size(model)
    how = f" (fewstep fit ... --height {size[0]} --width {size[1]})" if size else ""
    return (
        f"a solver fitted at one size does not carry over to another: fit one at this size{how}, or use it "
        f"anyway with force=True / --force"
    )


def forced_note(doc: Mapping[str, Any], model: Denoiser, what: str, sizes: bool = True) -> str | None:
    """The warning line for a solver used with ``force`` on a model it was not fitted for (None when it was):
    what differs, and that its error may be well above a fit for this model. ``sizes=False``: None when only the
    sample size differs (a caller that tells the size itself)."""
    block, _ = model_mismatch(doc, model)
    if not sizes:
        block = [b for b in block if not b.startswith(SIZE_NOTE)]
    if not block:
        return None
    detail = "; ".join(b for b in block if b != "fingerprint") or "another fingerprint"
    return (
        f"{what} was fitted for another model ({detail}); using it anyway (force): expect a larger error than a "
        f"solver fitted for this model"
    )
