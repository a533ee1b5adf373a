"""Training the small networks fewstep ships (zoo models, the digits classifier) from recipes.

A recipe is a JSON-able dict that fully determines the weights; its hash names the cached weights
file (``<cache root>/<kind>/<name>-<hash>.safetensors``), whose metadata repeats the hash, so a file
for another recipe, a damaged file or a partial one is never used: the weights are trained again.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .io import atomic_path, cache_root


def recipe_hash(recipe: dict[str, Any]) -> str:
    """12 hex digits of the recipe's sha256 (keys sorted)."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def weights_dir(kind: str = "zoo") -> Path:
    """``<cache root>/<kind>``: where trained weights of that kind are cached."""
    return cache_root() / kind


def read_weights(path: Path, recipe: dict[str, Any]) -> dict[str, Tensor] | None:
    """The weights cached at ``path`` if they were trained from ``recipe`` (else None: retrain)."""
    try:
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("recipe_hash") != recipe_hash(recipe):
            return None
        return load_file(str(path))
    except Exception:  # noqa: BLE001 - unreadable or partial file: retrain
        return None


def write_weights(path: Path, state: dict[str, Tensor], recipe: dict[str, Any], seconds: float) -> None:
    """Cache ``state`` at ``path`` atomically, with the recipe (and its hash) in the metadata."""
    from safetensors.torch import save_file

    meta = {
        "recipe_hash": recipe_hash(recipe),
        "recipe": json.dumps(recipe, sort_keys=True),
        "train_seconds": f"{seconds:.1f}",
        "torch": torch.__version__,
    }
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)


class ForeachAdamW:
    """AdamW with foreach ops (torch.optim would import torch._dynamo: seconds on first use).

    ``step(grads, lr)`` updates ``params`` in place (call it under ``torch.no_grad()``).
    """

    def __init__(
        self,
        params: list[Tensor],
        lr: float,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.params, self.wd, self.b1, self.b2, self.eps = params, float(weight_decay), *betas, eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    def step(self, grads: list[Tensor] | tuple[Tensor, ...], lr: float) -> None:
        """One AdamW update of ``params`` with ``grads`` (one per parameter, same shapes) at rate ``lr``."""
        self.t += 1
        b1, b2 = self.b1, self.b2
        torch._foreach_lerp_(self.m, list(grads), 1.0 - b1)
        torch._foreach_mul_(self.v, b2)
        torch._foreach_addcmul_(self.v, list(grads), list(grads), value=1.0 - b2)
        denom = torch._foreach_sqrt(self.v)
        torch._foreach_div_(denom, math.sqrt(1.0 - b2**self.t))
        torch._foreach_add_(denom, self.eps)
        if self.wd:
            torch._foreach_mul_(self.params, 1.0 - lr * self.wd)
        torch._foreach_addcdiv_(self.params, self.m, denom, value=-lr / (1.0 - b1**self.t))


def recipe_lr(recipe: dict[str, Any], step: int) -> float:
    """The learning rate of ``recipe`` (``lr``, ``warmup``, ``steps``) at ``step``: linear warm-up, cosine to zero."""
    warm, steps = max(1, int(recipe["warmup"])), int(recipe["steps"])
    return float(recipe["lr"]) * min(1.0, (step + 1) / warm) * 0.5 * (1.0 + math.cos(math.pi * step / steps))
