"""How low can a learned solver's error go at all? Fit on a few training noises with full batches.

    python benchmarks/capacity.py --model zoo:digits-eps --nfe 5 [--starts adams4@quadratic,unipc@time]
                                  [--samples 64] [--steps 3000] [--method s4s-alt] [--fit JSON]

With a handful of training noises, every step sees all of them and the fit runs long, so the lowest
training error it reaches is (up to local minima) the best this solver family can do on those very
noises: an optimistic estimate of the best it can do on fresh noise (the minimum over parameters
of an average over few noises lies, in expectation, below the best average over all noises). If it
lies above a target, no budget of training noises or steps reaches the target with this family.
Prints, per start: the start's RMSE to the teacher on the validation noises, the fit's lowest
training RMSE to the teacher (mean per-sample RMSE over all training noises at one step), its RMSE
to the teacher on the validation noises, and its held-out RMSE to a converged reference.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import torch

from fewstep.evaluate import reference_samples, run_solver
from fewstep.fit.api import fit
from fewstep.seeds import EVAL_SEED_START
from fewstep.specs import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="zoo:digits-eps")
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--nfe", type=int, default=5)
    ap.add_argument("--starts", default="", help="comma list of NAME@GRID (default: the best classic on validation)")
    ap.add_argument("--method", default="s4s-alt")
    ap.add_argument("--samples", type=int, default=64, help="training noises (each step uses them all)")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--fit", default="{}", help="more fit settings as JSON (teacher, val_samples, k, ...)")
    ap.add_argument("--eval-samples", type=int, default=256)
    ap.add_argument("--reference-nfe", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    m = load_model(args.model, **({"guidance_scale": args.guidance} if args.guidance is not None else {}))
    extra = json.loads(args.fit)
    print(
        f"# Capacity of {args.method} at NFE {args.nfe} on {args.model}: {args.samples} training noises, "
        f"full batch, {args.steps} steps"
    )
    print(
        f"machine: {platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}\n"
    )
    print("| start | start's validation RMSE | lowest training RMSE | validation RMSE | held-out RMSE | fit s |")
    print("|---|---|---|---|---|---|", flush=True)
    fits = []
    for start in [s for s in args.starts.split(",") if s] or [None]:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            kw = {"samples": args.samples, "batch": args.samples, "steps": args.steps, "eval_every": 25, **extra}
            if start:
                kw["start"] = start
            fits.append((fit(m, args.method, args.nfe, out=tmp, progress=False, **kw), time.perf_counter() - t0))
    seeds = list(range(EVAL_SEED_START, EVAL_SEED_START + args.eval_samples))
    ref, _ = reference_samples(m, seeds, nfe=args.reference_nfe)  # one reference solve for every fit
    for res, secs in fits:
        held = run_solver(m, seeds, res.solver, args.nfe, ref).rmse
        h = res.doc["history"]
        print(
            f"| {res.outcome.start} | {res.outcome.start_val:.4g} | {min(x['loss'] for x in h):.4g} | "
            f"{res.outcome.val:.4g} | {held:.4g} | {secs:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
