"""Text-to-image and class-conditional diffusers pipelines in: a pipeline folder (or object) as a Denoiser.

    >>> model = load_pipeline("sdxl-folder", prompts="prompts.txt", guidance=7.5, device="cuda", dtype="fp16")
    >>> x = fewstep.sample(model, model.noise(range(4)), "unipc@logsnr", nfe=6, cond=model.cond_for(range(4)))

The pipeline's family adapter (:mod:`.families`) calls the network; fewstep works in the latent
space (one unpacked latent per sample) and decodes through the VAE only for metrics and pictures
(``model.decode``). Each seed draws a prompt (and, for sets of scales, a guidance scale) from the
condition set (:mod:`fewstep.conditions`); the network gets ``prompt`` indices, and :class:`FamilyNet`
looks the rows up in a :class:`ConditionTable`: every prompt (and negative prompt) encoded once by the
pipeline's own encoder and cached on disk under ``<cache root>/embeddings/<encoder key>/``, keyed by
the text encoders and the prompt. The model's fingerprint covers the denoising network, not the
prompts, so a solver fitted on one prompt set is evaluated on another.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..conditions import ClassSet, Conditioning, ConditionSpec, Entry, GuidanceSet, PromptSet
from ..denoiser import Denoiser, torch_dtype
from ..errors import FewstepError, ModelSpecError, ShapeError
from ..guidance import Conditions, Guidance
from ..io import atomic_path, cache_root
from ..schedules import Schedule
from .diffusers_in import ModelSchedule, dynamic_mu, flow_with_mu, refuse_pickled_weights, schedule_from_diffusers
from .families import Family, family_for, supported_pipelines
from .quiet import quiet_torchvision_notices

NULL = "\x00null"  # the table key of "no negative prompt" (the pipeline's own unconditional rows)


# ----------------------------------------------------------------------------- conditioning rows
class ConditionTable:
    """Conditioning rows per prompt text, from the family's encoder, computed once and cached on disk.

    ``rows(texts)`` -> {key: (len(texts), ...)}: one row per text (``NULL`` for the pipeline's own
    unconditional rows). Texts seen before (in this process or, with a cache folder, any earlier
    one with the same text encoders) are not encoded again.
    """

    def __init__(
        self, family: Family, cache: Path | None = None, batch: int = 16, vocabulary: Sequence[str] | None = None
    ) -> None:
        self.family, self.cache, self.batch = family, cache, int(batch)
        self.vocabulary = None if vocabulary is None else frozenset(vocabulary)
        self._rows: dict[str, dict[str, Tensor]] = {}
        self.encoded = 0  # texts the encoder ran on (cache misses)

    def _file(self, text: str) -> Path | None:
        return (
            None if self.cache is None else self.cache / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.safetensors"
        )

    def _load(self, text: str) -> dict[str, Tensor] | None:
        f = self._file(text)
        if f is None or not f.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(f), "pt") as fh:
                meta = fh.metadata() or {}
                rows = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open handles iterate only through keys()
        except Exception:  # noqa: BLE001 - a damaged cache file is recomputed
            return None
        if meta.get("text") != text or any(not torch.isfinite(v).all() for v in rows.values() if v.is_floating_point()):
            return None
        return rows

    def _store(self, text: str, rows: dict[str, Tensor]) -> None:
        f = self._file(text)
        if f is None:
            return
        from safetensors.torch import save_file

        try:
            with atomic_path(f) as tmp:
                save_file(
                    {k: v.detach().cpu().contiguous() for k, v in rows.items()}, str(tmp), metadata={"text": text}
                )
        except OSError:  # a read-only cache: the rows stay in memory
            pass

    def ensure(self, texts: Sequence[str]) -> None:
        """Encode (or load) every text not yet in the table (a FewstepError names words it cannot encode)."""
        todo = []
        for text in dict.fromkeys(texts):
            if text in self._rows:
                continue
            self.check_words(text)
            got = self._load(text)
            if got is not None:
                self._rows[text] = got
            else:
                todo.append(text)
        if NULL in todo:
            todo.remove(NULL)
            null = {k: v[0].detach().cpu() for k, v in self.family.null_rows(1).items()}
            self._rows[NULL] = null
            self._store(NULL, null)
        for k in range(0, len(todo), self.batch):
            part = todo[k : k + self.batch]
            with torch.no_grad():
                enc = self.family.encode(part)
            self.encoded += len(part)
            for i, text in enumerate(part):
                row = {key: v[i].detach().cpu() for key, v in enc.items()}
                self._rows[text] = row
                self._store(text, row)

    def check_words(self, text: str) -> None:
        """Refuse a prompt with words outside the model's ``vocabulary`` (when it declares one) or that one of its
        tokenizers would turn into its unknown token: in one line naming them, never a silent unknown token."""
        if text == NULL:
            return
        bad = [w for w in dict.fromkeys(text.split()) if self._unknown(w)]
        if not bad:
            return
        known = f" (it knows: {', '.join(sorted(self.vocabulary))})" if self.vocabulary is not None else ""
        raise FewstepError(
            f"prompt {text[:80]!r}: {', '.join(map(repr, bad))} cannot be encoded by this model's tokenizers"
            f"{known}; use the words of its prompt files"
        )

    def _unknown(self, word: str) -> bool:
        if self.vocabulary is not None and word not in self.vocabulary:
            return True
        for tok in self.family.tokenizers():
            unk = getattr(tok, "unk_token_id", None)
            if unk is not None and unk in tok(word, add_special_tokens=False)["input_ids"]:
                return True
        return False

    def rows(self, texts: Sequence[str], device: torch.device | str) -> dict[str, Tensor]:
        """{key: (len(texts), ...)} on ``device``: each text's rows, stacked (encoded first where new)."""
        self.ensure(texts)
        keys = self._rows[texts[0]].keys()
        return {k: torch.stack([self._rows[t][k] for t in texts]).to(device) for k in keys}


