"""Teacher data generation and its on-disk cache (fewstep.fit.teacher, fewstep.seeds)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import fewstep
from fewstep.errors import FewstepError
from fewstep.fit import TeacherData, TeacherSpec, default_teacher, generate_teacher, parse_teacher
from fewstep.fit.teacher import teacher_cache_dir, teacher_times
from fewstep.seeds import (
    EVAL_SEED_START,
    VAL_SEED_START,
    check_fit_seeds,
    eval_seeds,
    fit_seeds,
    val_seeds,
)

D = 4


class GaussEps(nn.Module):
    """Exact eps prediction for x0 ~ N(mu, diag(c^2)) under a VP schedule (t is the network time)."""

    def __init__(self, schedule: fewstep.Schedule, scale: float = 1.0) -> None:
        super().__init__()
        self.schedule = schedule
        self.register_buffer("mu", torch.tensor([0.5, -1.0, 0.0, 2.0]) * scale)
        self.register_buffer("c", torch.tensor([0.1, 0.5, 1.0, 2.0]))
        self.calls = 0
        self.fail_after: int | None = None  # raise KeyboardInterrupt once this many calls are done

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt
        self.calls += 1
        tt = t.double()[:, None]
        a, s = self.schedule.alpha(tt), self.schedule.sigma(tt)
        mu = self.mu.double()
        if "class_labels" in cond:
            mu = mu + cond["class_labels"].double()[:, None]
        var = a**2 * self.c.double() ** 2 + s**2
        return (s * (x.double() - a * mu) / var).to(x.dtype)


def make_model(scale: float = 1.0, conditional: bool = False) -> fewstep.Denoiser:
    sched = fewstep.VPLinear()
    sampler = (lambda seeds: {"class_labels": torch.tensor([s % 3 for s in seeds])}) if conditional else None
    return fewstep.Denoiser(
        GaussEps(sched, scale), sched, prediction="eps", sample_shape=(D,), name="gauss4", cond_sampler=sampler
    )


def folder_of(model, spec, keep_states, root):
    return teacher_cache_dir(model, spec, keep_states, root)


# ------------------------------------------------------------------------------------- seeds
def test_seed_ranges():
    assert fit_seeds(3) == range(0, 3)
    assert fit_seeds(2, start=10) == range(10, 12)
    assert val_seeds(2) == range(VAL_SEED_START, VAL_SEED_START + 2)
    assert eval_seeds(2) == range(EVAL_SEED_START, EVAL_SEED_START + 2)
    with pytest.raises(FewstepError, match="fit range"):
        fit_seeds(10, start=VAL_SEED_START - 5)
    with pytest.raises(FewstepError, match="EVAL_SEED_START"):
        eval_seeds(3, start=0)
    check_fit_seeds(fit_seeds(5))
    check_fit_seeds(val_seeds(5))
    check_fit_seeds([])
    for bad in (eval_seeds(2), [1, 2, EVAL_SEED_START + 7], range(EVAL_SEED_START + 4, 0, -1)):
        with pytest.raises(FewstepError, match="evaluation seed"):
            check_fit_seeds(bad)


def test_generate_refuses_eval_seeds(tmp_path):
    model = make_model()
    with pytest.raises(FewstepError, match="evaluation seed"):
        generate_teacher(model, [0, EVAL_SEED_START], cache_dir=tmp_path, progress=False)
    assert model.nfe == 0
    assert not (tmp_path / "teacher").exists()


# ------------------------------------------------------------------------------------- specs
def test_parse_teacher_roundtrip():
    s = parse_teacher("unipc@logsnr:20")
    assert s == TeacherSpec("unipc", "logsnr", 20)
    assert str(s) == "unipc@logsnr:20"
    assert parse_teacher(str(s)) == s
    assert parse_teacher(" euler @ time : 100 ") == TeacherSpec("euler", "time", 100)
    assert parse_teacher("ddim@uniform:100").grid == "time"  # aliases are normalised
    assert parse_teacher(s) is not None
    assert "@" not in s.key() and ":" not in s.key() and "/" not in s.key()
    assert s.key() != parse_teacher("unipc@logsnr:21").key()


@pytest.mark.parametrize(
    "bad",
    ["", "unipc", "unipc@logsnr", "unipc:20", "unipc@logsnr:", "@logsnr:20", "unipc@logsnr:20:3", "unipc@logsnr:x"],
)
def test_parse_teacher_malformed(bad):
    with pytest.raises(FewstepError, match="NAME@GRID:NFE") as e:
        parse_teacher(bad)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "bad,what",
    [
        ("nosuch@logsnr:20", "solver"),
        ("unipc@nosuch:20", "grid"),
        ("unipc@logsnr:0", "positive"),
        ("heun@karras:2", "heun"),
    ],
)
def test_parse_teacher_invalid_parts(bad, what):
    with pytest.raises(FewstepError, match=what):
        parse_teacher(bad)


def test_default_teachers():
    vp = make_model()
    assert str(default_teacher(vp)) == "unipc3@logsnr:40"
    flow = fewstep.Denoiser(lambda x, t: x, fewstep.Flow(), prediction="velocity", sample_shape=(D,))
    assert str(default_teacher(flow)) == "adams4@time:40"


# ------------------------------------------------------------------------------------- generation
def test_matches_direct_sampling(tmp_path):
    model = make_model()
    seeds = [3, 1, 4, 1, 5]
    data = generate_teacher(model, seeds, "unipc@logsnr:10", cache_dir=tmp_path, shard_size=4, progress=False)
    assert isinstance(data, TeacherData) and len(data) == 5 and data.seeds == seeds
    assert data.states is None and data.times is None and data.cond == {}
    assert str(data.spec) == "unipc@logsnr:10"
    want = fewstep.sample(model, model.noise(seeds), solver="unipc", nfe=10, grid="logsnr")
    torch.testing.assert_close(data.noise, model.noise(seeds), rtol=0, atol=0)
    torch.testing.assert_close(data.target, want, rtol=1e-6, atol=1e-6)


def test_cache_hit_does_not_recompute(tmp_path):
    model = make_model()
    spec = "unipc@logsnr:10"
    a = generate_teacher(model, fit_seeds(20), spec, cache_dir=tmp_path, shard_size=8, progress=False)
    n = model.nfe
    assert n == 3 * 10  # blocks [0, 8), [8, 16), [16, 24): one batch each
    b = generate_teacher(model, fit_seeds(20), spec, cache_dir=tmp_path, shard_size=8, progress=False)
    assert model.nfe == n
    assert torch.equal(a.target, b.target) and torch.equal(a.noise, b.noise)
    # any subset or order of cached seeds: still no model call, exactly the seeds asked for
    c = generate_teacher(model, [17, 2, 9], spec, cache_dir=tmp_path, shard_size=8, progress=False)
    assert model.nfe == n
    assert c.seeds == [17, 2, 9]
    assert torch.equal(c.target, a.target[[17, 2, 9]])
    # a different shard_size asked for later keeps the cache's own shard layout
    d = generate_teacher(model, fit_seeds(20), spec, cache_dir=tmp_path, shard_size=5, progress=False)
    assert model.nfe == n and torch.equal(d.target, a.target)


def test_partial_extension_computes_only_missing_shards(tmp_path):
    model = make_model()
    spec = "ddim@time:12"
    generate_teacher(model, fit_seeds(16), spec, cache_dir=tmp_path, shard_size=8, progress=False)
    assert model.nfe == 2 * 12
    more = generate_teacher(model, fit_seeds(30), spec, cache_dir=tmp_path, shard_size=8, progress=False)
    assert model.nfe == 4 * 12  # only [16, 24) and [24, 32) were new
    fresh = generate_teacher(
        make_model(), fit_seeds(30), spec, cache_dir=tmp_path / "other", shard_size=8, progress=False
    )
    assert torch.equal(more.target, fresh.target)
    man = json.loads((folder_of(model, spec, False, tmp_path) / "manifest.json").read_text())
    assert [e["seeds"] for e in man["shards"]] == [[0, 8], [8, 16], [16, 24], [24, 32]]
    assert man["teacher"] == spec and man["fingerprint"] == model.fingerprint()
    assert man["shard_size"] == 8 and man["schema"] == 1 and man["keep_states"] is False
    assert man["schedule"] == json.loads(json.dumps(model.schedule.config()))
    assert len(man["times"]) == 13


def test_interrupted_run_resumes(tmp_path):
    spec, seeds = "unipc@logsnr:8", fit_seeds(24)
    full = generate_teacher(
        make_model(),
        seeds,
        spec,
        keep_states=True,
        cache_dir=tmp_path / "full",
        shard_size=8,
        batch_size=4,
        progress=False,
    )

    model = make_model()
    model.net.fail_after = 8 * 2 + 3  # shard 1 (two batches of 4 = 16 calls) done, shard 2 in progress
    with pytest.raises(KeyboardInterrupt):
        generate_teacher(
            model, seeds, spec, keep_states=True, cache_dir=tmp_path / "cut", shard_size=8, batch_size=4, progress=True
        )
    folder = folder_of(model, spec, True, tmp_path / "cut")
    man = json.loads((folder / "manifest.json").read_text())
    assert [e["seeds"] for e in man["shards"]] == [[0, 8]]
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [
        "manifest.json",
        "seeds-0-8.safetensors",
    ]
    assert not list(folder.glob("*.tmp"))

    model.net.fail_after = None
    before = model.nfe
    resumed = generate_teacher(
        model, seeds, spec, keep_states=True, cache_dir=tmp_path / "cut", shard_size=8, batch_size=4, progress=False
    )
    assert model.nfe - before == 2 * 2 * 8  # shards 2 and 3 only (two batches of 8 NFE each)
    assert torch.equal(resumed.target, full.target)
    assert torch.equal(resumed.states, full.states)
    assert torch.equal(resumed.noise, full.noise)


def test_batch_size_independent(tmp_path):
    seeds = fit_seeds(40)
    a = generate_teacher(
        make_model(), seeds, "unipc@logsnr:10", cache_dir=tmp_path / "a", shard_size=64, batch_size=7, progress=False
    )
    b = generate_teacher(
        make_model(), seeds, "unipc@logsnr:10", cache_dir=tmp_path / "b", shard_size=64, batch_size=64, progress=False
    )
    torch.testing.assert_close(a.target, b.target, rtol=0, atol=1e-6)


def test_states_and_times(tmp_path):
    model = make_model()
    data = generate_teacher(
        model, [0, 5, 2], "ddim@time:10", keep_states=True, cache_dir=tmp_path, shard_size=4, progress=False
    )
    assert data.states.shape == (3, 11, D)
    assert data.times.dtype == torch.float64 and data.times.shape == (11,)
    torch.testing.assert_close(data.times, fewstep.make_grid(model.schedule, 10, "time"), rtol=0, atol=0)
    x, traj = fewstep.sample(model, model.noise([0, 5, 2]), solver="ddim", nfe=10, grid="time", return_trajectory=True)
    torch.testing.assert_close(data.states, torch.stack(traj, 1), rtol=1e-6, atol=1e-6)
    assert torch.equal(data.states[:, -1], data.target)
    torch.testing.assert_close(data.states[:, 0], data.noise * model.schedule.init_noise_scale())
    # reloaded from disk: same states and exactly the same float64 times
    again = generate_teacher(
        model, [2], "ddim@time:10", keep_states=True, cache_dir=tmp_path, shard_size=4, progress=False
    )
    assert torch.equal(again.states[0], data.states[2]) and torch.equal(again.times, data.times)
    # the states and final-only caches are separate folders
    generate_teacher(model, [2], "ddim@time:10", keep_states=False, cache_dir=tmp_path, progress=False)
    assert len(list((tmp_path / "teacher").iterdir())) == 2


def test_heun_states_one_per_step(tmp_path):
    model = make_model()
    data = generate_teacher(model, [1, 2], "heun@karras:9", keep_states=True, cache_dir=tmp_path, progress=False)
    assert data.states.shape == (2, 6, D)  # 9 NFE: 5 Heun steps
    torch.testing.assert_close(data.times, teacher_times(model, "heun@karras:9"), rtol=0, atol=0)
    assert data.times.shape == (6,)


def test_conditioning_is_cached(tmp_path):
    model = make_model(conditional=True)
    seeds = [0, 1, 2, 7]
    data = generate_teacher(model, seeds, "unipc@logsnr:10", cache_dir=tmp_path, shard_size=4, progress=False)
    assert torch.equal(data.cond["class_labels"], torch.tensor([0, 1, 2, 1]))
    want = fewstep.sample(model, model.noise(seeds), solver="unipc", nfe=10, grid="logsnr", cond=model.cond_for(seeds))
    torch.testing.assert_close(data.target, want, rtol=1e-6, atol=1e-6)
    n = model.nfe
    again = generate_teacher(model, [7, 0], "unipc@logsnr:10", cache_dir=tmp_path, shard_size=4, progress=False)
    assert model.nfe == n and torch.equal(again.cond["class_labels"], torch.tensor([1, 0]))


def test_other_model_or_teacher_never_reused(tmp_path):
    a, b = make_model(1.0), make_model(2.0)
    assert a.fingerprint() != b.fingerprint()
    da = generate_teacher(a, fit_seeds(4), "unipc@logsnr:10", cache_dir=tmp_path, progress=False)
    db = generate_teacher(b, fit_seeds(4), "unipc@logsnr:10", cache_dir=tmp_path, progress=False)
    assert b.nfe > 0 and not torch.allclose(da.target, db.target)
    dc = generate_teacher(a, fit_seeds(4), "unipc@logsnr:12", cache_dir=tmp_path, progress=False)
    assert not torch.equal(da.target, dc.target)
    assert len(list((tmp_path / "teacher").iterdir())) == 3
    # a manifest from another model copied into a's folder is refused on load
    fa = folder_of(a, "unipc@logsnr:10", False, tmp_path)
    fb = folder_of(b, "unipc@logsnr:10", False, tmp_path)
    (fa / "manifest.json").write_text((fb / "manifest.json").read_text())
    with pytest.raises(FewstepError, match="fingerprint") as e:
        generate_teacher(a, fit_seeds(4), "unipc@logsnr:10", cache_dir=tmp_path, progress=False)
    assert "\n" not in str(e.value)
    # and one from another teacher too
    man = json.loads((fb / "manifest.json").read_text())
    man["fingerprint"], man["teacher"] = a.fingerprint(), "ddim@time:10"
    (fa / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(FewstepError, match="teacher"):
        generate_teacher(a, fit_seeds(4), "unipc@logsnr:10", cache_dir=tmp_path, progress=False)


def test_damaged_shard_is_recomputed(tmp_path):
    model = make_model()
    a = generate_teacher(model, fit_seeds(8), "unipc@logsnr:10", cache_dir=tmp_path, shard_size=4, progress=False)
    shard = folder_of(model, "unipc@logsnr:10", False, tmp_path) / "seeds-4-8.safetensors"
    shard.write_bytes(b"garbage")
    n = model.nfe
    with pytest.warns(UserWarning, match="recomputing"):
        b = generate_teacher(model, fit_seeds(8), "unipc@logsnr:10", cache_dir=tmp_path, shard_size=4, progress=False)
    assert model.nfe == n + 10 and torch.equal(a.target, b.target)


def test_env_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "env"))
    model = make_model()
    generate_teacher(model, [0], "ddim@time:5", progress=False)
    assert (folder_of(model, "ddim@time:5", False, None) / "manifest.json").exists()
    assert str(folder_of(model, "ddim@time:5", False, None)).startswith(str(tmp_path / "env" / "teacher"))


def test_teacher_data_subset_and_to(tmp_path):
    data = generate_teacher(
        make_model(conditional=True), fit_seeds(6), "ddim@time:5", keep_states=True, cache_dir=tmp_path, progress=False
    )
    s = data[1:4]
    assert s.seeds == [1, 2, 3] and s.states.shape == (3, 6, D) and s.cond["class_labels"].tolist() == [1, 2, 0]
    t = data.subset([5, 0])
    assert t.seeds == [5, 0] and torch.equal(t.target, data.target[[5, 0]])
    m = data.subset(torch.tensor([True, False, False, False, False, True]))
    assert m.seeds == [0, 5]
    assert len(data[-1]) == 1 and data[-1].seeds == [5]
    with pytest.raises(FewstepError, match="out of range"):
        data.subset([6])
    moved = data.to("cpu", dtype=torch.float64)
    assert moved.target.dtype == torch.float64 and moved.times.dtype == torch.float64
    assert moved.cond["class_labels"].dtype == torch.int64


def test_bad_arguments(tmp_path):
    model = make_model()
    with pytest.raises(FewstepError, match="at least one seed"):
        generate_teacher(model, [], cache_dir=tmp_path, progress=False)
    with pytest.raises(FewstepError, match="shard_size"):
        generate_teacher(model, [0], cache_dir=tmp_path, shard_size=0, progress=False)
    with pytest.raises(FewstepError, match="NAME@GRID:NFE"):
        generate_teacher(model, [0], "unipc-20", cache_dir=tmp_path, progress=False)
