"""``fewstep demo`` on a pipeline: its own scheduler in the table, and the picture of the same held-out prompts."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("diffusers")

from fewstep import showcase  # noqa: E402
from fewstep.cli import app  # noqa: E402


def _png_size(path):
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_demo_on_a_pipeline(tmp_path, monkeypatch):
    """Small sizes (the shipped ones take minutes): the demo fits, tabulates the pipeline's own scheduler beside
    every classic solver on held-out classes, and draws one row per solver, one column per held-out seed."""
    torch.set_num_threads(1)
    monkeypatch.setattr(
        showcase,
        "PIPELINE_FIT",
        {"samples": 8, "val_samples": 4, "confirm_samples": 4, "batch": 4, "steps": 3, "teacher": "ddim@logsnr:8"},
    )
    monkeypatch.setattr(showcase, "PIPELINE_NFES", (5,))
    monkeypatch.setattr(showcase, "PIPELINE_REFERENCE_NFE", 16)
    out = tmp_path / "demo"
    r = CliRunner().invoke(
        app, ["demo", "--model", "zoo:scenes-dit", "--samples", "4", "--guidance", "4", "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    assert "pipeline:DDIMScheduler" in r.output
    rep = json.loads((out / "report.json").read_text())
    own = next(x for x in rep["results"] if x["grid"] == "own")
    assert own["solver"] == "pipeline:DDIMScheduler" and own["nfe"] == 5 and 0 < own["rmse"] < 5
    assert rep["reference"]["nfe"] == 32
    w, h = _png_size(out / "samples.png")
    assert (w, h) == (3 * (4 * 33 + 1), 3 * (4 * 33 + 1))  # 4 seeds x 4 rows of 32x32 images, 1-pixel gaps, 3x
    text = (out / "samples.txt").read_text()
    assert "pipeline's own scheduler at NFE 5" in text and "learned (s4s-alt) at NFE 5" in text
    assert text.count("\n  ") == 8  # 4 rows and 4 columns named (DiT: its class names)
