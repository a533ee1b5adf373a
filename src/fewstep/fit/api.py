"""``fewstep.fit.fit``: teacher data, one method, an artifact on disk."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..conditions import Conditioning
from ..denoiser import Denoiser
from ..errors import FewstepError
from ..seeds import check_fit_seeds, fit_seeds, val_seeds
from ..solvers.artifact import PARAMS, LoadedSolver, save_params, save_solver, solver_doc, tableau_to_doc
from ..solvers.kernel import Tableau
from ..solvers.learned import LearnedSolver
from .checkpoint import FitCheckpoint, fit_key
from ..cost import Cost, Meter, Spent
from ..distributed import current
from ..solvers.registry import classic_specs, solver_info
from .budget import Sizes, plan_for
from .config import FitConfig, plan_phases
from .loop import noise_groups
from .methods import FitOutcome, fit_solver
from .teacher import SHARD_SIZE, TeacherData, TeacherSpec, default_teacher, generate_teacher, parse_teacher


@dataclass
class FitResult:
    solver: LoadedSolver
    doc: dict[str, Any]
    outcome: FitOutcome
    path: Path | None = None


def _detach_tab(tab: Tableau) -> Tableau:
    d = lambda v: None if v is None else v.detach().clone()  # noqa: E731
    return Tableau(tab.basis, d(tab.t), d(tab.a), d(tab.B), d(tab.C), d(tab.c), tab.name, d(tab.B_mask),
                   d(tab.C_mask))


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
    checkpoint is removed once the artifact is written. What the fit cost (network evaluations,
    wall time, peak memory) is in the artifact's ``cost`` and in ``FitResult.cost``.
    Under several processes (``torchrun``; :mod:`fewstep.distributed`) the teacher, every batch and every
    validation are shared out between them, rank 0 shows the progress and writes the files, and every process
    returns the same result; with ``noise_groups=G`` any number of processes up to G gives the same fit, bit for
    bit (one process included).
    """
    cfg, spec = fit_plan(model, method, nfe, teacher, seed, device=device, **overrides)
    noise_groups(cfg.noise_groups)  # enough groups for the processes, before any work
    d = current()
    t0 = time.perf_counter()
    with Meter(model, device) as whole:
        with Meter(model, device) as teach:
            data = FitData.generate(model, cfg, spec, cache_dir, device, progress)
        folder = None if out is None else (Path(out).parent if Path(out).suffix == ".json" else Path(out))
        ckpt = None
        if folder is not None:
            ckpt = FitCheckpoint(folder, fit_key({"fingerprint": model.fingerprint(), "guidance": model.guidance_scale,
                                                  "cfg": cfg.as_dict(), "teacher": str(spec), **data.seed_ranges()}))
            if not resume:
                ckpt.remove()
        bar = _progress(progress and d.main, sum(p.steps for p in plan_phases(cfg)),
                        f"fit {cfg.method} NFE {cfg.nfe}" + (f", {d.world} processes" if d.world > 1 else ""))
        try:
            outcome = fit_solver(model, data.train, data.val, cfg, progress=bar, checkpoint=ckpt,
                                 confirm=data.confirm, already_spent=data.teacher_evals)
        finally:
            if bar is not None:
                bar.close()
    timing = {"teacher_s": round(teach.spent.wall_s, 2), "total_s": round(time.perf_counter() - t0, 2),
              "resumed_from_step": outcome.resumed_from}
    if d.world > 1:
        timing["processes"] = d.world
    teach_spent, whole_spent = run_spent(teach.spent), run_spent(whole.spent)
    cost = fit_cost(cfg, data, teach_spent, whole_spent)
    doc = d.broadcast_object(artifact_doc(model, cfg, spec, data, outcome, timing, cost))  # rank 0's, everywhere
    path = None if out is None else write_artifact(out, doc, outcome.solver, write=d.main)
    d.barrier()  # the artifact is on disk for every process before the checkpoint goes
    if ckpt is not None:
        ckpt.remove()
    return FitResult(LoadedSolver(doc, path, learned=outcome.solver), doc, outcome, path)


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


def fit_cost(cfg: FitConfig, data: "FitData", teacher: Spent, whole: Spent) -> dict[str, Any]:
    """The artifact's ``cost``: the teacher's evaluations (what its shards cost when they were made, and what
    this run computed), the fit's own, the total against the budget, wall time and peak memory."""
    fit_part = whole.cost - teacher.cost
    total = data.teacher_evals + fit_part.total
    return {"budget": cfg.budget, "total_evals": total,
            "teacher": {"forward_evals": data.teacher_evals, "computed_now": teacher.cost.forward,
                        "wall_s": round(teacher.wall_s, 3)},
            "fit": {**fit_part.as_dict(), "wall_s": round(whole.wall_s - teacher.wall_s, 3)},
            "wall_s": round(whole.wall_s, 3), "peak_memory_mib": round(whole.peak_mib, 1), "memory": whole.memory}


