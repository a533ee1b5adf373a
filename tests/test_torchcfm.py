"""TorchCFM gaussian-moons models: safe loading, refusal of foreign pickles, the time/sign
convention (parity with the authors' own Euler sampler), and samples that look like the moons.

Tests marked ``needs_data`` read the six checkpoints from ../shared/data (or
$FEWSTEP_TORCHCFM_DIR) and skip when the folder is absent; the refusal tests craft their own
checkpoints and always run.
"""

from __future__ import annotations

import hashlib
import math
import sys
from functools import cache

import pytest
import torch
from torch import nn

import fewstep
from fewstep.errors import FewstepError, ModelSpecError
from fewstep.zoo import torchcfm

NAMES = torchcfm.NAMES
needs_data = pytest.mark.skipif(
    not torchcfm.default_dir().is_dir(), reason=f"TorchCFM checkpoints not found at {torchcfm.default_dir()}"
)


@cache
def _model(name: str):
    return torchcfm.load_torchcfm(name)


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, FewstepError)
    return msg


# ----------------------------------------------------------------------------- crafted checkpoints
def _save_as_main_mlp(monkeypatch, tmp_path, seq: nn.Sequential, fname: str = "crafted.pt"):
    """torch.save a module pickled as class __main__.MLP holding ``net = seq``."""

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = seq

    MLP.__module__, MLP.__qualname__ = "__main__", "MLP"
    monkeypatch.setattr(sys.modules["__main__"], "MLP", MLP, raising=False)
    path = tmp_path / fname
    torch.save(MLP(), path)
    return path


def _layout(act=nn.SELU, width=64, extra=()):
    return nn.Sequential(
        nn.Linear(3, width),
        act(),
        nn.Linear(width, width),
        act(),
        nn.Linear(width, width),
        act(),
        nn.Linear(width, 2),
        *extra,
    )


def test_a_crafted_whole_module_of_the_right_layout_loads(monkeypatch, tmp_path):
    torch.manual_seed(0)
    seq = _layout()
    path = _save_as_main_mlp(monkeypatch, tmp_path, seq)
    net = torchcfm.load_net(path)
    x, tau = torch.randn(5, 2), torch.rand(5)
    want = seq(torch.cat([x, tau[:, None]], 1))
    assert torch.equal(net.velocity(x, tau), want)
    assert torch.equal(net(x, tau), -want)  # fewstep's dx/dt with t = 1 - tau
    assert not any(p.requires_grad for p in net.parameters())


def test_another_layer_class_is_refused_by_name(monkeypatch, tmp_path):
    path = _save_as_main_mlp(monkeypatch, tmp_path, _layout(act=nn.ReLU))
    with pytest.raises(ModelSpecError) as e:
        torchcfm.load_net(path)
    msg = _one_line(e)
    assert "torch.nn.modules.activation.ReLU" in msg and "refused" in msg and "SELU" in msg


class _Payload:
    def __reduce__(self):
        return (print, ("PICKLED CODE RAN",))


def test_code_in_the_pickle_is_refused_without_running(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"net.0.weight": torch.zeros(64, 3), "hook": _Payload()}, path)
    with pytest.raises(ModelSpecError) as e:
        torchcfm.load_net(path)
    assert "builtins.print" in _one_line(e)
    assert "PICKLED CODE RAN" not in capsys.readouterr().out


def test_wrong_layouts_get_clear_errors(monkeypatch, tmp_path):
    path = _save_as_main_mlp(monkeypatch, tmp_path, _layout(width=32), "narrow.pt")
    with pytest.raises(ModelSpecError) as e:
        torchcfm.load_net(path)
    assert "wrong layout" in _one_line(e) and "net.0.weight (32, 3) (expected (64, 3))" in str(e.value)
    path = _save_as_main_mlp(monkeypatch, tmp_path, _layout(extra=(nn.Linear(2, 2),)), "longer.pt")
    with pytest.raises(ModelSpecError) as e:
        torchcfm.load_net(path)
    assert "wrong layout" in _one_line(e) and "Linear, SELU, Linear, SELU, Linear, SELU, Linear, Linear" in str(e.value)


