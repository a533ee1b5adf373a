"""Resumable fits: the whole fit state in one safetensors file, written atomically.

The file holds the learned solver's current and best parameters, the relaxed latents, the
optimizer state of the phase in progress (tensors), and a JSON document in the metadata (the
fit's key, step counters, validation history, the chosen start). It is rewritten after every
validation, so a killed fit loses at most ``eval_every`` steps, and a fit started again with the
same model, method, settings, teacher and seeds continues from it and ends exactly where an
uninterrupted run would. A checkpoint for other settings is ignored (and replaced).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import FewstepError
from ..io import atomic_path
from .loop import FitState, Relax

NAME = "fit-checkpoint.safetensors"
KIND = "fewstep.fit-checkpoint/1"


def fit_key(parts: dict[str, Any]) -> str:
    """A hash of everything that determines a fit's trajectory."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _flatten_opt(opt_state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors: dict[str, Tensor] = {}
    plain: dict[str, Any] = {"param_groups": opt_state["param_groups"], "state": {}}
    for pid, st in opt_state["state"].items():
        plain["state"][str(pid)] = {}
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"opt.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                plain["state"][str(pid)][k] = v
    return tensors, plain


def _unflatten_opt(tensors: dict[str, Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(pid): dict(v) for pid, v in plain["state"].items()}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": plain["param_groups"]}


class FitCheckpoint:
    """Save and restore a fit's state at ``folder/fit-checkpoint.safetensors``."""

    def __init__(self, folder: str | Path, key: str) -> None:
        self.path = Path(folder) / NAME
        self.key = key

    def save(self, state: FitState, solver: torch.nn.Module, opt: torch.optim.Optimizer | None,
             relax: Relax | None, extra: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        tensors = {f"cur.{k}": v.detach().cpu().contiguous() for k, v in solver.state_dict().items()}
        if state.best is not None:
            tensors.update({f"best.{k}": v.detach().cpu().contiguous() for k, v in state.best.items()})
        if relax is not None and relax.offsets is not None:
            tensors["relax.offsets"] = relax.offsets.detach().cpu().contiguous()
        opt_plain = None
        if opt is not None:
            t, opt_plain = _flatten_opt(opt.state_dict())
            tensors.update(t)
        doc = {"kind": KIND, "key": self.key, "step": state.step, "phase": state.phase,
               "phase_step": state.phase_step, "best_val": state.best_val, "history": state.history,
               "seconds": state.seconds, "opt": opt_plain, **extra}
        with atomic_path(self.path) as tmp:
            save_file(tensors, str(tmp), metadata={"doc": json.dumps(doc)})

    def peek(self) -> dict[str, Any] | None:
        """The checkpoint's JSON document if it belongs to this fit, else None."""
        if not self.path.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), "pt") as f:
                doc = json.loads((f.metadata() or {}).get("doc", "{}"))
        except Exception as e:  # noqa: BLE001 - a damaged checkpoint is named, not used
            raise FewstepError(f"fit checkpoint {self.path} is unreadable ({e}): delete it to start the fit over") from None
        return doc if doc.get("kind") == KIND and doc.get("key") == self.key else None

    def load(self, solver: torch.nn.Module, relax: Relax | None) -> tuple[FitState, dict[str, Any]] | None:
        """Restore into ``solver`` (and ``relax``); None if there is no checkpoint for this fit."""
        if not self.path.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), "pt") as f:
                doc = json.loads((f.metadata() or {}).get("doc", "{}"))
                if doc.get("kind") != KIND or doc.get("key") != self.key:
                    return None
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # noqa: BLE001 - a damaged checkpoint is named, then ignored
            raise FewstepError(f"fit checkpoint {self.path} is unreadable ({e}): delete it to start the fit over") from None
        cur = {k[4:]: v for k, v in tensors.items() if k.startswith("cur.")}
        best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        solver.load_state_dict(cur)
        if relax is not None and "relax.offsets" in tensors:
            relax.offsets = tensors["relax.offsets"]
        state = FitState(step=int(doc["step"]), phase=int(doc["phase"]), phase_step=int(doc["phase_step"]),
                         best_val=float(doc["best_val"]), best=best or None, history=list(doc["history"]),
                         seconds=float(doc["seconds"]),
                         opt_state=_unflatten_opt(tensors, doc["opt"]) if doc.get("opt") else None)
        return state, doc

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
