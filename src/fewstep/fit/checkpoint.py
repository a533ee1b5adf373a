"""Resumable fits: the whole fit state in one safetensors file, written atomically.

The file holds the learned solver's current and best parameters, the relaxed latents, the
optimizer state of the phase in progress (tensors), and a JSON document in the metadata (the
fit's key, step counters, validation history, the chosen start). It is rewritten after every
validation, so a killed fit loses at most ``eval_every`` steps, and a fit started again with the
same model, method, settings, teacher and seeds continues from it and ends exactly where an
uninterrupted run would. A checkpoint for other settings is ignored (and replaced); it records those settings,
so :meth:`FitCheckpoint.other_fit` can name what differs. Settings that change how a fit runs but not what it
computes (``RESULT_NEUTRAL``: the micro-batch, activation checkpointing) are not part of a fit's key: a fit
interrupted for lack of memory resumes with a smaller micro-batch. The checkpoint also records what the fit
has spent so far (network evaluations), so a resumed fit's cost is the whole fit's.

Under several processes every process holds the same state (but only the relaxed latents of the noises it
owns): saving gathers the latents and rank 0 writes; any number of processes can resume from the file.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..cost import Cost
from ..distributed import current
from ..errors import FewstepError
from ..io import atomic_path, sha256_tensors
from .loop import FitState, Relax, finite_or_none

NAME = "fit-checkpoint.safetensors"
KIND = "fewstep.fit-checkpoint/1"


def fit_key(parts: dict[str, Any]) -> str:
    """A hash of everything that determines a fit's trajectory."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def differences(have: Any, want: dict[str, Any]) -> list[str]:
    """What differs between two fits' key parts (:func:`fit_key`'s input; the fit settings under ``cfg``), as
    ``name old -> new`` (``have`` may be anything read from a file)."""

    def flat(p: dict[str, Any]) -> dict[str, Any]:
        return {**{k: v for k, v in p.items() if k != "cfg"}, **(p.get("cfg") or {})}

    if not isinstance(have, dict) or not isinstance(have.get("cfg", {}), dict):
        return ["its settings are not recorded (a checkpoint of an older fewstep)"]
    old, new = flat(have), flat(want)
    new = json.loads(json.dumps(new, default=str))  # as the file holds it (tuples: lists)
    return [f"{k} {old.get(k)!r} -> {v!r}" for k, v in new.items() if old.get(k) != v]


def spent_cost(model: Any, base: Cost) -> Cost:
    """What ``model.cost`` counted since ``base``, summed over the processes (a collective)."""
    c = model.cost - base
    return Cost(*current().sum_ints([c.forward, c.backward, c.rows]))


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


RESTART = "run the same command with --restart (fit(..., resume=False)) to start the fit over"


