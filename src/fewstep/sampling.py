"""``fewstep.sample``: run any solver (classic name, tableau or learned solver) on a model."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor

from .denoiser import Denoiser
from .errors import FewstepError, ShapeError
from .solvers.kernel import Tableau, run_tableau
from .solvers.registry import classic_default
from .solvers.resolve import Solver, parse_solver, resolve_solver

__all__ = [
    "build_tableau",
    "check_max_batch",
    "check_noise",
    "chunk_size",
    "default_solver",
    "parse_solver",
    "sample",
    "solve",
    "state_dtype",
]


def default_solver(model: Denoiser) -> str:
    """A sound classic default: ``adams2@time`` for flows (logSNR grids crowd the steps at the ends of
    a flow's path), ``dpmpp_3m@logsnr`` otherwise. ``fewstep eval`` finds the best for a model."""
    name, grid, _ = classic_default(model.schedule, "sample")
    return f"{name}@{grid}"


def build_tableau(model: Denoiser, solver: Any, nfe: int | None, grid: Any = "logsnr", **solver_kwargs: Any) -> Tableau:
    """The tables of ``solver`` (anything :func:`~fewstep.solvers.resolve.resolve_solver` takes) for ``model``."""
    return resolve_solver(solver, model, nfe, grid, **solver_kwargs).tableau(model)


def sample(
    model: Denoiser,
    noise: Tensor,
    solver: Any = None,
    nfe: int | None = 5,
    grid: str | Sequence[float] | Tensor = "logsnr",
    callback: Callable[[dict[str, Any]], None] | None = None,
    return_trajectory: bool = False,
    cond: dict[str, Any] | None = None,
    use_checkpoint: bool = False,
    max_batch: int | None = None,
    **solver_kwargs: Any,
) -> Tensor | tuple[Tensor, list[Tensor]]:
    """Sample ``model`` from standard ``noise`` with ``nfe`` model evaluations.

    Args:
        model: a :class:`~fewstep.Denoiser`.
        noise: unit-variance starting noise, shape (B, *model.sample_shape).
        solver: a classic solver name (optionally ``NAME@GRID``), a learned-solver folder, a Tableau,
            or a learned solver; None: :func:`default_solver`.
        nfe: the NFE budget of a classic solver (a multi-stage one such as ``heun`` takes as many steps
            as fit; a learned solver fixes its own).
        grid: grid name (time, quadratic, logsnr, karras) or an explicit list of steps + 1 times.
        callback: called after every step with {"i", "t", "x", "F"}.
        return_trajectory: also return the list of states at the grid times.
        cond: conditioning keyword arguments for the network (e.g. class_labels).
        max_batch: solve at most this many samples at once (default :func:`chunk_size`): a batch of
            millions of noises is solved in chunks with flat memory (the callback then runs per chunk).
    Returns:
        samples of the same shape as ``noise`` (and the trajectory if asked). Differentiable. The solver
        state is float32 whatever the noise's precision (:func:`state_dtype`; float64 noise: float64), so
        fp16 / bf16 noise gives the float32 solve of the same noise, returned in float32; the network runs
        in the model's ``dtype`` (or its weights' dtype). A batch of 0 noises gives an empty result.
    """
    check_noise(model, noise)
    check_max_batch(max_batch)
    s = resolve_solver(solver if solver is not None else default_solver(model), model, nfe, grid, **solver_kwargs)
    x = noise.to(state_dtype(noise.dtype)) * model.schedule.init_noise_scale()
    n = x.shape[0]
    if n == 0:  # nothing to solve: no network call, an empty result of the right shape
        return (x, [x] * len(s.tableau(model).solution_times())) if return_trajectory else x
    chunk = max_batch or chunk_size(tuple(noise.shape[1:]))
    parts = [(k, min(n, k + chunk)) for k in range(0, n, chunk)]  # a long batch in chunks: flat memory
    runs = [
        solve(
            model,
            x[a:b],
            s,
            take(cond or {}, None if (a, b) == (0, n) else torch.arange(a, b), n),
            callback,
            return_trajectory,
            use_checkpoint,
        )
        for a, b in parts
    ]
    return _joined(runs, return_trajectory)


def state_dtype(noise_dtype: torch.dtype) -> torch.dtype:
    """The solver state's dtype for noise of ``noise_dtype``: float32, or float64 for float64 noise (half
    precision noise is solved in float32, as ``--dtype`` promises: only the network runs in half)."""
    return torch.promote_types(noise_dtype, torch.float32)


def check_max_batch(max_batch: Any) -> None:
    """A FewstepError naming ``max_batch`` unless it is None or a whole number of samples >= 1."""
    if max_batch is not None and (
        isinstance(max_batch, bool) or not isinstance(max_batch, numbers.Integral) or max_batch < 1
    ):
        raise FewstepError(f"max_batch must be a positive number of samples (or None: the default); got {max_batch!r}")


def check_noise(model: Denoiser, noise: Any) -> None:
    """A FewstepError (ShapeError for the type or shape) unless ``noise`` is a tensor of finite real numbers
    shaped (B, *model.sample_shape). Checked once, before any network call."""
    if not isinstance(noise, Tensor):
        raise ShapeError(f"noise must be a torch.Tensor; got {type(noise).__name__}")
    if noise.dtype.is_complex or noise.dtype == torch.bool:
        raise ShapeError(f"noise must hold real numbers; got {noise.dtype}")
    if noise.dim() == 0 or (model.sample_shape is not None and tuple(noise.shape[1:]) != model.sample_shape):
        want = "(B, " + ", ".join(map(str, model.sample_shape or ("...",))) + ")"
        raise ShapeError(f"noise has shape {tuple(noise.shape)} but this model's samples have shape {want}")
    # one reduction without a mask: NaN or inf anywhere makes the sum non-finite (so may finite values past the
    # dtype's range, hence the exact count before refusing)
    if noise.is_floating_point() and not bool(torch.isfinite(noise.sum())):
        bad = int((~torch.isfinite(noise)).sum())
        if bad:
            kind = "NaN" if bool(torch.isnan(noise).any()) else "inf"
            raise FewstepError(
                f"the noise holds {kind} ({bad} of {noise.numel()} values): pass finite starting noise "
                f"(e.g. torch.randn or model.noise(seeds))"
            )


#: the most numbers a chunk of samples holds (its network activations are a multiple of it)
CHUNK_NUMEL = 2**24
MAX_CHUNK = 8192


def chunk_size(sample_shape: tuple[int, ...]) -> int:
    """Samples :func:`sample` solves at once: at most MAX_CHUNK, and at most CHUNK_NUMEL numbers."""
    numel = 1
    for d in sample_shape:
        numel *= int(d)
    return max(1, min(MAX_CHUNK, CHUNK_NUMEL // max(numel, 1)))


def _joined(runs: list[Any], trajectory: bool) -> Tensor | tuple[Tensor, list[Tensor]]:
    if len(runs) == 1:
        return runs[0]
    if trajectory:
        # every chunk ran the same tables: its trajectory has the same number of states
        return torch.cat([r[0] for r in runs]), [torch.cat(s) for s in zip(*[r[1] for r in runs], strict=True)]
    return torch.cat(runs)


def guidance_groups(
    model: Denoiser, solver: Solver, cond: dict[str, Any], n: int
) -> list[tuple[float | None, Tensor | None]]:
    """The runs a batch of ``n`` samples needs: [(None, None)] for a solver that does not depend on the
    guidance scale, else one (scale, sample indices or None for all) per scale among the samples."""
    if solver.guidance_range is None:
        return [(None, None)]
    w = model.conditions.scale_of(cond)
    if not isinstance(w, Tensor) or w.numel() == 1 or bool((w == w.reshape(-1)[0]).all()):
        return [(float(w.reshape(-1)[0]) if isinstance(w, Tensor) else float(w), None)]
    w = w.reshape(-1).cpu()
    return [(v, torch.nonzero(w == v).flatten()) for v in sorted(set(w.tolist()))]


def take(cond: dict[str, Any], idx: Tensor | None, n: int) -> dict[str, Any]:
    """The rows ``idx`` of the per-sample tensors of ``cond`` (n rows); other values as they are."""
    if idx is None:
        return cond
    return {
        k: (v[idx.to(v.device)] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == n else v)
        for k, v in cond.items()
    }


def solve(
    model: Denoiser,
    x: Tensor,
    solver: Solver,
    cond: dict[str, Any] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    return_trajectory: bool = False,
    use_checkpoint: bool = False,
) -> Tensor | tuple[Tensor, list[Tensor]]:
    """Run a resolved solver from the scaled state x (B, ...) on the kernel: once, or, for a solver fitted
    across guidance scales, once per scale among the samples (``cond["guidance_scale"]`` per sample, else the
    model's scale), the results put back in the samples' order. Differentiable."""
    cond = cond or {}
    n = x.shape[0]
    runs: list[Tensor | tuple[Tensor, list[Tensor]]] = []
    order: list[Tensor] = []  # the sample indices of each run (none: one run over all samples)
    for w, idx in guidance_groups(model, solver, cond, n):
        xs = x if idx is None else x[idx.to(x.device)]
        runs.append(
            run_tableau(
                model,
                xs,
                solver.tableau(model, w=w) if w is not None else solver.tableau(model),
                take(cond, idx, n),
                callback,
                return_trajectory,
                use_checkpoint=use_checkpoint,
            )
        )
        if idx is not None:
            order.append(idx)
    if not order:
        return runs[0]
    inv = torch.argsort(torch.cat(order)).to(x.device)
    if return_trajectory:
        trajs = cast(list[tuple[Tensor, list[Tensor]]], runs)
        # the tables at every scale have the same shape: every trajectory has the same number of states
        return torch.cat([r[0] for r in trajs])[inv], [
            torch.cat(s)[inv] for s in zip(*[r[1] for r in trajs], strict=True)
        ]
    return torch.cat(cast(list[Tensor], runs))[inv]
