"""Learned solvers against the best classic solver on the six pretrained TorchCFM moons models.

    python benchmarks/torchcfm.py [--models cfm,otcfm] [--nfe 3,4,5,6,7,8,9,10] [--methods s4s,s4s-alt,dss,ld3]
                                  [--samples 1000] [--threads 2] [--steps N] [--fit JSON] [--json out.json]

For each model and NFE: the best classic solver (best over every classic solver and every grid,
chosen on the same held-out noises), each method's held-out RMSE to the converged reference and
its fit wall time (teacher included), the ratio best learned / best classic, and the sliced
Wasserstein distance (SW2) to the moons data of the best classic solver, the best learned
solver and the reference solve itself (the floor: model error plus the metric's finite-sample
bias). FD to the reference is the Frechet distance between a solver's samples and the reference
solve's samples from the same noises: how close the solver lands to the teacher's distribution.
Default fit settings unless --fit (JSON of fit settings) or --steps is given. The checkpoints are
read from $FEWSTEP_TORCHCFM_DIR or ../shared/data/torchcfm-gaussian-moons.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any

import torch

from fewstep.evaluate import evaluate, reference_samples, run_solver
from fewstep.fit.api import fit
from fewstep.metrics.frechet import FeatureDistances
from fewstep.metrics.sliced import sliced_wasserstein
from fewstep.seeds import EVAL_SEED_START
from fewstep.zoo.torchcfm import NAMES, load_torchcfm

DATA_SEED = 12345  # the moons reference set's generator seed
DATA_SIZE = 20000


def swd_to(data: torch.Tensor, x: torch.Tensor) -> float:
    """SW2 of samples x (N, 2) to the data reference set (M, 2), 512 fixed projections."""
    return sliced_wasserstein(x, data, n_projections=512, seed=0)


def fd_to(data: torch.Tensor, x: torch.Tensor) -> float:
    """Frechet distance of samples x (N, 2) to the data (M, 2) in raw coordinates (Gaussian fits)."""
    return FeatureDistances(data).frechet(x)


def bench_model(
    name: str, nfes: list[int], methods: list[str], samples: int, fit_overrides: dict[str, Any]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows {model, nfe, method, rmse, swd, fit_s, ...} for one model, and its reference figures."""
    m = load_torchcfm(name)
    seeds = list(range(EVAL_SEED_START, EVAL_SEED_START + samples))
    data = m.sample_data(DATA_SIZE, torch.Generator().manual_seed(DATA_SEED))
    ref, ref_info = reference_samples(m, seeds)
    ref_info["swd"] = swd_to(data, ref)
    ref_info["fd"] = fd_to(data, ref)
    to_ref = FeatureDistances(ref)  # FD to the reference solve's own samples on the same noises (0 for itself)
    rep = evaluate(m, nfe=nfes, samples=samples, model_name=f"torchcfm:{name}")
    rows = []
    for n in nfes:
        b = rep.best_classic(n)
        assert b is not None, f"no classic solver ran at {n} NFE"
        spec = b.label
        classic = run_solver(m, seeds, spec, n, ref, keep_samples=True)
        rows.append(
            {
                "model": name,
                "nfe": n,
                "method": "best classic",
                "solver": spec,
                "rmse": classic.rmse,
                "swd": swd_to(data, classic.samples),
                "fd": fd_to(data, classic.samples),
                "fd_ref": to_ref.frechet(classic.samples),
            }
        )
        for meth in methods:
            t0 = time.perf_counter()
            res = fit(m, meth, n, progress=False, **fit_overrides)
            secs = time.perf_counter() - t0
            run = run_solver(m, seeds, res.solver, n, ref, keep_samples=True)
            rows.append(
                {
                    "model": name,
                    "nfe": n,
                    "method": meth,
                    "rmse": run.rmse,
                    "swd": swd_to(data, run.samples),
                    "fd": fd_to(data, run.samples),
                    "fd_ref": to_ref.frechet(run.samples),
                    "fit_s": secs,
                    "start": res.doc["start"]["solver"],
                    "kept_start": res.doc["validation"]["kept_start"],
                }
            )
    return rows, ref_info


def print_table(name: str, rows: list[dict[str, Any]], ref_info: dict[str, Any], methods: list[str]) -> None:
    """One markdown table per model: RMSE (fit time) per method, ratio, and SW2 to the data."""
    print(
        f"## torchcfm:{name} (reference {ref_info['solver']} at {ref_info['nfe']} NFE, self-error "
        f"{ref_info['self_error']:.2g}, SW2 to the data {ref_info['swd']:.4f}, FD {ref_info['fd']:.4f})\n"
    )
    print(
        "| NFE | best classic | "
        + " | ".join(methods)
        + " | best learned / best classic | SW2 best classic | SW2 best learned | SW2 reference (floor) "
        "| FD best classic | FD best learned | FD reference (floor) | FD to reference: best classic | best learned |"
    )
    print("|" + "---|" * (len(methods) + 11))
    for n in sorted({r["nfe"] for r in rows}):
        at = [r for r in rows if r["nfe"] == n]
        b = next(r for r in at if r["method"] == "best classic")
        learned = [r for r in at if r["method"] != "best classic"]
        cells = [
            f"{r['rmse']:.4g} ({r['fit_s']:.0f} s)" + (" (start kept)" if r["kept_start"] else "") for r in learned
        ]
        best = min(learned, key=lambda r: r["rmse"]) if learned else None
        ratio = f"**{best['rmse'] / b['rmse']:.2f}**" if best else "-"
        swd_l = f"{best['swd']:.4f}" if best else "-"
        fd_l = f"{best['fd']:.4f}" if best else "-"
        print(
            f"| {n} | {b['rmse']:.4g} {b['solver']} | "
            + " | ".join(cells)
            + f" | {ratio} | {b['swd']:.4f} | {swd_l} | {ref_info['swd']:.4f} | {b['fd']:.4f} | {fd_l} "
            f"| {ref_info['fd']:.4f} | {b['fd_ref']:.2e} | {best['fd_ref'] if best else float('nan'):.2e} |",
            flush=True,
        )
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(NAMES))
    ap.add_argument("--nfe", default="3,4,5,6,7,8,9,10")
    ap.add_argument("--methods", default="s4s,s4s-alt,dss,ld3")
    ap.add_argument("--samples", type=int, default=1000, help="held-out samples")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="fit steps (default: the fit's own)")
    ap.add_argument("--fit", default="{}", help='JSON of fit settings, e.g. \'{"samples": 4000, "batch": 256}\'')
    ap.add_argument("--json", default=None, help="write every row and reference figure to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    nfes = [int(n) for n in args.nfe.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    overrides = json.loads(args.fit)
    if args.steps is not None:
        overrides["steps"] = args.steps
    print(
        f"# TorchCFM moons: learned vs best classic, held-out RMSE ({args.samples} samples, seeds from "
        f"{EVAL_SEED_START}) and SW2 to {DATA_SIZE} moons\n"
    )
    print(
        f"machine: {platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}{', fit settings ' + json.dumps(overrides) if overrides else ''}\n"
    )
    out: dict[str, Any] = {
        "samples": args.samples,
        "nfe": nfes,
        "methods": methods,
        "fit": overrides,
        "models": {},
        "rows": [],
    }
    for name in args.models.split(","):
        rows, ref_info = bench_model(name, nfes, methods, args.samples, overrides)
        print_table(name, rows, ref_info, methods)
        out["models"][name] = {"reference": ref_info}
        out["rows"].extend(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
