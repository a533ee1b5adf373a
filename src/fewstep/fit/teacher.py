"""Teacher data for fitting learned solvers: (noise, teacher sample[, teacher states]) per seed.

A teacher is a classic solver at a high NFE, written ``NAME@GRID:NFE`` (``unipc@logsnr:20``,
``euler@time:100``, ``ddim@time:100``, ``heun@karras:35``). :func:`generate_teacher` runs it
on the model's per-seed noise (``model.noise(seeds)``, conditioning ``model.cond_for(seeds)``)
and keeps the results in an on-disk cache, so a fit that is run again, extended to more seeds
or interrupted never redoes finished work.

Cache layout (``$FEWSTEP_CACHE``, default ``~/.cache/fewstep``)::

    <root>/teacher/<fingerprint>-<spec key>-<states|final>/
        manifest.json                     schema, model fingerprint, schedule, teacher, times,
                                          shard size and the list of finished shards
        seeds-<start>-<stop>.safetensors  one shard: seeds, noise, target[, states, times],
                                          cond.<name> for per-sample conditioning

Shards are absolute seed blocks ``[k * shard_size, (k + 1) * shard_size)``: any request maps
onto the same shards, and a request computes (or loads) the whole blocks covering its seeds
and returns exactly the seeds asked for, in order. Shards and the manifest are written to a
temporary name and moved into place with ``os.replace``, so an interrupted run loses at most
the shard in progress. A guided model (``guidance_scale`` set) gets ``-cfg<w>`` appended to
the folder name, because the model fingerprint does not cover guidance.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import Tensor

from ..denoiser import Denoiser
from ..errors import FewstepError
from ..grids import ALIASES, GRIDS
from ..sampling import build_tableau, sample
from ..seeds import check_fit_seeds
from ..solvers.registry import solver_info, solver_names

__all__ = [
    "SCHEMA_VERSION",
    "TeacherData",
    "TeacherSpec",
    "default_teacher",
    "dss_teacher",
    "generate_teacher",
    "parse_teacher",
    "teacher_cache_dir",
    "teacher_times",
]

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
F64 = torch.float64
_FORM = "expected NAME@GRID:NFE, e.g. unipc@logsnr:20 or euler@time:100"
_SPEC_RE = re.compile(r"^\s*([A-Za-z][A-Za-z0-9_]*)\s*@\s*([A-Za-z][A-Za-z0-9_]*)\s*:\s*([+-]?\d+)\s*$")


# ---------------------------------------------------------------------------------- teacher spec
@dataclass(frozen=True)
class TeacherSpec:
    """A teacher solver: a classic solver name, a named grid and an NFE budget."""

    solver: str
    grid: str
    nfe: int

    def key(self) -> str:
        """A file-name-safe identifier, e.g. ``unipc.logsnr.20``."""
        return f"{self.solver}.{self.grid}.{self.nfe}"

    def __str__(self) -> str:
        return f"{self.solver}@{self.grid}:{self.nfe}"


def parse_teacher(spec: str | TeacherSpec) -> TeacherSpec:
    """Parse ``"NAME@GRID:NFE"`` into a :class:`TeacherSpec` (grid aliases are normalised)."""
    if isinstance(spec, TeacherSpec):
        spec = str(spec)
    if not isinstance(spec, str):
        raise FewstepError(f"a teacher must be a string NAME@GRID:NFE; got {type(spec).__name__} ({_FORM})")
    m = _SPEC_RE.match(spec)
    if m is None:
        raise FewstepError(f"malformed teacher spec {spec!r}: {_FORM}")
    name, grid, nfe_s = m.group(1), m.group(2), m.group(3)
    names = solver_names()
    if name not in names:
        raise FewstepError(f"unknown teacher solver {name!r} in {spec!r}; valid: {', '.join(names)} ({_FORM})")
    grid = ALIASES.get(grid, grid)
    if grid not in GRIDS:
        raise FewstepError(f"unknown teacher grid {m.group(2)!r} in {spec!r}; valid: {', '.join(GRIDS)} ({_FORM})")
    nfe = int(nfe_s)
    if nfe < 1:
        raise FewstepError(f"teacher NFE must be a positive integer; got {nfe} in {spec!r} ({_FORM})")
    solver_info(name).steps(nfe)  # raises NFEError naming the minimum
    return TeacherSpec(name, grid, nfe)


def default_teacher(model: Denoiser) -> TeacherSpec:
    """A near-converged teacher: ``unipc3@logsnr:100`` (diffusion) or ``adams4@time:100`` (flows).

    The S4S paper uses UniPC at 20 NFE for pixel models, but what a teacher leaves unconverged
    bounds how close a learned solver gets to the true ODE solution, and 100 NFE is cheap next to
    a fit. RMSE to a converged reference on held-out noise of the zoo models: digits-eps
    unipc@logsnr:20 0.0060, unipc@logsnr:50 0.0015, unipc3@logsnr:100 0.0012; digits-flow
    euler@time:100 0.0065, adams4@time:100 0.0005. Pass ``teacher=`` to choose another.
    """
    if model.schedule.kind == "flow":
        return TeacherSpec("adams4", "time", 100)
    return TeacherSpec("unipc3", "logsnr", 100)


def dss_teacher(model: Denoiser) -> TeacherSpec:
    """The DSS paper's teacher: ``euler@time:100`` for flows, ``ddim@time:100`` for VP models.

    For a VE/EDM schedule (t = sigma) a time-uniform grid wastes almost every step at large
    sigma, so this returns ``ddim@karras:100`` there.
    """
    kind = model.schedule.kind
    if kind == "flow":
        return TeacherSpec("euler", "time", 100)
    if kind == "ve":
        return TeacherSpec("ddim", "karras", 100)
    return TeacherSpec("ddim", "time", 100)


def teacher_times(model: Denoiser, spec: str | TeacherSpec) -> Tensor:
    """Solver times (float64, decreasing) of the teacher's states: its grid's solution points (a
    multi-stage teacher's internal stages are not states), M + 1 points."""
    spec = parse_teacher(spec)
    tab = build_tableau(model, spec.solver, spec.nfe, spec.grid)
    return tab.solution_times().detach().to(F64).cpu().clone()


# ---------------------------------------------------------------------------------- teacher data
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

    def subset(self, idx: Any) -> "TeacherData":
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

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> "TeacherData":
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
        )


