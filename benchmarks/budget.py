"""Held-out RMSE against a fit's budget in network evaluations, for each method, over fit seeds.

    python benchmarks/budget.py --models gmm,digits-eps --methods s4s,s4s-alt,ld3,dss --nfe 5 \\
        --budgets 30000,60000,120000,240000,480000 --seeds 0,1,2 --json budget.json

Each fit gets ``fit(..., budget=B, seed=s)``: fewstep sizes noises, batch and steps to B forward+backward
network evaluations (teacher included, counted at the network) and never spends more. Its held-out RMSE
on ``--samples`` noises against the converged reference is divided by the best classic solver's (every
solver, every grid, same noises). Per model, method and budget: the mean ratio ± its standard deviation
over the seeds, and what the fits actually spent (mean). ``--budgets default`` runs the method's own
defaults (no budget) for the comparison row; ``--teacher`` and ``--fit`` (JSON) change the fit.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from fewstep.evaluate import evaluate, reference_samples, run_solver
from fewstep.fit.api import fit
from fewstep.specs import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="gmm,digits-eps,digits-flow,digits-empirical")
    ap.add_argument("--methods", default="s4s,s4s-alt,ld3,dss")
    ap.add_argument("--nfe", type=int, default=5)
    ap.add_argument("--budgets", default="30000,60000,120000,240000,480000,default")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--teacher", default=None)
    ap.add_argument("--fit", default="{}", help="extra fit settings (JSON)")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    budgets = [None if b == "default" else int(b) for b in args.budgets.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    extra = json.loads(args.fit)
    out = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.machine(),
        "threads": args.threads,
        "nfe": args.nfe,
        "teacher": args.teacher,
        "fit": extra,
        "samples": args.samples,
        "rows": [],
        "summary": [],
    }
    print(f"# Held-out RMSE against the fit's budget, NFE {args.nfe} ({args.samples} held-out noises)")
    for name in args.models.split(","):
        spec = name if ":" in name else f"zoo:{name}"
        m = load_model(spec)
        held = list(range(1_000_000, 1_000_000 + args.samples))
        ref, info = reference_samples(m, held)
        rep = evaluate(m, nfe=args.nfe, samples=args.samples, model_name=spec).as_dict()
        b = min((r for r in rep["results"] if r["rmse"] is not None), key=lambda r: r["rmse"])
        print(f"\n## {spec}: best classic {b['solver']}@{b['grid']} {b['rmse']:.4g} ± {b['rmse_sem']:.2g}\n")
        print("| method | budget | spent (mean) | ratio to best classic (mean ± std) | held-out RMSE (mean) | fits |")
        print("|---|---|---|---|---|---|", flush=True)
        for meth in args.methods.split(","):
            for budget in budgets:
                ratios, spent, rmses = [], [], []
                for s in seeds:
                    kw = dict(extra, **({"budget": budget} if budget else {}))
                    t0 = time.perf_counter()
                    res = fit(m, meth, args.nfe, seed=s, progress=False, teacher=args.teacher, **kw)
                    secs = time.perf_counter() - t0
                    r = run_solver(m, held, res.solver, args.nfe, ref).rmse
                    c = res.doc["cost"]
                    out["rows"].append(
                        {
                            "model": spec,
                            "method": meth,
                            "budget": budget,
                            "seed": s,
                            "rmse": r,
                            "ratio": r / b["rmse"],
                            "spent": c["total_evals"],
                            "fit_s": round(secs, 1),
                            "kept_start": res.doc["validation"]["kept_start"],
                            "sizes": {
                                k: res.doc["fit"][k]
                                for k in ("samples", "val_samples", "confirm_samples", "batch", "steps")
                            },
                            "confirm": res.doc["validation"].get("confirm_rmse_to_teacher"),
                            "val": res.doc["validation"]["rmse_to_teacher"],
                        }
                    )
                    ratios.append(r / b["rmse"])
                    spent.append(c["total_evals"])
                    rmses.append(r)
                sd = statistics.stdev(ratios) if len(ratios) > 1 else 0.0
                summ = {
                    "model": spec,
                    "method": meth,
                    "budget": budget,
                    "spent": statistics.mean(spent),
                    "ratio_mean": statistics.mean(ratios),
                    "ratio_std": sd,
                    "rmse_mean": statistics.mean(rmses),
                    "rmse_min": min(rmses),
                    "rmse_max": max(rmses),
                    "best_classic": b["rmse"],
                }
                out["summary"].append(summ)
                label = "default" if budget is None else f"{budget:,}"
                print(
                    f"| {meth} | {label} | {summ['spent']:,.0f} | {summ['ratio_mean']:.3f} ± {sd:.3f} | "
                    f"{summ['rmse_mean']:.4g} | {len(seeds)} |",
                    flush=True,
                )
                if args.json:
                    Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
