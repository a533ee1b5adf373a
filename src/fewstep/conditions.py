"""Condition sets: what each seed is conditioned on (a prompt, a class label, a guidance scale).

Every seed draws its condition from the set with a generator of its own (salted, so the draw is
independent of the noise drawn from the same seed): teacher data, fits and evaluations are
reproducible and do not depend on batch size or on the number of processes.

- :class:`PromptSet`: prompts from a file, one per line (``.txt``), or with an optional negative prompt
  and guidance scale per prompt (``.csv`` with columns ``prompt[, negative_prompt][, guidance]``, or
  ``.jsonl`` with those keys). :meth:`PromptSet.split` keeps a deterministic held-out part (by prompt
  text) for evaluation on prompts a fit never saw.
- :class:`ClassSet`: class labels (``"0,1,2"`` or ``"all"``).
- :class:`GuidanceSet`: guidance scales (``"3,7.5,12"`` or a range ``"3:12"`` / ``"3:12:5"``).
- :class:`Conditioning`: a model's condition sampler built from those; its :meth:`~Conditioning.digest`
  names the set (the teacher cache keys on it; the model fingerprint does not, so a solver fitted on
  one prompt set can be evaluated on another).
- :class:`ConditionSpec`: what a model is asked to be conditioned on (prompts, classes, guidance), parsed
  once from a command's or a call's options and passed whole to the loaders.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import FewstepError

PROMPT_SALT, GUIDANCE_SALT = 104_729, 130_363
HELD_OUT = 0.2  # the share of a prompt set kept for evaluation
#: the most guidance scales a set may hold (each is drawn by some seeds and a fit covers every one)
MAX_SCALES = 64


def _draw(seeds: Sequence[int], n: int, salt: int) -> Tensor:
    """One index in [0, n) per seed, from a generator of its own (uniform; batch-independent)."""
    out = []
    for s in seeds:
        g = torch.Generator().manual_seed((int(s) * 1_000_003 + salt) % (2**63 - 1))
        out.append(int(torch.randint(n, (1,), generator=g)))
    return torch.tensor(out, dtype=torch.long)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Entry:
    """One prompt, with its negative prompt and guidance scale when the set gives them."""

    prompt: str
    negative: str | None = None
    guidance: float | None = None


@dataclass(frozen=True)
class PromptSet:
    """The prompts a model is conditioned on: each seed draws one from the seed alone (:meth:`read`, :meth:`of`)."""

    entries: tuple[Entry, ...]
    source: str = "inline"

    def __post_init__(self) -> None:
        if not self.entries:
            raise FewstepError(f"prompt set {self.source} is empty: give at least one prompt")

    @classmethod
    def of(cls, prompts: Sequence[str | Entry], source: str = "inline") -> PromptSet:
        return cls(tuple(p if isinstance(p, Entry) else Entry(str(p)) for p in prompts), source)

    @classmethod
    def read(cls, path: str | Path) -> PromptSet:
        """Read a ``.txt`` (one prompt per line), ``.csv`` or ``.jsonl`` prompt file (one clear line on error)."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FewstepError(f"prompt file {p} does not exist") from None
        except (OSError, UnicodeDecodeError) as e:
            raise FewstepError(f"prompt file {p} cannot be read ({getattr(e, 'strerror', None) or e})") from None
        if p.suffix == ".csv":
            entries = _read_csv(text, p)
        elif p.suffix == ".jsonl":
            entries = _read_jsonl(text, p)
        else:
            entries = [Entry(line.strip()) for line in text.splitlines() if line.strip()]
        if not entries:
            raise FewstepError(f"prompt file {p} holds no prompt: give one prompt per line")
        return cls(tuple(entries), str(p))

    def __len__(self) -> int:
        return len(self.entries)

    def digest(self) -> str:
        return _digest([[e.prompt, e.negative, e.guidance] for e in self.entries])

    def split(self, held_out: float = HELD_OUT) -> tuple[PromptSet, PromptSet]:
        """(fit part, held-out part): a prompt is held out when its text hashes into the ``held_out`` share, so
        the split survives reordering and extending the file. A set too small to split is used whole for both."""

        def out(e: Entry) -> bool:
            return int(hashlib.sha256(e.prompt.encode()).hexdigest()[:8], 16) / 2**32 < held_out

        fit = tuple(e for e in self.entries if not out(e))
        ev = tuple(e for e in self.entries if out(e))
        if not fit or not ev:
            return self, self
        return PromptSet(fit, f"{self.source} (fit part)"), PromptSet(ev, f"{self.source} (held-out part)")

    def draw(self, seeds: Sequence[int]) -> Tensor:
        """The prompt index (into ``entries``) of each seed, (len(seeds),) long."""
        return _draw(seeds, len(self.entries), PROMPT_SALT)


