"""``FewStepScheduler``: any fewstep solver inside an unmodified diffusers pipeline.

    >>> pipe.scheduler = FewStepScheduler.from_solver("unipc@logsnr", pipe.scheduler.config, nfe=5)
    >>> pipe.scheduler = FewStepScheduler.from_solver(fewstep.load_solver("out/solver"), denoiser)

It is the kernel's :class:`~fewstep.solvers.kernel.Stepper` plus a diffusers config: step i receives
the raw network output at the evaluation point x_i (guidance already applied by the pipeline),
converts it to the tableau's basis (F_i) and lets the stepper correct x_i and predict x_{i+1}.
``timesteps`` are the network times of the evaluation times c_i, exactly what the pipeline passes on
to its network: fractional DDPM indices for VP models, sigma * num_train_timesteps for flows (Flux's
pipeline divides by 1000 itself), so decoupled learned evaluation times work unchanged.

What the pipelines ask of a scheduler (read from diffusers' SD, SDXL, DiT, PixArt-Sigma, SD3 and Flux
pipelines), and what this one gives:

- ``set_timesteps(num_inference_steps, device, timesteps=, sigmas=, mu=)``: resets the history and puts
  ``timesteps`` (float32, N entries) on ``device``. The tableau fixes the grid and its N steps, so a
  pipeline's ``num_inference_steps``, its default ``sigmas`` (Flux always passes them, with ``mu``) and
  ``mu`` (SD3 with dynamic shifting) describe a grid this solver does not use: they are accepted and
  ignored, with one info-level log line (once per distinct call). Only ``num_inference_steps`` together
  with ``timesteps=`` is refused, as diffusers' own DDPM / Euler / DPM-Solver schedulers refuse it
  (no pipeline's ``retrieve_timesteps`` passes both).
- ``order = 1``; ``init_noise_sigma`` (1 for VP and flow models); ``scale_model_input`` (identity);
  ``sigmas`` (N + 1 float32 noise levels of the evaluation times, then of the last grid time: sigma / alpha
  for VP models as Euler-type schedulers report it, the flow sigma t for flows); ``step_index``,
  ``begin_index`` and ``set_begin_index(0)`` (SDXL, Flux call it).
- ``step(model_output, timestep, sample, return_dict=False)`` returns ``(prev_sample, pred_original_sample)``
  shaped like ``sample``. The arithmetic is elementwise with per-step scalars (sigma at the evaluation
  time for the conversion to the tableau's basis), so any latent layout works: Flux's packed
  (B, seq, 64) latents, DiT's doubled cond / uncond batch.
- ``add_noise`` (the marginal alpha x0 + sigma noise at a timestep), for pipelines that start from it at
  strength 1.

Everything that defines the solver is in the config, so ``save_pretrained`` / ``from_pretrained``
round-trip exactly; a pipeline saved with it records this module, so ``DiffusionPipeline.from_pretrained``
loads it back (or ``FewStepScheduler.from_pretrained(dir, subfolder="scheduler")``).
Image-to-image part-way along the grid (``set_begin_index(k)`` with k > 0, strength < 1) is refused:
the tableau is one solve from the noise end to the data.

A learned solver is fitted at one sample size (a pipeline's ``height`` / ``width``). The config records it
(``fitted_for``: the latent shape, the image size, and a flow pipeline's resolution-dependent shift ``mu``), and
the first ``step`` of a run at another size is refused in one line (:class:`~fewstep.errors.ArtifactError`)
naming both sizes and the fix: a fit at that size, or ``from_solver(..., force=True)``, which runs it with one
warning instead. Measured on zoo:scenes-sd (S4S-Alt NFE 5, guidance 4, two fit seeds, 128 held-out noises): fitted
at 32x32 and run at 64x64, RMSE 0.308 against 0.279 for fits at 64x64 (+10%; +5% and +16% by seed), so another
size is refused rather than only warned about (see :mod:`fewstep.solvers.model_match`).
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput, logging
from torch import Tensor

from ..conversions import to_basis
from ..denoiser import Denoiser
from ..errors import ArtifactError, FewstepError, SolverNameError
from ..schedules import Flow, Schedule, VPDiscrete, schedule_from_config
from ..solvers.artifact import LoadedSolver, tableau_from_doc, tableau_to_doc
from ..solvers.kernel import Stepper, Tableau
from ..solvers.learned import LearnedSolver
from ..solvers.model_match import forced_note
from ..solvers.resolve import ClassicSolver, Solver, resolve_solver, some_scale
from .diffusers_in import PREDICTION_TYPES, prediction_name, schedule_from_diffusers

logger = logging.get_logger(__name__)
DIFFUSERS_NAMES = {v: k for k, v in PREDICTION_TYPES.items()}


@dataclass
class FewStepSchedulerOutput(BaseOutput):
    """prev_sample: x_{i+1} (B, ...); pred_original_sample: the data prediction D at this evaluation."""

    prev_sample: Tensor
    pred_original_sample: Tensor | None = None


class FewStepScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler running one fewstep tableau (classic or learned).

    Config: ``schedule`` (fewstep schedule config), ``prediction_type`` (diffusers name of what the
    network outputs), either ``solver`` ("NAME@GRID") with ``nfe``, ``grid`` (explicit list or name,
    overrides @GRID) and ``solver_options``, or ``tableau`` (a learned solver's tables as lists).
    Build it with :meth:`from_solver`.
    """

    config_name = "scheduler_config.json"
    order = 1
    _compatibles: list[str] = []

    @register_to_config
    def __init__(
        self,
        schedule: dict[str, Any] | None = None,
        prediction_type: str = "epsilon",
        solver: str | None = "unipc@logsnr",
        nfe: int | None = 5,
        grid: str | list[float] | None = None,
        solver_options: dict[str, Any] | None = None,
        tableau: dict[str, Any] | None = None,
        solver_label: str | None = None,
        num_train_timesteps: int = 1000,
        flow_grid: dict[str, Any] | None = None,
        fitted_for: dict[str, Any] | None = None,
        force: bool = False,
    ) -> None:
        if not schedule:
            raise FewstepError(
                "FewStepScheduler needs the model's schedule: build it with "
                "FewStepScheduler.from_solver(solver, pipe.scheduler.config, nfe=N)"
            )
        sched = schedule_from_config(dict(schedule))
        self._schedule = sched
        self._prediction = prediction_name("FewStepScheduler", prediction_type)  # what the outputs are converted from
        if tableau is not None:
            tab = tableau_from_doc(dict(tableau), name=solver_label or "learned")
        else:
            tab = _classic_tableau(sched, solver, nfe, grid, solver_options or {})
        self.tab = tab
        self._stepper = Stepper(tab, sched)
        self._timesteps = torch.tensor([sc.t_net for sc in self._stepper.scalars], dtype=torch.float32)
        self.timesteps = self._timesteps.clone()
        self._sigmas = _noise_levels(sched, self._stepper.times.detach(), tab.t[-1].detach())
        self.sigmas = self._sigmas.clone()
        self.init_noise_sigma = float(sched.init_noise_scale())
        self.num_inference_steps = tab.N
        self._told: set[str] = set()
        self._begin_index: int | None = None
        self._mu: float | None = None  # the shift the pipeline passed for this run's image size
        self._reset()

    # --------------------------------------------------------------------------- construction
    @classmethod
    def from_solver(
        cls,
        solver: Any,
        schedule: Any,
        nfe: int | None = None,
        grid: Any = None,
        prediction_type: str | None = None,
        force: bool = False,
        **solver_options: Any,
    ) -> FewStepScheduler:
        """A scheduler running ``solver`` for the model described by ``schedule``.

        Args:
            solver: a classic "NAME@GRID" spec, a learned-solver directory, a loaded or in-memory
                learned solver (``.tableau(model)``), or a :class:`~fewstep.Tableau`.
            schedule: the model: a :class:`~fewstep.Denoiser` (learned solvers are checked against
                its fingerprint), a diffusers scheduler or config dict, or a fewstep Schedule (then
                pass ``prediction_type``).
            nfe: evaluations for a classic solver (a learned solver fixes its own; must agree if given).
            grid: grid name or explicit (nfe + 1,) list of solver times for a classic solver.
            prediction_type: what the network outputs (diffusers or fewstep name); overrides the schedule's.
            force: use a learned solver fitted for another model or another sample size anyway (one warning
                instead of the refusal, here and when a pipeline runs it at another size).
            solver_options: keyword arguments of the classic solver (e.g. ``order=3``).
        """
        model = schedule if isinstance(schedule, Denoiser) else None
        flow_grid = None
        if model is not None:
            sched, pred = model.schedule, model.prediction
            flow_grid = model.identity.get("flow_grid")
        elif isinstance(schedule, Schedule):
            if prediction_type is None:
                raise FewstepError("with a fewstep Schedule, pass prediction_type= (what the network outputs)")
            sched, pred = schedule, prediction_type  # converted below
        else:
            info = schedule_from_diffusers(schedule)
            sched, pred, flow_grid = info.schedule, info.prediction, info.flow_grid
        if prediction_type is not None:
            pred = prediction_name("FewStepScheduler", prediction_type)
        kw: dict[str, Any] = dict(
            schedule=sched.config(),
            prediction_type=DIFFUSERS_NAMES[pred],
            num_train_timesteps=_train_steps(sched),
            flow_grid=flow_grid,
        )
        spec = solver
        if isinstance(solver, (str, os.PathLike)):
            solver = resolve_solver(str(solver), sched, nfe, grid, force=force, **solver_options)
        if isinstance(solver, ClassicSolver):
            if grid is not None and not isinstance(grid, str):
                grid = [float(v) for v in torch.as_tensor(grid, dtype=torch.float64).flatten().tolist()]
            spec = str(spec) if isinstance(spec, (str, os.PathLike)) else solver.name
            _classic_tableau(sched, spec, solver.budget, grid, solver_options)  # fail now, not on load
            return cls(solver=spec, nfe=solver.budget, grid=grid, solver_options=solver_options or None, **kw)
        if solver_options or grid is not None:
            raise FewstepError("grid and solver options apply to classic solvers only; a tableau fixes its own")
        s = resolve_solver(solver)
        if isinstance(s, LoadedSolver):
            s, sched = _forced(s, force), _fitted_schedule(s, sched, model, flow_grid)
            kw["schedule"] = sched.config()
            note = forced_note(s.doc, model, f"solver {s.path or s.name}", sizes=False) if s.force and model else None
            if note:  # another size is told per run, where the pipeline's size is known
                warnings.warn(note, stacklevel=2)
        tab = _learned_tableau(s, sched, model)
        if nfe is not None and int(nfe) != tab.N:
            raise FewstepError(f"solver {tab.name} makes {tab.N} evaluations, not nfe={nfe}; drop nfe or refit")
        fitted = _fitted_for(s, model)
        return cls(
            solver=None,
            nfe=tab.N,
            tableau=tableau_to_doc(tab),
            solver_label=tab.name,
            fitted_for=fitted,
            force=bool(force or getattr(s, "force", False)) if fitted else False,
            **kw,
        )

    def _reset(self) -> None:
        self._step_index: int | None = None

    # --------------------------------------------------------------------------- diffusers API
    @property
    def step_index(self) -> int | None:
        """The next step's index (None before the first step of a run)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """0 once a pipeline called ``set_begin_index(0)``, else None."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Only 0: the tableau is one solve from the noise end (img2img part-way is refused)."""
        if int(begin_index) != 0:
            raise FewstepError(
                f"FewStepScheduler cannot start at step {int(begin_index)} (an img2img / inpainting "
                f"strength below 1): its tableau is one solve from the noise end; use strength=1 or "
                f"the pipeline's own scheduler"
            )
        self._begin_index = 0

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: Any = None,
        sigmas: Any = None,
        mu: float | None = None,
        **kwargs: Any,
    ) -> None:
        """Reset the solver history and place ``timesteps`` (and ``sigmas``) on ``device``.

        The solver's own grid and its N steps are part of the solver: a different ``num_inference_steps``
        and the pipeline's ``timesteps`` / ``sigmas`` / ``mu`` (its default grid) are ignored, with one
        info-level log line. ``num_inference_steps`` together with ``timesteps=`` is refused (as in
        diffusers' DDPM / Euler / DPM-Solver schedulers). Other keyword arguments are ignored.
        """
        if num_inference_steps is not None and timesteps is not None:
            raise FewstepError(
                "set_timesteps takes num_inference_steps or timesteps=, not both (as diffusers' "
                "schedulers require); either way FewStepScheduler runs its solver's own grid"
            )
        n = self.num_inference_steps
        ignored = []
        if num_inference_steps is not None and int(num_inference_steps) != n:
            ignored.append(f"num_inference_steps={int(num_inference_steps)}")
        for key, v in (("timesteps", timesteps), ("sigmas", sigmas)):
            if v is not None:
                ignored.append(f"{key} ({len(v)} values)" if hasattr(v, "__len__") else key)
        if mu is not None:
            ignored.append(f"mu={float(mu):.4g}")
        self._mu = None if mu is None else float(mu)
        if ignored:
            msg = (
                f"FewStepScheduler: solver {self.tab.name} runs its own grid with {n} evaluations; ignoring the "
                f"pipeline's {', '.join(ignored)}"
            )
            if msg not in self._told:
                self._told.add(msg)
                logger.info(msg)
        self.timesteps = self._timesteps.to(device) if device is not None else self._timesteps.clone()
        self.sigmas = self._sigmas.to(device) if device is not None else self._sigmas.clone()
        self._reset()

    def scale_model_input(self, sample: Tensor, timestep: Any = None) -> Tensor:
        """The network takes the state as is (VP and flow models): identity."""
        return sample

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Any) -> Tensor:
        """alpha(t) x0 + sigma(t) noise at the solver time of each network timestep (shapes (B, ...)).

        For pipelines that make their starting state from an image at strength 1 (the first timestep);
        a start part-way is refused by :meth:`set_begin_index`.
        """
        sched = self._schedule
        t = sched.solver_time(torch.as_tensor(timesteps, dtype=torch.float64).detach().cpu().flatten())
        al, sg = sched.alpha(t), sched.sigma(t)
        if t.numel() == 1:
            al, sg = al.expand(original_samples.shape[0]), sg.expand(original_samples.shape[0])
        view = (-1,) + (1,) * (original_samples.dim() - 1)

        def conv(v: Tensor) -> Tensor:
            return v.to(original_samples.device, original_samples.dtype).view(view)

        return conv(al) * original_samples + conv(sg) * noise.to(original_samples.dtype)

    def __len__(self) -> int:
        return int(self.config["num_train_timesteps"])

    def _index(self, timestep: Any) -> int:
        i = self._step_index if self._step_index is not None else (self._begin_index or 0)
        n = self.num_inference_steps
        if i >= n:
            raise FewstepError(f"the solver's {n} steps are done: call set_timesteps() before another run")
        got = float(torch.as_tensor(timestep).flatten()[0])
        want = float(self._timesteps[i])
        if not math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-5):
            raise FewstepError(
                f"step {i} got timestep {got:g} but the solver evaluates at {want:g}: step through "
                f"scheduler.timesteps in order, after set_timesteps()"
            )
        return i

    def step(
        self, model_output: Tensor, timestep: Any, sample: Tensor, return_dict: bool = True, **kwargs: Any
    ) -> FewStepSchedulerOutput | tuple[Tensor, Tensor]:
        """One evaluation: the output at the evaluation point x_i -> x_{i+1} (shapes (B, ...)); extra kwargs ignored."""
        i = self._index(timestep)
        if i == 0:
            self._check_size(sample)
        st = self._stepper
        work = torch.promote_types(sample.dtype, torch.float32)  # the solver state: float32 under a half pipeline
        if sample.dtype != work:
            return self._half_step(i, model_output, sample, work, return_dict)
        if i == 0:
            st.start(sample)
        out = model_output.to(sample.dtype)
        sc = st.scalars[i]
        F = to_basis(self._prediction, out, sample, self.tab.basis, sc)
        x_next = st.step(i, F.clone() if F is model_output else F, x_eval=sample)
        self._step_index = i + 1
        D = F if self.tab.basis == "D" else to_basis(self._prediction, out, sample, "D", sc)
        if not return_dict:
            return (x_next, D)
        return FewStepSchedulerOutput(prev_sample=x_next, pred_original_sample=D)

    def _check_size(self, sample: Tensor) -> None:
        """Refuse (one line) a run whose latents are not the size the learned solver was fitted at; with
        ``force``, one warning instead. ``sample``: (B, ...) as the pipeline passes it (Flux: packed)."""
        fitted = self.config.get("fitted_for") or {}
        shape = tuple(sample.shape[1:])
        note = size_mismatch(fitted, shape, self._mu)
        if note is None:
            return
        if not self.config.get("force"):
            size = _run_size(fitted, shape)
            how = f"--height {size[0]} --width {size[1]}" if size else "--height H --width W"
            raise ArtifactError(
                f"FewStepScheduler: {note}: a solver fitted at one size does not carry over to another; fit one at "
                f"this size (fewstep fit ... {how}), or build the scheduler with "
                f"FewStepScheduler.from_solver(..., force=True) to use it anyway"
            )
        msg = f"FewStepScheduler: {note}; using it anyway (force=True): expect a larger error than a fit at this size"
        if msg not in self._told:
            self._told.add(msg)
            warnings.warn(msg, stacklevel=3)

    def _half_step(
        self, i: int, model_output: Tensor, sample: Tensor, work: torch.dtype, return_dict: bool
    ) -> FewStepSchedulerOutput | tuple[Tensor, Tensor]:
        """:meth:`step` for a pipeline whose latents are in half precision: the solver state stays in ``work``
        (float32), as ``fewstep.sample`` keeps it; the pipeline gets its latents back in their own dtype. A
        ``sample`` that is what the last step returned continues from the float32 state; one the pipeline
        changed in between (a mask blended in) is taken as given."""
        st = self._stepper
        if i == 0:
            x = st.start(sample.to(work))
        else:
            last = self.__dict__.get("_returned")
            x = st.state_at_eval() if last is not None and torch.equal(sample, last) else sample.to(work)
        out = model_output.to(work)
        sc = st.scalars[i]
        F = to_basis(self._prediction, out, x, self.tab.basis, sc)
        x_next = st.step(i, F.clone() if F is model_output else F, x_eval=x)
        self._step_index = i + 1
        D = F if self.tab.basis == "D" else to_basis(self._prediction, out, x, "D", sc)
        prev, D = x_next.to(sample.dtype), D.to(sample.dtype)
        self.__dict__["_returned"] = prev
        if not return_dict:
            return (prev, D)
        return FewStepSchedulerOutput(prev_sample=prev, pred_original_sample=D)


