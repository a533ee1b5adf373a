"""run_bench: reusing finished fits after an interrupted benchmark, and refusing another model's;
guidance_table across scales whose models have different fingerprints."""

from __future__ import annotations

import pytest

import fewstep.fit.api as fit_api
from fewstep import VPLinear
from fewstep.bench import guidance_table, run_bench
from fewstep.errors import FewstepError
from gauss import make_gauss

FIT = {"samples": 64, "val_samples": 32, "confirm_samples": 32, "steps": 30}


def test_reuse_loads_finished_fits_and_refits_unfinished(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    m = make_gauss(VPLinear(), "eps", d=6)
    first = run_bench(
        m, [3, 4], ["s4s"], tmp_path / "b", samples=32, metrics=None, progress=False, fit_kwargs=FIT, log=lambda s: None
    )
    # an interrupted fit leaves its checkpoint: that one must be refitted, the finished one reused
    (tmp_path / "b" / "s4s-nfe4" / "fit-checkpoint.safetensors").write_bytes(b"")
    calls = []
    real_fit = fit_api.fit

    def counting_fit(model, method, nfe, **kw):
        calls.append(nfe)
        (tmp_path / "b" / "s4s-nfe4" / "fit-checkpoint.safetensors").unlink(missing_ok=True)
        return real_fit(model, method, nfe, **kw)

    monkeypatch.setattr(fit_api, "fit", counting_fit)
    lines: list[str] = []
    again = run_bench(
        m,
        [3, 4],
        ["s4s"],
        tmp_path / "b",
        samples=32,
        metrics=None,
        progress=False,
        fit_kwargs=FIT,
        log=lines.append,
        reuse=True,
    )
    assert calls == [4]
    assert lines[0].startswith("reused s4s at NFE 3") and lines[1].startswith("fitted s4s at NFE 4")
    assert again["fits"][0]["seconds"] == pytest.approx(first["fits"][0]["seconds"], rel=0.2, abs=5)
    assert again["rows"][0]["best_learned"]["rmse"] == first["rows"][0]["best_learned"]["rmse"]


def test_reuse_refuses_an_artifact_of_another_model(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    run_bench(
        make_gauss(VPLinear(), "eps", d=6),
        [3],
        ["s4s"],
        tmp_path / "b",
        samples=16,
        metrics=None,
        progress=False,
        fit_kwargs=FIT,
        log=lambda s: None,
    )
    with pytest.raises(FewstepError, match="fingerprint"):
        run_bench(
            make_gauss(VPLinear(), "eps", d=5),
            [3],
            ["s4s"],
            tmp_path / "b",
            samples=16,
            metrics=None,
            progress=False,
            fit_kwargs=FIT,
            log=lambda s: None,
            reuse=True,
        )


def test_guidance_table_uses_the_fitted_solver_where_the_fingerprint_differs(tmp_path, monkeypatch):
    # a diffusers model at w = 1 is unguided, another identity than at w = 2; the table still
    # evaluates the solver fitted at 2 there (that is its purpose), without refitting
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))

    def build(w: float):
        m = make_gauss(VPLinear(), "eps", d=6)
        m.identity["guided"] = w != 1.0
        return m

    assert build(1.0).fingerprint() != build(2.0).fingerprint()
    rows = guidance_table(
        build,
        2.0,
        [1.0, 2.0],
        3,
        "s4s",
        tmp_path / "g",
        samples=16,
        refit=False,
        progress=False,
        fit_kwargs=FIT,
        log=lambda s: None,
    )
    assert [r["scale"] for r in rows] == [1.0, 2.0]
    # same data model at both scales here, so the fitted solver scores the same at both
    assert rows[0]["learned_rmse"] == pytest.approx(rows[1]["learned_rmse"], rel=1e-9)
    assert rows[0]["learned_rmse"] < rows[0]["best_classic_rmse"]
