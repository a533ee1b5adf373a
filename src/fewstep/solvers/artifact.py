"""Learned-solver artifacts: ``solver.json`` (the tables sampling uses and everything about the fit)
and ``params.safetensors`` (the raw parameters, to continue fitting). Loading checks everything and
names what does not match; it never unpickles code.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..denoiser import Denoiser
from ..errors import ArtifactError, FewstepError
from ..io import atomic_path, loads_json, write_text
from ..schedules import F64, Schedule
from .artifact_check import check_doc, check_params_name, check_tableau, checked
from .kernel import Tableau
from .learned import LearnedSolver
from .model_match import check_model, model_parts

SCHEMA = "fewstep.solver/1"


PARAMS = "params.safetensors"
PARAMS_KIND = "fewstep.solver-params/1"


def save_params(path: str | os.PathLike, solver: LearnedSolver) -> Path:
    """Write the solver's raw parameters (grid logits, offsets, weights, masks) to safetensors, atomically.

    The JSON tables are what sampling uses; these let a later fit continue from the solver.
    """
    from safetensors.torch import save_file

    p = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in solver.state_dict().items()}
    tensors = {k: (v.to(torch.uint8) if v.dtype == torch.bool else v) for k, v in tensors.items()}
    with atomic_path(p) as tmp:
        save_file(tensors, str(tmp), metadata={"kind": PARAMS_KIND, "structure": json.dumps(solver.structure())})
    return p


def load_params(path: str | os.PathLike, schedule: Schedule) -> LearnedSolver:
    """Rebuild a :class:`LearnedSolver` from :func:`save_params`' file (no code is unpickled)."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise ArtifactError(
            f"no {PARAMS} at {p.parent}: this artifact keeps only its tables (fit it again to refine it)"
        )
    try:
        with safe_open(str(p), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict: keys() is its API
        if meta.get("kind") != PARAMS_KIND:
            raise ValueError(f"kind {meta.get('kind')!r}, expected {PARAMS_KIND!r}")
        st = loads_json(meta["structure"])
        scales = st.get("guidance")
        n = int(st["N"])
        t0 = torch.linspace(float(st["t_max"]), float(st["t_end"]), n + 1, dtype=F64)
        mask = tensors["mask"].bool()
        V_mask = tensors["V_mask"].bool() if st["corrector"] else None
        V = torch.zeros(n, n + 1, dtype=F64) if st["corrector"] else None
        s = LearnedSolver(
            schedule,
            t0,
            st["basis"],
            torch.zeros(n, n, dtype=F64),
            mask,
            V,
            V_mask,
            rows_sum_to_one=bool(st["rows_sum_to_one"]),
            decouple=float(st["decouple"]),
            method=st["method"],
            start=st.get("start", ""),
            scale_a=bool(st["scale_a"]),
            guidance=None if scales is None else tuple(float(w) for w in scales),
        )
        s.load_state_dict({k: (v.bool() if k.endswith("mask") else v) for k, v in tensors.items()})
    except ArtifactError:
        raise
    except Exception as e:  # noqa: BLE001 - any defect of the file is named, not raised from deep inside
        raise ArtifactError(
            f"{p} is not a readable fewstep solver-parameter file ({' '.join(str(e).split())[:200]}); "
            f"the artifact is damaged"
        ) from None
    return s


class LoadedSolver:
    """A learned solver read from disk: fixed tables plus the metadata it was saved with."""

    kind = "learned"
    grid_label = "learned"

    def __init__(
        self, doc: dict[str, Any], path: Path | None = None, force: bool = False, learned: LearnedSolver | None = None
    ) -> None:
        folder = Path(".") if path is None else (path if path.is_dir() else path.parent)
        # a fit's in-memory result has its parameters at hand, not in a file
        self.schedule, self._tab = checked(str(path or "solver"), check_doc, doc, folder, learned is not None)
        self.doc, self.path, self.force = doc, path, force
        self.nfe = int(doc["nfe"])
        self.name = doc.get("label") or f"{doc['method']}"
        g = doc.get("guidance")
        self.guidance_range = None if g is None else (float(g["scales"][0]), float(g["scales"][-1]))
        self._learned = learned
        self._at_scale: dict[float, Tableau] = {}
        self._warned: set[str] = set()  # the guidance notes already warned about
        if self.guidance_range is not None and learned is None:
            self._learned = self.learned()  # the tables at any scale come from the parameters: check them now

    def check(self, model: Denoiser) -> None:
        """Refuse a model with another fingerprint, naming what differs (unless force); another guidance than
        the fit's alone: one warning."""
        if self.force:
            return
        note = check_model(self.doc, model, f"solver {self.path or self.name}")
        if note is not None and note not in self._warned:
            self._warned.add(note)
            warnings.warn(note, stacklevel=3)

    def tableau(self, model: Denoiser | Schedule | None = None, w: float | None = None) -> Tableau:
        """The tables, after checking them against ``model`` (a Denoiser: schedule and fingerprint; a
        Schedule: the schedule only); at guidance scale ``w`` for a solver fitted across scales."""
        if isinstance(model, Denoiser):
            self.check(model)
        elif isinstance(model, Schedule) and not self.force and model.config() != self.doc["schedule"]:
            raise ArtifactError(
                f"solver {self.path or self.name} was fitted for schedule {self.schedule.describe()}, "
                f"not {model.describe()}; refit it for this model (or force=True / --force)"
            )
        if self.guidance_range is None:
            return self._tab
        if w is None:
            lo, hi = self.guidance_range
            raise ArtifactError(
                f"solver {self.path or self.name} is fitted across guidance scales {lo:g}..{hi:g}: give "
                f"the model a scale in that range (--guidance W)"
            )
        key = float(w)
        if key not in self._at_scale:
            assert self._learned is not None  # __init__ loads it for every solver with a guidance_range
            try:
                with torch.no_grad():
                    tab = self._learned.tableau(w=key)
            except FewstepError as e:
                raise ArtifactError(str(e)) from None
            self._at_scale[key] = tab.detached(self.name)
        return self._at_scale[key]

    def learned(self) -> LearnedSolver:
        """The trainable solver behind the tables (from params.safetensors), to continue fitting.

        Refused if its tables do not reproduce the artifact's (a mixed-up or damaged folder).
        """
        if self.path is None:
            raise ArtifactError("this solver was not read from a folder; its parameters are not available")
        folder = self.path if self.path.is_dir() else self.path.parent
        params = folder / checked(str(self.path), check_params_name, self.doc.get("params", PARAMS), folder)
        s = load_params(params, self.schedule)
        g = self.doc.get("guidance")
        if (None if s.guidance is None else list(s.guidance)) != (
            None if g is None else [float(v) for v in g["scales"]]
        ):
            raise ArtifactError(f"{params} does not fit {folder}'s guidance scales; the artifact is damaged")
        with torch.no_grad():
            tab = s.tableau(w=None if g is None else float(g["reference_scale"]))
        for name in ("t", "a", "B"):
            if not torch.allclose(getattr(tab, name), getattr(self._tab, name), rtol=1e-9, atol=1e-12):
                raise ArtifactError(
                    f"{params} does not reproduce {folder}'s tables ({name} differs); the artifact is damaged"
                )
        return s


def _floats(v: Tensor | None) -> Any:
    return None if v is None else v.detach().to(F64).cpu().tolist()


def tableau_to_doc(tab: Tableau) -> dict[str, Any]:
    """The JSON form of the tables (nested float lists; masks as 0/1), read back by :func:`tableau_from_doc`."""
    return {
        "basis": tab.basis,
        "t": _floats(tab.t),
        "eval_times": _floats(tab.eval_times),
        "a": _floats(tab.a),
        "B": _floats(tab.B),
        "C": _floats(tab.C),
        "B_mask": None if tab.B_mask is None else tab.B_mask.int().tolist(),
        "C_mask": None if tab.C_mask is None else tab.C_mask.int().tolist(),
    }


def tableau_from_doc(d: dict[str, Any], name: str = "learned", schedule: Schedule | None = None) -> Tableau:
    """Tables from :func:`tableau_to_doc` output, checked (times inside ``schedule``'s range if given)."""
    return checked("solver tables", check_tableau, d, name, schedule)


def save_solver(path: str | os.PathLike, doc: dict[str, Any]) -> Path:
    """Write ``doc`` (see :func:`solver_doc`) to DIR/solver.json atomically; returns the file path."""
    p = Path(path)
    f = p if p.suffix == ".json" else p / "solver.json"
    write_text(f, json.dumps(doc, indent=1, allow_nan=False) + "\n")
    return f


def solver_doc(tab: Tableau, schedule: Schedule, model: Denoiser, method: str, **extra: Any) -> dict[str, Any]:
    """The JSON document of a learned solver."""
    return {
        "schema": SCHEMA,
        "method": method,
        "label": extra.pop("label", method),
        "nfe": tab.N,
        "schedule": schedule.config(),
        "model": {
            "fingerprint": model.fingerprint(),
            "name": model.name,
            "guidance_scale": model.guidance_scale,
            "dtype": str(model.dtype or torch.float32).replace("torch.", ""),
            "parts": model_parts(model),
        },
        "grid": _floats(tab.t),
        "eval_times": _floats(tab.eval_times),
        "tableau": tableau_to_doc(tab),
        **extra,
    }


def load_solver(path: str | os.PathLike, force: bool = False) -> LoadedSolver:
    """Read a learned solver (a directory holding solver.json, or the JSON file). Never unpickles."""
    p = Path(path)
    f = p / "solver.json" if p.is_dir() else p
    if not f.is_file():
        raise ArtifactError(f"no learned solver at {p}: expected a directory with solver.json (from `fewstep fit`)")
    try:
        doc = loads_json(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{f} is not valid JSON ({e}); the artifact is damaged") from None
    except OSError as e:
        raise ArtifactError(f"{f} cannot be read ({e.strerror or e})") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise ArtifactError(
            f"{f} is not a fewstep solver (schema {doc.get('schema') if isinstance(doc, dict) else None!r}, "
            f"expected {SCHEMA!r})"
        )
    return LoadedSolver(doc, p if p.is_dir() else f, force)
