"""The seed papers' protocol on a diffusers pipeline you have locally, ready for a GPU (issue 12).

    python benchmarks/gpu.py --pipeline ~/models/sd15 --prompts prompts.txt --nfe 4,5,6,8,10 \\
        --methods s4s-alt,dss --feature feats.py:inception --device cuda --dtype bf16 \\
        --md gpu.md --json gpu.json

For every method and NFE a learned solver is fitted (teacher generation included) on the fit part of the
prompt file (with ``--eval-prompts FILE``: on all of it); then one held-out table (``fewstep.bench.run_bench``,
what ``fewstep bench`` runs) scores every classic solver on every grid (``--solvers``: those) and the learned
solvers on the prompts the fits never saw (the held-out part, or FILE's): RMSE to the converged reference and,
with ``--feature`` (``file.py:factory`` or ``module:factory``, making an ``nn.Module`` over decoded images), FD
in that network; without it, RMSE only. The markdown (header: command, machine, torch, date, git commit) has
per NFE the best classic solver, each learned method and their RMSE ratio, then what each fit cost: wall time,
network evaluations (teacher and fit, from the artifact's ``cost``), peak memory. ``--json`` keeps everything.

``--fit '{"samples": 700, "steps": 2000}'`` sets fit settings (``FitConfig`` fields); ``--teacher NAME@GRID:NFE``
the teacher. ``--smoke`` shrinks the fits, the teacher, the reference and the held-out set and marks the
output as a smoke run (e.g. for the tiny random-weight pipelines of tests/tiny_pipelines.py):

    python benchmarks/gpu.py --pipeline /tmp/gpu_smoke/sd --prompts /tmp/gpu_smoke/prompts.txt --nfe 4,5 --smoke

On a trained scenes pipeline (``zoo:scenes-sd``: its training and held-out captions, FD in the scenes attribute
classifier's features), sized for one H100 in at most ~8 minutes, or tiny on the CPU with ``--smoke``:

    bash benchmarks/gpu_check.sh OUTDIR [--smoke] [--family sd|pixart|sd3]

Bad input (a missing folder or prompt file, a bad NFE list, ...) is one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

SMOKE_BANNER = "SMOKE RUN: tiny fits, teacher and held-out set; numbers are not results"
SMOKE_FIT = {
    "samples": 16,
    "val_samples": 8,
    "confirm_samples": 8,
    "steps": 12,
    "batch": 8,
    "eval_every": 6,
    "screen_starts": 1,
    "screen_seeds": 1,
}
SMOKE_TEACHER, SMOKE_REFERENCE_NFE, SMOKE_SAMPLES, SMOKE_DATA = "unipc3@logsnr:20", 50, 8, 32


class BadInput(Exception):
    """Input refused before any work: one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line instead of usage + error
        raise BadInput(message)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", required=True, type=Path, help="a diffusers save_pretrained folder")
    p.add_argument("--prompts", required=True, type=Path, help="prompt file (.txt, .csv, .jsonl)")
    p.add_argument(
        "--eval-prompts",
        type=Path,
        help="the held-out table's prompt file; the fits then use all of --prompts "
        "(default: the held-out part of --prompts, which the fits never see)",
    )
    p.add_argument("--nfe", required=True, help="NFE budgets, e.g. 4,5,6,8,10")
    p.add_argument("--methods", default="s4s-alt", help="learned methods, comma separated (s4s, s4s-alt, dss, ld3)")
    p.add_argument(
        "--solvers", help="the table's classic solvers, NAME@GRID comma separated (default: every solver, every grid)"
    )
    p.add_argument("--feature", help="feature network for FD: file.py:factory or module:factory (default: RMSE only)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", help="fp32, fp16 or bf16 (default: as saved)")
    p.add_argument("--guidance", help="guidance scale(s) (default: the pipeline's)")
    p.add_argument("--samples", type=int, help=f"held-out samples (default 256; {SMOKE_SAMPLES} with --smoke)")
    p.add_argument(
        "--reference-nfe",
        type=int,
        help="the reference solves at twice this NFE and measures its "
        f"self-error at this NFE (default: fewstep's, 400; {SMOKE_REFERENCE_NFE} with --smoke)",
    )
    p.add_argument("--data-samples", type=int, help=f"FD data reference size (default 2048; {SMOKE_DATA} with --smoke)")
    p.add_argument("--out", type=Path, default=Path("out/gpu_bench"), help="artifacts and the teacher cache")
    p.add_argument("--fit", default="{}", help="fit settings as a JSON object, e.g. '{\"samples\": 700}'")
    p.add_argument("--teacher", help="teacher NAME@GRID:NFE (default: fewstep's)")
    p.add_argument("--md", type=Path, help="write the markdown here")
    p.add_argument("--json", type=Path, help="write everything as JSON here")
    p.add_argument("--smoke", action="store_true", help="tiny fits and held-out set; output marked as a smoke run")
    return p.parse_args(list(argv))


