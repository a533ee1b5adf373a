"""The on-disk teacher cache: per-seed teacher results in self-describing shards.

Layout (cache root: ``$FEWSTEP_CACHE``, default ``~/.cache/fewstep``)::

    <root>/teacher/<fingerprint>-<spec key>-<states|final>[-cfg<w>]/
        manifest.json                     schema, model fingerprint, schedule, teacher, times,
                                          shard size and the list of finished shards (an index)
        seeds-<start>-<stop>.safetensors  one shard: seeds, noise, target[, states, times],
                                          cond.<name> for per-sample conditioning

Shards are absolute seed blocks ``[k * shard_size, (k + 1) * shard_size)``, so any request (and any
number of processes) maps onto the same shards. Each shard names in its metadata the model
fingerprint, the teacher, its seeds and a sha256 checksum of its tensors; all of it, and that every
value is finite, is checked when the shard is read: a shard that fails is recomputed with a warning
naming it. The manifest is only an index: a malformed one is rebuilt from the shards (with a
warning). Files are written under a temporary name and renamed into place; temporaries a killed
process left behind are removed on the next run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import FewstepError
from ..io import cache_root, loads_json, remove_stale_temporaries, sha256_tensors, write_bytes

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SHARD_KIND = "fewstep.teacher-shard/1"
_SHARD_RE = re.compile(r"^seeds-(\d+)-(\d+)\.safetensors$")
#: the most seeds a shard may hold (a manifest or a shard file naming more is not trusted)
MAX_SHARD_SIZE = 1 << 16
#: header fields a manifest must share with the request to be reused
CHECKED = (
    "schema",
    "fingerprint",
    "teacher",
    "keep_states",
    "schedule",
    "prediction",
    "sample_shape",
    "guidance_scale",
)


def _safetensors() -> Any:
    try:
        import safetensors.torch as st
    except ImportError as e:  # pragma: no cover - safetensors is a declared dependency of fewstep[fit]
        raise FewstepError("teacher caching needs safetensors: pip install 'fewstep[fit]'") from e
    return st


def checksum(tensors: dict[str, Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes (names in order)."""
    return sha256_tensors(tensors, layout=True)


def shard_name(start: int, stop: int) -> str:
    """The file name of the shard of seeds [start, stop)."""
    return f"seeds-{start}-{stop}.safetensors"


def cache_folder(
    root: str | os.PathLike | None, fingerprint: str, spec_key: str, keep_states: bool, tag: str = ""
) -> Path:
    """``<root>/teacher/<fingerprint>-<spec key>-<states|final><tag>``."""
    mode = "states" if keep_states else "final"
    return cache_root(root) / "teacher" / f"{fingerprint}-{spec_key}-{mode}{tag}"


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


