"""Several processes: torch.distributed under ``torchrun``, and the same code path for one process.

``torchrun --nproc-per-node=K -m fewstep ...`` starts K copies of a command; :func:`init` joins them in a
process group (gloo on the CPU; on CUDA, NCCL for CUDA tensors beside gloo for CPU ones) and :func:`current`
gives every caller a :class:`Dist`: its rank, the number of processes, and collectives that are no-ops for a
single process, so teacher generation, fitting and evaluation have one code path whatever the world size.

Work is split by item: item ``i`` (a teacher shard, an evaluation seed's position) belongs to rank
``i % world`` (:meth:`Dist.mine`); a fit's noises are split in groups (noise i in group i % G, group g
belongs to rank g % world; :meth:`Dist.groups`). What ranks hold in common is gathered in item or group order
(:meth:`Dist.gather_rows`, :meth:`Dist.gather_groups`) and summed there, never in an order that depends on
the number of processes.

A collective that fails because another process of the run stopped raises :class:`PeerFailed` (a one-line
:class:`~fewstep.errors.FewstepError`); ``torchrun`` stops the other processes as soon as one exits with an
error. ``FEWSTEP_DIST_TIMEOUT`` (seconds, default 1800) bounds how long a process waits in a collective for
a peer that neither answers nor exits.

A run ends with :func:`shutdown` (every process finished: a barrier, then the group is destroyed and its worker
threads joined) and :func:`exit_process`, which ends the process without the interpreter's own shutdown while a
group's threads still run: a gloo worker thread that needs the GIL then (to release a collective's tensors)
aborts the process (SIGABRT, "terminate called without an active exception") after all its work is done.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import pickle
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import Tensor

from .errors import FewstepError

TIMEOUT_ENV = "FEWSTEP_DIST_TIMEOUT"
#: test hook: ``RANK:POINT`` makes that rank raise a FewstepError when it reaches ``fault(POINT)``
FAULT_ENV = "FEWSTEP_FAULT"
DEFAULT_TIMEOUT = 1800.0

#: bytes this process contributed to each kind of collective (and how many calls), for benchmarks
traffic: dict[str, list[int]] = {}


class PeerFailed(FewstepError):
    """A collective failed: another process of the run stopped (its own error says why) or cannot be reached."""


def env_rank() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun (or another launcher) set them in the environment."""

    def get(name: str, default: int) -> int:
        try:
            return int(os.environ.get(name, default))
        except ValueError:
            raise FewstepError(f"{name}={os.environ.get(name)!r} is not an integer") from None

    return get("RANK", 0), get("WORLD_SIZE", 1), get("LOCAL_RANK", 0)