def check_paths(a: argparse.Namespace) -> None:
    """The checks that need no torch (instant): folders, files, the NFE list, the shape of --fit."""
    if not a.pipeline.is_dir():
        raise BadInput(f"--pipeline {a.pipeline}: no such folder (give a diffusers save_pretrained folder)")
    if not (a.pipeline / "model_index.json").is_file():
        raise BadInput(
            f"--pipeline {a.pipeline}: no model_index.json, not a diffusers pipeline folder "
            f"(give a save_pretrained folder)"
        )
    for opt, path in (("--prompts", a.prompts), ("--eval-prompts", a.eval_prompts)):
        if path is not None and not path.is_file():
            raise BadInput(f"{opt} {path}: no such file (give a prompt file: .txt, .csv or .jsonl)")
    try:
        a.nfe = [int(x) for x in a.nfe.split(",")]
    except ValueError:
        raise BadInput(f"--nfe {a.nfe!r}: give positive integers separated by commas, e.g. 4,5,6,8,10") from None
    if any(n < 1 for n in a.nfe) or len(set(a.nfe)) != len(a.nfe):
        raise BadInput(f"--nfe {','.join(map(str, a.nfe))}: give distinct positive integers, e.g. 4,5,6,8,10")
    for name in ("samples", "data_samples", "reference_nfe"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            raise BadInput(f"--{name.replace('_', '-')} must be a positive integer")
    try:
        user = json.loads(a.fit)
    except json.JSONDecodeError as e:
        raise BadInput(f"--fit is not JSON ({e.msg}); give an object, e.g. '{{\"samples\": 700}}'") from None
    if not isinstance(user, dict):
        raise BadInput("--fit must be a JSON object, e.g. '{\"samples\": 700}'")
    a.fit = user
    for opt, path in (("--md", a.md), ("--json", a.json)):
        if path is not None and path.is_dir():
            raise BadInput(f"{opt} {path} is a folder; give a file name")


def check_args(a: argparse.Namespace) -> dict[str, Any]:
    """The checks that need fewstep (methods, fit settings, teacher), before anything loads; the fit settings."""
    from fewstep.errors import FewstepError
    from fewstep.fit.config import RECORDED, FitConfig
    from fewstep.fit.registry import METHODS, resolve
    from fewstep.fit.teacher_spec import parse_teacher

    a.methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    bad = [m for m in a.methods if m not in METHODS] or ([] if a.methods else ["(none)"])
    if bad:
        raise BadInput(f"--methods: unknown method {bad[0]}; valid: {', '.join(METHODS)}")
    user = a.fit
    unknown = sorted(set(user) - set(RECORDED) - {"method", "nfe"})
    if unknown or "method" in user or "nfe" in user:
        raise BadInput(
            f"--fit: {(unknown or ['method/nfe'])[0]} is not a fit setting here; valid: "
            f"{', '.join(k for k in RECORDED if k not in ('method', 'nfe'))}"
        )
    a.solvers = None if a.solvers is None else classic_list(a.solvers)
    settings = {**(SMOKE_FIT if a.smoke else {}), **user}
    for m in a.methods:  # value errors now, not after the pipeline has loaded
        try:
            resolve(FitConfig(method=m, nfe=a.nfe[0], **settings))
        except FewstepError as e:
            raise BadInput(f"--fit: {e}") from None
    a.teacher = a.teacher or (SMOKE_TEACHER if a.smoke else None)
    if a.teacher is not None:
        parse_teacher(a.teacher)
    return settings


def classic_list(value: str) -> list[str]:
    """The --solvers list, each NAME@GRID (or NAME: its default grid) checked against fewstep's registries."""
    from fewstep.grids import GRIDS
    from fewstep.solvers.registry import solver_names
    from fewstep.solvers.resolve import parse_solver

    specs = [s.strip() for s in value.split(",") if s.strip()]
    if not specs:
        raise BadInput("--solvers is empty; give NAME@GRID pairs, e.g. dpmpp_2m@logsnr,unipc3@time")
    for spec in specs:
        name, grid = parse_solver(spec)
        if name not in solver_names():
            raise BadInput(f"--solvers: unknown solver {name!r}; valid: {', '.join(solver_names())}")
        if grid is not None and grid not in GRIDS:
            raise BadInput(f"--solvers: unknown grid {grid!r} in {spec}; valid: {', '.join(GRIDS)}")
    return specs


def machine(device: str) -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):  # no /proc/cpuinfo, or no model name in it
        cpu = next(
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        )
    gpu = torch.cuda.get_device_name(torch.device(device)) if torch.device(device).type == "cuda" else None
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                cwd=Path(__file__).resolve().parent,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
    }