def _noise_levels(sched: Schedule, times: Tensor, t_last: Tensor) -> Tensor:
    """``sigmas`` as diffusers pipelines know them, (N + 1,) float32: the noise level of each evaluation time
    and of the last grid time; the flow sigma (= t) for flows, sigma / alpha (Euler-type schedulers' sigma)
    otherwise."""
    t = torch.cat([times.to(torch.float64).flatten(), t_last.to(torch.float64).reshape(1)])
    with torch.no_grad():
        lev = sched.sigma(t) if sched.kind == "flow" else sched.s(t)
    return lev.to(torch.float32)


def _train_steps(sched: Schedule) -> int:
    if isinstance(sched, VPDiscrete):
        return sched.T
    if isinstance(sched, Flow):
        return int(round(sched.time_scale))
    return 1000


def _classic_tableau(
    sched: Schedule, solver: str | None, nfe: int | None, grid: Any, options: dict[str, Any]
) -> Tableau:
    if not solver:
        raise FewstepError("FewStepScheduler needs solver='NAME@GRID' or a learned tableau")
    s = resolve_solver(str(solver), sched, nfe, grid, **options)
    if not isinstance(s, ClassicSolver):
        raise SolverNameError(f"{solver!r} is not a classic solver name")
    if s.info.stages > 1:
        raise SolverNameError(
            f"{s.name} takes {s.info.stages} evaluations per step at repeated timesteps; "
            f"FewStepScheduler runs multistep solvers (one evaluation per step): choose another"
        )
    return s.tableau(sched)


