"""How a learned solver fitted at one guidance scale does at others (so users know when to refit).

    python benchmarks/guidance.py [--model zoo:gmm] [--fit-scale 2] [--scales 1,1.5,2,3,4,6] [--nfe 5]
                                 [--seeds 0,1,2] [--fit JSON] [--reuse] [--json out.json]

For each evaluation scale: the best classic solver there (any solver, any grid), the solver
fitted at --fit-scale, and one refitted at that scale; held-out RMSE and ratios to the best classic.
With several ``--seeds`` every fit runs once per fit seed and the learned cells are mean ± standard
deviation over them (the ratio's spread too); the classic column carries its standard error over the noises.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
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
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--seeds", default="0", help="fit seeds (comma-separated); cells are mean ± std over them")
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-refit", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="out/guidance")
    ap.add_argument("--fit", default="{}", help="JSON of fit settings (e.g. smaller budgets for a UNet)")
    ap.add_argument("--reference-nfe", type=int, default=None)
    ap.add_argument("--reuse", action="store_true", help="load finished fits in --out (after an interruption)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {args.model}: {args.method} at {args.nfe} NFE fitted at guidance {args.fit_scale:g}")
    print(
        f"machine: {platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}\n"
    )
    t0 = time.perf_counter()
    seeds = [int(v) for v in args.seeds.split(",")]
    runs = []
    for seed in seeds:
        runs.append(
            guidance_table(
                lambda w: load_model(args.model, guidance_scale=w),
                args.fit_scale,
                [float(s) for s in args.scales.split(",")],
                args.nfe,
                args.method,
                f"{args.out}/seed{seed}" if len(seeds) > 1 else args.out,
                samples=args.samples,
                refit=not args.no_refit,
                progress=False,
                fit_kwargs={**json.loads(args.fit), "seed": seed},
                eval_kwargs={"reference_nfe": args.reference_nfe} if args.reference_nfe else None,
                log=lambda msg: print(msg, flush=True) if msg.startswith(("fitted", "reused")) else None,
                reuse=args.reuse,
            )
        )
    if len(seeds) == 1:
        print(format_guidance(runs[0], args.nfe, args.method))
    else:
        print(spread_table(runs, args.fit_scale, args.nfe, args.method, len(seeds)))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "model": args.model,
                    "method": args.method,
                    "nfe": args.nfe,
                    "fit_scale": args.fit_scale,
                    "seeds": seeds,
                    "samples": args.samples,
                    "fit": json.loads(args.fit),
                    "runs": runs,
                    "date": time.strftime("%Y-%m-%d"),
                },
                f,
                indent=1,
            )


def spread_table(runs: list[list[dict]], fit_scale: float, nfe: int, method: str, n: int) -> str:
    """Markdown: per scale, the best classic and the learned cells as mean ± std over the fit seeds."""

    def ms(v: list[float]) -> str:
        return f"{statistics.mean(v):.4g} ± {statistics.stdev(v):.2g}"

    lines = [
        f"| guidance scale | best classic ({nfe} NFE) | RMSE | {method} fitted at {fit_scale:g} | ratio | "
        f"{method} refit at this scale | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, row in enumerate(runs[0]):
        cells = [r[i] for r in runs]
        tag = " (fit scale)" if row["scale"] == fit_scale else ""
        lines.append(
            f"| {row['scale']:g}{tag} | {row['best_classic']} | {row['best_classic_rmse']:.4g} | "
            f"{ms([c['learned_rmse'] for c in cells])} | {ms([c['ratio'] for c in cells])} | "
            f"{ms([c['refit_rmse'] for c in cells])} | {ms([c['refit_ratio'] for c in cells])} |"
        )
    return "\n".join(lines) + f"\n\n(mean ± standard deviation over {n} fit seeds)"


if __name__ == "__main__":
    main()
