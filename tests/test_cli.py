"""The command line end to end: eval, sample, fit, show, and one-line errors for bad input."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from fewstep.cli import app

runner = CliRunner()


def _run(args, code=0):
    r = runner.invoke(app, args)
    assert r.exit_code == code, (r.output, r.exception)
    return r


def test_eval_json_has_the_documented_shape(user_model):
    r = _run(
        [
            "eval",
            "--model",
            user_model,
            "--nfe",
            "5",
            "--solver",
            "unipc@logsnr",
            "--solver",
            "ddim@time",
            "--samples",
            "32",
            "--json",
        ]
    )
    rep = json.loads(r.stdout)
    assert set(rep) >= {"model", "nfe", "samples", "seed", "reference", "results"}
    assert rep["nfe"] == 5 and rep["samples"] == 32 and rep["seed"] == 1_000_000
    assert set(rep["reference"]) == {"solver", "nfe", "self_error"}
    assert rep["reference"]["self_error"] < 1e-3
    assert rep["results"][0]["role"] == "reference" and rep["results"][0]["swd"] is not None  # the floor row
    res = {r["solver"]: r for r in rep["results"][1:]}
    assert set(res) == {"unipc", "ddim"}
    assert 0 < res["unipc"]["rmse"] < res["ddim"]["rmse"]  # a second-order solver beats DDIM here


def test_eval_every_classic_solver_by_default(user_model):
    r = _run(["eval", "--model", user_model, "--nfe", "4", "--samples", "16", "--json"])
    rep = json.loads(r.stdout)
    names = {(x["solver"], x["grid"]) for x in rep["results"]}
    assert ("dpmpp_3m", "logsnr") in names and ("ipndm", "karras") in names and ("heun", "time") in names
    assert len(names) >= 60


def test_eval_table_on_a_zoo_model():
    r = _run(["eval", "--model", "zoo:gaussian", "--nfe", "6", "--solver", "dpmpp_2m@logsnr", "--samples", "16"])
    assert "dpmpp_2m" in r.stdout and "reference" in r.stdout


def test_sample_writes_safetensors_and_png(tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "s.safetensors"
    _run(
        [
            "sample",
            "--model",
            "zoo:digits-empirical",
            "--solver",
            "unipc@quadratic",
            "--nfe",
            "5",
            "--n",
            "4",
            "--out",
            str(out),
        ]
    )
    x = load_file(str(out))["samples"]
    assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all()
    png = out.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_fit_show_eval_with_the_artifact(user_model, tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    art = tmp_path / "solver"
    r = _run(
        [
            "fit",
            "--model",
            user_model,
            "--method",
            "s4s",
            "--nfe",
            "4",
            "--out",
            str(art),
            "--samples",
            "64",
            "--val-samples",
            "32",
            "--steps",
            "40",
            "--teacher",
            "dpmpp_3m@logsnr:60",
            "--eval-samples",
            "32",
            "--batch",
            "16",
            "--lr-coef",
            "0.02",
            "--k",
            "2",
            "--polish",
            "0.25",
            "--json",
        ]
    )
    rep = json.loads(r.stdout)
    assert rep["artifact"] == str(art / "solver.json")
    assert any(x["grid"] == "learned" for x in rep["results"])
    doc = json.loads((art / "solver.json").read_text())
    assert doc["method"] == "s4s" and doc["nfe"] == 4
    f = doc["fit"]
    assert (f["batch"], f["lr_coef"], f["k"], f["polish"]) == (16, 0.02, 2, 0.25)  # the options reach the fit
    assert [h["step"] for h in doc["history"]][-1] == 40  # the polish is inside the 40 steps
    r = _run(["show", str(art)])
    assert "predictor coefficients" in r.stdout and "start" in r.stdout
    r = _run(["eval", "--model", user_model, "--nfe", "4", "--solver", str(art), "--samples", "16", "--json"])
    rows = json.loads(r.stdout)["results"]
    assert [x["grid"] for x in rows] == ["dpmpp_3m@logsnr", "learned"]  # the reference (floor) row, the artifact
    # --top never hides the learned solver, even when it ranks below the classic rows shown
    r = _run(
        [
            "eval",
            "--model",
            user_model,
            "--nfe",
            "4",
            "--solver",
            "unipc@logsnr",
            "--solver",
            "ddim@time",
            "--solver",
            str(art),
            "--samples",
            "16",
            "--top",
            "1",
            "--metrics",
            "none",
        ]
    )
    assert "learned" in r.stdout and "unipc" in r.stdout and "ddim" not in r.stdout
    # fewstep sample takes the artifact: the same samples as fewstep.sample from the same seeds
    out = tmp_path / "s.safetensors"
    _run(["sample", "--model", user_model, "--solver", str(art), "--n", "5", "--seed", "7", "--out", str(out)])
    from safetensors.torch import load_file

    from fewstep import load_solver, sample
    from fewstep.specs import load_model

    m = load_model(user_model)
    want = sample(m, m.noise(list(range(7, 12))), load_solver(art))
    assert torch.allclose(load_file(str(out))["samples"].to(want.dtype), want, atol=1e-6)
    # ... and to be scored on the noises it was fitted on
    r = _run(["eval", "--model", user_model, "--solver", str(art), "--samples", "8", "--seed", "40"], code=2)
    assert "overlap the train seeds [0, 64)" in r.output and "Traceback" not in r.output
    # the artifact refuses another model with one line
    r = _run(["eval", "--model", "zoo:gaussian", "--nfe", "4", "--solver", str(art), "--samples", "8"], code=2)
    assert "error:" in r.output and "Traceback" not in r.output


FEATURES = textwrap.dedent("""
    import torch

    def features():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh())

    def not_a_network():
        return 3