class FamilyNet(nn.Module):
    """``net(x, t_net, prompt=, negative=, class_labels=, guidance=)`` for a Denoiser: looks up each sample's
    conditioning rows (its prompt's, or its negative prompt's / the unconditional ones where ``negative``)
    and calls the family adapter. x: (B, C, h, w); prompt, negative, class_labels: (B,)."""

    family: Family  # set through __dict__: nn.Module registers nothing for it

    def __init__(self, family: Family, table: ConditionTable, prompts: list[Entry]) -> None:
        super().__init__()
        self.network = family.network  # the only registered module: the fingerprint hashes its weights alone
        self.__dict__["family"] = family
        self.table, self.entries = table, list(prompts)

    def add_prompts(self, entries: Sequence[Entry]) -> Tensor:
        """Append prompts (encoding them now); their indices, (len(entries),)."""
        start = len(self.entries)
        self.entries += list(entries)
        self.table.ensure([e.prompt for e in entries] + [e.negative or NULL for e in entries])
        return torch.arange(start, len(self.entries))

    def forward(
        self,
        x: Tensor,
        t_net: Tensor,
        prompt: Tensor | None = None,
        negative: Tensor | None = None,
        class_labels: Tensor | None = None,
        guidance: Tensor | None = None,
    ) -> Tensor:
        b = x.shape[0]
        neg = torch.zeros(b, dtype=torch.bool) if negative is None else negative.reshape(-1).bool().cpu()
        neg = neg.expand(b) if neg.numel() == 1 else neg
        if class_labels is not None:
            labels = torch.as_tensor(class_labels).reshape(-1).to(x.device).long().expand(b)
            null = self.family.null_rows(1)["class_labels"].to(labels.device)
            rows = {"class_labels": torch.where(neg.to(labels.device), null.expand(b), labels)}
        else:
            if prompt is None:
                raise FewstepError(
                    f"{self.family.name} is text-conditional: each sample needs a prompt: pass "
                    f"cond=model.prompt_cond([...]), or cond=model.cond_for(seeds) of a model loaded "
                    f"with a prompt set (--prompts FILE)"
                )
            idx = torch.as_tensor(prompt).reshape(-1).cpu().long().expand(b).tolist()
            if neg.numel() != b:
                raise ShapeError(f"negative has {neg.numel()} entries for a batch of {b}: give one per sample")
            texts = [
                (self.entries[i].negative or NULL) if n else self.entries[i].prompt
                for i, n in zip(idx, neg.tolist(), strict=True)
            ]
            rows = self.table.rows(texts, self.family.network_device)
        return self.family.forward(x, t_net, rows, guidance)


