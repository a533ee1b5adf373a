"""Progress on stderr: a live bar on a terminal, a plain line per tenth of the work without one.

A log file or a pipe gets a handful of whole lines (``teacher ...: 30% (384/1280 samples, 12 s)``) instead of
bar frames joined by carriage returns. Every progress display of fewstep comes from :func:`progress_bar`
(k-diffusion's sampler loop keeps k-diffusion's own convention).
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any


class PlainProgress:
    """The bar's interface (``update``, ``set_postfix_str``, ``total``, ``refresh``, ``close``) writing one plain
    line each time another tenth of ``total`` is done, and one at the close if the work stopped short: at most
    eleven lines, whatever the number of updates."""

    def __init__(self, total: int, desc: str, unit: str, file: IO[str]) -> None:
        self.total, self.desc, self.unit, self.file = total, desc, unit, file
        self.n, self.postfix, self._shown, self._closed, self._t0 = 0, "", 0, False, time.perf_counter()

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units done; write a line if another tenth is complete."""
        self.n += n
        tenth = min(10, 10 * self.n // self.total) if self.total > 0 else 0
        if tenth > self._shown:
            self._shown = tenth
            self._write()

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        """What the next line adds after the counts (e.g. the current loss)."""
        self.postfix = s

    def refresh(self) -> None:
        """Nothing to redraw: lines are written as tenths complete."""

    def close(self) -> None:
        """A last line if the work stopped before its total (and after some of it)."""
        if not self._closed and 0 < self.n < self.total:
            self._write(stopped=True)
        self._closed = True

    def _write(self, stopped: bool = False) -> None:
        pct = min(100, 100 * self.n // self.total) if self.total > 0 else 100
        units = self.unit if self.total == 1 else f"{self.unit}s"
        tail = f", {self.postfix}" if self.postfix else ""
        what = "stopped at " if stopped else ""
        self.file.write(
            f"{self.desc}: {what}{pct}% ({self.n}/{self.total} {units}, {time.perf_counter() - self._t0:.0f} s{tail})\n"
        )
        self.file.flush()


def is_terminal(file: IO[str]) -> bool:
    """Does ``file`` show on a terminal (where a redrawn bar makes sense)?"""
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError, OSError):  # closed or file-like without isatty
        return False


def progress_bar(total: int, desc: str, unit: str = "step", leave: bool = True, file: IO[str] | None = None) -> Any:
    """A progress display of ``total`` units on ``file`` (default stderr): tqdm's bar on a terminal (``leave``:
    keep it when done), else :class:`PlainProgress`; None when there is nothing to count."""
    if total <= 0:
        return None
    file = sys.stderr if file is None else file
    if is_terminal(file):
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover - tqdm is a declared dependency of fewstep[fit]
            return PlainProgress(total, desc, unit, file)
        return tqdm(total=total, desc=desc, unit=unit, file=file, dynamic_ncols=True, leave=leave)
    return PlainProgress(total, desc, unit, file)
