"""benchmarks/gpu.py as a user runs it (subprocesses): bad input is one line and exit code 2; a --smoke run on
the tiny SD pipeline writes a table with a row per NFE, finite RMSEs and the evaluations each fit spent.

    pytest tests/test_gpu_bench.py

Most of the time is importing diffusers, so the smoke process builds the pipeline itself (one import) and then
runs gpu.py as ``__main__``, while the bad-input runs go beside it: ~20 s on 2 idle cores.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tiny_pipelines as T

GPU = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
PROMPTS = [
    *T.PROMPTS["sd"],
    *(
        f"a {c} {t} in the {p}"
        for c, t, p in [
            ("red", "cat", "field"),
            ("blue", "bird", "sky"),
            ("green", "tree", "forest"),
            ("white", "horse", "snow"),
            ("black", "dog", "city"),
            ("yellow", "flower", "morning"),
            ("small", "fish", "river"),
        ]
    ),
]  # some held out


def start(args: list[str], cwd: Path, build: Path | None = None) -> subprocess.Popen[str]:
    """gpu.py ARGS in a subprocess; with ``build``, the process first saves the tiny SD pipeline there."""
    cmd = [str(GPU), *args] if build is None else ["-c", SMOKE, str(build), str(GPU), *args]
    return subprocess.Popen(
        [sys.executable, *cmd],
        cwd=cwd,
        env={**ENV, "PYTHONPATH": str(Path(__file__).parent)},
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


SMOKE = (
    "import runpy, sys, tiny_pipelines; tiny_pipelines.save_pipeline('sd', sys.argv[1]); "
    "sys.argv = sys.argv[2:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def test_bad_input_and_smoke(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "model_index.json").write_text("{}")
    bad = {
        "no such folder": ["--pipeline", str(tmp_path / "nope"), "--prompts", str(prompts), "--nfe", "3"],
        "no such file": ["--pipeline", str(fake), "--prompts", str(tmp_path / "nope.txt"), "--nfe", "3"],
        "--nfe": ["--pipeline", str(fake), "--prompts", str(prompts), "--nfe", "3,x"],
        "unknown solver 'nosuch'": [
            "--pipeline",
            str(fake),
            "--prompts",
            str(prompts),
            "--nfe",
            "3",
            "--solvers",
            "nosuch",
        ],
    }
    md, js, folder = tmp_path / "smoke.md", tmp_path / "smoke.json", tmp_path / "sd"
    fit = {"samples": 8, "val_samples": 4, "confirm_samples": 0, "steps": 2, "batch": 4, "eval_every": 2}
    smoke = start(
        [
            "--pipeline",
            str(folder),
            "--prompts",
            str(prompts),
            "--nfe",
            "3",
            "--smoke",
            "--samples",
            "4",
            "--reference-nfe",
            "8",
            "--teacher",
            "unipc@logsnr:6",
            "--fit",
            json.dumps(fit),
            "--out",
            str(tmp_path / "out"),
            "--md",
            str(md),
            "--json",
            str(js),
        ],
        tmp_path,
        build=folder,
    )
    runs = {what: start(args, tmp_path) for what, args in bad.items()}
    for what, p in runs.items():
        out, err = p.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert p.returncode == 2 and out == "", (what, p.returncode, err)
        assert len(lines) == 1 and lines[0].startswith("error:") and what in lines[0], (what, err)

    out, err = smoke.communicate(timeout=240)
    assert smoke.returncode == 0, err[-2000:]
    assert out == md.read_text() and "SMOKE RUN" in out
    rows = [ln for ln in out.splitlines() if ln.startswith("| 3 |")]
    assert len(rows) == 1, out
    res = json.loads(js.read_text())
    # no --eval-prompts: the fits on one part of the prompt file, the table on the rest
    assert res["eval_prompts_file"] is None and res["solvers"] is None
    assert res["fit_prompts"] + res["eval_prompts"] == len(PROMPTS) and 0 < res["eval_prompts"] < len(PROMPTS)
    assert [r["nfe"] for r in res["rows"]] == [3]
    r = res["rows"][0]
    assert math.isfinite(r["classic_rmse"]) and math.isfinite(r["learned"]["s4s-alt"]["rmse"])
    (f,) = res["fits"]
    assert f["total_evals"] > 0 and f["teacher_evals"] > 0 and f["fit_forward"] > 0 and f["fit_backward"] > 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