def _guidance(v: Any, where: str) -> float | None:
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    try:
        w = float(v)
    except (TypeError, ValueError):
        raise FewstepError(f"{where}: guidance {v!r} is not a number") from None
    if not math.isfinite(w) or w < 0:
        raise FewstepError(f"{where}: guidance {v!r} must be a finite number >= 0")
    return w


def _read_csv(text: str, p: Path) -> list[Entry]:
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows:
        return []
    if "prompt" not in rows[0]:
        raise FewstepError(
            f"prompt file {p}: the CSV needs a header with a 'prompt' column (and optionally "
            f"'negative_prompt' and 'guidance'); got {list(rows[0])}"
        )
    out = []
    for i, r in enumerate(rows, 2):
        if not (r.get("prompt") or "").strip():
            raise FewstepError(f"prompt file {p}, line {i}: empty prompt")
        out.append(
            Entry(
                r["prompt"].strip(),
                (r.get("negative_prompt") or r.get("negative") or None),
                _guidance(r.get("guidance", r.get("guidance_scale")), f"prompt file {p}, line {i}"),
            )
        )
    return out


def _read_jsonl(text: str, p: Path) -> list[Entry]:
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise FewstepError(f"prompt file {p}, line {i}: not JSON ({e.msg})") from None
        except RecursionError:  # what is nested below a prompt's fields is refused by their type checks
            raise FewstepError(f"prompt file {p}, line {i}: nested too deeply to be a prompt") from None
        if not isinstance(d, dict) or not isinstance(d.get("prompt"), str) or not d["prompt"].strip():
            raise FewstepError(
                f'prompt file {p}, line {i}: needs {{"prompt": "..."}} (and optionally "negative_prompt", "guidance")'
            )
        neg = d.get("negative_prompt", d.get("negative"))
        if neg is not None and not isinstance(neg, str):
            raise FewstepError(f"prompt file {p}, line {i}: negative_prompt must be a string")
        out.append(
            Entry(
                d["prompt"].strip(),
                neg,
                _guidance(d.get("guidance", d.get("guidance_scale")), f"prompt file {p}, line {i}"),
            )
        )
    return out


@dataclass(frozen=True)
class ClassSet:
    """The class labels a class-conditional model samples: each seed draws one from the seed alone."""

    labels: tuple[int, ...]

    @classmethod
    def parse(cls, spec: str, num_classes: int | None) -> ClassSet:
        """``"0,1,2"`` or ``"all"`` (needs ``num_classes``)."""
        spec = str(spec).strip()
        if spec == "all":
            if not num_classes:
                raise FewstepError(
                    "--classes all: this model does not say how many classes it has; list them (e.g. --classes 0,1,2)"
                )
            return cls(tuple(range(int(num_classes))))
        try:
            labels = tuple(int(v) for v in spec.split(",") if v.strip())
        except ValueError:
            raise FewstepError(f"--classes {spec!r}: give class labels as integers, e.g. 0,1,2, or 'all'") from None
        if not labels:
            raise FewstepError("--classes: give at least one class label")
        bad = [v for v in labels if v < 0 or (num_classes is not None and v >= num_classes)]
        if bad:
            rng = f" (this model has classes 0..{num_classes - 1})" if num_classes else ""
            raise FewstepError(f"--classes: label {bad[0]} is out of range{rng}")
        return cls(labels)

    def digest(self) -> str:
        return _digest(list(self.labels))

    def draw(self, seeds: Sequence[int]) -> Tensor:
        """The class label of each seed, (len(seeds),) long."""
        return torch.tensor(self.labels, dtype=torch.long)[_draw(seeds, len(self.labels), PROMPT_SALT)]


