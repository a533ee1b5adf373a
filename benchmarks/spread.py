"""How much a learned solver depends on the fit's luck: held-out RMSE over several fit seeds.

    python benchmarks/spread.py --models gmm,digits-eps --nfe 4,5,6 --seeds 0,1,2,3,4 --json spread.json

For each model, NFE and fit seed (``fit(..., seed=s)``: another batch order and other training and
validation noises), one fit with the given method and settings; its held-out RMSE on ``--samples``
noises (seeds from 1,000,000) against the converged reference, its validation and confirmation RMSE to
the teacher, its start and wall time. Per model and NFE: mean, standard deviation, min, max and
worst / best, and the best classic solver (every solver, every grid) on the same noises with its
standard error. ``--fit`` takes extra fit settings as JSON (the image and TorchCFM benchmarks' budgets).
Runs against whatever fewstep is importable, so the same script measures two versions of the code.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from fewstep.evaluate import evaluate, reference_samples, run_solver
from fewstep.fit.api import fit
from fewstep.specs import load_model


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__import__("fewstep").__file__).parent,
        ).stdout.strip()
    except OSError:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="gmm,digits-eps,digits-flow,digits-empirical")
    ap.add_argument("--nfe", default="4,5,6")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--method", default="s4s-alt")
    ap.add_argument("--samples", type=int, default=512, help="held-out samples")
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--reference-nfe", type=int, default=None)
    ap.add_argument("--fit", default="{}", help="extra fit settings (JSON)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    nfes = [int(n) for n in args.nfe.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    extra = json.loads(args.fit)
    out = {
        "commit": commit(),
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.machine(),
        "threads": args.threads,
        "torch": torch.__version__,
        "method": args.method,
        "fit": extra,
        "samples": args.samples,
        "rows": [],
        "summary": [],
    }
    print(f"# Spread over fit seeds: {args.method}, held-out RMSE on {args.samples} noises (commit {out['commit']})")
    for name in args.models.split(","):
        spec = name if ":" in name else f"zoo:{name}"
        m = load_model(spec, **({"guidance_scale": args.guidance} if args.guidance is not None else {}))
        held = list(range(1_000_000, 1_000_000 + args.samples))
        ref, info = reference_samples(m, held, nfe=args.reference_nfe)
        rep = evaluate(m, nfe=nfes, samples=args.samples, model_name=spec, reference_nfe=args.reference_nfe).as_dict()
        print(f"\n## {spec} (reference {info['solver']} at {info['nfe']} NFE, self-error {info['self_error']:.2g})\n")
        print("| NFE | best classic (± sem) | mean ± std | min | max | worst / best | starts |")
        print("|---|---|---|---|---|---|---|", flush=True)
        for n in nfes:
            classic = [r for r in rep["results"] if r["nfe"] == n and r["rmse"] is not None]
            b = min(classic, key=lambda r: r["rmse"])
            vals, starts = [], []
            for s in seeds:
                t0 = time.perf_counter()
                res = fit(m, args.method, n, seed=s, progress=False, **extra)
                secs = time.perf_counter() - t0
                r = run_solver(m, held, res.solver, n, ref).rmse
                v = res.doc["validation"]
                row = {
                    "model": spec,
                    "nfe": n,
                    "seed": s,
                    "rmse": r,
                    "val": v["rmse_to_teacher"],
                    "confirm": v.get("confirm_rmse_to_teacher"),
                    "start": res.doc["start"]["solver"],
                    "kept_start": v["kept_start"],
                    "fit_s": round(secs, 1),
                    "cost": res.doc.get("cost"),
                    "best_classic": b["rmse"],
                    "best_classic_sem": b["rmse_sem"],
                    "best_classic_solver": f"{b['solver']}@{b['grid']}",
                }
                out["rows"].append(row)
                vals.append(r)
                starts.append(res.doc["start"]["solver"])
            mean, std = statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)
            summ = {
                "model": spec,
                "nfe": n,
                "mean": mean,
                "std": std,
                "min": min(vals),
                "max": max(vals),
                "worst_over_best": max(vals) / min(vals),
                "best_classic": b["rmse"],
                "best_classic_sem": b["rmse_sem"],
                "best_classic_solver": f"{b['solver']}@{b['grid']}",
                "ratio_mean": mean / b["rmse"],
                "ratio_std": std / b["rmse"],
            }
            out["summary"].append(summ)
            print(
                f"| {n} | {b['rmse']:.4g} ± {b['rmse_sem']:.2g} {b['solver']}@{b['grid']} | {mean:.4g} ± {std:.2g} | "
                f"{min(vals):.4g} | {max(vals):.4g} | {max(vals) / min(vals):.2f} | "
                f"{', '.join(sorted(set(starts)))} |",
                flush=True,
            )
            if args.json:
                Path(args.json).write_text(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
