"""The image model: learned solvers against the best classic solver on zoo:digits-unet.

    python benchmarks/image.py [--nfe 3,4,5,6,8,10] [--methods s4s-alt,dss] [--guidance 2] [--out out/bench-unet]
                               [--reuse] [--docs docs]

A class-conditional diffusers UNet2DModel (loaded through the diffusers adapter) sampled with
classifier-free guidance (one guided call = 1 NFE). Held-out RMSE to a converged reference, and
Frechet distance / KID in the digits classifier's features against the digits themselves, with
the reference solve's own figures as the floor. Fits use a smaller budget than the defaults (the
UNet costs about 100x the digits MLP per call): 256 training and 128 validation noises, a 50-NFE
UniPC teacher, 300 steps of batch 16 (S4S-Alt: 2 rounds). With --reuse, finished fits found in
--out (for example fitted in parallel processes with the same settings) are loaded, not redone.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import torch

from fewstep import zoo
from fewstep.bench import format_bench, report_plots, run_bench
from fewstep.report import Report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nfe", default="3,4,5,6,8,10")
    ap.add_argument("--methods", default="s4s-alt,dss")
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--samples", type=int, default=256, help="held-out samples")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="out/bench-unet")
    ap.add_argument("--reuse", action="store_true", help="load finished fits found in --out instead of refitting")
    ap.add_argument("--docs", default=None, help="copy the sample and solver pictures here (e.g. docs)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    nfes = [int(n) for n in args.nfe.split(",")]
    m = zoo.load("digits-unet", guidance_scale=args.guidance)
    print(f"# zoo:digits-unet, guidance {args.guidance:g}: held-out RMSE and FD ({args.samples} samples)")
    print(
        f"machine: {platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}\n"
    )
    t0 = time.perf_counter()
    fit_kwargs = {"samples": 256, "val_samples": 128, "teacher": "unipc3@logsnr:50", "steps": args.steps, "batch": 16}
    b = run_bench(
        m,
        nfes,
        args.methods.split(","),
        args.out,
        samples=args.samples,
        metrics="auto",
        model_name="zoo:digits-unet",
        progress=False,
        fit_kwargs=fit_kwargs,
        eval_kwargs={"reference_nfe": 200},
        reuse=args.reuse,
    )
    paths = report_plots(Report.from_dict(b["report"]), m, args.out, b["solvers"])
    b.pop("solvers")
    Path(args.out, "bench.json").write_text(json.dumps(b, indent=1))
    print(format_bench(b))
    print("\nfits: " + ", ".join(f"{f['method']}@{f['nfe']} {f['seconds']:.0f} s" for f in b["fits"]))
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.docs:
        for p in paths:
            if p.name.startswith("samples_") or p.name.startswith("fd_vs"):
                shutil.copy(p, Path(args.docs) / f"unet_{p.name}")


if __name__ == "__main__":
    main()