def fmt(x: float | None) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.4g}"


def tables(res: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(one row per NFE: best classic and each method, RMSE and FD; one row per fit: what it cost)."""
    from fewstep.report import Report

    rep = Report.from_dict(res["bench"]["report"])
    rows = []
    for n in res["nfe"]:
        b = rep.best_classic(n)
        row: dict[str, Any] = {
            "nfe": n,
            "best_classic": None if b is None else b.label,
            "classic_rmse": None if b is None else b.rmse,
            "classic_fd": None if b is None else b.get("fd"),
            "learned": {},
        }
        for m in res["methods"]:
            r = next((r for r in rep.rows if r.kind == "learned" and r.solver == m and r.nfe == n), None)
            rmse = None if r is None else r.rmse
            row["learned"][m] = {
                "rmse": rmse,
                "fd": None if r is None else r.get("fd"),
                "ratio": None if rmse is None or not b else rmse / b.rmse,
            }
        rows.append(row)
    fits = []
    for f in res["bench"]["fits"]:
        c = f["cost"]
        fits.append(
            {
                "method": f["method"],
                "nfe": f["nfe"],
                "wall_s": c["wall_s"],
                "teacher_s": c["teacher"]["wall_s"],
                "total_evals": c["total_evals"],
                "teacher_evals": c["teacher"]["forward_evals"],
                "teacher_now": c["teacher"]["computed_now"],
                "fit_forward": c["fit"]["forward_evals"],
                "fit_backward": c["fit"]["backward_evals"],
                "peak_mib": c["peak_memory_mib"],
                "memory": c["memory"],
                "start": f["start"],
                "kept_start": f["kept_start"],
            }
        )
    return rows, fits


def prompt_line(res: dict[str, Any]) -> str:
    """Which prompts the fits and the table used (the markdown header's words)."""
    if res.get("eval_prompts_file") is None:
        return (
            f"prompts {res['prompts']}: fits on {res['fit_prompts']}, "
            f"the table on {res['eval_prompts']} held-out prompts"
        )
    return (
        f"fits on all {res['fit_prompts']} prompts of {res['prompts']}, "
        f"the table on the {res['eval_prompts']} of {res['eval_prompts_file']}"
    )


def markdown(res: dict[str, Any]) -> str:
    mc, ref, fd = res["machine"], res["bench"]["report"]["reference"], res["feature"] is not None
    where = f"GPU {mc['gpu']}" if mc["gpu"] else "no GPU used"
    lines = [f"# fewstep benchmark: {res['model']}", ""]
    if res["smoke"]:
        lines += [f"**{SMOKE_BANNER}**", ""]
    metric = (
        f"; FD in {res['feature']} against {res['data_samples']} reference solves"
        if fd
        else "; no --feature: RMSE only"
    )
    lines += [
        f"- command: `{res['command']}`",
        f"- machine: {mc['platform']}, CPU {mc['cpu']} ({mc['cores']} cores), {where} (device {res['device']})",
        f"- torch {mc['torch']}, Python {mc['python']}; date {mc['date']}; git commit {mc['commit']}",
        f"- model: dtype {res['dtype'] or 'as saved'}, guidance {res['guidance']}; {prompt_line(res)}",
        f"- held-out: {res['samples']} samples (seeds from {res['bench']['report']['seed']:,}), RMSE to "
        f"{ref['solver']} at {ref['nfe']} NFE (self-error {ref['self_error']:.2g}){metric}; classic solvers: "
        f"{'every solver on every grid' if res.get('solvers') is None else ', '.join(res['solvers'])}",
        f"- fits: teacher {res['teacher'] or 'default'}, settings {json.dumps(res['fit_settings']) or '{}'}; "
        f"run {res['wall_s']:.0f} s, peak memory {res['peak_mib']:,.0f} MiB ({res['peak_memory']})",
        "",
        "## Held-out error (ratio: learned RMSE / best classic RMSE)",
        "",
    ]
    head = ["NFE", "best classic", "RMSE"] + (["FD"] if fd else [])
    for m in res["methods"]:
        head += [f"{m} RMSE"] + ([f"{m} FD"] if fd else []) + [f"{m} / classic"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in res["rows"]:
        cells = [str(r["nfe"]), r["best_classic"] or "—", fmt(r["classic_rmse"])]
        cells += [fmt(r["classic_fd"])] if fd else []
        for m in res["methods"]:
            x = r["learned"][m]
            cells += (
                [fmt(x["rmse"])]
                + ([fmt(x["fd"])] if fd else [])
                + ["—" if x["ratio"] is None else f"**{x['ratio']:.2f}**"]
            )
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Cost of each fit (network evaluations: teacher forward + fit forward + fit backward)",
        "",
        "| method | NFE | fit wall (s) | of it teacher (s) | network evaluations | teacher forward "
        "(computed now) | fit forward | fit backward | peak memory (MiB) | start |",
        "|" + "---|" * 10,
    ]
    for f in res["fits"]:
        lines.append(
            f"| {f['method']} | {f['nfe']} | {f['wall_s']:.1f} | {f['teacher_s']:.1f} | "
            f"{f['total_evals']:,} | {f['teacher_evals']:,} ({f['teacher_now']:,}) | {f['fit_forward']:,} | "
            f"{f['fit_backward']:,} | {f['peak_mib']:,.0f} | {f['start']}"
            f"{' (kept)' if f['kept_start'] else ''} |"
        )
    if res["fits"]:
        lines += [
            "",
            "Teacher forward evaluations count what the fit's teacher data cost when it was made; \"computed "
            'now" is what this fit made itself (the rest came from the teacher cache in --out, made by an '
            f"earlier fit with the same teacher and seeds). Peak memory: {res['fits'][0]['memory']}.",
        ]
    return "\n".join(lines) + "\n"


def prompt_sets(prompts: Path, eval_prompts: Path | None) -> tuple[Any, Any]:
    """(the fits' PromptSet, the table's): the split of ``prompts``, or all of it and ``eval_prompts``."""
    from fewstep.conditions import PromptSet

    if eval_prompts is None:
        return PromptSet.read(prompts).split()
    return PromptSet.read(prompts), PromptSet.read(eval_prompts)


def run(a: argparse.Namespace, settings: dict[str, Any], command: str) -> dict[str, Any]:
    from fewstep.bench import run_bench
    from fewstep.cli.common import check_out_dir, check_out_file, eval_model, load, setup
    from fewstep.cost import peak_memory

    device = setup(a.device, None) or a.device
    check_out_dir(a.out)
    for opt, path in (("--md", a.md), ("--json", a.json)):
        if path is not None:
            check_out_file(path, opt)
    fit_part, held_out = prompt_sets(a.prompts, a.eval_prompts)
    t0 = time.perf_counter()
    spec = f"diffusers:{a.pipeline}"
    feat, data = None, a.data_samples or (SMOKE_DATA if a.smoke else 2048)
    if a.feature is not None:
        from fewstep.specs import load_feature

        feat = load_feature(a.feature, device)
    role = "fit" if a.eval_prompts is None else "all"  # with --eval-prompts the fits use the whole file
    model = load(spec, device, guidance=a.guidance, prompts=a.prompts, dtype=a.dtype, role=role)
    samples = a.samples or (SMOKE_SAMPLES if a.smoke else 256)
    eval_kwargs: dict[str, Any] = {"feature": feat, "data_samples": data, "solvers": a.solvers}
    ref_nfe = a.reference_nfe or (SMOKE_REFERENCE_NFE if a.smoke else None)
    if ref_nfe is not None:
        eval_kwargs["reference_nfe"] = ref_nfe
    fit_kwargs = {**settings, "cache_dir": a.out / "teacher-cache", **({"teacher": a.teacher} if a.teacher else {})}
    b = run_bench(
        model,
        a.nfe,
        a.methods,
        a.out,
        eval_model=eval_model(model, a.prompts, a.eval_prompts),
        samples=samples,
        metrics=["fd"] if feat is not None else None,
        device=device,
        model_name=spec,
        fit_kwargs=fit_kwargs,
        log=lambda s: print(s, file=sys.stderr, flush=True),
        eval_kwargs=eval_kwargs,
    )
    for f, s in zip(b["fits"], b.pop("solvers"), strict=True):
        f["cost"] = s.doc["cost"]
    peak, what = peak_memory(device)  # CUDA: since the last fit began (fewstep's meter resets the peak there)
    what = f"{what}, the last fit and the table" if what.startswith("CUDA") else what
    res = {
        "command": command,
        "smoke": a.smoke,
        "model": spec,
        "device": device,
        "dtype": a.dtype,
        "guidance": model.guidance_scale,
        "prompts": str(a.prompts),
        "fit_prompts": len(fit_part),
        "eval_prompts": len(held_out),
        "eval_prompts_file": None if a.eval_prompts is None else str(a.eval_prompts),
        "nfe": a.nfe,
        "methods": a.methods,
        "samples": samples,
        "solvers": a.solvers,
        "feature": a.feature,
        "data_samples": data if feat is not None else None,
        "teacher": a.teacher,
        "fit_settings": settings,
        "machine": machine(device),
        "wall_s": time.perf_counter() - t0,
        "peak_mib": peak,
        "peak_memory": what,
        "bench": b,
    }
    res["rows"], res["fits"] = tables(res)
    return res


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join(["python", "benchmarks/gpu.py", *argv])
    try:
        a = parse_args(argv)
        check_paths(a)
    except BadInput as e:  # the line fewstep's fail() prints, without waiting for torch to import
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    from typer import Exit

    from fewstep.cli.common import errors, fail
    from fewstep.io import write_text

    try:
        with errors():
            try:
                settings = check_args(a)
            except BadInput as e:
                fail(str(e))
            res = run(a, settings, command)
            text = markdown(res)
            if a.md is not None:
                write_text(a.md, text)
            if a.json is not None:
                write_text(a.json, json.dumps(res, indent=1, default=str) + "\n")
    except Exit as e:
        return int(e.exit_code)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
