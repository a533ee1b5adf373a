"""The trained scenes pipelines: how well they follow prompts, and what their training cost.

    python benchmarks/scenes.py [--families sd,sd3,pixart,dit] [--guidance 1,2,4,7.5] [--samples 256]
                                [--solver reference] [--docs docs] [--threads 2]

For each pipeline (``zoo:scenes-<family>``): samples of held-out noise seeds conditioned on the held-out
captions (``prompts/heldout.txt``: (shape, colour) pairs training never saw; DiT: its 24 classes), solved by
the converged reference solver (fewstep's ``reference`` default, 400 NFE) at each guidance scale, decoded by the
scenes VAE and scored by the attribute classifier: prompt adherence (the share of each caption's stated
attributes the image shows, with the object count) and the share of images that show all of them. Chance is
the classifier's figure for a uniform guess. Also prints each recipe's size, training time and final loss, and
writes one picture per pipeline (--docs): the first 16 held-out captions at the best scale.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

from fewstep.io import image_grid, write_png
from fewstep.solvers.registry import classic_default
from fewstep.specs import load_model
from fewstep.zoo.scenes.classifier import prompt_adherence
from fewstep.zoo.scenes.measure import captions_of, decoded_samples
from fewstep.zoo.scenes.models import pipeline_folder

SEED0 = 1_000_000  # held-out noise: fits and training never draw these seeds


def _model(family: str, guidance: float):
    folder = pipeline_folder(family)
    if family == "dit":
        return load_model(f"zoo:scenes-{family}", guidance=guidance)
    return load_model(f"zoo:scenes-{family}", prompts=str(folder / "prompts" / "heldout.txt"), guidance=guidance)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", default="sd,sd3,pixart,dit")
    ap.add_argument("--guidance", default="1,2,4,7.5")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--solver", default="reference", help="'reference', 'teacher' (100 NFE) or NAME@GRID:NFE")
    ap.add_argument("--docs", default="docs")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seeds = list(range(SEED0, SEED0 + args.samples))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"# scenes pipelines ({platform.machine()}, {torch.get_num_threads()} threads, commit {commit})\n")
    rows, training = [], []
    for family in args.families.split(","):
        doc = json.loads((pipeline_folder(family) / "recipe.json").read_text())
        prov, rec = doc["provenance"], doc["recipe"]
        params = None
        best: tuple[float, float, torch.Tensor, str] | None = None
        for w in [float(x) for x in args.guidance.split(",")]:
            model = _model(family, w)
            if params is None:
                params = sum(p.numel() for p in model.family.network.parameters())
            if args.solver in ("reference", "teacher"):
                name, grid, nfe = classic_default(model.schedule, args.solver)
            else:
                spec, _, n = args.solver.partition(":")
                name, _, grid = spec.partition("@")
                nfe = int(n)
            t0 = time.perf_counter()
            images = decoded_samples(model, seeds, f"{name}@{grid}", nfe)
            adh = prompt_adherence(images, captions_of(model, seeds))
            rows.append((family, w, f"{name}@{grid}:{nfe}", adh, time.perf_counter() - t0))
            print(
                f"scenes-{family} w={w:g} {name}@{grid}:{nfe}: adherence {adh['adherence']:.3f} "
                f"all-correct {adh['all_correct']:.3f} (chance {adh['chance']:.3f})",
                flush=True,
            )
            if best is None or adh["adherence"] > best[0]:
                best = (adh["adherence"], w, images[:16], f"{name}@{grid}:{nfe}")
        training.append((family, params, rec, prov))
        if args.docs and best is not None:
            path = Path(args.docs) / f"scenes-{family}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_png(path, image_grid(best[2], nrow=8), scale=3)
            caps = captions_of(_model(family, best[1]), seeds[:16])
            (path.with_suffix(".txt")).write_text(
                f"zoo:scenes-{family}, guidance {best[1]:g}, {best[3]}; row by row:\n" + "\n".join(caps) + "\n"
            )
    print("\n| pipeline | guidance | solver | prompt adherence | all attributes | chance | seconds |")
    print("|---|---|---|---|---|---|---|")
    for family, w, solver, adh, sec in rows:
        print(
            f"| scenes-{family} | {w:g} | {solver} | {adh['adherence']:.3f} | {adh['all_correct']:.3f} | "
            f"{adh['chance']:.3f} | {sec:.0f} |"
        )
    print("\n| pipeline | network parameters | steps x batch | train seconds (threads) | final loss |")
    print("|---|---|---|---|---|")
    for family, params, rec, prov in training:
        print(
            f"| scenes-{family} | {params / 1e6:.2f}M | {rec['steps']} x {rec['batch']} | "
            f"{prov.get('wall_seconds', prov['train_seconds']):.0f} ({prov['threads']}) | {prov['final_loss']} |"
        )


if __name__ == "__main__":
    main()