class PipelineDenoiser(Denoiser):
    """A Denoiser over a diffusers pipeline family (see the module docstring)."""

    family: Family
    net: FamilyNet
    #: prompts the model's author holds out from fitting (a zoo pipeline's unseen captions): what a closing table
    #: or an evaluation given no prompt file measures on
    held_out_prompts: PromptSet | None = None

    @property
    def text_conditional(self) -> bool:
        """Does the network take text (a prompt per sample) rather than class labels?"""
        return self.family.text_conditional

    def cond_for(self, seeds: list[int] | range, device: str | torch.device = "cpu") -> dict[str, Any]:
        """Per-seed conditioning drawn from the prompt set; refused in one line for a text model loaded without one."""
        if self.text_conditional and not (
            isinstance(self.cond_sampler, Conditioning) and self.cond_sampler.prompts is not None
        ):
            raise FewstepError(
                f"{self.name} was loaded without prompts: give a prompt set (--prompts FILE, or "
                f"prompts= / model.with_prompts(...)) to sample, fit or evaluate it, or pass "
                f"cond=model.prompt_cond([...]) to fewstep.sample"
            )
        return super().cond_for(seeds, device)

    def with_prompts(self, prompts: PromptSet) -> PipelineDenoiser:
        """The same model (same network, same encoder cache) drawing its prompts from another set."""
        if not isinstance(self.cond_sampler, Conditioning) or not self.text_conditional:
            raise FewstepError(f"{self.name} is not conditioned on prompts")
        other = copy.copy(self)
        other._modules = dict(self._modules)
        other.net = FamilyNet(self.family, self.net.table, list(prompts.entries))
        other.net.table.ensure([e.prompt for e in prompts.entries] + [e.negative or NULL for e in prompts.entries])
        other.conditions = dataclasses.replace(
            self.conditions, sampler=dataclasses.replace(self.cond_sampler, prompts=prompts)
        )
        return other

    def prompt_cond(
        self,
        prompts: Sequence[str],
        negative: Sequence[str | None] | None = None,
        guidance: float | Sequence[float] | None = None,
    ) -> dict[str, Tensor]:
        """Conditioning for these prompts (one per sample), encoded now: ``{"prompt": indices[, "guidance_scale"]}``."""
        neg = list(negative) if negative is not None else [None] * len(prompts)
        if len(neg) != len(prompts):
            raise FewstepError(
                f"prompt_cond got {len(neg)} negative prompts for {len(prompts)} prompts: give one per prompt "
                f"(None where a prompt has none)"
            )
        idx = self.net.add_prompts([Entry(p, n) for p, n in zip(prompts, neg, strict=True)])
        out: dict[str, Tensor] = {"prompt": idx}
        if guidance is not None:
            w = torch.as_tensor(guidance, dtype=torch.float64)
            out["guidance_scale"] = w.expand(len(prompts)).clone() if w.dim() == 0 else w
        return out


def _uncond(cond: dict[str, Any]) -> dict[str, Any]:
    """The unconditional half: the same prompt (or class) flagged ``negative`` (its negative prompt, or the
    pipeline's own unconditional rows)."""
    key = "prompt" if "prompt" in cond else "class_labels"
    n = torch.as_tensor(cond[key]).reshape(-1).shape[0] if key in cond else 1
    return {**cond, "negative": torch.ones(n, dtype=torch.bool)}


# ----------------------------------------------------------------------------- loading
def _read_index(root: Path) -> dict[str, Any]:
    f = root / "model_index.json"
    try:
        doc = json.loads(f.read_text())
    except FileNotFoundError:
        raise ModelSpecError(f"{root} has no model_index.json: save the pipeline with save_pretrained") from None
    except (OSError, ValueError) as e:
        raise ModelSpecError(f"{f} is unreadable ({e})") from None
    if not isinstance(doc, dict):
        raise ModelSpecError(f"{f} must hold a JSON object")
    return doc


def pipeline_class(root: str | Path) -> str | None:
    """The pipeline class a saved folder names (None without a model_index.json)."""
    f = Path(root) / "model_index.json"
    if not f.is_file():
        return None
    return str(_read_index(Path(root)).get("_class_name") or "")


def _components(index: dict[str, Any]) -> list[str]:
    """The component folders a model_index.json names (text encoders, tokenizers, VAE, network, scheduler)."""
    return [
        name
        for name, spec in index.items()
        if not name.startswith("_") and isinstance(spec, list) and spec and spec[0] is not None
    ]


def freeze(pipe: Any) -> None:
    """Every network of a pipeline in eval mode with frozen weights (fewstep never trains them: no gradient
    buffers, and samples that do not track gradients)."""
    parts = getattr(pipe, "components", None)
    for part in (parts if isinstance(parts, dict) else vars(pipe)).values():
        if isinstance(part, nn.Module):
            part.eval().requires_grad_(False)


