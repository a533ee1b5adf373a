#!/usr/bin/env bash
# One trained scenes pipeline, fitted and scored on held-out captions at a size a GPU affords (issue 24).
#
#   bash benchmarks/gpu_check.sh OUTDIR [--smoke] [--family sd|pixart|sd3] [--dtype bf16|fp16|fp32]
#                                       [--methods s4s-alt,dss]
#
# Runs benchmarks/gpu.py on zoo:scenes-<family>'s pipeline folder (default sd): the fits on all of its
# prompts/train.txt, the held-out table on prompts/heldout.txt (attribute pairs training never saw), RMSE to the
# converged reference and FD in the scenes attribute classifier's features, guidance 4, NFE 5, S4S-Alt (--methods
# s4s-alt,dss adds DSS), against every classic solver on every grid. Prints the markdown and writes
# OUTDIR/gpu_check.md, OUTDIR/gpu_check.json and the fitted artifacts (and teacher cache) under OUTDIR/runs.
# Needs no network (HF_HUB_OFFLINE=1): the pipeline folder is assembled from the weights the repo ships.
#
# Without --smoke: CUDA, at most ~8 minutes on one H100 (see SIZES below). With --smoke: the CPU, tiny sizes,
# 20-35 s on one thread (tests/test_gpu_check.py runs it); its numbers are not results.
# Python: $PYTHON if set, else the repo's .venv/bin/python, else python3, else python; the repo's src/ goes on
# PYTHONPATH so an uninstalled checkout runs (the packages fewstep needs, diffusers included, must be there).
# Bad usage is one `error:` line and exit code 2.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
USAGE="usage: bash benchmarks/gpu_check.sh OUTDIR [--smoke] [--family sd|pixart|sd3] [--dtype bf16|fp16|fp32] [--methods LIST]"

die() { # one line on stderr, exit code 2
    echo "error: $*" >&2
    exit 2
}

outdir="" smoke=0 family="sd" methods="" dtype="bf16"
while [[ $# -gt 0 ]]; do
    case "$1" in
    --smoke) smoke=1 ;;
    --family | --dtype | --methods)
        [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value ($USAGE)"
        case "$1" in
        --family) family="$2" ;;
        --dtype) dtype="$2" ;;
        --methods) methods="$2" ;;
        esac
        shift
        ;;
    -h | --help)
        echo "$USAGE"
        exit 0
        ;;
    -*) die "unknown option $1 ($USAGE)" ;;
    *)
        [[ -z "$outdir" ]] || die "one output folder only, got $outdir and $1 ($USAGE)"
        outdir="$1"
        ;;
    esac
    shift
done
[[ -n "$outdir" ]] || die "give an output folder ($USAGE)"
[[ ! -e "$outdir" || -d "$outdir" ]] || die "$outdir is a file; give a folder for the markdown, JSON and artifacts"
case "$dtype" in bf16 | fp16 | fp32) ;; *) die "--dtype $dtype: give bf16, fp16 or fp32" ;; esac
case "$family" in
sd | pixart | sd3) ;;
dit) die "--family dit: DiT is class-conditional (no prompt files); give a text-to-image family: sd, pixart or sd3" ;;
*) die "--family $family: unknown; give sd, pixart or sd3" ;;
esac

if [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then
    PY="$ROOT/.venv/bin/python"
elif command -v python3 >/dev/null; then
    PY=python3
else
    PY=python
fi
export HF_HUB_OFFLINE=1
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
start=$SECONDS

# The pipeline folder (built from shipped weights on first use, a few seconds); without --smoke, CUDA first.
# A family whose weights do not ship (sd3) must be built already: building it here would train for ~45 minutes.
folder="$(
    "$PY" -c '
import sys
fam, need_cuda = sys.argv[1], sys.argv[2] == "1"
def die(msg):
    print(f"error: {msg}", file=sys.stderr); sys.exit(2)
if need_cuda:
    import torch
    if not torch.cuda.is_available():
        die(f"CUDA is not available to {sys.executable} (torch {torch.__version__}): run on a GPU machine, or pass --smoke to run on the CPU")
from fewstep.zoo.scenes.models import SHIPPED_FAMILIES, folder_path, folder_problem, pipeline_folder, recipe_for
path = folder_path(fam)
if fam not in SHIPPED_FAMILIES and (not path.is_dir() or folder_problem(path, recipe_for(fam)) is not None):
    die(f"zoo:scenes-{fam} is not built here (it trains on first use, ~45 min on one CPU thread): build it first with "
        f"python -c \"from fewstep.zoo.scenes.models import pipeline_folder; pipeline_folder({fam!r})\"")
print(pipeline_folder(fam, log=False))
' "$family" "$((1 - smoke))"
)"

