"""Measuring solvers: per-sample RMSE to a converged reference on held-out seeds.

The reference is a long classic solve (or the model's exact solution where it has one); its
own error is reported as the RMSE between it and the same solve at twice the steps.
Noise comes from per-sample seeds (``Denoiser.noise``), so nothing depends on batch size.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor

from .denoiser import Denoiser
from .errors import ArtifactError, FewstepError, SolverNameError
from .grids import grid_names
from .sampling import parse_solver, sample
from .seeds import EVAL_SEED_START
from .solvers.classic import SOLVERS, SPECIAL
from .solvers.heun import heun_nfe, heun_steps

#: grids each classic solver is run on when no solver is named
ALL_GRIDS = ("time", "quadratic", "logsnr", "karras")


def default_reference(model: Denoiser) -> tuple[str, int]:
    """A converged reference solve: (NAME@GRID, NFE)."""
    if model.schedule.kind == "flow":
        return "adams4@time", 400
    return "dpmpp_3m@logsnr", 400


def classic_specs(model: Denoiser) -> list[str]:
    """Every classic solver on every grid that suits the model's schedule."""
    out = []
    for name in list(SOLVERS) + list(SPECIAL):
        if name in ("unipc_bh2",):  # alias of unipc
            continue
        if model.schedule.kind == "flow" and SOLVERS.get(name) is not None and SOLVERS[name].make.__name__ in (
            "ipndm", "deis", "deis_tab"):
            continue  # need alpha > 0 at the noise end
        for g in ALL_GRIDS:
            out.append(f"{name}@{g}")
    return out


def per_sample_rmse(x: Tensor, ref: Tensor) -> Tensor:
    """RMSE over all but the batch dimension: shape (B,)."""
    return (x - ref).double().flatten(1).pow(2).mean(1).sqrt()


@dataclass
class Run:
    """What one solver did on the evaluation noise."""

    solver: str
    grid: str | None
    nfe: int
    rmse: float | None = None
    rmse_sem: float | None = None
    seconds: float | None = None
    error: str | None = None
    samples: Tensor | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        d = {"solver": self.solver, "grid": self.grid, "nfe": self.nfe, "rmse": self.rmse,
             "rmse_sem": self.rmse_sem, "seconds": self.seconds}
        if self.error:
            d["error"] = self.error
        return d


def _label(solver: Any) -> tuple[str, str | None]:
    if isinstance(solver, str):
        return parse_solver(solver)
    return getattr(solver, "name", type(solver).__name__), getattr(solver, "grid_label", "learned")


def solve_batched(model: Denoiser, seeds: Sequence[int], solver: Any, nfe: int | None, grid: Any = "logsnr",
                  batch_size: int = 500, device: str | torch.device = "cpu") -> Tensor:
    """Samples for ``seeds`` with ``solver`` in batches; identical for any batch size."""
    outs = []
    with torch.no_grad():
        for k in range(0, len(seeds), batch_size):
            chunk = list(seeds[k:k + batch_size])
            noise = model.noise(chunk, device)
            outs.append(sample(model, noise, solver, nfe=nfe, grid=grid, cond=model.cond_for(chunk, device)).cpu())
    return torch.cat(outs)


def reference_samples(model: Denoiser, seeds: Sequence[int], reference: str | None = None, nfe: int | None = None,
                      batch_size: int = 500, device: str | torch.device = "cpu") -> tuple[Tensor, dict[str, Any]]:
    """Reference samples and {"solver", "nfe", "self_error"}."""
    exact = getattr(model, "exact_solution", None)
    if reference is None and exact is not None:
        with torch.no_grad():
            noise = model.noise(list(seeds), device)
            ref = exact(noise * model.schedule.init_noise_scale()).cpu()
        return ref, {"solver": "exact", "nfe": 0, "self_error": 0.0}
    d_spec, d_nfe = default_reference(model)
    spec, n = reference or d_spec, int(nfe or d_nfe)
    ref = solve_batched(model, seeds, spec, n, batch_size=batch_size, device=device)
    ref2 = solve_batched(model, seeds, spec, 2 * n, batch_size=batch_size, device=device)
    self_err = float(per_sample_rmse(ref, ref2).mean())
    return ref2, {"solver": spec, "nfe": 2 * n, "self_error": self_err}


