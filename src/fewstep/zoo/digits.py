"""Digits models: scikit-learn's 1797 8x8 digits, scaled to [-1, 1], shape (1, 8, 8).

* ``digits-empirical``: the exact optimal denoiser of the training set (x0-prediction, VPLinear):
  D(x, t) = sum_i softmax_i(-||x - alpha y_i||^2 / (2 sigma^2)) y_i, float64 inside, chunked.
* ``digits-eps`` / ``digits-flow``: a small MLP trained on the digits (see :mod:`.train`).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor, nn

from ..denoiser import Denoiser
from ..errors import ModelSpecError
from ..schedules import F64, Schedule, VPLinear
from ._common import as_schedule, batch_times, labels_or_none

SHAPE = (1, 8, 8)


@lru_cache(maxsize=1)
def _digits_cpu() -> tuple[Tensor, Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ModelSpecError("the digits models need scikit-learn: pip install 'fewstep[zoo]'") from e
    d = load_digits()
    x = torch.as_tensor(d.data, dtype=F64) / 8.0 - 1.0  # pixel values 0..16 -> [-1, 1]
    y = torch.as_tensor(d.target, dtype=torch.long)
    return x.reshape(-1, *SHAPE), y


def digits_data(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> tuple[Tensor, Tensor]:
    """(images (1797, 1, 8, 8) in [-1, 1], labels (1797,)) from ``sklearn.datasets.load_digits``."""
    x, y = _digits_cpu()
    return x.to(device=device, dtype=dtype, copy=True), y.to(device, copy=True)


class EmpiricalDenoiser(nn.Module):
    """Exact posterior mean of a uniform distribution over training images ``data`` (N, *shape).

    Called as ``net(x, t_net, class_labels=None)``: a label k >= 0 restricts the row to the
    training images of class k (-1: all of them). Rows are processed in chunks of ``chunk``.
    """

    data: Tensor  # (N, prod(shape)) float64 buffer
    sq_norms: Tensor  # (N,) float64 buffer: squared norms of the rows of data
    labels: Tensor  # (N,) long buffer

    def __init__(self, data: Tensor, labels: Tensor | None, schedule: Schedule, chunk: int = 256) -> None:
        super().__init__()
        data = torch.as_tensor(data, dtype=F64).clone()
        self.register_buffer("data", data.reshape(data.shape[0], -1))
        self.register_buffer("sq_norms", (self.data**2).sum(-1))
        self.register_buffer(
            "labels",
            torch.as_tensor(labels).long().clone()
            if labels is not None
            else torch.zeros(data.shape[0], dtype=torch.long),
        )
        self.schedule = schedule
        self.chunk = int(chunk)

    def forward(self, x: Tensor, t_net: Tensor, class_labels: Any = None, **_: Any) -> Tensor:
        b = x.shape[0]
        dev = x.device
        t = self.schedule.solver_time(batch_times(t_net, b, dev))  # (B, 1)
        a, sg = self.schedule.alpha(t), self.schedule.sigma(t)
        inv2v = 0.5 / (sg**2).clamp_min(1e-30)  # at sigma = 0 this picks the nearest image
        lab = labels_or_none(class_labels, b, dev)
        ys, yn, ylab = self.data.to(dev), self.sq_norms.to(dev), self.labels.to(dev)
        x64 = x.reshape(b, -1).to(F64)
        outs = []
        for i in range(0, b, self.chunk):
            xi, ai, wi = x64[i : i + self.chunk], a[i : i + self.chunk], inv2v[i : i + self.chunk]
            # -||x - a y||^2 / (2 s^2) up to a per-row constant: (2 a x.y - a^2 |y|^2) / (2 s^2)
            logits = (2.0 * ai * (xi @ ys.T) - ai**2 * yn) * wi  # (b_i, N)
            if lab is not None:
                li = lab[i : i + self.chunk, None]
                keep = (li < 0) | (li == ylab)
                logits = logits.masked_fill(~keep, float("-inf"))
            outs.append(torch.softmax(logits, -1) @ ys)
        return torch.cat(outs, 0).to(x.dtype).reshape(x.shape)


def build_digits_empirical(
    schedule: Schedule | Mapping[str, Any] | None = None,
    chunk: int = 256,
    guidance_scale: float | None = None,
    conditional: bool | None = None,
) -> Denoiser:
    """zoo:digits-empirical: the exact denoiser of the 1797 training digits (x0-prediction)."""
    from ..seeds import seeded_labels

    if conditional is None:
        conditional = guidance_scale is not None
    if guidance_scale is not None and not conditional:
        raise ModelSpecError("zoo:digits-empirical: guidance_scale needs conditional sampling")
    x, y = _digits_cpu()
    sched = as_schedule(schedule, VPLinear())
    net = EmpiricalDenoiser(x, y, sched, chunk=chunk)
    counts = torch.bincount(y, minlength=10).to(F64)
    cond_sampler = (lambda seeds: {"class_labels": seeded_labels(seeds, counts, salt=10)}) if conditional else None
    den = Denoiser(
        net,
        sched,
        prediction="x0",
        sample_shape=SHAPE,
        name="zoo:digits-empirical",
        guidance_scale=guidance_scale,
        uncond={"class_labels": -1},
        cond_sampler=cond_sampler,
        identity={
            "zoo": "digits-empirical",
            "data": "sklearn-digits-1797",
            "scale": "x/8-1",
            "conditional": bool(conditional),
        },
    )
    # views of the net's buffers, registered so that .to(device) moves them too
    den.register_buffer("data", net.data.reshape(-1, *SHAPE), persistent=False)
    den.register_buffer("labels", net.labels, persistent=False)
    return den
