"""Learned solvers: the kernel's tables as parameters.

One parameterisation covers S4S, S4S-Alt, LD3 and DSS. For step i with grid t_0 > ... > t_N:

    x_{i+1} = a_i x_i + phi_i * sum_j W[i, j] F_j          (predictor)
    x_{i+1} = a_i x_i + phi_i * sum_j V[i, j] F_j          (corrector, optional, j <= i + 1)

with, by basis (all functions of the grid, so a learned grid stays consistent):
    D (data prediction):  a_i = sigma_{i+1}/sigma_i,  phi_i = alpha_{i+1} - sigma_{i+1} alpha_i / sigma_i
                          (= alpha_{i+1} (1 - e^{-h_i}) = sigma_{i+1} (omega_{i+1} - omega_i), omega = alpha/sigma)
    E (noise prediction): a_i = alpha_{i+1}/alpha_i,  phi_i = sigma_{i+1} - alpha_{i+1} sigma_i / alpha_i
    v (velocity):         a_i = 1,                    phi_i = t_{i+1} - t_i
W = I is DDIM (D, E) or Euler (v). S4S leaves W free over the last k evaluations; DSS makes every
row sum to one (the diagonal is 1 - the rest). The grid is t_i = t_max - (t_max - t_end) *
cumsum(w)_i with steps w = eps + (1 - N eps) softmax(r) (eps = MIN_STEP): strictly monotone with
fixed endpoints by construction. Decoupled
evaluation times are c_i = t_i + d_i tanh(delta_i) with d_i a fraction of the neighbouring steps.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..denoiser import Denoiser
from ..errors import ArtifactError
from ..io import atomic_path, write_text
from ..schedules import Schedule, schedule_from_config
from .kernel import Tableau

F64 = torch.float64
SCHEMA = "fewstep.solver/1"
#: the smallest step of a learned grid, as a fraction of [t_end, t_max] (keeps it strictly monotone)
MIN_STEP = 1e-9


def step_scales(schedule: Schedule, t: Tensor, basis: str) -> tuple[Tensor, Tensor]:
    """(a, phi) of shape (N,) for grid t (N+1,), differentiable in t."""
    if basis == "v":
        return torch.ones_like(t[:-1]), t[1:] - t[:-1]
    al, sg = schedule.alpha(t), schedule.sigma(t)
    if basis == "D":
        a = sg[1:] / sg[:-1]
        return a, al[1:] - a * al[:-1]
    a = al[1:] / al[:-1]
    return a, sg[1:] - a * sg[:-1]


def window_mask(n: int, k: int, corrector: bool = False) -> Tensor:
    """Last-k evaluations per step: (N, N) predictor mask, or (N, N+1) corrector mask (k+1 wide)."""
    if corrector:
        m = torch.zeros(n, n + 1, dtype=torch.bool)
        for i in range(n - 1):
            m[i, max(0, i - k + 1): i + 2] = True
        return m
    m = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        m[i, max(0, i - k + 1): i + 1] = True
    return m


class LearnedSolver(nn.Module):
    """A parameterised N-step solver (see the module docstring).

    Args:
        schedule: the model's schedule.
        t_init: starting grid (N+1,), e.g. the grid of the classic starting solver.
        basis: 'D', 'E' or 'v'.
        W_init: (N, N) starting predictor weights (normalised by phi), V_init: (N, N+1) or None.
        mask, V_mask: which weights are free (others are fixed at 0).
        rows_sum_to_one: DSS form (the diagonal is implicit).
        decouple: learn evaluation-time offsets, at most ``decouple`` times the smaller adjacent step.
    """

    def __init__(self, schedule: Schedule, t_init: Tensor, basis: str, W_init: Tensor, mask: Tensor,
                 V_init: Tensor | None = None, V_mask: Tensor | None = None, rows_sum_to_one: bool = False,
                 decouple: float = 0.0, method: str = "s4s", start: str = "", scale_a: bool = False) -> None:
        super().__init__()
        self.schedule, self.basis, self.method, self.start = schedule, basis, method, start
        self.rows_sum_to_one, self.decouple = rows_sum_to_one, float(decouple)
        t_init = t_init.detach().to(F64)
        n = t_init.numel() - 1
        self.N = n
        self.t_max, self.t_end = float(t_init[0]), float(t_init[-1])
        steps = (t_init[:-1] - t_init[1:]) / (self.t_max - self.t_end)
        free = (steps - MIN_STEP) / (1.0 - n * MIN_STEP)  # inverse of grid()'s floor: the start is exact
        self.r = nn.Parameter(torch.log(free.clamp_min(1e-300)))
        self.delta = nn.Parameter(torch.zeros(n, dtype=F64))
        m = torch.tril(mask.bool(), -1) if rows_sum_to_one else mask.bool()
        self.register_buffer("mask", m.clone())
        self.W = nn.Parameter((W_init.to(F64) * m).clone())
        if V_init is not None:
            self.register_buffer("V_mask", V_mask.bool().clone())
            self.V = nn.Parameter((V_init.to(F64) * V_mask).clone())
        else:
            self.V_mask, self.V = None, None
        # optional learned scale of the carried state: a_i -> a_i exp(u_i) (starts at 0: the basis' a_i)
        self.u = nn.Parameter(torch.zeros(n, dtype=F64)) if scale_a else None
        self.nfe = n
        self.name = method
        self.grid_label = "learned"
        self.info: dict[str, Any] = {}

    # --------------------------------------------------------------------------- parameters
    def grid(self) -> Tensor:
        """t (N+1,), strictly decreasing from t_max to t_end.

        Each step is at least MIN_STEP of the interval, so no step can underflow to a tie
        however far the logits r move.
        """
        w = MIN_STEP + (1.0 - self.N * MIN_STEP) * torch.softmax(self.r, 0)
        cum = torch.cat([torch.zeros(1, dtype=F64, device=w.device), torch.cumsum(w, 0)])
        t = self.t_max - (self.t_max - self.t_end) * cum
        ends = torch.tensor([self.t_max, self.t_end], dtype=F64, device=w.device)  # constants: no gradient path
        return torch.cat([ends[:1], t[1:-1], ends[1:]])

    def eval_times(self, t: Tensor) -> Tensor | None:
        if self.decouple <= 0:
            return None
        steps = t[:-1] - t[1:]  # (N,)
        left = torch.cat([steps[:1], steps[:-1]])  # step before point i (point 0: its own step)
        d = self.decouple * torch.minimum(left, steps)
        d = torch.cat([torch.zeros(1, dtype=F64, device=t.device), d[1:]])  # c_0 = t_0: endpoint fixed
        return t[:-1] + d * torch.tanh(self.delta)

    def weights(self) -> Tensor:
        if not self.rows_sum_to_one:
            return self.W * self.mask
        off = self.W * self.mask
        return off + torch.diag(1.0 - off.sum(1))

    def coef_groups(self) -> dict[str, list[nn.Parameter]]:
        g = {"grid": [self.r] + ([self.delta] if self.decouple > 0 else []), "coef": [self.W]}
        if self.V is not None:
            g["coef"].append(self.V)
        if self.u is not None:
            g["coef"].append(self.u)
        return g

    def structure(self) -> dict[str, Any]:
        """What, besides the parameter tensors, rebuilds this solver (see :func:`save_params`)."""
        return {"N": self.N, "basis": self.basis, "method": self.method, "start": self.start,
                "rows_sum_to_one": self.rows_sum_to_one, "decouple": self.decouple, "t_max": self.t_max,
                "t_end": self.t_end, "corrector": self.V is not None, "scale_a": self.u is not None}

    def tableau(self, model: Denoiser | None = None) -> Tableau:
        """The kernel tables (differentiable in the parameters)."""
        t = self.grid()
        a, phi = step_scales(self.schedule, t, self.basis)
        if self.u is not None:
            a = a * torch.exp(self.u)
        W = self.weights()
        B = phi[:, None] * W
        C = None if self.V is None else phi[:, None] * (self.V * self.V_mask)
        bm = torch.diag(torch.ones(self.N, dtype=torch.bool)) | self.mask
        return Tableau(self.basis, t, a, B, C, self.eval_times(t), name=self.method, B_mask=bm,
                       C_mask=self.V_mask)


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
        raise ArtifactError(f"no {PARAMS} at {p.parent}: this artifact keeps only its tables (fit it again to refine it)")
    try:
        with safe_open(str(p), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("kind") != PARAMS_KIND:
            raise ValueError(f"kind {meta.get('kind')!r}, expected {PARAMS_KIND!r}")
        st = json.loads(meta["structure"])
        n = int(st["N"])
        t0 = torch.linspace(float(st["t_max"]), float(st["t_end"]), n + 1, dtype=F64)
        mask = tensors["mask"].bool()
        V_mask = tensors["V_mask"].bool() if st["corrector"] else None
        V = torch.zeros(n, n + 1, dtype=F64) if st["corrector"] else None
        s = LearnedSolver(schedule, t0, st["basis"], torch.zeros(n, n, dtype=F64), mask, V, V_mask,
                          rows_sum_to_one=bool(st["rows_sum_to_one"]), decouple=float(st["decouple"]),
                          method=st["method"], start=st.get("start", ""), scale_a=bool(st["scale_a"]))
        s.load_state_dict({k: (v.bool() if k.endswith("mask") else v) for k, v in tensors.items()})
    except ArtifactError:
        raise
    except Exception as e:  # noqa: BLE001 - any defect of the file is named, not raised from deep inside
        raise ArtifactError(f"{p} is not a readable fewstep solver-parameter file ({e}); the artifact is damaged") from None
    return s


class LoadedSolver:
    """A learned solver read from disk: fixed tables plus the metadata it was saved with."""

    def __init__(self, doc: dict[str, Any], path: Path | None = None, force: bool = False) -> None:
        self.doc, self.path, self.force = doc, path, force
        self.nfe = int(doc["nfe"])
        self.name = doc.get("label") or f"{doc['method']}"
        self.grid_label = "learned"
        self.schedule = schedule_from_config(doc["schedule"])
        self._tab = tableau_from_doc(doc["tableau"], name=self.name)

    def check(self, model: Denoiser) -> None:
        """Refuse a model with another schedule or fingerprint (unless force)."""
        if self.force:
            return
        want = self.doc["model"]["fingerprint"]
        if model.schedule.config() != self.doc["schedule"]:
            raise ArtifactError(
                f"solver {self.path or self.name} was fitted for schedule {self.schedule.describe()}, "
                f"not {model.schedule.describe()}; refit it for this model (or force=True / --force)"
            )
        got = model.fingerprint()
        if got != want:
            raise ArtifactError(
                f"solver {self.path or self.name} was fitted for model {self.doc['model'].get('name')} "
                f"(fingerprint {want}), not this one (fingerprint {got}); refit it (or force=True / --force)"
            )

    def tableau(self, model: Denoiser | None = None) -> Tableau:
        if model is not None:
            self.check(model)
        return self._tab

    def learned(self) -> LearnedSolver:
        """The trainable solver behind the tables (from params.safetensors), to continue fitting.

        Refused if its tables do not reproduce the artifact's (a mixed-up or damaged folder).
        """
        if self.path is None:
            raise ArtifactError("this solver was not read from a folder; its parameters are not available")
        folder = self.path if self.path.is_dir() else self.path.parent
        params = folder / self.doc.get("params", PARAMS)
        s = load_params(params, self.schedule)
        with torch.no_grad():
            tab = s.tableau()
        for name in ("t", "a", "B"):
            if not torch.allclose(getattr(tab, name), getattr(self._tab, name), rtol=1e-9, atol=1e-12):
                raise ArtifactError(f"{params} does not reproduce {folder}'s tables ({name} differs); "
                                    f"the artifact is damaged")
        return s


def _floats(v: Tensor | None) -> Any:
    return None if v is None else v.detach().to(F64).cpu().tolist()


def tableau_to_doc(tab: Tableau) -> dict[str, Any]:
    return {"basis": tab.basis, "t": _floats(tab.t), "eval_times": _floats(tab.eval_times), "a": _floats(tab.a),
            "B": _floats(tab.B), "C": _floats(tab.C),
            "B_mask": None if tab.B_mask is None else tab.B_mask.int().tolist(),
            "C_mask": None if tab.C_mask is None else tab.C_mask.int().tolist()}


def tableau_from_doc(d: dict[str, Any], name: str = "learned") -> Tableau:
    try:
        T = lambda v: None if v is None else torch.tensor(v, dtype=F64)  # noqa: E731
        M = lambda v: None if v is None else torch.tensor(v, dtype=torch.bool)  # noqa: E731
        tab = Tableau(d["basis"], T(d["t"]), T(d["a"]), T(d["B"]), T(d.get("C")), T(d.get("eval_times")),
                      name=name, B_mask=M(d.get("B_mask")), C_mask=M(d.get("C_mask")))
        tab.validate()
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"malformed solver tables ({e}); the artifact is damaged or not a fewstep solver") from None
    t = tab.t
    if not torch.all(t[1:] < t[:-1]):
        raise ArtifactError("the artifact's grid is not strictly decreasing; it is damaged")
    return tab


def save_solver(path: str | os.PathLike, doc: dict[str, Any]) -> Path:
    """Write ``doc`` (see :func:`solver_doc`) to DIR/solver.json atomically; returns the file path."""
    p = Path(path)
    f = p if p.suffix == ".json" else p / "solver.json"
    write_text(f, json.dumps(doc, indent=1, allow_nan=False) + "\n")
    return f


def solver_doc(tab: Tableau, schedule: Schedule, model: Denoiser, method: str, **extra: Any) -> dict[str, Any]:
    """The JSON document of a learned solver."""
    return {"schema": SCHEMA, "method": method, "label": extra.pop("label", method), "nfe": tab.N,
            "schedule": schedule.config(),
            "model": {"fingerprint": model.fingerprint(), "name": model.name, "guidance_scale": model.guidance_scale},
            "grid": _floats(tab.t), "eval_times": _floats(tab.eval_times),
            "tableau": tableau_to_doc(tab), **extra}


def load_solver(path: str | os.PathLike, force: bool = False) -> LoadedSolver:
    """Read a learned solver (a directory holding solver.json, or the JSON file). Never unpickles."""
    p = Path(path)
    f = p / "solver.json" if p.is_dir() else p
    if not f.is_file():
        raise ArtifactError(f"no learned solver at {p}: expected a directory with solver.json (from `fewstep fit`)")
    try:
        doc = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{f} is not valid JSON ({e}); the artifact is damaged") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise ArtifactError(f"{f} is not a fewstep solver (schema {doc.get('schema') if isinstance(doc, dict) else None!r}, "
                            f"expected {SCHEMA!r})")
    for key in ("method", "nfe", "schedule", "model", "tableau"):
        if key not in doc:
            raise ArtifactError(f"{f} lacks the field {key!r}; the artifact is damaged")
    out = LoadedSolver(doc, p, force)
    if out._tab.N != out.nfe:
        raise ArtifactError(f"{f}: nfe {out.nfe} does not match its tables ({out._tab.N} steps)")
    if not math.isfinite(sum(out._tab.B.flatten().tolist())):
        raise ArtifactError(f"{f}: non-finite coefficients")
    return out
