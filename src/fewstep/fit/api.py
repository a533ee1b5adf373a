"""``fewstep.fit.fit``: teacher data, one method, an artifact on disk."""

from __future__ import annotations

import json
import re
import time
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from ..conditions import Conditioning
from ..cost import Cost, Meter, Spent
from ..denoiser import Denoiser
from ..distributed import current
from ..errors import FewstepError
from ..io import sha256_tensors
from ..progress import progress_bar
from ..seeds import check_fit_seeds
from ..solvers.artifact import (
    PARAMS,
    PARAMS_KIND,
    SCHEMA,
    LoadedSolver,
    load_solver,
    save_params,
    save_solver,
    solver_doc,
    tableau_to_doc,
)
from ..solvers.learned import LearnedSolver
from ..solvers.registry import classic_specs
from .budget import cap_teacher, plan_for, teacher_per_sample, with_sizes
from .checkpoint import FitCheckpoint, fit_key
from .config import FitConfig, Sizes, check_options, seed_ranges
from .loop import FitState, noise_groups
from .methods import FitOutcome, fit_solver
from .registry import method_defaults, method_info, plan_phases, resolve
from .teacher import SHARD_SIZE, TeacherData, TeacherSpec, default_teacher, generate_teacher, parse_teacher


@dataclass
class FitResult:
    """What :func:`fit` returns: the solver (as loaded from its artifact), the artifact's document, the fit's
    outcome and where the artifact is (None: not saved)."""

    solver: LoadedSolver
    doc: dict[str, Any]
    outcome: FitOutcome
    path: Path | None = None
    reused: bool = False  # ``out`` already held this finished fit, and it was loaded instead of fitted again


def fit(
    model: Denoiser,
    method: str = "s4s-alt",
    nfe: int = 5,
    out: str | Path | None = None,
    teacher: str | TeacherSpec | None = None,
    seed: int = 0,
    progress: bool = True,
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    resume: bool = True,
    reuse: bool = False,
    **overrides: Any,
) -> FitResult:
    """Fit a learned solver for ``model`` at ``nfe`` evaluations and (optionally) save it to ``out``.

    ``overrides`` set :class:`FitConfig` fields (samples, val_samples, confirm_samples, start, k, steps,
    rounds, batch, lr_coef, lr_grid, relax, loss, budget, micro_batch, ...). Training noises come from
    seeds [seed, seed + samples), validation noises (checkpoint selection) and confirmation noises (the
    keep-the-start decision, made on noises the selection never saw) from the validation range; none
    overlaps the evaluation range. With ``budget`` (network evaluations, forward + backward, teacher
    included) noises, batch and steps are sized to fit it, and the fit never spends more.
    With ``out``, the fit's state is checkpointed in ``out`` after every validation and a fit run
    again with the same settings continues from there (``resume=False`` starts over); the
    checkpoint is removed once the artifact is written. With ``reuse`` (and ``resume``), an ``out`` that already
    holds this finished fit (same model, settings, teacher and seeds) is loaded instead of fitted again
    (``FitResult.reused``). ``out`` may replace an earlier fewstep artifact, never another file (refused before
    any work), and a reader sees the old artifact or the new one whenever the fit is stopped. What the fit
    cost (network evaluations, wall time, peak memory; a resumed fit's earlier runs included) is in the
    artifact's ``cost`` and in ``FitResult.cost``.
    Under several processes (``torchrun``; :mod:`fewstep.distributed`) the teacher, every batch and every
    validation are shared out between them, rank 0 shows the progress and writes the files, and every process
    returns the same result; with ``noise_groups=G`` any number of processes up to G gives the same fit, bit for
    bit (one process included).
    """
    cfg, spec = fit_plan(model, method, nfe, teacher, seed, device=device, **overrides)
    noise_groups(cfg.execution.noise_groups)  # enough groups for the processes, before any work
    d = current()
    if d.main:
        warn_nfe(cfg, spec)
    ckpt, found = (None, None) if out is None else open_out(out, model, cfg, spec, resume, reuse)
    if found is not None:
        return found
    t0 = time.perf_counter()
    with Meter(model, device) as whole:
        with Meter(model, device) as teach:
            data = FitData.generate(model, cfg, spec, cache_dir, device, progress)
        outcome = fit_with_progress(model, cfg, data, ckpt, progress)
    timing = {
        "teacher_s": round(teach.spent.wall_s, 2),
        "total_s": round(time.perf_counter() - t0, 2),
        "resumed_from_step": outcome.resumed_from,
    }
    if d.world > 1:
        timing["processes"] = d.world
    teach_spent, whole_spent = run_spent(teach.spent), run_spent(whole.spent)
    cost = fit_cost(cfg, data, teach_spent, whole_spent, outcome.spent_before)
    doc = d.broadcast_object(artifact_doc(model, cfg, spec, data, outcome, timing, cost))  # rank 0's, everywhere
    path = None if out is None else write_artifact(out, doc, outcome.solver, write=d.main)
    d.barrier()  # the artifact is on disk for every process before the checkpoint goes
    if ckpt is not None:
        ckpt.remove()
    return FitResult(LoadedSolver(doc, path, learned=outcome.solver), doc, outcome, path)


