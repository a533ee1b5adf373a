"""The small trained digits networks (``digits-eps``, ``digits-flow``): model, recipe, training, cache.

Training is deterministic: parameters are initialised under ``torch.manual_seed`` (inside a
forked RNG, so the caller's global RNG is untouched), and every batch index, noise and time
comes from one seeded ``torch.Generator``. It runs on the CPU whatever device the model is
loaded on, so the weights only depend on the recipe (and on the CPU's float arithmetic).

Weights are cached as safetensors in ``$FEWSTEP_CACHE/zoo/<name>-<recipe hash>.safetensors``
(default cache: ``~/.cache/fewstep``), written atomically; a missing file, a recipe-hash
mismatch or an unreadable file means retraining.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ModelSpecError
from ..schedules import Flow, Schedule, VPDiscrete
from ..training import ForeachAdamW, read_weights, recipe_hash, weights_dir, write_weights

RECIPE_VERSION = 1

# The recipes: everything that determines the trained weights. Changing any value changes the
# hash and so the cache file (old files are simply ignored).
BASE_RECIPE: dict[str, Any] = {
    "version": RECIPE_VERSION,
    "data": "sklearn-digits-1797/x/8-1",
    "arch": {"hidden": 256, "blocks": 3, "temb": 128},
    "seed": 0,
    "steps": 3000,
    "batch": 256,
    "lr": 2e-3,
    "warmup": 100,
    "weight_decay": 0.0,
    "ema": 0.999,
    "grad_clip": 1.0,
    "t_power": 1.0,  # times u^p with u uniform: p > 1 puts more training on the low-noise end
}
RECIPES: dict[str, dict[str, Any]] = {
    "digits-eps": {**BASE_RECIPE, "objective": "eps", "schedule": VPDiscrete("linear").config()},
    "digits-flow": {**BASE_RECIPE, "objective": "velocity", "schedule": Flow().config()},
}
EXPECTED_SECONDS = 40


def recipe_for(name: str, **overrides: Any) -> dict[str, Any]:
    """The recipe of zoo model ``name`` with top-level ``overrides`` (e.g. steps=50)."""
    if name not in RECIPES:
        raise ModelSpecError(f"no training recipe for {name!r}; valid: {', '.join(RECIPES)}")
    r = copy.deepcopy(RECIPES[name])
    for k, v in overrides.items():
        if v is None:
            continue
        if k == "arch":
            r["arch"] = {**r["arch"], **v}
        elif k in r:
            r[k] = v
        else:
            raise ModelSpecError(f"unknown recipe field {k!r}; valid: {', '.join(sorted(r))}")
    return r


# ----------------------------------------------------------------------------- network
def timestep_embedding(u: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of u in [0, 1] (scaled to [0, 1000]), shape (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=u.device, dtype=torch.float32) / half)
    ang = (1000.0 * u.float())[:, None] * freqs[None]
    return torch.cat([torch.cos(ang), torch.sin(ang)], -1)


class _Block(nn.Module):
    def __init__(self, hidden: int, temb: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.temb = nn.Linear(temb, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.act = nn.SiLU()

    def forward(self, h: Tensor, e: Tensor) -> Tensor:
        z = self.fc1(self.act(self.norm(h))) + self.temb(e)
        return h + self.fc2(self.act(z))


class DigitsMLP(nn.Module):
    """Residual MLP on flattened 8x8 images with a sinusoidal time embedding.

    ``net(x, t_net)`` with x (B, 1, 8, 8) and t_net (B,); ``time_scale`` maps t_net to [0, 1]
    (1/1000 for a DDPM index, 1 for a flow time).
    """

    in_std: Tensor | None  # buffer (L,): the std of x at L evenly spaced u in [0, 1], or None (no input scaling)

    def __init__(
        self,
        hidden: int = 256,
        blocks: int = 3,
        temb: int = 128,
        time_scale: float = 1.0,
        dim: int = 64,
        in_std: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.time_scale = float(time_scale)
        # optional input scaling: in_std[k] is the std of x at u = k / (len - 1), u = t_net * time_scale
        self.register_buffer("in_std", in_std.float() if in_std is not None else None)
        self.temb_dim = int(temb)
        self.time_mlp = nn.Sequential(nn.Linear(temb, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList([_Block(hidden, temb) for _ in range(blocks)])
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, t_net: Tensor, **_: Any) -> Tensor:
        b = x.shape[0]
        t_net = torch.as_tensor(t_net, device=x.device)
        if t_net.dim() == 0:
            t_net = t_net.expand(b)
        u = t_net * self.time_scale
        e = self.time_mlp(timestep_embedding(u, self.temb_dim)).to(x.dtype)
        xin = x.reshape(b, -1)
        if self.in_std is not None:
            k = self.in_std.numel() - 1
            pos = (u.to(self.in_std.dtype) * k).clamp(0, k)
            i = pos.floor().clamp(max=k - 1).long()
            w = pos - i
            std = self.in_std[i] * (1 - w) + self.in_std[i + 1] * w
            xin = xin / std.to(x.dtype)[:, None]
        h = self.inp(xin)
        for blk in self.blocks:
            h = blk(h, e)
        return self.out(torch.nn.functional.silu(self.out_norm(h))).reshape(x.shape)


def make_net(recipe: dict[str, Any]) -> tuple[DigitsMLP, Schedule]:
    from ..schedules import schedule_from_config

    sched = schedule_from_config(recipe["schedule"])
    ts = 1.0 / sched.T if isinstance(sched, VPDiscrete) else 1.0
    a = recipe["arch"]
    in_std = None
    if a.get("cin"):  # E[x0^2] per pixel of the data; x_t has E[x^2] = alpha^2 m2 + sigma^2
        u = torch.linspace(0.0, 1.0, 1001, dtype=torch.float64)
        t = (u * sched.T + 1.0) / sched.T if isinstance(sched, VPDiscrete) else u
        in_std = torch.sqrt(sched.alpha(t) ** 2 * float(a["cin"]) + sched.sigma(t) ** 2)
    net = DigitsMLP(hidden=a["hidden"], blocks=a["blocks"], temb=a["temb"], time_scale=ts, in_std=in_std)
    return net, sched


# ----------------------------------------------------------------------------- training
def _ddpm_steps(sched: Schedule) -> int:
    """T of a VPDiscrete schedule: the eps objective trains on its DDPM index."""
    if not isinstance(sched, VPDiscrete):
        raise ModelSpecError(
            f"the eps objective trains on a DDPM index and needs a VPDiscrete schedule; got {sched.describe()}"
        )
    return sched.T


def train(recipe: dict[str, Any], log: bool = False) -> dict[str, Tensor]:
    """Train a network from ``recipe`` on the CPU; returns the EMA state dict (float32).

    Works inside a caller's ``torch.no_grad()`` or ``torch.inference_mode()`` block.
    """
    with torch.inference_mode(False), torch.enable_grad():
        return _train(recipe, log)


def _train(recipe: dict[str, Any], log: bool) -> dict[str, Tensor]:
    from .digits import digits_data

    x_all, _ = digits_data(torch.float32)
    x_all = x_all.reshape(x_all.shape[0], -1)
    n = x_all.shape[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(recipe["seed"]))
        net, sched = make_net(recipe)
    ema = copy.deepcopy(net).requires_grad_(False)
    g = torch.Generator().manual_seed(int(recipe["seed"]) + 1)
    steps, bs = int(recipe["steps"]), int(recipe["batch"])
    params: list[Tensor] = list(net.parameters())
    opt = ForeachAdamW(params, recipe["lr"], recipe["weight_decay"])
    ema_params: list[Tensor] = list(ema.parameters())
    warm = max(1, int(recipe["warmup"]))
    objective = recipe["objective"]
    if objective == "eps":
        # continuous DDPM index u in [0, T - 1]; alpha, sigma from the schedule at t = (u + 1) / T
        T = _ddpm_steps(sched)
    perm, pos = torch.randperm(n, generator=g), 0
    net.train()
    t0 = time.perf_counter()
    for step in range(steps):
        if pos + bs > n:
            perm, pos = torch.randperm(n, generator=g), 0
        x0 = x_all[perm[pos : pos + bs]]
        pos += bs
        eps = torch.randn(x0.shape, generator=g)
        u = torch.rand(bs, generator=g, dtype=torch.float64) ** float(recipe["t_power"])
        if objective == "eps":
            idx = u * (T - 1)
            t = (idx + 1.0) / T
            a, s = sched.alpha(t)[:, None].float(), sched.sigma(t)[:, None].float()
            xt, target, t_net = a * x0 + s * eps, eps, idx.float()
        elif objective == "velocity":
            t = sched.t_min + (1.0 - sched.t_min) * u
            tt = t[:, None].float()
            xt, target, t_net = (1.0 - tt) * x0 + tt * eps, eps - x0, t.float()
        else:  # pragma: no cover - recipes are ours
            raise ModelSpecError(f"unknown objective {objective!r}")
        out = net(xt, t_net)
        loss = torch.mean((out - target) ** 2)
        grads = torch.autograd.grad(loss, params)
        lr = recipe["lr"] * min(1.0, (step + 1) / warm) * 0.5 * (1.0 + math.cos(math.pi * step / steps))
        with torch.no_grad():
            if recipe["grad_clip"]:
                norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
                scale = float(recipe["grad_clip"]) / max(float(norm), float(recipe["grad_clip"]))
                if scale < 1.0:
                    grads = torch._foreach_mul(grads, scale)
            opt.step(grads, lr)
            d = min(float(recipe["ema"]), (1.0 + step) / (10.0 + step))
            torch._foreach_lerp_(ema_params, params, 1.0 - d)
        if log and (step + 1) % 500 == 0:
            print(
                f"  step {step + 1}/{steps} loss {loss.item():.4f} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr
            )
    return {k: v.detach().clone().contiguous() for k, v in ema.state_dict().items()}


# ----------------------------------------------------------------------------- cache
def cache_path(name: str, recipe: dict[str, Any]) -> Path:
    return weights_dir("zoo") / f"{name}-{recipe_hash(recipe)}.safetensors"


_MEMORY: dict[str, dict[str, Tensor]] = {}


def trained_state(name: str, recipe: dict[str, Any], retrain: bool = False) -> dict[str, Tensor]:
    """The trained weights for ``recipe``: from memory, from the cache file, or by training."""
    h = recipe_hash(recipe)
    if not retrain and h in _MEMORY:
        return _MEMORY[h]
    path = cache_path(name, recipe)
    state = None if retrain or not path.exists() else read_weights(path, recipe)
    if state is None:
        est = max(1, round(EXPECTED_SECONDS * recipe["steps"] / BASE_RECIPE["steps"]))
        print(f"training zoo:{name} ({'retrain' if retrain else 'first use'}, ~{est} s)...", file=sys.stderr)
        t0 = time.perf_counter()
        state = train(recipe)
        dt = time.perf_counter() - t0
        try:
            write_weights(path, state, recipe, dt)
            where = str(path)
        except OSError as e:  # read-only cache: keep it in memory for this process
            where = f"memory only ({e.strerror or e})"
        print(f"trained zoo:{name} in {dt:.1f} s -> {where}", file=sys.stderr)
    _MEMORY[h] = state
    return state
