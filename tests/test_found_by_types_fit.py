"""Bugs the type checker found in the fit and command-line code, each pinned by a test."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import fewstep.evaluate as evaluate_module
from fewstep import VPLinear
from fewstep.cli import app
from fewstep.errors import FewstepError, ModelOutputError
from fewstep.fit.api import fit
from fewstep.fit.checkpoint import FitCheckpoint
from gauss import make_gauss

runner = CliRunner()


def test_demo_says_why_when_the_learned_solver_fails_on_held_out_noise(user_model, tmp_path, monkeypatch):
    """``best_learned`` is None when the learned solver's held-out solve fails (its row holds the error): the demo
    says so in one line instead of crashing on the missing row."""
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    real = evaluate_module.solve_batched

    def solve_batched(model, seeds, solver, nfe, *args, **kwargs):
        if getattr(solver, "kind", None) == "learned":  # what the kernel raises for a solver that blows up
            raise ModelOutputError("solver s4s-alt produced NaN/inf at step 2: its coefficients are unstable")
        return real(model, seeds, solver, nfe, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "solve_batched", solve_batched)
    r = runner.invoke(app, ["demo", "--model", user_model, "--samples", "32", "--out", str(tmp_path / "demo")])
    assert not isinstance(r.exception, AttributeError), r.exception
    assert r.exit_code == 2, (r.output, r.exception)
    assert "did not run on the held-out noise" in r.stderr and "produced NaN/inf at step 2" in r.stderr


@pytest.mark.parametrize("kill_at", [5, 21])  # in the screening, and after it
def test_a_checkpoint_that_goes_away_while_a_fit_resumes_is_one_line(tmp_path, kill_at_call, monkeypatch, kill_at):
    """``FitCheckpoint.load`` gives None when the checkpoint the fit found has gone (another fit in the same folder
    finished and removed it): the resumed fit says so instead of failing to unpack None."""
    model = make_gauss(VPLinear(), "eps", d=6)
    kw = dict(
        teacher="dpmpp_3m@logsnr:60",
        samples=64,
        val_samples=32,
        progress=False,
        cache_dir=tmp_path / "c",
        steps=48,
        start="ddim@logsnr",
        eval_every=4,
    )
    with pytest.raises(KeyboardInterrupt):
        kill_at_call(kill_at, lambda: fit(model, "s4s", 4, out=tmp_path / "cut", **kw))
    assert (tmp_path / "cut" / "fit-checkpoint.safetensors").is_file()
    real_peek = FitCheckpoint.peek

    def peek_then_gone(self):
        doc = real_peek(self)
        self.path.unlink(missing_ok=True)
        return doc

    monkeypatch.setattr(FitCheckpoint, "peek", peek_then_gone)
    with pytest.raises(FewstepError, match="went away while this fit resumed from it"):
        fit(model, "s4s", 4, out=tmp_path / "cut", **kw)