def fit_with_progress(
    model: Denoiser, cfg: FitConfig, data: FitData, checkpoint: FitCheckpoint | None, progress: bool
) -> FitOutcome:
    """:func:`.methods.fit_solver` on ``data``, with a progress bar over the fit's steps (rank 0, if ``progress``)."""
    d = current()
    bar = (
        progress_bar(
            sum(p.steps for p in plan_phases(cfg)),
            f"fit {cfg.method} NFE {cfg.nfe}" + (f", {d.world} processes" if d.world > 1 else ""),
        )
        if progress and d.main
        else None
    )
    try:
        return fit_solver(
            model,
            data.train,
            data.val,
            cfg,
            progress=bar,
            checkpoint=checkpoint,
            confirm=data.confirm,
            already_spent=data.teacher_evals,
        )
    finally:
        if bar is not None:
            bar.close()


def open_out(
    out: str | Path, model: Denoiser, cfg: FitConfig, spec: TeacherSpec, resume: bool, reuse: bool
) -> tuple[FitCheckpoint, FitResult | None]:
    """Before any work: refuse an ``out`` that is not fewstep's to write (:func:`check_out`); the fit's checkpoint
    there (removed unless ``resume``; one of another fit is named in a warning); and with ``reuse`` and ``resume``
    the finished artifact of this fit if ``out`` holds it (else None)."""
    check_out(out)
    ckpt = FitCheckpoint(artifact_path(out).parent, *fit_identity(model, cfg, spec))
    if not resume:
        ckpt.remove()
        return ckpt, None
    found = finished_fit(out, model, cfg, spec) if reuse else None
    other = ckpt.other_fit()
    if found is not None and other is None and ckpt.path.is_file():  # killed after the artifact, before this went
        ckpt.remove()
    elif found is None and other is not None and current().main:
        warnings.warn(
            f"fit checkpoint {ckpt.path} is of another fit ({'; '.join(other[:4])}): this fit starts "
            f"from step 0 and replaces it",
            stacklevel=3,
        )
    return ckpt, found


def run_spent(spent: Spent) -> Spent:
    """What a stretch of work cost the whole run: network evaluations summed over the processes, the largest
    peak memory of any of them (this process's wall time)."""
    d = current()
    if d.world == 1:
        return spent
    c = spent.cost
    f, b, r = d.sum_ints([c.forward, c.backward, c.rows])
    peak = float(d.all_reduce([torch.tensor([spent.peak_mib], dtype=torch.float64)], op="max")[0])
    return Spent(Cost(f, b, r), spent.wall_s, peak, f"{spent.memory}, largest of {d.world} processes")


