"""TorchCFM flow models (the pretrained "gaussian-moons" ones and the library's own MLP), loaded
without running pickled code.

The TorchCFM authors ship six 2-D velocity fields (``NAMES``), each a whole pickled module of
class ``__main__.MLP`` holding ``net = Sequential(Linear(3, 64), SELU, Linear(64, 64), SELU,
Linear(64, 64), SELU, Linear(64, 2))``. The network takes ``cat([x, tau[:, None]])`` and returns
the velocity dx/dtau in the authors' time tau, which runs from 0 at the source N(0, I) to 1 at
the data (two moons: the authors' ``sample_moons``, see :func:`moons_data`).

In fewstep's time t = 1 - tau (t = 1 at the noise) the schedule is ``Flow(time_reversed=True)``
(the network gets 1 - t) and the prediction is ``velocity`` = dx/dt = -dx/dtau, so the wrapped
network negates the authors' output. Every one of the six models, whatever path it was trained
on, is a velocity field of the ODE dx/dtau = v that carries N(0, I) to the data; for the
stochastic-interpolant and VP models that path is not the linear one x = (1 - t) x0 + t eps, so
the D / E values fewstep derives from v (D = x - t v, E = x + (1 - t) v) are only a change of
variables of the same ODE, not the model's own data or noise predictions. Solvers in those bases
still converge to the same ODE solution as NFE grows, but their low-NFE accuracy assumptions
(exactness on the linear path) do not hold; velocity-basis solvers (euler, adams*) make none.
Measured on 256 held-out noises against adams4@time at 800 NFE: every classic solver converges
on all six models (ddim is Euler here; dpmpp / unipc at second to third order), and at 5 NFE
velocity-basis solvers on the time-uniform grid are best on all six (adams2@time RMSE 0.011 to
0.13, dpmpp_3m@logsnr 0.04 to 0.66), the VP and interpolant models included.

Models trained with the TorchCFM library itself are usually saved as ``torch.save(model)`` of the
library's class ``torchcfm.models.models.MLP(dim, out_dim=None, w=64, time_varying=False)``. It
stores ``time_varying`` and ``net = Sequential(Linear(dim + 1, w), SELU, Linear(w, w), SELU,
Linear(w, w), SELU, Linear(w, out_dim))`` (no time input when ``time_varying`` is False), and its
forward is ``net(x)`` on an input the caller has already concatenated, ``cat([x, t[:, None]])``:
the same network, keys and time convention as the authors' moons files. fewstep reads the sizes
of such a checkpoint off its weight shapes: dim = out_dim (a velocity has the shape of x), the
first layer takes dim + 1 inputs, any width w. A model built with ``time_varying=False`` or with
out_dim != dim is refused (it is not a velocity field v(x, t)). The starting noise is N(0, I) in
dim dimensions, TorchCFM's usual source; a library checkpoint carries no data set, so it gets no
``sample_data``. ``__main__.MLP`` names whatever class a notebook defined, so it is accepted only
in the exact layout of the authors' six files (2-D, width 64).

Loading: ``torch.load(path, weights_only=True)`` inside an allow-list holding stand-ins for
``__main__.MLP`` and ``torchcfm.models.models.MLP`` and the torch.nn classes above, and nothing
else (torchcfm is never imported); the tensors are then copied into fewstep's own module. A
checkpoint that names any other class is refused before loading. A plain state_dict with the
same keys is accepted too, its sizes read off the weight shapes like a library checkpoint's.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..denoiser import Denoiser
from ..errors import ModelSpecError
from ..io import sha256_file
from ..schedules import Flow
from ._common import attach

NAMES: tuple[str, ...] = ("cfm", "otcfm", "sbcfm", "flow_matching", "stochastic_interpolant", "vp_flow")
ENV_DIR = "FEWSTEP_TORCHCFM_DIR"
#: the sizes of the authors' moons models (and the defaults of :class:`TorchCFMNet`)
DIM, WIDTH = 2, 64
NOTEBOOK_CLASS = "__main__.MLP"  # the authors' notebook class: the six moons files
LIBRARY_CLASS = "torchcfm.models.models.MLP"  # the TorchCFM library's MLP
#: the pickle globals a TorchCFM MLP checkpoint may name beyond torch's own weights-only set
ALLOWED_GLOBALS = (
    NOTEBOOK_CLASS,
    LIBRARY_CLASS,
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.linear.Linear",
    "torch.nn.modules.activation.SELU",
)
_LAYERS = (nn.Linear, nn.SELU, nn.Linear, nn.SELU, nn.Linear, nn.SELU, nn.Linear)


def mlp_layout(dim: int = DIM, width: int = WIDTH) -> nn.Sequential:
    """The TorchCFM network: (B, dim + 1) = cat([x, tau]) -> (B, dim) velocity."""
    return nn.Sequential(
        nn.Linear(dim + 1, width),
        nn.SELU(),
        nn.Linear(width, width),
        nn.SELU(),
        nn.Linear(width, width),
        nn.SELU(),
        nn.Linear(width, dim),
    )


class PickledMLP(nn.Module):
    """Stand-in for the authors' ``__main__.MLP`` class, which the unpickler may build.

    Unpickling never calls ``__init__``: it creates the object and fills its ``__dict__`` with
    modules of the allowed classes (and plain values such as ``time_varying``), whose layout
    :func:`_state_from` then checks.
    """

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp_layout()


class LibraryMLP(PickledMLP):
    """Stand-in for the TorchCFM library's ``torchcfm.models.models.MLP``, built the same way."""