def _shape(v: Any) -> str:
    return "x".join(str(int(d)) for d in v)


def size_mismatch(fitted: dict[str, Any], shape: tuple[int, ...], mu: float | None = None) -> str | None:
    """What differs between the size a learned solver was fitted at (``fitted``: the scheduler config's
    ``fitted_for``) and a pipeline's latents of per-sample ``shape`` (and the flow shift ``mu`` it passed for its
    image size): "solver X was fitted for 32x32 images (latent 4x8x8), this pipeline runs 64x64 images (latent
    4x16x16)", or None when they agree (or nothing was recorded). Packed latents (Flux's (seq, 64)) are compared
    by their number of values."""
    want = fitted.get("sample_shape")
    if not want:
        return None
    want = [int(v) for v in want]
    same = list(shape) == want if len(shape) == len(want) else math.prod(shape) == math.prod(want)
    if same:
        return None
    img, size = fitted.get("image_size"), _run_size(fitted, shape)
    was = f"{_shape(img)} images (latent {_shape(want)})" if img else f"samples {_shape(want)}"
    now = f"samples {_shape(shape)}"
    if size:
        now = f"{_shape(size)} images (latent {_shape(shape)})"
    elif img:
        now = f"another image size (latents {_shape(shape)}: {math.prod(shape)} values a sample, not {math.prod(want)})"
    note = f"{fitted.get('what', 'the solver')} was fitted for {was}, this pipeline runs {now}"
    fitted_mu = fitted.get("mu")
    if fitted_mu is not None and mu is not None and not math.isclose(float(fitted_mu), mu, rel_tol=1e-6):
        note += (
            f", and it shifts its flow schedule with the image size (mu {float(fitted_mu):.4g} fitted, "
            f"{mu:.4g} now): the fitted times were placed for the other shift"
        )
    return note


