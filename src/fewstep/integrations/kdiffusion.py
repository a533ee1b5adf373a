"""k-diffusion-style samplers from any fewstep solver.

    >>> from fewstep.integrations.kdiffusion import sampler
    >>> sample_unipc = sampler("unipc")                       # classic: runs on the sigmas it is given
    >>> x = sample_unipc(model_wrap, noise * sigmas[0], sigmas, extra_args=extra)
    >>> sample_fitted = sampler("out/solver")                 # learned: runs its own grid
    >>> x = sample_fitted(model_wrap, noise * sample_fitted.sigmas[0], sample_fitted.sigmas)

:func:`sampler` returns ``fn(model, x, sigmas, extra_args=None, callback=None, disable=None)``, the
signature k-diffusion's ``sample_*`` functions have and the UIs built on k-diffusion call. Nothing here
imports k-diffusion.

k-diffusion's convention
------------------------
The state is VE-parameterised, x = x0 + sigma eps, and ``model(x, sigma * s_in, **extra_args)`` returns
the denoised x0 (k-diffusion's ``CompVisDenoiser`` / ``DiscreteEpsDDPMDenoiser`` / ``DiscreteVDDPMDenoiser``
wrap a VP network so). ``sigmas`` decrease and end at 0, and the sampler starts from x = noise * sigmas[0].
``callback`` gets ``{"x", "i", "sigma", "sigma_hat", "denoised"}`` once per step, after that step's model
call: x is the solution at sigma (after a corrector, the corrected state), denoised the model's output.

Classic solvers (``NAME`` or ``NAME@GRID``, options as keyword arguments)
------------------------------------------------------------------------
The given sigmas are the grid (a ``@GRID`` suffix is not used: k-diffusion's caller chose the grid). The
tableau is the registry's, built on the VE schedule alpha = 1, sigma = t (:class:`~fewstep.EDM` with
sigma_max = sigmas[0]); the model's denoised output is the data prediction D, so E = (x - D) / sigma and
the velocity dx/dsigma = E. ``sampler("euler")`` is k-diffusion's ``sample_euler`` and ``sampler("heun")``
its ``sample_heun`` (Euler on the last step to 0). ``sampler("dpmpp_2m")`` is ``sample_dpmpp_2m``: both
take a first-order first step and a first-order last step when sigmas end at 0; fewstep's default
``lower_order_final=True`` also lowers the last step when they do not (fewer than 15 steps), k-diffusion
never does, so pass ``lower_order_final=False`` to match it on such sigmas.

Learned solvers (an artifact, a LearnedSolver, a Tableau with ``model=``)
------------------------------------------------------------------------
A learned solver runs its own grid, in the VE frame of the model it was fitted on. With the source
schedule x = alpha(t) x0 + sigma(t) eps, the VE state is y = x / alpha and its noise level s = sigma / alpha;
the denoiser is the same function in both frames (D(x, t) = D_ve(x / alpha(t), s(t))), and so are the
noise prediction E = (x - alpha D) / sigma = (y - D) / s and the source-frame velocity
F = alpha'(c) D + sigma'(c) E (computed from D and E with the source schedule's derivatives). Only the
states change. The kernel (states x_k, evaluation times c_i, F_j in the tableau's basis)

    x_{i+1} = a_i x_i + sum_j B[i, j] F_j,        corrected x_{i+1} = a_i x_i + sum_j C[i, j] F_j,

is linear in the states, so scaling state k by any r_k > 0, Y_k = x_k / r_k, gives exactly

    a'_i = a_i r_i / r_{i+1},    B'[i, j] = B[i, j] / r_{i+1},    C'[i, j] = C[i, j] / r_{i+1}

(predicted and corrected x_{i+1} are both state i + 1, so share r_{i+1}). The model is called at state i
with time c_i, so its VE input must be x_i / alpha(c_i): take r_i = alpha(c_i) for i < N and
r_N = alpha(t_N). Then every state Y_i is exactly the VE point the model sees, at noise level
s'_i = s(c_i): in the VE frame the tableau is coupled (evaluation times = grid) on
t' = (s(c_0), ..., s(c_{N-1}), s(t_N)), and decoupled evaluation times live in a', B', C'. Y_N = y_N is the
VE sample (= x_N when t_N is the clean end, alpha = 1).

So the learned sampler needs len(sigmas) - 1 == its steps and sigmas[0] == s(c_0) (relative ``rtol``);
the other sigmas are not used. ``fn.sigmas`` holds t' to pass. The start x (noise * sigmas[0]) is
Y_0 = x_0 / alpha(c_0): the same solve as ``fewstep.sample(model, noise * sigma(c_0), solver)`` on the
source model (VP: sigma(c_0) = sqrt(1 - alpha^2) ~ 1). A flow solver that starts at t = 1 (alpha = 0) has
no finite VE sigma there and is refused.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
from collections.abc import Callable, Iterable
from typing import Any, Protocol, cast

import torch
from torch import Tensor

from ..conversions import to_basis
from ..denoiser import Denoiser
from ..errors import FewstepError, SolverNameError
from ..schedules import EDM, F64, Schedule, TimeScalars
from ..solvers.kernel import Stepper, Tableau
from ..solvers.learned import LearnedSolver
from ..solvers.registry import make_tableau, solver_info
from ..solvers.resolve import ClassicSolver, TableauSolver, is_artifact_spec, parse_solver, resolve_solver

logger = logging.getLogger(__name__)

__all__ = ["KSampler", "sampler", "ve_tableau"]


class KSampler(Protocol):
    """A k-diffusion-signature sampler: ``fn(model, x, sigmas, extra_args=None, callback=None, disable=None)``.

    x: (B, ...) the start state (noise * sigmas[0]); sigmas: (N + 1,) decreasing noise levels; returns the
    final state, shaped like x. ``sigmas`` (attribute): a learned solver's VE grid to pass, None for a classic one.
    """

    solver_name: str
    kind: str
    sigmas: Tensor | None
    __name__: str
    __qualname__: str

    def __call__(
        self,
        model: Callable[..., Tensor],
        x: Tensor,
        sigmas: Tensor,
        extra_args: dict[str, Any] | None = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
        disable: bool | None = None,
    ) -> Tensor: ...


# ----------------------------------------------------------------------------- the frame change
def ve_tableau(tab: Tableau, schedule: Schedule) -> tuple[Tableau, Tensor]:
    """``tab`` (for ``schedule``) in the VE frame y = x / alpha, s = sigma / alpha (see the module docstring).

    Returns (the coupled VE tableau on t' = (s(c_0), ..., s(c_{N-1}), s(t_N)), and the source evaluation
    times c (N,) float64, where F is formed with the source schedule's alpha' and sigma').
    """
    with torch.no_grad():
        c = tab.eval_times.detach().to(F64).cpu()
        t_last = tab.t[-1:].detach().to(F64).cpu()
        r = torch.cat([schedule.alpha(c), schedule.alpha(t_last)])
        if not bool((r > 0).all()) or not bool(torch.isfinite(r).all()):
            k = int(torch.nonzero(~(r > 0))[0]) if not bool((r > 0).all()) else 0
            when = float(c[k]) if k < c.numel() else float(t_last[0])
            raise FewstepError(
                f"solver {tab.name} evaluates at t={when:g} where alpha = 0 ({schedule.describe()}): "
                f"k-diffusion's VE frame (x = x0 + sigma eps) has no finite sigma there; use a "
                f"solver whose grid starts below the noise end, or fewstep.sample"
            )
        s_grid = torch.cat([schedule.s(c), schedule.s(t_last)])
        a = tab.a.detach().to(F64).cpu() * r[:-1] / r[1:]
        B = tab.B.detach().to(F64).cpu() / r[1:, None]
        C = None if tab.C is None else tab.C.detach().to(F64).cpu() / r[1:, None]
    out = Tableau(
        basis=tab.basis,
        t=s_grid,
        a=a,
        B=B,
        C=C,
        c=None,
        name=tab.name,
        B_mask=tab.B_mask,
        C_mask=tab.C_mask,
        info={**tab.info, "frame": "ve"},
        points=tab.points,
    )
    return out.validate(), c


def _ve_schedule(levels: Tensor) -> EDM:
    """The VE schedule (alpha = 1, sigma = t) spanning the positive noise levels of a grid."""
    pos = levels[levels > 0]
    hi = float(pos.max())
    lo = float(pos.min())
    return EDM(sigma_min=lo if lo < hi else 0.5 * hi, sigma_max=hi)


# ----------------------------------------------------------------------------- the sampler
def sampler(
    solver: Any, nfe: int | None = None, *, model: Denoiser | Schedule | None = None, rtol: float = 1e-3, **options: Any
) -> KSampler:
    """A k-diffusion sampler ``fn(model, x, sigmas, extra_args=None, callback=None, disable=None) -> Tensor``.

    Args:
        solver: a classic ``"NAME"`` / ``"NAME@GRID"`` (or a ClassicSolver: its name and options), run on the
            sigmas each call is given; or a learned solver (artifact folder or solver.json, LoadedSolver,
            LearnedSolver, or a Tableau with ``model=``), run on its own grid in the VE frame.
        nfe: optional check: the evaluations a call makes (classic: on its sigmas; learned: its own).
        model: the fewstep model (or its schedule) a learned solver was fitted for: an artifact is checked
            against its fingerprint (schedule only for a Schedule); required for a bare Tableau.
        rtol: how closely sigmas[0] must match a learned solver's first noise level.
        options: keyword arguments of a classic solver's generator (e.g. ``order=3``,
            ``lower_order_final=False``).

    The returned function carries ``solver_name``, ``kind`` ("classic" or "learned") and ``sigmas``: a
    learned solver's VE grid to pass as ``sigmas`` ((N + 1,) float64), None for a classic one.
    """
    if isinstance(solver, ClassicSolver):
        options = {**dict(solver.options), **options}
        solver = solver.name
    if isinstance(solver, (str, os.PathLike)) and not is_artifact_spec(str(solver)):
        return _classic_sampler(str(solver), nfe, options)
    if options:
        raise FewstepError(
            f"solver options ({', '.join(sorted(options))}) apply to classic solvers only; "
            f"a learned solver fixes its own tables"
        )
    return _learned_sampler(solver, nfe, model, float(rtol))


def _classic_sampler(spec: str, nfe: int | None, options: dict[str, Any]) -> KSampler:
    name, grid = parse_solver(spec)
    info = solver_info(name)
    if grid is not None:
        logger.info(f"k-diffusion sampler {name}: the sigmas of each call are its grid; @{grid} is not used")
    try:  # unknown options fail now, not at the first call
        probe = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5, 0.2, 0.1, 0.0], dtype=F64)
        make_tableau(info.name, _ve_schedule(probe), probe, **options)
    except TypeError as e:
        params = [p for p in inspect.signature(info.make).parameters if p not in ("schedule", "t")]
        raise SolverNameError(
            f"{name} does not take {', '.join(sorted(options))} ({e}); its options: {', '.join(params) or 'none'}"
        ) from None

    def tables(sigmas: Tensor) -> tuple[Tableau, Tensor, EDM]:
        grid_t = _check_sigmas(sigmas, name)
        steps = grid_t.numel() - 1
        cost = info.cost(steps, final_zero=float(grid_t[-1]) == 0.0)
        if nfe is not None and cost != int(nfe):
            raise FewstepError(
                f"{name} on these {steps}-step sigmas makes {cost} evaluations, not nfe={nfe}: "
                f"pass sigmas for that budget or drop nfe"
            )
        sched = _ve_schedule(grid_t)
        tab = make_tableau(info.name, sched, grid_t, **options)
        return tab, tab.eval_times.detach().to(F64), sched

    return _make_fn(tables, name, classic=True, grid=None)


def _learned_sampler(solver: Any, nfe: int | None, model: Any, rtol: float) -> KSampler:
    s = resolve_solver(solver)
    if isinstance(model, Denoiser):
        source = model.schedule
    elif isinstance(model, Schedule):
        source = model
    elif model is None:
        own = getattr(s, "schedule", None)
        if not isinstance(own, Schedule) or isinstance(s, TableauSolver):
            raise FewstepError(
                "a bare Tableau does not say which model it is for: pass model= (the fewstep "
                "Denoiser or Schedule it was made for)"
            )
        source = own
    else:
        raise FewstepError(f"model must be a fewstep Denoiser or Schedule; got {type(model).__name__}")
    if isinstance(s, LearnedSolver) and s.schedule.config() != source.config():
        raise FewstepError(f"solver {s.name} was made for {s.schedule.describe()}, not {source.describe()}")
    with torch.no_grad():
        tab = s.tableau(model if model is not None else source).validate()
    if nfe is not None and int(nfe) != tab.N:
        raise FewstepError(f"solver {tab.name} makes {tab.N} evaluations, not nfe={nfe}; drop nfe")
    vtab, c = ve_tableau(tab, source)
    want = vtab.solution_times()  # the VE noise levels of its solution points (= t' unless staged)
    steps = want.numel() - 1
    with torch.no_grad():
        scal = [(float(da), float(ds)) for da, ds in zip(source.d_alpha(c), source.d_sigma(c), strict=True)]

    def tables(sigmas: Tensor) -> tuple[Tableau, Tensor, EDM]:
        got = _check_sigmas(sigmas, tab.name, learned=True)
        first, start = float(got[0]), float(want[0])
        if got.numel() - 1 != steps or not math.isclose(first, start, rel_tol=rtol):
            raise FewstepError(
                f"learned solver {tab.name} runs its own grid: it needs sigmas with {steps} steps starting at "
                f"sigma {start:.6g} (got {got.numel() - 1} steps from {first:.6g}); pass the sampler's .sigmas"
            )
        return vtab, vtab.t[:-1], _ve_schedule(vtab.t)

    return _make_fn(tables, tab.name, classic=False, grid=want.clone(), scalars=scal)


def _check_sigmas(sigmas: Any, name: str, learned: bool = False) -> Tensor:
    """sigmas as a float64 CPU tensor: 1-D, finite, >= 0, strictly decreasing (one-line errors)."""
    t = (
        torch.as_tensor(sigmas).detach().to("cpu", F64).flatten()
        if not isinstance(sigmas, Tensor)
        else sigmas.detach().to("cpu", F64).flatten()
    )
    if t.numel() < 2:
        raise FewstepError(f"{name}: sigmas need at least 2 noise levels (one step); got {t.numel()}")
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        raise FewstepError(f"{name}: sigmas must be finite and >= 0")
    if learned:
        return t
    d = t[1:] - t[:-1]
    if not bool((d < 0).all()):
        k = int(torch.nonzero(d >= 0)[0])
        raise FewstepError(
            f"{name}: sigmas must decrease strictly; sigmas[{k}]={float(t[k]):g} is followed by {float(t[k + 1]):g}"
        )
    return t


def _make_fn(
    tables: Callable[[Tensor], tuple[Tableau, Tensor, EDM]],
    name: str,
    classic: bool,
    grid: Tensor | None,
    scalars: list[tuple[float, float]] | None = None,
) -> KSampler:
    """The k-diffusion-signature function: a loop over the kernel's Stepper feeding it the model's D.

    ``grid``: the ``sigmas`` the function carries (a learned solver's (N + 1,) VE grid; None for a classic one).
    """

    @torch.no_grad()
    def fn(
        model: Callable[..., Tensor],
        x: Tensor,
        sigmas: Tensor,
        extra_args: dict[str, Any] | None = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
        disable: bool | None = None,
    ) -> Tensor:
        extra_args = {} if extra_args is None else extra_args
        tab, levels, sched = tables(sigmas)
        n = tab.N
        stepper = Stepper(tab, sched)
        lev = levels.tolist()
        index = tab.solution_index()
        basis = tab.basis
        sig_t = sigmas if isinstance(sigmas, Tensor) else torch.as_tensor(sigmas)
        xe = stepper.start(x)
        for i in _steps(n, disable):
            s = lev[i]
            denoised = model(xe, x.new_full((x.shape[0],), s), **extra_args)
            # the data prediction in the VE frame (alpha = 1, sigma = s), its velocity with the source
            # schedule's derivatives (a classic solver: the VE's own, alpha' = 0 and sigma' = 1)
            da, ds = (0.0, 1.0) if scalars is None else scalars[i]
            F = to_basis("x0", denoised, xe, basis, TimeScalars(1.0, s, da, ds))
            xe = stepper.step(i, F)
            k = index[i]  # the solution step this evaluation opens (None: an internal stage)
            if callback is not None and k is not None:
                sig = sig_t[k] if classic else sig_t.new_tensor(s)
                callback({"x": stepper.state, "i": k, "sigma": sig, "sigma_hat": sig, "denoised": denoised})
        return xe

    out = cast(KSampler, fn)  # a plain function, given KSampler's attributes here
    out.solver_name = name
    out.kind = "classic" if classic else "learned"
    out.sigmas = grid
    out.__name__ = f"sample_fewstep_{name}".replace("-", "_")
    out.__qualname__ = out.__name__
    return out


def _steps(n: int, disable: bool | None) -> Iterable[int]:
    """range(n), with a tqdm progress bar as k-diffusion shows one (when tqdm is installed)."""
    if disable is True:
        return range(n)
    try:
        from tqdm.auto import trange
    except ImportError:  # pragma: no cover - tqdm is optional
        return range(n)
    return trange(n, disable=disable)
