"""Fit options: DSS's forms and starts, learning rates per optimiser, losses, activation checkpointing,
and DSS's trajectory objective."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import fewstep
from fewstep import Flow, VPLinear
from fewstep.errors import FewstepError
from fewstep.fit.api import fit
from fewstep.fit.methods import FitConfig, dss_start_ok, from_classic, plan_phases
from fewstep.fit.objectives import FinalSample, StatesAndFinal, per_sample_loss
from fewstep.fit.teacher import generate_teacher
from fewstep.sampling import build_tableau
from fewstep.seeds import fit_seeds
from fewstep.solvers.learned import step_scales
from gauss import make_gauss

F64 = torch.float64
KW = dict(teacher="dpmpp_3m@logsnr:60", samples=64, val_samples=32, confirm_samples=32, progress=False, eval_every=10)


@pytest.fixture(scope="module")
def vp_model():
    return make_gauss(VPLinear(), "eps", d=6)


@pytest.fixture(scope="module")
def flow_model():
    return make_gauss(Flow(), "velocity", d=6)


@pytest.mark.parametrize(
    "start,basis",
    [("ddim@logsnr", "D"), ("dpmpp_2m@quadratic", "D"), ("euler@time", "v"), ("adams2@quadratic", "v"), (None, None)],
)
def test_dss_fits_in_the_vp_form_or_the_flow_form(vp_model, tmp_path, start, basis):
    res = fit(vp_model, "dss", 4, cache_dir=tmp_path, steps=20, start=start, **KW)
    start_tab = build_tableau(vp_model, res.doc["start"]["solver"], 4)
    assert res.doc["tableau"]["basis"] == start_tab.basis == (basis or start_tab.basis)  # the start's form
    assert start_tab.basis in ("D", "v") and start_tab.C is None
    assert res.doc["fit"]["optimizer"] == "lion" and res.doc["fit"]["lr_coef"] == 1e-2
    B = torch.tensor(res.doc["tableau"]["B"], dtype=F64)
    a, phi = step_scales(vp_model.schedule, torch.tensor(res.doc["grid"], dtype=F64), start_tab.basis)
    assert torch.allclose((B / phi[:, None]).sum(1), torch.ones(4, dtype=F64), atol=1e-9)  # rows sum to one
    assert torch.allclose(torch.tensor(res.doc["tableau"]["a"], dtype=F64), a, atol=1e-12)  # the form's a_i


def test_dss_refuses_a_start_outside_its_forms(vp_model, flow_model, tmp_path):
    with pytest.raises(FewstepError, match="predicts noise"):
        fit(vp_model, "dss", 4, cache_dir=tmp_path, steps=5, start="ipndm@time", **KW)  # noise prediction
    tab = build_tableau(flow_model, "adams3@time", 5)  # its last steps use three evaluations
    assert not dss_start_ok(flow_model, tab)
    with pytest.raises(FewstepError, match="leaves out"):
        from_classic(flow_model, tab, "dss", rows_sum_to_one=True)
    assert dss_start_ok(flow_model, build_tableau(flow_model, "adams2@time", 5))
    assert dss_start_ok(vp_model, build_tableau(vp_model, "dpmpp_3m@logsnr", 6))  # lower order at the end
    assert not dss_start_ok(vp_model, build_tableau(vp_model, "unipc@logsnr", 6))  # a corrector


def test_learning_rates_follow_the_optimiser_unless_given():
    dss, polish = plan_phases(FitConfig(method="dss", steps=10))
    assert dss.optimizer == "lion" and dss.lrs == {"grid": 1e-2, "coef": 1e-2} and dss.batch >= 32
    assert polish.lrs == {"grid": 1e-3, "coef": 1e-3} and (dss.steps, polish.steps) == (8, 2)  # its default quarter
    dss, _ = plan_phases(FitConfig(method="dss", steps=10, lr_coef=0.003, lr_grid=0.004))
    assert dss.lrs == {"grid": 0.004, "coef": 0.003}  # the user's rates reach DSS
    grid, coef = plan_phases(FitConfig(method="s4s-alt", steps=300))[:2]
    assert grid.optimizer == "adam" and grid.lrs == {"grid": 5e-2} and coef.lrs == {"coef": 3e-2}
    (s4s,) = plan_phases(FitConfig(method="s4s", steps=10, optimizer="lion"))
    assert s4s.lrs == {"coef": 1e-2}


def test_losses_l1_and_a_user_callable(vp_model, tmp_path):
    x = torch.tensor([[0.0, 3.0], [1.0, 1.0]], dtype=F64)
    y = torch.tensor([[0.0, 0.0], [0.0, 0.0]], dtype=F64)
    assert torch.allclose(per_sample_loss("l1")(x, y), torch.tensor([1.5, 1.0], dtype=F64))
    assert torch.allclose(per_sample_loss("mse")(x, y), torch.tensor([4.5, 1.0], dtype=F64))
    assert torch.allclose(per_sample_loss("l2")(x, y), torch.tensor([4.5, 1.0], dtype=F64).sqrt())
    calls = []

    def huberish(student, target):
        calls.append(student.shape[0])
        return torch.nn.functional.smooth_l1_loss(student, target, reduction="none", beta=0.01).flatten(1).mean(1)

    res = fit(
        vp_model,
        "s4s",
        4,
        cache_dir=tmp_path,
        steps=30,
        start="ddim@logsnr",
        loss=huberish,
        batch=20,
        screen_seeds=1,
        **KW,
    )  # one batch order: no screening runs beside the fit
    assert len(calls) == 30 and set(calls) == {20}  # every step, on the batch
    assert res.doc["fit"]["loss"] == "huberish"
    assert res.doc["validation"]["rmse_to_teacher"] < res.doc["validation"]["start_rmse_to_teacher"]
    res = fit(vp_model, "s4s", 4, cache_dir=tmp_path, steps=30, start="ddim@logsnr", loss="l1", **KW)
    assert res.doc["validation"]["rmse_to_teacher"] < res.doc["validation"]["start_rmse_to_teacher"]
    with pytest.raises(FewstepError, match="unknown loss"):
        fit(vp_model, "s4s", 4, cache_dir=tmp_path, steps=3, loss="lpips", **KW)


def _grads(model, solver, data, idx, dss_weights, use_checkpoint):
    solver.zero_grad()
    for p in solver.parameters():
        p.requires_grad_(True)
    objective = FinalSample() if dss_weights is None else StatesAndFinal(*dss_weights)
    L = objective(model, solver, data, idx, data.noise[idx], per_sample_loss("l2"), use_checkpoint)
    L.backward()
    return float(L.detach()), {n: p.grad.clone() for n, p in solver.named_parameters() if p.grad is not None}


def test_activation_checkpointing_gives_the_same_gradients(vp_model, tmp_path):
    data = generate_teacher(
        vp_model, fit_seeds(16), "dpmpp_3m@logsnr:60", keep_states=True, cache_dir=tmp_path, progress=False
    )
    s = from_classic(vp_model, build_tableau(vp_model, "unipc@logsnr", 5), "s4s-alt", decouple=0.1)
    idx = torch.arange(16)
    for w in (None, (1.0, 1000.0)):
        L0, g0 = _grads(vp_model, s, data, idx, w, False)
        L1, g1 = _grads(vp_model, s, data, idx, w, True)
        assert L0 == L1 and g0.keys() == g1.keys()
        for n in g0:
            assert torch.allclose(g0[n], g1[n], rtol=1e-12, atol=1e-15), n


def test_dss_trajectory_term_pulls_the_states_to_the_teachers(vp_model, tmp_path):
    data = generate_teacher(
        vp_model, fit_seeds(16), "ddim@time:100", keep_states=True, cache_dir=tmp_path, progress=False
    )
    s = from_classic(vp_model, build_tableau(vp_model, "ddim@time", 5), "dss", rows_sum_to_one=True)
    idx = torch.arange(16)
    L_traj, g_traj = _grads(vp_model, s, data, idx, (1.0, 0.0), False)
    L_final, _ = _grads(vp_model, s, data, idx, (0.0, 1000.0), False)
    L_both, _ = _grads(vp_model, s, data, idx, (1.0, 1000.0), False)
    assert L_traj > 0 and g_traj["W"].abs().max() > 0  # the intermediate states carry a loss and a gradient
    assert L_both == pytest.approx(L_traj + L_final, rel=1e-6)  # teacher data are float32
    # DDIM on the teacher's own grid (every 20th of its 100 uniform steps) has a small state error
    s100 = from_classic(vp_model, build_tableau(vp_model, "ddim@time", 100), "dss", rows_sum_to_one=True)
    L_100, _ = _grads(vp_model, s100, data, idx, (1.0, 0.0), False)
    assert L_100 < 1e-12 < L_traj


def test_a_multi_scale_fit_without_out_samples_from_memory(tmp_path):
    # the in-memory result of a fit across scales samples without a parameters file (found by
    # benchmarks/multiscale.py)
    from fewstep.specs import load_model

    m = load_model("zoo:gmm", classes="all", guidance="2,3")
    res = fit(
        m,
        "s4s-alt",
        4,
        samples=32,
        val_samples=16,
        confirm_samples=16,
        steps=8,
        eval_every=4,
        progress=False,
        cache_dir=tmp_path,
        start="ddim@logsnr",
        screen_seeds=1,
    )
    assert res.path is None and res.solver.guidance_range == (2.0, 3.0)
    at = load_model("zoo:gmm", classes="all", guidance="2.5")
    x = fewstep.sample(
        at, at.noise(list(range(1_000_000, 1_000_004))), res.solver, cond=at.cond_for(list(range(1_000_000, 1_000_004)))
    )
    assert x.shape == (4, *at.sample_shape) and torch.isfinite(x).all()


@dataclass(frozen=True)
class _CountedFinalSample:
    """The final-sample objective, recording each call: (rows, teacher states present, noise moved off the rows')."""

    calls: list

    @property
    def needs_states(self) -> bool:
        return True

    def __call__(self, model, solver, train, idx, noise, loss, use_checkpoint):
        moved = bool((noise != train.noise[idx]).any())
        self.calls.append((idx.numel(), train.states is not None, moved))
        return FinalSample()(model, solver, train, idx, noise, loss, use_checkpoint)


def test_a_new_method_is_one_registry_entry(vp_model, tmp_path, monkeypatch):
    # every behaviour of a method flows from its entry: sizes, phases, optimiser and rates, the batch floor, the
    # solver's form, the relaxation, the objective and the teacher states it needs
    from fewstep.fit import methods, registry
    from fewstep.fit.config import Sizes

    calls = []
    entry = registry.FitMethod(
        "grid-then-coef",
        "a grid phase, then a coefficient phase",
        sizes=Sizes(samples=48, val_samples=24, confirm_samples=24, batch=12, steps=16),
        phases=lambda p: registry.grid(p) + registry.coefficients(p),
        form=registry.SolverForm(corrector=True, settable=frozenset()),
        optimizer="lion",
        min_batch=16,
        relax=0.02,
        objective=_CountedFinalSample(calls),
    )
    monkeypatch.setitem(registry.METHODS, entry.name, entry)
    kw = dict(teacher="dpmpp_3m@logsnr:60", start="ddim@logsnr", screen_seeds=1, eval_every=4, progress=False)
    res = fit(vp_model, entry.name, 4, cache_dir=tmp_path, corrector=False, **kw)
    f = res.doc["fit"]
    assert res.doc["method"] == entry.name and (f["samples"], f["batch"], f["steps"]) == (48, 12, 16)
    assert f["optimizer"] == "lion" and (f["lr_coef"], f["lr_grid"]) == (1e-2, 1e-2)
    assert res.outcome.state.step == 32 and len(calls) == 32  # both phases, one objective call a step
    assert all(n == 16 and states for n, states, _ in calls)  # the batch floor; the teacher kept its states
    assert any(moved for _, _, moved in calls[1:])  # the relaxed latents moved the noises
    cfg = registry.resolve(registry.method_defaults(entry.name, 4).with_options(corrector=False))
    cand = methods._candidate(vp_model, cfg, "ddim@logsnr", 0)
    assert cand.relax is not None and cand.relax.r == 0.02  # the entry's ball
    assert cand.solver.V is not None  # a corrector, which the settings cannot turn off (not settable)
    assert [p.label for p in registry.plan_phases(cfg)] == ["grid", "coef"]


def test_polish_ends_any_method_with_its_groups_at_a_tenth_of_the_rates():
    *rest, last = plan_phases(FitConfig(method="dss", steps=100, polish=0.2))
    assert [p.steps for p in rest] == [80] and last.label == "polish" and last.steps == 20
    assert last.lrs == {"grid": 1e-3, "coef": 1e-3} and last.optimizer == "lion" and last.batch == rest[0].batch
    *rest, last = plan_phases(FitConfig(method="s4s", steps=50, polish=0.5))
    assert [p.steps for p in rest] == [25] and last.lrs == {"coef": 3e-3}  # only what the method moves
    *rest, last = plan_phases(FitConfig(method="s4s-alt", steps=300, rounds=2, polish=0.25))
    assert [p.steps for p in rest] == [56] * 4 and last.steps == 75 and last.lrs == {"grid": 5e-3, "coef": 3e-3}
    assert all(p.label != "polish" for p in plan_phases(FitConfig(method="dss", steps=100, polish=0.0)))
    for bad in (1.0, -0.1, "0.2", True):
        with pytest.raises(FewstepError, match="polish must be"):
            FitConfig(method="dss", polish=bad).check()


def test_a_method_may_default_to_a_finer_teacher(vp_model, flow_model):
    from fewstep.fit.api import fit_plan

    assert str(fit_plan(vp_model, "s4s-alt", 5)[1]) == "unipc3@logsnr:40"  # the schedule's default
    assert str(fit_plan(vp_model, "ld3", 5)[1]) == "unipc3@logsnr:100"  # LD3's own
    assert str(fit_plan(flow_model, "ld3", 5)[1]) == "adams4@time:100"
    assert str(fit_plan(vp_model, "ld3", 5, teacher="ddim@time:30")[1]) == "ddim@time:30"  # a given one wins