def run_solver(model: Denoiser, seeds: Sequence[int], solver: Any, nfe: int, ref: Tensor,
               batch_size: int = 500, device: str | torch.device = "cpu", keep_samples: bool = False) -> Run:
    """Evaluate one solver; a solver that cannot run records its error instead of raising."""
    name, grid = _label(solver)
    used = nfe
    if isinstance(solver, str) and name in SPECIAL:
        try:
            used = heun_nfe(heun_steps(nfe))
        except FewstepError as e:
            return Run(name, grid, nfe, error=str(e))
    elif not isinstance(solver, str):
        used = int(getattr(solver, "nfe", nfe))
    t0 = time.perf_counter()
    try:
        x = solve_batched(model, seeds, solver, nfe, batch_size=batch_size, device=device)
    except (ArtifactError, SolverNameError):
        raise  # the user named something that cannot run on this model: stop, do not tabulate
    except FewstepError as e:
        return Run(name, grid, used, error=str(e))
    secs = time.perf_counter() - t0
    r = per_sample_rmse(x, ref)
    sem = float(r.std() / math.sqrt(len(r))) if len(r) > 1 else 0.0
    return Run(name, grid, used, float(r.mean()), sem, secs, samples=x if keep_samples else None)


def evaluate(
    model: Denoiser,
    nfe: int | Iterable[int] = 5,
    solvers: Sequence[Any] | None = None,
    samples: int = 256,
    seed: int = EVAL_SEED_START,
    reference: str | None = None,
    reference_nfe: int | None = None,
    batch_size: int = 500,
    device: str | torch.device = "cpu",
    model_name: str | None = None,
) -> dict[str, Any]:
    """Compare solvers on ``samples`` held-out seeds starting at ``seed``.

    Args:
        solvers: "NAME@GRID" strings and/or learned solvers; None means every classic solver
            on every grid.
        nfe: one budget or several.
    Returns:
        {"model", "nfe", "samples", "seed", "reference": {...}, "results": [{"solver", "grid",
        "nfe", "rmse", "rmse_sem", "seconds", ("error")}]}, results sorted by NFE then RMSE.
    """
    nfes = [int(nfe)] if isinstance(nfe, int) else [int(n) for n in nfe]
    seeds = list(range(seed, seed + samples))
    ref, ref_info = reference_samples(model, seeds, reference, reference_nfe, batch_size, device)
    specs = list(solvers) if solvers else classic_specs(model)
    results = []
    for n in nfes:
        for s in specs:
            results.append(run_solver(model, seeds, s, n, ref, batch_size, device).as_dict())
    results.sort(key=lambda r: (r["nfe"], math.inf if r["rmse"] is None else r["rmse"]))
    return {
        "model": model_name or model.name,
        "nfe": nfes[0] if len(nfes) == 1 else nfes,
        "samples": samples,
        "seed": seed,
        "reference": ref_info,
        "results": results,
    }


def best_classic(results: list[dict[str, Any]], nfe: int) -> dict[str, Any] | None:
    """The lowest-RMSE classic result at exactly ``nfe`` evaluations."""
    ok = [r for r in results if r["nfe"] == nfe and r["rmse"] is not None and r.get("grid") != "learned"]
    return min(ok, key=lambda r: r["rmse"]) if ok else None


def format_table(report: dict[str, Any], top: int | None = None) -> str:
    """Plain-text table of a report (used when rich is not installed and in tests)."""
    ref = report["reference"]
    lines = [f"model {report['model']}  samples {report['samples']}  seeds from {report['seed']}",
             f"reference {ref['solver']} at {ref['nfe']} NFE, self-error {ref['self_error']:.3g}",
             f"{'solver':<14}{'grid':<11}{'nfe':>4}{'rmse':>12}{'± sem':>10}"]
    rows = report["results"]
    shown = 0
    last_nfe = None
    for r in rows:
        if r["nfe"] != last_nfe:
            shown, last_nfe = 0, r["nfe"]
        if top is not None and shown >= top:
            continue
        shown += 1
        if r["rmse"] is None:
            lines.append(f"{r['solver']:<14}{str(r['grid']):<11}{r['nfe']:>4}{'—':>12}  {r.get('error', '')[:60]}")
        else:
            lines.append(f"{r['solver']:<14}{str(r['grid']):<11}{r['nfe']:>4}{r['rmse']:>12.4g}{r['rmse_sem']:>10.2g}")
    return "\n".join(lines)


__all__ = ["ALL_GRIDS", "Run", "best_classic", "classic_specs", "default_reference", "evaluate", "format_table",
           "grid_names", "per_sample_rmse", "reference_samples", "run_solver", "solve_batched"]