class TorchCFMNet(nn.Module):
    """fewstep's copy of the TorchCFM MLP, called as ``net(x, t_net)``.

    x: (B, dim); t_net: (B,), the authors' time tau = 1 - t. Returns dx/dt in fewstep's time
    (t = 1 at the noise), i.e. minus the authors' velocity, shape (B, dim).
    """

    def __init__(self, dim: int = DIM, width: int = WIDTH) -> None:
        super().__init__()
        self.dim, self.width = int(dim), int(width)
        self.net = mlp_layout(self.dim, self.width)

    def velocity(self, x: Tensor, tau: Tensor) -> Tensor:
        """The authors' velocity dx/dtau at (x (B, dim), tau (B,)): shape (B, dim)."""
        return self.net(torch.cat([x, tau.to(x.dtype).reshape(-1, 1)], dim=1))

    def forward(self, x: Tensor, t_net: Tensor, **_: Any) -> Tensor:
        return -self.velocity(x, t_net)


# ----------------------------------------------------------------------------- locating files
def default_dir() -> Path:
    """$FEWSTEP_TORCHCFM_DIR, else ../shared/data/torchcfm-gaussian-moons beside the repository."""
    env = os.environ.get(ENV_DIR)
    if env:
        return Path(env).expanduser()
    return (Path(__file__).parents[3] / ".." / "shared" / "data" / "torchcfm-gaussian-moons").resolve()


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """The .pt file for a short name (``NAMES``, optionally with ``_v1``) or a path."""
    key = str(name_or_path)
    short = key[:-3] if key.endswith("_v1") else key
    if short in NAMES:
        folder = default_dir()
        if not folder.is_dir():
            how = f"${ENV_DIR}={os.environ[ENV_DIR]}" if os.environ.get(ENV_DIR) else "the default folder"
            raise ModelSpecError(
                f"torchcfm:{key}: no TorchCFM checkpoint folder at {folder} ({how}); set {ENV_DIR} to the "
                f"folder holding {short}_v1.pt, or pass the path to the .pt file"
            )
        path = folder / f"{short}_v1.pt"
    else:
        path = Path(key).expanduser()
        if path.suffix != ".pt" and not path.exists():
            raise ModelSpecError(f"torchcfm:{key}: not a model name or a .pt file; names: {', '.join(NAMES)}")
    if not path.is_file():
        raise ModelSpecError(f"torchcfm:{key}: checkpoint {path} does not exist; names: {', '.join(NAMES)}")
    return path


# ----------------------------------------------------------------------------- safe loading
def _refuse_foreign_globals(path: Path) -> None:
    """Raise ModelSpecError naming any class or function in the pickle outside the allow-list."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except (ValueError, RuntimeError, pickle.UnpicklingError, EOFError) as e:
        raise ModelSpecError(f"{path}: not a torch.save checkpoint ({_first_line(e)})") from None
    foreign = sorted(set(found) - set(ALLOWED_GLOBALS))
    if foreign:
        raise ModelSpecError(
            f"{path}: refused: the checkpoint names {', '.join(foreign)}, which is not part of the TorchCFM MLP "
            f"(allowed: {', '.join(ALLOWED_GLOBALS)}); fewstep never runs pickled code: re-save the weights "
            f"with torch.save(model.state_dict(), path)"
        )


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:200] if lines else type(e).__name__


def _check_torch() -> None:
    """Safe loading needs torch's allow-list API (safe_globals with (class, name) pairs, torch >= 2.6)."""
    ser = torch.serialization
    if not (hasattr(ser, "safe_globals") and hasattr(ser, "get_unsafe_globals_in_checkpoint")):
        raise ModelSpecError(
            f"loading TorchCFM checkpoints safely needs torch >= 2.6 (weights-only allow-lists); this is torch "
            f"{torch.__version__}: upgrade torch"
        )


