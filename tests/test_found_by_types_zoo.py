"""Bugs the type checker found in the zoo training recipes and the guidance table (issue 25)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from fewstep import bench
from fewstep.errors import FewstepError, ModelSpecError
from fewstep.report import Report
from fewstep.schedules import Flow, VPLinear
from fewstep.zoo import train, unet


def test_an_eps_recipe_on_a_schedule_without_ddpm_steps_is_refused_by_name():
    """The eps objective read ``sched.T``, which only VPDiscrete has: an AttributeError for any other schedule."""
    recipe = train.recipe_for("digits-eps", schedule=VPLinear().config(), steps=1)
    with pytest.raises(ModelSpecError, match="VPDiscrete"):
        train.train(recipe)


def test_a_unet_recipe_on_a_schedule_without_ddpm_steps_is_refused_by_name():
    recipe = unet.unet_recipe(schedule=Flow().config(), steps=1)
    with pytest.raises(ModelSpecError, match="VPDiscrete"):
        unet.train_unet(recipe)


def _fake_guidance_run(monkeypatch: pytest.MonkeyPatch, results: list[dict[str, Any]]) -> None:
    """guidance_table with no fitting and an evaluate that returns ``results``."""

    def fit_or_reuse(*args: Any, **kwargs: Any) -> tuple[Any, float, str]:
        return SimpleNamespace(name="s4s"), 0.0, "fitted"

    def evaluate(model: Any, nfe: int, **kwargs: Any) -> Report:
        ref = {"solver": "heun@karras", "nfe": 200, "self_error": 1e-6}
        return Report.from_dict(
            {"model": "m", "nfe": nfe, "samples": 8, "seed": 0, "reference": ref, "results": results}
        )

    monkeypatch.setattr(bench, "_fit_or_reuse", fit_or_reuse)
    monkeypatch.setattr(bench, "evaluate", evaluate)


def _row(solver: str, grid: str, rmse: float | None, error: str | None = None) -> dict[str, Any]:
    d = {"solver": solver, "grid": grid, "nfe": 3, "rmse": rmse, "rmse_sem": None, "seconds": None}
    return {**d, "error": error} if error else d


def _table(tmp_path: Any) -> list[dict[str, Any]]:
    return bench.guidance_table(lambda w: SimpleNamespace(), 2.0, [1.0], 3, "s4s", tmp_path, refit=False, log=print)


def test_a_learned_solver_that_did_not_run_at_a_scale_is_named(monkeypatch, tmp_path):
    """A learned row without an RMSE reached ``None / float`` (a TypeError)."""
    learned = "s4s fitted at w=2"
    _fake_guidance_run(
        monkeypatch, [_row("heun", "karras", 0.1), _row(learned, "learned", None, "its tables do not build")]
    )
    with pytest.raises(FewstepError, match="did not run: its tables do not build"):
        _table(tmp_path)


def test_a_scale_where_no_classic_solver_ran_is_named(monkeypatch, tmp_path):
    """No classic row with an RMSE made best_classic None, which reached ``None.label`` (an AttributeError)."""
    _fake_guidance_run(
        monkeypatch, [_row("heun", "karras", None, "diverged"), _row("s4s fitted at w=2", "learned", 0.05)]
    )
    with pytest.raises(FewstepError, match="no classic solver ran at 3 NFE"):
        _table(tmp_path)


def test_the_guidance_table_of_solvers_that_ran_is_unchanged(monkeypatch, tmp_path):
    _fake_guidance_run(monkeypatch, [_row("heun", "karras", 0.1), _row("s4s fitted at w=2", "learned", 0.05)])
    (row,) = _table(tmp_path)
    assert row["best_classic"] == "heun@karras" and row["ratio"] == pytest.approx(0.5)