def fit_cost(cfg: FitConfig, data: FitData, teacher: Spent, whole: Spent, before: Cost | None = None) -> dict[str, Any]:
    """The artifact's ``cost``: the teacher's evaluations (what its shards cost when they were made, and what
    this run computed), the fit's own (``before``: what a resumed fit's earlier runs spent up to its checkpoint,
    also in ``fit.earlier_runs_evals``), the total against the budget, wall time and peak memory (this run's)."""
    before = before or Cost()
    fit_part = whole.cost - teacher.cost + before
    total = data.teacher_evals + fit_part.total
    return {
        "budget": cfg.execution.budget,
        "total_evals": total,
        "teacher": {
            "forward_evals": data.teacher_evals,
            "computed_now": teacher.cost.forward,
            "wall_s": round(teacher.wall_s, 3),
        },
        "fit": {
            **fit_part.as_dict(),
            "earlier_runs_evals": before.total,
            "wall_s": round(whole.wall_s - teacher.wall_s, 3),
        },
        "wall_s": round(whole.wall_s, 3),
        "peak_memory_mib": round(whole.peak_mib, 1),
        "memory": whole.memory,
    }


def fit_identity(model: Denoiser, cfg: FitConfig, spec: TeacherSpec) -> tuple[str, dict[str, Any]]:
    """(key, parts): what makes a fit this fit (model, guidance, the settings that change the result, teacher,
    seeds) and its hash, which names the fit's checkpoint."""
    parts = {
        "fingerprint": model.fingerprint(),
        "guidance": model.guidance_scale,
        "cfg": cfg.fit_settings(),
        "teacher": str(spec),
        **seed_ranges(cfg),
    }
    return fit_key(parts), parts


def warn_nfe(cfg: FitConfig, spec: TeacherSpec) -> None:
    """Warn when the student's NFE is not below the teacher's: it can copy the teacher, and a fit learns nothing."""
    if cfg.nfe >= spec.nfe:
        warnings.warn(
            f"--nfe {cfg.nfe} is not below the teacher's NFE ({spec}: {spec.nfe}): the student can match "
            f"the teacher without learning anything; fit fewer NFE, or give a finer --teacher "
            f"NAME@GRID:NFE with NFE above {cfg.nfe}",
            stacklevel=3,
        )


def fit_plan(
    model: Denoiser,
    method: str,
    nfe: int,
    teacher: str | TeacherSpec | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    **overrides: Any,
) -> tuple[FitConfig, TeacherSpec]:
    """The resolved settings and teacher :func:`fit` would use (checked, sized to a budget if one is given;
    nothing runs). Activation checkpointing is on by default on CUDA. Sizes given beside a budget (samples,
    val_samples, confirm_samples, batch, steps) are kept as given and the others sized around them; a budget
    that cannot cover them is refused, naming them."""
    check_options(overrides)
    cfg = method_defaults(method, nfe, seed).with_options(**overrides)
    if cfg.execution.use_checkpoint is None:
        cfg = cfg.with_options(use_checkpoint=torch.device(device).type == "cuda")
    cfg = resolve(cfg)
    spec = (
        parse_teacher(teacher)
        if isinstance(teacher, str)
        else (teacher or default_teacher(model, method_info(method).teacher_nfe))
    )
    if cfg.execution.budget is not None:
        fixed = {f.name for f in fields(Sizes) if overrides.get(f.name) is not None}
        cfg = sized_to_budget(model, cfg, spec, fixed)
    return cfg, spec


def sized_to_budget(model: Denoiser, cfg: FitConfig, spec: TeacherSpec, fixed: set[str]) -> FitConfig:
    """``cfg`` with the sizes its budget affords (:func:`.budget.plan_for`; the sizes named in ``fixed`` kept),
    its training noises capped to leave room for the teacher of their real seeds (:func:`.budget.cap_teacher`)."""
    limit = cfg.execution.budget
    assert limit is not None  # called for a fit with a budget
    per_sample = teacher_per_sample(spec)
    candidates = 0 if cfg.training.start is not None else len(classic_specs(model.schedule))
    shapes = method_info(cfg.method).shapes
    free = cfg.with_options(rounds=None)  # as :func:`.budget.with_sizes` will resolve it: rounds follow the steps
    sized = plan_for(limit, free, cfg.sizes, per_sample, candidates, shard=SHARD_SIZE, fixed=fixed, shapes=shapes)
    return cap_teacher(limit, with_sizes(cfg, sized), per_sample, SHARD_SIZE, fixed)