class ShardCache:
    """One teacher cache folder: its manifest (an index) and its self-describing shards.

    ``header`` holds what identifies the data (see ``CHECKED``, plus ``times``); a manifest written for
    another header is refused with a message naming the field, a malformed one is rebuilt.
    """

    def __init__(self, folder: Path, header: dict[str, Any], shard_size: int) -> None:
        if isinstance(shard_size, bool) or not isinstance(shard_size, int) or not 1 <= shard_size <= MAX_SHARD_SIZE:
            raise FewstepError(f"shard_size must be an integer in [1, {MAX_SHARD_SIZE}]; got {shard_size!r}")
        self.folder, self.header = folder, header
        self.folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.folder)
        with _locked(self.folder):
            man = self._read_manifest(shard_size)
            if man is None:
                man = self._rebuild(shard_size)
            else:
                self._check(man)
        self.size = int(man["shard_size"])
        self.costs: dict[int, int] = {}  # forward evaluations each shard loaded or stored cost when it was made
        self.shared: dict[str, Any] = dict(man.get("shared_cond") or {})
        self.entries = {int(e["seeds"][0]) for e in man["shards"]}

    # ------------------------------------------------------------------------------- manifest
    @property
    def manifest_path(self) -> Path:
        return self.folder / MANIFEST

    def _read_manifest(self, shard_size: int) -> dict[str, Any] | None:
        """The manifest if it is there and well formed; None (with a warning) if it must be rebuilt. A shard size
        larger than ``shard_size`` (this run's) is believed only when a shard of that size is in the folder."""
        path = self.manifest_path
        if not path.exists():
            return None
        try:
            man = loads_json(path.read_text())
            problem = _malformed(man) or self._unbacked(man, shard_size)
        except (OSError, ValueError) as e:
            problem = f"unreadable ({e})"
        if problem:
            warnings.warn(f"teacher cache manifest {path} is {problem}: rebuilt from the shards", stacklevel=4)
            return None
        return man

    def _unbacked(self, man: dict[str, Any], shard_size: int) -> str | None:
        """Why the manifest's shard size cannot be believed (None if it can): the manifest is only an index, so
        a size beyond this run's must be that of a shard file in the folder."""
        size = man["shard_size"]
        if size <= shard_size or any(
            int(m.group(2)) - int(m.group(1)) == size for m in map(_SHARD_RE.match, os.listdir(self.folder)) if m
        ):
            return None
        return f"malformed (shard_size {size}, which no shard in the folder has)"

    def _check(self, man: dict[str, Any]) -> None:
        for k in CHECKED:
            if man.get(k) != self.header[k]:
                raise FewstepError(
                    f"teacher cache {self.folder} was written for {k}={man.get(k)!r}, not {self.header[k]!r}: "
                    f"it cannot be reused; delete that folder or pass another cache_dir"
                )
        have, want = man.get("times"), self.header["times"]
        if (
            not isinstance(have, list)
            or len(have) != len(want)
            or any(
                not math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=1e-12)
                for a, b in zip(have, want, strict=True)
            )
        ):
            raise FewstepError(
                f"teacher cache {self.folder} holds states at other solver times than {self.header['teacher']} gives "
                f"now: delete that folder or pass another cache_dir"
            )

    def _rebuild(self, shard_size: int) -> dict[str, Any]:
        """A new manifest listing the valid shards already in the folder (their own shard size wins)."""
        found: list[dict[str, Any]] = []
        shared: dict[str, Any] = {}
        size: int | None = None
        for p in sorted(self.folder.glob("seeds-*.safetensors")):
            m = _SHARD_RE.match(p.name)
            if m is None:
                continue
            start, stop = int(m.group(1)), int(m.group(2))
            meta = self._shard_meta(p)
            cond = None if meta is None else _shared_cond(meta)
            if cond is None or not 0 < stop - start <= MAX_SHARD_SIZE or (size is not None and stop - start != size):
                continue
            size = stop - start
            found.append({"seeds": [start, stop], "file": p.name})
            shared.update(cond)
        man = dict(
            self.header,
            shard_size=size or int(shard_size),
            shared_cond=shared,
            shards=sorted(found, key=lambda e: e["seeds"][0]),
        )
        self._write_manifest(man)
        return man

    def _write_manifest(self, man: dict[str, Any]) -> None:
        write_bytes(self.manifest_path, (json.dumps(man, indent=1) + "\n").encode())

    # ------------------------------------------------------------------------------- shards
    def block(self, k: int) -> tuple[int, int]:
        return k * self.size, (k + 1) * self.size

    def _shard_meta(self, path: Path) -> dict[str, str] | None:
        """A shard's metadata if it is a shard of this model and teacher, else None."""
        try:
            with _safetensors().safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except Exception:  # noqa: BLE001 - unreadable: not trusted
            return None
        ok = (
            meta.get("kind") == SHARD_KIND
            and meta.get("fingerprint") == self.header["fingerprint"]
            and meta.get("teacher") == self.header["teacher"]
            and meta.get("keep_states") == str(bool(self.header["keep_states"]))
        )
        return meta if ok else None

    def load(self, k: int) -> dict[str, Tensor] | None:
        """Shard k's tensors after every check, or None: missing, or bad (with a warning naming it)."""
        start, stop = self.block(k)
        path = self.folder / shard_name(start, stop)
        if start not in self.entries and not path.exists():
            return None
        if not path.exists():
            return None
        problem = None
        try:
            with _safetensors().safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                t = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118  # safe_open is not iterable
        except Exception as e:  # noqa: BLE001 - any unreadable file is recomputed
            meta, t, problem = {}, {}, f"unreadable ({str(e).splitlines()[0][:100] if str(e) else type(e).__name__})"
        if problem is None:
            problem = self._problem(meta, t, start, stop)
        if problem:
            warnings.warn(f"teacher cache shard {path} {problem}; recomputing it", stacklevel=3)
            return None
        with contextlib.suppress(
            KeyError, ValueError
        ):  # a shard that does not say what it cost: the caller predicts it
            self.costs[k] = int(meta["forward_evals"])
        # its shared conditioning, also when the manifest does not list it yet (another process wrote it)
        self.shared.update(_shared_cond(meta) or {})
        return t

    def _problem(self, meta: dict[str, str], t: dict[str, Tensor], start: int, stop: int) -> str | None:
        if meta.get("kind") != SHARD_KIND:
            return f"is not a fewstep teacher shard (kind {meta.get('kind')!r})"
        for key in ("fingerprint", "teacher"):
            if meta.get(key) != self.header[key]:
                return f"was made for {key} {meta.get(key)!r}, not {self.header[key]!r}"
        if _shared_cond(meta) is None:
            return "holds malformed shared conditioning (shared_cond)"
        if meta.get("seeds") != f"{start}:{stop}":
            return f"holds seeds {meta.get('seeds')!r}, not [{start}, {stop})"
        if meta.get("checksum") != checksum(t):
            return "does not match its checksum (edited or damaged)"
        need = ["seeds", "noise", "target"] + (["states"] if self.header["keep_states"] else [])
        if any(k not in t for k in need) or not torch.equal(t["seeds"], torch.arange(start, stop, dtype=torch.int64)):
            return f"does not hold seeds [{start}, {stop})"
        if any(t[k].shape[0] != stop - start for k in need):
            return "has tensors of the wrong length"
        bad = [k for k in need[1:] if t[k].is_floating_point() and not torch.isfinite(t[k]).all()]
        if bad:
            return f"holds NaN or inf in {', '.join(bad)}"
        return None

    def store(
        self, k: int, tensors: dict[str, Tensor], shared: dict[str, Any], forward_evals: int = 0, index: bool = True
    ) -> None:
        """Write shard k (with its metadata, its checksum and the network evaluations it cost), then list it in
        the manifest (``index=False``: leave the manifest alone; one process lists the shards of several)."""
        start, stop = self.block(k)
        name = shard_name(start, stop)
        meta = {
            "kind": SHARD_KIND,
            "teacher": self.header["teacher"],
            "fingerprint": self.header["fingerprint"],
            "seeds": f"{start}:{stop}",
            "keep_states": str(bool(self.header["keep_states"])),
            "shared_cond": json.dumps(shared),
            "checksum": checksum(tensors),
            "forward_evals": str(int(forward_evals)),
        }
        write_bytes(self.folder / name, _safetensors().save(tensors, metadata=meta))
        self.costs[k] = int(forward_evals)
        if index:
            self.add_entries([k], shared)

    def add_entries(self, blocks: list[int], shared: dict[str, Any]) -> None:
        """List finished shards in the manifest (merged under the folder's lock)."""
        with _locked(self.folder):
            man = self._read_manifest(self.size) or self._rebuild(self.size)
            self._check(man)
            have = {int(e["seeds"][0]) for e in man["shards"]}
            for k in blocks:
                start, stop = self.block(k)
                if start not in have:
                    man["shards"].append({"seeds": [start, stop], "file": shard_name(start, stop)})
            man["shards"].sort(key=lambda e: int(e["seeds"][0]))
            man["shared_cond"] = {**(man.get("shared_cond") or {}), **shared}
            self._write_manifest(man)
        self.entries |= {self.block(k)[0] for k in blocks}
        self.shared.update(shared)


