"""``fewstep.fit.fit``: teacher data, one method, an artifact on disk."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..denoiser import Denoiser
from ..errors import FewstepError
from ..seeds import check_fit_seeds, fit_seeds, val_seeds
from ..solvers.artifact import PARAMS, LoadedSolver, save_params, save_solver, solver_doc
from .checkpoint import FitCheckpoint, fit_key
from .loop import LOSSES
from .methods import (METHODS, FitConfig, FitOutcome, default_rounds, fit_solver, learning_rates, optimizer_name,
                      plan_phases)
from .teacher import TeacherData, TeacherSpec, default_teacher, generate_teacher, parse_teacher


@dataclass
class FitResult:
    solver: LoadedSolver
    doc: dict[str, Any]
    outcome: FitOutcome
    path: Path | None = None


def _detach_tab(tab):
    from ..solvers.kernel import Tableau

    d = lambda v: None if v is None else v.detach().clone()  # noqa: E731
    return Tableau(tab.basis, d(tab.t), d(tab.a), d(tab.B), d(tab.C), d(tab.c), tab.name, d(tab.B_mask),
                   d(tab.C_mask))


def fit(
    model: Denoiser,
    method: str = "s4s-alt",
    nfe: int = 5,
    out: str | Path | None = None,
    teacher: str | TeacherSpec | None = None,
    samples: int = 700,
    val_samples: int = 200,
    confirm_samples: int = 200,
    seed: int = 0,
    progress: bool = True,
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    resume: bool = True,
    **overrides: Any,
) -> FitResult:
    """Fit a learned solver for ``model`` at ``nfe`` evaluations and (optionally) save it to ``out``.

    Training noises come from seeds [seed, seed + samples), validation noises (checkpoint
    selection) and confirmation noises (the keep-the-start decision, made on noises the selection
    never saw) from the validation range; none overlaps the evaluation range. ``overrides`` set
    :class:`FitConfig` fields (start, k, steps, rounds, batch, lr_coef, lr_grid, relax, loss, ...).
    With ``out``, the fit's state is checkpointed in ``out`` after every validation and a fit run
    again with the same settings continues from there (``resume=False`` starts over); the
    checkpoint is removed once the artifact is written.
    """
    if method not in METHODS:
        raise FewstepError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if nfe < 1:
        raise FewstepError(f"nfe must be at least 1; got {nfe}")
    bad = set(overrides) - set(FitConfig.__dataclass_fields__)
    if bad:
        raise FewstepError(f"unknown fit settings {sorted(bad)}; valid: {', '.join(FitConfig.__dataclass_fields__)}")
    cfg = replace(FitConfig(method=method, nfe=nfe, seed=seed), **overrides)
    if cfg.method == "s4s-alt" and cfg.rounds is None:
        cfg = replace(cfg, rounds=default_rounds(cfg.steps))
    lr_coef, lr_grid = learning_rates(cfg)  # recorded in the artifact as used
    cfg = replace(cfg, lr_coef=lr_coef, lr_grid=lr_grid, optimizer=optimizer_name(cfg))
    if not callable(cfg.loss) and cfg.loss not in LOSSES:
        raise FewstepError(f"unknown loss {cfg.loss!r}; valid: {', '.join(LOSSES)} or a callable (student, target) -> (B,)")
    spec = parse_teacher(teacher) if isinstance(teacher, str) else (teacher or default_teacher(model))
    t0 = time.perf_counter()
    tr_seeds, va_seeds = fit_seeds(samples, seed), val_seeds(val_samples, seed)
    co_seeds = val_seeds(confirm_samples, seed + val_samples)  # right after the validation block
    check_fit_seeds(list(tr_seeds) + list(va_seeds) + list(co_seeds))
    keep = method == "dss"
    train = generate_teacher(model, tr_seeds, spec, keep_states=keep, cache_dir=cache_dir, device=device,
                             progress=progress)
    val = generate_teacher(model, va_seeds, spec, cache_dir=cache_dir, device=device, progress=progress)
    confirm = generate_teacher(model, co_seeds, spec, cache_dir=cache_dir, device=device,
                               progress=progress) if confirm_samples else None
    train, val = train.to(device), val.to(device)
    confirm = confirm.to(device) if confirm is not None else None
    t_teacher = time.perf_counter() - t0
    ckpt = None
    folder = None if out is None else (Path(out).parent if Path(out).suffix == ".json" else Path(out))
    if out is not None:
        key = fit_key({"fingerprint": model.fingerprint(), "guidance": model.guidance_scale, "cfg": cfg.as_dict(),
                       "teacher": str(spec), "train": [tr_seeds.start, tr_seeds.stop],
                       "val": [va_seeds.start, va_seeds.stop], "confirm": [co_seeds.start, co_seeds.stop]})
        ckpt = FitCheckpoint(folder, key)
        if not resume:
            ckpt.remove()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = sum(p.steps for p in plan_phases(cfg))
        bar = tqdm(total=total, desc=f"fit {method} NFE {nfe}", unit="step", dynamic_ncols=True)
    try:
        outcome = fit_solver(model, train, val, cfg, progress=bar, checkpoint=ckpt, confirm=confirm)
    finally:
        if bar is not None:
            bar.close()
    wall = time.perf_counter() - t0
    with torch.no_grad():
        tab = _detach_tab(outcome.solver.tableau())
    doc = solver_doc(
        tab, model.schedule, model, method,
        label=method,
        start={"solver": outcome.start, "val_rmse": outcome.start_val},
        teacher={"spec": str(spec), "train_seeds": [tr_seeds.start, tr_seeds.stop],
                 "val_seeds": [va_seeds.start, va_seeds.stop], "confirm_seeds": [co_seeds.start, co_seeds.stop]},
        fit=cfg.as_dict(),
        validation={"rmse_to_teacher": outcome.val, "start_rmse_to_teacher": outcome.start_val,
                    "kept_start": outcome.kept_start, "confirm_rmse_to_teacher": outcome.confirm,
                    "confirm_start_rmse_to_teacher": outcome.confirm_start,
                    "classic_ranking": [{"solver": s, "rmse_to_teacher": v} for v, s in outcome.ranking[:8]]},
        timing={"teacher_s": round(t_teacher, 2), "total_s": round(wall, 2), "resumed_from_step": outcome.resumed_from},
        history=outcome.state.history,
    )
    path = None
    if out is not None:
        params = f"{Path(out).stem}.{PARAMS}" if Path(out).suffix == ".json" else PARAMS
        save_params(folder / params, outcome.solver)  # first: the JSON names it
        doc["params"] = params
        path = save_solver(out, doc)
    if ckpt is not None:
        ckpt.remove()
    return FitResult(LoadedSolver(doc, path), doc, outcome, path)
