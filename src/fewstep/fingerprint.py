"""A model's fingerprint: sha256 over its schedule, prediction, identity, prior and every weight, hashed once per
weight version.

Hashing every weight is slow for a large network, so the result is kept on the model and reused until a weight
tensor is replaced or changed in place (its version counter moves), or the schedule, prediction, identity or
prior change. Guidance and the condition sets are not part of it: a solver fitted at one scale or on one prompt
set runs at another (:mod:`fewstep.solvers.model_match` tells those apart).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .io import sha256_tensors
from .schedules import Schedule


class Fingerprinted(Protocol):
    """What a fingerprint is made of (a :class:`~fewstep.denoiser.Denoiser` is one)."""

    net: Any
    schedule: Schedule
    prediction: str
    identity: dict[str, Any]
    prior: Any
    __dict__: dict[str, Any]

    def noise(self, seeds: list[int]) -> Tensor: ...


def _weights(model: Fingerprinted) -> dict[str, Tensor]:
    return model.net.state_dict() if isinstance(model.net, nn.Module) else {}


def _key(model: Fingerprinted) -> tuple:
    """What the kept fingerprint depends on: the weight tensors (by storage and version) and the rest."""
    return (
        repr(sorted(model.schedule.config().items())),
        model.prediction,
        repr(sorted(model.identity.items())),
        id(model.prior),
        tuple((k, v.data_ptr(), v._version) for k, v in _weights(model).items()),
    )


def _hash(model: Fingerprinted) -> str:
    head = repr(sorted(model.schedule.config().items())).encode()
    head += model.prediction.encode()
    head += repr(sorted(model.identity.items())).encode()
    if model.prior is not None:  # another source distribution is another model
        head += model.noise([0, 1]).to(torch.float64).numpy().tobytes()
    return sha256_tensors(_weights(model), head)[:16]


def fingerprint(model: Fingerprinted) -> str:
    """16 hex digits naming the model (see the module docstring), kept until what it covers changes."""
    key = _key(model)
    kept = model.__dict__.get("_fingerprint")
    if kept is not None and kept[0] == key:
        return kept[1]
    fp = _hash(model)
    model.__dict__["_fingerprint"] = (key, fp)
    return fp


def pin(model: Fingerprinted, fp: str) -> None:
    """Keep ``fp`` as the model's fingerprint for its weights as they are now (a cast to another precision
    changes the tensors, not the model)."""
    model.__dict__["_fingerprint"] = (_key(model), fp)


def weights_digest(model: Fingerprinted) -> str:
    """sha256 (16 hex digits) of the network's parameters and buffers alone ('' for a function), kept until a
    weight changes."""
    if not isinstance(model.net, nn.Module):
        return ""
    state = model.net.state_dict()
    key = tuple((k, v.data_ptr(), v._version) for k, v in state.items())
    kept = model.__dict__.get("_weights_digest")
    if kept is not None and kept[0] == key:
        return kept[1]
    model.__dict__["_weights_digest"] = (key, sha256_tensors(state)[:16])
    return model.__dict__["_weights_digest"][1]
