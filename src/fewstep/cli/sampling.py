"""``fewstep sample`` and ``fewstep zoo``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from .common import (
    CLASSES_OPT,
    DTYPE_OPT,
    FORCE_HELP,
    GUIDANCE_OPT,
    HEIGHT_OPT,
    MODEL_HELP,
    PROMPTS_OPT,
    SEED_MAX,
    SEED_RANGE_HELP,
    WIDTH_OPT,
    app,
    check_out_file,
    errors,
    fail,
    forced_warning,
    is_main,
    load,
    setup,
)


@app.command("sample")
def sample_cmd(
    model: str = typer.Option(..., help=MODEL_HELP),
    solver: str | None = typer.Option(
        None, help="NAME@GRID or a learned-solver directory (default: adams2@time for flows, dpmpp_3m@logsnr otherwise)"
    ),
    nfe: int | None = typer.Option(
        None, min=1, help="NFE budget of a classic solver (default 5; a learned solver makes its own)"
    ),
    n: int = typer.Option(16, min=1, help="number of samples"),
    out: Path = typer.Option(..., help="output .safetensors file (a PNG grid is written beside it for images)"),
    seed: int = typer.Option(0, min=0, max=SEED_MAX, help=f"first per-sample seed, {SEED_RANGE_HELP}"),
    guidance: str | None = GUIDANCE_OPT,
    prompts: Path | None = PROMPTS_OPT,
    classes: str | None = CLASSES_OPT,
    height: int | None = HEIGHT_OPT,
    width: int | None = WIDTH_OPT,
    dtype: str | None = DTYPE_OPT,
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    device: str = typer.Option("cpu"),
) -> None:
    """Draw samples and write them (safetensors, plus a PNG grid for image-shaped models)."""
    from ..evaluate import solve_batched
    from ..io import save_samples
    from ..sampling import default_solver
    from ..solvers.resolve import is_artifact_spec, resolve_solver

    device = setup(device, None)
    check_out_file(out)
    check_out_file(out if out.suffix == ".safetensors" else out.with_suffix(".safetensors"))
    with errors():
        m = load(model, device, guidance, prompts, classes, height, width, dtype)
        spec = solver or default_solver(m)
        learned = is_artifact_spec(spec)
        s = resolve_solver(spec, m, None if learned else (nfe or 5), force=force)
        if learned and force:
            forced_warning(s, m, spec)
        if learned and nfe is not None and nfe != s.nfe:
            fail(f"--nfe {nfe}: the learned solver {spec} makes {s.nfe} evaluations; drop --nfe or pass --nfe {s.nfe}")
        x = solve_batched(m, list(range(seed, seed + n)), s, s.nfe, device=device)  # shared out by seed
        paths = []
        if is_main():
            paths = save_samples(
                x, out, meta={"model": model, "solver": spec, "nfe": str(s.nfe), "seed": str(seed)}, decode=m.decode
            )
    for p in paths:
        typer.echo(f"wrote {p}")


@app.command("zoo")
def zoo_cmd(as_json: bool = typer.Option(False, "--json", help="print JSON: every field of every model")) -> None:
    """List the built-in models: what each is and what its first use costs (nothing is built or trained)."""
    import json

    from .. import zoo

    rows = [zoo.describe(name) for name in zoo.NAMES]
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    for line in zoo_lines(rows):
        typer.echo(line)


def _conditions(d: dict[str, Any]) -> str:
    parts = ([f"{d['classes']} classes"] if d["classes"] else []) + (["guidance"] if d["guidance"] else [])
    return ", ".join(parts) or "-"


def zoo_lines(rows: list[dict[str, Any]]) -> list[str]:
    """``fewstep zoo``'s table: one line per model, then what it is in a line below."""
    head = ("model", "kind", "prediction", "shape", "schedule", "conditions", "first use")
    table = [head] + [
        (
            d["name"],
            d["kind"],
            d["prediction"],
            "x".join(map(str, d["sample_shape"])),
            d["schedule"],
            _conditions(d),
            d["first_use"] + ("; cached now" if d["cached"] and d["first_use_seconds"] >= 10 else ""),
        )
        for d in rows
    ]
    widths = [max(len(r[i]) for r in table) for i in range(len(head) - 1)]
    lines = []
    for k, r in enumerate(table):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1])
        if k:
            lines.append(f"    {rows[k - 1]['network']}: {rows[k - 1]['summary']}")
    lines.append("use one with --model zoo:NAME; fewstep zoo --json gives every field")
    return lines