def fit_plan(model: Denoiser, method: str, nfe: int, teacher: str | TeacherSpec | None = None, seed: int = 0,
             device: str | torch.device = "cpu", **overrides: Any) -> tuple[FitConfig, TeacherSpec]:
    """The resolved settings and teacher :func:`fit` would use (checked, sized to a budget if one is given;
    nothing runs). Activation checkpointing is on by default on CUDA."""
    bad = set(overrides) - set(FitConfig.__dataclass_fields__)
    if bad:
        raise FewstepError(f"unknown fit settings {sorted(bad)}; valid: {', '.join(FitConfig.__dataclass_fields__)}")
    cfg = replace(FitConfig.for_method(method, nfe, seed), **overrides)
    if cfg.use_checkpoint is None:
        cfg = replace(cfg, use_checkpoint=torch.device(device).type == "cuda")
    cfg = cfg.resolved()
    spec = parse_teacher(teacher) if isinstance(teacher, str) else (teacher or default_teacher(model))
    if cfg.budget is not None:
        per_sample = solver_info(spec.solver).cost(solver_info(spec.solver).steps(spec.nfe))
        candidates = 0 if cfg.start is not None else len(classic_specs(model.schedule))
        base = Sizes(cfg.samples, cfg.val_samples, cfg.confirm_samples, cfg.batch, cfg.steps)
        sized = plan_for(cfg.budget, cfg, base, per_sample, candidates, shard=SHARD_SIZE)
        cfg = replace(cfg, samples=sized.samples, val_samples=sized.val, confirm_samples=sized.confirm,
                      batch=sized.batch, steps=sized.steps, rounds=None).resolved()
        # the loop stops before a step that would cross the budget, but the teacher comes first: whatever the
        # plan says, its noises (and the closing validations) must leave room for the fit
        closing = 2 * (cfg.val_samples + cfg.confirm_samples) * cfg.nfe
        fits = lambda n: teacher_cost(replace(cfg, samples=n), per_sample) + closing <= cfg.budget  # noqa: E731
        if not fits(cfg.samples):
            if not fits(8):
                raise FewstepError(f"--budget {cfg.budget:,} does not cover the teacher of the validation and "
                                   f"confirmation noises and 8 training noises ({per_sample} evaluations each)")
            lo, hi = 8, cfg.samples
            while hi - lo > 1:
                lo, hi = ((lo + hi) // 2, hi) if fits((lo + hi) // 2) else (lo, (lo + hi) // 2)
            cfg = replace(cfg, samples=lo, batch=min(cfg.batch, lo)).resolved()
    return cfg, spec


def same_fit(doc: dict[str, Any], model: Denoiser, method: str, nfe: int, teacher: str | TeacherSpec | None = None,
             seed: int = 0, device: str | torch.device = "cpu", **overrides: Any) -> list[str]:
    """How an artifact's recorded fit differs from the fit these arguments ask for ([] if it is the same)."""
    cfg, spec = fit_plan(model, method, nfe, teacher, seed, device=device, **overrides)
    r = seed_ranges(cfg)
    want = {**{f"fit.{k}": v for k, v in cfg.as_dict().items()}, "teacher": str(spec),
            "train_seeds": r["train"], "val_seeds": r["val"], "confirm_seeds": r["confirm"]}
    t = doc.get("teacher") or {}
    have = {**{f"fit.{k}": v for k, v in (doc.get("fit") or {}).items()}, "teacher": t.get("spec"),
            "train_seeds": t.get("train_seeds"), "val_seeds": t.get("val_seeds"), "confirm_seeds": t.get("confirm_seeds")}
    return [f"{k.removeprefix('fit.')} {have.get(k)!r} -> {v!r}" for k, v in want.items() if have.get(k) != v]


def teacher_cost(cfg: FitConfig, per_sample: int, shard_size: int = SHARD_SIZE) -> int:
    """What the teacher of ``cfg``'s noises costs made from scratch: whole shards of ``shard_size`` seeds
    (the teacher cache's unit) at ``per_sample`` evaluations each."""
    blocks = {s // shard_size for lo, hi in seed_ranges(cfg).values() for s in range(lo, hi)}
    return len(blocks) * shard_size * per_sample


def seed_ranges(cfg: FitConfig) -> dict[str, list[int]]:
    """The fit's seed blocks: {"train": [lo, hi], "val": ..., "confirm": ...} (confirmation right after validation)."""
    tr, va = fit_seeds(cfg.samples, cfg.seed), val_seeds(cfg.val_samples, cfg.seed)
    co = val_seeds(cfg.confirm_samples, cfg.seed + cfg.val_samples)
    return {"train": [tr.start, tr.stop], "val": [va.start, va.stop], "confirm": [co.start, co.stop]}


@dataclass
class FitData:
    """A fit's teacher data: training, validation and confirmation noises with the teacher's results."""

    train: TeacherData
    val: TeacherData
    confirm: TeacherData | None
    ranges: dict[str, list[int]]

    @classmethod
    def generate(cls, model: Denoiser, cfg: FitConfig, spec: TeacherSpec, cache_dir: str | Path | None,
                 device: str | torch.device, progress: bool) -> "FitData":
        r = seed_ranges(cfg)
        check_fit_seeds([r["train"][1] - 1, r["val"][1] - 1, r["confirm"][1] - 1])
        # a micro-batch that fits with gradients fits without: the teacher solves in those (else 128 at once)
        run = lambda lohi, keep=False: generate_teacher(model, range(*lohi), spec, keep_states=keep,  # noqa: E731
                                                        batch_size=cfg.micro_batch or 128,
                                                        cache_dir=cache_dir, device=device,
                                                        progress=progress).to(device)
        return cls(run(r["train"], cfg.method == "dss"), run(r["val"]),
                   run(r["confirm"]) if cfg.confirm_samples else None, r)

    def seed_ranges(self) -> dict[str, list[int]]:
        """{"train": [lo, hi], "val": ..., "confirm": ...}."""
        return self.ranges

    @property
    def teacher_evals(self) -> int:
        """What the teacher data cost when it was made (forward evaluations, counted at the network; a shard
        that validation and confirmation noises share counts once)."""
        shards: dict[str, int] = {}
        for d in (self.train, self.val, self.confirm):
            if d is not None:
                shards.update(d.shard_costs)
        return sum(shards.values())


def artifact_doc(model: Denoiser, cfg: FitConfig, spec: TeacherSpec, data: FitData, outcome: FitOutcome,
                 timing: dict[str, Any], cost: dict[str, Any]) -> dict[str, Any]:
    """The solver.json document of a finished fit."""
    solver = outcome.solver
    scales = solver.guidance
    ref = None if scales is None else scales[len(scales) // 2]
    with torch.no_grad():
        tab = _detach_tab(solver.tableau(w=ref))
        extra: dict[str, Any] = {} if scales is None else {"guidance": {
            "scales": list(scales), "reference_scale": ref,
            "tableaus": {f"{w:g}": tableau_to_doc(_detach_tab(solver.tableau(w=w))) for w in scales}}}
    if isinstance(model.cond_sampler, Conditioning):
        extra["conditions"] = model.cond_sampler.describe()
    r = data.seed_ranges()
    return solver_doc(
        tab, model.schedule, model, cfg.method,
        label=cfg.method,
        start={"solver": outcome.start, "val_rmse": outcome.start_val},
        teacher={"spec": str(spec), "train_seeds": r["train"], "val_seeds": r["val"], "confirm_seeds": r["confirm"]},
        fit=cfg.as_dict(),
        validation={"estimate": outcome.estimate,
                    "rmse_to_teacher": outcome.val, "start_rmse_to_teacher": outcome.start_val,
                    "kept_start": outcome.kept_start, "confirm_rmse_to_teacher": outcome.confirm,
                    "confirm_start_rmse_to_teacher": outcome.confirm_start,
                    "classic_ranking": [{"solver": s, "rmse_to_teacher": v} for v, s in outcome.ranking[:8]],
                    "notes": outcome.notes},
        timing=timing,
        cost=cost,
        history=outcome.state.history,
        **extra,
    )


def write_artifact(out: str | Path, doc: dict[str, Any], solver: LearnedSolver, write: bool = True) -> Path:
    """params.safetensors first (the JSON names it), then solver.json; both atomically. Returns the JSON path
    (``write=False``: only fill in ``doc`` and return the path, for a process that does not write)."""
    folder = Path(out).parent if Path(out).suffix == ".json" else Path(out)
    params = f"{Path(out).stem}.{PARAMS}" if Path(out).suffix == ".json" else PARAMS
    doc["params"] = params
    if not write:
        return Path(out) if Path(out).suffix == ".json" else Path(out) / "solver.json"
    save_params(folder / params, solver)
    return save_solver(out, doc)


def _progress(progress: bool, total: int, desc: str) -> Any:
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)
