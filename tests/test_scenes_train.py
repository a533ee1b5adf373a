"""The zoo's network trainer (fewstep.zoo.scenes.train_denoiser): objectives, times, resumption."""

from __future__ import annotations

import torch
from torch import nn

from fewstep.conversions import to_DE
from fewstep.schedules import Flow, VPDiscrete
from fewstep.zoo.scenes.train_denoiser import TrainingSet, draw_times, target, train_network

RECIPE = {
    "seed": 3,
    "steps": 8,
    "batch": 4,
    "lr": 1e-2,
    "warmup": 2,
    "weight_decay": 0.0,
    "ema": 0.9,
    "grad_clip": 1.0,
    "cond_dropout": 0.25,
    "save_every": 3,
    "log_every": 2,
    "time_shift": 1.0,
}


class _Net(nn.Module):
    """A conditional network small enough to train in milliseconds: conv(x) + t and the condition rows."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.cond = nn.Linear(3, 2)
        self.drop = nn.Dropout(0.1)  # draws from the global generator, as DiT's label dropout does

    def forward(self, x: torch.Tensor, t: torch.Tensor, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        c = self.drop(self.cond(rows["emb"]))[:, :, None, None]
        return self.conv(x) + c + 1e-3 * t[:, None, None, None]


def _data() -> TrainingSet:
    """16 latents, each one of 5 patterns picked by its condition row (so x0 is learnable from the condition)."""
    g = torch.Generator().manual_seed(0)
    patterns = torch.randn(5, 2, 1, 1, generator=g).expand(5, 2, 4, 4)
    return TrainingSet(
        latents=patterns[torch.arange(16) % 5].clone(),
        cond_index=torch.arange(16) % 5,
        rows={"emb": torch.randn(5, 3, generator=g)},
        null={"emb": torch.zeros(1, 3)},
    )


def _fresh() -> _Net:
    torch.manual_seed(0)
    return _Net()


def test_targets_give_back_the_data_through_the_prediction_conversions():
    """target(prediction) fed to the model-side conversion returns x0, for every prediction type."""
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
    for sched, preds in ((VPDiscrete("linear"), ("eps", "v", "x0")), (Flow(), ("velocity", "eps", "x0"))):
        t = torch.tensor(0.37, dtype=torch.float64)
        a, s = sched.alpha(t), sched.sigma(t)
        x = a * x0 + s * eps
        for p in preds:
            out = target(p, x0, eps, a, s)
            torch.testing.assert_close(to_DE(p, out, x, a, s)[0], x0, rtol=1e-10, atol=1e-10)


def test_flow_times_follow_the_shift_and_vp_times_cover_the_ddpm_range():
    g = torch.Generator().manual_seed(0)
    plain = draw_times(Flow(), 20000, g, 1.0)
    shifted = draw_times(Flow(), 20000, g, 3.0)
    assert abs(float(plain.median()) - 0.5) < 0.02  # logit-normal(0, 1): median 1/2
    assert abs(float(shifted.median()) - 0.75) < 0.02  # shift 3 moves the median to 3/4
    vp = VPDiscrete("linear")
    t = draw_times(vp, 20000, g)
    k = vp.net_time(t)
    assert float(k.min()) >= 0.0 and float(k.max()) <= vp.T - 1
    assert abs(float(k.mean()) - (vp.T - 1) / 2) < 10


_CURRENT: list[_Net] = []


def _call(x: torch.Tensor, t: torch.Tensor, rows: dict[str, torch.Tensor]) -> torch.Tensor:
    return _CURRENT[0](x, t, rows)


def _run(checkpoint=None, stop_after=None, recipe=RECIPE, prediction="velocity"):
    _CURRENT[:] = [_fresh()]
    return train_network(_CURRENT[0], _call, Flow(), prediction, _data(), recipe, checkpoint, stop_after=stop_after)


def test_training_lowers_the_loss_and_is_deterministic():
    longer = dict(RECIPE, steps=100, log_every=25, batch=8, lr=3e-2, cond_dropout=0.0)
    a, b = _run(recipe=longer, prediction="x0"), _run(recipe=longer, prediction="x0")
    assert a.steps_run == 100 and len(a.losses) == 4
    assert a.losses[-1] < 0.4 * a.losses[0]  # x0 is a function of the condition: the loss falls (0.73 -> 0.21)
    assert a.losses == b.losses
    for k in a.state:
        assert torch.equal(a.state[k], b.state[k])


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path):
    whole = _run()
    ckpt = tmp_path / "train.pt"
    first = _run(ckpt, stop_after=5)
    assert first.steps_run == 5 and ckpt.is_file()
    rest = _run(ckpt)
    assert rest.resumed_at == 5 and rest.steps_run == 3
    assert rest.losses == whole.losses and rest.first_losses == whole.first_losses and len(whole.first_losses) == 8
    for k in whole.state:
        assert torch.equal(whole.state[k], rest.state[k])


def test_a_checkpoint_of_another_recipe_or_a_damaged_one_starts_over(tmp_path, capsys):
    ckpt = tmp_path / "train.pt"
    _run(ckpt, stop_after=3)
    r = _run(ckpt, recipe=dict(RECIPE, lr=2e-2))
    assert r.resumed_at == 0 and r.steps_run == 8
    ckpt.write_bytes(b"not a checkpoint")
    r = _run(ckpt)
    assert r.resumed_at == 0 and r.steps_run == 8
    assert "unreadable" in capsys.readouterr().err
