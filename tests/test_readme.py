"""The README's code is right (issue 20, suite item 3).

Every ```python block of README.md runs here as written, in a temporary working folder (its ``out=`` and
artifact paths land there), with the objects a user brings injected into its namespace as tiny ones:
``my_net`` (the exact noise prediction of Gaussian data: a cheap function of x), ``noise`` and ``pipe`` (a
tiny random-weight unconditional DDPMPipeline). The README's own fit runs for real, with the method's fit
size and the default teacher shrunk for the test only (``small_fits``). Each block's outcome is then checked.

Every command line of its ```bash blocks is parsed, not run: ``fewstep ...`` against the typer app (the
command exists, every ``--option`` is one of its parameters, the values parse, required options are given),
``torchrun ... -m fewstep -- ...`` with torchrun's own parser and then as a fewstep line, ``python
benchmarks/gpu.py ...`` with that script's parser, ``make TARGET`` against the Makefile.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import nn

import fewstep
from fewstep import VPDiscrete

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHAPE = (3, 32, 32)  # the README's sample_shape

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")


def blocks(lang: str) -> list[str]:
    """The fenced code blocks of README.md in ``lang``, in order."""
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(), re.S | re.M)


# ----------------------------------------------------------------------------- user objects
class GaussianEps(nn.Module):
    """The exact noise prediction for data x0 ~ N(0, s^2 I) under ``schedule``: eps = sigma x / (alpha^2 s^2 +
    sigma^2), called as the README's ``my_net(x, t_net)``."""

    def __init__(self, schedule: Any, s: float = 0.5) -> None:
        super().__init__()
        self.schedule, self.s = schedule, s

    def forward(self, x: torch.Tensor, t_net: torch.Tensor, **_: Any) -> torch.Tensor:
        t = self.schedule.solver_time(t_net.to(torch.float64))
        a, g = self.schedule.alpha(t), self.schedule.sigma(t)
        k = (g / (a**2 * self.s**2 + g**2)).to(x.dtype).reshape(-1, *[1] * (x.dim() - 1))
        return k * x