def same_fit(
    doc: dict[str, Any],
    model: Denoiser,
    method: str,
    nfe: int,
    teacher: str | TeacherSpec | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    **overrides: Any,
) -> list[str]:
    """How an artifact's recorded fit differs from the fit these arguments ask for ([] if it is the same)."""
    cfg, spec = fit_plan(model, method, nfe, teacher, seed, device=device, **overrides)
    return fit_differences(doc, cfg, spec)


def fit_differences(doc: dict[str, Any], cfg: FitConfig, spec: TeacherSpec) -> list[str]:
    """How an artifact's recorded fit differs from the fit of ``cfg`` and ``spec`` ([] if it is the same; settings
    that do not change the result, such as the micro-batch, are not compared)."""
    r = seed_ranges(cfg)
    want = {
        **{f"fit.{k}": v for k, v in cfg.fit_settings().items()},
        "teacher": str(spec),
        "train_seeds": r["train"],
        "val_seeds": r["val"],
        "confirm_seeds": r["confirm"],
    }
    t = doc.get("teacher") or {}
    have = {
        **{f"fit.{k}": v for k, v in (doc.get("fit") or {}).items()},
        "teacher": t.get("spec"),
        "train_seeds": t.get("train_seeds"),
        "val_seeds": t.get("val_seeds"),
        "confirm_seeds": t.get("confirm_seeds"),
    }
    return [f"{k.removeprefix('fit.')} {have.get(k)!r} -> {v!r}" for k, v in want.items() if have.get(k) != v]


@dataclass
class FitData:
    """A fit's teacher data: training, validation and confirmation noises with the teacher's results."""

    train: TeacherData
    val: TeacherData
    confirm: TeacherData | None
    ranges: dict[str, list[int]]  # seed_ranges(cfg): {"train": [lo, hi], "val": ..., "confirm": ...}

    @classmethod
    def generate(
        cls,
        model: Denoiser,
        cfg: FitConfig,
        spec: TeacherSpec,
        cache_dir: str | Path | None,
        device: str | torch.device,
        progress: bool,
    ) -> FitData:
        """The teacher on the seed ranges of ``cfg`` (training states too if the method's objective needs them),
        from the cache where it can."""
        r = seed_ranges(cfg)
        check_fit_seeds([r["train"][1] - 1, r["val"][1] - 1, r["confirm"][1] - 1])

        # a micro-batch that fits with gradients fits without: the teacher solves in those (else 128 at once)
        def run(lohi: list[int], keep: bool = False) -> TeacherData:
            return generate_teacher(
                model,
                range(*lohi),
                spec,
                keep_states=keep,
                batch_size=cfg.execution.micro_batch or 128,
                cache_dir=cache_dir,
                device=device,
                progress=progress,
            ).to(device)

        train = run(r["train"], method_info(cfg.method).teacher_states)
        return cls(train, run(r["val"]), run(r["confirm"]) if cfg.sizes.confirm_samples else None, r)

    @property
    def teacher_evals(self) -> int:
        """What the teacher data cost when it was made (forward evaluations, counted at the network; a shard
        that validation and confirmation noises share counts once)."""
        shards: dict[str, int] = {}
        for d in (self.train, self.val, self.confirm):
            if d is not None:
                shards.update(d.shard_costs)
        return sum(shards.values())


