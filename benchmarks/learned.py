"""Learned solvers against the best classic solver on held-out noise.

    python benchmarks/learned.py [--models gmm,digits-eps] [--nfe 3,4,5,6,8,10] [--methods s4s,s4s-alt,dss,ld3]

For each model and NFE: the best classic solver (best over every classic solver and every grid,
chosen on the same held-out noises), each method's held-out RMSE and fit wall time (teacher
included), the ratio best learned / best classic, and a check that no fit ended worse than its
own starting solver on the held-out noises. Default fit settings throughout. Models are
``zoo:NAME`` names or any model spec (``torchcfm:otcfm``, ``diffusers:DIR``).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from fewstep.evaluate import evaluate
from fewstep.fit.api import fit
from fewstep.specs import load_model


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
    print(
        f"machine: {platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}\n"
    )
    rows = []
    for name in args.models.split(","):
        spec = name if ":" in name else f"zoo:{name}"
        m = load_model(spec)
        report = evaluate(m, nfe=nfes, samples=args.samples, model_name=spec)
        rep = report.as_dict()
        classic = {(r["solver"], r["grid"], r["nfe"]): r["rmse"] for r in rep["results"] if r["rmse"] is not None}
        fits = {}
        for n in nfes:
            for meth in methods:
                t0 = time.perf_counter()
                res = fit(m, meth, n, progress=False)
                fits[(meth, n)] = (res, time.perf_counter() - t0)
        done = evaluate(
            m,
            nfe=nfes,
            samples=args.samples,
            solvers=[],
            model_name=spec,
            learned=[res.solver for res, _ in fits.values()],
        ).as_dict()["results"]
        learned = {(r["solver"], r["nfe"]): r for r in done}  # a method's label is its name
        print(
            f"## {spec} (reference {rep['reference']['solver']} at {rep['reference']['nfe']} NFE, "
            f"self-error {rep['reference']['self_error']:.2g})\n"
        )
        head = "| NFE | best classic | " + " | ".join(methods) + " | best learned / best classic |"
        print(head + "\n|" + "---|" * (len(methods) + 3), flush=True)
        for n in nfes:
            best_row = report.best_classic(n)
            assert best_row is not None, f"no classic solver ran at {n} NFE"
            b = best_row.as_dict()
            cells, best = [], None
            for meth in methods:
                res, secs = fits[(meth, n)]
                r = learned[(meth, n)]
                sname, _, sgrid = res.doc["start"]["solver"].partition("@")
                start_rmse = classic.get((sname, sgrid, n))
                worse = start_rmse is not None and r["rmse"] > start_rmse * (1 + 1e-9)
                kept = " (start kept)" if res.doc["validation"]["kept_start"] else ""
                flag = f" **worse than its start {start_rmse:.4g}**" if worse else ""
                cells.append(f"{r['rmse']:.4g} ({secs:.0f} s){kept}{flag}")
                best = r["rmse"] if best is None else min(best, r["rmse"])
                rows.append(
                    {
                        "model": spec,
                        "nfe": n,
                        "method": meth,
                        "rmse": r["rmse"],
                        "fit_s": secs,
                        "start": res.doc["start"]["solver"],
                        "start_rmse": start_rmse,
                        "kept_start": res.doc["validation"]["kept_start"],
                        "worse_than_start": worse,
                        "best_classic": b["rmse"],
                        "best_classic_solver": f"{b['solver']}@{b['grid']}",
                    }
                )
            print(
                f"| {n} | {b['rmse']:.4g} {b['solver']}@{b['grid']} | "
                + " | ".join(cells)
                + f" | **{best / b['rmse']:.2f}** |",
                flush=True,
            )
        print()
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
