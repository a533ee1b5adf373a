"""Measuring solvers: per-sample RMSE to a converged reference on held-out seeds, and optional metrics.

The reference is a long classic solve (or the model's exact solution where it has one); its
own error is reported as the RMSE between it and the same solve at twice the steps.
Noise comes from per-sample seeds (``Denoiser.noise``), so nothing depends on batch size.

With ``metrics=`` (see :mod:`fewstep.metrics.suite`) every row also gets Frechet distance /
KID, PSNR, sliced Wasserstein and exact log-likelihood where they suit the model, and the
results gain a first row for the reference solve itself (``"role": "reference"``): its
distribution metrics against the same data reference set are the floor for every solver
(model error plus the finite-sample bias at these sample counts), its RMSE is its self-error.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from .denoiser import Denoiser
from .errors import ArtifactError, FewstepError, SolverNameError
from .grids import grid_names
from .metrics.reference import DataReference, model_data, user_data
from .metrics.suite import DISTRIBUTION, ROW_KEYS, MetricSuite, parse_metrics, select_metrics
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


def check_held_out(solver: Any, lo: int, hi: int) -> None:
    """Refuse to score a learned solver on seeds [lo, hi) that it was fitted or selected on."""
    teacher = (getattr(solver, "doc", None) or {}).get("teacher") or {}
    for what in ("train_seeds", "val_seeds", "confirm_seeds"):
        a, b = teacher.get(what) or (0, 0)
        if a < hi and lo < b:
            name = getattr(solver, "path", None) or getattr(solver, "name", "learned solver")
            raise FewstepError(f"evaluation seeds [{lo}, {hi}) overlap the {what.replace('_', ' ')} [{a}, {b}) that "
                               f"{name} was fitted on: numbers on those noises are not results; evaluate on "
                               f"seeds from {EVAL_SEED_START} (the default)")


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


def _reference_pair(model: Denoiser, seeds: Sequence[int], reference: str | None, nfe: int | None,
                    batch_size: int, device: str | torch.device, twice: bool = True) -> tuple[Tensor, Tensor, str, int]:
    """(reference samples, the same solve at half the steps, solver label, NFE); exact models: both exact."""
    exact = getattr(model, "exact_solution", None)
    if reference is None and exact is not None:
        with torch.no_grad():
            noise = model.noise(list(seeds), device)
            ref = exact(noise * model.schedule.init_noise_scale()).cpu()
        return ref, ref, "exact", 0
    d_spec, d_nfe = default_reference(model)
    spec, n = reference or d_spec, int(nfe or d_nfe)
    ref2 = solve_batched(model, seeds, spec, 2 * n, batch_size=batch_size, device=device)
    ref = solve_batched(model, seeds, spec, n, batch_size=batch_size, device=device) if twice else ref2
    return ref2, ref, spec, 2 * n


def reference_samples(model: Denoiser, seeds: Sequence[int], reference: str | None = None, nfe: int | None = None,
                      batch_size: int = 500, device: str | torch.device = "cpu") -> tuple[Tensor, dict[str, Any]]:
    """Reference samples and {"solver", "nfe", "self_error"}."""
    ref2, ref, spec, n = _reference_pair(model, seeds, reference, nfe, batch_size, device)
    return ref2, {"solver": spec, "nfe": n, "self_error": float(per_sample_rmse(ref, ref2).mean())}


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
    metrics: str | Sequence[str] | None = None,
    data: Tensor | None = None,
    feature: nn.Module | str | None = None,
    data_samples: int = 2048,
    learned: Sequence[Any] = (),
) -> dict[str, Any]:
    """Compare solvers on ``samples`` held-out seeds starting at ``seed``.

    Args:
        solvers: "NAME@GRID" strings and/or learned solvers; None means every classic solver
            on every grid.
        nfe: one budget or several.
        metrics: None (RMSE only, the fast path), "auto" (every metric that suits the model), or
            names from ("fd", "kid", "fd_ref", "psnr", "swd", "loglik"); see :mod:`fewstep.metrics.suite`.
        data: the data reference set (M, *sample_shape) for fd / kid / swd; default: the model's
            data where known (:func:`fewstep.metrics.reference.model_data`), else the reference
            solver's samples on the ``data_samples`` seeds after the evaluation seeds.
        feature: feature network for fd / kid (any nn.Module, e.g. Inception with your weights,
            or "digits"); default: the built-in digits classifier for digits models.
        data_samples: size of a drawn data reference set (analytic models, reference-solver fallback).
        learned: learned solvers (artifacts) evaluated once each at their own NFE, beside ``solvers``.
    FD is biased upwards at small sample counts (see :mod:`fewstep.metrics.frechet`): compare
    rows at the same ``samples`` and read them against the reference row, which measures the floor.

    Returns:
        {"model", "nfe", "samples", "seed", "reference": {...}, "results": [{"solver", "grid",
        "nfe", "rmse", "rmse_sem", "seconds", ("error")}]}, results sorted by NFE then RMSE.
        With metrics: every result also has "fd", "kid", "kid_std", "fd_ref", "psnr", "swd", "loglik" (None
        where not measured); results[0] is the reference row ({"solver": "reference", "grid": the
        reference solver, "role": "reference", "rmse": its self-error, ...}); and "metrics" says
        what was measured against what ({"names", "feature", "data_reference": {"source", "n"[, "loglik"]}}).
    """
    nfes = [int(nfe)] if isinstance(nfe, int) else [int(n) for n in nfe]
    seeds = list(range(seed, seed + samples))
    names = None
    if parse_metrics(metrics) != ():
        names = select_metrics(model, metrics, feature)  # bad metric requests fail before any solve
    specs = list(solvers) if solvers is not None else classic_specs(model)
    for s in [*specs, *learned]:  # before any solve
        check_held_out(s, seed, seed + samples)
    t0 = time.perf_counter()
    ref, ref_half, ref_spec, ref_nfe = _reference_pair(model, seeds, reference, reference_nfe, batch_size, device)
    ref_secs = time.perf_counter() - t0
    self_err = per_sample_rmse(ref_half, ref)
    ref_info = {"solver": ref_spec, "nfe": ref_nfe, "self_error": float(self_err.mean())}
    suite, cond = None, {}
    if names is not None:
        dref = None
        if any(m in DISTRIBUTION for m in names):
            dref = _data_reference(model, data, seed + samples, data_samples, reference, reference_nfe, batch_size,
                                   device)
        suite = MetricSuite(model, names, dref, feature)
        cond = model.cond_for(seeds)
    results = []
    jobs = [(s, n) for n in nfes for s in specs] + [(s, int(s.nfe)) for s in learned]
    for s, n in jobs:
        run = run_solver(model, seeds, s, n, ref, batch_size, device, keep_samples=suite is not None)
        row = run.as_dict()
        if suite is not None:
            row.update(suite.row(run.samples, ref, cond) if run.samples is not None else dict.fromkeys(ROW_KEYS))
        results.append(row)
    results.sort(key=lambda r: (r["nfe"], math.inf if r["rmse"] is None else r["rmse"]))
    report = {
        "model": model_name or model.name,
        "nfe": nfes[0] if len(nfes) == 1 else nfes,
        "samples": samples,
        "seed": seed,
        "reference": ref_info,
        "results": results,
    }
    if suite is not None:
        sem = float(self_err.std() / math.sqrt(len(self_err))) if len(self_err) > 1 else 0.0
        results.insert(0, {"solver": "reference", "grid": ref_spec, "nfe": ref_nfe, "rmse": ref_info["self_error"],
                           "rmse_sem": sem, "seconds": ref_secs, "role": "reference",
                           **suite.row(ref, ref_half, cond)})
        report["metrics"] = suite.info()
    return report


def _data_reference(model: Denoiser, data: Tensor | None, first_seed: int, n: int, reference: str | None,
                    reference_nfe: int | None, batch_size: int, device: str | torch.device) -> DataReference:
    """The user's set, the model's data, or the reference solve on seeds [first_seed, first_seed + n)."""
    if data is not None:
        return user_data(data, model.sample_shape)
    own = model_data(model, n)
    if own is not None:
        return own
    seeds = list(range(first_seed, first_seed + int(n)))
    x, _, spec, nfe = _reference_pair(model, seeds, reference, reference_nfe, batch_size, device, twice=False)
    return DataReference(x, f"reference solve {spec} at {nfe} NFE ({n} samples, seeds {seeds[0]}..{seeds[-1]})")


def best_classic(results: list[dict[str, Any]], nfe: int) -> dict[str, Any] | None:
    """The lowest-RMSE classic result at exactly ``nfe`` evaluations."""
    ok = [r for r in results if r["nfe"] == nfe and r["rmse"] is not None and r.get("grid") != "learned"
          and r.get("role") != "reference"]
    return min(ok, key=lambda r: r["rmse"]) if ok else None


#: metric columns of format_table: (row key, header, format)
_METRIC_COLUMNS = (("fd", "FD", ".4g"), ("kid", "KID", ".3g"), ("fd_ref", "FD to ref", ".4g"),
                   ("psnr", "PSNR", ".2f"), ("swd", "SWD", ".4g"), ("loglik", "loglik", ".4g"))
#: what the "FD to ref" column measures (a caption line under tables that show it)
FD_REF_NOTE = "FD to ref: to the reference solve's samples from the same seeds"


def format_table(report: dict[str, Any], top: int | None = None) -> str:
    """Plain-text table of a report (used when rich is not installed and in tests).

    Metric columns appear for the metrics the report has; the reference row (the floor) comes first.
    """
    ref = report["reference"]
    rows = report["results"]
    cols = [c for c in _METRIC_COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    gw = max([11] + [len(str(r["grid"])) + 2 for r in rows])
    lines = [f"model {report['model']}  samples {report['samples']}  seeds from {report['seed']}",
             f"reference {ref['solver']} at {ref['nfe']} NFE, self-error {ref['self_error']:.3g}"]
    info = report.get("metrics")
    if info and info.get("data_reference"):
        feat = f"; features: {info['feature']}" if info.get("feature") else ""
        lines.append(f"FD/KID/SWD against {info['data_reference']['source']}{feat}; the reference row is the floor")
    if any(k == "fd_ref" for k, _, _ in cols):
        lines.append(FD_REF_NOTE)
    lines.append(f"{'solver':<14}{'grid':<{gw}}{'nfe':>4}{'rmse':>12}{'± sem':>10}"
                 + "".join(f"{h:>10}" for _, h, _ in cols))
    shown, last_nfe = 0, None
    for r in rows:
        if r.get("role") != "reference" and r.get("grid") != "learned":  # learned rows always show
            if r["nfe"] != last_nfe:
                shown, last_nfe = 0, r["nfe"]
            if top is not None and shown >= top:
                continue
            shown += 1
        head = f"{r['solver']:<14}{str(r['grid']):<{gw}}{r['nfe']:>4}"
        if r["rmse"] is None:
            lines.append(f"{head}{'—':>12}  {(r.get('error') or '')[:60]}")
            continue
        extra = "".join(f"{'—':>10}" if r.get(k) is None else f"{r[k]:>10{fmt}}" for k, _, fmt in cols)
        lines.append(f"{head}{r['rmse']:>12.4g}{r['rmse_sem']:>10.2g}{extra}")
    return "\n".join(lines)


__all__ = ["ALL_GRIDS", "Run", "best_classic", "check_held_out", "classic_specs", "default_reference", "evaluate",
           "format_table", "grid_names", "per_sample_rmse", "reference_samples", "run_solver", "solve_batched"]