def _malformed(man: Any) -> str | None:
    """What is wrong with a manifest's structure (None if nothing)."""
    if not isinstance(man, dict):
        return "not a JSON object"
    s = man.get("shard_size")
    if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= MAX_SHARD_SIZE:
        return f"malformed (shard_size {str(s)[:40]}; at most {MAX_SHARD_SIZE})"
    times = man.get("times")
    if not isinstance(times, list) or not all(_finite_number(v) for v in times):
        return "malformed (times must be a list of numbers)"
    shards = man.get("shards")
    if not isinstance(shards, list):
        return f"malformed (shards {shards!r})"
    for e in shards:
        seeds = e.get("seeds") if isinstance(e, dict) else None
        if not (
            isinstance(seeds, list)
            and len(seeds) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in seeds)
            and seeds[1] - seeds[0] == s
            and seeds[0] % s == 0
        ):
            return f"malformed (shard entry {e!r})"
    if not isinstance(man.get("shared_cond", {}), dict):
        return "malformed (shared_cond)"
    return None


def _finite_number(v: Any) -> bool:
    """A JSON number that is a finite float (not a bool, not an integer beyond float range)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _shared_cond(meta: dict[str, str]) -> dict[str, Any] | None:
    """A shard's shared conditioning (its ``shared_cond`` metadata, a JSON object); None if malformed."""
    try:
        v = loads_json(meta.get("shared_cond") or "{}")
    except ValueError:
        return None
    return v if isinstance(v, dict) else None
