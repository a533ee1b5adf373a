"""What a fit costs: network evaluations counted exactly where the network is called, budgets that are never
exceeded, micro-batches that give the full batch's gradient, half precision that keeps the solver in float32."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import fewstep
from fewstep import VPLinear
from fewstep.errors import FewstepError
from fewstep.fit.api import fit, fit_plan
from fewstep.fit.budget import plan_for, predicted
from fewstep.fit.config import Sizes
from fewstep.fit.registry import method_info
from gauss import GaussNet, make_gauss

F64 = torch.float64
SPEC = "dpmpp_3m@logsnr:40"


class Counting(GaussNet):
    """The exact Gaussian network, counting the samples it sees, forward and backward, itself."""

    def forward(self, x, t_net, **cond):
        self.forward_rows += x.shape[0]
        self.largest = max(getattr(self, "largest", 0), x.shape[0])
        out = super().forward(x, t_net)
        if out.requires_grad:
            n = x.shape[0]
            out.register_hook(lambda g: setattr(self, "backward_rows", self.backward_rows + n))
        return out


def counting_model(guided: bool = False) -> fewstep.Denoiser:
    m = make_gauss(VPLinear(), "eps", d=6)
    m.net.__class__ = Counting
    m.net.forward_rows = m.net.backward_rows = 0
    if guided:  # a guided call runs cond and uncond in one batch: 2 rows, 1 evaluation per sample
        m.guidance_scale, m.uncond = 1.5, {}
    return m


@pytest.mark.parametrize("guided", [False, True])
def test_a_fits_evaluations_are_counted_exactly(tmp_path, guided):
    m = counting_model(guided)
    res = fit(
        m,
        "s4s",
        4,
        teacher=SPEC,
        samples=48,
        val_samples=24,
        confirm_samples=24,
        steps=12,
        batch=16,
        eval_every=6,
        progress=False,
        cache_dir=tmp_path,
        start="unipc@logsnr",
        screen_seeds=1,
    )
    c, net = res.doc["cost"], m.net
    rows = 2 if guided else 1
    # everything the network saw, teacher included (computed in this run: a fresh cache)
    assert c["teacher"]["computed_now"] == c["teacher"]["forward_evals"] == 2 * 128 * 40  # two whole shards
    assert c["teacher"]["forward_evals"] + c["fit"]["forward_evals"] == net.forward_rows // rows
    # every student evaluation but the first: with the grid fixed (s4s), F_0 at the noise needs no backward
    assert c["fit"]["backward_evals"] == net.backward_rows // rows == 12 * 16 * 3
    assert c["fit"]["network_rows"] == rows * c["fit"]["forward_evals"]
    assert c["total_evals"] == c["teacher"]["forward_evals"] + c["fit"]["forward_evals"] + c["fit"]["backward_evals"]
    assert c["peak_memory_mib"] > 0 and c["memory"] == "process peak RSS" and c["wall_s"] > 0
    # the teacher's shards remember what they cost: a second fit on the cached teacher counts it, computes nothing
    before = net.forward_rows
    again = fit(
        m,
        "s4s",
        4,
        teacher=SPEC,
        samples=48,
        val_samples=24,
        confirm_samples=24,
        steps=12,
        batch=16,
        eval_every=6,
        progress=False,
        cache_dir=tmp_path,
        start="unipc@logsnr",
        screen_seeds=1,
    )
    assert again.doc["cost"]["teacher"]["computed_now"] == 0
    assert again.doc["cost"]["teacher"]["forward_evals"] == c["teacher"]["forward_evals"]
    assert net.forward_rows - before == rows * again.doc["cost"]["fit"]["forward_evals"]


@pytest.mark.parametrize("budget", [60_000, 150_000, 400_000])
def test_a_budget_is_never_exceeded(tmp_path, budget):
    m = counting_model()
    res = fit(m, "s4s-alt", 4, teacher=SPEC, budget=budget, progress=False, cache_dir=tmp_path / str(budget))
    c = res.doc["cost"]
    assert c["budget"] == budget and c["total_evals"] <= budget
    assert c["total_evals"] >= 0.5 * budget  # sized to use it, not to leave most of it
    # counted at the network, not by formula
    assert c["teacher"]["forward_evals"] + c["fit"]["forward_evals"] == m.net.forward_rows
    f = res.doc["fit"]
    shapes = [dataclasses.asdict(s) for s in method_info("s4s-alt").shapes]
    # one of the method's measured shapes (its noises and batch), with the steps the budget pays for
    chosen = [s for s in shapes if (s["samples"], s["batch"]) == (f["samples"], f["batch"])]
    assert chosen and f["steps"] >= chosen[0]["steps"] or f["samples"] <= shapes[0]["samples"]


def test_the_cap_holds_when_the_plan_is_wrong(tmp_path, monkeypatch):
    import fewstep.fit.api as api

    m = counting_model()
    real = api.plan_for
    monkeypatch.setattr(api, "plan_for", lambda budget, *a, **k: real(budget * 4, *a, **k))  # a plan four times too big
    res = fit(m, "s4s", 4, teacher=SPEC, budget=120_000, progress=False, cache_dir=tmp_path, start="unipc@logsnr")
    assert res.doc["cost"]["total_evals"] <= 120_000
    assert res.outcome.state.exhausted


def test_a_budget_too_small_names_the_smallest_that_works():
    m = counting_model()
    with pytest.raises(FewstepError, match=r"--budget 1,000 is too small .* costs [\d,]+ network evaluations") as e:
        fit_plan(m, "s4s-alt", 5, teacher=SPEC, budget=1000)
    smallest = int(str(e.value).split("costs ")[1].split(" ")[0].replace(",", ""))
    cfg = fit_plan(m, "s4s-alt", 5, teacher=SPEC, budget=smallest)[0].sizes  # that one works
    assert cfg.steps >= 1


def test_the_budget_plan_predicts_its_parts():
    cfg, _ = fit_plan(counting_model(), "s4s", 5, teacher=SPEC, start="ddim@logsnr", screen_seeds=1)
    p = predicted(cfg, Sizes(100, 50, 20, 10, 30), 40, 0)
    assert p.teacher == 170 * 40 and p.start == 0 and p.training == 30 * 10 * 5 * 2
    assert p.confirmation == 2 * 20 * 5 and p.total == p.teacher + p.training + p.validation + p.confirmation
    sized = plan_for(p.total, cfg, Sizes(100, 50, 20, 10, 30), 40, 0)
    assert predicted(cfg, sized, 40, 0).total <= p.total


def test_the_planner_takes_the_largest_measured_shape_the_budget_affords():
    cfg, _ = fit_plan(counting_model(), "s4s", 5, teacher=SPEC, start="ddim@logsnr", screen_seeds=1)
    small, large = Sizes(64, 32, 32, 16, 50), Sizes(300, 100, 100, 40, 200)

    def cost(s):
        return predicted(cfg, s, 40, 0).total

    for budget in (cost(small), (cost(small) + cost(large)) // 2, cost(large) - 1):
        got = plan_for(budget, cfg, Sizes(), 40, 0, shapes=(small, large))
        assert (got.samples, got.val_samples, got.batch) == (64, 32, 16) and got.steps >= 50
        assert cost(got) <= budget < cost(dataclasses.replace(got, steps=got.steps + 1))  # the steps fill the budget
    got = plan_for(3 * cost(large), cfg, Sizes(), 40, 0, shapes=(small, large))
    assert (got.samples, got.batch) == (300, 40) and got.steps > 200 and cost(got) <= 3 * cost(large)
    got = plan_for(cost(small) // 2, cfg, Sizes(), 40, 0, shapes=(small, large))  # below the smallest: scaled down
    assert got.samples < 64 and got.steps < 50 and cost(got) <= cost(small) // 2
    got = plan_for(cost(large), cfg, Sizes(), 40, 0, shapes=(small, large), fixed={"samples"})
    assert got.samples == Sizes().samples  # a size the user gave is kept


def test_micro_batches_give_the_full_batchs_gradient(tmp_path):
    from fewstep.fit.loop import _accumulate, _Pass
    from fewstep.fit.methods import from_classic
    from fewstep.fit.objectives import FinalSample, StatesAndFinal, per_sample_loss
    from fewstep.fit.teacher import generate_teacher
    from fewstep.sampling import build_tableau
    from fewstep.seeds import fit_seeds

    m = make_gauss(VPLinear(), "eps", d=6)
    data = generate_teacher(m, fit_seeds(32), SPEC, keep_states=True, cache_dir=tmp_path, progress=False)
    idx = torch.arange(0, 32, 2)
    for method, dss in (("s4s-alt", None), ("dss", (1.0, 1000.0))):
        grads = []
        for mb in (None, 5, 1):
            s = from_classic(
                m,
                build_tableau(m, "ddim@logsnr", 4),
                method,
                rows_sum_to_one=method == "dss",
                decouple=0.1 if method == "s4s-alt" else 0.0,
            )
            off = torch.full((16, 6), 0.01, dtype=torch.float32).requires_grad_(True)
            for p in s.parameters():
                p.requires_grad_(True)
            objective = FinalSample() if dss is None else StatesAndFinal(*dss)
            L = _accumulate(_Pass(m, s, data, objective, per_sample_loss("l2"), False, mb), idx, off, 1.0)
            grads.append(
                (
                    [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in s.parameters()],
                    off.grad.clone(),
                    float(L),
                )
            )
        for g, off_g, loss in grads[1:]:  # the same to float32 rounding (the solver state is float32)
            assert loss == pytest.approx(grads[0][2], rel=1e-6)
            for a, b in zip(g, grads[0][0], strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
            torch.testing.assert_close(off_g, grads[0][1], rtol=1e-5, atol=1e-8)
        assert any(float(p.abs().max()) > 1e-3 for p in grads[0][0])  # the gradients are not all zero


def test_a_micro_batch_larger_than_the_batch_is_refused():
    with pytest.raises(FewstepError, match=r"--micro-batch 64 is larger than the batch \(20\)"):
        fit_plan(counting_model(), "s4s", 4, micro_batch=64)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_keeps_the_solver_in_float32(tmp_path, dtype):
    m = make_gauss(VPLinear(), "eps", d=6)
    seen = []
    real = m.net.forward
    m.net.forward = lambda x, t, **c: (seen.append((x.dtype, t.dtype)), real(x, t, **c))[1]
    fp = m.fingerprint()
    m.set_dtype(dtype)
    assert m.fingerprint() == fp  # the same model, run in another precision
    states = []
    x = fewstep.sample(m, m.noise(range(4)), "unipc", nfe=5, callback=lambda d: states.append(d["x"].dtype))
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    assert x.dtype == torch.float32 and set(states) == {torch.float32}
    assert {d for d, _ in seen} == {half}
    res = fit(
        m,
        "s4s",
        4,
        teacher=SPEC,
        samples=32,
        val_samples=16,
        confirm_samples=0,
        steps=6,
        eval_every=3,
        progress=False,
        cache_dir=tmp_path,
        start="unipc@logsnr",
    )
    assert res.doc["model"]["dtype"] == {"bf16": "bfloat16", "fp16": "float16"}[dtype]
    assert all(p.dtype == F64 for p in res.outcome.solver.parameters())
    doc = json.loads(json.dumps(res.doc))
    assert doc["model"]["fingerprint"] == fp


def test_a_dtype_the_device_cannot_run_is_refused_in_one_line():
    from fewstep.denoiser import check_dtype

    with pytest.raises(FewstepError, match="fp8.*not one of fp32, fp16, bf16"):
        check_dtype("fp8", "cpu")
    with pytest.raises(FewstepError, match=r"this device \(meta\) cannot run a network in torch.float16") as e:
        check_dtype("fp16", "meta")
    assert "\n" not in str(e.value)


def test_a_micro_batch_bounds_every_network_call_of_a_fit(tmp_path):
    # teacher, classic ranking, screening, training, validation and confirmation: none calls the network on
    # more noises at once than the micro-batch (memory bounded by it, whatever the batch and the noise counts)
    m = counting_model()
    res = fit(
        m,
        "s4s-alt",
        4,
        teacher=SPEC,
        samples=48,
        val_samples=40,
        confirm_samples=40,
        steps=12,
        batch=16,
        eval_every=6,
        progress=False,
        cache_dir=tmp_path,
        micro_batch=4,
    )
    assert m.net.largest == 4 and res.doc["fit"]["micro_batch"] == 4
