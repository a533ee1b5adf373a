"""A learned solver fitted at one image size, used at another (issue 24, target 4), on tiny random-weight pipelines.

Measured on zoo:scenes-sd (S4S-Alt NFE 5, guidance 4): fitted at 32x32 and used at 64x64, held-out RMSE 0.308
against 0.279 for fits at 64x64 (+5% and +16% over two fit seeds), so another size is refused, in one line
naming both sizes and the fix (a fit at this size, or --force / force=True), by ``fewstep sample`` (exit code 2)
and by ``FewStepScheduler`` inside an unmodified pipeline (ArtifactError at the run's first step); forced, it
runs with one warning and gives finite latents. Flux shifts its flow schedule with the image size (dynamic
``mu``): the line says so, with both shifts.
The artifacts are classic tableaus saved as learned solvers (no fit needed).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from diffusers import DiffusionPipeline
from safetensors.torch import load_file
from typer.testing import CliRunner

import tiny_pipelines as T
from fewstep.cli import app
from fewstep.errors import ArtifactError
from fewstep.integrations.diffusers_scheduler import FewStepScheduler
from fewstep.sampling import build_tableau
from fewstep.solvers.artifact import save_solver, solver_doc
from fewstep.specs import load_model

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
runner = CliRunner()
FITTED = 16  # pixels: the tiny pipelines' 8x8 latents
OTHER = 24  # another size: 12x12 latents
FLUX_W = 3.5


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny batches: one thread (tests/conftest.py)."""


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))


def _setup(kind: str, root: Path, solver: str, **kw) -> tuple[Path, Path, Path]:
    """(pipeline folder, prompt file, artifact fitted at FITTED x FITTED) for a tiny pipeline of ``kind``."""
    folder = T.save_pipeline(kind, root / kind)
    prompts = root / f"{kind}.txt"
    prompts.write_text("\n".join(T.PROMPTS[kind]) + "\n")
    model = load_model(f"diffusers:{folder}", prompts=str(prompts), height=FITTED, width=FITTED, **kw)
    art = root / f"{kind}-art"
    save_solver(art, solver_doc(build_tableau(model, solver, 3), model.schedule, model, "s4s"))
    return folder, prompts, art


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return _setup("sd", tmp_path_factory.mktemp("res"), "ddim@time")


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return _setup("flux", tmp_path_factory.mktemp("res"), "euler@time", guidance=FLUX_W)


def _sample(folder: Path, prompts: Path, art: Path, size: int, out: Path, *extra: str):
    args = ["sample", "--model", f"diffusers:{folder}", "--solver", str(art), "--prompts", str(prompts)]
    args += ["--height", str(size), "--width", str(size), "--n", "2", "--out", str(out), *extra]
    return runner.invoke(app, args)


def _error_line(r) -> str:
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert "Traceback" not in r.output
    return lines[0]


def test_sample_refuses_another_size_and_force_runs_it(sd, tmp_path):
    folder, prompts, art = sd
    out = tmp_path / "x.safetensors"
    line = _error_line(_sample(folder, prompts, art, OTHER, out))
    size = f"size: fitted for {FITTED}x{FITTED} images (latent 4x8x8), this one {OTHER}x{OTHER} (latent 4x12x12)"
    assert size in line
    assert f"fit one at this size (fewstep fit ... --height {OTHER} --width {OTHER})" in line and "--force" in line
    assert "schedule:" not in line and not out.exists()
    with pytest.warns(UserWarning, match=rf"fitted for another model \(size: .*{OTHER}x{OTHER}.*using it anyway"):
        r = _sample(folder, prompts, art, OTHER, out, "--force")
    assert r.exit_code == 0, r.output
    x = load_file(out)["samples"]
    assert x.shape == (2, 4, 12, 12) and torch.isfinite(x).all() and x.abs().max() > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the fitted size: no warning
        assert _sample(folder, prompts, art, FITTED, tmp_path / "y.safetensors").exit_code == 0