def _run_size(fitted: dict[str, Any], shape: tuple[int, ...]) -> list[int] | None:
    """The (height, width) in pixels of a run's unpacked (C, h, w) latents, at the fitted image size's pixels per
    latent cell; None for packed latents or without a recorded image size."""
    img, want = fitted.get("image_size"), fitted.get("sample_shape") or []
    if not img or len(shape) != 3 or len(want) != 3 or shape[0] != want[0] or not (want[1] and want[2]):
        return None
    return [int(shape[1]) * int(img[0]) // int(want[1]), int(shape[2]) * int(img[1]) // int(want[2])]


def _forced(s: LoadedSolver, force: bool) -> LoadedSolver:
    """``s``, or the same solver with ``force`` set (it is not checked against the model)."""
    if not force or s.force:
        return s
    forced = copy.copy(s)
    forced.force = True
    return forced


def _fitted_schedule(s: LoadedSolver, sched: Schedule, model: Denoiser | None, flow_grid: Any) -> Schedule:
    """The schedule to check ``s`` against without a model: a flow pipeline with dynamic shifting knows its
    shift (mu) only at an image size, so its config's schedule lacks the ``grid_shift`` the solver recorded;
    the solver's own schedule stands in when they agree on everything else (the size is checked per run)."""
    rec = s.doc.get("schedule")
    dynamic = isinstance(flow_grid, dict) and bool(flow_grid.get("use_dynamic_shifting"))
    if model is not None or not dynamic or not isinstance(rec, dict) or not isinstance(sched, Flow):
        return sched
    mine = {k: v for k, v in sched.config().items() if k != "grid_shift"}
    if mine != {k: v for k, v in rec.items() if k != "grid_shift"}:
        return sched
    return schedule_from_config(dict(rec))


def _fitted_for(s: Solver, model: Denoiser | None) -> dict[str, Any] | None:
    """The size a learned solver was fitted at, for the per-run check: ``{"what", "sample_shape", "image_size",
    "mu"}`` from a loaded solver's record, else from ``model`` (an in-memory solver is taken to be for the
    model it is built with); None when neither says."""
    if isinstance(s, LoadedSolver):
        parts = (s.doc.get("model") or {}).get("parts") or {}
        shape, identity = parts.get("sample_shape"), parts.get("identity")
        gs = (s.doc.get("schedule") or {}).get("grid_shift") or {}
        what = f"solver {s.path or s.name}"
    elif model is not None:
        shape, identity = model.sample_shape, model.identity
        gs = model.schedule.config().get("grid_shift") or {}
        what = f"solver {getattr(s, 'name', 'learned')}"
    else:
        return None
    if not shape:
        return None
    img = _image_size_of(identity)
    mu = gs.get("mu") if isinstance(gs, dict) else None
    return {
        "what": what,
        "sample_shape": [int(v) for v in shape],
        "image_size": img,
        "mu": None if mu is None else float(mu),
    }


def _image_size_of(identity: Any) -> list[int] | None:
    """(height, width) from a pipeline model's identity (its family's ``image_size``), else None."""
    if not isinstance(identity, dict):
        return None
    for v in [identity, *[x for x in identity.values() if isinstance(x, dict)]]:
        size = v.get("image_size")
        if isinstance(size, (list, tuple)) and len(size) == 2:
            return [int(size[0]), int(size[1])]
    return None


def _learned_tableau(solver: Any, sched: Schedule, model: Denoiser | None) -> Tableau:
    s: Solver = resolve_solver(solver)
    if isinstance(s, LoadedSolver):
        if model is None and not s.force:
            warnings.warn(
                f"solver {s.path or s.name} can only be checked against the schedule here, not against the "
                f"network it was fitted for; pass the model (FewStepScheduler.from_solver(solver, "
                f"from_diffusers(unet, config))) to check its fingerprint too",
                stacklevel=3,
            )
        w = None
        if s.guidance_range is not None:
            if model is None:
                raise ArtifactError(
                    f"solver {s.path or s.name} is fitted across guidance scales: pass the model "
                    f"(FewStepScheduler.from_solver(solver, model)) so its scale picks the tables"
                )
            w = some_scale(model, s)
        with torch.no_grad():
            return s.tableau(model if model is not None else sched, w=w)
    if isinstance(s, LearnedSolver) and s.schedule.config() != sched.config():
        raise ArtifactError(
            f"solver {s.name} was made for {s.schedule.describe()}, not this model's {sched.describe()}"
        )
    with torch.no_grad():
        return s.tableau(model).validate()
