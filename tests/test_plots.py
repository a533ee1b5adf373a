"""Which rows the metric plots draw: grids and the best classic solver are chosen by RMSE."""

from __future__ import annotations

import pytest

from fewstep.plots import classic_lines, metric_vs_nfe


def _row(solver, grid, nfe, rmse, fd, psnr=None):
    return {"solver": solver, "grid": grid, "nfe": nfe, "rmse": rmse, "fd": fd, "psnr": psnr}


ROWS = [
    _row("unipc", "logsnr", 5, 0.05, 19.0, 30.0),
    _row("unipc", "time", 5, 0.09, 12.0, 25.0),  # lowest FD, below the floor: a lucky bias, not a better solver
    _row("ddim", "logsnr", 5, 0.20, 15.0, 20.0),
    _row("unipc", "logsnr", 8, 0.02, 18.9, 35.0),
    _row("heun", "time", 7, 0.01, 18.0, 40.0),  # odd NFE below an even budget: drawn, never "best" at 8
]


def test_best_classic_is_chosen_by_rmse_not_by_the_metric():
    best, overall, key = classic_lines(ROWS, "fd", asked=[5, 8])
    assert key == "rmse"
    assert best["unipc"][5]["grid"] == "logsnr" and overall[5]["fd"] == 19.0
    assert overall[8]["solver"] == "unipc" and 7 not in overall and best["heun"][7]["rmse"] == 0.01


def test_without_rmse_the_metric_decides_in_its_own_direction():
    rows = [{k: v for k, v in r.items() if k != "rmse"} for r in ROWS]
    _, overall, key = classic_lines(rows, "psnr", asked=[5, 8])
    assert key == "psnr" and overall[5]["psnr"] == 30.0  # higher PSNR is better
    _, overall, _ = classic_lines(rows, "fd", asked=[5])
    assert overall[5]["fd"] == 12.0


def test_metric_plot_with_a_diverging_solver_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    rep = {
        "model": "m",
        "nfe": [5, 8],
        "results": ROWS
        + [
            _row("adams2", "time", 5, 40.0, 4e5),
            {
                "solver": "reference",
                "grid": "dpmpp_3m@logsnr",
                "nfe": 400,
                "rmse": 3e-4,
                "fd": 18.8,
                "role": "reference",
            },
            _row("s4s-alt", "learned", 5, 0.03, 19.5),
        ],
    }
    p = metric_vs_nfe(rep, tmp_path / "fd.png", "fd")
    assert p.stat().st_size > 10_000
