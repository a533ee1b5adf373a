"""File output: atomic writes, sample files and PNG grids."""

from __future__ import annotations

import math
import os
import struct
import tempfile
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write text atomically (write, then rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def image_grid(x: Tensor, nrow: int | None = None, pad: int = 1) -> Tensor:
    """(B, C, H, W) in [-1, 1] -> uint8 (H', W', C) grid."""
    b, c, h, w = x.shape
    nrow = nrow or int(math.ceil(math.sqrt(b)))
    ncol = int(math.ceil(b / nrow))
    img = torch.zeros(c, ncol * (h + pad) + pad, nrow * (w + pad) + pad)
    for k in range(b):
        r, q = divmod(k, nrow)
        img[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = x[k]
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
    return len(shape) == 3 and shape[0] in (1, 3)


def save_samples(x: Tensor, out: str | os.PathLike, meta: dict[str, str] | None = None) -> list[Path]:
    """Write samples (B, ...) to a safetensors file; for image shapes also a PNG grid beside it."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.suffix != ".safetensors":
        out = out.with_suffix(".safetensors")
    with atomic_path(out) as tmp:
        save_file({"samples": x.detach().cpu().contiguous()}, str(tmp), metadata=meta or {})
    paths = [out]
    if is_image(tuple(x.shape[1:])):
        png = out.with_suffix(".png")
        write_png(png, image_grid(x.detach().cpu().float()), scale=max(1, 64 // x.shape[-1]))
        paths.append(png)
    return paths
