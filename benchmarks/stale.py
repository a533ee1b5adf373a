"""Which BENCHMARKS.md sections are older than the code they measure.

    python benchmarks/stale.py            # list stale sections; exit 1 if any
    python benchmarks/stale.py --staged   # also count changes staged for the next commit (the git hook)

Every measured section carries a marker line (invisible in the rendered page)::

    <!-- measured: 1a2b3c4 code: src/fewstep/solvers src/fewstep/fit -->

naming the commit its figures came from and, optionally, the code they measure (default:
:data:`DEFAULT_CODE`, the solvers, the fit, evaluation, sampling and the zoo recipes). A section is stale
when a later commit (or, with ``--staged``, the index) changed any of that code; a section with figures but
no marker is "unrecorded". A marker of ``stale`` (``<!-- measured: stale ... -->``) flags a section known to
need a rerun. Git is the only dependency.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_CODE = (
    "src/fewstep/solvers",
    "src/fewstep/fit",
    "src/fewstep/evaluate.py",
    "src/fewstep/sampling.py",
    "src/fewstep/grids.py",
    "src/fewstep/schedules.py",
    "src/fewstep/denoiser.py",
    "src/fewstep/zoo",
)
MARKER = re.compile(r"<!--\s*measured:\s*(\S+)(?:\s+code:\s*(.*?))?\s*-->")
HEADING = re.compile(r"^(#{2,3})\s+(.*)$")


@dataclass
class Section:
    """A BENCHMARKS.md heading and the markers under it (before the next heading of any level)."""

    title: str
    line: int
    level: int = 2
    markers: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    has_table: bool = False
    inherited: bool = False  # a ``###`` section measured with its ``##`` section's marker


def sections(text: str) -> list[Section]:
    """The ``##``/``###`` sections of ``text`` with their markers; a ``###`` section without one of its own
    is measured with its ``##`` section's."""
    out: list[Section] = []
    for i, line in enumerate(text.splitlines(), 1):
        h = HEADING.match(line)
        if h:
            out.append(Section(h.group(2).strip(), i, len(h.group(1))))
            continue
        if not out:
            continue
        m = MARKER.search(line)
        if m:
            code = tuple(m.group(2).split()) if m.group(2) else DEFAULT_CODE
            out[-1].markers.append((m.group(1), code))
        elif line.startswith("|---"):
            out[-1].has_table = True
    parent: Section | None = None
    for sec in out:
        if sec.level == 2:
            parent = sec
        elif not sec.markers and parent is not None:
            sec.markers, sec.inherited = list(parent.markers), True
    return out


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)


def last_change(root: Path, paths: tuple[str, ...]) -> str | None:
    """The newest commit touching ``paths`` (None if none does)."""
    r = _git(root, "log", "-1", "--format=%H", "--", *paths)
    return r.stdout.strip() or None


def is_ancestor(root: Path, older: str, newer: str) -> bool | None:
    """Whether ``older`` is ``newer`` or an ancestor of it (None: ``newer`` is not a known commit)."""
    if _git(root, "cat-file", "-e", f"{newer}^{{commit}}").returncode != 0:
        return None
    return _git(root, "merge-base", "--is-ancestor", older, newer).returncode == 0


def staged_paths(root: Path) -> list[str]:
    """Files staged for the next commit."""
    return _git(root, "diff", "--cached", "--name-only").stdout.split()


def touches(paths: list[str], code: tuple[str, ...]) -> list[str]:
    """The files of ``paths`` inside ``code`` (files or folders)."""
    return [p for p in paths if any(p == c or p.startswith(c.rstrip("/") + "/") for c in code)]


def check(root: Path, doc: Path, staged: bool = False) -> list[str]:
    """One line per stale or unrecorded section of ``doc`` (empty: every section is current)."""
    pending = staged_paths(root) if staged else []
    out = []
    for s in sections(doc.read_text()):
        if s.inherited:  # reported with its section
            continue
        where = f"{doc.name}:{s.line} {s.title!r}"
        if not s.markers:
            if s.has_table:
                out.append(f"{where}: unrecorded (figures without a '<!-- measured: COMMIT -->' marker)")
            continue
        for commit, code in s.markers:
            if commit == "stale":
                out.append(f"{where}: marked stale (code: {' '.join(code)})")
                continue
            last = last_change(root, code)
            ok = True if last is None else is_ancestor(root, last, commit)
            if ok is None:
                out.append(f"{where}: measured at {commit}, which is not a commit of this repository")
            elif not ok:
                files = _git(root, "diff", "--name-only", commit, last, "--", *code).stdout.split()
                shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
                out.append(f"{where}: measured at {commit}, code changed since in {last[:10]} ({shown})")
            elif touches(pending, code):
                out.append(
                    f"{where}: measured at {commit}, code changed in this commit ({', '.join(touches(pending, code))})"
                )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--doc", default=None, help="the benchmarks file (default: BENCHMARKS.md at the repo root)")
    ap.add_argument("--staged", action="store_true", help="count changes staged for the next commit")
    args = ap.parse_args()
    r = _git(Path.cwd(), "rev-parse", "--show-toplevel")
    if r.returncode != 0:
        sys.exit("stale.py: not inside a git checkout; run it from the fewstep repository")
    root = Path(r.stdout.strip())
    doc = Path(args.doc) if args.doc else root / "BENCHMARKS.md"
    if not doc.is_file():
        sys.exit(f"stale.py: {doc} not found; pass --doc PATH")
    lines = check(root, doc, staged=args.staged)
    for line in lines:
        print(line)
    if not lines:
        print(f"{doc.name}: every measured section is current")
    sys.exit(1 if lines else 0)


if __name__ == "__main__":
    main()
