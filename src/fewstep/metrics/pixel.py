"""Per-sample RMSE and PSNR against the reference sample from the same seed."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ShapeError


def per_sample_rmse(x: Tensor, ref: Tensor) -> Tensor:
    """RMSE over all but the batch dimension: shape (B,), float64 (the difference is taken in the inputs' dtype)."""
    return (x - ref).double().flatten(1).pow(2).mean(1).sqrt()


def psnr(x: Tensor, ref: Tensor, data_range: float = 2.0) -> Tensor:
    """PSNR in dB of each x[b] against ref[b]: 10 log10(data_range^2 / MSE_b), shape (B,), float64.

    ``data_range`` is max - min of the data (2 for images in [-1, 1]); identical samples give inf.
    """
    if x.shape != ref.shape:
        raise ShapeError(f"psnr: samples {tuple(x.shape)} and reference {tuple(ref.shape)} differ in shape")
    mse = (x.to(torch.float64) - ref.to(torch.float64)).flatten(1).pow(2).mean(1)
    return 10.0 * torch.log10(float(data_range) ** 2 / mse)


__all__ = ["per_sample_rmse", "psnr"]
