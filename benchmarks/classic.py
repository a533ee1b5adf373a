"""Classic solvers on every zoo model: held-out RMSE against NFE, and the kernel's overhead.

    python benchmarks/classic.py [--samples 256] [--models gaussian,gmm,...] [--json out.json]

Prints markdown tables: per model, the best grid of each classic solver at NFE 3..10 and the
best classic overall; then sampling time / (NFE x one model call) on digits-eps.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time

import torch

from fewstep import sample, zoo
from fewstep.evaluate import evaluate
from fewstep.report import Report

NFES = [3, 4, 5, 6, 8, 10]


def classic_table(rep: dict) -> str:
    best: dict[str, dict[int, tuple[float, str]]] = {}
    for r in rep["results"]:
        if r["rmse"] is None:
            continue
        d = best.setdefault(r["solver"], {})
        if r["nfe"] in NFES and (r["nfe"] not in d or r["rmse"] < d[r["nfe"]][0]):
            d[r["nfe"]] = (r["rmse"], r["grid"])
    head = "| solver (best grid) | " + " | ".join(f"NFE {n}" for n in NFES) + " |"
    lines = [head, "|" + "---|" * (len(NFES) + 1)]
    for name, d in sorted(best.items()):
        cells = [f"{d[n][0]:.4g} ({d[n][1]})" if n in d else "—" for n in NFES]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    cells = []
    for n in NFES:
        b = Report.from_dict(rep).best_classic(n)
        cells.append(f"**{b.rmse:.4g}** {b.label}" if b else "—")
    lines.append("| **best classic** | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def overhead(model_name: str = "digits-eps", batch: int = 256, nfe: int = 10, repeats: int = 30) -> dict:
    """min over repeats of sample time / min of nfe bare network calls, one thread."""
    torch.set_num_threads(1)
    m = zoo.load(model_name)
    x = m.noise(range(batch))
    tn = torch.full((batch,), 500.0)

    def best(f):
        f()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    out = {}
    with torch.no_grad():
        net = best(lambda: [m.net(x, tn) for _ in range(nfe)])
        for solver in ("ddim", "dpmpp_3m", "unipc", "ipndm", "adams4"):
            grid = "logsnr" if solver != "adams4" else "time"
            s = best(functools.partial(sample, m, x, solver, nfe=nfe, grid=grid))
            out[solver] = s / net
    return out


class _Free(torch.nn.Module):
    """A network that costs nothing: returns its input."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x


def kernel_cost(model_name: str = "digits-eps", batch: int = 256, nfe: int = 10, repeats: int = 200) -> dict:
    """Milliseconds per step that fewstep itself spends (solver resolution, kernel, denoiser wrapper) around a
    network that costs nothing; best of ``repeats``, one thread. Independent of the network's timing noise."""
    torch.set_num_threads(1)
    m = zoo.load(model_name)
    m.net = _Free()
    x = m.noise(range(batch))
    out = {}
    with torch.no_grad():
        for solver in ("ddim", "dpmpp_3m", "unipc", "ipndm", "adams4"):
            grid = "logsnr" if solver != "adams4" else "time"
            sample(m, x, solver, nfe=nfe, grid=grid)
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                sample(m, x, solver, nfe=nfe, grid=grid)
                ts.append(time.perf_counter() - t0)
            out[solver] = min(ts) / nfe * 1e3
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--models", default="gaussian,gmm2d,gmm,digits-empirical,digits-eps,digits-flow")
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-overhead", action="store_true", help="skip the overhead timing")
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"# Classic solvers: held-out RMSE to the reference ({args.samples} samples, seeds from 1000000)")
    print(
        f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}\n"
    )
    allrep = {}
    for name in [n for n in args.models.split(",") if n]:
        m = zoo.load(name)
        t0 = time.perf_counter()
        rep = evaluate(m, nfe=NFES, samples=args.samples, model_name=f"zoo:{name}").as_dict()
        ref = rep["reference"]
        print(
            f"## zoo:{name}\nreference {ref['solver']} at {ref['nfe']} NFE, self-error {ref['self_error']:.2g}; "
            f"{time.perf_counter() - t0:.0f} s\n"
        )
        print(classic_table(rep) + "\n", flush=True)
        allrep[name] = rep
    ov = {} if args.no_overhead else overhead()
    if ov:
        print("## Kernel overhead on digits-eps (batch 256, NFE 10, one thread)\n")
        print("sampling time / (10 x one bare network call), best of 30:\n")
        print("| solver | ratio |\n|---|---|")
        for k, v in ov.items():
            print(f"| {k} | {v:.3f} |")
        kc = kernel_cost()
        print("\nfewstep's own time per step around a network that costs nothing (ms, best of 200):\n")
        print("| solver | ms per step |\n|---|---|")
        for k, v in kc.items():
            print(f"| {k} | {v:.3f} |")
        ov = {"ratio": ov, "ms_per_step_free_network": kc}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"classic": allrep, "overhead": ov}, f)


if __name__ == "__main__":
    main()