def _check_components(root: Path, index: dict[str, Any], fam: type[Family]) -> None:
    """Every component the pipeline names (text encoders, tokenizers, VAE, network) is a folder here."""
    for name in _components(index):
        spec = index[name]
        if not (root / name).is_dir():
            raise ModelSpecError(
                f"pipeline folder {root} lacks {name}/ ({spec[-1]}), which the {fam.name} family "
                f"needs; save the whole pipeline with save_pretrained"
            )


def _encoder_key(family: Family, root: Path | None) -> str:
    """What the conditioning rows depend on: the family and its options, and the text encoders' files
    (or weights, for a pipeline built in memory)."""
    h = hashlib.sha256(
        json.dumps(
            {k: v for k, v in family.identity().items() if k not in ("image_size", "sample_shape")}, sort_keys=True
        ).encode()
    )
    for attr in sorted(a for a in vars(family.pipe) if a.startswith(("text_encoder", "tokenizer"))):
        comp = getattr(family.pipe, attr, None)
        if comp is None:
            continue
        folder = None if root is None else root / attr
        if folder is not None and folder.is_dir():
            for f in sorted(folder.rglob("*")):
                if f.is_file():
                    st = f.stat()
                    h.update(f"{f.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}".encode())
                    if f.suffix == ".json":
                        h.update(f.read_bytes())
        elif isinstance(comp, nn.Module):
            for k, v in comp.state_dict().items():
                h.update(k.encode() + v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:20]


def _pipeline(path_or_pipe: Any, device: str | torch.device, dtype: torch.dtype | None) -> tuple[Any, Path | None]:
    if not isinstance(path_or_pipe, (str, os.PathLike)):
        return path_or_pipe, None
    root = Path(path_or_pipe).expanduser()
    if not root.is_dir():
        raise ModelSpecError(
            f"pipeline folder {str(path_or_pipe)!r} does not exist (expected a save_pretrained folder)"
        )
    index = _read_index(root)
    fam = family_for(index)
    _check_components(root, index, fam)
    for name in _components(index):
        refuse_pickled_weights(root / name, f"{index.get('_class_name')} folder")
    quiet_torchvision_notices()  # importing a pipeline class logs transformers notices fewstep has no use for
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as dlog

    dlog.disable_progress_bar()  # loading bars would land between a command's output lines
    try:
        from transformers.utils import logging as tlog

        tlog.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers comes with the pipelines extra
        pass
    lean = importlib.util.find_spec("accelerate") is not None
    try:
        pipe = DiffusionPipeline.from_pretrained(
            str(root), local_files_only=True, torch_dtype=dtype, low_cpu_mem_usage=lean, use_safetensors=True
        )
    except (OSError, ValueError, RuntimeError, TypeError, AttributeError) as e:
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise ModelSpecError(
            f"cannot load the {index.get('_class_name')} pipeline from {root} ({first[:200]})"
        ) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device), root


