"""Activation checkpointing of network calls: a call recomputed in the backward pass instead of kept.

:class:`Recompute` runs a call so that autograd keeps only its input; the backward pass runs it again.
A diffusers network inside it (a ``ModelMixin`` that supports gradient checkpointing) is switched to its
own block checkpointing for the call, in the forward pass and again in the recomputation, so the backward
pass holds the call's block inputs and one block's activations, not the whole call's. The networks are
recognised by their attributes: nothing here imports diffusers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TypeGuard

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint


class BlockCheckpointing(Protocol):
    """A network that can checkpoint its own blocks (a diffusers ``ModelMixin``)."""

    def enable_gradient_checkpointing(self) -> None: ...

    def disable_gradient_checkpointing(self) -> None: ...


def _checkpoints_blocks(m: torch.nn.Module) -> TypeGuard[BlockCheckpointing]:
    """Does ``m`` support checkpointing its own blocks, and not do so already?"""
    return (
        bool(getattr(m, "_supports_gradient_checkpointing", False))
        and hasattr(m, "enable_gradient_checkpointing")
        and not getattr(m, "gradient_checkpointing", False)
    )


def checkpointable_blocks(net: Any) -> list[BlockCheckpointing]:
    """The diffusers networks inside ``net`` that can recompute each of their blocks in the backward pass
    (their own gradient checkpointing) and do not already."""
    if not isinstance(net, torch.nn.Module):
        return []
    return [m for m in net.modules() if _checkpoints_blocks(m)]


@contextmanager
def checkpointed_blocks(mods: list[BlockCheckpointing]) -> Iterator[None]:
    """While open, ``mods`` (from :func:`checkpointable_blocks`) checkpoint their blocks."""
    for m in mods:
        m.enable_gradient_checkpointing()
    try:
        yield
    finally:
        for m in mods:
            m.disable_gradient_checkpointing()


class Recompute:
    """Calls of one network, recomputed in the backward pass (each block too, for a diffusers network).

        recompute = Recompute(net)
        y = recompute(lambda z: <a call of net on z>, x)   # = the call on x; autograd keeps x only

    Without autograd (``torch.no_grad``) a call runs as it is.
    """

    def __init__(self, net: Any) -> None:
        self.blocks = checkpointable_blocks(net)

    def __call__(self, fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        """fn(x), recomputed in the backward pass when autograd is on."""
        if not torch.is_grad_enabled():
            return fn(x)

        def call(z: Tensor) -> Tensor:
            with checkpointed_blocks(self.blocks):
                return fn(z)

        return checkpoint(call, x, use_reentrant=False)
