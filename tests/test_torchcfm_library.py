"""Checkpoints saved with ``torch.save(model)`` of the TorchCFM library's own class
``torchcfm.models.models.MLP``: loaded safely, sizes read off the weights, velocities equal to the
saved module's own forward, foreign pickles refused without running them.

The torchcfm library is never needed: each test writes a tiny stand-in package ``torchcfm`` in
tmp_path whose ``MLP`` has the library's layout (constructor ``MLP(dim, out_dim=None, w=64,
time_varying=False)``, attributes ``time_varying`` and ``net``, forward on cat([x, t])), imports it
only to build and save a model, and removes it from sys.modules and sys.path before loading.
No test reads ../shared/data.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import fewstep
from fewstep.errors import FewstepError, ModelSpecError
from fewstep.specs import load_model
from fewstep.zoo import torchcfm

# our own code with the library's class layout (written here, not copied from anywhere)
_MODELS_PY = '''
import torch


class MLP(torch.nn.Module):
    """dim -> velocity network with the TorchCFM library's layout; forward takes cat([x, t])."""

    def __init__(self, dim, out_dim=None, w=64, time_varying=False, act=torch.nn.SELU):
        super().__init__()
        self.time_varying = time_varying
        out = dim if out_dim is None else out_dim
        first = dim + 1 if time_varying else dim
        layers = [torch.nn.Linear(first, w)]
        for _ in range(2):
            layers += [act(), torch.nn.Linear(w, w)]
        layers += [act(), torch.nn.Linear(w, out)]
        self.net = torch.nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)