def load_pipeline(
    path_or_pipe: Any,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    prompts: PromptSet | str | os.PathLike[str] | Sequence[str] | None = None,
    classes: ClassSet | str | None = None,
    guidance: float | str | Sequence[float] | GuidanceSet | None = None,
    height: int | None = None,
    width: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    name: str | None = None,
    conditions: ConditionSpec | None = None,
    vocabulary: Sequence[str] | None = None,
    **family_options: Any,
) -> PipelineDenoiser:
    """A Denoiser for a text-to-image or class-conditional pipeline (a saved folder or a loaded pipeline).

    The pipeline's networks are put in eval mode with frozen weights (as :func:`~.diffusers_in.from_diffusers`
    does); a folder loads from safetensors weights only (pickle-based ``.bin`` files are refused).

    Args:
        path_or_pipe: a ``save_pretrained`` folder of a supported pipeline, or a loaded pipeline object.
        device, dtype: where and in which precision the pipeline runs (fp32 / fp16 / bf16).
        conditions: what the samples are conditioned on (a :class:`~fewstep.conditions.ConditionSpec`), or its
            parts (see :meth:`~fewstep.conditions.ConditionSpec.parse`):
        prompts: the prompt set (a PromptSet, a prompt file, or a list of prompts) each seed draws from. A
            text model loaded without one builds schedulers and samples with explicit prompts
            (``cond=model.prompt_cond([...])``); drawing per-seed conditions (``cond_for``: fits, evaluations)
            is refused in one line.
        classes: class labels for a class-conditional family (DiT): "0,1,2" or "all" (the default).
        guidance: one scale (classifier-free guidance, or Flux's guidance input), several ("3,7.5,12", a
            range "3:12"): each seed draws one, so a solver can be fitted across them. Default: the
            pipeline's own scale.
        height, width: the image size (default: the pipeline's); the latent shape follows.
        cache_dir: cache root for the prompt embeddings (default ``$FEWSTEP_CACHE``).
        vocabulary: the words prompts may use (a pipeline folder's ``fewstep.json`` may list them); prompts with other
            words, or words a tokenizer maps to its unknown token, are refused in one line.
        family_options: options of the family adapter (e.g. ``max_sequence_length``).
    """
    if conditions is not None and any(v is not None for v in (prompts, classes, guidance)):
        raise FewstepError("load_pipeline: give conditions= or prompts= / classes= / guidance=, not both")
    spec = conditions or ConditionSpec.parse(prompts, classes, guidance)
    pipe, root = _pipeline(path_or_pipe, device, torch_dtype(dtype))
    freeze(pipe)
    fam = family_for(pipe)(pipe, **family_options)
    shape = fam.sample_shape(height, width)
    info = schedule_from_diffusers(fam.scheduler_config)
    pset, cset = fam.condition_sets(spec)
    table = ConditionTable(fam, cache_root(cache_dir) / "embeddings" / _encoder_key(fam, root), vocabulary=vocabulary)
    entries = list(pset.entries) if pset is not None else []
    if entries:
        table.ensure([e.prompt for e in entries] + [e.negative or NULL for e in entries])
    identity: dict[str, Any] = {"pipeline": fam.identity()}
    if info.flow_grid:
        identity["flow_grid"] = info.flow_grid
    model = PipelineDenoiser(
        FamilyNet(fam, table, entries),
        _schedule(fam, info, shape),
        info.prediction,
        sample_shape=shape,
        name=name or f"diffusers:{root or type(pipe).__name__}",
        identity=identity,
        decode=fam.decode,
        conditions=_conditions(fam, spec, pset, cset),
    )
    model.family = fam
    model.dtype = fam.network_dtype  # recorded (the family casts its inputs; the weights are loaded in it)
    return model


def _schedule(fam: Family, info: ModelSchedule, shape: tuple[int, int, int]) -> Schedule:
    """The pipeline's schedule at this latent shape (a dynamically shifted flow: the shift of its token count)."""
    if info.flow_grid and info.flow_grid.get("use_dynamic_shifting"):
        return flow_with_mu(info, dynamic_mu(fam.scheduler_config, fam.image_tokens(shape)), base=fam.shift_base)
    return info.schedule


def _conditions(fam: Family, spec: ConditionSpec, pset: PromptSet | None, cset: ClassSet | None) -> Conditions:
    """The model's conditions: the family's guidance at the spec's scale (default: the pipeline's own), drawn per
    seed from a set of several, and the prompt or class set."""
    gset = spec.guidance
    if gset is None and fam.guidance_mode != "none":
        default = default_guidance(fam.pipe)
        gset = None if default is None else GuidanceSet.parse(default)
    if fam.guidance_mode == "none" and gset is not None:
        raise FewstepError(
            f"{fam.name}: this network takes no guidance (no guidance embedding, no unconditional "
            f"half): drop --guidance"
        )
    w = None if gset is None else gset.middle
    distilled = fam.guidance_mode == "distilled"
    sampler = Conditioning(
        prompts=pset,
        classes=cset,
        guidance=gset if gset is not None and len(gset.scales) > 1 else None,
        default_guidance=1.0 if w is None else w,
    )
    guidance = Guidance(
        scale=w if distilled or (w is not None and w != 1.0) else None,
        uncond=None if distilled else _uncond,
        takes_scale=distilled,
    )
    return Conditions(guidance, sampler, fam.num_classes)


def default_guidance(pipe: Any) -> float | None:
    """The guidance scale a pipeline uses when none is given (its ``__call__`` default)."""
    import inspect

    p = inspect.signature(type(pipe).__call__).parameters.get("guidance_scale")
    return None if p is None or not isinstance(p.default, (int, float)) else float(p.default)


__all__ = ["ConditionTable", "FamilyNet", "PipelineDenoiser", "load_pipeline", "pipeline_class", "supported_pipelines"]