def test_sample_names_the_dynamic_shift_of_a_flow_pipeline(flux, tmp_path):
    folder, prompts, art = flux
    line = _error_line(_sample(folder, prompts, art, 2 * FITTED, tmp_path / "x.safetensors", "--guidance", "3.5"))
    assert f"size: fitted for {FITTED}x{FITTED} images (latent 16x8x8), this one 32x32 (latent 16x16x16)" in line
    # mu = 0.5 + (tokens - 256) * 0.65 / 3840: 16 tokens at 16x16, 64 at 32x32 (diffusers' defaults)
    assert "shifts its flow schedule with the image size (mu 0.459375 fitted, 0.4675 here)" in line
    assert "schedule: grid_shift.mu" not in line and "--height 32 --width 32" in line


def _run(pipe, prompt: str, size: int, **kw) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return pipe(prompt, height=size, width=size, output_type="latent", generator=g, **kw).images


def test_scheduler_refuses_a_run_at_another_size_and_force_runs_it(sd, tmp_path):
    folder, prompts, art = sd
    model = load_model(f"diffusers:{folder}", prompts=str(prompts), height=FITTED, width=FITTED)
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    prompt = T.PROMPTS["sd"][0]
    pipe.scheduler = FewStepScheduler.from_solver(str(art), model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert _run(pipe, prompt, FITTED).shape == (1, 4, 8, 8)
    with pytest.raises(ArtifactError) as e:
        _run(pipe, prompt, OTHER)
    msg = str(e.value)
    assert "\n" not in msg and f"{FITTED}x{FITTED} images (latent 4x8x8)" in msg
    assert f"this pipeline runs {OTHER}x{OTHER} images (latent 4x12x12)" in msg
    assert f"--height {OTHER} --width {OTHER}" in msg and "force=True" in msg
    pipe.scheduler.save_pretrained(tmp_path / "sched")  # the fitted size travels with the config
    with pytest.raises(ArtifactError, match="fitted for 16x16 images"):
        _run(
            pipe.__class__(**{**pipe.components, "scheduler": FewStepScheduler.from_pretrained(tmp_path / "sched")}),
            prompt,
            OTHER,
        )
    pipe.scheduler = FewStepScheduler.from_solver(str(art), model, force=True)
    with pytest.warns(UserWarning, match=f"this pipeline runs {OTHER}x{OTHER} images.*using it anyway") as w:
        x = _run(pipe, prompt, OTHER)
    assert len([m for m in w if "using it anyway" in str(m.message)]) == 1
    assert x.shape == (1, 4, 12, 12) and torch.isfinite(x).all()


def test_scheduler_from_a_flow_config_checks_the_size_per_run(flux):
    """Built from the pipeline's own config (no model): a dynamically shifted flow knows mu only at a size,
    so the solver's recorded schedule stands in (it used to be refused), and each run's size is checked."""
    folder, _, art = flux
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    with pytest.warns(UserWarning, match="only be checked against the schedule"):
        pipe.scheduler = FewStepScheduler.from_solver(str(art), pipe.scheduler.config)
    kw = {"guidance_scale": FLUX_W, "max_sequence_length": T.TEXT_LEN}
    prompt = T.PROMPTS["flux"][0]
    x = _run(pipe, prompt, FITTED, **kw)
    assert x.shape == (1, 16, 64) and torch.isfinite(x).all()  # packed latents
    with pytest.raises(ArtifactError) as e:
        _run(pipe, prompt, 2 * FITTED, **kw)
    msg = str(e.value)
    assert "\n" not in msg and "fitted for 16x16 images (latent 16x8x8), this pipeline runs another image size" in msg
    assert "4096 values a sample, not 1024" in msg and "(mu 0.4594 fitted, 0.4675 now)" in msg


def test_eval_force_warns_once_about_another_size(sd):
    """``fewstep eval --force`` with a solver of another size says so in one warning (it was silent)."""
    folder, prompts, art = sd
    args = ["eval", "--model", f"diffusers:{folder}", "--solver", str(art), "--prompts", str(prompts)]
    args += ["--height", str(OTHER), "--width", str(OTHER), "--samples", "2", "--reference-nfe", "6"]
    args += ["--metrics", "none", "--json"]
    assert runner.invoke(app, args).exit_code == 2  # refused without --force
    with pytest.warns(UserWarning, match=rf"fitted for another model \(size: .*{OTHER}x{OTHER}.*using it anyway") as w:
        r = runner.invoke(app, [*args, "--force"])
    assert r.exit_code == 0, r.output
    assert sum("using it anyway" in str(x.message) for x in w) == 1
