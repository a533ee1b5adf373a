"""Learned solvers: exact start, gradients, monotone grids, relaxed latents, fits that help, artifacts."""

from __future__ import annotations

import json

import pytest
import torch

from fewstep import Flow, VPLinear, sample
from fewstep.errors import ArtifactError, FewstepError
from fewstep.fit.api import fit
from fewstep.fit.config import Phase
from fewstep.fit.loop import FitSession, Relax, optimise
from fewstep.fit.methods import FitConfig, from_classic, plan_phases
from fewstep.fit.teacher import generate_teacher
from fewstep.sampling import build_tableau
from fewstep.seeds import fit_seeds, val_seeds
from fewstep.solvers.artifact import load_solver
from gauss import make_gauss

F64 = torch.float64


@pytest.fixture(scope="module")
def vp_model():
    return make_gauss(VPLinear(), "eps", d=6)


@pytest.mark.parametrize(
    "start,method",
    [("unipc@logsnr", "s4s"), ("ipndm@time", "s4s"), ("dpmpp_2m@quadratic", "dss"), ("ddim@logsnr", "dss")],
)
def test_learned_solver_starts_exactly_at_its_classic_solver(vp_model, start, method):
    noise = torch.randn(8, 6, generator=torch.Generator().manual_seed(0), dtype=F64)
    tab = build_tableau(vp_model, start, 6)
    s = from_classic(vp_model, tab, method, rows_sum_to_one=(method == "dss"), decouple=0.1)
    with torch.no_grad():
        a = sample(vp_model, noise, start, nfe=6)
        b = sample(vp_model, noise, s)
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_flow_dss_starts_at_euler():
    m = make_gauss(Flow(), "velocity", d=6)
    noise = torch.randn(8, 6, dtype=F64)
    s = from_classic(m, build_tableau(m, "euler@time", 5), "dss", rows_sum_to_one=True)
    assert torch.allclose(sample(m, noise, "euler@time", nfe=5), sample(m, noise, s), atol=1e-12)


def test_gradients_reach_every_learned_parameter(vp_model):
    tab = build_tableau(vp_model, "unipc@logsnr", 5)
    s = from_classic(vp_model, tab, "s4s-alt", decouple=0.1)
    with torch.no_grad():
        s.delta.add_(0.1)  # away from tanh's symmetric point
    noise = torch.randn(16, 6, dtype=F64)
    target = vp_model.flow_map(noise, 1.0, 0.0)
    loss = (sample(vp_model, noise, s) - target).pow(2).mean()
    loss.backward()
    for name, p in (("grid logits", s.r), ("eval offsets", s.delta), ("predictor", s.W), ("corrector", s.V)):
        g = p.grad
        assert g is not None and torch.isfinite(g).all(), name
        free = g[1:] if name == "eval offsets" else g  # c_0 = t_0 is fixed
        if name == "predictor":
            free = g[s.mask]
        if name == "corrector":  # the last corrected state is multiplied by sigma_N / sigma_{N-1} = 0
            free = g[:-2][s.V_mask[:-2]]
        assert (free.abs() > 0).float().mean() > 0.9, (name, g)


def test_grid_gradient_matches_finite_differences(vp_model):
    s = from_classic(vp_model, build_tableau(vp_model, "dpmpp_2m@logsnr", 5), "ld3", decouple=0.1)
    noise = torch.randn(8, 6, generator=torch.Generator().manual_seed(2), dtype=F64)
    target = vp_model.flow_map(noise, 1.0, 0.0)

    def L():
        return (sample(vp_model, noise, s) - target).pow(2).mean()

    L().backward()
    g = s.r.grad.clone()
    for k in range(5):
        with torch.no_grad():
            old = float(s.r[k])
            s.r[k] = old + 1e-6
            lp = float(L())
            s.r[k] = old - 1e-6
            lm = float(L())
            s.r[k] = old
        fd = (lp - lm) / 2e-6
        assert abs(fd - float(g[k])) <= 1e-4 * max(1.0, abs(fd)) + 0.05 * abs(fd), (k, fd, float(g[k]))


