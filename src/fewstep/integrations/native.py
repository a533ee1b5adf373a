"""A pipeline's own scheduler run on fewstep's model: what the unmodified pipeline samples at a given NFE.

Users of a diffusers pipeline compare against what it does by default. :class:`OwnScheduler` is that default
as a row of an evaluation (``fewstep.evaluate(..., solvers=[OwnScheduler(5)])``): a fresh copy of the scheduler
the pipeline ships, set to the most inference steps whose timesteps fit in ``nfe`` network evaluations (PNDM's
PLMS spends one more evaluation than it has steps), then the pipeline's loop: ``scale_model_input``, one guided
network call at the scheduler's timestep, ``step``. The network call is the model's (:meth:`Denoiser.raw`, the
call fewstep's own solvers make, counted the same way), so the samples are the pipeline's own for the same
noise, prompts and guidance (``tests/test_native.py`` checks them against the pipeline's ``__call__``: bit for
bit, or to float rounding where a pipeline batches its guidance halves in the other order).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..denoiser import Denoiser
from ..errors import FewstepError


def pipeline_scheduler(model: Denoiser) -> Any:
    """A fresh copy of the scheduler ``model``'s pipeline ships (its state is set per solve)."""
    family = getattr(model, "family", None)
    pipe = getattr(family, "pipe", None)
    sched = getattr(pipe, "scheduler", None)
    if sched is None:
        raise FewstepError(
            f"{model.name} is not a diffusers pipeline (load one with diffusers:DIR or a zoo pipeline): "
            f"it has no scheduler of its own to compare against"
        )
    return type(sched).from_config(copy.deepcopy(dict(sched.config)))


def _set_steps(sched: Any, steps: int, model: Denoiser) -> None:
    """``set_timesteps`` as the pipeline calls it (a flow scheduler with resolution-dependent shifting gets the
    model's ``mu``)."""
    mu = (getattr(model.schedule, "grid_shift", None) or {}).get("mu")
    if getattr(sched.config, "use_dynamic_shifting", False) and mu is not None:
        sched.set_timesteps(steps, mu=float(mu))
    else:
        sched.set_timesteps(steps)


def steps_for(model: Denoiser, nfe: int) -> int:
    """The most inference steps of ``model``'s pipeline scheduler whose timesteps fit in ``nfe`` evaluations."""
    sched = pipeline_scheduler(model)
    for steps in range(int(nfe), 0, -1):
        _set_steps(sched, steps, model)
        if len(sched.timesteps) <= nfe:
            return steps
    raise FewstepError(f"{type(sched).__name__} needs more than {nfe} network evaluations for one step")


@dataclass(frozen=True)
class OwnScheduler:
    """The pipeline's own scheduler at ``nfe`` evaluations, as an evaluation row (grid label "own")."""

    nfe: int
    kind: str = "classic"
    grid_label: str = "own"
    guidance_range: tuple[float, float] | None = None

    def label(self, model: Denoiser) -> str:
        """The row's solver name: ``pipeline:<SchedulerClass>``."""
        return f"pipeline:{type(pipeline_scheduler(model)).__name__}"

    def solve(self, model: Denoiser, noise: Tensor, cond: dict[str, Any]) -> Tensor:
        """Samples (B, *sample_shape) from standard ``noise`` (B, *sample_shape), as the pipeline's loop makes them."""
        sched = pipeline_scheduler(model)
        _set_steps(sched, steps_for(model, self.nfe), model)
        x = noise.to(torch.float32) * float(getattr(sched, "init_noise_sigma", 1.0))  # flow schedulers: unit noise
        scale_input = getattr(sched, "scale_model_input", None)  # flow schedulers do not scale the network input
        with torch.no_grad():
            for t in sched.timesteps:
                x_in = x if scale_input is None else scale_input(x, t)
                t_net = float(t)
                out = model.raw(x_in, model.schedule.solver_time(torch.tensor(t_net)), t_net=t_net, **cond)
                x = sched.step(out, t, x, return_dict=False)[0]
        return x

    def samples(self, model: Denoiser, seeds: Sequence[int], device: str | torch.device = "cpu") -> Tensor:
        """Samples of ``seeds`` (their noise and conditions), on the CPU."""
        seeds = list(seeds)
        return self.solve(model, model.noise(seeds, device), model.cond_for(seeds, device)).cpu()


__all__ = ["OwnScheduler", "pipeline_scheduler", "steps_for"]
