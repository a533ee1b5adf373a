"""Training a pipeline's denoising network through fewstep's family adapter, resumably.

The network is trained exactly as its pipeline will call it: the family adapter
(:mod:`fewstep.integrations.families`) turns captions into the pipeline's own conditioning rows and
calls the network with the pipeline's time units, inputs and output slicing. The objective is the
prediction type the pipeline's scheduler declares, on fewstep's schedule of that scheduler:

    x_t = alpha(t) x0 + sigma(t) eps,   target = eps (epsilon), eps - x0 (flow velocity), alpha eps - sigma x0 (v).

Times: DDPM-style schedules draw a uniform fractional DDPM index; flow schedules draw a logit-normal
sigma moved by the scheduler's shift (where a shifted sampler spends its steps). A fraction
``cond_dropout`` of the rows gets the family's null rows ("" encoded, or the null class), as
classifier-free guidance needs.

Deterministic for a given recipe and thread count: the network is initialised by the caller under
the recipe's seed; every batch, dropout, time and noise comes from one seeded generator, and anything the
network draws itself (DiT's label dropout) from the global generator, seeded per run; both states are part
of the checkpoint. A checkpoint (weights, EMA, AdamW moments, generator, step) is written
atomically every ``save_every`` steps; a run given the same checkpoint path resumes from it when its
recipe hash matches, and otherwise starts over. Resumed and uninterrupted runs give the same weights.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ...errors import ModelSpecError
from ...io import atomic_path
from ...schedules import Flow, Schedule, VPDiscrete
from ...training import ForeachAdamW, recipe_hash, recipe_lr

CHECKPOINT_SCHEMA = "fewstep.zoo-train-checkpoint/1"
#: the first steps' losses are kept, so a test can check that the recipe reproduces a run's start
FIRST_STEPS = 8


@dataclass
class TrainingSet:
    """What the network is trained on: latents and, per latent, an index into the conditioning rows.

    Shapes: ``latents`` (N, C, h, w) (already scaled as the pipeline's latents are); ``cond_index`` (N,)
    long into ``rows`` ({key: (P, ...)}); ``null`` ({key: (1, ...)}) the unconditional row.
    """

    latents: Tensor
    cond_index: Tensor
    rows: dict[str, Tensor]
    null: dict[str, Tensor]


def target(prediction: str, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """What a network of ``prediction`` type should output at x = alpha x0 + sigma eps (B, ...)."""
    if prediction == "eps":
        return eps
    if prediction == "velocity":
        return eps - x0
    if prediction == "v":
        return alpha * eps - sigma * x0
    if prediction == "x0":
        return x0
    raise ModelSpecError(f"cannot train a network that predicts {prediction!r}")


def draw_times(schedule: Schedule, n: int, g: torch.Generator, shift: float = 1.0) -> Tensor:
    """n solver times (n,) float64 at which to train: uniform DDPM index (VP), shifted logit-normal (flow)."""
    if isinstance(schedule, VPDiscrete):
        k = torch.rand(n, generator=g, dtype=torch.float64) * (schedule.T - 1)
        return schedule.t_of_index(k)
    if isinstance(schedule, Flow):
        u = torch.sigmoid(torch.randn(n, generator=g, dtype=torch.float64))
        s = shift * u / (1.0 + (shift - 1.0) * u)
        return s.clamp(schedule.t_min, 1.0)
    raise ModelSpecError(f"no training-time distribution for a {schedule.describe()} schedule")


def next_batch(n: int, batch: int, g: torch.Generator) -> Tensor:
    """``batch`` distinct row indices (batch,) of ``n``, drawn from ``g`` alone (a saved ``g`` resumes the stream)."""
    return torch.randperm(n, generator=g)[:batch]


def _rows_for(data: TrainingSet, idx: Tensor, drop: Tensor) -> dict[str, Tensor]:
    """Conditioning rows of the batch ``idx`` (B,), the null row where ``drop`` (B,) bool is set."""
    out = {}
    for k, rows in data.rows.items():
        r = rows[data.cond_index[idx]]
        null = data.null[k].to(r.dtype).expand_as(r)
        mask = drop.view(-1, *([1] * (r.dim() - 1)))
        out[k] = torch.where(mask, null, r)
    return out


@dataclass
class _State:
    net: nn.Module
    ema: nn.Module
    opt: ForeachAdamW
    g: torch.Generator
    step: int
    losses: list[float]
    acc: float = 0.0  # the loss summed since the last logged interval
    first: list[float] = field(default_factory=list)  # the loss of each of the first FIRST_STEPS steps


def _save(path: Path, st: _State, recipe: dict[str, Any]) -> None:
    """Write the whole training state atomically (the old checkpoint stays until the rename)."""
    doc = {
        "schema": CHECKPOINT_SCHEMA,
        "recipe_hash": recipe_hash(recipe),
        "step": st.step,
        "net": st.net.state_dict(),
        "ema": st.ema.state_dict(),
        "m": st.opt.m,
        "v": st.opt.v,
        "t": st.opt.t,
        "g": st.g.get_state(),
        "global_rng": torch.get_rng_state(),
        "losses": st.losses,
        "acc": st.acc,
        "first": st.first,
    }
    with atomic_path(path) as tmp:
        torch.save(doc, tmp)


def _load(path: Path | None, st: _State, recipe: dict[str, Any]) -> bool:
    """Restore ``st`` from ``path`` if it holds this recipe's checkpoint; False (start over) otherwise."""
    if path is None or not path.is_file():
        return False
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
        if doc.get("schema") != CHECKPOINT_SCHEMA or doc.get("recipe_hash") != recipe_hash(recipe):
            return False
        st.net.load_state_dict(doc["net"])
        st.ema.load_state_dict(doc["ema"])
        ok = len(doc["m"]) == len(st.opt.m) and all(
            a.shape == b.shape for a, b in zip(doc["m"] + doc["v"], st.opt.m + st.opt.v, strict=True)
        )
        if not ok or not 0 < int(doc["step"]) <= int(recipe["steps"]):
            return False
        st.opt.m, st.opt.v, st.opt.t = list(doc["m"]), list(doc["v"]), int(doc["t"])
        st.g.set_state(doc["g"])
        torch.set_rng_state(doc["global_rng"])
        st.step, st.losses, st.acc = int(doc["step"]), [float(x) for x in doc["losses"]], float(doc["acc"])
        st.first = [float(x) for x in doc["first"]]
    except Exception as e:  # noqa: BLE001 - a damaged or foreign checkpoint: start over
        print(f"warning: training checkpoint {path} is unreadable ({type(e).__name__}); starting over", file=sys.stderr)
        return False
    return True


@dataclass
class TrainResult:
    """The EMA weights, the loss per logged interval, and what the run cost (seconds, steps run here)."""

    state: dict[str, Tensor]
    losses: list[float]
    first_losses: list[float]
    seconds: float
    steps_run: int
    resumed_at: int


Forward = Callable[[Tensor, Tensor, dict[str, Tensor]], Tensor]


def train_network(
    net: nn.Module,
    forward: Forward,
    schedule: Schedule,
    prediction: str,
    data: TrainingSet,
    recipe: dict[str, Any],
    checkpoint: Path | None = None,
    log: bool = False,
    stop_after: int | None = None,
) -> TrainResult:
    """Train ``net`` (initialised by the caller) through ``forward(x (B,C,h,w), t_net (B,), rows) -> out``.

    ``recipe`` keys used: seed, steps, batch, lr, warmup, weight_decay, ema, grad_clip, cond_dropout,
    time_shift, save_every, log_every. ``stop_after`` stops (with a checkpoint) after that many steps
    in total: an interruption, for tests. Returns the EMA state dict (float32, detached).
    """
    with torch.inference_mode(False), torch.enable_grad(), torch.random.fork_rng(devices=[]):
        # randomness inside the network (DiT's label dropout draws from the global generator) is seeded too
        torch.manual_seed(int(recipe["seed"]) + 2)
        return _train(net, forward, schedule, prediction, data, recipe, checkpoint, log, stop_after)


def _train(
    net: nn.Module,
    forward: Forward,
    schedule: Schedule,
    prediction: str,
    data: TrainingSet,
    recipe: dict[str, Any],
    checkpoint: Path | None,
    log: bool,
    stop_after: int | None,
) -> TrainResult:
    net.train().requires_grad_(True)
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    params: list[Tensor] = list(net.parameters())
    ema_params: list[Tensor] = list(ema.parameters())
    st = _State(net, ema, ForeachAdamW(params, recipe["lr"], recipe["weight_decay"]), torch.Generator(), 0, [])
    st.g.manual_seed(int(recipe["seed"]) + 1)
    resumed = _load(checkpoint, st, recipe)
    start = st.step
    if resumed and log:
        print(f"  resuming at step {start}/{recipe['steps']} from {checkpoint}", file=sys.stderr)
    steps, bs, clip = int(recipe["steps"]), int(recipe["batch"]), float(recipe["grad_clip"])
    every, save_every = int(recipe.get("log_every", 250)), int(recipe.get("save_every", 500))
    shift = float(recipe.get("time_shift", 1.0))
    end = steps if stop_after is None else min(steps, int(stop_after))
    n, t0 = data.latents.shape[0], time.perf_counter()
    while st.step < end:
        idx = next_batch(n, bs, st.g)
        x0 = data.latents[idx]
        drop = torch.rand(bs, generator=st.g) < float(recipe["cond_dropout"])
        eps = torch.randn(x0.shape, generator=st.g)
        t = draw_times(schedule, bs, st.g, shift)
        shape = (-1,) + (1,) * (x0.dim() - 1)
        a, s = schedule.alpha(t).float().view(shape), schedule.sigma(t).float().view(shape)
        out = forward(a * x0 + s * eps, schedule.net_time(t).float(), _rows_for(data, idx, drop))
        loss = torch.mean((out.float() - target(prediction, x0, eps, a, s)) ** 2)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))
            if clip and norm > clip:
                grads = torch._foreach_mul(grads, clip / norm)
            st.opt.step(grads, recipe_lr(recipe, st.step))
            decay = min(float(recipe["ema"]), (1.0 + st.step) / (10.0 + st.step))
            torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        st.step += 1
        st.acc += loss.item()
        if len(st.first) < FIRST_STEPS:
            st.first.append(loss.item())
        if st.step % every == 0 or st.step == steps:
            st.losses.append(st.acc / (every if st.step % every == 0 else st.step % every))
            st.acc = 0.0
            if log:
                rate = (st.step - start) / max(time.perf_counter() - t0, 1e-9)
                print(
                    f"  step {st.step}/{steps} loss {st.losses[-1]:.4f} ({rate:.1f} steps/s, "
                    f"{(steps - st.step) / max(rate, 1e-9) / 60:.1f} min left)",
                    file=sys.stderr,
                )
        if checkpoint is not None and (st.step % save_every == 0 or st.step == end) and st.step < steps:
            _save(checkpoint, st, recipe)
    seconds = time.perf_counter() - t0
    state = {k: v.detach().clone().contiguous() for k, v in ema.state_dict().items()}
    return TrainResult(state, st.losses, st.first, seconds, st.step - start, start)
