"""The model layer's parts (issue 21, item 1 and 4): output conversions as functions of the schedule's scalars,
guidance around a network call, the fingerprint, and the one condition spec the loaders are given.

The Denoiser's behaviour through these parts is tested where it is used (test_solvers, test_zoo, test_cost,
test_pipelines_in, ...); here each part on its own, and that fingerprints keep the bits artifacts recorded.
"""

from __future__ import annotations

import pytest
import torch

from fewstep import Denoiser, Flow, VPDiscrete
from fewstep.conditions import ConditionSpec, GuidanceSet, PromptSet
from fewstep.conversions import to_basis, to_DE
from fewstep.errors import FewstepError, ModelSpecError
from fewstep.guidance import Conditions, Guidance
from fewstep.schedules import TimeScalars
from fewstep.specs import load_model

F64 = torch.float64
CASES = [("eps", VPDiscrete("linear")), ("x0", VPDiscrete("linear")), ("v", VPDiscrete("linear")), ("velocity", Flow())]


def _out(prediction: str, x0: torch.Tensor, eps: torch.Tensor, a: float, g: float) -> torch.Tensor:
    """What a perfect network of each prediction type returns for x = a x0 + g eps."""
    return {"eps": eps, "x0": x0, "v": a * eps - g * x0, "velocity": eps - x0}[prediction]


@pytest.mark.parametrize("prediction,schedule", CASES)
@pytest.mark.parametrize("grad", [False, True])
def test_conversions_recover_data_noise_and_velocity(prediction, schedule, grad):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, generator=g, dtype=F64), torch.randn(4, 3, generator=g, dtype=F64)
    t = torch.tensor([0.37], dtype=F64)
    (sc,) = TimeScalars.many(schedule, t)
    x = sc.alpha * x0 + sc.sigma * eps
    out = _out(prediction, x0, eps, sc.alpha, sc.sigma).clone().requires_grad_(grad)  # grad: the autograd path
    D, E = to_DE(prediction, out, x, sc.alpha, sc.sigma)
    assert torch.allclose(D, x0, atol=1e-12) and torch.allclose(E, eps, atol=1e-12)
    v = to_basis(prediction, out, x, "v", sc)
    assert torch.allclose(v, sc.d_alpha * x0 + sc.d_sigma * eps, atol=1e-12)
    model = Denoiser(lambda x, t: x, schedule, prediction)
    for basis in ("D", "E", "v"):  # the Denoiser converts through the same function, bit for bit
        assert torch.equal(model.convert(out, x, 0.37, basis, sc), to_basis(prediction, out, x, basis, sc))
    with pytest.raises(FewstepError, match="basis"):
        to_basis("eps", out, x, "w", sc)


def test_scheduler_converts_without_a_denoiser():
    from fewstep.integrations.diffusers_scheduler import FewStepScheduler

    s = FewStepScheduler.from_solver("unipc@logsnr", VPDiscrete("linear"), nfe=4, prediction_type="epsilon")
    assert not any(isinstance(v, Denoiser) for v in vars(s).values())


def _net(calls: list):
    def net(x, t_net, c=None, guidance=None):
        calls.append((x.shape[0], None if guidance is None else guidance.clone()))
        return x * (1.0 if c is None else c.reshape(-1, 1)) + (0.0 if guidance is None else guidance.reshape(-1, 1))

    return net


def test_guidance_forms():
    x, t = torch.ones(3, 2), torch.zeros(3)
    cond = {"c": torch.tensor([2.0, 3.0, 4.0])}
    calls: list = []
    cfg = Guidance(scale=1.5, uncond={"c": torch.tensor(1.0)})
    out, rows = cfg(_net(calls), x, t, dict(cond))
    assert rows == 6 and calls[-1][0] == 6  # cond and uncond halves in one call
    assert torch.allclose(out, 1.0 + 1.5 * (cond["c"].reshape(-1, 1) - 1.0) * torch.ones(3, 2))
    per = torch.tensor([1.0, 2.0, 3.0])  # one scale per sample
    out, rows = cfg(_net(calls), x, t, {**cond, "guidance_scale": per})
    assert rows == 6 and torch.allclose(out[:, 0], 1.0 + per * (cond["c"] - 1.0))
    out, rows = cfg(_net(calls), x, t, {**cond, "guidance_scale": 1.0})  # scale 1: unguided, one half
    assert rows == 3 and torch.equal(out, x * cond["c"].reshape(-1, 1))
    takes = Guidance(scale=3.5, takes_scale=True)  # a guidance-input network: the scale goes in
    out, rows = takes(_net(calls), x, t, {})
    assert rows == 3 and torch.equal(calls[-1][1], torch.full((3,), 3.5)) and torch.allclose(out, x + 3.5)