'''


def _forget_package() -> None:
    for name in [m for m in sys.modules if m == "torchcfm" or m.startswith("torchcfm.")]:
        del sys.modules[name]


@pytest.fixture
def library(tmp_path):
    """A factory ``make(dim, **kw) -> module`` of the stand-in library MLP, importable only inside
    the test; on leaving (and by :func:`_forget`) the package is gone from sys.modules and sys.path."""
    if "torchcfm" in sys.modules or importlib.util.find_spec("torchcfm") is not None:
        pytest.skip("a real torchcfm package is importable here; the stand-in package would clash with it")
    root = tmp_path / "fake_site"
    pkg = root / "torchcfm" / "models"
    pkg.mkdir(parents=True)
    (root / "torchcfm" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from .models import MLP\n")
    (pkg / "models.py").write_text(textwrap.dedent(_MODELS_PY))
    sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    try:
        yield importlib.import_module("torchcfm.models.models")
    finally:
        _forget(root)


def _forget(root: Path) -> None:
    _forget_package()
    while str(root) in sys.path:
        sys.path.remove(str(root))
    importlib.invalidate_caches()


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, FewstepError), msg
    return msg


def _save_library_model(library, path: Path, dim: int, w: int, seed: int, **kw) -> tuple[nn.Module, list]:
    """torch.save a library MLP with random weights; returns it and its own outputs at a few
    (x, tau) probes, computed before saving: [(x, tau, model(cat([x, tau])))]."""
    torch.manual_seed(seed)
    model = library.MLP(dim=dim, w=w, time_varying=True, **kw)
    with torch.no_grad():
        for p in model.parameters():  # away from the default init: larger, signed biases
            p.add_(0.3 * torch.randn_like(p))
    assert type(model).__module__ == "torchcfm.models.models" and type(model).__qualname__ == "MLP"
    probes = []
    with torch.no_grad():
        for tau in (0.0, 1e-3, 0.25, 0.5, 0.9, 1.0):
            x = 2.0 * torch.randn(7, dim)
            tau_col = torch.full((7, 1), tau)
            probes.append((x, tau, model(torch.cat([x, tau_col], dim=-1)).clone()))
    torch.save(model, path)
    return model, probes


def _library_euler(model: nn.Module, x: torch.Tensor, steps: int) -> torch.Tensor:
    """Euler in TorchCFM's time tau (0 at the noise) on linspace(0, 1, steps + 1)."""
    tau = torch.linspace(0, 1, steps + 1)
    for k in range(steps):
        x = x + (tau[k + 1] - tau[k]) * model(torch.cat([x, tau[k].expand(x.shape[0], 1)], dim=1))
    return x


# ----------------------------------------------------------------------------- loading
@pytest.mark.parametrize("dim, w", [(2, 64), (3, 16), (5, 40)])
def test_library_mlp_loads_with_its_own_velocity(library, tmp_path, dim, w):
    path = tmp_path / f"lib_{dim}_{w}.pt"
    model, probes = _save_library_model(library, path, dim, w, seed=10 * dim + w)
    assert torchcfm.LIBRARY_CLASS in torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    _forget(tmp_path / "fake_site")
    assert "torchcfm" not in sys.modules and importlib.util.find_spec("torchcfm") is None

    den = torchcfm.load_torchcfm(str(path))
    by_spec = load_model("torchcfm:" + str(path))
    assert "torchcfm" not in sys.modules  # never imported
    for m in (den, by_spec):
        assert m.sample_shape == (dim,) and m.prediction == "velocity"
        assert m.schedule.config() == {"type": "flow", "t_min": 1e-3, "time_scale": 1.0, "time_reversed": True}
        assert m.identity == {"torchcfm": path.name, "sha256": torchcfm.sha256_file(path)}
        assert not hasattr(m, "sample_data")  # a library checkpoint names no data set
        assert (m.net.dim, m.net.width) == (dim, w)
        assert not any(p.requires_grad for p in m.net.parameters())
    assert den.fingerprint() == by_spec.fingerprint()

    # fewstep time t = 1 - tau, velocity dx/dt = -(the module's own dx/dtau)
    with torch.no_grad():
        for x, tau, want in probes:
            for m in (den, by_spec):
                got = m.predict(x, 1.0 - tau, "v")
                assert got.dtype == torch.float32 and got.shape == (7, dim)
                torch.testing.assert_close(got, -want, rtol=1e-6, atol=1e-6)

    # samples: finite, and fewstep's Euler is the library-style Euler in tau
    x0 = den.noise(range(500, 564))
    with torch.no_grad():
        ours = fewstep.sample(den, x0, "euler@time", nfe=8)
        theirs = _library_euler(model, x0, 8)
        rich = fewstep.sample(den, x0, "adams3@time", nfe=12)
    assert ours.shape == (64, dim) and torch.isfinite(ours).all() and torch.isfinite(rich).all()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_a_state_dict_of_a_library_model_reads_its_sizes(library, tmp_path):
    torch.manual_seed(3)
    model = library.MLP(dim=3, w=24, time_varying=True)
    path = tmp_path / "state.pt"
    torch.save(model.state_dict(), path)
    x, tau = torch.randn(5, 3), torch.rand(5)
    with torch.no_grad():
        want = model(torch.cat([x, tau[:, None]], 1))
    _forget(tmp_path / "fake_site")
    net = torchcfm.load_net(path)
    assert (net.dim, net.width) == (3, 24)
    torch.testing.assert_close(net(x, tau), -want, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- refusals
def test_time_varying_false_and_other_out_dims_are_refused(library, tmp_path):
    torch.save(library.MLP(dim=2, w=8, time_varying=False), tmp_path / "static.pt")
    torch.save(library.MLP(dim=3, out_dim=1, w=8, time_varying=True), tmp_path / "scalar.pt")
    torch.save(library.MLP(dim=2, w=8, time_varying=True, act=nn.ReLU), tmp_path / "relu.pt")
    _forget(tmp_path / "fake_site")
    with pytest.raises(ModelSpecError) as e:
        torchcfm.load_torchcfm(str(tmp_path / "static.pt"))
    assert "time_varying=False" in _one_line(e) and torchcfm.LIBRARY_CLASS in str(e.value)
    with pytest.raises(ModelSpecError) as e:
        load_model("torchcfm:" + str(tmp_path / "scalar.pt"))
    assert "takes 4 inputs and returns 1" in _one_line(e)
    with pytest.raises(ModelSpecError) as e:
        torchcfm.load_net(tmp_path / "relu.pt")
    msg = _one_line(e)
    assert "refused" in msg and "torch.nn.modules.activation.ReLU" in msg


def test_a_same_named_class_in_another_module_is_refused(tmp_path, monkeypatch):
    """``mylab.models.MLP`` with the library's layout is still not the library's class."""
    marker = tmp_path / "constructed.txt"

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.time_varying = True
            self.net = torchcfm.mlp_layout(2, 8)

        def __setstate__(self, state):  # would run if the unpickler built this class
            marker.write_text("ran")
            super().__setstate__(state)

    MLP.__module__, MLP.__qualname__ = "mylab.models", "MLP"
    top, fake = type(sys)("mylab"), type(sys)("mylab.models")
    top.models, fake.MLP = fake, MLP
    monkeypatch.setitem(sys.modules, "mylab", top)
    monkeypatch.setitem(sys.modules, "mylab.models", fake)
    path = tmp_path / "other_mlp.pt"
    torch.save(MLP(), path)
    monkeypatch.delitem(sys.modules, "mylab.models")
    monkeypatch.delitem(sys.modules, "mylab")
    with pytest.raises(ModelSpecError) as e:
        torchcfm.load_torchcfm(str(path))
    msg = _one_line(e)
    assert "refused" in msg and "mylab.models.MLP" in msg and torchcfm.LIBRARY_CLASS in msg
    assert not marker.exists()


class _Shell:
    """Pickles as a call to os.system that would create a file."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_os_system_in_the_pickle_is_refused_without_running(library, tmp_path):
    marker = tmp_path / "pwned.txt"
    model = library.MLP(dim=2, w=8, time_varying=True)
    model.payload = _Shell(marker)  # the library's class itself, carrying a crafted reduce
    path = tmp_path / "evil_library.pt"
    torch.save(model, path)
    bare = tmp_path / "evil_bare.pt"
    torch.save({"net.0.weight": torch.zeros(8, 3), "x": _Shell(marker)}, bare)
    _forget(tmp_path / "fake_site")
    assert not marker.exists()
    for p in (path, bare):
        with pytest.raises(ModelSpecError) as e:
            torchcfm.load_torchcfm(str(p))
        msg = _one_line(e)
        assert "refused" in msg and f"{os.system.__module__}.system" in msg
        with pytest.raises(ModelSpecError):
            load_model("torchcfm:" + str(p))
    assert not marker.exists()