# ---------------------------------------------------------------------------------- cache paths
def _guidance_tag(model: Denoiser) -> str:
    w = getattr(model, "guidance_scale", None)
    return "" if w is None or float(w) == 1.0 else f"-cfg{float(w):g}"


def teacher_cache_dir(
    model: Denoiser,
    spec: str | TeacherSpec | None = None,
    keep_states: bool = False,
    cache_dir: str | os.PathLike | None = None,
    fingerprint: str | None = None,
) -> Path:
    """The folder holding ``model``'s teacher data for ``spec`` (see the module docstring)."""
    spec = default_teacher(model) if spec is None else parse_teacher(spec)
    root = cache_dir or os.environ.get("FEWSTEP_CACHE") or "~/.cache/fewstep"
    fp = fingerprint or model.fingerprint()
    mode = "states" if keep_states else "final"
    return Path(os.path.expanduser(str(root))) / "teacher" / f"{fp}-{spec.key()}-{mode}{_guidance_tag(model)}"


# ---------------------------------------------------------------------------------- file helpers
def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace`` (never half-written)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` while the manifest is read, merged and rewritten."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: writes stay atomic, merges are best effort
        yield
        return
    with open(folder / ".lock", "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    if not path.exists():
        return None
    try:
        man = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FewstepError(f"teacher cache manifest {path} is unreadable ({e}): delete the folder {folder}") from e
    if not isinstance(man, dict):
        raise FewstepError(f"teacher cache manifest {path} is not a JSON object: delete the folder {folder}")
    return man


def _write_manifest(folder: Path, man: dict[str, Any]) -> None:
    _atomic_write(folder / MANIFEST, (json.dumps(man, indent=1, sort_keys=False) + "\n").encode())


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


_CHECKED = ("schema", "fingerprint", "teacher", "keep_states", "schedule", "prediction", "sample_shape",
            "guidance_scale")


def _check_manifest(man: dict[str, Any], header: dict[str, Any], folder: Path) -> None:
    """Raise if a manifest was written for another model, teacher or layout."""
    for k in _CHECKED:
        if man.get(k) != header[k]:
            raise FewstepError(
                f"teacher cache {folder} was written for {k}={man.get(k)!r}, not {header[k]!r}: "
                f"it cannot be reused; delete that folder or pass another cache_dir"
            )
    have, want = man.get("times"), header["times"]
    if not isinstance(have, list) or len(have) != len(want) or any(
        not math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=1e-12) for a, b in zip(have, want)
    ):
        raise FewstepError(
            f"teacher cache {folder} holds states at other solver times than {header['teacher']} gives now: "
            f"delete that folder or pass another cache_dir"
        )
    s = man.get("shard_size")
    if not isinstance(s, int) or s < 1 or not isinstance(man.get("shards"), list):
        raise FewstepError(f"teacher cache manifest in {folder} is malformed: delete that folder")


def _shard_name(start: int, stop: int) -> str:
    return f"seeds-{start}-{stop}.safetensors"


def _safetensors() -> Any:
    try:
        import safetensors.torch as st
    except ImportError as e:  # pragma: no cover - safetensors is a declared dependency of fewstep[fit]
        raise FewstepError("teacher caching needs safetensors: pip install 'fewstep[fit]'") from e
    return st


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
        x = noise[i:i + batch_size].to(device)
        cond = {k: v[i:i + batch_size].to(device) for k, v in per.items()}
        cond.update(shared)
        out = sample(model, x, solver=spec.solver, nfe=spec.nfe, grid=spec.grid,
                     return_trajectory=keep_states, cond=cond)
        if keep_states:
            out, traj = out
            if len(traj) != n_times:
                raise FewstepError(
                    f"teacher {spec} returned {len(traj)} states but its grid has {n_times} times"
                )
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


def _load_shard(folder: Path, entry: dict[str, Any], start: int, stop: int, keep_states: bool) -> dict[str, Tensor] | None:
    """A finished shard's tensors, or None (with a warning) if its file is missing or damaged."""
    path = folder / str(entry.get("file", _shard_name(start, stop)))
    if not path.exists():
        return None
    try:
        t = _safetensors().load_file(str(path))
    except Exception as e:  # noqa: BLE001 - any unreadable file is recomputed
        warnings.warn(f"teacher cache shard {path} is unreadable ({e}); recomputing it", stacklevel=3)
        return None
    ok = (
        "seeds" in t and "noise" in t and "target" in t
        and torch.equal(t["seeds"], torch.arange(start, stop, dtype=torch.int64))
        and t["noise"].shape[0] == stop - start and t["target"].shape[0] == stop - start
        and (not keep_states or ("states" in t and t["states"].shape[0] == stop - start))
    )
    if not ok:
        warnings.warn(f"teacher cache shard {path} does not hold seeds [{start}, {stop}); recomputing it", stacklevel=3)
        return None
    return t


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


def _progress_bar(progress: bool, total: int, desc: str) -> Any:
    if not progress or total <= 0:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a declared dependency of fewstep[fit]
        return None
    return tqdm(total=total, desc=desc, unit="sample", file=sys.stderr, dynamic_ncols=True, leave=False)


def generate_teacher(
    model: Denoiser,
    seeds: Iterable[int],
    spec: str | TeacherSpec | None = None,
    keep_states: bool = False,
    cache_dir: str | os.PathLike | None = None,
    shard_size: int = 128,
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
        progress: show a tqdm bar on stderr while shards are computed.
    Returns:
        :class:`TeacherData` for exactly ``seeds``.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise FewstepError("generate_teacher needs at least one seed (e.g. fewstep.seeds.fit_seeds(700))")
    if not allow_eval_seeds:
        check_fit_seeds(seeds)
    for name, v in (("shard_size", shard_size), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise FewstepError(f"{name} must be a positive integer; got {v!r}")
    if model.sample_shape is None:
        raise FewstepError("this Denoiser has no sample_shape: pass sample_shape=(...) when you build it")
    spec = default_teacher(model) if spec is None else parse_teacher(spec)
    times = teacher_times(model, spec)
    fp = model.fingerprint()
    folder = teacher_cache_dir(model, spec, keep_states, cache_dir, fingerprint=fp)
    folder.mkdir(parents=True, exist_ok=True)
    w = getattr(model, "guidance_scale", None)
    header = {
        "schema": SCHEMA_VERSION,
        "kind": "fewstep-teacher-cache",
        "fingerprint": fp,
        "model": getattr(model, "name", None),
        "schedule": _jsonable(model.schedule.config()),
        "prediction": model.prediction,
        "sample_shape": list(model.sample_shape),
        "guidance_scale": None if w is None else float(w),
        "teacher": str(spec),
        "keep_states": bool(keep_states),
        "times": [float(t) for t in times.tolist()],
    }

    with _locked(folder):
        man = _read_manifest(folder)
        if man is None:
            man = dict(header, shard_size=shard_size, shared_cond={}, shards=[])
            _write_manifest(folder, man)
        else:
            _check_manifest(man, header, folder)
    size = int(man["shard_size"])
    shared: dict[str, Any] = dict(man.get("shared_cond") or {})
    entries = {int(e["seeds"][0]): e for e in man["shards"] if isinstance(e, dict) and "seeds" in e}

    blocks = sorted({s // size for s in seeds})
    loaded: dict[int, dict[str, Tensor]] = {}
    missing: list[int] = []
    for k in blocks:
        start, stop = k * size, (k + 1) * size
        e = entries.get(start)
        t = _load_shard(folder, e, start, stop, keep_states) if e is not None else None
        if t is None:
            missing.append(k)
        else:
            loaded[k] = t
    if loaded:
        k0 = next(iter(loaded))
        _check_same_model(model, loaded[k0], k0 * size, folder)

    n_cached = len(loaded)
    bar = _progress_bar(progress, len(missing) * size, f"teacher {spec}")
    try:
        for j, k in enumerate(missing):
            start, stop = k * size, (k + 1) * size
            if bar is not None:
                bar.set_postfix_str(f"shard {j + 1}/{len(missing)}, {n_cached} cached")
            with torch.no_grad():
                tensors, sh = _run_block(model, spec, list(range(start, stop)), times.numel(), keep_states,
                                         batch_size, device, bar)
            if keep_states:
                tensors["times"] = times.clone()
            name = _shard_name(start, stop)
            meta = {"teacher": str(spec), "fingerprint": fp, "seeds": f"{start}:{stop}"}
            _atomic_write(folder / name, _safetensors().save(tensors, metadata=meta))
            with _locked(folder):
                man = _read_manifest(folder) or dict(header, shard_size=size, shared_cond={}, shards=[])
                _check_manifest(man, header, folder)
                man["shards"] = [e for e in man["shards"] if int(e["seeds"][0]) != start]
                man["shards"].append({"seeds": [start, stop], "file": name})
                man["shards"].sort(key=lambda e: int(e["seeds"][0]))
                man["shared_cond"] = {**(man.get("shared_cond") or {}), **sh}
                _write_manifest(folder, man)
            shared.update(sh)
            loaded[k] = tensors
    finally:
        if bar is not None:
            bar.close()

    return _assemble(seeds, blocks, loaded, size, keep_states, times, shared, spec)


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
