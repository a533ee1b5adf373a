"""Measurement reports: typed rows, the choice of the best classic and best learned rows, and every
rendering of them (plain text, rich, markdown, JSON).

``evaluate`` returns a :class:`Report`; its JSON (``Report.as_dict``) is what ``fewstep eval --json`` prints:
``{"model", "nfe", "samples", "seed", "reference": {"solver", "nfe", "self_error"}, "results": [...],
("metrics": {...})}``. A result row is ``{"solver", "grid", "nfe", "rmse", "rmse_sem", "seconds",
("error"), (metric columns), ("role": "reference")}``; a learned row has ``"grid": "learned"``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import FewstepError
from .metrics.suite import DISTRIBUTION
from .metrics.suite import ROW_KEYS as METRIC_KEYS

RowKind = Literal["reference", "classic", "learned"]

#: metric columns: (row key, header, format)
METRIC_COLUMNS = (
    ("fd", "FD", ".4g"),
    ("kid", "KID", ".3g"),
    ("fd_ref", "FD to ref", ".4g"),
    ("psnr", "PSNR", ".2f"),
    ("swd", "SWD", ".4g"),
    ("loglik", "loglik", ".4g"),
)
#: what the "FD to ref" column measures (a caption line under tables that show it)
FD_REF_NOTE = "FD to ref: to the reference solve's samples from the same seeds"
_BASE = ("solver", "grid", "nfe", "rmse", "rmse_sem", "seconds")


@dataclass
class Row:
    """One solver's measurements on the evaluation noise (or the reference solve's own)."""

    kind: RowKind
    solver: str
    grid: str | None
    nfe: int
    rmse: float | None = None
    rmse_sem: float | None = None
    seconds: float | None = None
    error: str | None = None
    metrics: dict[str, float | None] | None = None  # None: metrics were not measured
    artifact: str | None = None  # a learned row's artifact folder (rows of one method tell apart by it)

    @property
    def label(self) -> str:
        return f"{self.solver}@{self.grid}" if self.kind == "classic" else self.solver

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "solver": self.solver,
            "grid": self.grid,
            "nfe": self.nfe,
            "rmse": self.rmse,
            "rmse_sem": self.rmse_sem,
            "seconds": self.seconds,
        }
        if self.error:
            d["error"] = self.error
        if self.metrics is not None:
            d.update({k: self.metrics.get(k) for k in METRIC_KEYS})
        if self.kind == "reference":
            d["role"] = "reference"
        if self.artifact is not None:
            d["artifact"] = self.artifact
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Row:
        kind: RowKind = (
            "reference" if d.get("role") == "reference" else ("learned" if d.get("grid") == "learned" else "classic")
        )
        has = any(k in d for k in METRIC_KEYS)
        return cls(
            kind,
            d["solver"],
            d.get("grid"),
            int(d["nfe"]),
            d.get("rmse"),
            d.get("rmse_sem"),
            d.get("seconds"),
            d.get("error"),
            {k: d.get(k) for k in METRIC_KEYS} if has else None,
            d.get("artifact"),
        )

    def get(self, key: str) -> Any:
        """A base field or a metric by its JSON key (None where not measured)."""
        if key in _BASE or key == "error":
            return getattr(self, key)
        return (self.metrics or {}).get(key)


@dataclass
class Report:
    """What ``evaluate`` measured: rows (the reference row first when metrics were asked), the reference."""

    model: str
    nfe: int | list[int]
    samples: int
    seed: int
    reference: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    metrics: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # other top-level keys (e.g. "artifact")

    def as_dict(self) -> dict[str, Any]:
        d = {
            "model": self.model,
            "nfe": self.nfe,
            "samples": self.samples,
            "seed": self.seed,
            "reference": self.reference,
            "results": [r.as_dict() for r in self.rows],
        }
        if self.metrics is not None:
            d["metrics"] = self.metrics
        d.update(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Report:
        known = {"model", "nfe", "samples", "seed", "reference", "results", "metrics"}
        return cls(
            d["model"],
            d["nfe"],
            d["samples"],
            d["seed"],
            d["reference"],
            [Row.from_dict(r) for r in d["results"]],
            d.get("metrics"),
            {k: v for k, v in d.items() if k not in known},
        )

    @property
    def nfes(self) -> list[int]:
        return list(self.nfe) if isinstance(self.nfe, list) else [int(self.nfe)]

    def reference_row(self) -> Row | None:
        return next((r for r in self.rows if r.kind == "reference"), None)

    def best_classic(self, nfe: int) -> Row | None:
        return best_of(self.rows, "classic", nfe)

    def best_learned(self, nfe: int) -> Row | None:
        return best_of(self.rows, "learned", nfe)

    def sorted_by_rmse(self) -> Report:
        """The same report with rows in RMSE order (rows without an RMSE last)."""
        rows = sorted(self.rows, key=lambda r: math.inf if r.rmse is None else r.rmse)
        return Report(self.model, self.nfe, self.samples, self.seed, self.reference, rows, self.metrics, self.extra)


def best_of(rows: Iterable[Row], kind: RowKind, nfe: int) -> Row | None:
    """The lowest-RMSE row of ``kind`` at exactly ``nfe`` evaluations (the classic one is chosen over every
    solver and grid on the same held-out noises the learned ones are scored on)."""
    scored = [(r.rmse, r) for r in rows if r.kind == kind and r.nfe == nfe and r.rmse is not None]
    return min(scored, key=lambda p: p[0])[1] if scored else None


# ----------------------------------------------------------------------------- rendering
def _columns(rows: Sequence[Row]) -> list[tuple[str, str, str]]:
    return [c for c in METRIC_COLUMNS if any(r.get(c[0]) is not None for r in rows)]


def _visible(rows: Sequence[Row], top: int | None) -> list[Row]:
    """Rows a table shows: at most ``top`` classic rows per NFE; learned and reference rows always."""
    out: list[Row] = []
    shown: dict[int, int] = {}
    for r in rows:
        if r.kind == "classic":
            shown[r.nfe] = shown.get(r.nfe, 0) + 1
            if top is not None and shown[r.nfe] > top:
                continue
        out.append(r)
    return out


def _caption(rep: Report, cols: Sequence[tuple[str, str, str]]) -> list[str]:
    ref = rep.reference
    lines = [f"reference {ref['solver']} at {ref['nfe']} NFE, self-error {ref['self_error']:.3g}"]
    info = rep.metrics or {}
    if info.get("data_reference"):
        names = ", ".join(h for k, h, _ in cols if k in DISTRIBUTION) or "FD/KID/SWD"
        feat = f"; features: {info['feature']}" if info.get("feature") else ""
        lines.append(f"{names} against {info['data_reference']['source']}{feat}; the reference row is the floor")
    if any(k == "fd_ref" for k, _, _ in cols):
        lines.append(FD_REF_NOTE)
    return lines


def render_plain(rep: Report, top: int | None = None) -> str:
    """Plain-text table (when rich is not installed, and in tests). The reference row (the floor) comes first."""
    cols = _columns(rep.rows)
    gw = max([11] + [len(str(r.grid)) + 2 for r in rep.rows])
    lines = [f"model {rep.model}  samples {rep.samples}  seeds from {rep.seed}", *_caption(rep, cols)]
    lines.append(
        f"{'solver':<14}{'grid':<{gw}}{'nfe':>4}{'rmse':>12}{'± sem':>10}" + "".join(f"{h:>10}" for _, h, _ in cols)
    )
    for r in _visible(rep.rows, top):
        head = f"{r.solver:<14}{str(r.grid):<{gw}}{r.nfe:>4}"
        if r.rmse is None:
            lines.append(f"{head}{'—':>12}  {(r.error or '')[:60]}")
            continue
        extra = "".join(f"{'—':>10}" if r.get(k) is None else f"{r.get(k):>10{fmt}}" for k, _, fmt in cols)
        lines.append(f"{head}{r.rmse:>12.4g}{r.rmse_sem:>10.2g}{extra}")
    return "\n".join(lines)


def render_rich(rep: Report, top: int | None = None, file: Any = None) -> None:
    """Print the table with rich (falls back to :func:`render_plain` without it). Every string in it is printed
    as text: a label, model spec, path or error holding ``[...]`` is never read as console markup."""
    try:
        from rich.console import Console, JustifyMethod
        from rich.table import Table
        from rich.text import Text
    except ImportError:
        print(render_plain(rep, top), file=file or sys.stdout)
        return
    cols = _columns(rep.rows)
    table = Table(
        title=Text(
            f"{rep.model}: RMSE to reference on {rep.samples} held-out samples (seeds from {rep.seed})",
            style="table.title",
        ),
        caption=Text("; ".join(_caption(rep, cols)), style="table.caption"),
    )
    base: tuple[tuple[str, JustifyMethod], ...] = (
        ("solver", "left"),
        ("grid", "left"),
        ("NFE", "right"),
        ("RMSE", "right"),
        ("± sem", "right"),
    )
    for col, just in base:
        table.add_column(col, justify=just)
    for _, head, _ in cols:
        table.add_column(head, justify="right")
    for r in _visible(rep.rows, top):
        name = "reference (floor)" if r.kind == "reference" else r.solver
        cells = [Text(str(name)), Text(str(r.grid)), Text(str(r.nfe))]
        if r.rmse is None:
            table.add_row(*cells, Text("—"), Text((r.error or "")[:50]))
            continue
        extra = [Text("—" if r.get(k) is None else format(r.get(k), fmt)) for k, _, fmt in cols]
        table.add_row(
            *cells,
            Text(f"{r.rmse:.4g}"),
            Text(f"{r.rmse_sem:.2g}"),
            *extra,
            style={"reference": "green", "learned": "bold red"}.get(r.kind),
        )
    out = file or sys.stdout
    Console(file=out, width=None if out.isatty() else 200).print(table)


def bench_rows(rep: Report, nfes: Sequence[int]) -> list[dict[str, Any]]:
    """Per NFE: the best classic and best learned rows (JSON) and their RMSE ratio."""
    out = []
    for n in nfes:
        b, lrn = rep.best_classic(int(n)), rep.best_learned(int(n))
        ratio = None
        if b is not None and lrn is not None:
            assert b.rmse is not None and lrn.rmse is not None  # best_of picks rows with an RMSE only
            ratio = lrn.rmse / b.rmse
        out.append(
            {
                "nfe": int(n),
                "best_classic": None if b is None else b.as_dict(),
                "best_learned": None if lrn is None else lrn.as_dict(),
                "ratio": ratio,
            }
        )
    return out


def render_bench_markdown(bench: dict[str, Any]) -> str:
    """Markdown table of a bench: per NFE the best classic and best learned solver, RMSE (and FD/SWD), ratio."""
    rep = Report.from_dict(bench["report"])
    extra = [k for k in ("fd", "swd") if any(r.get(k) is not None for r in rep.rows)]
    head = (
        "| NFE | best classic | RMSE | "
        + "".join(f"{k.upper()} | " for k in extra)
        + "best learned | RMSE | "
        + "".join(f"{k.upper()} | " for k in extra)
        + "learned / classic (RMSE) |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in bench["rows"]:
        cells = [str(r["nfe"])]
        for x in (r["best_classic"], r["best_learned"]):
            row = None if x is None else Row.from_dict(x)
            cells += (
                ["—"] * (2 + len(extra))
                if row is None
                else [row.label, f"{row.rmse:.4g}"]
                + [f"{row.get(k):.4g}" if row.get(k) is not None else "—" for k in extra]
            )
        cells.append("—" if r["ratio"] is None else f"**{r['ratio']:.2f}**")
        lines.append("| " + " | ".join(cells) + " |")
    ref = rep.reference_row()
    if ref is not None and extra:
        lines.append("")
        lines.append(
            f"reference solve {ref.grid} ({ref.nfe} NFE), the floor: "
            + ", ".join(f"{k.upper()} {ref.get(k):.4g}" for k in extra if ref.get(k) is not None)
        )
    return "\n".join(lines)


def render_guidance_markdown(rows: list[dict[str, Any]], nfe: int, method: str) -> str:
    """Markdown table of a guidance sweep (a solver fitted at one scale, used at others)."""
    w0 = rows[0]["fitted_at"] if rows else 0.0
    lines = [
        f"| guidance scale | best classic ({nfe} NFE) | RMSE | {method} fitted at {w0:g} | ratio | "
        f"{method} refit at this scale | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mark = " (fit scale)" if r["scale"] == r["fitted_at"] else ""
        lines.append(
            f"| {r['scale']:g}{mark} | {r['best_classic']} | {r['best_classic_rmse']:.4g} | "
            f"{r['learned_rmse']:.4g} | {r['ratio']:.2f} | {r['refit_rmse']:.4g} | {r['refit_ratio']:.2f} |"
        )
    return "\n".join(lines)


def render_versus(rep: Report, learned: Row, nfes: Sequence[int]) -> list[str]:
    """Lines of the demo's summary: the learned solver, then the best classic at every NFE and how far off."""
    if learned.rmse is None:
        raise FewstepError(
            f"the learned solver {learned.solver} has no RMSE to compare: {learned.error or 'not measured'}"
        )
    rows = [(f"{learned.solver} (learned)", learned.nfe, learned.rmse)]
    for n in nfes:
        b = rep.best_classic(n)
        if b is not None and b.rmse is not None:  # best_of picks rows with an RMSE only
            rows.append((f"best classic: {b.label}", n, b.rmse))
    width = max(len("solver"), *(len(name) for name, _, _ in rows)) + 2  # the longest label sets the column
    lines = [f"  {'solver':<{width}}{'NFE':>4}{'RMSE':>10}{'vs learned':>12}"]
    lines += [f"  {name:<{width}}{n:>4}{r:>10.4g}{r / learned.rmse:>11.2f}x" for name, n, r in rows]
    return lines
