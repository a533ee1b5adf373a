"""A fit's life on disk and on screen: what ``--out`` may replace, an artifact that is whole whenever a write
stops, resuming (with another micro-batch) and what a resumed fit cost, a finished fit found again instead of
refitted, ``--budget`` beside explicit sizes, a student NFE that cannot learn, and progress in a log file."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import fewstep.io
from fewstep import VPLinear
from fewstep.errors import FewstepError
from fewstep.fit.api import FitData, fit, fit_plan, write_artifact
from fewstep.fit.budget import predicted
from fewstep.progress import PlainProgress, progress_bar
from fewstep.solvers.artifact import load_solver
from fewstep.solvers.registry import classic_specs
from gauss import make_gauss

SPEC = "dpmpp_3m@logsnr:40"
KW = dict(
    teacher=SPEC,
    samples=64,
    val_samples=32,
    confirm_samples=0,
    eval_every=8,
    start="ddim@logsnr",
    screen_seeds=1,
    progress=False,
)


@pytest.fixture(scope="module")
def model():
    return make_gauss(VPLinear(), "eps", d=6)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("teacher")


def _one_line(e: BaseException) -> str:
    msg = str(e)
    assert msg and "\n" not in msg, msg
    return msg


# ----------------------------------------------------------------------------- rows 1, 2: what --out may replace
@pytest.mark.parametrize("case", ["json-file", "folder-solver-json", "params-file"])
def test_out_never_replaces_a_file_that_is_not_fewsteps(model, cache, tmp_path, case):
    work = tmp_path / "w"
    work.mkdir()
    if case == "json-file":
        out, theirs = work / "notes.json", work / "notes.json"
    elif case == "folder-solver-json":
        out, theirs = work, work / "solver.json"
    else:  # an artifact name whose parameter file would land on a file of theirs
        out, theirs = work / "notes.json", work / "notes.params.safetensors"
    theirs.write_text('{"my": "notes"}\n')
    before = {p.name: p.read_bytes() for p in work.iterdir()}
    with pytest.raises(FewstepError, match=f"{theirs.name} exists and is not a fewstep") as e:
        fit(model, "s4s", 4, out=out, steps=8, cache_dir=cache, **KW)
    assert "--out" in _one_line(e.value)
    assert {p.name: p.read_bytes() for p in work.iterdir()} == before  # untouched, nothing written beside


def test_the_command_refuses_a_users_file_in_one_line_before_loading_the_model(tmp_path):
    (tmp_path / "notes.json").write_text("my notes\n")
    env = {**os.environ, "FEWSTEP_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "fewstep", "fit", "--model", "zoo:gmm", "--nfe", "4", "--out", "notes.json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --out: notes.json exists and is not a fewstep"), r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.json"]  # nothing else, not even the cache
    assert (tmp_path / "notes.json").read_text() == "my notes\n"


# ----------------------------------------------------------------------------- row 3: old or new, never a mix
class Killed(BaseException):
    """The process dies here (nothing after it runs; ``finally`` blocks do, as they would not: harmless)."""


def _replace_dying_at(k: int, real):
    """An ``os.replace`` that raises Killed on its k-th call (counted from 1) and calls ``real`` otherwise."""
    calls = {"n": 0}

    def dies(src, dst, *a, **kw):
        calls["n"] += 1
        if calls["n"] == k:
            raise Killed
        return real(src, dst, *a, **kw)

    return dies


@pytest.mark.parametrize("out", ["a", "a/named.json"])
def test_a_write_stopped_at_any_point_leaves_the_old_or_the_new_artifact(model, cache, tmp_path, monkeypatch, out):
    old = fit(model, "s4s", 4, steps=8, cache_dir=cache, **KW)
    new = fit(model, "s4s", 4, steps=16, cache_dir=cache, **KW)
    assert old.doc["tableau"] != new.doc["tableau"]
    out = tmp_path / out
    real, seen = os.replace, set()
    for k in range(1, 10):
        write_artifact(out, old.doc, old.outcome.solver)
        monkeypatch.setattr(fewstep.io.os, "replace", _replace_dying_at(k, real))
        try:
            write_artifact(out, json.loads(json.dumps(new.doc)), new.outcome.solver)
            finished = True
        except Killed:
            finished = False
        finally:
            monkeypatch.setattr(fewstep.io.os, "replace", real)
        got = load_solver(out)  # a whole artifact, whichever: its tables and its parameters agree
        got.learned()
        which = [name for name, r in (("old", old), ("new", new)) if got.doc["tableau"] == r.doc["tableau"]]
        assert len(which) == 1, k
        seen.add(which[0])
        if finished:
            folder, name = (out.parent, out.name) if out.suffix == ".json" else (out, "solver.json")
            assert sorted(p.name for p in folder.iterdir()) == sorted([name, got.doc["params"]])
            break
    assert seen == {"old", "new"} and finished and which == ["new"]
    assert k >= 3  # the new artifact is written in more than one step; every one of them was stopped at


# ----------------------------------------------------------------------------- rows 4, 17: resuming
def test_an_interrupted_fit_resumes_with_another_micro_batch_and_counts_the_whole_fit(
    model, cache, tmp_path, kill_at_call
):
    kw = dict(KW, steps=40, batch=16, cache_dir=cache)
    whole = fit(model, "s4s", 4, out=tmp_path / "whole", **kw)
    with pytest.raises(KeyboardInterrupt):
        kill_at_call(20, lambda: fit(model, "s4s", 4, out=tmp_path / "cut", **kw))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # resuming is not "another fit": no warning
        again = fit(model, "s4s", 4, out=tmp_path / "cut", micro_batch=4, **kw)
    assert again.outcome.resumed_from == 16  # the checkpoint at the validation of step 16, before the kill
    assert again.doc["fit"]["micro_batch"] == 4
    torch.testing.assert_close(
        torch.tensor(again.doc["tableau"]["B"]), torch.tensor(whole.doc["tableau"]["B"]), rtol=1e-4, atol=1e-6
    )
    # the cost is the whole fit's: the run killed at step 20 spent up to its checkpoint, the rerun the rest
    c, w = again.doc["cost"], whole.doc["cost"]
    assert c["fit"]["earlier_runs_evals"] > 0
    assert (c["total_evals"], c["fit"]["forward_evals"], c["fit"]["backward_evals"]) == (
        w["total_evals"],
        w["fit"]["forward_evals"],
        w["fit"]["backward_evals"],
    )


def test_a_checkpoint_of_another_fit_is_named_in_one_warning(model, cache, tmp_path, kill_at_call):
    kw = dict(KW, cache_dir=cache)
    with pytest.raises(KeyboardInterrupt):
        kill_at_call(12, lambda: fit(model, "s4s", 4, out=tmp_path / "a", steps=40, **kw))
    with pytest.warns(UserWarning) as w:
        res = fit(model, "s4s", 4, out=tmp_path / "a", steps=24, **kw)
    msgs = [str(x.message) for x in w]
    assert len(msgs) == 1 and "is of another fit (steps 40 -> 24)" in msgs[0] and "step 0" in msgs[0], msgs
    assert res.outcome.resumed_from == 0


# ----------------------------------------------------------------------------- row 12: a finished fit found again
def test_a_rerun_of_a_finished_fit_loads_it_and_spends_nothing(model, cache, tmp_path):
    kw = dict(KW, steps=16, cache_dir=cache)
    first = fit(model, "s4s", 4, out=tmp_path / "a", **kw)
    files = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    spent = model.cost.total
    again = fit(model, "s4s", 4, out=tmp_path / "a", reuse=True, micro_batch=8, **kw)  # execution only: same fit
    assert again.reused and model.cost.total == spent  # no teacher, no fit: not one network evaluation
    assert again.doc == first.doc and again.path == first.path
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == files
    assert again.outcome.val == first.outcome.val and again.outcome.kept_start == first.outcome.kept_start
    assert again.outcome.solver.tableau().B.tolist() == first.outcome.solver.tableau().B.tolist()
    other = fit(model, "s4s", 4, out=tmp_path / "a", reuse=True, **dict(kw, steps=12))  # another fit: fitted
    assert not other.reused and model.cost.total > spent and other.doc["fit"]["steps"] == 12
    assert not fit(model, "s4s", 4, out=tmp_path / "a", reuse=True, resume=False, **dict(kw, steps=12)).reused


def test_the_command_says_it_found_the_finished_fit(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from fewstep.cli import app

    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    args = [
        "fit",
        "--model",
        "zoo:gmm",
        "--nfe",
        "4",
        "--samples",
        "64",
        "--val-samples",
        "32",
        "--confirm-samples",
        "0",
        "--steps",
        "8",
        "--start",
        "unipc@logsnr",
        "--eval-samples",
        "0",
        "--out",
        str(tmp_path / "X"),
    ]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(app, args + ["--micro-batch", "4"])
    assert again.exit_code == 0, again.output
    found = [ln for ln in again.output.splitlines() if "already holds this fit" in ln]
    assert (
        len(found) == 1
        and "--restart" in found[0]
        and not any(ln.startswith("wrote") for ln in again.output.splitlines())
    )


# ----------------------------------------------------------------------------- row 5: --budget beside sizes
def test_a_budget_keeps_the_sizes_given_beside_it(model):
    plan0, _ = fit_plan(model, "s4s-alt", 5, teacher=SPEC, budget=600_000)
    plan, _ = fit_plan(model, "s4s-alt", 5, teacher=SPEC, budget=600_000, samples=300, steps=40)
    cfg0, cfg = plan0.sizes, plan.sizes
    assert (cfg.samples, cfg.steps) == (300, 40) and (cfg0.samples, cfg0.steps) != (300, 40)
    assert cfg.val_samples >= 8 and cfg.batch <= 300
    sizes = cfg
    total = predicted(plan, sizes, 40, len(classic_specs(model.schedule)), shard=128).total
    assert total <= 600_000
    big = fit_plan(model, "s4s-alt", 5, teacher=SPEC, budget=600_000, samples=4000, steps=3000)[0].sizes
    assert (big.samples, big.steps) == (4000, 3000) and 8 <= big.batch < cfg0.batch  # fits, with a small batch
    with pytest.raises(
        FewstepError,
        match=r"--budget 600,000 does not cover --samples 20000 --steps 3000: .* "
        r"costs [\d,]+ network evaluations",
    ) as e:
        fit_plan(model, "s4s-alt", 5, teacher=SPEC, budget=600_000, samples=20_000, steps=3000)
    _one_line(e.value)


# ----------------------------------------------------------------------------- row 13: nfe at the teacher's
def test_a_student_nfe_at_the_teachers_is_one_warning(model, monkeypatch):
    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop

    monkeypatch.setattr(FitData, "generate", stop)  # the warning comes before any work
    with pytest.warns(UserWarning) as w, pytest.raises(Stop):
        fit(model, "s4s", 40, teacher=SPEC, progress=False)
    assert len(w) == 1 and "--nfe 40 is not below the teacher's NFE" in str(w[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(Stop):
            fit(model, "s4s", 39, teacher=SPEC, progress=False)


# ----------------------------------------------------------------------------- progress without a terminal
def test_progress_without_a_terminal_is_a_few_plain_lines():
    out = io.StringIO()
    bar = progress_bar(1000, "fit s4s NFE 5", file=out)
    assert isinstance(bar, PlainProgress)
    for i in range(1000):
        bar.update(1)
        bar.set_postfix_str(f"loss {i}")
    bar.close()
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 10 and lines[-1].startswith("fit s4s NFE 5: 100% (1000/1000 steps")
    stopped = io.StringIO()
    bar = progress_bar(1000, "teacher", unit="sample", file=stopped)
    bar.update(250)
    bar.close()
    bar.close()
    assert stopped.getvalue().splitlines()[-1].startswith("teacher: stopped at 25% (250/1000 samples")
    assert len(stopped.getvalue().splitlines()) == 2  # 25% once, and where it stopped (once)


def test_a_terminal_gets_a_live_bar():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    bar = progress_bar(10, "x", file=Tty())
    assert not isinstance(bar, PlainProgress) and hasattr(bar, "set_postfix_str")
    bar.close()


def test_a_fit_logged_to_a_file_writes_plain_lines(model, tmp_path, capsys):
    # two batch orders screened for 8 steps each (eval_every), in a fit of 6: each runs the whole fit
    kw = dict(KW, progress=True, screen_seeds=2, polish=0.0)
    fit(model, "s4s-alt", 4, **kw, steps=6, rounds=1, cache_dir=tmp_path / "c")
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert 3 <= len(lines) <= 3 * 11, lines  # two teacher shards and the fit, at most a line per tenth each
    assert any(ln.startswith("teacher dpmpp_3m@logsnr:40: 100%") for ln in lines)
    assert lines[-1].startswith("fit s4s-alt NFE 4: 100% (12/12 steps"), lines  # the total is what runs
