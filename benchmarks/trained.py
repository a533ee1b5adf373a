"""What a learned solver gains on the trained scenes pipelines under classifier-free guidance (issue 24).

    python benchmarks/trained.py [--families sd,sd3,pixart,dit] [--guidance 1.5,4,7.5] [--nfe 4,5,6,8]
        [--methods s4s-alt,dss,ld3] [--seeds 0,1,2] [--samples 512] [--fit '{"samples": 48, ...}']
        [--reference-nfe 100] [--out out/trained] [--md trained.md] [--json trained.json] [--docs docs]

For each pipeline (``zoo:scenes-<family>``) and guidance scale: learned solvers fitted on the training captions
(one per method, NFE and fit seed; a finished fit in ``--out`` with the same settings is found again, not
refitted), then every solver scored on held-out noise conditioned on the held-out captions (attribute pairs
training never saw; DiT: its classes): every classic solver on every grid, the pipeline's own scheduler, and
the learned ones. Columns: RMSE to the converged reference (latent space), FD in the attribute classifier's
features against the reference's decoded samples, and prompt adherence of the decoded samples. Learned cells
are mean +- standard deviation over the fit seeds; each fit's cost (network evaluations, teacher included; wall
time; peak memory) comes from its artifact. ``--docs`` writes one picture per pipeline at the middle scale:
reference / the pipeline's own scheduler / best classic / learned, at NFE 5.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from fewstep.evaluate import reference_samples, run_solver
from fewstep.fit.api import fit, same_fit
from fewstep.fit.checkpoint import NAME as CHECKPOINT_NAME
from fewstep.integrations.native import OwnScheduler
from fewstep.metrics.frechet import frechet_distance
from fewstep.seeds import EVAL_SEED_START
from fewstep.showcase import pipeline_picture
from fewstep.solvers.artifact import load_solver
from fewstep.solvers.registry import classic_specs
from fewstep.specs import load_model
from fewstep.zoo.scenes.classifier import Features, prompt_adherence
from fewstep.zoo.scenes.measure import captions_of


def _models(family: str, w: float) -> tuple[Any, Any]:
    """(the model fits use: training captions; the model the table scores: held-out captions)."""
    fitted = load_model(f"zoo:scenes-{family}", guidance=w)
    held = getattr(fitted, "held_out_prompts", None)
    return fitted, (fitted if held is None else fitted.with_prompts(held))


def _finished(out: Path, model: Any, method: str, nfe: int, seed: int, fit_kw: dict) -> Any:
    """The finished fit in ``out`` made with these settings (after an interruption), else None."""
    if not (out / "solver.json").is_file() or (out / CHECKPOINT_NAME).exists():
        return None
    solver = load_solver(out)
    return None if same_fit(solver.doc, model, method, nfe, seed=seed, **fit_kw) else solver


def _scores(model: Any, x: torch.Tensor, ref_feats: torch.Tensor, captions: list[str], feat: Features) -> dict:
    """FD (classifier features, against the reference's) and prompt adherence of latent samples ``x``."""
    assert model.decode is not None
    with torch.no_grad():
        images = model.decode(x).float().clamp(-1, 1)
        f = feat(images)
    adh = prompt_adherence(images, captions)
    return {"fd": frechet_distance(f, ref_feats), "adherence": adh["adherence"], "all_correct": adh["all_correct"]}


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"


def measure(family: str, w: float, args: argparse.Namespace, fit_kw: dict, log: Any) -> dict[str, Any]:
    """Every row of one (pipeline, guidance) cell group, with the fits' costs."""
    fitted, held = _models(family, w)
    nfes = [int(n) for n in args.nfe.split(",")]
    fits = []
    for method in args.methods.split(","):
        for n in nfes:
            for seed in [int(s) for s in args.seeds.split(",")]:
                out = Path(args.out) / f"scenes-{family}" / f"w{w:g}" / f"{method}-nfe{n}-seed{seed}"
                t0 = time.perf_counter()
                solver = _finished(out, fitted, method, n, seed, fit_kw)
                how = "found"
                if solver is None:
                    solver, how = fit(fitted, method, n, out=out, seed=seed, progress=False, **fit_kw).solver, "fitted"
                cost = solver.doc["cost"]
                log(f"  {family} w={w:g} {method} NFE {n} seed {seed}: {how}, {time.perf_counter() - t0:.0f} s")
                fits.append({"method": method, "nfe": n, "seed": seed, "solver": solver, "cost": cost})
    seeds = list(range(EVAL_SEED_START, EVAL_SEED_START + args.samples))
    ref, info = reference_samples(held, seeds, nfe=args.reference_nfe)
    captions = captions_of(held, seeds)
    feat = Features().eval()
    with torch.no_grad():
        ref_feats = feat(held.decode(ref).float().clamp(-1, 1))
    rows: list[dict[str, Any]] = []

    def score(label: str, kind: str, solver: Any, n: int, extra: dict | None = None) -> dict[str, Any]:
        run = run_solver(held, seeds, solver, n, ref, keep_samples=True)
        row = {"solver": label, "kind": kind, "nfe": run.row.nfe, "rmse": run.row.rmse, **(extra or {})}
        if run.samples is not None and run.row.rmse is not None:
            row.update(_scores(held, run.samples, ref_feats, captions, feat))
        rows.append(row)
        return row

    compare = [int(n) for n in args.compare_nfe.split(",") if n] if args.compare_nfe else []
    for n in sorted({*nfes, *compare}):
        classic = [run_solver(held, seeds, s, n, ref) for s in classic_specs(held.schedule)]
        ok = [r for r in classic if r.row.rmse is not None and r.row.nfe == n]
        best = min(ok, key=lambda r: r.row.rmse or float("inf"))
        score(best.row.label, "best classic", best.row.label, n)
        score(OwnScheduler(n).label(held), "own scheduler", OwnScheduler(n), n)
    for f in fits:
        score(f["method"], "learned", f["solver"], f["nfe"], {"seed": f["seed"], "cost": f["cost"]})
    pic = None
    if args.docs and 5 in nfes and fits:
        learned5 = next(f["solver"] for f in fits if f["nfe"] == 5)
        best5 = next(r for r in rows if r["kind"] == "best classic" and r["nfe"] == 5)
        cols = [
            (f"reference {info['solver']}:{info['nfe']}", info["solver"], info["nfe"]),
            ("pipeline's own scheduler at NFE 5", OwnScheduler(5), None),
            (f"best classic {best5['solver']} at NFE 5", best5["solver"], 5),
            (f"learned {learned5.name} at NFE 5", learned5, None),
        ]
        pic = str(pipeline_picture(held, seeds[:8], cols, Path(args.docs) / f"trained-{family}-w{w:g}.png")[0])
    return {"family": family, "guidance": w, "reference": info, "rows": rows, "picture": pic}


def markdown(groups: list[dict[str, Any]], nfes: list[int]) -> str:
    out = [
        "| pipeline | guidance | NFE | best classic | RMSE | own scheduler RMSE | learned | RMSE (mean ± sd) | ratio "
        "| FD best classic / learned | adherence best classic / learned | fit evaluations | fit seconds | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in groups:
        rows = g["rows"]
        for n in nfes:
            best = next(r for r in rows if r["kind"] == "best classic" and r["nfe"] == n)
            own = next((r for r in rows if r["kind"] == "own scheduler" and r["nfe"] == n), None)
            for method in sorted({r["solver"] for r in rows if r["kind"] == "learned" and r["nfe"] == n}):
                mine = [r for r in rows if r["kind"] == "learned" and r["nfe"] == n and r["solver"] == method]
                rm = [r["rmse"] for r in mine if r["rmse"] is not None]
                ratio = [v / best["rmse"] for v in rm]
                fd = [r["fd"] for r in mine if "fd" in r]
                adh = [r["adherence"] for r in mine if "adherence" in r]
                ev = [r["cost"]["total_evals"] for r in mine]
                secs = [r["cost"]["wall_s"] for r in mine]
                mib = [r["cost"]["peak_memory_mib"] for r in mine]
                own_rmse = own["rmse"] if own and own["rmse"] is not None else float("nan")
                out.append(
                    f"| scenes-{g['family']} | {g['guidance']:g} | {n} | {best['solver']} | {best['rmse']:.4g} | "
                    f"{own_rmse:.4g} | {method} | {_cell(rm)} | "
                    f"{_cell(ratio)} | {best.get('fd', float('nan')):.3g} / {_cell(fd)} | "
                    f"{best.get('adherence', float('nan')):.3f} / {_cell(adh)} | {_cell(ev)} | {_cell(secs)} | "
                    f"{max(mib):.0f} |"
                )
    more = [
        f"| scenes-{g['family']} | {g['guidance']:g} | {r['nfe']} | {r['kind']}: {r['solver']} | {r['rmse']:.4g} | "
        f"{r.get('fd', float('nan')):.3g} | {r.get('adherence', float('nan')):.3f} |"
        for g in groups
        for r in g["rows"]
        if r["kind"] != "learned"
    ]
    out += ["", "| pipeline | guidance | NFE | solver | RMSE | FD | adherence |", "|---|---|---|---|---|---|---|"]
    out += more
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", default="sd,sd3,pixart,dit")
    ap.add_argument("--guidance", default="1.5,4,7.5", help="scales (DiT skips those above 4)")
    ap.add_argument("--nfe", default="4,5,6,8")
    ap.add_argument("--methods", default="s4s-alt,dss,ld3")
    ap.add_argument("--compare-nfe", default="", help="NFEs with classic rows only (e.g. 8: learned 5 against them)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--reference-nfe", type=int, default=None)
    ap.add_argument("--fit", default="{}", help="fit settings as JSON (FitConfig fields, teacher, budget)")
    ap.add_argument("--out", default="out/trained")
    ap.add_argument("--md", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--docs", default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    fit_kw = json.loads(args.fit)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    head = (
        f"# trained scenes pipelines: learned vs classic ({platform.machine()}, {args.threads} threads, "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, commit {commit})\n\nfit settings: {args.fit}; "
        f"{args.samples} held-out noises from seed {EVAL_SEED_START}, held-out captions\n"
    )
    print(head, flush=True)
    groups = []
    nfes = [int(n) for n in args.nfe.split(",")]
    for family in args.families.split(","):
        for w in [float(x) for x in args.guidance.split(",")]:
            if family == "dit" and w > 4:
                continue
            t0 = time.perf_counter()
            groups.append(measure(family, w, args, fit_kw, lambda s: print(s, flush=True)))
            print(f"scenes-{family} w={w:g}: {time.perf_counter() - t0:.0f} s", flush=True)
    text = head + "\n" + markdown(groups, nfes)
    print(text)
    if args.md:
        Path(args.md).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(groups, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
