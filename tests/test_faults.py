"""Faults and bad input, in process: every case ends in a finished run or one clear line, and files that
are read back (teacher shards, manifests, fit checkpoints, artifacts) are checked before they are trusted.

The same cases through the ``fewstep`` command (exit codes, one line, nothing left on disk) are in
test_cli_faults.py; random damage to artifacts in test_artifact_fuzz.py.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys

import pytest
import torch

import fewstep
from fewstep import VPLinear
from fewstep.errors import ArtifactError, FewstepError
from fewstep.evaluate import evaluate
from fewstep.fit.api import fit
from fewstep.fit.teacher import generate_teacher, teacher_cache_dir
from fewstep.io import _HOST, remove_stale_temporaries, write_text
from fewstep.seeds import fit_seeds
from gauss import make_gauss

F64 = torch.float64
SPEC = "dpmpp_3m@logsnr:40"


@pytest.fixture(scope="module")
def model():
    return make_gauss(VPLinear(), "eps", d=6)


def _one_line(e: BaseException) -> str:
    msg = str(e)
    assert "\n" not in msg and msg, msg
    return msg


# ----------------------------------------------------------------------------- a fit that blows up
def test_a_fit_whose_solves_blow_up_ends_with_its_start_and_says_so(model, tmp_path):
    kw = dict(
        teacher=SPEC,
        samples=64,
        val_samples=32,
        confirm_samples=32,
        progress=False,
        cache_dir=tmp_path / "c",
        steps=30,
        eval_every=10,
        lr_coef=1000.0,
        lr_grid=1000.0,
        start="unipc@logsnr",
    )
    res = fit(model, "s4s-alt", 4, out=tmp_path / "x", **kw)
    doc = json.loads((tmp_path / "x" / "solver.json").read_text())  # strict JSON: no NaN / Infinity
    v = doc["validation"]
    assert v["kept_start"] is True and res.outcome.state.skipped > 0
    assert any(h["val"] is None for h in doc["history"]) or res.outcome.state.skipped > 0
    assert all(h["val"] is None or h["val"] == h["val"] for h in doc["history"])
    assert "blew up" in v["notes"][0] and v["rmse_to_teacher"] == v["start_rmse_to_teacher"]
    assert not (tmp_path / "x" / "fit-checkpoint.safetensors").exists()
    # the run is repeatable: a second run with the same settings (or --restart) finishes the same way
    again = fit(model, "s4s-alt", 4, out=tmp_path / "x", resume=False, **kw)
    assert again.doc["tableau"] == res.doc["tableau"]


def test_a_nan_teacher_is_named_not_used(tmp_path):
    m = make_gauss(VPLinear(), "eps", d=6)
    real = m.net.forward
    m.net.forward = lambda x, t, **c: real(x, t, **c) * (torch.nan if float(t.min()) < 0.5 else 1.0)
    with pytest.raises(FewstepError, match="NaN") as e:
        generate_teacher(m, fit_seeds(8), SPEC, cache_dir=tmp_path, progress=False)
    _one_line(e.value)


# ----------------------------------------------------------------------------- teacher shards and manifest
def _cache(model, tmp_path):
    data = generate_teacher(model, fit_seeds(16), SPEC, cache_dir=tmp_path, shard_size=8, progress=False)
    return data, teacher_cache_dir(model, SPEC, False, tmp_path)


def _rewrite_shard(path, change, meta_change=None):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  # safe_open is not iterable
    change(t)
    if meta_change:
        meta_change(meta)
    save_file(t, str(path), metadata=meta)


@pytest.mark.parametrize("case", ["edited", "scaled", "nan", "other-model", "other-teacher"])
def test_a_bad_shard_is_regenerated_with_a_warning_naming_it(model, tmp_path, case):
    data, folder = _cache(model, tmp_path)
    shard = folder / "seeds-8-16.safetensors"
    changes = {
        "edited": (lambda t: t["target"].__setitem__((0, 0), 3.0), None),
        "scaled": (lambda t: t["target"].mul_(1.01), None),
        "nan": (lambda t: t["target"].__setitem__((1, 2), float("nan")), None),
        "other-model": (lambda t: None, lambda m: m.__setitem__("fingerprint", "0123456789abcdef")),
        "other-teacher": (lambda t: None, lambda m: m.__setitem__("teacher", "ddim@time:10")),
    }
    _rewrite_shard(shard, *changes[case])
    n = model.nfe
    with pytest.warns(UserWarning, match=r"seeds-8-16\.safetensors.*recomputing") as w:
        again = generate_teacher(model, fit_seeds(16), SPEC, cache_dir=tmp_path, shard_size=8, progress=False)
    assert "\n" not in str(w[0].message)
    assert model.nfe == n + 40  # exactly the bad shard (8 samples in one batch, 40 NFE) was solved again
    assert torch.equal(again.target, data.target)


@pytest.mark.parametrize("bad", [{"seeds": ["abc", 1]}, {"seeds": 5}, "shards12", {"shard_size": "8"}, "notjson"])
def test_a_malformed_manifest_is_rebuilt_from_the_shards(model, tmp_path, bad):
    data, folder = _cache(model, tmp_path)
    man = folder / "manifest.json"
    doc = json.loads(man.read_text())
    if bad == "shards12":
        doc["shards"] = [1, 2]
        man.write_text(json.dumps(doc))
    elif bad == "notjson":
        man.write_text("{not json")
    elif "seeds" in bad:
        doc["shards"][0]["seeds"] = bad["seeds"]
        man.write_text(json.dumps(doc))
    else:
        doc.update(bad)
        man.write_text(json.dumps(doc))
    n = model.nfe
    with pytest.warns(UserWarning, match="rebuilt from the shards") as w:
        again = generate_teacher(model, fit_seeds(16), SPEC, cache_dir=tmp_path, shard_size=8, progress=False)
    assert "\n" not in str(w[0].message)
    assert model.nfe == n and torch.equal(
        again.target, data.target
    )  # nothing recomputed: the shards describe themselves
    assert [e["seeds"] for e in json.loads(man.read_text())["shards"]] == [[0, 8], [8, 16]]


def test_stale_temporaries_of_a_killed_write_are_removed(model, tmp_path):
    _, folder = _cache(model, tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = folder / f".manifest.json.{_HOST}-{int(dead.stdout)}.x1y2z3.tmp"
    stale.write_text("{half")
    live = folder / f".manifest.json.{_HOST}-{os.getpid()}.a1b2c3.tmp"  # a writer still at work: kept
    live.write_text("{")
    generate_teacher(model, fit_seeds(16), SPEC, cache_dir=tmp_path, shard_size=8, progress=False)
    assert not stale.exists() and live.exists()
    os.utime(live, (0, 0))  # however long ago: old enough to be stale whoever wrote it
    assert remove_stale_temporaries(folder) == [live]


# ----------------------------------------------------------------------------- fit checkpoints
def _interrupted(model, tmp_path, monkeypatch):
    import fewstep.fit.loop as loop

    kw = dict(
        teacher=SPEC,
        samples=64,
        val_samples=32,
        progress=False,
        cache_dir=tmp_path / "c",
        steps=40,
        start="ddim@logsnr",
        eval_every=8,
    )
    real, calls = loop._objective, {"n": 0}

    def dies(*a, **k):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(loop, "_objective", dies)
    with pytest.raises(KeyboardInterrupt):
        fit(model, "s4s", 4, out=tmp_path / "x", **kw)
    monkeypatch.setattr(loop, "_objective", real)
    return kw


@pytest.mark.parametrize("edit", ["no-history", "bad-optimiser", "tensor", "garbage"])
def test_an_edited_checkpoint_is_refused_in_one_line_naming_it_and_restart(model, tmp_path, monkeypatch, edit):
    from safetensors import safe_open
    from safetensors.torch import save_file

    kw = _interrupted(model, tmp_path, monkeypatch)
    ck = tmp_path / "x" / "fit-checkpoint.safetensors"
    if edit == "garbage":
        ck.write_bytes(b"\x00" * 64)
    else:
        with safe_open(str(ck), "pt") as f:
            meta = dict(f.metadata())
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  # safe_open is not iterable
        doc = json.loads(meta["doc"])
        if edit == "no-history":
            del doc["history"]
        elif edit == "bad-optimiser":
            doc["opt"]["param_groups"] = "x"
        else:
            k = next(k for k in t if k.startswith("cur."))
            t[k] = t[k] + 1
        meta["doc"] = json.dumps(doc)
        save_file(t, str(ck), metadata=meta)
    with pytest.raises(FewstepError, match=r"fit-checkpoint\.safetensors.*--restart") as e:
        fit(model, "s4s", 4, out=tmp_path / "x", **kw)
    _one_line(e.value)
    res = fit(model, "s4s", 4, out=tmp_path / "x", resume=False, **kw)  # the fix it names works
    assert res.path.is_file()


# ----------------------------------------------------------------------------- artifacts
@pytest.fixture(scope="module")
def artifact(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("art")
    fit(
        model,
        "s4s-alt",
        4,
        out=d / "a",
        teacher=SPEC,
        samples=64,
        val_samples=32,
        confirm_samples=0,
        progress=False,
        cache_dir=d / "c",
        steps=16,
        eval_every=8,
        start="unipc@logsnr",
    )
    return d / "a"


def _edited(artifact, tmp_path, change):
    import shutil

    d = tmp_path / "edited"
    shutil.copytree(artifact, d)
    doc = json.loads((d / "solver.json").read_text())
    change(doc)
    (d / "solver.json").write_text(json.dumps(doc))
    return d


def _set(path, value):
    def change(doc):
        node = doc
        for k in path[:-1]:
            node = node[k]
        if value is KeyError:
            del node[path[-1]]
        else:
            node[path[-1]] = value

    return change


EDITS = {
    "eval time out of range": (_set(["tableau", "eval_times", 1], 7.0), r"tableau\.eval_times must lie in \[0, 1\]"),
    "grid out of range": (_set(["tableau", "t", -1], -0.5), r"tableau\.t must lie in \[0, 1\]"),
    "grid not decreasing": (_set(["tableau", "t", 2], 0.99), r"tableau\.t must be strictly decreasing"),
    "nan in a": (_set(["tableau", "a", 0], float("nan")), r"tableau\.a holds NaN"),
    "inf in C": (_set(["tableau", "C", 0, 0], float("inf")), r"tableau\.C holds NaN or inf"),
    "nan eval time": (_set(["tableau", "eval_times", 0], float("nan")), r"tableau\.eval_times holds NaN"),
    "a = 1e200": (_set(["tableau", "a", 1], 1e200), r"tableau\.a holds 1e\+200"),
    "B = 1e300": (_set(["tableau", "B", 1, 0], 1e300), r"tableau\.B holds 1e\+300"),
    "B_mask shape": (_set(["tableau", "B_mask"], [[1, 0], [1, 1]]), r"tableau\.B_mask must be a 0/1 list of shape"),
    "fingerprint missing": (_set(["model", "fingerprint"], KeyError), r"model\.fingerprint must be 16 hex digits"),
    "model a string": (_set(["model"], "gauss"), r"field model must be an object"),
    "nfe abc": (_set(["nfe"], "abc"), r"field nfe must be an integer"),
    "schedule bad key": (_set(["schedule", "beta_max"], "x"), r"field schedule"),
    "schedule extra key": (_set(["schedule", "shift"], 3.0), r"field schedule has a bad or unknown key .*shift"),
    "params absolute": (_set(["params"], "/etc/passwd"), r"field params must name a file inside"),
    "params dotdot": (_set(["params"], "../a/params.safetensors"), r"field params must name a file inside"),
}


@pytest.mark.parametrize("case", list(EDITS))
def test_a_damaged_artifact_is_refused_by_every_reader(model, artifact, tmp_path, case):
    from fewstep.show import describe

    change, pattern = EDITS[case]
    d = _edited(artifact, tmp_path, change)
    readers = [
        lambda: fewstep.load_solver(d),
        lambda: describe(d),
        lambda: fewstep.sample(model, torch.randn(2, 6, dtype=F64), str(d)),
        lambda: evaluate(model, solvers=[], learned=[fewstep.load_solver(d, force=True)]),
    ]
    pytest.importorskip("diffusers")
    from fewstep.integrations.diffusers_scheduler import FewStepScheduler

    readers.append(lambda: FewStepScheduler.from_solver(str(d), model))
    for read in readers:
        with pytest.raises(ArtifactError, match=pattern) as e:
            read()
        _one_line(e.value)


def test_refining_from_an_artifact_whose_params_point_outside_is_refused(model, artifact, tmp_path):
    d = _edited(artifact, tmp_path, lambda doc: None)
    doc = json.loads((d / "solver.json").read_text())
    loaded = fewstep.load_solver(d)
    loaded.doc["params"] = "../../secret.safetensors"
    with pytest.raises(ArtifactError, match="inside the artifact's folder"):
        loaded.learned()
    assert doc["params"] == "params.safetensors"


def test_files_are_written_with_the_usual_mode(artifact, tmp_path):
    want = 0o666 & ~_umask()
    for name in ("solver.json", "params.safetensors"):
        assert stat.S_IMODE((artifact / name).stat().st_mode) == want
    write_text(tmp_path / "t.json", "{}")
    assert stat.S_IMODE((tmp_path / "t.json").stat().st_mode) == want


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


# ----------------------------------------------------------------------------- disk full, big batches
def test_disk_full_while_writing_leaves_nothing_half_written(model, tmp_path, monkeypatch):
    import safetensors.torch as st

    from fewstep.io import save_samples

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(a[1]) if len(a) > 1 else "x")

    monkeypatch.setattr(st, "save_file", full)
    with pytest.raises(OSError, match="No space left"):
        save_samples(torch.zeros(2, 6), tmp_path / "s.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temporary, no partial file
    monkeypatch.setattr(st, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    with pytest.raises(OSError, match="No space left"):
        generate_teacher(model, fit_seeds(8), SPEC, cache_dir=tmp_path / "c", progress=False)
    folder = teacher_cache_dir(model, SPEC, False, tmp_path / "c")
    assert not list(folder.glob("seeds-*")) and not list(folder.glob(".*.tmp"))


def test_sample_solves_a_long_batch_in_chunks_with_the_same_result():
    m = make_gauss(VPLinear(), "eps", d=6)
    sizes = []
    real = m.net.forward
    m.net.forward = lambda x, t, **c: (sizes.append(x.shape[0]), real(x, t, **c))[1]
    noise = torch.randn(1000, 6, generator=torch.Generator().manual_seed(0), dtype=F64)
    whole = fewstep.sample(m, noise, "unipc", nfe=5, max_batch=10_000)
    assert set(sizes) == {1000}
    sizes.clear()
    parts = fewstep.sample(m, noise, "unipc", nfe=5, max_batch=128)
    assert max(sizes) == 128 and len(sizes) == 5 * 8
    torch.testing.assert_close(parts, whole, rtol=1e-12, atol=1e-12)
    from fewstep.sampling import chunk_size

    assert chunk_size((2,)) == 8192 and chunk_size((4, 128, 128)) == 256  # memory-sized by default