common=(
    --pipeline "$folder"
    --prompts "$folder/prompts/train.txt"
    --eval-prompts "$folder/prompts/heldout.txt"
    --feature fewstep.zoo.scenes.classifier:Features
    --guidance 4
    --out "$outdir/runs"
    --md "$outdir/gpu_check.md"
    --json "$outdir/gpu_check.json"
)
if [[ $smoke -eq 1 ]]; then
    # Tiny: the teacher makes two shards of 128 noises (training and validation) whatever the fit's sizes, so it
    # takes few steps; the given start skips screening every classic start, and the table has 3 classic solvers
    # and 4 held-out samples (without them this takes twice as long).
    sizes=(
        --device cpu --nfe 4 --methods "${methods:-s4s-alt}" --smoke
        --teacher unipc3@logsnr:6 --reference-nfe 12 --samples 4 --data-samples 8
        --solvers ddim@logsnr,dpmpp_2m@logsnr,unipc3@logsnr
        --fit '{"samples": 8, "val_samples": 4, "confirm_samples": 0, "steps": 4, "batch": 4, "eval_every": 2, "start": "dpmpp_2m@logsnr"}'
    )
else
    # SIZES. This network is tiny (8x8x4 latents): on an H100 it is bound by kernel launches, not arithmetic, so
    # costs go by network calls, ~900 aten ops a forward call and ~1100 autograd nodes a backward. One CPU
    # thread at batch 1 (also op-bound) takes 22 ms a forward call and 55 ms forward + backward in bf16: take an
    # H100 as 1-2.5x that. One fit (300 steps + ~240 screening steps, each 5 NFE x forward, recomputed forward
    # and backward, ~0.16-0.4 s a step; its teacher: 12 shards of 128 noises x 100 NFE; its start chosen among
    # ~70 classic solver-grid pairs on the 256 validation noises): ~100-250 s. The table (~70 pairs x 5 NFE x 3
    # batches of <= 500 samples) and the reference (2 x 100 NFE, and 100 for its self-error, on 1024 + 1024
    # noises): ~25-60 s. s4s-alt alone: ~2.5-5.5 min; --methods s4s-alt,dss adds ~2-4 min (8 min is then
    # exceeded on the slow side: add it when a first run took under ~4 min).
    # bf16: accepted and finite on these pipelines; measured on the CPU (16 held-out noises, guidance 4) its
    # reference moves 0.013 RMSE from float32's (fp16: 0.0008) against 0.33 for the best classic solver at NFE 5,
    # so bf16 leaves the comparison intact; --dtype fp16 or fp32 if the learned rows come near that floor.
    sizes=(
        --device cuda --dtype "$dtype" --nfe 5 --methods "${methods:-s4s-alt}"
        --samples 1024 --reference-nfe 100 --data-samples 1024
        --fit '{"samples": 1024, "val_samples": 256, "confirm_samples": 256, "batch": 64, "steps": 300}'
    )
fi
mkdir -p "$outdir"
echo "gpu_check: zoo:scenes-$family ($folder), $([[ $smoke -eq 1 ]] && echo 'smoke run on the CPU' || echo "CUDA, $dtype")" >&2
"$PY" "$ROOT/benchmarks/gpu.py" "${common[@]}" "${sizes[@]}"
echo "gpu_check: done in $((SECONDS - start)) s: $outdir/gpu_check.md, $outdir/gpu_check.json (artifacts in $outdir/runs)"
