"""A fit with a half-precision network against the same fit in float32, on the digits UNet.

    python benchmarks/precision.py [--dtype bf16] [--nfe 5] [--seeds 0,1,2] [--samples 512] [--json out.json]

For each fit seed, the same fit (method, sizes, teacher, seed) runs twice: once with the network in
float32, once in ``--dtype`` (the teacher is then generated in that dtype too; the solver state, the
coefficients, the loss and the optimiser stay float32). Both learned solvers are then scored on the same
held-out noises with the float32 network against its converged reference (which fit found the better
solver), and each with its own network against that network's own reference (what a user of each precision
gets). Prints mean +- std over the seeds and the ratio half/float32 per seed.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from fewstep import zoo
from fewstep.evaluate import reference_samples, run_solver
from fewstep.fit.api import fit


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--method", default="s4s-alt")
    ap.add_argument("--nfe", type=int, default=5)
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--samples", type=int, default=512, help="held-out noises")
    ap.add_argument(
        "--fit",
        default='{"samples": 256, "val_samples": 128, "confirm_samples": 128, '
        '"teacher": "unipc3@logsnr:50", "steps": 300, "batch": 16}',
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kw = json.loads(args.fit)
    seeds = [int(s) for s in args.seeds.split(",")]
    models = {"fp32": zoo.load("digits-unet", guidance_scale=args.guidance)}
    models[args.dtype] = zoo.load("digits-unet", guidance_scale=args.guidance).set_dtype(args.dtype)
    held = list(range(1_000_000, 1_000_000 + args.samples))
    refs = {k: reference_samples(m, held, nfe=200)[0] for k, m in models.items()}
    print(
        f"# {args.method} at NFE {args.nfe} on zoo:digits-unet (guidance {args.guidance:g}): network in fp32 vs "
        f"{args.dtype}; {args.samples} held-out noises; fit {kw}"
    )
    print(
        f"machine: {platform.machine()}, {args.threads} thread(s), torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}\n"
    )
    print("| seed | fitted in | fit s | RMSE, fp32 network | RMSE, own network vs own reference |")
    print("|---|---|---|---|---|", flush=True)
    rows = []
    for s in seeds:
        for name, m in models.items():
            t0 = time.perf_counter()
            res = fit(m, args.method, args.nfe, seed=s, progress=False, **kw)
            secs = time.perf_counter() - t0
            r32 = run_solver(models["fp32"], held, res.solver, args.nfe, refs["fp32"]).rmse
            own = run_solver(m, held, res.solver, args.nfe, refs[name]).rmse
            rows.append(
                {
                    "seed": s,
                    "dtype": name,
                    "fit_s": round(secs, 1),
                    "rmse_fp32_net": r32,
                    "rmse_own": own,
                    "recorded_dtype": res.doc["model"].get("dtype"),
                    "cost": res.doc["cost"]["total_evals"],
                }
            )
            print(f"| {s} | {name} | {secs:.0f} | {r32:.5g} | {own:.5g} |", flush=True)
    print()
    out = {
        "dtype": args.dtype,
        "method": args.method,
        "nfe": args.nfe,
        "fit": kw,
        "samples": args.samples,
        "rows": rows,
        "date": time.strftime("%Y-%m-%d"),
    }

    def sd(v):
        return statistics.stdev(v) if len(v) > 1 else 0.0

    for key, label in (("rmse_fp32_net", "scored with the fp32 network"), ("rmse_own", "each with its own network")):
        a = [r[key] for r in rows if r["dtype"] == "fp32"]
        b = [r[key] for r in rows if r["dtype"] == args.dtype]
        ratio = [y / x for x, y in zip(a, b, strict=True)]
        print(
            f"{label}: fp32 {statistics.mean(a):.5g} ± {sd(a):.2g}, {args.dtype} {statistics.mean(b):.5g} ± "
            f"{sd(b):.2g}; {args.dtype}/fp32 per seed {', '.join(f'{r:.3f}' for r in ratio)} "
            f"(mean {statistics.mean(ratio):.3f}; mean of {args.dtype} / mean of fp32 "
            f"{statistics.mean(b) / statistics.mean(a):.3f})"
        )
        out[key] = {"fp32": a, args.dtype: b, "ratio": ratio}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
