"""Bad input to the Python API (issue 20, rows 14-16): an empty batch, a non-positive ``max_batch``, half
precision noise and non-finite noise each give a defined outcome, never a raw torch error or a solve that
blames the model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fewstep import Denoiser, FewstepError, VPDiscrete, sample
from fewstep.errors import ModelOutputError, ShapeError
from fewstep.sampling import build_tableau
from fewstep.solvers.kernel import run_tableau

SOLVER = "unipc@logsnr"


class Linear(nn.Module):
    """A fixed linear eps-network on (4,) samples (a weight matrix, so its dtype is the network's)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(0.3 * torch.randn(4, 4, generator=g))

    def forward(self, x: torch.Tensor, t_net: torch.Tensor) -> torch.Tensor:
        return x @ self.w * (1.0 + t_net[:, None] / 1000.0)


def model(dtype: torch.dtype | None = None) -> Denoiser:
    return Denoiser(Linear(), VPDiscrete("linear"), prediction="eps", sample_shape=(4,), dtype=dtype)


def noise(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- row 14
def test_empty_batch_gives_empty_result_without_a_network_call():
    m = model()
    out = sample(m, torch.zeros(0, 4), solver=SOLVER, nfe=5)
    assert out.shape == (0, 4) and out.dtype == torch.float32
    assert m.nfe == 0
    x, traj = sample(m, torch.zeros(0, 4), solver=SOLVER, nfe=5, return_trajectory=True)
    assert x.shape == (0, 4) and len(traj) == 6 and all(s.shape == (0, 4) for s in traj)


@pytest.mark.parametrize("bad", [-1, 0, 2.5, True])
def test_non_positive_max_batch_is_refused_naming_it(bad):
    with pytest.raises(FewstepError, match="max_batch"):
        sample(model(), noise(), solver=SOLVER, nfe=5, max_batch=bad)


def test_max_batch_chunks_agree_with_one_batch():
    m, z = model(), noise(7)
    torch.testing.assert_close(sample(m, z, solver=SOLVER, nfe=5, max_batch=3), sample(m, z, solver=SOLVER, nfe=5))


# ----------------------------------------------------------------------------- row 15
@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_noise_is_solved_in_float32(half):
    z = noise().to(half)
    out = sample(model(), z, solver=SOLVER, nfe=5)
    assert out.dtype == torch.float32
    ref = sample(model(), z.float(), solver=SOLVER, nfe=5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_half_noise_trajectory_states_are_float32():
    _, traj = sample(model(), noise().half(), solver=SOLVER, nfe=5, return_trajectory=True)
    assert {s.dtype for s in traj} == {torch.float32}


def test_half_network_runs_in_half_under_a_float32_state():
    """A network given in half precision (its weights, or dtype=) runs in half; the state stays float32."""
    seen: list[torch.dtype] = []
    m = model()
    m.net.half()
    m.net.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
    out = sample(m, noise().half(), solver=SOLVER, nfe=5)
    assert out.dtype == torch.float32 and set(seen) == {torch.float16}
    ref = sample(model(), noise(), solver=SOLVER, nfe=5)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()  # half network: close, not equal
    m2 = model(dtype="bf16")
    assert sample(m2, noise().bfloat16(), solver=SOLVER, nfe=5).dtype == torch.float32


def test_float64_noise_keeps_a_float64_state():
    out = sample(model(), noise().double(), solver=SOLVER, nfe=5)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), sample(model(), noise(), solver=SOLVER, nfe=5), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- row 16
@pytest.mark.parametrize("value,word", [(float("nan"), "NaN"), (float("inf"), "inf")])
def test_non_finite_noise_is_named_before_the_model_runs(value, word):
    m, z = model(), noise()
    z[2, 1] = value
    with pytest.raises(FewstepError, match=f"noise holds {word}") as e:
        sample(m, z, solver=SOLVER, nfe=5)
    assert not isinstance(e.value, ModelOutputError) and "model" not in str(e.value).split(":")[0]
    assert m.nfe == 0


def test_kernel_blames_non_finite_starting_state_not_the_model():
    m, z = model(), noise()
    z[0, 0] = float("nan")
    with pytest.raises(FewstepError, match="starting noise") as e:
        run_tableau(m, z, build_tableau(m, SOLVER, 5))
    assert not isinstance(e.value, ModelOutputError)


def test_noise_without_a_batch_dimension_is_a_shape_error():
    with pytest.raises(ShapeError, match=r"noise has shape \(\) but this model's samples have shape \(B, 4\)"):
        sample(model(), torch.tensor(1.0), solver=SOLVER, nfe=5)


def test_a_numpy_integer_max_batch_is_a_number_of_samples():
    np = pytest.importorskip("numpy")
    m, z = model(), noise(5)
    torch.testing.assert_close(
        sample(m, z, solver=SOLVER, nfe=5, max_batch=np.int64(2)), sample(m, z, solver=SOLVER, nfe=5)
    )


def test_evaluate_refuses_a_seed_torch_cannot_take_in_one_line():
    """evaluate() from Python: a first seed past 2**62 is one FewstepError naming it, not an overflow in torch."""
    from fewstep.errors import FewstepError
    from fewstep.evaluate import evaluate
    from fewstep.specs import load_model

    with pytest.raises(FewstepError, match="seed= 18446744073709551615"):
        evaluate(load_model("zoo:gaussian"), nfe=2, solvers=["euler@time"], samples=2, seed=2**64 - 1)


def test_a_half_precision_pipeline_keeps_the_scheduler_state_in_float32():
    """FewStepScheduler under fp16 latents (a pipeline loaded in half precision): the solver state stays float32
    as in fewstep.sample, the pipeline gets fp16 back, and the solve ends where the float32 solve of the same
    noise does, to the rounding of the fp16 network outputs it was fed."""
    import diffusers

    from fewstep.integrations.diffusers_in import from_diffusers
    from fewstep.integrations.diffusers_scheduler import FewStepScheduler

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 3, 3, padding=1)).eval()

    class Unet(nn.Module):  # the diffusers call convention: net(x, t).sample, a config with the channels
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.config = {"in_channels": 3, "out_channels": 3, "sample_size": 8}

        def forward(self, x, timestep, return_dict=True, **_):
            t = torch.as_tensor(timestep, dtype=x.dtype).reshape(-1, *[1] * (x.dim() - 1))
            out = 0.5 * x + 0.1 * self.net(x) * torch.cos(t / 1000)
            return type("Out", (), {"sample": out})() if return_dict else (out,)

    unet = Unet()
    config = diffusers.DDPMScheduler().config
    model = from_diffusers(unet, config)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = sample(model, noise, "dpmpp_2m@logsnr", nfe=6)
        sched = FewStepScheduler.from_solver("dpmpp_2m@logsnr", config, nfe=6)
        x = noise.half()
        for t in sched.timesteps:
            x = sched.step(unet(x.float(), t).sample.half(), t, x).prev_sample
            assert x.dtype == torch.float16 and sched._stepper.state.dtype == torch.float32
    err = float((x.float() - want).norm() / want.norm())
    assert err < 5e-3, err  # 2.8e-3 here; the state in fp16 adds its own rounding at every step: 1.1e-2


def test_finite_noise_whose_sum_overflows_is_accepted():
    """The cheap finiteness check sums the noise: finite values whose sum overflows are still finite noise."""
    model = Denoiser(lambda x, t: torch.zeros_like(x), VPDiscrete("linear"), prediction="eps", sample_shape=(2,))
    big = torch.full((2, 2), 60000.0, dtype=torch.float16)  # finite fp16 values whose fp16 sum is inf
    assert torch.isfinite(sample(model, big, "ddim", nfe=2)).all()
