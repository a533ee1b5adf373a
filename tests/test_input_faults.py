"""Bad input that could cost minutes, gigabytes or a traceback, refused early (issue 20, rows 6-11); `fewstep zoo`.

- a guidance range with a huge count is refused at once (row 6);
- seeds have a documented upper bound checked at the option, and an output name too long for the file
  system is refused before any work (row 7);
- console markup in a label, model spec or error is printed as text (row 8);
- JSON nested absurdly deep is refused in one line by every reader of files fewstep did not just write (row 9);
- a teacher manifest with an absurd shard size or a non-number in its times is rebuilt (row 10);
- the grid check of an artifact holds whatever ``tableau.points`` says (row 11);
- ``fewstep zoo`` says what each model is, without building or training any (suite item 7).

Most cases run in process; one subprocess runs the hostile commands through the real entry point
(``fewstep.cli.main``, one torch import for all of them) to check the one-line contract.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from fewstep import VPLinear, zoo
from fewstep.cli import app, common
from fewstep.conditions import MAX_SCALES, GuidanceSet, PromptSet
from fewstep.errors import ArtifactError, FewstepError
from fewstep.fit.teacher import generate_teacher, teacher_cache_dir
from fewstep.fit.teacher_cache import MAX_SHARD_SIZE, ShardCache
from fewstep.io import MAX_JSON_DEPTH, loads_json, write_text
from fewstep.report import Report, Row, render_rich
from fewstep.seeds import FIRST_SEED_MAX, SEED_LIMIT, check_seeds, eval_seeds
from fewstep.solvers.artifact import load_solver, save_solver, solver_doc, tableau_to_doc
from fewstep.solvers.heun import heun
from fewstep.solvers.resolve import resolve_solver
from gauss import make_gauss

runner = CliRunner()
DEEP = 200_000
SPEC = "dpmpp_3m@logsnr:40"


def _one_line(e: BaseException) -> str:
    msg = str(e)
    assert msg and "\n" not in msg, msg
    return msg


def _deep(n: int = DEEP) -> str:
    return "[" * n + "]" * n


# ============================================================================ row 6: guidance count
def test_a_guidance_range_with_a_huge_count_is_refused_at_once():
    t0 = time.perf_counter()
    for spec in ("3:12:65", "3:12:inf", "3:12:1e300", "3:12:100000000"):
        with pytest.raises(FewstepError, match=f"2..{MAX_SCALES}") as e:
            GuidanceSet.parse(spec)
        _one_line(e.value)
    with pytest.raises(FewstepError, match="more than 64"):
        GuidanceSet.parse([1.0 + i for i in range(MAX_SCALES + 1)])
    assert time.perf_counter() - t0 < 1.0  # refused, not computed
    g = GuidanceSet.parse(f"3:12:{MAX_SCALES}")
    assert len(g.scales) == MAX_SCALES and g.range == (3.0, 12.0)


# ============================================================================ row 7: seeds and long names
def test_seeds_have_a_documented_upper_bound_that_torch_accepts():
    assert common.SEED_MAX == FIRST_SEED_MAX == 2**62 and SEED_LIMIT == 2**63
    torch.Generator().manual_seed(SEED_LIMIT - 1)  # the bound is real: every seed below it works
    assert check_seeds(FIRST_SEED_MAX, 10) == range(FIRST_SEED_MAX, FIRST_SEED_MAX + 10)
    for start in (2**64 - 1, FIRST_SEED_MAX + 1, -1):
        with pytest.raises(FewstepError, match="2\\*\\*62") as e:
            check_seeds(start, 1)
        _one_line(e.value)
    with pytest.raises(FewstepError, match="2\\*\\*62"):
        eval_seeds(4, 2**64 - 1)


@pytest.mark.parametrize("command", ["eval", "sample"])
def test_a_seed_beyond_the_bound_is_refused_at_the_option(command, tmp_path):
    args = {
        "eval": ["eval", "--model", "zoo:gaussian", "--samples", "4", "--solver", "euler@time"],
        "sample": ["sample", "--model", "zoo:gaussian", "--n", "2", "--out", str(tmp_path / "x.safetensors")],
    }
    r = runner.invoke(app, [*args[command], "--seed", str(2**64 - 1)])
    assert r.exit_code == 2 and str(FIRST_SEED_MAX) in r.output, r.output
    assert "[0, 2**62]" in runner.invoke(app, [command, "--help"]).output  # documented at the option


def test_sample_at_the_largest_seed_works(tmp_path):
    out = tmp_path / "x.safetensors"
    r = runner.invoke(
        app,
        [
            "sample",
            "--model",
            "zoo:gaussian",
            "--n",
            "2",
            "--nfe",
            "2",
            "--solver",
            "euler@time",
            "--seed",
            str(FIRST_SEED_MAX),
            "--out",
            str(out),
        ],
    )
    assert r.exit_code == 0, (r.output, r.exception)
    from safetensors.torch import load_file

    x = load_file(str(out))["samples"]
    assert x.shape == (2, 16) and torch.isfinite(x).all()


def _refused(capsys, fn, *args, **kw) -> str:
    with pytest.raises(typer.Exit) as e:
        fn(*args, **kw)
    assert e.value.exit_code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_an_output_name_too_long_for_the_file_system_is_refused_before_any_work(tmp_path, capsys):
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    room = common._temporary_room()
    long, near = "a" * (limit + 45), "b" * (limit - room + 1)  # too long; fits, but its temporary would not
    assert "at most" in _refused(capsys, common.check_out_file, tmp_path / f"{long}.safetensors")
    assert f"at most {limit - room} bytes" in _refused(capsys, common.check_out_file, tmp_path / near)
    assert "at most" in _refused(capsys, common.check_out_dir, tmp_path / long / "x", "--plot")
    assert "at most" in _refused(capsys, common.check_out_dir, tmp_path / near)
    json_near = "c" * (limit - room - len(".params.safetensors") + 1) + ".json"  # its params file is longer
    allowed = limit - room - len(".params.safetensors") + len(".json")
    assert f"at most {allowed} bytes" in _refused(capsys, common.check_out_dir, tmp_path / json_near, json_ok=True)
    assert os.listdir(tmp_path) == []
    ok = "d" * (limit - room)
    common.check_out_file(tmp_path / ok)
    common.check_out_dir(tmp_path / ok)
    write_text(tmp_path / ok, "x")  # the longest accepted name: its temporary fits this file system
    assert os.listdir(tmp_path) == [ok]


# ============================================================================ row 8: console markup
def test_console_markup_in_a_report_is_printed_as_text():
    rep = Report(
        "zoo:[bold]m",
        5,
        16,
        1_000_000,
        {"solver": "dpm[/red]", "nfe": 40, "self_error": 1e-5},
        [
            Row("learned", "[/bold]oops", "learned", 5, 0.1, 0.01, 1.0),
            Row("classic", "euler", "[/]time", 5, None, error="refused [/b] here"),
        ],
    )
    f = io.StringIO()
    render_rich(rep, file=f)
    out = f.getvalue()
    for text in ("zoo:[bold]m", "dpm[/red]", "[/bold]oops", "[/]time", "refused [/b] here"):
        assert text in out, out


def _artifact(folder: Path, label: str, model, edit=None) -> Path:
    solver = resolve_solver("unipc@logsnr", model, 4)
    doc = solver_doc(solver.tableau(model), model.schedule, model, "s4s", label=label)
    if edit is not None:
        edit(doc)
    save_solver(folder, doc)
    return folder


def test_eval_of_an_artifact_whose_label_holds_markup_prints_it(tmp_path):
    folder = tmp_path / "art"
    folder.mkdir()
    _artifact(folder, "[/bold]oops", zoo.load("gaussian"))
    r = runner.invoke(
        app,
        [
            "eval",
            "--model",
            "zoo:gaussian",
            "--nfe",
            "4",
            "--solver",
            str(folder),
            "--solver",
            "euler@time",
            "--samples",
            "8",
            "--metrics",
            "none",
        ],
    )
    assert r.exit_code == 0, (r.output, r.exception)
    assert "[/bold]oops" in r.output


# ============================================================================ row 9: deep JSON
def test_loads_json_refuses_deep_nesting_as_malformed_json():
    for text in (_deep(), _deep(MAX_JSON_DEPTH + 1), '{"a": ' * 5000 + "1" + "}" * 5000):
        with pytest.raises(json.JSONDecodeError, match="nested deeper"):
            loads_json(text)
    assert loads_json(_deep(MAX_JSON_DEPTH)) is not None and loads_json('{"a": [1, {"b": 2}]}') == {"a": [1, {"b": 2}]}


@pytest.mark.parametrize("where", ["label", "history"])
def test_a_solver_json_nested_deep_is_refused_in_one_line(tmp_path, where):
    model = make_gauss(VPLinear(), "eps", d=4)
    folder = tmp_path / "art"
    folder.mkdir()
    _artifact(folder, "ok", model)
    doc = (folder / "solver.json").read_text()
    (folder / "solver.json").write_text(doc[:-2] + f', "{where}": {_deep()}}}\n')
    with pytest.raises(ArtifactError, match="nested deeper") as e:
        load_solver(folder)
    _one_line(e.value)


def test_a_prompt_file_nested_deep_is_refused_in_one_line(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a cat"}\n{"prompt": ' + _deep() + "}\n")
    with pytest.raises(FewstepError, match="line 2") as e:
        PromptSet.read(f)
    _one_line(e.value)


# ============================================================================ row 10: teacher manifest and shards
@pytest.fixture()
def cache(tmp_path):
    model = make_gauss(VPLinear(), "eps", d=4)
    data = generate_teacher(model, range(16), SPEC, cache_dir=tmp_path, shard_size=8, progress=False)
    return model, data, teacher_cache_dir(model, SPEC, False, tmp_path)


def _again(model, tmp_path, match: str):
    n = model.nfe
    with pytest.warns(UserWarning, match=match) as w:
        data = generate_teacher(model, range(16), SPEC, cache_dir=tmp_path, shard_size=8, progress=False)
    assert all("\n" not in str(x.message) for x in w)
    return data, model.nfe - n


@pytest.mark.parametrize(
    "edit",
    [
        {"shard_size": 10**12, "shards": []},
        {"shard_size": 10**12},
        {"shard_size": 1024, "shards": []},
        {"times": ["abc"]},
        {"times": [10**400]},
        {"times": None},
        "deep",
    ],
    ids=["huge-size", "huge-size-listed", "unbacked-size", "times-str", "times-huge", "times-none", "deep"],
)
def test_an_absurd_manifest_is_rebuilt_from_the_shards(cache, tmp_path, edit):
    model, data, folder = cache
    man = folder / "manifest.json"
    doc = json.loads(man.read_text())
    if edit == "deep":
        man.write_text(json.dumps(doc)[:-1] + f', "x": {_deep()}}}')
    else:
        doc.update(edit)
        man.write_text(json.dumps(doc))
    again, spent = _again(model, tmp_path, "rebuilt from the shards")
    assert spent == 0 and torch.equal(again.target, data.target)  # nothing recomputed
    rebuilt = json.loads(man.read_text())
    assert rebuilt["shard_size"] == 8 and [e["seeds"] for e in rebuilt["shards"]] == [[0, 8], [8, 16]]


def test_a_manifest_shard_size_that_a_shard_backs_is_kept(cache, tmp_path):
    model, data, folder = cache
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = generate_teacher(model, range(16), SPEC, cache_dir=tmp_path, shard_size=4, progress=False)
    assert (
        torch.equal(again.target, data.target) and json.loads((folder / "manifest.json").read_text())["shard_size"] == 8
    )


@pytest.mark.parametrize("bad", ["[1, 2]", "{not json", "deep"])
def test_a_shard_with_malformed_shared_conditioning_is_recomputed(cache, tmp_path, bad):
    from safetensors import safe_open
    from safetensors.torch import save_file

    model, data, folder = cache
    shard = folder / "seeds-8-16.safetensors"
    with safe_open(str(shard), "pt") as f:
        meta, t = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  # safe_open is not iterable
    meta["shared_cond"] = '{"x": ' + _deep() + "}" if bad == "deep" else bad
    save_file(t, str(shard), metadata=meta)
    (folder / "manifest.json").unlink()  # the rebuild reads every shard's metadata too
    with pytest.warns(UserWarning, match=r"seeds-8-16\.safetensors.*shared"):
        again = generate_teacher(model, range(16), SPEC, cache_dir=tmp_path, shard_size=8, progress=False)
    assert torch.equal(again.target, data.target)


def test_a_shard_size_beyond_the_limit_is_refused_in_one_line(tmp_path):
    with pytest.raises(FewstepError, match=str(MAX_SHARD_SIZE)) as e:
        ShardCache(tmp_path, {}, MAX_SHARD_SIZE + 1)
    _one_line(e.value)


# ============================================================================ row 11: the grid check and points
def _swap_two_times(doc: dict) -> None:
    t = doc["tableau"]["t"]
    t[1], t[2] = t[2], t[1]
    doc["tableau"]["points"] = [1] * len(t)


@pytest.mark.parametrize("points", ["all-ones", "none"])
def test_an_artifact_with_two_grid_times_swapped_is_refused_whatever_points_says(tmp_path, points):
    model = make_gauss(VPLinear(), "eps", d=4)

    def edit(doc):
        _swap_two_times(doc)
        if points == "none":
            del doc["tableau"]["points"]

    folder = tmp_path / "art"
    folder.mkdir()
    _artifact(folder, "x", model, edit)
    with pytest.raises(ArtifactError, match="tableau.t must be strictly decreasing") as e:
        load_solver(folder)
    _one_line(e.value)


def _heun_doc(model) -> dict:
    s = model.schedule
    tab = heun(s, torch.linspace(s.t_max, s.t_end + 1e-2, 5, dtype=torch.float64))
    doc = solver_doc(tab, s, model, "heun")
    doc["tableau"] = {**tableau_to_doc(tab), "points": tab.points.int().tolist()}
    return doc


@pytest.mark.parametrize(
    "damage", [None, "a stage at its step's start", "points end on a stage", "solution points swapped"]
)
def test_the_grid_check_of_a_multi_stage_tableau(tmp_path, damage):
    model = make_gauss(VPLinear(), "eps", d=4)
    doc = _heun_doc(model)
    t, p = doc["tableau"]["t"], doc["tableau"]["points"]
    assert p == [1, 0, 1, 0, 1, 0, 1, 0, 1] and t[1] == t[2]  # Heun: a stage at its step's end time
    if damage == "a stage at its step's start":
        t[3] = t[2]  # the grid still never increases
    elif damage == "points end on a stage":
        p[-1], p[-2] = 0, 1
    elif damage == "solution points swapped":
        t[2], t[4] = t[4], t[2]
    (tmp_path / "solver.json").write_text(json.dumps(doc))
    if damage is None:
        x = load_solver(tmp_path).tableau(model)
        assert x.N == 8 and torch.equal(x.points, torch.tensor(p).bool())
        return
    with pytest.raises(ArtifactError, match="tableau") as e:
        load_solver(tmp_path)
    _one_line(e.value)


# ============================================================================ suite item 7: fewstep zoo
def test_zoo_says_what_each_model_is_without_building_any(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("fewstep zoo built or trained a model")

    monkeypatch.setattr(zoo, "_BUILDERS", {k: refuse for k in zoo._BUILDERS})
    from fewstep.zoo import train

    monkeypatch.setattr(train, "train", refuse)
    r = runner.invoke(app, ["zoo", "--json"])
    assert r.exit_code == 0, (r.output, r.exception)
    rows = json.loads(r.stdout)
    assert [d["name"] for d in rows] == [f"zoo:{n}" for n in zoo.NAMES]
    by = {d["name"][4:]: d for d in rows}
    assert by["gaussian"]["kind"] == "analytic" and by["gaussian"]["first_use"] == "analytic, instant"
    assert by["digits-eps"]["first_use"].startswith("trained on first use, ~40 s")
    assert by["digits-unet"]["first_use"].startswith("ships weights") and by["digits-unet"]["cached"] is True
    assert by["gmm"]["classes"] == 10 and by["gmm"]["sample_shape"] == [32] and by["gmm"]["prediction"] == "x0"
    text = runner.invoke(app, ["zoo"]).stdout
    for name in zoo.NAMES:
        line = next(x for x in text.splitlines() if x.startswith(f"zoo:{name} "))
        d = by[name]
        assert d["prediction"] in line and d["kind"] in line and d["first_use"] in line


def test_zoo_descriptions_match_the_models_and_recipes():
    from fewstep.zoo import digits, train, unet

    for name in ("gaussian", "gmm2d", "gmm"):  # analytic: built in no time
        info, den = zoo.INFO[name], zoo.load(name)
        assert (info.prediction, info.sample_shape, info.schedule) == (
            den.prediction,
            den.sample_shape,
            den.schedule.config()["type"],
        )
        assert info.classes == getattr(den, "num_classes", None)
        assert info.first_use_seconds == 0
    objective = {"eps": "eps", "velocity": "velocity"}
    for name in ("digits-eps", "digits-flow"):  # trained: the recipe says what they are
        info, rec = zoo.INFO[name], train.RECIPES[name]
        assert (info.prediction, info.schedule) == (objective[rec["objective"]], rec["schedule"]["type"])
        assert info.sample_shape == digits.SHAPE and info.first_use_seconds == train.EXPECTED_SECONDS
    info = zoo.INFO["digits-unet"]
    assert (info.sample_shape, info.classes, info.schedule) == (
        unet.SHAPE,
        unet.NUM_CLASSES,
        unet.RECIPE["schedule"]["type"],
    )
    assert zoo.INFO["digits-empirical"].sample_shape == digits.SHAPE
    assert set(zoo.INFO) == set(zoo.NAMES)


# ============================================================================ the real entry point: one line each
SCRIPT = textwrap.dedent("""
    import sys
    from fewstep.cli import main

    for argv in {cases!r}:
        sys.argv = ["fewstep", *argv]
        try:
            main()
        except SystemExit as e:
            code = e.code
        except BaseException as e:
            code = repr(e)
        sys.stdout.flush()
        print(f"@@ {{code}}", file=sys.stderr, flush=True)
