"""How a learned solver fitted at one guidance scale does at others (so users know when to refit).

    python benchmarks/guidance.py [--model zoo:gmm] [--fit-scale 2] [--scales 1,1.5,2,3,4,6] [--nfe 5]
                                 [--fit JSON] [--reuse]

For each evaluation scale: the best classic solver there (any solver, any grid), the solver
fitted at --fit-scale, and one refitted at that scale; held-out RMSE and ratios to the best classic.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from fewstep.bench import format_guidance, guidance_table
from fewstep.specs import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="zoo:gmm")
    ap.add_argument("--fit-scale", type=float, default=2.0)
    ap.add_argument("--scales", default="1,1.5,2,3,4,6")
    ap.add_argument("--nfe", type=int, default=5)
    ap.add_argument("--method", default="s4s-alt")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--no-refit", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="out/guidance")
    ap.add_argument("--fit", default="{}", help="JSON of fit settings (e.g. smaller budgets for a UNet)")
    ap.add_argument("--reference-nfe", type=int, default=None)
    ap.add_argument("--reuse", action="store_true", help="load finished fits in --out (after an interruption)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {args.model}: {args.method} at {args.nfe} NFE fitted at guidance {args.fit_scale:g}")
    print(f"machine: {platform.machine()}, {args.threads} threads, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}\n")
    t0 = time.perf_counter()
    rows = guidance_table(lambda w: load_model(args.model, guidance_scale=w), args.fit_scale,
                          [float(s) for s in args.scales.split(",")], args.nfe, args.method, args.out,
                          samples=args.samples, refit=not args.no_refit, progress=False,
                          fit_kwargs=json.loads(args.fit),
                          eval_kwargs={"reference_nfe": args.reference_nfe} if args.reference_nfe else None,
                          log=lambda msg: print(msg, flush=True) if msg.startswith(("fitted", "reused")) else None,
                          reuse=args.reuse)
    print(format_guidance(rows, args.nfe, args.method))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
