"""Activation checkpointing of a fit's solve: each network call, and each block of a diffusers network in it."""

import os

import pytest
import torch

from fewstep.fit.methods import from_classic
from fewstep.integrations.diffusers_in import from_diffusers
from fewstep.recompute import checkpointable_blocks
from fewstep.sampling import build_tableau, sample

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")


def _model():
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=2,
        out_channels=2,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )
    return from_diffusers(unet, diffusers.DDIMScheduler())


def _grads(den, use_checkpoint):
    solver = from_classic(den, build_tableau(den, "dpmpp_2m@logsnr", 3), "s4s-alt", decouple=0.1)
    noise = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    calls = []
    block = next(m for m in den.net.modules() if type(m).__name__ == "DownBlock2D")  # checkpoints its resnets
    h = block.register_forward_pre_hook(lambda m, _: calls.append(m.gradient_checkpointing))
    x = sample(den, noise, solver, use_checkpoint=use_checkpoint)
    x.pow(2).sum().backward()
    h.remove()
    return x.detach(), [p.grad.clone() for p in solver.parameters() if p.grad is not None], calls


def test_checkpointing_recomputes_each_block_and_gives_the_same_gradients():
    den = _model()
    assert checkpointable_blocks(den.net)  # the UNet supports its own block checkpointing
    x0, g0, n0 = _grads(den, False)
    x1, g1, n1 = _grads(den, True)
    assert torch.allclose(x0, x1, atol=1e-5) and len(g0) == len(g1) > 0
    for a, b in zip(g0, g1, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    # 3 evaluations: plain = one forward each, no block checkpointing; checkpointed = each call recomputed in
    # the backward pass, with the network's own block checkpointing on in both passes (benchmarks/memory.py
    # measures what it saves: BENCHMARKS.md)
    assert n0 == [False] * 3 and n1 == [True] * 6, (n0, n1)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in den.net.modules())  # switched back off