def tiny_pipe() -> Any:
    """A seeded random-weight unconditional DDPMPipeline on 3 x 8 x 8 images."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def user_objects() -> dict[str, Callable[[], Any]]:
    """What a README block may use without defining it, by name (built only for blocks that name it)."""
    return {
        "my_net": lambda: GaussianEps(VPDiscrete("linear")),
        "noise": lambda: torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(7)),
        "pipe": tiny_pipe,
    }


def saved_solver_for(model: fewstep.Denoiser, path: Path) -> None:
    """A learned-solver artifact for ``model`` at ``path`` (UniPC's tables as a learned solver, nudged off them),
    for a block that loads "my-solver" without fitting it."""
    from fewstep.fit.methods import from_classic
    from fewstep.sampling import build_tableau
    from fewstep.solvers.artifact import save_solver, solver_doc

    solver = from_classic(model, build_tableau(model, "unipc@time", 5), "s4s-alt", decouple=0.3)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in solver.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        save_solver(path, solver_doc(solver.tableau(), model.schedule, model, "s4s-alt"))


@pytest.fixture
def small_fits(monkeypatch, tmp_path):
    """The README's ``fit(...)`` at a test's size: tiny method sizes and a 20-NFE teacher, a private cache."""
    from fewstep.fit import api
    from fewstep.fit.teacher_spec import TeacherSpec

    small = {
        "samples": 16,
        "val_samples": 8,
        "confirm_samples": 8,
        "steps": 6,
        "batch": 8,
        "eval_every": 3,
        "screen_starts": 1,
        "screen_seeds": 1,
    }
    method_defaults = api.method_defaults
    monkeypatch.setattr(api, "method_defaults", lambda *a: method_defaults(*a).with_options(**small))
    monkeypatch.setattr(api, "default_teacher", lambda model, nfe=None: TeacherSpec("unipc3", "logsnr", 20))
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))


# ----------------------------------------------------------------------------- what each block must do
def check_using_it(ns: dict[str, Any], cwd: Path) -> None:
    """The "Using it" block: a classic solve, a real fit saved to my-solver, the saved solver run on noise."""
    model, res = ns["model"], ns["res"]
    art = cwd / "my-solver" / "solver.json"
    assert art.is_file() and Path(res.path).resolve() == art.resolve()
    loaded = fewstep.load_solver(cwd / "my-solver")
    assert loaded.nfe == 5 and loaded.doc["model"]["fingerprint"] == model.fingerprint()
    x = ns["x"]
    assert x.shape == ns["noise"].shape and bool(torch.isfinite(x).all())
    torch.testing.assert_close(x, fewstep.sample(model, ns["noise"], solver=loaded), rtol=1e-5, atol=1e-6)


def check_diffusers_both_ways(ns: dict[str, Any], cwd: Path) -> None:
    """The diffusers block: the learned solver inside the unmodified pipeline gives fewstep.sample's samples."""
    from fewstep.integrations.diffusers_scheduler import FewStepScheduler

    pipe, model = ns["pipe"], ns["model"]
    assert isinstance(pipe.scheduler, FewStepScheduler) and ns["unet_calls"] == [5]
    assert len(ns["images"]) == 1 and ns["images"][0].size == (8, 8)
    out = pipe(num_inference_steps=5, generator=torch.Generator().manual_seed(11), output_type="np").images
    noise = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        ref = fewstep.sample(model, noise, solver=fewstep.load_solver(cwd / "my-solver"))
    want = (ref / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    torch.testing.assert_close(torch.as_tensor(out), want, rtol=1e-5, atol=1e-5)


#: (a text that marks a block, what must hold after it ran); every README python block must match one
CHECKS: list[tuple[str, Callable[[dict[str, Any], Path], None]]] = [
    ('res = fit(model, "s4s-alt"', check_using_it),
    ("FewStepScheduler.from_solver(", check_diffusers_both_ways),
]


def prepare(code: str, ns: dict[str, Any], cwd: Path) -> None:
    """What a block takes from the user besides objects: a my-solver artifact for its pipeline's network, and
    a count of the network's calls."""
    if "pipe" in ns:
        calls = ns["unet_calls"] = [0]
        ns["pipe"].unet.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    if '"my-solver"' in code and "fit(" not in code and "from_diffusers(pipe.unet" in code:
        from fewstep.integrations.diffusers_in import from_diffusers

        saved_solver_for(from_diffusers(ns["pipe"].unet, ns["pipe"].scheduler.config), cwd / "my-solver")


PY_BLOCKS = blocks("python")


def test_readme_has_the_python_blocks_checked_here():
    assert len(PY_BLOCKS) >= 2
    for code in PY_BLOCKS:
        assert [m for m, _ in CHECKS if m in code], f"README python block without a check here:\n{code}"


@pytest.mark.parametrize("index", range(len(PY_BLOCKS)))
def test_readme_python_block_runs(index, tmp_path, monkeypatch, small_fits, one_thread):
    code = PY_BLOCKS[index]
    cwd = tmp_path / "work"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    ns: dict[str, Any] = {"__name__": f"readme_block_{index}"}
    ns.update({k: make() for k, make in user_objects().items() if re.search(rf"\b{k}\b", code)})
    prepare(code, ns, cwd)
    exec(compile(code, f"README.md python block {index + 1}", "exec"), ns)
    for marker, check in CHECKS:
        if marker in code:
            check(ns, cwd)


# ----------------------------------------------------------------------------- command lines
def cli_lines() -> list[list[str]]:
    """Every command of the README's bash blocks as argv (continuation lines joined, comments dropped)."""
    out = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                out.append(argv)
    return out


def check_fewstep(args: list[str]) -> None:
    """``fewstep ARGS``: the command exists, its options are its own, and the line parses (nothing runs)."""
    from typer.main import get_command

    from fewstep.cli import app

    group = get_command(app)
    assert args and args[0] in group.commands, f"no fewstep command {args[:1]}"
    cmd = group.commands[args[0]]
    known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")}
    unknown = [a.split("=")[0] for a in args[1:] if a.startswith("--") and a.split("=")[0] not in known]
    assert not unknown, f"fewstep {args[0]} has no option {unknown}"
    cmd.make_context(f"fewstep {args[0]}", list(args[1:]))  # types, ranges, required options


def check_torchrun(args: list[str]) -> None:
    from torch.distributed.run import get_args_parser

    ns = get_args_parser().parse_args(args)
    assert ns.module and ns.training_script == "fewstep", "README torchrun lines run -m fewstep"
    rest = list(ns.training_script_args)
    check_fewstep(rest[1:] if rest[:1] == ["--"] else rest)


@functools.cache
def gpu_bench() -> ModuleType:
    """benchmarks/gpu.py as a module (it is a script, not part of the package), loaded once."""
    spec = importlib.util.spec_from_file_location("readme_gpu_bench", ROOT / "benchmarks" / "gpu.py")
    assert spec is not None and spec.loader is not None, "benchmarks/gpu.py is missing"
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    return gpu


def check_gpu_bench(args: list[str]) -> None:
    gpu_bench().parse_args(args)  # BadInput on an unknown option or a missing required one


def check_make(args: list[str]) -> None:
    targets = set(re.findall(r"^([A-Za-z0-9_-]+):", (ROOT / "Makefile").read_text(), re.M))
    assert set(args) <= targets, f"Makefile has no target {sorted(set(args) - targets)}"


def check_line(argv: list[str]) -> None:
    if argv[0] == "fewstep":
        return check_fewstep(argv[1:])
    if argv[0] == "torchrun":
        return check_torchrun(argv[1:])
    if argv[:2] == ["python", "benchmarks/gpu.py"]:
        return check_gpu_bench(argv[2:])
    if argv[0] == "make":
        return check_make(argv[1:])
    raise AssertionError(f"README command not checked here: {shlex.join(argv)}")


CLI = cli_lines()


def test_readme_has_command_lines():
    kinds = {a[0] for a in CLI}
    assert {"fewstep", "torchrun", "python", "make"} <= kinds and len(CLI) >= 15


@pytest.mark.parametrize("argv", CLI, ids=[shlex.join(a)[:70] for a in CLI])
def test_readme_command_line_options_exist(argv):
    check_line(argv)


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        (["fewstep", "fit", "--model", "zoo:gmm", "--out", "x", "--no-such-option", "1"], "assert", "no option"),
        (["fewstep", "nosuchcommand"], "assert", "no fewstep command"),
        (["fewstep", "fit", "--model", "zoo:gmm"], "click", "Missing parameter: out"),  # --out is required
        (["torchrun", "--nproc-per-node=2", "-m", "fewstep", "--", "eval", "--nfee", "5"], "assert", "no option"),
        (
            ["python", "benchmarks/gpu.py", "--pipeline", "p", "--prompts", "q", "--nfe", "5", "--no-such-option"],
            "gpu",
            "unrecognized arguments: --no-such-option",
        ),
    ],
)
def test_the_line_check_catches_a_wrong_line(bad, error, match):
    import typer  # the cli extra, as in check_fewstep

    expected: type[Exception] = {
        "assert": AssertionError,  # the checks here
        "click": typer.BadParameter,  # click's MissingParameter, from make_context
        "gpu": gpu_bench().BadInput,  # benchmarks/gpu.py's one-line refusal
    }[error]
    with pytest.raises(expected, match=match):
        check_line(bad)