@dataclass(frozen=True)
class GuidanceSet:
    """The guidance scales a model samples at: one, or several that each seed draws from (:meth:`parse`)."""

    scales: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.scales) > MAX_SCALES:
            raise FewstepError(
                f"--guidance: {len(self.scales)} scales is more than {MAX_SCALES}; give fewer "
                f"(e.g. a range LO:HI:{MAX_SCALES // 8})"
            )

    @classmethod
    def parse(cls, spec: str | float | Sequence[float]) -> GuidanceSet:
        """``"3,7.5,12"``, a range ``"3:12"`` (3 evenly spaced scales) or ``"3:12:K"`` (K of them, at most
        ``MAX_SCALES``)."""
        if isinstance(spec, (int, float)):
            return cls._checked(spec, (float(spec),))
        if not isinstance(spec, str):
            return cls._checked(spec, tuple(float(v) for v in spec))
        s = spec.strip()
        try:
            scales = _range(s) if ":" in s else tuple(float(v) for v in s.split(",") if v.strip())
        except (ValueError, OverflowError):
            raise FewstepError(
                f"--guidance {spec!r}: give a scale (7.5), a list (3,7.5,12) or a range LO:HI[:COUNT] "
                f"with LO < HI and a COUNT of 2..{MAX_SCALES}"
            ) from None
        return cls._checked(spec, scales)

    @classmethod
    def _checked(cls, spec: Any, scales: tuple[float, ...]) -> GuidanceSet:
        if not scales or any(not math.isfinite(w) or w < 0 for w in scales):
            raise FewstepError(f"--guidance {spec!r}: scales must be finite numbers >= 0")
        if len(scales) > MAX_SCALES:
            raise FewstepError(f"--guidance: {len(scales)} scales is more than {MAX_SCALES}; give fewer")
        return cls(tuple(sorted(set(scales))))

    @property
    def range(self) -> tuple[float, float]:
        return self.scales[0], self.scales[-1]

    @property
    def middle(self) -> float:
        """The middle scale (the upper middle of an even count): the one scale a model built for the set gets."""
        return self.scales[len(self.scales) // 2]

    def digest(self) -> str:
        return _digest(list(self.scales))

    def draw(self, seeds: Sequence[int]) -> Tensor:
        """The guidance scale of each seed, (len(seeds),) float64."""
        return torch.tensor(self.scales, dtype=torch.float64)[_draw(seeds, len(self.scales), GUIDANCE_SALT)]


def _range(s: str) -> tuple[float, ...]:
    """The scales of ``"LO:HI[:COUNT]"`` (ValueError if malformed or COUNT is not 2..MAX_SCALES)."""
    parts = [float(v) for v in s.split(":")]
    if len(parts) not in (2, 3) or not all(math.isfinite(v) for v in parts):
        raise ValueError(s)
    lo, hi, k = parts[0], parts[1], parts[2] if len(parts) == 3 else 3.0
    if not lo < hi or k != int(k) or not 2 <= k <= MAX_SCALES:
        raise ValueError(s)
    return tuple(lo + (hi - lo) * i / (int(k) - 1) for i in range(int(k)))


@dataclass
class Conditioning:
    """A model's condition sampler: ``cond(seeds)`` gives the per-sample keyword arguments of its network.

    ``prompts`` give ``{"prompt": index}``; ``classes`` ``{"class_labels": label}``; ``guidance`` (several
    scales, or a prompt file with per-prompt scales) ``{"guidance_scale": w}`` per sample.
    """

    prompts: PromptSet | None = None
    classes: ClassSet | None = None
    guidance: GuidanceSet | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # fixed keys for every sample
    default_guidance: float = 1.0  # the scale of prompts without their own (the model's scale; 1: unguided)
    base: Callable[[list[int]], dict[str, Any]] | None = None  # a model's own sampler, merged first

    def __call__(self, seeds: Sequence[int]) -> dict[str, Any]:
        seeds = list(seeds)
        out: dict[str, Any] = dict(self.base(seeds)) if self.base is not None else {}
        out.update(self.extra)
        w = None
        if self.prompts is not None:
            idx = self.prompts.draw(seeds)
            out["prompt"] = idx
            per = [self.prompts.entries[i].guidance for i in idx.tolist()]
            if any(e.guidance is not None for e in self.prompts.entries):  # whatever these seeds drew
                fallback = self.guidance.draw(seeds) if self.guidance is not None else None
                w = torch.tensor(
                    [
                        v if v is not None else (float(fallback[k]) if fallback is not None else self.default_guidance)
                        for k, v in enumerate(per)
                    ],
                    dtype=torch.float64,
                )
        if self.classes is not None:
            out["class_labels"] = self.classes.draw(seeds)
        if w is None and self.guidance is not None and len(self.guidance.scales) > 1:
            w = self.guidance.draw(seeds)
        if w is not None:
            out["guidance_scale"] = w
        return out

    def digest(self) -> str:
        return _digest(
            {
                "prompts": self.prompts.digest() if self.prompts else None,
                "classes": self.classes.digest() if self.classes else None,
                "guidance": self.guidance.digest() if self.guidance else None,
                "extra": sorted(map(str, self.extra)),
                "default_guidance": self.default_guidance,
                "base": None if self.base is None else getattr(self.base, "__qualname__", type(self.base).__name__),
            }
        )

    def describe(self) -> dict[str, Any]:
        """JSON-able summary recorded in artifacts."""
        d: dict[str, Any] = {"digest": self.digest()}
        if self.prompts is not None:
            d["prompts"] = {"source": self.prompts.source, "count": len(self.prompts), "digest": self.prompts.digest()}
        if self.classes is not None:
            d["classes"] = list(self.classes.labels)
        if self.guidance is not None:
            d["guidance"] = list(self.guidance.scales)
        return d


@dataclass(frozen=True)
class ConditionSpec:
    """What a model is asked to be conditioned on, parsed once (:meth:`parse`) and passed whole to the loaders.

    ``prompts``: the prompt set of a text-to-image pipeline; ``classes``: class labels ("0,1,2", "all" or a
    :class:`ClassSet`: the model knows how many it has); ``guidance``: one scale, or several that each seed draws
    from (a model is built at the :attr:`scale`, the set's middle).
    """

    prompts: PromptSet | None = None
    classes: str | ClassSet | None = None
    guidance: GuidanceSet | None = None

    @classmethod
    def parse(
        cls,
        prompts: PromptSet | str | os.PathLike[str] | Sequence[str] | None = None,
        classes: str | ClassSet | None = None,
        guidance: GuidanceSet | str | float | Sequence[float] | None = None,
    ) -> ConditionSpec:
        """From options as given: ``prompts`` a PromptSet, a prompt file or a list of prompts; ``classes`` as is;
        ``guidance`` a GuidanceSet or what :meth:`GuidanceSet.parse` takes (7.5, "3,7.5,12", "3:12")."""
        if isinstance(prompts, (str, os.PathLike)):
            prompts = PromptSet.read(Path(prompts))
        elif prompts is not None and not isinstance(prompts, PromptSet):
            prompts = PromptSet.of(list(prompts))
        if guidance is not None and not isinstance(guidance, GuidanceSet):
            guidance = GuidanceSet.parse(guidance)
        return cls(prompts, classes, guidance)

    @property
    def scale(self) -> float | None:
        """The one scale a model is built with: the middle of the guidance set (None: no guidance asked)."""
        return None if self.guidance is None else self.guidance.middle

    def class_set(self, num_classes: int | None, default: str | None = None) -> ClassSet | None:
        """The class labels asked for (``default`` when none were), checked against the model's ``num_classes``."""
        spec = self.classes if self.classes is not None else default
        if spec is None or isinstance(spec, ClassSet):
            return spec
        return ClassSet.parse(spec, num_classes)

    def for_role(self, role: str, eval_prompts: PromptSet | None = None) -> ConditionSpec:
        """The spec of a fit ("fit": the prompts without their held-out part), of an evaluation ("eval":
        ``eval_prompts``, else that held-out part) or of anything else ("all": the whole set)."""
        if role == "eval" and eval_prompts is not None:
            return replace(self, prompts=eval_prompts)
        if role in ("fit", "eval") and self.prompts is not None:
            return replace(self, prompts=self.prompts.split()[0 if role == "fit" else 1])
        return self