def read_checkpoint(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` with only the TorchCFM MLP classes allowed."""
    _check_torch()
    _refuse_foreign_globals(path)
    allowed: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [
        (PickledMLP, NOTEBOOK_CLASS),
        (LibraryMLP, LIBRARY_CLASS),
        nn.Sequential,
        nn.Linear,
        nn.SELU,
    ]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, AttributeError, TypeError) as e:
        raise ModelSpecError(f"{path}: cannot be loaded with weights_only=True ({_first_line(e)})") from None


def _state_from(obj: Any, path: Path) -> tuple[dict[str, Tensor], str]:
    """The tensors of a loaded checkpoint, keyed like :class:`TorchCFMNet`'s state_dict, and what
    it held: "notebook" (``__main__.MLP``), "library" (``torchcfm.models.models.MLP``) or "state_dict"."""
    if isinstance(obj, PickledMLP):
        kind = "library" if isinstance(obj, LibraryMLP) else "notebook"
        cls = LIBRARY_CLASS if kind == "library" else NOTEBOOK_CLASS
        if obj.__dict__.get("time_varying", True) is False:
            raise ModelSpecError(
                f"{path}: the {cls} was built with time_varying=False: it takes no time input, so it is not a "
                f"velocity field v(x, t); TorchCFM flow models are MLP(dim, time_varying=True)"
            )
        seq = obj.__dict__.get("_modules", {}).get("net")
        if not isinstance(seq, nn.Sequential):
            raise ModelSpecError(f"{path}: the MLP has no 'net' Sequential; expected the TorchCFM MLP layout")
        kinds = tuple(type(m) for m in seq)
        if kinds != _LAYERS:
            got = ", ".join(k.__name__ for k in kinds)
            raise ModelSpecError(f"{path}: wrong layout: net = Sequential({got}); expected Linear, SELU x 3, Linear")
        return {f"net.{k}": v for k, v in seq.state_dict().items()}, kind
    if isinstance(obj, Mapping) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        return dict(obj), "state_dict"
    raise ModelSpecError(
        f"{path}: holds a {type(obj).__name__}, not a TorchCFM MLP or its state_dict; "
        f"expected a whole pickled {LIBRARY_CLASS} or {NOTEBOOK_CLASS}, or torch.save(model.state_dict())"
    )


def _sizes(state: Mapping[str, Tensor], kind: str, path: Path) -> tuple[int, int]:
    """(dim, width) of the network: read off the first and last weights, except for the authors'
    notebook class, whose only known layout is the moons one (:data:`DIM`, :data:`WIDTH`)."""
    first, last = state.get("net.0.weight"), state.get("net.6.weight")
    if kind == "notebook" or first is None or last is None or first.dim() != 2 or last.dim() != 2:
        return DIM, WIDTH  # the shape check in load_net names whatever differs
    (width, inputs), (outputs, _) = first.shape, last.shape
    if inputs != outputs + 1 or outputs < 1 or width < 1:
        raise ModelSpecError(
            f"{path}: the network takes {inputs} inputs and returns {outputs}: a TorchCFM velocity field takes "
            f"dim + 1 (x and the time) and returns dim, as MLP(dim, time_varying=True) with out_dim = dim does"
        )
    return int(outputs), int(width)


def read_net(path: str | os.PathLike) -> tuple[TorchCFMNet, str]:
    """:func:`load_net` and what the checkpoint held ("notebook", "library" or "state_dict")."""
    path = Path(path)
    state, kind = _state_from(read_checkpoint(path), path)
    net = TorchCFMNet(*_sizes(state, kind, path))
    want = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if set(got) != set(want):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        raise ModelSpecError(
            f"{path}: wrong layout: missing {missing or 'nothing'}, unexpected {extra or 'nothing'}; "
            f"expected the keys {sorted(want)}"
        )
    bad = [f"{k} {got[k]} (expected {want[k]})" for k in sorted(want) if got[k] != want[k]]
    if bad:
        raise ModelSpecError(f"{path}: wrong layout: {'; '.join(bad)}")
    broken = [k for k in sorted(state) if not torch.isfinite(state[k]).all()]
    if broken:
        raise ModelSpecError(f"{path}: the weights {', '.join(broken)} hold NaN or inf: the checkpoint is damaged")
    net.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    return net.eval().requires_grad_(False), kind


def load_net(path: str | os.PathLike) -> TorchCFMNet:
    """A :class:`TorchCFMNet` holding the weights of the checkpoint at ``path`` (frozen, eval mode)."""
    return read_net(path)[0]


# ----------------------------------------------------------------------------- the Denoiser
def moons_data(n: int, generator: torch.Generator | None = None) -> Tensor:
    """n i.i.d. draws of the data the models were trained on: float32 (n, 2), on the CPU.

    The authors' ``sample_moons`` is torchdyn's ``generate_moons(n, noise=0.2) * 3 - 1``, which is
    not scikit-learn's ``make_moons``: points lie exactly on the two half circles (cos a, sin a)
    and (1 - cos a, 1/2 - sin a), a uniform on [0, pi], and one u ~ U(0, 0.2) per point is added
    to both coordinates (a shift along the diagonal, not Gaussian noise). Half the points (n // 2)
    go to the first moon; the rows are shuffled. ``generator`` defaults to one seeded with 0.
    """
    n = int(n)
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    a = torch.pi * torch.rand(n, generator=g, dtype=torch.float64)
    first = torch.arange(n) < n // 2
    x = torch.where(first, torch.cos(a), 1.0 - torch.cos(a))
    y = torch.where(first, torch.sin(a), 0.5 - torch.sin(a))
    u = 0.2 * torch.rand(n, 1, generator=g, dtype=torch.float64)
    pts = (torch.stack([x, y], 1) + u) * 3.0 - 1.0
    return pts[torch.randperm(n, generator=g)].to(torch.float32)


def load_torchcfm(name_or_path: str | os.PathLike, device: str | torch.device = "cpu", **kwargs: Any) -> Denoiser:
    """A Denoiser for a TorchCFM checkpoint: a short name from ``NAMES`` (the gaussian-moons models)
    or a .pt path (those, a whole pickled ``torchcfm.models.models.MLP`` of any dim and width, or a
    state_dict of one).

    Schedule ``Flow(time_reversed=True)``, prediction ``velocity``, sample_shape (dim,), starting
    noise N(0, I). Keyword: ``t_min`` (the schedule's smallest network time, default 1e-3).
    The result has ``name`` "torchcfm:NAME", ``identity`` {"torchcfm": file name, "sha256"}, and,
    for the authors' 2-D moons class (or a 2-D state_dict), ``sample_data(n, generator=None) ->
    (n, 2)``, draws of the moons the models were trained on (:func:`moons_data`; the data reference
    set of :func:`fewstep.metrics.reference.model_data`). A library checkpoint names no data set,
    so it has no ``sample_data``.
    """
    bad = sorted(set(kwargs) - {"t_min"})
    if bad:
        raise ModelSpecError(f"torchcfm:{name_or_path} does not take {', '.join(map(repr, bad))}; it takes: t_min")
    path = resolve_checkpoint(name_or_path)
    net, kind = read_net(path)
    schedule = Flow(t_min=float(kwargs.get("t_min", 1e-3)), time_reversed=True)
    den = Denoiser(
        net,
        schedule,
        prediction="velocity",
        sample_shape=(net.dim,),
        name=f"torchcfm:{name_or_path}",
        identity={"torchcfm": path.name, "sha256": sha256_file(path)},
    )
    if kind != "library" and net.dim == DIM:
        attach(den, sample_data=moons_data)
    return den.to(device)


__all__ = [
    "ALLOWED_GLOBALS",
    "ENV_DIR",
    "LIBRARY_CLASS",
    "LibraryMLP",
    "NAMES",
    "NOTEBOOK_CLASS",
    "PickledMLP",
    "TorchCFMNet",
    "default_dir",
    "load_net",
    "load_torchcfm",
    "moons_data",
    "read_checkpoint",
    "read_net",
    "resolve_checkpoint",
]
