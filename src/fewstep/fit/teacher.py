"""Teacher data for fitting learned solvers: (noise, teacher sample[, teacher states]) per seed.

:func:`generate_teacher` runs a teacher (:mod:`.teacher_spec`) on the model's per-seed noise
(``model.noise(seeds)``, conditioning ``model.cond_for(seeds)``) and keeps the results in the on-disk
cache of :mod:`.teacher_cache`, so a fit that is run again, extended to more seeds or interrupted
never redoes finished work, and a result never depends on how seeds are batched. A request
computes (or loads) the whole shards covering its seeds and returns exactly the seeds asked for, in
order. A guided model (``guidance_scale`` set) gets ``-cfg<w>`` appended to the folder name,
because the model fingerprint does not cover guidance.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..denoiser import Denoiser
from ..distributed import current, fault
from ..errors import FewstepError
from ..progress import progress_bar
from ..sampling import build_tableau, sample
from ..seeds import check_fit_seeds
from .teacher_cache import MANIFEST, SCHEMA_VERSION, ShardCache, cache_folder, shard_name
from .teacher_spec import TeacherSpec, default_teacher, parse_teacher, teacher_times

__all__ = [
    "MANIFEST",
    "SCHEMA_VERSION",
    "TeacherData",
    "TeacherSpec",
    "default_teacher",
    "generate_teacher",
    "parse_teacher",
    "teacher_cache_dir",
    "teacher_times",
]


@dataclass
class TeacherData:
    """Teacher pairs for K seeds (row i belongs to ``seeds[i]``).

    Attributes:
        seeds: the K seeds, in the order asked for.
        noise: (K, *sample_shape) unit starting noise (before the schedule's noise scale).
        target: (K, *sample_shape) the teacher's final sample.
        states: (K, M + 1, *sample_shape) the teacher's states at ``times``, or None.
        times: (M + 1,) float64 solver times of ``states`` (t_max first), or None.
        cond: conditioning keyword arguments: per-sample tensors with K rows (and any
            non-tensor values shared by all samples); empty for unconditional models.
        spec: the teacher that made the data.
    """

    seeds: list[int]
    noise: Tensor
    target: Tensor
    states: Tensor | None = None
    times: Tensor | None = None
    cond: dict[str, Any] = field(default_factory=dict)
    spec: TeacherSpec | None = None
    forward_evals: int = 0  # what making the shards behind these seeds cost, counted at the network
    computed_evals: int = 0  # the part of it spent by this call (the rest came from the cache)
    shard_costs: dict[str, int] = field(default_factory=dict)  # each shard behind these seeds and its cost

    def __len__(self) -> int:
        return len(self.seeds)

    def _rows(self, idx: Any) -> list[int]:
        n = len(self)
        if isinstance(idx, slice):
            return list(range(n))[idx]
        if isinstance(idx, Tensor):
            if idx.dtype == torch.bool:
                if idx.shape != (n,):
                    raise FewstepError(f"a boolean index needs shape ({n},); got {tuple(idx.shape)}")
                return torch.nonzero(idx).flatten().tolist()
            idx = idx.flatten().tolist()
        elif isinstance(idx, int) and not isinstance(idx, bool):
            idx = [idx]
        rows = []
        for i in idx:
            i = int(i)
            if not -n <= i < n:
                raise FewstepError(f"index {i} is out of range for teacher data of {n} samples")
            rows.append(i % n)
        return rows

    def subset(self, idx: Any) -> TeacherData:
        """The rows ``idx`` (int, slice, range, list or index/boolean tensor) as new TeacherData."""
        rows = self._rows(idx)
        ix = torch.tensor(rows, dtype=torch.long)

        def take(t: Tensor) -> Tensor:
            return t.index_select(0, ix.to(t.device))

        return TeacherData(
            seeds=[self.seeds[i] for i in rows],
            noise=take(self.noise),
            target=take(self.target),
            states=None if self.states is None else take(self.states),
            times=self.times,
            cond={k: take(v) if isinstance(v, Tensor) else v for k, v in self.cond.items()},
            spec=self.spec,
        )

    __getitem__ = subset

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> TeacherData:
        """Move every tensor to ``device`` (``dtype`` applies to noise, target and states only)."""

        def mv(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype) if dtype is not None else t.to(device)

        return TeacherData(
            seeds=list(self.seeds),
            noise=mv(self.noise),
            target=mv(self.target),
            states=None if self.states is None else mv(self.states),
            times=None if self.times is None else self.times.to(device),
            cond={k: v.to(device) if isinstance(v, Tensor) else v for k, v in self.cond.items()},
            spec=self.spec,
            forward_evals=self.forward_evals,
            computed_evals=self.computed_evals,
            shard_costs=dict(self.shard_costs),
        )


def _guidance_tag(model: Denoiser) -> str:
    """The folder-name tag of what the fingerprint does not cover: the guidance scale and the condition set."""
    w = model.guidance_scale
    tag = "" if w is None or float(w) == 1.0 else f"-cfg{float(w):g}"
    key = model.cond_key()
    return tag + (f"-c{key}" if key else "")


def teacher_cache_dir(
    model: Denoiser,
    spec: str | TeacherSpec | None = None,
    keep_states: bool = False,
    cache_dir: str | os.PathLike | None = None,
    fingerprint: str | None = None,
) -> Path:
    """The folder holding ``model``'s teacher data for ``spec`` (see :mod:`.teacher_cache`)."""
    spec = default_teacher(model) if spec is None else parse_teacher(spec)
    return cache_folder(cache_dir, fingerprint or model.fingerprint(), spec.key(), keep_states, _guidance_tag(model))


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


# ---------------------------------------------------------------------------------- conditioning
def _split_cond(cond: dict[str, Any], n: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Per-sample tensors (n rows) and shared JSON-able values of ``model.cond_for(seeds)``."""
    per, shared = {}, {}
    for k, v in cond.items():
        if isinstance(v, Tensor):
            if v.dim() == 0 or v.shape[0] != n:
                raise FewstepError(
                    f"cond_for returned {k!r} with shape {tuple(v.shape)} for {n} seeds: per-sample conditioning "
                    f"must have one row per seed"
                )
            per[k] = v.detach().cpu().contiguous()
        else:
            try:
                json.dumps(v)
            except TypeError as e:
                raise FewstepError(
                    f"cond_for returned {k!r} of type {type(v).__name__}: teacher caching needs tensors with one "
                    f"row per seed or JSON values"
                ) from e
            shared[k] = v
    return per, shared


# ---------------------------------------------------------------------------------- generation
def _run_block(
    model: Denoiser,
    spec: TeacherSpec,
    seeds: list[int],
    n_times: int,
    keep_states: bool,
    batch_size: int,
    device: str | torch.device,
    bar: Any,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The teacher on one block of seeds: tensors for the shard file, and shared cond values."""
    noise = model.noise(seeds)
    per, shared = _split_cond(model.cond_for(seeds), len(seeds))
    targets, states = [], []
    for i in range(0, len(seeds), batch_size):
        x = noise[i : i + batch_size].to(device)
        cond = {k: v[i : i + batch_size].to(device) for k, v in per.items()}
        cond.update(shared)
        out = sample(
            model, x, solver=spec.solver, nfe=spec.nfe, grid=spec.grid, return_trajectory=keep_states, cond=cond
        )
        if isinstance(out, tuple):  # keep_states: the trajectory too
            out, traj = out
            if len(traj) != n_times:
                raise FewstepError(f"teacher {spec} returned {len(traj)} states but its grid has {n_times} times")
            states.append(torch.stack([s.detach().cpu() for s in traj], 1))
        targets.append(out.detach().cpu())
        if bar is not None:
            bar.update(x.shape[0])
    tensors = {
        "seeds": torch.tensor(seeds, dtype=torch.int64),
        "noise": noise.detach().cpu().contiguous(),
        "target": torch.cat(targets).contiguous(),
    }
    if keep_states:
        tensors["states"] = torch.cat(states).contiguous()
    for k, v in per.items():
        tensors[f"cond.{k}"] = v
    return tensors, shared


def _check_same_model(model: Denoiser, t: dict[str, Tensor], start: int, folder: Path) -> None:
    """Cheap guard: the first cached noise (and conditioning) must be what the model draws now."""
    now = model.noise([start])[0]
    cached = t["noise"][0]
    if now.shape != cached.shape or not torch.equal(now.to(cached.dtype), cached):
        raise FewstepError(
            f"teacher cache {folder} holds other noise for seed {start} than model.noise gives now (its prior "
            f"changed?): delete that folder or pass another cache_dir"
        )
    per, _ = _split_cond(model.cond_for([start]), 1)
    for k, v in per.items():
        c = t.get(f"cond.{k}")
        if c is None or c.shape[1:] != v.shape[1:] or not torch.equal(c[:1], v.to(c.dtype)):
            raise FewstepError(
                f"teacher cache {folder} holds other conditioning {k!r} for seed {start} than model.cond_for "
                f"gives now: delete that folder or pass another cache_dir"
            )


#: seeds per teacher shard file (a new cache's; an existing cache keeps its own)
SHARD_SIZE = 128


def generate_teacher(
    model: Denoiser,
    seeds: Iterable[int],
    spec: str | TeacherSpec | None = None,
    keep_states: bool = False,
    cache_dir: str | os.PathLike | None = None,
    shard_size: int = SHARD_SIZE,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    progress: bool = True,
    allow_eval_seeds: bool = False,
) -> TeacherData:
    """Teacher samples (and optionally states) for ``seeds``, computed once and cached on disk.

    Args:
        model: the :class:`~fewstep.Denoiser` (must have ``sample_shape``); already on ``device``.
        seeds: the seeds to return, in order (fitting/validation seeds only, see
            :mod:`fewstep.seeds`; ``allow_eval_seeds=True`` lifts that guard, e.g. for a reference
            on evaluation noise).
        spec: the teacher, ``"NAME@GRID:NFE"`` or a TeacherSpec (default :func:`default_teacher`).
        keep_states: also keep the teacher's states at its grid times (DSS needs them).
        cache_dir: cache root (default ``$FEWSTEP_CACHE`` or ``~/.cache/fewstep``).
        shard_size: seeds per shard file (shards are the blocks [k * shard_size, (k+1) * shard_size));
            an existing cache keeps the shard size it was created with.
        batch_size: samples per teacher call (results do not depend on it).
        device: where the teacher runs; the returned data are on the CPU (use ``.to(device)``).
        progress: show progress on stderr while shards are computed (rank 0 only; plain lines without a terminal).
    Under several processes (:mod:`fewstep.distributed`) the missing shards are shared out (the k-th to rank
    k % world), rank 0 lists them in the manifest, and every rank returns the same data; the shards are those
    one process makes, so a run interrupted under any number of processes resumes under any other.
    Returns:
        :class:`TeacherData` for exactly ``seeds``.
    """
    seeds = _checked_seeds(seeds, allow_eval_seeds)
    for name, v in (("shard_size", shard_size), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise FewstepError(f"{name} must be a positive integer; got {v!r}")
    if model.sample_shape is None:
        raise FewstepError("this Denoiser has no sample_shape: pass sample_shape=(...) when you build it")
    spec = default_teacher(model) if spec is None else parse_teacher(spec)
    job = _Job.open(model, spec, keep_states, cache_dir, shard_size, batch_size, device)
    blocks = sorted({s // job.cache.size for s in seeds})
    loaded, missing = job.find(blocks)
    unlisted = [k for k in blocks if k not in missing and job.cache.block(k)[0] not in job.cache.entries]
    shared = job.compute(missing, loaded, len(blocks) - len(missing), progress)
    job.index(blocks, missing, unlisted, loaded, shared)
    return job.assemble(seeds, blocks, loaded, missing)


def _checked_seeds(seeds: Iterable[int], allow_eval_seeds: bool) -> list[int]:
    """``seeds`` as a list of ints: at least one, and fitting seeds unless ``allow_eval_seeds``."""
    out = [int(s) for s in seeds]
    if not out:
        raise FewstepError("generate_teacher needs at least one seed (e.g. fewstep.seeds.fit_seeds(700))")
    if not allow_eval_seeds:
        check_fit_seeds(out)
    return out


def _header(model: Denoiser, spec: TeacherSpec, keep_states: bool, times: Tensor, fp: str) -> dict[str, Any]:
    """What a teacher cache folder holds (its manifest's header): the model, the teacher and its times."""
    assert model.sample_shape is not None  # generate_teacher checked it
    w = model.guidance_scale
    return {
        "schema": SCHEMA_VERSION,
        "kind": "fewstep-teacher-cache",
        "fingerprint": fp,
        "model": model.name,
        "schedule": _jsonable(model.schedule.config()),
        "prediction": model.prediction,
        "sample_shape": list(model.sample_shape),
        "guidance_scale": None if w is None else float(w),
        "teacher": str(spec),
        "keep_states": bool(keep_states),
        "times": [float(t) for t in times.tolist()],
    }


@dataclass
class _Job:
    """One :func:`generate_teacher` call: the teacher, its cache folder and how it runs."""

    model: Denoiser
    spec: TeacherSpec
    keep_states: bool
    times: Tensor  # (M + 1,) the teacher's grid
    folder: Path
    cache: ShardCache
    batch_size: int
    device: str | torch.device

    @classmethod
    def open(
        cls,
        model: Denoiser,
        spec: TeacherSpec,
        keep_states: bool,
        cache_dir: str | os.PathLike | None,
        shard_size: int,
        batch_size: int,
        device: str | torch.device,
    ) -> _Job:
        """The job, with its cache folder opened: rank 0 first (it may rebuild the manifest), then the others."""
        times = teacher_times(model, spec)
        fp = model.fingerprint()
        folder = teacher_cache_dir(model, spec, keep_states, cache_dir, fingerprint=fp)
        header = _header(model, spec, keep_states, times, fp)
        d = current()
        cache = ShardCache(folder, header, shard_size) if d.main else None
        d.barrier()
        cache = cache or ShardCache(folder, header, shard_size)
        return cls(model, spec, keep_states, times, folder, cache, batch_size, device)

    def find(self, blocks: list[int]) -> tuple[dict[int, dict[str, Tensor]], list[int]]:
        """(the shards of ``blocks`` in the cache, loaded; the blocks missing): rank 0 looks, every rank learns
        which are missing. The first cached shard is checked against the model's noise and conditioning."""
        d = current()
        loaded: dict[int, dict[str, Tensor]] = {}
        missing: list[int] = []
        if d.main:
            for k in blocks:
                t = self.cache.load(k)
                if t is None:
                    missing.append(k)
                else:
                    loaded[k] = t
            if loaded:
                k0 = next(iter(loaded))
                _check_same_model(self.model, loaded[k0], k0 * self.cache.size, self.folder)
        return loaded, d.broadcast_object(missing)

    def compute(
        self, missing: list[int], loaded: dict[int, dict[str, Tensor]], cached: int, progress: bool
    ) -> dict[str, Any]:
        """Compute and store the ``missing`` shards (the k-th by rank k % world, one a round; each added to
        ``loaded``); the shared conditioning values they returned."""
        d, size = current(), self.cache.size
        bar = (
            progress_bar(len(missing) * size, f"teacher {self.spec}", unit="sample", leave=False)
            if progress and d.main
            else None
        )
        shared: dict[str, Any] = {}
        try:
            for r in range(-(-len(missing) // d.world)):  # rounds: every rank computes one shard per round
                j = r * d.world + d.rank
                if j < len(missing):
                    if bar is not None:
                        bar.set_postfix_str(
                            f"shard {j + 1}/{len(missing)}, {cached} cached"
                            + (f", {d.world} processes" if d.world > 1 else "")
                        )
                    k = missing[j]
                    loaded[k] = self.shard(k, shared, bar if d.world == 1 else None)
                fault(f"teacher round {r}")
                if d.world > 1:  # samples done this round by every rank: the bar shows the whole run's rate
                    done = d.sum_ints([size if j < len(missing) else 0])[0]
                    if bar is not None:
                        bar.update(done)
        finally:
            if bar is not None:
                bar.close()
        return shared

    def shard(self, k: int, shared: dict[str, Any], bar: Any) -> dict[str, Tensor]:
        """Run the teacher on block ``k`` and store it (indexed in the manifest by a single process only);
        its tensors (its shared conditioning values go into ``shared``)."""
        start, stop = self.cache.block(k)
        before = self.model.cost.forward
        with torch.no_grad():
            tensors, sh = _run_block(
                self.model,
                self.spec,
                list(range(start, stop)),
                self.times.numel(),
                self.keep_states,
                self.batch_size,
                self.device,
                bar,
            )
        if self.keep_states:
            tensors["times"] = self.times.clone()
        self.cache.store(k, tensors, sh, self.model.cost.forward - before, index=current().world == 1)
        shared.update(sh)
        return tensors

    def index(
        self,
        blocks: list[int],
        missing: list[int],
        unlisted: list[int],
        loaded: dict[int, dict[str, Tensor]],
        shared: dict[str, Any],
    ) -> None:
        """List the new (and unlisted) shards in the manifest; under several processes, share the conditioning
        values out and read the shards the other ranks made into ``loaded``."""
        d, cache = current(), self.cache
        if d.world == 1:
            if unlisted:
                cache.add_entries(unlisted, {})
            return
        for sh in d.all_gather_object(shared):  # also: every rank's shards are on disk past this point
            shared.update(sh)
        if d.main and (missing or unlisted):
            cache.add_entries(missing + unlisted, shared)
        d.barrier()
        cache.shared.update(shared)
        for k in blocks:  # every rank reads the shards the others made (checked like any cached shard)
            if k not in loaded:
                t = cache.load(k)
                if t is None:
                    raise FewstepError(
                        f"teacher cache shard {self.folder / shard_name(*cache.block(k))} that another "
                        f"process wrote cannot be read here: is {self.folder} on a file system every "
                        f"process sees?"
                    )
                loaded[k] = t

    def assemble(
        self, seeds: list[int], blocks: list[int], loaded: dict[int, dict[str, Tensor]], missing: list[int]
    ) -> TeacherData:
        """Exactly ``seeds`` from the loaded blocks, with what their shards cost (when made, and by this call)."""
        cache, size = self.cache, self.cache.size
        data = _assemble(seeds, blocks, loaded, size, self.keep_states, self.times, cache.shared, self.spec)
        per_sample = build_tableau(self.model, self.spec.solver, self.spec.nfe, self.spec.grid).N  # old shards
        data.shard_costs = {f"{self.folder.name}/{k}": cache.costs.get(k, size * per_sample) for k in blocks}
        data.forward_evals = sum(data.shard_costs.values())
        data.computed_evals = sum(cache.costs.get(k, 0) for k in missing)
        return data


def _assemble(
    seeds: Sequence[int],
    blocks: list[int],
    loaded: dict[int, dict[str, Tensor]],
    size: int,
    keep_states: bool,
    times: Tensor,
    shared: dict[str, Any],
    spec: TeacherSpec,
) -> TeacherData:
    """Gather exactly ``seeds`` (in order) from the loaded blocks."""
    pos = {k: i for i, k in enumerate(blocks)}
    ix = torch.tensor([pos[s // size] * size + (s - (s // size) * size) for s in seeds], dtype=torch.long)

    def gather(key: str) -> Tensor:
        return torch.cat([loaded[k][key] for k in blocks]).index_select(0, ix)

    cond_keys = sorted({k[5:] for k in loaded[blocks[0]] if k.startswith("cond.")})
    cond: dict[str, Any] = {k: gather(f"cond.{k}") for k in cond_keys}
    cond.update(shared)
    return TeacherData(
        seeds=list(seeds),
        noise=gather("noise"),
        target=gather("target"),
        states=gather("states") if keep_states else None,
        times=times.clone() if keep_states else None,
        cond=cond,
        spec=spec,
    )
