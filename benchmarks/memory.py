"""Peak memory of a fit step against batch size and NFE, with and without activation checkpointing and
micro-batches, on a mid-size UNet2DConditionModel (random weights, a quarter of SD 1.5's width, 32x32
latents, text conditioning of 77 tokens), on the CPU.

    python benchmarks/memory.py --batches 1,2,4,8 --nfes 2,4 --json memory.json

Each configuration runs in a fresh process (the CPU peak RSS only grows): the model, a learned solver and
random teacher targets are built, the process's peak RSS is read, two fit steps run, and the rise of the
peak is the step's memory. The fit is fewstep's own loop (``fewstep.fit.loop.optimise``), so what is
measured is what a fit allocates: activations kept for the backward pass through every evaluation, the
solver state, gradients. A least-squares fit of the measurements to ``a + b * batch * NFE`` (no
checkpointing) and ``a + m * (b + c * NFE)`` (checkpointing; m the micro-batch, or the batch without one:
one call's recomputed block activations, plus each call's kept block inputs) gives the formula.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

WIDTH = (80, 160, 320, 320)  # SD 1.5: (320, 640, 1280, 1280)
CROSS = 192  # SD 1.5: 768


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(batch: int, nfe: int, checkpoint: bool, micro: int | None) -> dict:
    """Run two fit steps in this process; the rise of its peak RSS (MiB) and the step time."""
    import diffusers
    import torch

    from fewstep.fit.config import FitConfig, Phase
    from fewstep.fit.loop import FitSession, optimise
    from fewstep.fit.methods import from_classic
    from fewstep.fit.teacher import TeacherData
    from fewstep.integrations.diffusers_in import from_diffusers
    from fewstep.sampling import build_tableau

    torch.set_num_threads(1)
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=WIDTH,
        cross_attention_dim=CROSS,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    sched = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    model = from_diffusers(unet, sched, encoder_hidden_states=torch.randn(1, 77, CROSS))
    n = max(batch, 8)
    g = torch.Generator().manual_seed(1)
    train = TeacherData(list(range(n)), torch.randn(n, 4, 32, 32, generator=g), torch.randn(n, 4, 32, 32, generator=g))
    solver = from_classic(model, build_tableau(model, "ddim@logsnr", nfe), "s4s-alt", decouple=0.1)
    cfg = FitConfig(
        method="s4s-alt",
        nfe=nfe,
        batch=batch,
        use_checkpoint=checkpoint,
        micro_batch=micro,
        eval_every=10**6,
        warmup=False,
    )
    val = train[:1]
    session = FitSession(model, solver, train, val, cfg)
    from fewstep.fit.loop import FitState, mean_val_error

    state = FitState(best_val=mean_val_error(model, solver, val))
    state.best = {k: v.detach().clone() for k, v in solver.state_dict().items()}
    before = peak_mib()
    t0 = time.perf_counter()
    optimise(session, Phase("p", {"grid": 0.01, "coef": 0.01}, 2, batch=batch), state)
    secs = (time.perf_counter() - t0) / 2
    return {
        "batch": batch,
        "nfe": nfe,
        "checkpoint": checkpoint,
        "micro_batch": micro,
        "baseline_mib": round(before, 1),
        "step_mib": round(peak_mib() - before, 1),
        "step_s": round(secs, 2),
    }


def fit_formula(rows: list[dict]) -> dict:
    import numpy as np

    out = {}
    plain = [r for r in rows if not r["checkpoint"] and r["micro_batch"] is None]
    if len(plain) >= 2:
        A = np.array([[1.0, r["batch"] * r["nfe"]] for r in plain])
        y = np.array([r["step_mib"] for r in plain])
        (a, b), *_ = np.linalg.lstsq(A, y, rcond=None)
        out["no_checkpointing"] = {"a_mib": round(float(a), 1), "per_sample_evaluation_mib": round(float(b), 2)}
    ck = [r for r in rows if r["checkpoint"]]
    if len(ck) >= 3:
        m = [r["micro_batch"] or r["batch"] for r in ck]
        A = np.array([[1.0, mi, mi * r["nfe"]] for mi, r in zip(m, ck, strict=True)])
        y = np.array([r["step_mib"] for r in ck])
        (a, b, c), *_ = np.linalg.lstsq(A, y, rcond=None)
        out["checkpointing"] = {
            "a_mib": round(float(a), 1),
            "per_sample_one_evaluation_mib": round(float(b), 2),
            "per_sample_and_nfe_kept_mib": round(float(c), 3),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--nfes", default="2,4")
    ap.add_argument("--checkpointing", default="off,on", help="which to measure: off, on or both (off,on)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:  # a child: one configuration
        b, n, ck, mb = json.loads(args.one)
        print(json.dumps(one(b, n, ck, mb)))
        return
    configs = []
    modes = args.checkpointing.split(",")
    for n in [int(v) for v in args.nfes.split(",")]:
        for b in [int(v) for v in args.batches.split(",")]:
            configs += [(b, n, ck, None) for ck in (False, True) if ("on" if ck else "off") in modes]
        big = max(int(v) for v in args.batches.split(","))
        if "on" in modes:
            configs += [(big, n, True, 1), (big, n, True, 2)]
    rows = []
    print("| batch | NFE | checkpointing | micro-batch | step peak (MiB) | step time (s) |\n|---|---|---|---|---|---|")
    for c in configs:
        r = subprocess.run([sys.executable, __file__, "--one", json.dumps(c)], capture_output=True, text=True)
        if r.returncode != 0:
            print(f"| {c} failed: {r.stderr.strip().splitlines()[-1]} |")
            continue
        row = json.loads(r.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"| {row['batch']} | {row['nfe']} | {'on' if row['checkpoint'] else 'off'} | "
            f"{row['micro_batch'] or '-'} | {row['step_mib']:.0f} | {row['step_s']:.1f} |",
            flush=True,
        )
    formula = fit_formula(rows)
    print("\n" + json.dumps(formula, indent=1))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"rows": rows, "formula": formula, "width": WIDTH, "cross": CROSS, "date": time.strftime("%Y-%m-%d")},
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