class FitCheckpoint:
    """Save and restore a fit's state at ``folder/fit-checkpoint.safetensors``.

    The file carries a checksum over its tensors and its JSON document; a damaged or edited
    checkpoint is refused in one line that names it and the fix (``--restart``).
    """

    def __init__(self, folder: str | Path, key: str, parts: dict[str, Any] | None = None) -> None:
        self.path = Path(folder) / NAME
        self.key = key
        self.parts = parts  # what the key hashes, recorded so that another fit can say what differs
        self._spend: tuple[Any, Cost, Cost] | None = None

    def count_from(self, model: Any, before: Cost) -> None:
        """Record in every later save what the fit has spent: ``before`` (its interrupted runs') plus what
        ``model.cost`` counts from now on (every process's)."""
        self._spend = (model, before, model.cost.copy())

    def save(
        self,
        state: FitState,
        solver: torch.nn.Module,
        opt: torch.optim.Optimizer | None,
        relax: Relax | None,
        extra: dict[str, Any],
    ) -> None:
        from safetensors.torch import save_file

        d = current()
        spent = None
        if self._spend is not None:  # a collective under several processes: before rank 0 alone goes on
            model, before, base = self._spend
            spent = (before + spent_cost(model, base)).as_dict()
        offsets = None if relax is None else relax.offsets
        # each process updates the latents of the noises it owns: gather
        if relax is not None and offsets is not None and d.world > 1:
            keep = relax.mine if relax.mine is not None else torch.full((offsets.shape[0],), d.main)
            keep = keep.to(offsets.device).view(-1, *[1] * (offsets.dim() - 1))
            offsets = d.sum_rows(
                torch.where(keep, offsets, torch.zeros((), dtype=offsets.dtype, device=offsets.device))
            )
        if not d.main:  # every process holds the same state; rank 0 writes it
            return
        tensors = {f"cur.{k}": v.detach().cpu().contiguous() for k, v in solver.state_dict().items()}
        if state.best is not None:
            tensors.update({f"best.{k}": v.detach().cpu().contiguous() for k, v in state.best.items()})
        if offsets is not None:
            tensors["relax.offsets"] = offsets.detach().cpu().contiguous()
        opt_plain = None
        opt_state = opt.state_dict() if opt is not None else state.opt_state  # a phase stopped part-way keeps its own
        if opt_state is not None:
            t, opt_plain = _flatten_opt(opt_state)
            tensors.update(t)
        doc = {
            "kind": KIND,
            "key": self.key,
            "step": state.step,
            "phase": state.phase,
            "phase_step": state.phase_step,
            "best_val": finite_or_none(state.best_val),
            "history": state.history,
            "seconds": state.seconds,
            "skipped": state.skipped,
            "exhausted": state.exhausted,
            "opt": opt_plain,
            "settings": self.parts,
            "spent": spent,
            **extra,
        }
        text = json.dumps(doc, allow_nan=False)
        with atomic_path(self.path) as tmp:
            save_file(tensors, str(tmp), metadata={"doc": text, "checksum": _checksum(tensors, text)})

    def _read(self) -> tuple[dict[str, Any], dict[str, Tensor]] | None:
        """(document, tensors) of a checkpoint that belongs to this fit; None if absent or another fit's."""
        if not self.path.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), "pt") as f:
                meta = f.metadata() or {}
                doc = json.loads(meta.get("doc", "{}"))
                if not isinstance(doc, dict) or doc.get("kind") != KIND or doc.get("key") != self.key:
                    return None
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  # safe_open is not iterable
        except Exception as e:  # noqa: BLE001 - a damaged checkpoint is named, not used
            raise self._refuse(f"is unreadable ({_first_line(e)})") from None
        if meta.get("checksum") != _checksum(tensors, meta.get("doc", "")):
            raise self._refuse("does not match its checksum (edited or damaged)")
        bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise self._refuse(f"holds NaN or inf in {bad[0]}")
        if (
            not isinstance(doc.get("start"), str)
            or not isinstance(doc.get("ranking"), list)
            or not all(
                isinstance(r, list) and len(r) == 2 and isinstance(r[0], (int, float)) and isinstance(r[1], str)
                for r in doc["ranking"]
            )
        ):
            raise self._refuse("is malformed (its start or ranking)")
        if doc.get("spent") is not None and _spent(doc) is None:
            raise self._refuse("is malformed (its spend)")
        return doc, tensors

    def other_fit(self) -> list[str] | None:
        """What differs (``name old -> new``) if the checkpoint in the folder is of another fit; None if there is
        none or it is this fit's (a checkpoint that cannot be read is left to :meth:`peek` to refuse)."""
        if not self.path.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), "pt") as f:
                doc = json.loads((f.metadata() or {}).get("doc", "{}"))
        except Exception:  # noqa: BLE001 - unreadable: peek() names it
            return None
        if not isinstance(doc, dict) or doc.get("kind") != KIND or doc.get("key") == self.key:
            return None
        return differences(doc.get("settings"), self.parts or {}) or ["its key"]

    def _refuse(self, problem: str) -> FewstepError:
        return FewstepError(f"fit checkpoint {self.path} {problem}: {RESTART}")

    def peek(self) -> dict[str, Any] | None:
        """The checkpoint's JSON document if it belongs to this fit, else None."""
        got = self._read()
        return None if got is None else got[0]

    def load(self, solver: torch.nn.Module, relax: Relax | None) -> tuple[FitState, dict[str, Any]] | None:
        """Restore into ``solver`` (and ``relax``); None if there is no checkpoint for this fit."""
        got = self._read()
        if got is None:
            return None
        doc, tensors = got
        cur = {k[4:]: v for k, v in tensors.items() if k.startswith("cur.")}
        best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        try:
            want = {k: tuple(v.shape) for k, v in solver.state_dict().items()}
            for what, part in (("current", cur), ("best", best or cur)):
                got_shapes = {k: tuple(v.shape) for k, v in part.items()}
                if got_shapes != want:
                    raise ValueError(f"its {what} parameters do not fit this solver")
            state = FitState(
                step=_int(doc, "step"),
                phase=_int(doc, "phase"),
                phase_step=_int(doc, "phase_step"),
                best_val=math.inf if doc.get("best_val") is None else float(doc["best_val"]),
                best=best or None,
                history=_history(doc),
                seconds=float(doc["seconds"]),
                skipped=int(doc.get("skipped", 0)),
                exhausted=bool(doc.get("exhausted", False)),
                opt_state=_unflatten_opt(tensors, doc["opt"]) if doc.get("opt") else None,
            )
            if state.opt_state is not None:
                _check_opt(state.opt_state)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise self._refuse(f"is malformed ({_first_line(e)})") from None
        solver.load_state_dict(cur)
        if relax is not None and "relax.offsets" in tensors:
            relax.offsets = tensors["relax.offsets"]
        return state, doc

    def remove(self) -> None:
        """Delete the checkpoint (rank 0; every process waits until it is gone)."""
        d = current()
        if d.main:
            self.path.unlink(missing_ok=True)
        d.barrier()


def _checksum(tensors: dict[str, Tensor], doc: str) -> str:
    return sha256_tensors(tensors, doc.encode(), layout=True)


def spent_before(doc: dict[str, Any] | None) -> Cost:
    """What the interrupted runs of a fit spent up to its checkpoint ``doc`` (zero without one, or for a checkpoint
    that does not record it)."""
    return (None if doc is None else _spent(doc)) or Cost()


def _spent(doc: dict[str, Any]) -> Cost | None:
    s = doc.get("spent")
    keys = ("forward_evals", "backward_evals", "network_rows")
    if not isinstance(s, dict) or not all(
        isinstance(s.get(k), int) and not isinstance(s.get(k), bool) and s[k] >= 0 for k in keys
    ):
        return None
    return Cost(*(s[k] for k in keys))


def _int(doc: dict[str, Any], key: str) -> int:
    v = doc[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{key} is {v!r}, not a step count")
    return v


def _history(doc: dict[str, Any]) -> list[dict[str, float | None]]:
    h = doc["history"]
    if not isinstance(h, list) or not all(isinstance(e, dict) and "step" in e for e in h):
        raise ValueError("history is not a list of validation records")
    return list(h)


def _check_opt(opt_state: dict[str, Any]) -> None:
    groups = opt_state.get("param_groups")
    if not isinstance(groups, list) or not all(
        isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups
    ):
        raise ValueError("the optimiser state has no parameter groups")
    ids = {p for g in groups for p in g["params"]}
    if not set(opt_state["state"]) <= ids:
        raise ValueError("the optimiser state names parameters its groups do not hold")


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:160] if lines else type(e).__name__