def artifact_doc(
    model: Denoiser,
    cfg: FitConfig,
    spec: TeacherSpec,
    data: FitData,
    outcome: FitOutcome,
    timing: dict[str, Any],
    cost: dict[str, Any],
) -> dict[str, Any]:
    """The solver.json document of a finished fit."""
    solver = outcome.solver
    scales = solver.guidance
    ref = solver.reference_scale
    with torch.no_grad():
        tab = solver.tableau(w=ref).detached()
        extra: dict[str, Any] = (
            {}
            if scales is None
            else {
                "guidance": {
                    "scales": list(scales),
                    "reference_scale": ref,
                    "tableaus": {f"{w:g}": tableau_to_doc(solver.tableau(w=w).detached()) for w in scales},
                }
            }
        )
    if isinstance(model.cond_sampler, Conditioning):
        extra["conditions"] = model.cond_sampler.describe()
    r = data.ranges
    return solver_doc(
        tab,
        model.schedule,
        model,
        cfg.method,
        label=cfg.method,
        start={"solver": outcome.start, "val_rmse": outcome.start_val},
        teacher={"spec": str(spec), "train_seeds": r["train"], "val_seeds": r["val"], "confirm_seeds": r["confirm"]},
        fit=cfg.as_dict(),
        validation={
            "estimate": outcome.estimate,
            "rmse_to_teacher": outcome.val,
            "start_rmse_to_teacher": outcome.start_val,
            "kept_start": outcome.kept_start,
            "confirm_rmse_to_teacher": outcome.confirm,
            "confirm_start_rmse_to_teacher": outcome.confirm_start,
            "classic_ranking": [{"solver": s, "rmse_to_teacher": v} for v, s in outcome.ranking[:8]],
            "notes": outcome.notes,
        },
        timing=timing,
        cost=cost,
        history=outcome.state.history,
        **extra,
    )


def artifact_path(out: str | Path) -> Path:
    """The solver.json of ``out``: ``out`` itself if it names a .json file, else ``out/solver.json``."""
    return Path(out) if Path(out).suffix == ".json" else Path(out) / "solver.json"


def params_name(out: str | Path) -> str:
    """The parameter file's name beside :func:`artifact_path`: params.safetensors (STEM.params.safetensors for
    ``out`` a .json file)."""
    return f"{Path(out).stem}.{PARAMS}" if Path(out).suffix == ".json" else PARAMS


def check_out(out: str | Path) -> None:
    """Refuse an ``out`` whose files are not fewstep's to replace: a solver.json (or the named .json) that is not a
    fewstep solver, a parameter file that is not fewstep's, a file where a folder goes. Nothing is written."""
    path = artifact_path(out)
    if Path(out).suffix != ".json" and Path(out).exists() and not Path(out).is_dir():
        raise FewstepError(f"--out {out} is a file, not a folder: give a folder for the artifact (or a new .json name)")
    if path.is_dir():
        raise FewstepError(f"--out {path} is a folder: name the solver file (e.g. {path / 'solver.json'})")
    if path.exists():
        why = _not_a_solver(path)
        if why:
            raise FewstepError(
                f"--out: {path} exists and is not a fewstep solver ({why}); it is left as it is: give "
                f"--out a new name, or move that file away"
            )
    params = path.parent / params_name(out)
    if params.exists() and not _is_params(params):
        raise FewstepError(
            f"--out: {params} exists and is not a fewstep parameter file; it is left as it is: give "
            f"--out a new name, or move that file away"
        )


def _not_a_solver(path: Path) -> str:
    """Why ``path`` is not a fewstep solver.json that a fit may replace ('' if it is one)."""
    try:
        if path.stat().st_size > 256 * 2**20:
            return "too large"
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as e:
        return "unreadable" if isinstance(e, OSError) else "not JSON"
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        return f'no "schema": "{SCHEMA}"'
    return ""


def _is_params(path: Path) -> bool:
    """Is ``path`` a fewstep solver-parameter file (by its header: nothing else is read)?"""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("kind") == PARAMS_KIND
    except Exception:  # noqa: BLE001 - whatever it is, it is not ours
        return False