@pytest.mark.parametrize("nfe", [3, 6])
def test_learned_grid_stays_monotone_and_inside(vp_model, nfe):
    s = from_classic(vp_model, build_tableau(vp_model, "ddim@logsnr", nfe), "ld3", decouple=0.2)
    with torch.no_grad():
        s.r.copy_(torch.randn(nfe, generator=torch.Generator().manual_seed(nfe), dtype=F64) * 20)
        s.delta.copy_(torch.randn(nfe, dtype=F64) * 50)
    tab = s.tableau()
    t, c = tab.t.detach(), tab.eval_times.detach()
    assert float(t[0]) == 1.0 and float(t[-1]) == 0.0
    assert torch.all(t[1:] < t[:-1])  # strictly, even where the softmax underflows
    assert torch.all(c[1:] < c[:-1])  # evaluation times stay in order
    assert torch.all(c[1:] > t[2:]) and torch.all(c[1:] < t[:-2])  # inside the neighbouring steps
    steps = t[:-1] - t[1:]
    d = c - t[:-1]
    assert torch.all(d[1:].abs() <= 0.2 * steps[1:] + 1e-15) and float(d[0]) == 0.0


@pytest.fixture(scope="module")
def data(vp_model, tmp_path_factory):
    cache = tmp_path_factory.mktemp("teacher")
    tr = generate_teacher(
        vp_model, fit_seeds(96), "dpmpp_3m@logsnr:60", keep_states=True, cache_dir=cache, progress=False
    )
    va = generate_teacher(vp_model, val_seeds(48), "dpmpp_3m@logsnr:60", cache_dir=cache, progress=False)
    return tr, va


def test_relaxed_latents_stay_in_their_ball(vp_model, data):
    tr, va = data
    s = from_classic(vp_model, build_tableau(vp_model, "ddim@logsnr", 4), "ld3")
    relax = Relax(0.05, lr=2.0)
    optimise(
        FitSession(vp_model, s, tr, va, FitConfig(eval_every=10), relax), Phase("grid", {"grid": 0.05}, 30, batch=16)
    )
    radius = relax.radius(vp_model, 6)
    norms = relax.offsets.flatten(1).norm(dim=1)
    assert float(norms.max()) <= radius * (1 + 1e-6)
    assert float(norms.max()) > 0.5 * radius  # the latents did move: the constraint is active


def test_relaxed_latents_persist_across_phases(vp_model, data):
    tr, va = data
    s = from_classic(vp_model, build_tableau(vp_model, "ddim@logsnr", 4), "s4s-alt", decouple=0.1)
    relax = Relax(0.05, lr=2.0)
    optimise(
        FitSession(vp_model, s, tr, va, FitConfig(eval_every=6, seed=1), relax),
        Phase("grid", {"grid": 0.05}, 12, batch=16),
    )
    after_grid = relax.offsets.clone()
    moved = after_grid.flatten(1).norm(dim=1) > 0
    assert moved.any()
    optimise(
        FitSession(vp_model, s, tr, va, FitConfig(eval_every=2, seed=2), relax),
        Phase("coef", {"coef": 0.03}, 2, batch=16),
    )
    touched = relax.offsets.ne(after_grid).flatten(1).any(1)
    keep = moved & ~touched  # latents the second phase did not draw: exactly as the first left them
    assert keep.any() and torch.equal(relax.offsets[keep], after_grid[keep])
    assert touched.any()


@pytest.mark.parametrize("method", ["s4s", "s4s-alt", "ld3", "dss"])
def test_small_fit_improves_on_its_start_on_held_out_noise(vp_model, tmp_path, method):
    res = fit(
        vp_model,
        method,
        4,
        out=tmp_path / method,
        teacher="dpmpp_3m@logsnr:60",
        samples=96,
        val_samples=48,
        progress=False,
        cache_dir=tmp_path / "cache",
        steps=120,
        start="ddim@logsnr",
        eval_every=20,
    )
    held = torch.randn(128, 6, generator=torch.Generator().manual_seed(10**6), dtype=F64)
    exact = vp_model.flow_map(held, 1.0, 0.0)
    with torch.no_grad():
        e_start = float((sample(vp_model, held, "ddim@logsnr", nfe=4) - exact).pow(2).mean().sqrt())
        e_fit = float((sample(vp_model, held, res.solver) - exact).pow(2).mean().sqrt())
    v = res.doc["validation"]
    assert not v["kept_start"] and v["confirm_rmse_to_teacher"] < v["confirm_start_rmse_to_teacher"]
    e = v["estimate"]  # the fit's estimate is on the noises nothing was chosen on, with its standard error
    assert e["on"] == "confirmation" and e["noises"] == 200 and e["rmse_to_teacher"] == v["confirm_rmse_to_teacher"]
    assert (
        0 < e["sem"] < 0.5 * e["rmse_to_teacher"] and e["start_rmse_to_teacher"] == v["confirm_start_rmse_to_teacher"]
    )
    assert res.doc["teacher"]["confirm_seeds"] == [500_048, 500_248]  # after the validation block
    assert e_fit < 0.9 * e_start, (method, e_start, e_fit)