@dataclass(frozen=True)
class Dist:
    """This process's place in the run (world 1: a single process, every collective a no-op)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: no process group

    @property
    def main(self) -> bool:
        """Rank 0: the process that prints, shows progress and writes files."""
        return self.rank == 0

    def mine(self, i: int) -> bool:
        """Does item ``i`` belong to this rank (``i % world == rank``)?"""
        return int(i) % self.world == self.rank

    def share(self, items: Sequence[Any]) -> list[Any]:
        """The items at the positions this rank owns, in order."""
        return list(items[self.rank :: self.world])

    # ------------------------------------------------------------------------------------ collectives
    def _td(self) -> Any:
        import torch.distributed as td

        return td

    def _comm_device(self, t: Tensor) -> torch.device:
        """Where a tensor travels: on its CUDA device if NCCL serves the group, else through the CPU (gloo)."""
        if t.device.type == "cuda" and self.backend is not None and "nccl" in self.backend:
            return t.device
        return torch.device("cpu")

    def _run(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RuntimeError as e:  # gloo / NCCL report a lost or failed peer as a RuntimeError
            raise PeerFailed(
                f"another process of this run stopped or failed during {what} ({_reason(e)}); its own error says why"
            ) from None

    @staticmethod
    def _count(kind: str, nbytes: int) -> None:
        c = traffic.setdefault(kind, [0, 0])
        c[0] += 1
        c[1] += int(nbytes)

    def agree(self, fn: Any) -> Any:
        """``fn()`` on every rank; a FewstepError raised on any of them is raised on all (the lowest rank's),
        so a caller that handles it (a solver that cannot run becomes a row's error) stays in step."""
        err: FewstepError | None = None
        out = None
        try:
            out = fn()
        except FewstepError as e:
            if self.world == 1:
                raise
            err = e
        if self.world > 1:
            sent = self.all_gather_object(None if err is None else (type(err), str(err)))
            first = next((e for e in sent if e is not None), None)
            if first is not None:
                if err is not None and type(err) is first[0] and str(err) == first[1]:
                    raise err
                try:
                    raise first[0](first[1])
                except TypeError:  # an error class that does not take one message
                    raise FewstepError(first[1]) from None
        return out

    def barrier(self) -> None:
        """Wait until every rank is here."""
        if self.world > 1:
            t = torch.zeros(1)
            self._run("a barrier", self._td().all_reduce, t)

    def all_reduce(self, tensors: Sequence[Tensor], op: str = "sum", kind: str = "all_reduce") -> list[Tensor]:
        """Element-wise ``op`` ("sum" or "max") of each tensor over ranks, in one message of float64 (exact
        for counts, and for sums of a few float32 values); returns new tensors in the inputs' dtypes and
        devices, the same bits on every rank. ``kind`` names the message in :data:`traffic`."""
        if self.world == 1:
            return [t.clone() for t in tensors]
        if not tensors:
            return []
        dev = self._comm_device(tensors[0])
        flat = torch.cat([t.detach().reshape(-1).to(device=dev, dtype=torch.float64) for t in tensors])
        self._count(kind, flat.numel() * flat.element_size())
        td = self._td()
        self._run("an all-reduce", td.all_reduce, flat, op=td.ReduceOp.MAX if op == "max" else td.ReduceOp.SUM)
        out, k = [], 0
        for t in tensors:
            out.append(flat[k : k + t.numel()].view(t.shape).to(device=t.device, dtype=t.dtype))
            k += t.numel()
        return out

    def sum_ints(self, values: Sequence[int]) -> list[int]:
        """Integers summed over ranks."""
        if self.world == 1:
            return [int(v) for v in values]
        return [int(v) for v in self.all_reduce([torch.tensor([float(v) for v in values], dtype=torch.float64)])[0]]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        self._count("objects", _pickled_size(obj))
        self._run("an object gather", self._td().all_gather_object, out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj if self.main else None]
        self._count("objects", _pickled_size(box[0]))
        self._run("a broadcast", self._td().broadcast_object_list, box, 0)
        return box[0]

    def gather_rows(self, local: Tensor, n: int, kind: str = "all_gather") -> Tensor:
        """The (n, ...) tensor whose rows ``rank, rank + world, ...`` each rank holds in ``local``, on every rank
        (on ``local``'s device), rows in order. ``kind`` names the message in :data:`traffic`."""
        if self.world == 1:
            return local
        K = self.world
        if n < K:  # some ranks own nothing (and may not know the row shape): objects
            parts = self.all_gather_object(local.detach().cpu())
            rows = [parts[i % K][i // K] for i in range(n)]
            like = next((p for p in parts if p.shape[0]), local.cpu())
            return (torch.stack(rows) if rows else like[:0]).to(local.device)
        m = -(-n // K)
        dev = self._comm_device(local)
        buf = torch.zeros((m, *local.shape[1:]), dtype=local.dtype, device=dev)
        buf[: local.shape[0]] = local.detach().to(dev)
        parts = [torch.empty_like(buf) for _ in range(K)]
        self._count(kind, buf.numel() * buf.element_size())
        self._run("a gather", self._td().all_gather, parts, buf)
        out = torch.empty((n, *local.shape[1:]), dtype=local.dtype, device=dev)
        for r in range(K):
            cnt = len(range(r, n, K))
            out[r::K] = parts[r][:cnt]
        return out.to(local.device)

    def groups(self, G: int) -> list[int]:
        """The groups (of ``G``; item i is in group i % G) this rank owns: g with g % world == rank."""
        return [g for g in range(G) if g % self.world == self.rank]

    def gather_groups(self, parts: Sequence[Tensor], G: int, n: int) -> Tensor:
        """All ``n`` rows in order, on every rank, from each rank's groups: row i is in group i % G, group g is
        rank g % world's, and ``parts`` holds this rank's groups (in order), each its rows in order."""
        if self.world > G:
            raise FewstepError(f"{G} groups cannot be shared by {self.world} processes")
        if G == 1 and self.world == 1:
            return parts[0]
        m = -(-n // G)
        trail, like = parts[0].shape[1:], parts[0]
        stacked = torch.zeros((len(parts), m, *trail), dtype=like.dtype, device=like.device)
        for j, p in enumerate(parts):
            stacked[j, : p.shape[0]] = p
        full = self.gather_rows(stacked, G)
        out = torch.empty((n, *trail), dtype=like.dtype, device=like.device)
        for g in range(G):
            out[g::G] = full[g][: len(range(g, n, G))]
        return out

    def sum_rows(self, t: Tensor) -> Tensor:
        """``t`` whose rows each belong to one rank (the others' rows hold zeros on it), completed on every
        rank: a sum of one value and zeros per element, so exact."""
        if self.world == 1:
            return t
        dev = self._comm_device(t)
        buf = t.detach().to(dev).clone()
        self._count("rows", buf.numel() * buf.element_size())
        self._run("an all-reduce", self._td().all_reduce, buf)
        return buf.to(t.device)


def _pickled_size(obj: Any) -> int:
    try:
        return len(pickle.dumps(obj))
    except Exception:  # noqa: BLE001 - only a statistic; the collective itself reports what cannot be sent
        return 0


def _reason(e: BaseException) -> str:
    """The gist of a backend's error: its first sentence, without the source location gloo puts first."""
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    first = re.sub(r"^\[[^\]]*\]\s*", "", first)
    return first.split(". ")[0].rstrip(".")[:160]


_CURRENT: Dist | None = None
_OWNED = False  # did init() create the process group (and so should shutdown() destroy it)?


def _adopt() -> Dist | None:
    """A Dist for a process group the caller initialised itself (torch.distributed.init_process_group)."""
    try:
        import torch.distributed as td
    except ImportError:  # pragma: no cover - torch without distributed support
        return None
    if not (td.is_available() and td.is_initialized()):
        return None
    _, _, local = env_rank()
    return Dist(td.get_rank(), td.get_world_size(), local, str(td.get_backend()))


def current() -> Dist:
    """This process's Dist: the one :func:`init` made, a process group initialised by the caller, or a single
    process. A process started by a launcher with WORLD_SIZE > 1 that has not joined yet joins here (gloo; call
    ``init(device)`` first to also use NCCL for CUDA tensors), so a script's processes never each do all the
    work."""
    if _CURRENT is None:
        adopted = _adopt()
        if adopted is not None:
            return _remember(adopted)
        if env_rank()[1] > 1:
            return init("cpu")
        return Dist()
    return _CURRENT


def _remember(d: Dist) -> Dist:
    global _CURRENT
    _CURRENT = d
    return d


def device_for(device: str | torch.device, d: Dist | None = None) -> str:
    """The device this process runs on: ``cuda`` becomes the local rank's GPU when there are several processes;
    an explicit ``cuda:N`` is refused then (every process would share one GPU)."""
    d = d or current()
    dev = torch.device(device)
    if dev.type != "cuda" or d.world == 1:
        return str(device)
    if dev.index is not None:
        raise FewstepError(
            f"--device {device} with {d.world} processes: give --device cuda, and each process takes "
            f"the GPU of its local rank"
        )
    n = torch.cuda.device_count()
    if d.local_rank >= n:
        raise FewstepError(
            f"--device cuda: local rank {d.local_rank} has no GPU of its own (this node has {n}); start at "
            f"most {n} processes per node (--nproc-per-node)"
        )
    return f"cuda:{d.local_rank}"


def init(device: str | torch.device = "cpu") -> Dist:
    """Join the run's process group (once; later calls return the same Dist). Not under a launcher (WORLD_SIZE
    unset or 1): a single process, no group. Backend: gloo, plus NCCL for CUDA tensors when ``device`` is CUDA;
    with CUDA, the local rank's GPU becomes the current device."""
    global _CURRENT, _OWNED
    if _CURRENT is not None:
        return _CURRENT
    adopted = _adopt()
    if adopted is not None:
        _CURRENT = adopted
        return adopted
    rank, world, local = env_rank()
    if world <= 1:
        _CURRENT = Dist()
        return _CURRENT
    no_td = f"WORLD_SIZE={world} but this PyTorch has no torch.distributed: run one process"
    try:
        import torch.distributed as td
    except ImportError:  # pragma: no cover
        raise FewstepError(no_td) from None
    if not td.is_available():
        raise FewstepError(no_td)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise FewstepError(f"WORLD_SIZE={world} but {name} is not set: start the processes with torchrun")
    cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
    backend = "cpu:gloo,cuda:nccl" if cuda and td.is_nccl_available() else "gloo"
    d = Dist(rank, world, local, backend)
    if cuda:
        torch.cuda.set_device(torch.device(device_for(device, d)))
    try:
        timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT))
    except ValueError:
        raise FewstepError(f"{TIMEOUT_ENV}={os.environ.get(TIMEOUT_ENV)!r} is not a number of seconds") from None
    _import_before_joining()
    try:
        td.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout))
    except (RuntimeError, ValueError) as e:
        raise FewstepError(f"could not join the other {world - 1} processes ({_reason(e)})") from None
    _CURRENT, _OWNED = d, True
    return d


def _import_before_joining() -> None:
    """Import, before the group exists, the parts of torch that would otherwise keep it alive for good.

    ``torch.distributed.nn`` takes ``group.WORLD`` as a default argument when it is first imported, and
    ``torch.optim`` imports it (through ``torch._dynamo``) when a fit makes its optimizer. Imported after the group
    was made, it holds the group: ``destroy_process_group`` then leaves the gloo backend and its worker threads
    running until the interpreter shuts down, where a worker still releasing a collective's tensors needs the GIL
    and aborts the process. Imported first, its default is None."""
    with contextlib.suppress(Exception):  # an optional part of torch: nothing of it can hold the group then
        import torch.distributed.nn  # noqa: F401  # imported for its side effect


def shutdown() -> None:
    """Leave the process group :func:`init` created, at the end of a command every process completed: a barrier
    first, so that no process leaves while another still has a collective in flight, then the group is destroyed
    (its worker threads joined). Raises :class:`PeerFailed` (and leaves the group as it is) if another process
    stopped first. A run that failed does not call this: a peer may still wait inside a collective."""
    global _CURRENT, _OWNED
    if _OWNED:
        import torch.distributed as td

        if td.is_initialized():
            if _CURRENT is not None:
                _CURRENT.barrier()
            td.destroy_process_group()
    _CURRENT, _OWNED = None, False


#: parts of the names (Linux) of the threads a process group's backends run: gloo's work loops and transport,
#: NCCL's watchdog
_BACKEND_THREADS = ("gloo", "pt_nccl")


def backend_threads() -> list[str]:
    """The names of this process's threads that a process-group backend runs, where the system tells (Linux);
    [] elsewhere."""
    names = []
    try:
        tasks = list(Path("/proc/self/task").iterdir())
    except OSError:
        return []
    for t in tasks:
        try:
            name = (t / "comm").read_text().strip()
        except OSError:  # the thread ended meanwhile
            continue
        if any(part in name for part in _BACKEND_THREADS):
            names.append(name)
    return sorted(names)


def _group_running() -> bool:
    """Does a process group still run here: initialised, or its backend's threads alive after it was left
    (something else still holds it)?"""
    td = sys.modules.get("torch.distributed")
    if td is None:  # torch.distributed never imported: no group
        return False
    if td.is_available() and td.is_initialized():
        return True
    return bool(backend_threads())


def exit_process(code: int) -> NoReturn:
    """End this process with ``code``: ``sys.exit``, unless a process group still runs (a failed run leaves its
    group; call :func:`shutdown` first after a run that completed). Then the interpreter's own shutdown is
    skipped (atexit handlers run and output is flushed first): a backend thread that needs the GIL while the
    interpreter shuts down would abort the process instead of ending it with ``code``."""
    if not _group_running():
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed stream or a reader that went away
            stream.flush()
    os._exit(code)


def fault(point: str) -> None:
    """Test hook: raise a FewstepError here if ``FEWSTEP_FAULT`` is ``<this rank>:<point>``."""
    spec = os.environ.get(FAULT_ENV)
    if spec and spec == f"{current().rank}:{point}":
        raise FewstepError(f"injected fault at {point} ({FAULT_ENV}={spec})")


__all__ = [
    "Dist",
    "FAULT_ENV",
    "PeerFailed",
    "TIMEOUT_ENV",
    "backend_threads",
    "current",
    "device_for",
    "env_rank",
    "exit_process",
    "fault",
    "init",
    "shutdown",
    "traffic",
]