""")


def test_hostile_options_end_in_one_line_through_the_entry_point(tmp_path):
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    long = "a" * (limit + 45)
    art = tmp_path / "deep"
    art.mkdir()
    (art / "solver.json").write_text('{"schema": "fewstep.solver/1", "x": ' + _deep() + "}")
    cases = [
        ["eval", "--model", "zoo:gmm", "--guidance", "3:12:100000000", "--samples", "4", "--solver", "euler@time"],
        ["eval", "--model", "zoo:gmm", "--samples", "4", "--solver", "euler@time", "--seed", str(2**64 - 1)],
        ["sample", "--model", "zoo:gmm", "--n", "2", "--seed", str(2**64 - 1), "--out", "x.safetensors"],
        ["sample", "--model", "zoo:gmm", "--n", "2", "--out", f"{long}.safetensors"],
        ["eval", "--model", "zoo:gmm", "--samples", "4", "--solver", "euler@time", "--plot", long],
        ["bench", "--model", "zoo:gmm", "--out", long],
        ["guidance", "--model", "zoo:gmm", "--fit-scale", "2", "--scale", "2", "--out", long],
        ["demo", "--model", "zoo:gmm", "--out", f"{long}/x"],
        ["fit", "--model", "zoo:gmm", "--out", long],
        ["fit", "--model", "zoo:gmm", "--out", "f", "--seed", str(2**64 - 1)],
        ["eval", "--model", "zoo:gmm", "--samples", "4", "--solver", str(art)],
    ]
    env = {**os.environ, "FEWSTEP_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("FEWSTEP_DEBUG", None)
    work = tmp_path / "work"
    work.mkdir()
    p = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(cases=cases)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    blocks = p.stderr.split("@@ ")  # block i: case i's stderr after case i-1's exit code
    assert len(blocks) == len(cases) + 1, p.stderr[-3000:]
    for i, argv in enumerate(cases):
        lines = [x for x in blocks[i].splitlines()[1 if i else 0 :] if x.strip()]
        code = blocks[i + 1].splitlines()[0]
        assert code == "2" and len(lines) == 1 and lines[0].startswith("error: "), (argv, code, blocks[i][-2000:])
    assert os.listdir(work) == []
