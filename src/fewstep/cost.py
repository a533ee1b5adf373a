"""What work costs: network evaluations (counted where the network is called), wall time, peak memory.

A network evaluation is one sample through the network at one time, the unit NFE counts in: a batch
of B samples is B evaluations, and a classifier-free-guided call is one evaluation per sample (its
two halves run as one batched call; ``rows`` counts what actually went through the network, 2B).
``backward`` counts the samples a backward pass went through the network for (fitting a solver
backpropagates through every student evaluation); a recomputation under activation checkpointing is
a forward evaluation like any other.

Peak memory: on CUDA the allocator's peak since the meter started; on the CPU the process's peak
resident set size (which only grows: a later meter reports the peak of the whole process so far).
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class Cost:
    """Network evaluations spent (per sample; see the module docstring)."""

    forward: int = 0
    backward: int = 0
    rows: int = 0

    def __sub__(self, other: Cost) -> Cost:
        return Cost(self.forward - other.forward, self.backward - other.backward, self.rows - other.rows)

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.forward + other.forward, self.backward + other.backward, self.rows + other.rows)

    def copy(self) -> Cost:
        return Cost(self.forward, self.backward, self.rows)

    @property
    def total(self) -> int:
        """Forward plus backward evaluations (the unit of a fit's budget)."""
        return self.forward + self.backward

    def as_dict(self) -> dict[str, int]:
        return {"forward_evals": self.forward, "backward_evals": self.backward, "network_rows": self.rows}


class _CountBackward(torch.autograd.Function):
    """Identity whose backward pass adds the batch to ``cost.backward``: the backward through the network."""

    @staticmethod
    def forward(ctx: Any, out: Tensor, cost: Cost, n: int) -> Tensor:
        ctx.cost, ctx.n = cost, n
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        ctx.cost.backward += ctx.n
        return grad, None, None


def counted(out: Tensor, cost: Cost, n: int, rows: int) -> Tensor:
    """Record a network call of ``n`` samples (``rows`` network rows) in ``cost``; its backward is counted too."""
    cost.forward += n
    cost.rows += rows
    if out.requires_grad and torch.is_grad_enabled():
        return _CountBackward.apply(out, cost, n)
    return out


def peak_memory(device: torch.device | str) -> tuple[float, str]:
    """(peak memory in MiB, what it measures) for ``device``."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(dev) / 2**20, "CUDA allocator peak"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "process peak RSS"


@dataclass
class Spent:
    """What a stretch of work cost: evaluations, wall time, peak memory."""

    cost: Cost
    wall_s: float
    peak_mib: float
    memory: str

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.cost.as_dict(),
            "wall_s": round(self.wall_s, 3),
            "peak_memory_mib": round(self.peak_mib, 1),
            "memory": self.memory,
        }

    def line(self) -> str:
        c = self.cost
        back = f" + {c.backward:,} backward" if c.backward else ""
        return (
            f"{c.forward:,} forward{back} network evaluations, {self.wall_s:.1f} s, "
            f"peak memory {self.peak_mib:,.0f} MiB ({self.memory})"
        )


class Meter:
    """Measure a stretch of work on ``model`` (a Denoiser): ``with Meter(model, device) as m: ...; m.spent``."""

    def __init__(self, model: Any, device: torch.device | str = "cpu") -> None:
        self.model, self.device = model, torch.device(device)
        self._spent: Spent | None = None

    @property
    def spent(self) -> Spent:
        """What the stretch cost (known once the ``with`` block has ended)."""
        if self._spent is None:
            raise RuntimeError("Meter.spent is read before its with block has ended")
        return self._spent

    def __enter__(self) -> Meter:
        if self.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats(self.device)
        self._c0, self._t0 = self.model.cost.copy(), time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        peak, what = peak_memory(self.device)
        self._spent = Spent(self.model.cost - self._c0, time.perf_counter() - self._t0, peak, what)


__all__ = ["Cost", "Meter", "Spent", "counted", "peak_memory"]
