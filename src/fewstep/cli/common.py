"""What every ``fewstep`` command shares: the app, one-line errors, input checks, model loading, reports."""

from __future__ import annotations

import json
import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import typer

from ..errors import FewstepError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Learned few-step solvers for diffusion and flow models.")

FORCE_HELP = "use a learned solver even if it was fitted for another model or schedule"
MODEL_HELP = ("zoo:NAME, diffusers:DIR, torchcfm:NAME_OR_PATH, path/to/file.py:factory or package.module:factory "
              "(a factory spec runs that file's or module's code)")
DEBUG_ENV = "FEWSTEP_DEBUG"


def debug() -> bool:
    """Show tracebacks instead of one-line errors (``--debug`` or FEWSTEP_DEBUG=1)."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def fail(msg: str, code: int = 2) -> None:
    """Print ``error: msg`` (one line) and stop with ``code``."""
    typer.echo(f"error: {' '.join(str(msg).split())}", err=True)
    raise typer.Exit(code)


@contextmanager
def errors() -> Iterator[None]:
    """Turn fewstep's errors and file-system errors into one line each (tracebacks with --debug)."""
    try:
        yield
    except FewstepError as e:
        if debug():
            raise
        fail(str(e))
    except OSError as e:
        if debug():
            raise
        where = e.filename or "a file"
        fail(f"{where}: {e.strerror or e}")


# ----------------------------------------------------------------------------- input checks
def positive_float(name: str) -> Any:
    """A typer callback: None, or a finite number > 0 (one-line error naming the option otherwise)."""
    def check(value: Optional[float]) -> Optional[float]:
        if value is not None and not (math.isfinite(value) and value > 0):
            raise typer.BadParameter(f"{value} is not a finite number > 0", param_hint=name)
        return value
    return check


def nonneg_float(name: str) -> Any:
    """A typer callback: None, or a finite number >= 0."""
    def check(value: Optional[float]) -> Optional[float]:
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise typer.BadParameter(f"{value} is not a finite number >= 0", param_hint=name)
        return value
    return check


def setup(device: str, threads: Optional[int]) -> None:
    """Check the device and set the threads before any work."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        fail(f"--device {device}: not a device; use cpu, cuda, cuda:N or mps")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            fail(f"--device {device}: CUDA is not available on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            fail(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        fail(f"--device {device}: MPS is not available on this machine; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        fail(f"--device {device}: fewstep runs on cpu, cuda or mps")


def _writable_ancestor(path: Path, option: str) -> None:
    """The nearest existing ancestor of ``path`` must be a folder we can write into."""
    p = path.parent
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        fail(f"{option} {path}: {p} is a file, not a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        fail(f"{option} {path}: cannot write into {p} (permission denied)")


def check_out_dir(path: Path, option: str = "--out", json_ok: bool = False) -> None:
    """An output folder (or, with ``json_ok``, a .json file): writable, not an existing file."""
    if json_ok and path.suffix == ".json":
        if path.is_dir():
            fail(f"{option} {path} is a folder; name the solver file (e.g. {path / 'solver.json'})")
        _writable_ancestor(path, option)
        return
    if path.exists() and not path.is_dir():
        fail(f"{option} {path} is a file; give a folder for the output")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            fail(f"{option} {path}: cannot write into it (permission denied)")
        return
    _writable_ancestor(path / "x", option)


def check_out_file(path: Path, option: str = "--out") -> None:
    """An output file: not a folder, under a writable folder."""
    if path.is_dir():
        fail(f"{option} {path} is a folder; give a file name (e.g. {path / 'samples.safetensors'})")
    _writable_ancestor(path, option)


# ----------------------------------------------------------------------------- shared steps
def load(spec: str, device: str, guidance: Optional[float] = None) -> Any:
    from ..specs import load_model

    return load_model(spec, device=device, **({"guidance_scale": guidance} if guidance is not None else {}))


def metrics_arg(value: str) -> Any:
    return None if value.strip().lower() in ("none", "off", "") else value


def fit_kwargs(steps: Optional[int], samples: int) -> dict[str, Any]:
    return {"samples": samples, **({"steps": steps} if steps else {})}


def resolve_solver(spec: str, force: bool = False) -> Any:
    """A classic 'NAME@GRID' string stays a string (its budget comes with --nfe); a path is a learned artifact."""
    from ..solvers.resolve import is_artifact_spec, resolve_solver as resolve

    return resolve(spec, force=force) if is_artifact_spec(spec) else spec


def print_report(report: dict[str, Any], as_json: bool, top: Optional[int] = None) -> None:
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    from ..report import Report, render_rich

    render_rich(Report.from_dict(report), top)


def _warning_line(message: Any, category: type, *_: Any, **__: Any) -> str:
    return f"warning: {' '.join(str(message).split())}\n"


def main() -> None:
    """The ``fewstep`` entry point: every error is one line (tracebacks with --debug / FEWSTEP_DEBUG=1), and so
    is every warning."""
    import warnings

    if not debug():
        warnings.formatwarning = _warning_line
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as e:  # usage errors: a bad option value, a missing option, an unknown command
        msg = e.format_message() if hasattr(e, "format_message") else str(e)
        typer.echo(f"error: {' '.join(msg.split())}", err=True)
        sys.exit(getattr(e, "exit_code", 2))
    except FewstepError as e:
        if debug():
            raise
        typer.echo(f"error: {' '.join(str(e).split())}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code or 0)
