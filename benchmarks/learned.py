"""Learned solvers against the best classic solver on held-out noise.

    python benchmarks/learned.py [--models gmm,digits-eps] [--nfe 3,4,5,6,8,10] [--methods s4s,s4s-alt,dss,ld3]

For each model and NFE: the best classic solver (best over every classic solver and every grid,
chosen on the same held-out noises), each method's held-out RMSE and fit wall time (teacher
included), and the ratio best learned / best classic. Default fit settings throughout.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from fewstep import zoo
from fewstep.evaluate import best_classic, evaluate
from fewstep.fit.api import fit


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="gmm,digits-empirical,digits-eps,digits-flow")
    ap.add_argument("--nfe", default="3,4,5,6,8,10")
    ap.add_argument("--methods", default="s4s,s4s-alt,dss,ld3")
    ap.add_argument("--samples", type=int, default=256, help="held-out samples")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    nfes = [int(n) for n in args.nfe.split(",")]
    methods = args.methods.split(",")
    print(f"# Learned vs best classic: held-out RMSE ({args.samples} samples, seeds from 1000000)")
    print(f"machine: {platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}\n")
    rows = []
    for name in args.models.split(","):
        m = zoo.load(name)
        rep = evaluate(m, nfe=nfes, samples=args.samples, model_name=f"zoo:{name}")
        print(f"## zoo:{name} (reference {rep['reference']['solver']} at {rep['reference']['nfe']} NFE, "
              f"self-error {rep['reference']['self_error']:.2g})\n")
        head = "| NFE | best classic | " + " | ".join(methods) + " | best learned / best classic |"
        print(head + "\n|" + "---|" * (len(methods) + 3), flush=True)
        for n in nfes:
            b = best_classic(rep["results"], n)
            cells, best = [], None
            for meth in methods:
                t0 = time.perf_counter()
                res = fit(m, meth, n, progress=False)
                secs = time.perf_counter() - t0
                r = evaluate(m, nfe=n, solvers=[res.solver], samples=args.samples)["results"][0]
                kept = " (start kept)" if res.doc["validation"]["kept_start"] else ""
                cells.append(f"{r['rmse']:.4g} ({secs:.0f} s){kept}")
                best = r["rmse"] if best is None else min(best, r["rmse"])
                rows.append({"model": name, "nfe": n, "method": meth, "rmse": r["rmse"], "fit_s": secs,
                             "start": res.doc["start"]["solver"], "kept_start": res.doc["validation"]["kept_start"],
                             "best_classic": b["rmse"], "best_classic_solver": f"{b['solver']}@{b['grid']}"})
            print(f"| {n} | {b['rmse']:.4g} {b['solver']}@{b['grid']} | " + " | ".join(cells) +
                  f" | **{best / b['rmse']:.2f}** |", flush=True)
        print()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
