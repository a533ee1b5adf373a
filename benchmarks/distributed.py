"""Teacher generation, a fit and an evaluation under 1 and 2 processes (torchrun, CPU, gloo), and what a fit
step sends between them.

    python benchmarks/distributed.py [--model zoo:gmm] [--nfe 5] [--steps 600] [--start NAME@GRID] [--procs 1,2]
    python benchmarks/distributed.py --model zoo:digits-unet --samples 96 --val-samples 64 --confirm-samples 64 \
        --steps 40 --eval-samples 64 --timing-only

For each process count K the script starts ``torchrun --standalone --nproc-per-node=K`` on itself
(``--worker``); every process runs one thread. The worker times, with a barrier before and after each part,
the teacher data of a fit (training, validation and confirmation noises) in a fresh cache, the fit itself (its
teacher now cached) and an evaluation of every classic solver and the fitted one on held-out noise, and counts
the bytes its collectives contribute (:data:`fewstep.distributed.traffic`): the per-step gradient all-reduce,
and everything else a fit sends (validation errors, checkpoints, the artifact's document). Wall times exclude
starting the processes (importing torch: ~2-3 s each). The last table compares the K-process results with the
one-process ones: by default (one noise group per process) the gradient is summed in another order, and
next to them one process summing it in two micro-batches shows how far that alone moves a fit; with
``--noise-groups G`` fixed, every process count up to G gives the same fit bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def worker(args: argparse.Namespace) -> None:
    from fewstep import distributed
    from fewstep.evaluate import evaluate
    from fewstep.fit.api import FitData, fit, fit_plan
    from fewstep.specs import load_model

    torch.set_num_threads(1)
    d = distributed.init("cpu")
    m = load_model(args.model)
    over = {
        "steps": args.steps,
        "samples": args.samples,
        "val_samples": args.val_samples,
        "confirm_samples": args.confirm_samples,
    }
    if args.micro_batch:
        over["micro_batch"] = args.micro_batch
    if args.noise_groups:
        over["noise_groups"] = args.noise_groups
    if args.start:
        over["start"] = args.start
    cfg, spec = fit_plan(m, "s4s-alt", args.nfe, **over)
    out: dict = {"procs": d.world}

    def timed(name, fn):
        d.barrier()
        t0 = time.perf_counter()
        r = fn()
        d.barrier()
        out[name] = time.perf_counter() - t0
        return r

    timed("teacher_s", lambda: FitData.generate(m, cfg, spec, args.cache, "cpu", False))
    before = {k: list(v) for k, v in distributed.traffic.items()}
    res = timed(
        "fit_s", lambda: fit(m, "s4s-alt", args.nfe, out=args.out, cache_dir=args.cache, progress=False, **over)
    )
    sent = {
        k: [v[0] - before.get(k, [0, 0])[0], v[1] - before.get(k, [0, 0])[1]] for k, v in distributed.traffic.items()
    }
    out["traffic"] = sent
    out["steps"] = sent.get("gradients", [0, 0])[0]
    out["params"] = sum(p.numel() for p in res.outcome.solver.parameters())
    rep = timed("eval_s", lambda: evaluate(m, nfe=args.nfe, samples=args.eval_samples, learned=[res.solver]).as_dict())
    out["held_out"] = {f"{r['solver']}@{r['grid']}": r["rmse"] for r in rep["results"]}
    out["learned_rmse"] = next(r["rmse"] for r in rep["results"] if r["grid"] == "learned")
    if d.main:
        Path(args.report).write_text(json.dumps(out))
    distributed.shutdown()


def launch(args: argparse.Namespace) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    procs = [int(k) for k in args.procs.split(",")]
    runs = {}
    # then: one process with the batch's gradient summed in two micro-batches, a change of the summation order
    # alone (in exact arithmetic the same fit), to read the K-process differences against; and every K with
    # --noise-groups fixed at the largest K, which makes the fit the same bit for bit
    G = max(procs)
    configs = [(k, str(k), 0, 0) for k in procs]
    if not args.timing_only:
        configs += [(1, "1, --micro-batch 24", 24, 0)] + [(k, f"{k}, --noise-groups {G}", 0, G) for k in procs]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (k, label, mb, groups) in enumerate(configs):
            report, cache, art = Path(tmp) / f"r{i}.json", Path(tmp) / f"cache{i}", Path(tmp) / f"fit{i}"
            env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
            cmd = [
                str(torchrun),
                "--standalone",
                f"--nproc-per-node={k}",
                __file__,
                "--worker",
                "--report",
                str(report),
                "--cache",
                str(cache),
                "--out",
                str(art),
                "--model",
                args.model,
                "--nfe",
                str(args.nfe),
                "--steps",
                str(args.steps),
                "--samples",
                str(args.samples),
                "--eval-samples",
                str(args.eval_samples),
                "--val-samples",
                str(args.val_samples),
                "--confirm-samples",
                str(args.confirm_samples),
                "--micro-batch",
                str(mb),
                "--noise-groups",
                str(groups),
            ] + (["--start", args.start] if args.start else [])
            t0 = time.perf_counter()
            subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
            runs[label] = json.loads(report.read_text())
            runs[label]["launch_s"] = time.perf_counter() - t0
            from safetensors.torch import load_file

            runs[label]["param_tensors"] = {n: t.double() for n, t in load_file(art / "params.safetensors").items()}

    print(
        f"# Several processes: {args.model}, s4s-alt at NFE {args.nfe} ({args.samples} training, "
        f"{args.val_samples} validation and {args.confirm_samples} confirmation noises, {args.steps} steps"
        f"{', start ' + args.start if args.start else ''}), eval on {args.eval_samples} noises"
    )
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, one thread per process, torch {torch.__version__}, "
        f"gloo, {time.strftime('%Y-%m-%d')}\n"
    )
    base = runs[str(procs[0])]
    print(
        "| processes | teacher (s) | fit (s) | eval (s) | whole command (s) | fit speed-up | gradient message "
        "per step (bytes) | everything a fit sends, per step (bytes) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for label in [c[1] for c in configs if "micro" not in c[1]]:
        r, k = runs[label], runs[label]["procs"]
        g = r["traffic"].get("gradients", [0, 0])
        per_step = g[1] / g[0] if g[0] else 0
        total = sum(v[1] for v in r["traffic"].values())
        all_per_step = total / r["steps"] if r["steps"] else 0
        one = runs["1"] if "groups" not in label else runs[f"1, --noise-groups {G}"]
        print(
            f"| {label} | {r['teacher_s']:.1f} | {r['fit_s']:.1f} | {r['eval_s']:.1f} | {r['launch_s']:.1f} | "
            f"{one['fit_s'] / r['fit_s']:.2f} | {per_step:.0f} | {all_per_step:.0f} |"
        )
    print(
        f"\nThe solver has {base['params']} parameters (float64), of which a phase trains some; a step gathers, for "
        f"each noise group, the gradients of the parameters it trains, which of them have one, the loss and two "
        f'flags (float64). Bytes are what each process contributes to the step\'s message; "everything" adds the '
        f"validations' gathered errors, the checkpoints' relaxed latents (none here) and the budget and error "
        f"checks, spread over the steps.\n"
    )
    print(
        "| processes | held-out RMSE of the fit | relative to 1 process (same groups) | largest parameter difference "
        "(relative) | classic rows equal |"
    )
    print("|---|---|---|---|---|")
    for k, r in runs.items():
        base = runs["1"] if "groups" not in k else runs[f"1, --noise-groups {G}"]
        diff = max(
            float((r["param_tensors"][n] - t).abs().max() / max(1.0, float(t.abs().max())))
            for n, t in base["param_tensors"].items()
            if t.numel()
        )
        same = all(v == base["held_out"].get(s) for s, v in r["held_out"].items() if not s.endswith("@learned"))
        print(
            f"| {k} | {r['learned_rmse']:.6g} | {r['learned_rmse'] / base['learned_rmse'] - 1:+.1e} | {diff:.1e} | "
            f"{'yes' if same else 'no'} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="zoo:gmm")
    ap.add_argument("--nfe", type=int, default=5)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--samples", type=int, default=700, help="training noises")
    ap.add_argument("--val-samples", type=int, default=200)
    ap.add_argument("--confirm-samples", type=int, default=200)
    ap.add_argument("--eval-samples", type=int, default=1024)
    ap.add_argument("--start", default=None, help="the fit's start NAME@GRID (default: the best classic, screened)")
    ap.add_argument("--procs", default="1,2")
    ap.add_argument("--timing-only", action="store_true", help="only the process counts, not the comparisons")
    ap.add_argument("--micro-batch", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--noise-groups", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--report", default=None)
    ap.add_argument("--cache", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    worker(args) if args.worker else launch(args)


if __name__ == "__main__":
    main()
