"""benchmarks/gpu_check.sh as a user runs it: ``--smoke`` fits and scores zoo:scenes-sd on the CPU (fits on all
of its training captions, the table on its held-out captions) and writes the markdown and JSON; bad usage, a
missing CUDA and a bad ``gpu.py --eval-prompts`` path are one ``error:`` line and exit code 2.

    pytest tests/test_gpu_check.py

The smoke run is 20-35 s on one thread (two Python processes: the pipeline folder, then gpu.py); the refusals
are instant (bash, or gpu.py before torch loads) and run beside it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fewstep.report import Report

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
GPU = ROOT / "benchmarks" / "gpu.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
BASH = shutil.which("bash")

pytestmark = pytest.mark.skipif(BASH is None, reason="no bash binary to run benchmarks/gpu_check.sh")


def start(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(cmd, cwd=ROOT, env=env or ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def refused(p: subprocess.Popen[str], what: str) -> str:
    """The one error line of a refused run (exit code 2, nothing on stdout), checked to name ``what``."""
    out, err = p.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert p.returncode == 2 and out == "", (what, p.returncode, out, err)
    assert len(lines) == 1 and lines[0].startswith("error:") and what in lines[0], (what, err)
    return lines[0]


def finite(x: object) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_smoke_and_refusals(tmp_path: Path) -> None:
    out_dir = tmp_path / "check"
    smoke = start([str(BASH), str(SCRIPT), str(out_dir), "--smoke"])
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle on a black background\n")
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    bad = {
        "give an output folder": [str(BASH), str(SCRIPT)],
        "unknown option --fast": [str(BASH), str(SCRIPT), str(tmp_path / "o"), "--fast"],
        "--family dit": [str(BASH), str(SCRIPT), str(tmp_path / "o"), "--smoke", "--family", "dit"],
        "--dtype fp64": [str(BASH), str(SCRIPT), str(tmp_path / "o"), "--dtype", "fp64"],
        "--eval-prompts": [
            sys.executable,
            str(GPU),
            *("--pipeline", str(tmp_path / "pipe"), "--prompts", str(prompts), "--nfe", "4"),
            *("--eval-prompts", str(tmp_path / "nope.txt")),
        ],
    }
    runs = {what: start(cmd) for what, cmd in bad.items()}
    # no CUDA (hidden from torch): refused before anything loads, with the way out
    no_cuda = start([str(BASH), str(SCRIPT), str(tmp_path / "o")], {**ENV, "CUDA_VISIBLE_DEVICES": ""})
    for what, p in runs.items():
        line = refused(p, what)
        if what == "--eval-prompts":
            assert "nope.txt: no such file" in line, line
    assert "--smoke" in refused(no_cuda, "CUDA is not available")
    assert not (tmp_path / "o").exists()  # nothing written by a refused run

    stdout, err = smoke.communicate(timeout=300)
    assert smoke.returncode == 0, err[-3000:]
    md, js = out_dir / "gpu_check.md", out_dir / "gpu_check.json"
    text = md.read_text()
    assert stdout.startswith(text) and f"{md}, {js}" in stdout.splitlines()[-1]
    assert "**SMOKE RUN" in text and "guidance 4.0" in text
    res = json.loads(js.read_text())
    assert res["smoke"] and res["device"] == "cpu" and res["guidance"] == 4.0 and res["methods"] == ["s4s-alt"]

    # the fits saw every training caption, the table the held-out captions (recorded, in JSON and markdown)
    folder = Path(res["model"].removeprefix("diffusers:"))
    heldout = folder / "prompts" / "heldout.txt"
    count = lambda f: sum(1 for ln in f.read_text().splitlines() if ln.strip())  # noqa: E731
    assert res["eval_prompts_file"] == str(heldout) and res["eval_prompts"] == count(heldout)
    assert res["prompts"] == str(folder / "prompts" / "train.txt") and res["fit_prompts"] == count(
        folder / "prompts/train.txt"
    )
    assert f"the table on the {count(heldout)} of {heldout}" in text

    # numbers: one row at the NFE, finite RMSE and FD for the best classic solver and the learned one
    (row,) = res["rows"]
    assert row["nfe"] == 4 and row["best_classic"] in res["solvers"]
    learned = row["learned"]["s4s-alt"]
    assert finite(row["classic_rmse"]) and finite(learned["rmse"]) and finite(row["classic_fd"])
    assert learned["ratio"] == pytest.approx(learned["rmse"] / row["classic_rmse"], rel=1e-12)
    rep = Report.from_dict(res["bench"]["report"])
    classic = [r for r in rep.rows if r.kind == "classic" and r.nfe == 4]
    assert sorted(r.label for r in classic) == sorted(res["solvers"])
    assert all(finite(r.rmse) for r in classic)
    assert min(r.rmse for r in classic) == pytest.approx(row["classic_rmse"], rel=1e-12)
    (fit,) = res["fits"]
    assert fit["teacher_evals"] > 0 and fit["fit_forward"] > 0 and fit["fit_backward"] > 0
    assert (out_dir / "runs" / "s4s-alt-nfe4" / "solver.json").is_file()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
