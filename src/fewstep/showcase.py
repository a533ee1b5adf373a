"""What ``fewstep demo`` shows on a text-to-image or class-conditional pipeline: one picture of the same noises
and held-out prompts under the converged reference, the pipeline's own scheduler, the best classic solver and
the learned solver, all at one NFE, and the sizes that keep the demo to a few minutes on a CPU.

A pipeline's network is far costlier per evaluation than the built-in digits models, so the demo fits a small
learned solver (:data:`PIPELINE_FIT`: a short teacher, a few dozen noises) and measures it on fewer held-out
samples (:data:`PIPELINE_SAMPLES`) at the budgets users pick (:data:`PIPELINE_NFES`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .denoiser import Denoiser
from .integrations.native import OwnScheduler
from .io import image_grid, write_png, write_text
from .report import Report, best_of
from .sampling import sample
from .solvers.registry import classic_default

#: the demo's fit on a pipeline: S4S-Alt's shape at a small size (its teacher: :func:`pipeline_fit`)
PIPELINE_FIT: dict[str, Any] = {"samples": 48, "val_samples": 16, "confirm_samples": 16, "batch": 16, "steps": 40}
PIPELINE_TEACHER_NFE = 20
PIPELINE_NFES = (4, 5, 6, 8)
PIPELINE_SAMPLES = 32
PIPELINE_REFERENCE_NFE = 100


def pipeline_fit(model: Denoiser) -> dict[str, Any]:
    """The demo's fit settings for ``model``: :data:`PIPELINE_FIT` and fewstep's teacher solver for its schedule
    (a flow's or a diffusion's) at :data:`PIPELINE_TEACHER_NFE` evaluations."""
    name, grid, _ = classic_default(model.schedule, "teacher")
    return {**PIPELINE_FIT, "teacher": f"{name}@{grid}:{PIPELINE_TEACHER_NFE}"}


def is_pipeline(model: Any) -> bool:
    """Is ``model`` a whole diffusers pipeline (it has a scheduler of its own and a decoder)?"""
    return getattr(getattr(model, "family", None), "pipe", None) is not None and model.decode is not None


def picture_columns(report: Report, learned: Any, nfe: int) -> list[tuple[str, Any, int | None]]:
    """(label, solver, NFE) of the picture's rows: reference, the pipeline's own scheduler, best classic, learned."""
    ref = report.reference
    rows: list[tuple[str, Any, int | None]] = [(f"reference {ref['solver']}:{ref['nfe']}", ref["solver"], ref["nfe"])]
    rows.append((f"pipeline's own scheduler at NFE {nfe}", OwnScheduler(nfe), None))
    best = best_of([r for r in report.rows if r.grid != OwnScheduler.grid_label], "classic", nfe)
    if best is not None:
        rows.append((f"best classic {best.label} at NFE {nfe}", f"{best.solver}@{best.grid}", nfe))
    rows.append((f"learned ({getattr(learned, 'name', 'learned')}) at NFE {nfe}", learned, None))
    return rows


def decoded(model: Denoiser, seeds: Sequence[int], solver: Any, nfe: int | None) -> Tensor:
    """Decoded images (N, C, H, W) in [-1, 1] of ``seeds`` under ``solver`` (a pipeline's own scheduler too)."""
    seeds = list(seeds)
    with torch.no_grad():
        if isinstance(solver, OwnScheduler):
            x = solver.samples(model, seeds)
        else:
            got = sample(model, model.noise(seeds), solver, nfe=nfe, cond=model.cond_for(seeds))
            assert isinstance(got, Tensor)  # no trajectory asked
            x = got
        assert model.decode is not None
        return model.decode(x).float().clamp(-1, 1)


def pipeline_picture(
    model: Denoiser, seeds: Sequence[int], rows: Sequence[tuple[str, Any, int | None]], path: str | Path
) -> tuple[Path, Path]:
    """One row of decoded images per (label, solver, NFE), the same ``seeds`` (noises and prompts) in every
    column; writes ``path`` (PNG, 3x upscaled) and ``path.txt`` (the rows' labels and the columns' prompts)."""
    path = Path(path)
    images = torch.cat([decoded(model, seeds, s, n) for _, s, n in rows])
    write_png(path, image_grid(images, nrow=len(seeds)), scale=3)
    prompts = _captions(model, seeds)
    lines = [f"{path.name}: one row per solver, one column per held-out noise and prompt", "rows:"]
    lines += [f"  {i + 1}. {label}" for i, (label, _, _) in enumerate(rows)]
    if prompts:
        lines += ["columns:"] + [f"  {i + 1}. {p}" for i, p in enumerate(prompts)]
    text = path.with_suffix(".txt")
    write_text(text, "\n".join(lines) + "\n")
    return path, text


def _captions(model: Denoiser, seeds: Sequence[int]) -> list[str]:
    """Each seed's prompt (or class label), if the model draws them per seed."""
    sampler = getattr(model, "cond_sampler", None)
    prompts = getattr(sampler, "prompts", None)
    if prompts is not None:
        return [prompts.entries[int(i)].prompt for i in prompts.draw(list(seeds))]
    classes = getattr(sampler, "classes", None)
    if classes is not None:  # a DiT pipeline's names for its classes (its id2label), else the numbers
        labels = getattr(getattr(getattr(model, "family", None), "pipe", None), "labels", None) or {}
        names = {int(v): str(k) for k, v in dict(labels).items()}
        return [names.get(int(k), f"class {int(k)}") for k in classes.draw(list(seeds))]
    return []


__all__ = [
    "PIPELINE_FIT",
    "PIPELINE_NFES",
    "PIPELINE_REFERENCE_NFE",
    "PIPELINE_SAMPLES",
    "PIPELINE_TEACHER_NFE",
    "decoded",
    "is_pipeline",
    "picture_columns",
    "pipeline_fit",
    "pipeline_picture",
]