def test_conditions_scales_and_narrowing():
    c = Conditions(Guidance(2.0, {"class_labels": 0}), lambda seeds: {"class_labels": torch.tensor(seeds)}, 3)
    assert c.scales() is None and c.some_scale() == 2.0 and c.key() == ""
    n = c.narrowed(ConditionSpec.parse(classes="all", guidance="1,2,4"), "m")
    assert n.scales() == (1.0, 2.0, 4.0) and n.some_scale() == 2.0 and n.key() != ""
    assert set(n.draw(range(50))["class_labels"].tolist()) == {0, 1, 2}
    assert c.narrowed(ConditionSpec.parse(guidance=3.0), "m") is c  # one scale: nothing drawn per seed
    with pytest.raises(FewstepError, match="no unconditional half"):
        Conditions().narrowed(ConditionSpec.parse(guidance="1,2"), "m")
    with pytest.raises(FewstepError, match="takes no class labels"):
        Conditions().narrowed(ConditionSpec.parse(classes="0"), "m")


def test_condition_spec(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("\n".join(f"prompt number {i}" for i in range(40)))
    spec = ConditionSpec.parse(f, guidance="3:12")
    assert spec.guidance == GuidanceSet((3.0, 7.5, 12.0)) and spec.scale == 7.5 == spec.guidance.middle
    assert GuidanceSet((2.0, 3.0)).middle == 3.0 and ConditionSpec().scale is None
    fit, held = spec.for_role("fit").prompts, spec.for_role("eval").prompts
    assert fit is not None and held is not None and len(fit) + len(held) == 40
    assert not {e.prompt for e in fit.entries} & {e.prompt for e in held.entries}
    other = PromptSet.of(["a", "b"])
    assert spec.for_role("eval", other).prompts is other and spec.for_role("all") is spec
    assert ConditionSpec.parse(["a", "b"]).prompts == other


def test_load_model_takes_one_spec_or_its_parts():
    spec = ConditionSpec.parse(classes="0,1", guidance="2,3")
    a, b = load_model("zoo:gmm", conditions=spec), load_model("zoo:gmm", classes="0,1", guidance="2,3")
    assert a.fingerprint() == b.fingerprint() and a.guidance_scale == b.guidance_scale == 3.0
    ca, cb = a.cond_for(range(8)), b.cond_for(range(8))
    assert ca.keys() == cb.keys() and all(torch.equal(ca[k], cb[k]) for k in ca)
    with pytest.raises(ModelSpecError, match="not both"):
        load_model("zoo:gmm", conditions=spec, guidance=2)


def test_fingerprints_keep_the_bits_artifacts_recorded():
    net = torch.nn.Linear(3, 3)
    with torch.no_grad():
        net.weight.copy_(torch.arange(9.0).reshape(3, 3) / 10)
        net.bias.copy_(torch.tensor([0.5, -0.25, 1.0]))
    assert Denoiser(net, VPDiscrete("linear"), "eps", sample_shape=(3,)).fingerprint() == "7a2232f7c1e7b86d"
    prior = Denoiser(
        net, Flow(), "velocity", sample_shape=(3,), identity={"k": 1}, prior=lambda g, s: torch.rand(s, generator=g)
    )
    assert prior.fingerprint() == "ac00b09e2f79cad9"
    assert load_model("zoo:gmm").fingerprint() == "7191277d038d9b55"
    assert load_model("zoo:gmm", guidance="2,3").fingerprint() == "68e51f60bd392607"