def test_plain_state_dicts(tmp_path):
    torch.manual_seed(1)
    ref = torchcfm.TorchCFMNet()
    good = tmp_path / "good.pt"
    torch.save(ref.state_dict(), good)
    x, tau = torch.randn(4, 2), torch.rand(4)
    assert torch.equal(torchcfm.load_net(good)(x, tau), ref(x, tau))
    partial = tmp_path / "partial.pt"
    torch.save({k: v for k, v in ref.state_dict().items() if k != "net.6.bias"}, partial)
    with pytest.raises(ModelSpecError) as e:
        torchcfm.load_net(partial)
    assert "missing ['net.6.bias']" in _one_line(e)
    damaged = tmp_path / "damaged.pt"
    state = ref.state_dict()
    torch.save({**state, "net.2.bias": torch.full_like(state["net.2.bias"], math.nan)}, damaged)
    with pytest.raises(ModelSpecError) as e:
        torchcfm.load_net(damaged)
    assert "net.2.bias hold NaN" in _one_line(e)
    other = tmp_path / "other.pt"
    torch.save([1, 2, 3], other)
    with pytest.raises(ModelSpecError) as e:
        torchcfm.load_net(other)
    assert "holds a list" in _one_line(e)


def test_missing_and_malformed_files(tmp_path, monkeypatch):
    with pytest.raises(ModelSpecError) as e:
        torchcfm.load_torchcfm(str(tmp_path / "nope.pt"))
    assert "does not exist" in _one_line(e)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a zip archive at all")
    with pytest.raises(ModelSpecError) as e:
        torchcfm.load_net(junk)
    assert "not a torch.save checkpoint" in _one_line(e)
    with pytest.raises(ModelSpecError) as e:
        torchcfm.load_torchcfm("moons-of-jupiter")
    assert all(n in _one_line(e) for n in NAMES)
    monkeypatch.setenv(torchcfm.ENV_DIR, str(tmp_path / "absent"))
    with pytest.raises(ModelSpecError) as e:
        torchcfm.load_torchcfm("otcfm")
    msg = _one_line(e)
    assert str(tmp_path / "absent") in msg and torchcfm.ENV_DIR in msg and "otcfm_v1.pt" in msg


def test_the_default_folder_is_beside_the_repository(monkeypatch):
    monkeypatch.delenv(torchcfm.ENV_DIR, raising=False)
    d = torchcfm.default_dir()
    assert d.name == "torchcfm-gaussian-moons" and d.parent.name == "data" and d.parent.parent.name == "shared"


# ----------------------------------------------------------------------------- the moons data
def test_moons_data_is_the_authors_generator():
    def seeded(s):
        return torch.Generator().manual_seed(s)

    x = torchcfm.moons_data(20000, seeded(3))
    assert x.shape == (20000, 2) and x.dtype == torch.float32
    assert torch.equal(x, torchcfm.moons_data(20000, seeded(3)))
    assert not torch.equal(x, torchcfm.moons_data(20000, seeded(4)))
    assert torch.equal(torchcfm.moons_data(50), torchcfm.moons_data(50, seeded(0)))
    # mean of the unit moons is (1/2, 1/4), of the diagonal shift U(0, 0.2) is 0.1: (0.6, 0.35) * 3 - 1
    sem = x.double().std(0) / math.sqrt(len(x))
    assert ((x.double().mean(0) - torch.tensor([0.8, 0.05], dtype=torch.float64)).abs() < 4 * sem).all()
    # undo the scale; every point is a point of one half circle shifted by u in [0, 0.2] on both axes
    p = (x.double() + 1) / 3
    u = torch.linspace(0, 0.2, 201, dtype=torch.float64)
    q = p[:, None, :] - u[None, :, None]  # (n, 201, 2)
    upper = ((q[..., 0] ** 2 + q[..., 1] ** 2 - 1).abs() < 2e-3) & (q[..., 1] >= -1e-9)
    lower = (((q[..., 0] - 1) ** 2 + (q[..., 1] - 0.5) ** 2 - 1).abs() < 2e-3) & (q[..., 1] <= 0.5 + 1e-9)
    assert (upper | lower).any(1).all()


