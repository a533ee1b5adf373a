"""Checking a learned-solver document (solver.json) field by field before anything uses it.

Every defect becomes one :class:`~fewstep.errors.ArtifactError` line that names the file and the field:
a missing or mistyped field, a schedule with an unknown or bad key, times outside the schedule's
range or not decreasing, NaN / inf / absurdly large coefficients, masks of the wrong shape, a
``params`` file outside the artifact's folder. What passes can be sampled without a traceback from
deep inside.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..denoiser import BASES
from ..errors import ArtifactError, FewstepError
from ..schedules import F64, Schedule, schedule_from_config
from .kernel import Tableau

#: the largest coefficient magnitude an artifact may hold (classic and fitted tables stay far below)
MAX_COEF = 1e6
_FINGERPRINT = re.compile(r"^[0-9a-f]{16}$")


class _Fail(Exception):
    """A field's problem (turned into an ArtifactError naming the file)."""


def _finite(v: int | float) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:  # an integer too large for a float
        return False


def _int(v: Any, field: str, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise _Fail(f"field {field} must be an integer >= {lo}; got {v!r}")
    return v


def _floats(v: Any, field: str, shape: tuple[int, ...], bound: float | None = MAX_COEF) -> Tensor:
    """A finite float64 tensor of ``shape`` from nested lists (|values| <= bound)."""
    try:
        t = torch.tensor(v, dtype=F64)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise _Fail(f"field {field} must be a list of numbers of shape {shape}") from None
    if tuple(t.shape) != shape:
        raise _Fail(f"field {field} has shape {tuple(t.shape)}; it must be {shape}")
    if not torch.isfinite(t).all():
        raise _Fail(f"field {field} holds NaN or inf")
    if bound is not None and t.numel() and float(t.abs().max()) > bound:
        raise _Fail(
            f"field {field} holds {float(t.abs().max()):.3g}, beyond the largest coefficient a solver can "
            f"use ({bound:g})"
        )
    return t


def _mask(v: Any, field: str, shape: tuple[int, ...]) -> Tensor | None:
    if v is None:
        return None
    try:
        t = torch.tensor(v)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise _Fail(f"field {field} must be a 0/1 list of shape {shape}") from None
    if tuple(t.shape) != shape or t.is_floating_point() or t.is_complex() or not ((t == 0) | (t == 1)).all():
        raise _Fail(f"field {field} must be a 0/1 list of shape {shape}; got shape {tuple(t.shape)}")
    return t.bool()


def check_schedule(cfg: Any) -> Schedule:
    """The schedule a document names (every key known, every value valid)."""
    if not isinstance(cfg, dict):
        raise _Fail(f"field schedule must be an object; got {type(cfg).__name__}")
    try:
        sched = schedule_from_config(dict(cfg))
    except FewstepError as e:
        raise _Fail(f"field schedule: {e}") from None
    except (TypeError, ValueError, KeyError, OverflowError) as e:
        raise _Fail(f"field schedule has a bad or unknown key ({e})") from None
    if sched.config() != cfg:
        extra = sorted(set(cfg) - set(sched.config()))
        raise _Fail(f"field schedule has {'unknown keys ' + ', '.join(extra) if extra else 'values its type changes'}")
    return sched


def check_tableau(d: Any, name: str, schedule: Schedule | None = None) -> Tableau:
    """The kernel tables of a document's ``tableau`` field (times inside ``schedule``'s range if given)."""
    if not isinstance(d, dict):
        raise _Fail(f"field tableau must be an object; got {type(d).__name__}")
    basis = d.get("basis")
    if basis not in BASES:
        raise _Fail(f"field tableau.basis must be one of {', '.join(BASES)}; got {basis!r}")
    a = d.get("a")
    if not isinstance(a, list) or not a:
        raise _Fail("field tableau.a must be a non-empty list")
    n = len(a)
    t = _floats(d.get("t"), "tableau.t", (n + 1,), bound=None)
    c = None if d.get("eval_times") is None else _floats(d["eval_times"], "tableau.eval_times", (n,), bound=None)
    tab = Tableau(
        basis,
        t,
        _floats(a, "tableau.a", (n,)),
        _floats(d.get("B"), "tableau.B", (n, n)),
        None if d.get("C") is None else _floats(d["C"], "tableau.C", (n, n + 1)),
        c,
        name=name,
        B_mask=_mask(d.get("B_mask"), "tableau.B_mask", (n, n)),
        C_mask=_mask(d.get("C_mask"), "tableau.C_mask", (n, n + 1)),
        points=_mask(d.get("points"), "tableau.points", (n + 1,)),
    )
    if tab.C is None and tab.C_mask is not None:
        raise _Fail("field tableau.C_mask is given without tableau.C")
    try:
        tab.validate()
    except FewstepError as e:
        raise _Fail(f"field tableau: {e}") from None
    _check_grid(t, tab.points)
    if schedule is not None:
        lo, hi = schedule.t_end, schedule.t_max
        tol = 1e-9 * max(1.0, abs(hi))
        for field, v in (("tableau.t", t), ("tableau.eval_times", tab.eval_times)):
            if float(v.min()) < lo - tol or float(v.max()) > hi + tol:
                raise _Fail(
                    f"field {field} must lie in [{lo:g}, {hi:g}] (the range of {schedule.describe()}); "
                    f"got [{float(v.min()):g}, {float(v.max()):g}]"
                )
        if float(tab.eval_times.min()) <= lo:
            raise _Fail(
                f"field tableau.eval_times must lie above the clean end t = {lo:g}, where the network is "
                f"never evaluated"
            )
    return tab


def _check_grid(t: Tensor, points: Tensor | None) -> None:
    """The grid runs from the noise end to the data end, whatever ``points`` says: the first and the last state
    are solution points, times never increase, and every state lies strictly below the solution point its step
    starts from (a stage may share its step's end time, as Heun's does)."""
    if points is None or bool(points.all()):
        if not torch.all(t[1:] < t[:-1]):
            raise _Fail("field tableau.t must be strictly decreasing (from the noise end to the data end)")
        return
    if not (bool(points[0]) and bool(points[-1])):
        raise _Fail("field tableau.points must mark the first and the last state as solution points")
    if not torch.all(t[points][1:] < t[points][:-1]):
        raise _Fail("field tableau.t must be strictly decreasing over the solution points (tableau.points)")
    if not torch.all(t[1:] <= t[:-1]):
        raise _Fail("field tableau.t must not increase (from the noise end to the data end), stages included")
    last = t[0]
    for k in range(1, t.numel()):  # a stage strictly below the solution point its step starts from
        if not t[k] < last:
            raise _Fail(
                f"field tableau.t: state {k} (t={float(t[k]):g}) is not below the solution point its step "
                f"starts from (t={float(last):g})"
            )
        if bool(points[k]):
            last = t[k]


def check_params_name(v: Any, folder: Path) -> str:
    """A ``params`` file name that stays inside the artifact's folder."""
    if not isinstance(v, str) or not v:
        raise _Fail(f"field params must be a file name; got {v!r}")
    p = Path(v)
    if p.is_absolute() or ".." in p.parts or (folder / p).resolve().parent != folder.resolve():
        raise _Fail(f"field params must name a file inside the artifact's folder; got {v!r}")
    return v


def _seed_range(v: Any, field: str) -> None:
    if not (
        isinstance(v, list)
        and len(v) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
        and 0 <= v[0] <= v[1]
    ):
        raise _Fail(f"field {field} must be a seed range [lo, hi]; got {v!r}")


def check_doc(doc: Any, folder: Path, in_memory: bool = False) -> tuple[Schedule, Tableau]:
    """Check a whole solver.json document; returns its schedule and tables."""
    if not isinstance(doc, dict):
        raise _Fail("the document is not a JSON object")
    for key in ("method", "nfe", "schedule", "model", "tableau"):
        if key not in doc:
            raise _Fail(f"field {key} is missing")
    if not isinstance(doc["method"], str) or not doc["method"]:
        raise _Fail(f"field method must be a name; got {doc['method']!r}")
    if doc.get("label") is not None and not isinstance(doc["label"], str):
        raise _Fail(f"field label must be a string; got {doc['label']!r}")
    nfe = _int(doc["nfe"], "nfe")
    model = doc["model"]
    if not isinstance(model, dict):
        raise _Fail(f"field model must be an object; got {type(model).__name__}")
    if not isinstance(model.get("fingerprint"), str) or not _FINGERPRINT.match(model["fingerprint"]):
        raise _Fail(f"field model.fingerprint must be 16 hex digits; got {model.get('fingerprint')!r}")
    w = model.get("guidance_scale")
    if w is not None and (isinstance(w, bool) or not isinstance(w, (int, float)) or not _finite(w)):
        raise _Fail(f"field model.guidance_scale must be a finite number or null; got {str(w)[:40]}")
    sched = check_schedule(doc["schedule"])
    tab = check_tableau(doc["tableau"], doc.get("label") or doc["method"], sched)
    if nfe != tab.N:
        raise _Fail(f"field nfe is {nfe} but the tables make {tab.N} evaluations")
    if "params" in doc:
        check_params_name(doc["params"], folder)
    if doc.get("guidance") is not None:
        _check_guidance(doc, sched, need_params=not in_memory)
    teacher = doc.get("teacher")
    if teacher is not None:
        if not isinstance(teacher, dict):
            raise _Fail("field teacher must be an object")
        for k in ("train_seeds", "val_seeds", "confirm_seeds"):
            if teacher.get(k) is not None:
                _seed_range(teacher[k], f"teacher.{k}")
    for k in ("start", "validation", "fit", "timing"):
        if doc.get(k) is not None and not isinstance(doc[k], dict):
            raise _Fail(f"field {k} must be an object")
    return sched, tab


def _check_guidance(doc: dict[str, Any], sched: Schedule, need_params: bool = True) -> None:
    """A solver fitted across guidance scales: its scales, reference scale, per-scale tables, params file."""
    g = doc["guidance"]
    if not isinstance(g, dict):
        raise _Fail("field guidance must be an object")
    scales = g.get("scales")
    if not (
        isinstance(scales, list)
        and len(scales) >= 2
        and all(isinstance(w, (int, float)) and not isinstance(w, bool) and _finite(w) for w in scales)
        and scales == sorted(scales)
        and len(set(scales)) == len(scales)
    ):
        raise _Fail(f"field guidance.scales must be two or more increasing numbers; got {scales!r}")
    ref = g.get("reference_scale")
    if (
        isinstance(ref, bool)
        or not isinstance(ref, (int, float))
        or not _finite(ref)
        or not scales[0] <= ref <= scales[-1]
    ):
        raise _Fail(f"field guidance.reference_scale must lie in [{scales[0]:g}, {scales[-1]:g}]; got {ref!r}")
    tabs = g.get("tableaus", {})
    if not isinstance(tabs, dict):
        raise _Fail("field guidance.tableaus must be an object")
    for t in tabs.values():
        check_tableau(t, doc["method"], sched)
    if need_params and "params" not in doc:
        raise _Fail("field params is missing: a solver fitted across guidance scales needs its parameters file")


def checked(where: str, fn: Any, *args: Any) -> Any:
    """Run a check, turning its problem into one ArtifactError line that names ``where``."""
    try:
        return fn(*args)
    except _Fail as e:
        raise ArtifactError(f"{where}: {e}; the artifact is damaged or not a fewstep solver (refit it)") from None