def test_fit_never_ends_worse_than_its_start(vp_model, tmp_path):
    # a learning rate that wrecks the solver: the fit must hand back its start
    res = fit(
        vp_model,
        "s4s",
        4,
        teacher="dpmpp_3m@logsnr:60",
        samples=64,
        val_samples=32,
        progress=False,
        cache_dir=tmp_path,
        steps=20,
        start="unipc@logsnr",
        lr_coef=50.0,
        eval_every=5,
    )
    noise = torch.randn(16, 6, dtype=F64)
    with torch.no_grad():
        a = sample(vp_model, noise, "unipc@logsnr", nfe=4)
        b = sample(vp_model, noise, res.solver)
    v = res.doc["validation"]
    assert v["rmse_to_teacher"] <= v["start_rmse_to_teacher"]
    assert v["confirm_rmse_to_teacher"] <= v["confirm_start_rmse_to_teacher"]  # decided on unseen noises
    assert v["kept_start"] is True  # nothing the wrecked fit found beats the start
    assert torch.allclose(a, b, atol=1e-12)  # ... so the artifact samples exactly as the start


def test_artifact_round_trips_bit_exact_and_refuses_other_models(vp_model, tmp_path):
    res = fit(
        vp_model,
        "s4s-alt",
        4,
        out=tmp_path / "art",
        teacher="dpmpp_3m@logsnr:60",
        samples=64,
        val_samples=32,
        progress=False,
        cache_dir=tmp_path / "c",
        steps=40,
        start="unipc@logsnr",
        eval_every=10,
    )
    doc = json.loads((tmp_path / "art" / "solver.json").read_text())
    assert doc["schema"] == "fewstep.solver/1" and doc["nfe"] == 4 and doc["method"] == "s4s-alt"
    assert doc["model"]["fingerprint"] == vp_model.fingerprint()
    loaded = load_solver(tmp_path / "art")
    t1, t2 = res.solver.tableau(vp_model), loaded.tableau(vp_model)
    for a, b in ((t1.t, t2.t), (t1.a, t2.a), (t1.B, t2.B), (t1.C, t2.C), (t1.eval_times, t2.eval_times)):
        assert torch.equal(a, b)
    noise = torch.randn(8, 6, dtype=F64)
    assert torch.equal(sample(vp_model, noise, res.solver), sample(vp_model, noise, loaded))
    other = make_gauss(VPLinear(), "eps", d=6, seed=1)
    with pytest.raises(ArtifactError, match="fitted for model .* not this one"):
        sample(other, noise, loaded)
    with pytest.raises(ArtifactError, match="schedule"):
        sample(make_gauss(VPLinear(beta_max=10.0), "eps", d=6), noise, loaded)
    forced = load_solver(tmp_path / "art", force=True)
    assert sample(other, noise, forced).shape == noise.shape


def test_artifact_keeps_its_parameters_and_a_fit_can_refine_it(vp_model, tmp_path):
    kw = dict(
        teacher="dpmpp_3m@logsnr:60",
        samples=64,
        val_samples=32,
        progress=False,
        cache_dir=tmp_path / "c",
        eval_every=10,
    )
    first = fit(vp_model, "s4s-alt", 4, out=tmp_path / "a", steps=40, start="unipc@logsnr", **kw)
    assert first.doc["params"] == "params.safetensors" and (tmp_path / "a" / "params.safetensors").is_file()
    s = load_solver(tmp_path / "a").learned()  # the trainable solver: its tables are the artifact's, exactly
    with torch.no_grad():
        tab = s.tableau()
    assert torch.equal(tab.B, first.solver.tableau().B) and torch.equal(tab.t, first.solver.tableau().t)
    again = fit(vp_model, "s4s-alt", 4, out=tmp_path / "b", steps=40, start=str(tmp_path / "a"), **kw)
    v0, v1 = first.doc["validation"], again.doc["validation"]
    assert v1["start_rmse_to_teacher"] == pytest.approx(v0["rmse_to_teacher"], rel=1e-9)  # starts where it ended
    assert v1["rmse_to_teacher"] <= v1["start_rmse_to_teacher"]
    assert again.doc["start"]["solver"] == str(tmp_path / "a")
    with pytest.raises(FewstepError, match="refine it with --method s4s-alt --nfe 4"):
        fit(vp_model, "s4s", 4, steps=5, start=str(tmp_path / "a"), **kw)
    (tmp_path / "a" / "params.safetensors").write_bytes(b"junk")
    with pytest.raises(ArtifactError, match="not a readable fewstep solver-parameter file"):
        load_solver(tmp_path / "a").learned()


