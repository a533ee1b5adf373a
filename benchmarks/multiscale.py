"""One solver across guidance scales against a solver fitted at each scale.

    python benchmarks/multiscale.py --model zoo:gmm --classes all --fit-scales 1.5,2,3 --scales 1.5,1.75,2,2.5,3 \\
        --nfe 5 --seeds 0,1,2 --json multiscale.json

For each fit seed: one fit over ``--fit-scales`` (every seed of the fit draws its scale; the artifact's
grid and coefficients are a smooth function of the scale) and, at every scale of ``--scales`` (fitted
ones and ones between them), a fit at that scale alone, with the same method, NFE and settings. Each is
scored on the same held-out noises at that scale against the converged reference. Per scale: the best
classic solver, both learned solvers' held-out RMSE (mean +- std over the seeds) and the ratio
multi-scale / single-scale (mean +- std of the per-seed ratios).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from fewstep.conditions import GuidanceSet
from fewstep.evaluate import evaluate, reference_samples, run_solver
from fewstep.fit.api import fit
from fewstep.specs import load_model


def _ms(v: list[float]) -> str:
    return f"{statistics.mean(v):.4g} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.2g}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="zoo:gmm")
    ap.add_argument("--classes", default="all")
    ap.add_argument("--fit-scales", default="1.5,2,3")
    ap.add_argument("--scales", default="1.5,1.75,2,2.5,3")
    ap.add_argument("--method", default="s4s-alt")
    ap.add_argument("--nfe", type=int, default=5)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--samples", type=int, default=512, help="held-out noises per scale")
    ap.add_argument("--fit", default="{}", help="extra fit settings (JSON), for every fit")
    ap.add_argument("--reference-nfe", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kw = json.loads(args.fit)
    seeds = [int(s) for s in args.seeds.split(",")]
    scales = [float(w) for w in args.scales.split(",")]
    held = list(range(1_000_000, 1_000_000 + args.samples))

    def load(g):
        return load_model(args.model, classes=args.classes or None, guidance=g)

    print(
        f"# {args.method} at NFE {args.nfe} on {args.model}: one fit over scales {args.fit_scales} against a fit "
        f"at each scale ({args.samples} held-out noises, seeds {args.seeds}, fit {kw})"
    )
    print(
        f"machine: {platform.machine()}, {args.threads} thread(s), torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}\n",
        flush=True,
    )
    multi = {s: fit(load(args.fit_scales), args.method, args.nfe, seed=s, progress=False, **kw).solver for s in seeds}
    rows = []
    print("| scale | best classic (± sem) | multi-scale fit | fit at this scale | multi / single (per seed) |")
    print("|---|---|---|---|---|", flush=True)
    for w in scales:
        m = load(f"{w:g}")
        ref, _ = reference_samples(m, held, nfe=args.reference_nfe)
        rep = evaluate(m, nfe=args.nfe, samples=args.samples, reference_nfe=args.reference_nfe).as_dict()
        b = min((r for r in rep["results"] if r["rmse"] is not None), key=lambda r: r["rmse"])
        mr, sr = [], []
        for s in seeds:
            mr.append(run_solver(m, held, multi[s], args.nfe, ref).rmse)
            own = fit(m, args.method, args.nfe, seed=s, progress=False, **kw).solver
            sr.append(run_solver(m, held, own, args.nfe, ref).rmse)
        ratio = [a / c for a, c in zip(mr, sr, strict=True)]
        fitted = " (fitted)" if any(abs(w - f) < 1e-9 for f in GuidanceSet.parse(args.fit_scales).scales) else ""
        rows.append(
            {
                "scale": w,
                "fitted": bool(fitted),
                "best_classic": f"{b['solver']}@{b['grid']}",
                "best_classic_rmse": b["rmse"],
                "best_classic_sem": b.get("rmse_sem"),
                "multi": mr,
                "single": sr,
                "ratio": ratio,
            }
        )
        print(
            f"| {w:g}{fitted} | {b['rmse']:.4g} ± {b.get('rmse_sem') or 0:.2g} {b['solver']}@{b['grid']} | "
            f"{_ms(mr)} | {_ms(sr)} | {_ms(ratio)} |",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "model": args.model,
                    "method": args.method,
                    "nfe": args.nfe,
                    "fit_scales": args.fit_scales,
                    "fit": kw,
                    "samples": args.samples,
                    "rows": rows,
                    "date": time.strftime("%Y-%m-%d"),
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
