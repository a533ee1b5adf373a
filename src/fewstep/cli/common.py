"""What every ``fewstep`` command shares: the app, one-line errors, input checks, model loading, reports."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from ..errors import FewstepError, debug

if TYPE_CHECKING:
    from ..report import Report

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Learned few-step solvers for diffusion and flow models.",
)

FORCE_HELP = "use a learned solver even if it was fitted for another model or schedule"
MODEL_HELP = (
    "zoo:NAME, diffusers:DIR, torchcfm:NAME_OR_PATH, path/to/file.py:factory or package.module:factory "
    "(a factory spec runs that file's or module's code)"
)
#: seconds a process other than rank 0 waits before it prints its error: when every process fails alike (a bad
#: option), rank 0 says it once and torchrun stops the others meanwhile; an error of one process still shows
PEER_GRACE = 1.0


def _rank() -> tuple[int, int]:
    from ..distributed import env_rank

    try:
        rank, world, _ = env_rank()
    except FewstepError:
        return 0, 1
    return rank, world


def error_line(msg: Any) -> None:
    """Print ``error: msg`` on one line (under several processes: ``error: rank R: msg``)."""
    rank, world = _rank()
    if world > 1 and rank > 0:
        sys.stderr.flush()
        time.sleep(PEER_GRACE)
    where = f"rank {rank}: " if world > 1 else ""
    typer.echo(f"error: {where}{' '.join(str(msg).split())}", err=True)


def fail(msg: str, code: int = 2) -> None:
    """Print ``error: msg`` (one line) and stop with ``code``."""
    error_line(msg)
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
def float_check(name: str, ok: Callable[[float], bool], what: str) -> Any:
    """A typer callback for option ``name``: None, or a finite number for which ``ok`` holds (else one line
    saying the value is not ``what``)."""

    def check(value: float | None) -> float | None:
        if value is not None and not (math.isfinite(value) and ok(value)):
            raise typer.BadParameter(f"{value} is not {what}", param_hint=name)
        return value

    return check


def positive_float(name: str) -> Any:
    """A typer callback: None, or a finite number > 0."""
    return float_check(name, lambda v: v > 0, "a finite number > 0")


def nonneg_float(name: str) -> Any:
    """A typer callback: None, or a finite number >= 0."""
    return float_check(name, lambda v: v >= 0, "a finite number >= 0")


def share(name: str) -> Any:
    """A typer callback: None, or a share in [0, 1)."""
    return float_check(name, lambda v: 0 <= v < 1, "a share in [0, 1)")


def setup(device: str, threads: int | None) -> str:
    """Check the device, set the threads and join the other processes of a ``torchrun`` launch (once) before any
    work; returns the device this process runs on (``cuda``: the local rank's GPU under several processes)."""
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
    from ..distributed import device_for, init

    with errors():
        return device_for(device, init(device))
    return device  # pragma: no cover - errors() stopped the command


def is_main() -> bool:
    """Does this process print and write files (rank 0, or the only process)?"""
    from ..distributed import current

    return current().main


def log_line(msg: str) -> None:
    """A progress line on stderr, from rank 0 only."""
    if is_main():
        typer.echo(msg, err=True)


#: the largest first seed a command takes (``--seed``): ``fewstep.seeds.FIRST_SEED_MAX``, 2**62 (here without
#: importing torch); every block of seeds after it stays below torch's limit 2**63
SEED_MAX = 2**62
SEED_RANGE_HELP = "an integer in [0, 2**62]"


def _existing_ancestor(path: Path) -> Path:
    """The nearest folder above ``path`` (or ``path`` itself) that exists."""
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _name_max(path: Path) -> int:
    """The longest file name (bytes) the file system under ``path`` takes."""
    try:
        return int(os.pathconf(_existing_ancestor(path.absolute()), "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def _temporary_room() -> int:
    """How much longer than its target a temporary of ``fewstep.io``'s atomic writers is named
    (``.NAME.HOST-PID.XXXXXXXX.tmp``)."""
    import socket

    return len(f"..{socket.gethostname()}-{os.getpid()}.") + 8 + len(".tmp")


def _short(name: str) -> str:
    return name if len(name) <= 40 else f"{name[:24]}...{name[-8:]}"


def check_name_lengths(path: Path, option: str, written: tuple[str, ...] = ()) -> None:
    """Every name in ``path`` fits the file system, and so do the files written for it (``path`` itself and the
    names in ``written``, beside it) with their temporary names: one line otherwise, before any work."""
    limit = _name_max(path)
    for part in path.parts:
        n = len(os.fsencode(part))
        if n > limit:
            fail(
                f"{option} {_short(str(path))}: the name {_short(part)} is {n} bytes long, and this file system "
                f"takes at most {limit}; give a shorter name"
            )
    n = len(os.fsencode(path.name))
    allowed = limit - _temporary_room() - max([0, *(len(os.fsencode(w)) - n for w in written)])
    if n > allowed:
        also = f" and {', '.join(map(_short, written))} beside it" if written else ""
        fail(
            f"{option} {_short(str(path))}: the name is {n} bytes long; fewstep writes it{also} under a longer "
            f"temporary name first, and this file system takes at most {limit} bytes: give a name of at most "
            f"{allowed} bytes"
        )


@contextmanager
def _path_errors(path: Path, option: str) -> Iterator[None]:
    """A file-system error while checking an output path (too long, a loop of links, ...) in one line."""
    try:
        yield
    except OSError as e:
        fail(f"{option} {_short(str(path))}: {e.strerror or e}")


def _writable_ancestor(path: Path, option: str, start: Path | None = None) -> None:
    """The nearest existing ancestor of ``start`` (default: ``path``'s parent) must be a folder we can write
    into; messages name ``path``, the path the user gave."""
    p = _existing_ancestor(path.parent if start is None else start)
    if not p.is_dir():
        fail(f"{option} {path}: {p} is a file, not a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        fail(f"{option} {path}: cannot write into {p} (permission denied)")


def check_out_dir(path: Path, option: str = "--out", json_ok: bool = False) -> None:
    """An output folder (or, with ``json_ok``, a .json file): writable, not an existing file, names that fit."""
    if json_ok and path.suffix == ".json":
        check_name_lengths(path, option, (path.with_suffix(".params.safetensors").name,))
        with _path_errors(path, option):
            if path.is_dir():
                fail(f"{option} {path} is a folder; name the solver file (e.g. {path / 'solver.json'})")
            _writable_ancestor(path, option)
        return
    check_name_lengths(path, option)
    with _path_errors(path, option):
        if path.exists() and not path.is_dir():
            fail(f"{option} {path} is a file; give a folder for the output")
        if path.is_dir():
            if not os.access(path, os.W_OK | os.X_OK):
                fail(f"{option} {path}: cannot write into it (permission denied)")
            return
        _writable_ancestor(path, option, start=path)


def check_out_file(path: Path, option: str = "--out") -> None:
    """An output file: not a folder, under a writable folder, a name that fits."""
    check_name_lengths(path, option)
    with _path_errors(path, option):
        if path.is_dir():
            fail(f"{option} {path} is a folder; give a file name (e.g. {path / 'samples.safetensors'})")
        _writable_ancestor(path, option)


# ----------------------------------------------------------------------------- model options
PROMPTS_OPT = typer.Option(
    None,
    "--prompts",
    help="prompt file of a text-to-image pipeline: one prompt per line "
    "(.txt), or .csv / .jsonl with prompt[, negative_prompt][, guidance]; "
    "each seed draws one (fits use it without its held-out part)",
)
EVAL_PROMPTS_OPT = typer.Option(
    None,
    "--eval-prompts",
    help="prompts to evaluate on (default: the held-out part of --prompts, which fits never see)",
)
CLASSES_OPT = typer.Option(None, "--classes", help="class labels each seed draws from: 0,1,2 or all")
GUIDANCE_OPT = typer.Option(
    None,
    "--guidance",
    help="classifier-free guidance (or Flux's guidance input): one scale "
    "(7.5), several (3,7.5,12) or a range (3:12[:COUNT]); with "
    "several, each seed draws one and a fit covers them all",
)
HEIGHT_OPT = typer.Option(None, "--height", min=1, help="image height of a pipeline (default: the pipeline's)")
WIDTH_OPT = typer.Option(None, "--width", min=1, help="image width of a pipeline (default: the pipeline's)")
DTYPE_OPT = typer.Option(None, "--dtype", help="precision the network runs in: fp32, fp16 or bf16 (default: as loaded)")


def conditions(
    guidance: str | None = None,
    prompts: Path | None = None,
    classes: str | None = None,
    role: str = "all",
    eval_prompts: Path | None = None,
) -> Any:
    """The command's :class:`~fewstep.conditions.ConditionSpec`, parsed once from its options. ``role``: "fit" (a
    prompt file without its held-out part), "eval" (``eval_prompts``, else that held-out part) or "all"."""
    from ..conditions import ConditionSpec, PromptSet

    evaluated = PromptSet.read(eval_prompts) if role == "eval" and eval_prompts is not None else None
    pset = PromptSet.read(prompts) if prompts is not None and evaluated is None else None
    return ConditionSpec.parse(pset, classes, guidance).for_role(role, evaluated)


def load(
    spec: str,
    device: str,
    guidance: str | None = None,
    prompts: Path | None = None,
    classes: str | None = None,
    height: int | None = None,
    width: int | None = None,
    dtype: str | None = None,
    role: str = "all",
    eval_prompts: Path | None = None,
) -> Any:
    """The model of a command, conditioned as asked (:func:`conditions`)."""
    from ..specs import load_model

    cond = conditions(guidance, prompts, classes, role, eval_prompts)
    model = load_model(spec, device=device, conditions=cond, height=height, width=width, dtype=dtype)
    return eval_model(model, prompts, eval_prompts) if role == "eval" and cond.prompts is None else model


def eval_model(model: Any, prompts: Path | None, eval_prompts: Path | None) -> Any:
    """The model a fit's closing table evaluates: the fitted model with the prompts the fit never saw (no prompt
    file given: the model's own held-out prompts, e.g. a zoo pipeline's ``prompts/heldout.txt``, if it has them)."""
    held = conditions(prompts=prompts, role="eval", eval_prompts=eval_prompts).prompts
    if held is None:
        held = getattr(model, "held_out_prompts", None)
    return model if held is None else model.with_prompts(held)


def metrics_arg(value: str) -> Any:
    """The ``metrics=`` of :func:`~fewstep.evaluate.evaluate` for a --metrics value ("none", "off", "": None)."""
    return None if value.strip().lower() in ("none", "off", "") else value


def fit_kwargs(steps: int | None, samples: int | None) -> dict[str, Any]:
    """The fit settings a command's options override (none: the method's defaults)."""
    return {k: v for k, v in (("samples", samples), ("steps", steps)) if v}


def solver_option(spec: str, force: bool = False) -> Any:
    """One --solver value: a classic 'NAME@GRID' string stays a string (its budget comes with --nfe); a path is
    read as a learned artifact (:func:`fewstep.solvers.resolve.resolve_solver`, the one that makes solvers)."""
    from ..solvers.resolve import is_artifact_spec
    from ..solvers.resolve import resolve_solver as resolve

    return resolve(spec, force=force) if is_artifact_spec(spec) else spec


def cost_line(cost: dict[str, Any]) -> str:
    """One line of what a fit spent (from its artifact's ``cost``)."""
    t, f = cost["teacher"], cost["fit"]
    budget = f" of a budget of {cost['budget']:,}" if cost.get("budget") else ""
    return (
        f"cost: {cost['total_evals']:,} network evaluations{budget} (teacher {t['forward_evals']:,} forward, "
        f"{t['computed_now']:,} of them computed now; fit {f['forward_evals']:,} forward + {f['backward_evals']:,} "
        f"backward), {cost['wall_s']:.1f} s, peak memory {cost['peak_memory_mib']:,.0f} MiB ({cost['memory']})"
    )


def print_report(report: Report, as_json: bool, top: int | None = None) -> None:
    """Print an :func:`~fewstep.evaluate.evaluate` report: JSON, or a table (at most ``top`` classic rows per NFE)."""
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
        return
    from ..report import render_rich

    render_rich(report, top)


def _warning_line(message: Any, category: type, *_: Any, **__: Any) -> str:
    rank, world = _rank()
    where = f"rank {rank}: " if world > 1 else ""
    return f"warning: {where}{' '.join(str(message).split())}\n"


def main() -> None:
    """The ``fewstep`` entry point: every error is one line (tracebacks with --debug / FEWSTEP_DEBUG=1), and so
    is every warning. Under ``torchrun`` every process runs the command (joining the others in ``setup``); only
    rank 0 prints results, an error names the rank it happened on, and a run that every process completed leaves
    the process group (after a barrier) before it exits; a failed run exits without leaving it (see
    ``fewstep.distributed.exit_process``)."""
    import warnings

    from ..distributed import exit_process, shutdown

    if not debug():
        warnings.formatwarning = _warning_line
    rank, world = _rank()
    if world > 1 and rank > 0:  # tables, JSON and "wrote" lines come from rank 0; errors and warnings stay
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  # stays open for the rest of the process
    try:
        code = app(standalone_mode=False)
        code = code if isinstance(code, int) else 0
        if code == 0:
            shutdown()  # PeerFailed if another process stopped before the closing barrier
    except typer.TyperException as e:  # usage errors: a bad option value, a missing option, an unknown command
        msg = e.format_message() if hasattr(e, "format_message") else str(e)
        error_line(msg)
        code = getattr(e, "exit_code", 2)
    except FewstepError as e:
        if debug():
            raise
        error_line(e)
        code = 2
    except KeyboardInterrupt:
        code = 130
    exit_process(code)


def forced_warning(solver: Any, model: Any, spec: str) -> None:
    """One warning line when ``--force`` makes a learned solver run on a model it was not fitted for (another
    size, schedule or network: what differs)."""
    import warnings

    from ..solvers.model_match import forced_note

    doc = getattr(solver, "doc", None)
    note = forced_note(doc, model, f"solver {spec}") if isinstance(doc, dict) else None
    if note:
        warnings.warn(note, stacklevel=2)