def finished_fit(out: str | Path, model: Denoiser, cfg: FitConfig, spec: TeacherSpec) -> FitResult | None:
    """The finished artifact of this very fit in ``out`` (same model, guidance, conditions, settings, teacher and
    seeds; checked like any artifact), loaded; None if there is none, or another fit's, or it cannot be used."""
    path = artifact_path(out)
    if not path.is_file() or _not_a_solver(path):
        return None
    try:
        with warnings.catch_warnings():  # whatever the check would warn about, this fit is another: not reused
            warnings.simplefilter("ignore")
            loaded = load_solver(path)
            doc = loaded.doc
            if (
                fit_differences(doc, cfg, spec)
                or _plain(doc["model"].get("guidance_scale")) != _plain(model.guidance_scale)
                or _plain(doc.get("conditions")) != _plain(_conditions(model))
            ):
                return None
            loaded.check(model)
            return FitResult(loaded, doc, outcome_from_doc(loaded), path, reused=True)
    except (FewstepError, KeyError, TypeError, ValueError, AttributeError):
        return None


def _plain(v: Any) -> Any:
    """``v`` as a JSON file holds it (tuples as lists)."""
    return json.loads(json.dumps(v, default=str))


def _conditions(model: Denoiser) -> Any:
    return model.cond_sampler.describe() if isinstance(model.cond_sampler, Conditioning) else None


def outcome_from_doc(loaded: LoadedSolver) -> FitOutcome:
    """The :class:`FitOutcome` a finished artifact records (its solver from its parameter file)."""
    doc = loaded.doc
    v, history = doc["validation"], list(doc.get("history") or [])
    state = FitState(step=max((int(h["step"]) for h in history), default=0), history=history)
    ranking = [(float(r["rmse_to_teacher"]), str(r["solver"])) for r in v.get("classic_ranking") or []]
    return FitOutcome(
        loaded.learned(),
        str(doc["start"]["solver"]),
        float(doc["start"]["val_rmse"]),
        float(v["rmse_to_teacher"]),
        bool(v["kept_start"]),
        state,
        ranking,
        confirm=v.get("confirm_rmse_to_teacher"),
        confirm_start=v.get("confirm_start_rmse_to_teacher"),
        notes=list(v.get("notes") or []),
        seed=int(doc["fit"]["seed"]),
        estimate=dict(v.get("estimate") or {}),
    )


def write_artifact(out: str | Path, doc: dict[str, Any], solver: LearnedSolver, write: bool = True) -> Path:
    """Write the artifact so that a reader sees the old one or the new one whenever the writer stops: the
    parameters under a name of their own (their hash), a solver.json naming them, then the parameters under their
    usual name and a solver.json naming that, the extra file removed last; every file atomically. Returns the
    JSON path (``write=False``: only fill in ``doc`` and return the path, for a process that does not write)."""
    path, params = artifact_path(out), params_name(out)
    doc["params"] = params
    if not write:
        return path
    if path.exists():
        _swap_in(path, params, doc, solver)
    else:
        save_params(path.parent / params, solver)
    save_solver(path, doc)
    _remove_interim_params(path.parent, params)
    return path


def _swap_in(path: Path, params: str, doc: dict[str, Any], solver: LearnedSolver) -> None:
    """Replace an existing artifact's parameters without a moment where its solver.json names parameters of
    another fit: the interim pair first, then the usual parameter name (the caller writes the final JSON)."""
    interim = path.parent / _interim_name(params, solver)
    save_params(interim, solver)
    save_solver(path, {**doc, "params": interim.name})
    save_params(path.parent / params, solver)


def _interim_name(params: str, solver: LearnedSolver) -> str:
    """``params`` with the hash of the solver's parameters before its extension."""
    return f"{params.removesuffix('.safetensors')}.{sha256_tensors(solver.state_dict())[:16]}.safetensors"


def _remove_interim_params(folder: Path, params: str) -> None:
    """Remove the interim parameter files of ``params`` (:func:`_interim_name`; a writer stopped before its
    last step leaves one): called once solver.json names ``params`` itself."""
    pattern = re.compile(re.escape(params.removesuffix(".safetensors")) + r"\.[0-9a-f]{16}\.safetensors")
    for p in folder.glob("*.safetensors") if folder.is_dir() else []:
        if pattern.fullmatch(p.name):
            p.unlink(missing_ok=True)