""")


def test_eval_takes_a_feature_network_from_a_file(user_model, tmp_path):
    f = tmp_path / "feats.py"
    f.write_text(FEATURES)
    args = [
        "eval",
        "--model",
        user_model,
        "--nfe",
        "4",
        "--solver",
        "ddim@time",
        "--solver",
        "unipc@logsnr",
        "--samples",
        "64",
        "--metrics",
        "fd,kid,fd_ref",
        "--json",
    ]
    rep = json.loads(_run(args + ["--feature", f"{f}:features"]).stdout)
    ref, rows = rep["results"][0], {r["solver"]: r for r in rep["results"][1:]}
    assert rep["metrics"]["feature"] and all(r["fd"] is not None and r["kid"] is not None for r in rep["results"])
    assert rows["unipc"]["fd_ref"] < rows["ddim"]["fd_ref"]  # closer to the reference's samples, as in RMSE
    assert ref["fd_ref"] < rows["unipc"]["fd_ref"]
    r = _run(args + ["--feature", f"{f}:not_a_network"], code=2)
    assert "not a torch nn.Module" in r.output and "Traceback" not in r.output
    r = _run(args + ["--feature", f"{tmp_path}/missing.py:features"], code=2)
    assert "does not exist" in r.output


@pytest.mark.parametrize(
    "args,msg",
    [
        (["eval", "--model", "zoo:nope"], "valid"),
        (["eval", "--model", "nonsense"], "is not one of"),
        (["eval", "--model", "zoo:gaussian", "--solver", "dpm9@logsnr", "--samples", "4"], "unknown solver"),
        (["eval", "--model", "zoo:gaussian", "--solver", "ddim@cosine", "--samples", "4"], "unknown grid"),
        (
            ["sample", "--model", "zoo:gaussian", "--solver", "dpmpp_3m@logsnr", "--nfe", "2", "--out", "/tmp/x"],
            "needs at least 3 NFE",
        ),
    ],
)
def test_bad_input_gets_one_clear_line(args, msg):
    r = runner.invoke(app, args)
    assert r.exit_code == 2
    assert msg in r.output and "Traceback" not in r.output


def _png_size(path):
    import struct

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


def test_bench_fits_every_nfe_and_plots(user_model, tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bench"
    r = _run(
        [
            "bench",
            "--model",
            user_model,
            "--nfe",
            "3",
            "--nfe",
            "4",
            "--method",
            "s4s-alt",
            "--steps",
            "60",
            "--fit-samples",
            "64",
            "--samples",
            "64",
            "--plot",
            "--out",
            str(out),
        ]
    )
    b = json.loads((out / "bench.json").read_text())
    assert [row["nfe"] for row in b["rows"]] == [3, 4]
    for row in b["rows"]:
        assert row["best_learned"]["solver"] == "s4s-alt" and row["best_classic"]["grid"] != "learned"
        assert row["ratio"] == row["best_learned"]["rmse"] / row["best_classic"]["rmse"]
        assert row["ratio"] < 1.0  # the fit beats the best of ~70 classic solvers and grids here
    assert b["report"]["results"][0]["role"] == "reference"
    for name in ("rmse_vs_nfe.png", "swd_vs_nfe.png", "samples_nfe4.png", "s4s-alt-nfe3_vs_start.png"):
        w, h = _png_size(out / name)
        assert w > 300 and h > 200, name
    assert (out / "s4s-alt-nfe4" / "solver.json").is_file()
    assert "learned / classic" in r.stdout


def test_eval_plot_writes_pictures(tmp_path):
    out = tmp_path / "plots"
    r = _run(
        [
            "eval",
            "--model",
            "zoo:gmm2d",
            "--nfe",
            "3",
            "--nfe",
            "6",
            "--solver",
            "unipc@logsnr",
            "--solver",
            "ddim@logsnr",
            "--samples",
            "64",
            "--plot",
            str(out),
        ]
    )
    assert "SWD" in r.stdout and "loglik" in r.stdout and "reference (floor)" in r.stdout
    for name in ("rmse_vs_nfe.png", "swd_vs_nfe.png", "loglik_vs_nfe.png", "samples_nfe6.png"):
        _png_size(out / name)


def test_guidance_table_over_scales(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    r = _run(
        [
            "guidance",
            "--model",
            "zoo:gmm2d",
            "--fit-scale",
            "2",
            "--scale",
            "1.5",
            "--scale",
            "2",
            "--scale",
            "4",
            "--nfe",
            "4",
            "--method",
            "s4s",
            "--steps",
            "40",
            "--fit-samples",
            "64",
            "--samples",
            "64",
            "--out",
            str(tmp_path / "g"),
            "--json",
        ]
    )
    rows = json.loads(r.stdout)
    assert [x["scale"] for x in rows] == [1.5, 2.0, 4.0]
    at_fit = rows[1]
    assert at_fit["learned_rmse"] == at_fit["refit_rmse"]  # at its own scale the solver is its own refit
    for x in rows:
        assert x["best_classic_rmse"] > 0 and x["learned_rmse"] > 0
    assert (tmp_path / "g" / "s4s-nfe4-w2").is_dir() and (tmp_path / "g" / "s4s-nfe4-w4").is_dir()
    # after an interruption, --reuse loads the finished fits instead of fitting again: same table
    again = _run(
        [
            "guidance",
            "--model",
            "zoo:gmm2d",
            "--fit-scale",
            "2",
            "--scale",
            "1.5",
            "--scale",
            "2",
            "--scale",
            "4",
            "--nfe",
            "4",
            "--method",
            "s4s",
            "--steps",
            "40",
            "--fit-samples",
            "64",
            "--samples",
            "64",
            "--out",
            str(tmp_path / "g"),
            "--json",
            "--reuse",
        ]
    )
    assert json.loads(again.stdout) == rows
    assert "reused s4s at guidance 2" in again.stderr and "fitted s4s" not in again.stderr


def test_demo_runs_the_main_job(user_model, tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    r = _run(["demo", "--model", user_model, "--samples", "32", "--out", str(out)])
    assert "s4s-alt (learned)" in r.stdout and r.stdout.count("best classic:") == 6
    table = [ln for ln in r.stdout.splitlines() if "(learned)" in ln or "best classic:" in ln or "vs learned" in ln]
    assert len(table) == 8 and len({len(ln) for ln in table}) == 1  # the columns line up, whatever the labels
    rep = json.loads((out / "report.json").read_text())
    mine = next(x for x in rep["results"] if x["grid"] == "learned")
    best5 = min(x["rmse"] for x in rep["results"] if x["nfe"] == 5 and x["grid"] != "learned" and x["rmse"])
    assert mine["nfe"] == 5 and mine["rmse"] < best5  # the learned solver beats every classic one at its budget
    for name in ("error_vs_nfe.png", "solver_vs_start.png"):
        _png_size(out / name)
    assert (out / "s4s-alt-nfe5" / "solver.json").is_file()
