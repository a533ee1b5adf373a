"""Files: the one atomic writer (files and folders), the cache root, sample files and PNG grids, the one
tensor checksum (:func:`sha256_tensors`).

Everything fewstep writes goes through :func:`atomic_path` / :func:`atomic_dir`: written beside its
target under a temporary name, flushed to disk, given the usual permissions (0644 / 0755 under the
process's umask) and renamed into place, so a target is either the old one or the whole new one.
"""

from __future__ import annotations

import glob
import hashlib
import math
import os
import re
import shutil
import socket
import struct
import tempfile
import time
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()
FILE_MODE = 0o666 & ~_UMASK
DIR_MODE = 0o777 & ~_UMASK
#: temporaries older than this (seconds) were left by a killed process and may be removed
STALE_SECONDS = 3600.0
_HOST = socket.gethostname().replace(".", "_")
_TMP_RE = re.compile(r"^\..+\.([^.]+)-(\d+)\.[^.]+\.tmp$")


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``cache_dir``, else ``$FEWSTEP_CACHE``, else ``~/.cache/fewstep``."""
    root = cache_dir or os.environ.get("FEWSTEP_CACHE") or os.path.join("~", ".cache", "fewstep")
    return Path(os.path.expanduser(str(root)))


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The file is flushed to disk and gets the usual mode (0644 under a normal umask) before the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_HOST}-{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except OSError as e:
        if e.filename in (None, tmp):  # name the file being written, not its temporary
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        raise
    except Exception as e:  # noqa: BLE001 - safetensors reports a failed write as its own error
        m = re.search(r"os error (\d+)", str(e)) if type(e).__name__ == "SafetensorError" else None
        if m is not None:
            code = int(m.group(1))
            raise OSError(code, os.strerror(code), str(path)) from None
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes atomically (write, then rename)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write text atomically (write, then rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; swap it in for ``path`` only if the block succeeds.

    An existing ``path`` is moved aside first and removed after the swap.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, path.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{_HOST}-{os.getpid()}.", suffix=".tmp", dir=path.parent))
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    try:
        yield tmp
        for p in tmp.rglob("*"):
            p.chmod(DIR_MODE if p.is_dir() else FILE_MODE)
        tmp.chmod(DIR_MODE)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        for p in (tmp, old):
            if p.exists():
                shutil.rmtree(p, ignore_errors=True)


def _alive(host: str, pid: int) -> bool:
    """Is the process that named a temporary still running (always True for another host's)?"""
    if host != _HOST:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike, name: str = "*", max_age: float = STALE_SECONDS) -> list[Path]:
    """Remove the temporaries of :func:`atomic_path` / :func:`atomic_dir` in ``folder`` (for target ``name``,
    default all) that a killed process left: their process on this host is gone, or they are older than
    ``max_age`` seconds. Returns what was removed."""
    now, gone = time.time(), []
    for p in Path(folder).glob(f".{glob.escape(name) if name != '*' else '*'}.*.tmp"):
        m = _TMP_RE.match(p.name)
        try:
            dead = m is not None and not _alive(m.group(1), int(m.group(2)))
            if dead or now - p.stat().st_mtime > max_age:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
                gone.append(p)
        except (OSError, ValueError):
            continue
    return gone


def image_grid(x: Tensor, nrow: int | None = None, pad: int = 1) -> Tensor:
    """(B, C, H, W) in [-1, 1] -> uint8 (H', W', C) grid."""
    b, c, h, w = x.shape
    nrow = nrow or int(math.ceil(math.sqrt(b)))
    ncol = int(math.ceil(b / nrow))
    img = torch.zeros(c, ncol * (h + pad) + pad, nrow * (w + pad) + pad)
    for k in range(b):
        r, q = divmod(k, nrow)
        img[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = x[k]
    img = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return img.permute(1, 2, 0)


def write_png(path: str | os.PathLike, img: Tensor, scale: int = 1) -> None:
    """Write a uint8 (H, W, C) image (C = 1 or 3) as PNG, nearest-neighbour upscaled by ``scale``."""
    if scale > 1:
        img = img.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    h, w, c = img.shape
    if c not in (1, 3):
        raise ValueError(f"PNG needs 1 or 3 channels; got {c}")
    raw = b"".join(b"\x00" + img[r].contiguous().numpy().tobytes() for r in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0 if c == 1 else 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    with atomic_path(path) as tmp:
        tmp.write_bytes(png)


def is_image(shape: tuple[int, ...]) -> bool:
    """Is a sample of ``shape`` an image: (C, H, W) with 1 or 3 channels."""
    return len(shape) == 3 and shape[0] in (1, 3)


def save_samples(
    x: Tensor, out: str | os.PathLike, meta: dict[str, str] | None = None, decode: Any = None
) -> list[Path]:
    """Write samples (B, ...) to a safetensors file; for image shapes (or latents ``decode`` turns into
    images, e.g. a pipeline's VAE) also a PNG grid beside it."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.suffix != ".safetensors":
        out = out.with_suffix(".safetensors")
    with atomic_path(out) as tmp:
        save_file({"samples": x.detach().cpu().contiguous()}, str(tmp), metadata=meta or {})
    paths = [out]
    if decode is not None:
        with torch.no_grad():
            x = torch.cat([decode(x[k : k + 16]) for k in range(0, x.shape[0], 16)])
    if is_image(tuple(x.shape[1:])):
        png = out.with_suffix(".png")
        write_png(png, image_grid(x.detach().cpu().float()), scale=max(1, 64 // x.shape[-1]))
        paths.append(png)
    return paths


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_tensors(tensors: Mapping[str, Tensor], head: bytes = b"", layout: bool = False) -> str:
    """Hex sha256 of ``head`` then every tensor in name order: its name (with ``layout``: ``name|dtype|shape|``)
    and its raw bytes. The one tensor checksum: weights, fitted parameters, teacher shards, checkpoints."""
    h = hashlib.sha256(head)
    for k in sorted(tensors):
        v = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode() if layout else k.encode())
        h.update(v.view(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


#: the deepest nesting fewstep reads in a JSON document it did not just write (its own files nest a few levels)
MAX_JSON_DEPTH = 64


def loads_json(text: str | bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` for files fewstep did not just write: nesting deeper than ``max_depth`` (which would
    otherwise end in a RecursionError here or in whatever walks the result) raises ``json.JSONDecodeError``,
    a ValueError, like any other malformed document."""
    import json

    try:
        doc = json.loads(text)
    except RecursionError:
        doc = None
    else:
        if _json_depth(doc, max_depth) <= max_depth:
            return doc
    raise json.JSONDecodeError(f"nested deeper than {max_depth} levels", text if isinstance(text, str) else "", 0)


def _json_depth(doc: Any, limit: int) -> int:
    """How deep ``doc`` nests (lists and objects; stops counting past ``limit``), without recursion."""
    deepest, stack = 0, [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, (list, dict)):
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        stack.extend((v, depth + 1) for v in (node.values() if isinstance(node, dict) else node))
    return deepest
