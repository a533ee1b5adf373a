"""Where a fit's network evaluations should go: named fit plans against each other, over fit seeds.

    python benchmarks/plans.py --models gmm,digits-eps --method s4s-alt --nfe 5 --seeds 0,1,2,3,4 \\
        --plans '{"default": {}, "long": {"samples": 300, "batch": 10, "steps": 1200}}' --rows rows.jsonl

Each plan is a set of fit settings (JSON: any keyword of ``fewstep.fit.api.fit``, ``teacher`` included;
``teacher_nfe``: the model's default teacher at that NFE). Every
(model, plan, seed) fit is scored on ``--samples`` held-out noises against the converged reference and divided
by the best classic solver's RMSE there (every solver, every grid, same noises); each row (ratio, what the fit
spent counted at the network, its wall time, whether it kept its start) is appended to ``--rows`` as one JSON
line, and a row already there is not fitted again, so an interrupted run resumes. The summary table gives, per
model and plan, the mean ratio with its standard deviation over the seeds, worst / best, and the mean spend.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from fewstep.evaluate import evaluate, reference_samples, run_solver
from fewstep.fit.api import fit
from fewstep.fit.teacher import default_teacher
from fewstep.specs import load_model

SIZES = ("samples", "val_samples", "confirm_samples", "batch", "steps")


def done_rows(path: Path) -> list[dict[str, Any]]:
    """The rows already in ``path`` (none if it does not exist; a torn last line is skipped)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def summary(rows: list[dict[str, Any]], models: list[str], plans: list[str], method: str, nfe: int) -> str:
    """The markdown table of ``rows``: per model and plan, mean ± std of the ratio, worst / best, mean spend."""
    out = [
        "| model | plan | ratio (mean ± std) | worst / best | kept start | spent (mean) | fit s | fits |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in models:
        for p in plans:
            rs = [r for r in rows if r["model"] == m and r["plan"] == p and r["method"] == method and r["nfe"] == nfe]
            if not rs:
                continue
            ratios = [r["ratio"] for r in rs]
            sd = statistics.stdev(ratios) if len(ratios) > 1 else 0.0
            kept = sum(bool(r["kept_start"]) for r in rs)
            out.append(
                f"| {m} | {p} | {statistics.mean(ratios):.3f} ± {sd:.3f} | {max(ratios) / min(ratios):.2f} | "
                f"{kept} | {statistics.mean(r['spent'] for r in rs):,.0f} | "
                f"{statistics.mean(r['fit_s'] for r in rs):.1f} | {len(rs)} |"
            )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="gmm,digits-eps,digits-flow,digits-empirical")
    ap.add_argument("--method", default="s4s-alt")
    ap.add_argument("--nfe", type=int, default=5)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--plans", default='{"default": {}}', help="JSON: plan name -> fit settings")
    ap.add_argument("--samples", type=int, default=512, help="held-out noises")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", required=True, help="JSON lines of the fits (appended; resumes)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    plans: dict[str, dict[str, Any]] = json.loads(args.plans)
    seeds = [int(s) for s in args.seeds.split(",")]
    models = [m if ":" in m else f"zoo:{m}" for m in args.models.split(",")]
    path = Path(args.rows)
    have = {(r["model"], r["method"], r["nfe"], r["plan"], r["seed"]) for r in done_rows(path)}
    print(f"# Fit plans, {args.method} at NFE {args.nfe} ({args.samples} held-out noises, {platform.machine()})")
    for spec in models:
        m = load_model(spec)
        held = list(range(1_000_000, 1_000_000 + args.samples))
        ref, _ = reference_samples(m, held)
        rep = evaluate(m, nfe=args.nfe, samples=args.samples, model_name=spec).as_dict()
        best = min((r for r in rep["results"] if r["rmse"] is not None), key=lambda r: r["rmse"])
        print(f"{spec}: best classic {best['solver']}@{best['grid']} {best['rmse']:.4g}", flush=True)
        for name, settings in plans.items():
            for s in seeds:
                if (spec, args.method, args.nfe, name, s) in have:
                    continue
                kw = dict(settings)
                if "teacher_nfe" in kw:  # the model's default teacher at another NFE
                    kw["teacher"] = replace(default_teacher(m), nfe=int(kw.pop("teacher_nfe")))
                t0 = time.perf_counter()
                res = fit(m, args.method, args.nfe, seed=s, progress=False, **kw)
                secs = time.perf_counter() - t0
                r = run_solver(m, held, res.solver, args.nfe, ref).rmse
                row = {
                    "model": spec,
                    "method": args.method,
                    "nfe": args.nfe,
                    "plan": name,
                    "settings": settings,
                    "seed": s,
                    "rmse": r,
                    "best_classic": best["rmse"],
                    "ratio": r / best["rmse"],
                    "spent": res.doc["cost"]["total_evals"],
                    "fit_s": round(secs, 1),
                    "kept_start": res.doc["validation"]["kept_start"],
                    "sizes": {
                        k: res.doc["fit"][k] for k in ("samples", "val_samples", "confirm_samples", "batch", "steps")
                    },
                    "teacher": res.doc["teacher"]["spec"],
                    "start": res.doc["start"]["solver"],
                    "val": res.doc["validation"]["rmse_to_teacher"],
                    "confirm": res.doc["validation"].get("confirm_rmse_to_teacher"),
                    "date": time.strftime("%Y-%m-%d"),
                }
                with path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"  {name} seed {s}: ratio {row['ratio']:.3f} spent {row['spent']:,} ({secs:.0f} s)", flush=True)
    print()
    print(summary(done_rows(path), models, list(plans), args.method, args.nfe))


if __name__ == "__main__":
    main()