# ----------------------------------------------------------------------------- the real models
@needs_data
@pytest.mark.parametrize("name", NAMES)
def test_models_load_safely_with_their_identity(name):
    m = _model(name)
    path = torchcfm.default_dir() / f"{name}_v1.pt"
    assert m.name == f"torchcfm:{name}" and m.sample_shape == (2,) and m.prediction == "velocity"
    assert m.schedule.config() == {"type": "flow", "t_min": 1e-3, "time_scale": 1.0, "time_reversed": True}
    assert m.identity == {"torchcfm": f"{name}_v1.pt", "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert m.sample_data is torchcfm.moons_data
    state = m.net.state_dict()
    assert [tuple(state[k].shape) for k in ("net.0.weight", "net.2.weight", "net.4.weight", "net.6.weight")] == [
        (64, 3),
        (64, 64),
        (64, 64),
        (2, 64),
    ]


@needs_data
def test_short_names_paths_and_fingerprints():
    prints = {n: _model(n).fingerprint() for n in NAMES}
    assert len(set(prints.values())) == len(NAMES)
    path = torchcfm.default_dir() / "otcfm_v1.pt"
    by_path = torchcfm.load_torchcfm(str(path))
    assert by_path.fingerprint() == prints["otcfm"] and by_path.name == f"torchcfm:{path}"
    assert torchcfm.load_torchcfm("otcfm_v1").fingerprint() == prints["otcfm"]
    with pytest.raises(ModelSpecError) as e:
        torchcfm.load_torchcfm("otcfm", guidance_scale=2.0)
    assert "t_min" in _one_line(e)


def _authors_euler(velocity: nn.Module, x: torch.Tensor, steps: int = 100) -> torch.Tensor:
    """The authors' sampler: Euler in their time tau on linspace(0, 1, steps + 1), float32."""
    tau = torch.linspace(0, 1, steps + 1)
    for k in range(steps):
        v = velocity(torch.cat([x, tau[k].expand(x.shape[0], 1)], 1))
        x = x + (tau[k + 1] - tau[k]) * v
    return x


@needs_data
@pytest.mark.parametrize("name", NAMES)
def test_euler_matches_the_authors_sampler(name):
    m = _model(name)
    pickled = torchcfm.read_checkpoint(torchcfm.default_dir() / f"{name}_v1.pt").net  # the authors' modules
    x0 = m.noise(range(1_000_000, 1_000_512))
    with torch.no_grad():
        ours = fewstep.sample(m, x0, "euler@time", nfe=100)
        theirs = _authors_euler(pickled, x0)
    assert theirs.abs().max() > 2.0
    assert (ours - theirs).abs().max() < 5e-5  # float32 rounding only (measured up to 1.6e-5)


@needs_data
@pytest.mark.parametrize("name", NAMES)
def test_samples_look_like_the_moons(name):
    m = _model(name)
    with torch.no_grad():
        y = fewstep.sample(m, m.noise(range(1_000_000, 1_002_000)), "adams4@time", nfe=100)
    data = m.sample_data(4000)
    src = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))
    # median distance of a sample to its nearest data point: on the moons, not in the Gaussian blob
    near_model = torch.cdist(y, data).min(1).values.median()
    near_source = torch.cdist(src, data).min(1).values.median()
    assert near_model < 0.1 and near_source > 0.15
    # measured: nearest-data medians 0.031-0.040 (the source: 0.24); mean gaps 0.04-0.41, cov gaps 0.07-0.77
    assert (y.mean(0) - data.mean(0)).norm() < 0.6  # data mean (0.8, 0.05)
    assert (torch.cov(y.T) - torch.cov(data.T)).abs().max() < 1.2  # data cov ~[[6.8, -1.7], [-1.7, 2.2]]


@needs_data
@pytest.mark.parametrize("name", ["stochastic_interpolant", "vp_flow"])
def test_data_and_noise_basis_solvers_still_converge_on_curved_paths(name):
    """D / E are only a change of variables for models not trained on the linear path: the
    classic solvers in those bases must still converge to the velocity ODE's solution."""
    from fewstep.evaluate import evaluate

    solvers = ["ddim@time", "dpmpp_3m@logsnr", "unipc@time", "adams4@time"]
    rep = evaluate(_model(name), nfe=[25, 100], solvers=solvers, samples=64).as_dict()
    assert rep["reference"]["solver"] == "adams4@time" and rep["reference"]["self_error"] < 1e-4
    err = {(r["solver"], r["nfe"]): r["rmse"] for r in rep["results"]}
    for s in solvers:
        s = s.split("@")[0]
        assert err[s, 100] < err[s, 25] / 3, (s, err[s, 25], err[s, 100])  # at least first order
    assert max(err[s.split("@")[0], 100] for s in solvers[1:]) < 2e-3  # measured 2e-4 to 7e-4
    assert err["ddim", 100] < 0.03  # DDIM is Euler on a flow: first order, measured 0.013 to 0.016


@needs_data
def test_the_metrics_data_reference_is_the_moons():
    reference = pytest.importorskip("fewstep.metrics.reference")
    d = reference.model_data(_model("otcfm"), n=100, seed=5)
    assert torch.equal(d.samples, torchcfm.moons_data(100, torch.Generator().manual_seed(5)))