def test_damaged_artifacts_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "solver.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_solver(tmp_path / "a")
    (tmp_path / "a" / "solver.json").write_text(json.dumps({"schema": "other"}))
    with pytest.raises(ArtifactError, match="not a fewstep solver"):
        load_solver(tmp_path / "a")
    with pytest.raises(ArtifactError, match="no learned solver"):
        load_solver(tmp_path / "missing")


@pytest.mark.parametrize("method", ["s4s-alt", "dss", "ld3"])
def test_interrupted_fit_resumes_to_the_uninterrupted_result(vp_model, tmp_path, kill_at_call, method):
    kw = dict(
        teacher="dpmpp_3m@logsnr:60",
        samples=64,
        val_samples=32,
        progress=False,
        cache_dir=tmp_path / "c",
        steps=48,
        start="ddim@logsnr",
        eval_every=8,
        rounds=2,
    )
    whole = fit(vp_model, method, 4, out=tmp_path / "whole", **kw)
    with pytest.raises(KeyboardInterrupt):
        kill_at_call(21, lambda: fit(vp_model, method, 4, out=tmp_path / "cut", **kw))
    assert (tmp_path / "cut" / "fit-checkpoint.safetensors").is_file()
    assert not (tmp_path / "cut" / "solver.json").exists()
    again = fit(vp_model, method, 4, out=tmp_path / "cut", **kw)
    assert 8 <= again.doc["timing"]["resumed_from_step"] <= 20  # the last checkpoint before the kill
    assert not (tmp_path / "cut" / "fit-checkpoint.safetensors").exists()  # removed once the artifact is written
    assert again.doc["tableau"] == whole.doc["tableau"]  # bit-exact: same batches, same optimizer state
    assert again.doc["history"] == whole.doc["history"]


def test_a_checkpoint_for_other_settings_is_not_resumed(vp_model, tmp_path, kill_at_call):
    kw = dict(
        teacher="dpmpp_3m@logsnr:60",
        samples=64,
        val_samples=32,
        progress=False,
        cache_dir=tmp_path / "c",
        start="ddim@logsnr",
        eval_every=8,
    )
    with pytest.raises(KeyboardInterrupt):
        kill_at_call(12, lambda: fit(vp_model, "s4s", 4, out=tmp_path / "a", steps=40, **kw))
    res = fit(vp_model, "s4s", 4, out=tmp_path / "a", steps=24, **kw)  # another step count: another fit
    assert res.doc["timing"]["resumed_from_step"] == 0


def test_clearly_better_is_a_paired_test():
    from fewstep.fit.loop import clearly_better

    g = torch.Generator().manual_seed(0)
    old = torch.rand(200, generator=g, dtype=F64)
    assert clearly_better(old * 0.8, old)
    assert not clearly_better(old, old)
    noisy = old + 0.3 * torch.randn(200, generator=g, dtype=F64)  # lower mean by luck only
    noisy = noisy - float((noisy - old).mean()) - 0.005
    assert float(noisy.mean()) < float(old.mean()) and not clearly_better(noisy, old)


@pytest.mark.parametrize("steps,rounds,per", [(2000, 8, 125), (300, 4, 37), (60, 1, 30), (1000, 8, 62)])
def test_s4s_alt_rounds_adapt_to_the_step_budget(steps, rounds, per):
    phases = plan_phases(FitConfig(method="s4s-alt", steps=steps, polish=0.0))
    assert len(phases) == 2 * rounds and {p.steps for p in phases} == {per}
    assert [p.label for p in phases[:2]] == ["round 1 grid", "round 1 coef"]
    assert len(plan_phases(FitConfig(method="s4s-alt", steps=steps, rounds=3, polish=0.0))) == 6  # explicit wins
    *alternation, polish = plan_phases(FitConfig(method="s4s-alt", steps=steps))  # by default a quarter polishes
    assert len(alternation) == 2 * rounds and polish.label == "polish" and polish.steps == steps // 4
