"""fewstep under ``torchrun --nproc-per-node=2`` (CPU, gloo) on zoo:gmm, against the same commands in one process.

Every case runs the venv's ``torchrun --standalone`` (or ``python -m fewstep``) as a subprocess with
OMP_NUM_THREADS=1, HF_HUB_OFFLINE=1 and FEWSTEP_CACHE in a temporary folder, under a timeout (a hang fails the
case). What is compared, and how closely:

* teacher shards: bit-identical (each shard is made whole by one process, on the same batches);
* a fit with ``--noise-groups 2``: bit-identical under one and two processes, and when killed under two and
  resumed under one (each noise group is one forward/backward pass whatever process runs it, and the groups'
  gradients are added in group order);
* a fit with the default groups (one per process: one group under one process, two under two): to ``RTOL``
  (relative). The batch's gradient is then added up in another order; the first step's parameters differ by
  ~1e-14 (float64) and the float32 network evaluations carry that into ~1e-6 after this fit's 100 steps
  (measured 3e-7 to 9e-7 at K = 2, 4e-7 at K = 3). How far such differences grow depends on the fit: over a
  long, unsteady fit they grow as large as what splitting the batch into micro-batches in one process does
  (benchmarks/distributed.py), which is why ``--noise-groups`` exists. ``RTOL`` leaves two orders of magnitude
  for other CPUs' kernels; discrete choices (start, screening, kept start) and every network-evaluation count
  must be equal;
* eval tables: bit-identical but for wall times (zoo:gmm is analytic: a sample does not depend on the batch
  it is solved in, and the per-sample errors are gathered in seed order before any mean).

The K = 3 run (slow on two cores) runs with FEWSTEP_DIST_ALL=1.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():  # pragma: no cover - a torch built without distributed support
    pytest.skip("torch.distributed is not available", allow_module_level=True)

TORCHRUN = Path(sys.executable).with_name("torchrun")
TIMEOUT = 120  # seconds per subprocess
RTOL = 1e-4
ALL = os.environ.get("FEWSTEP_DIST_ALL", "") == "1"
FIT = [
    "fit",
    "--model",
    "zoo:gmm",
    "--nfe",
    "4",
    "--samples",
    "64",
    "--val-samples",
    "32",
    "--confirm-samples",
    "32",
    "--steps",
    "100",
    "--start",
    "unipc@logsnr",
    "--json",
]
CKPT = "fit-checkpoint.safetensors"


def _env(cache: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in ("FEWSTEP_DEBUG", "PYTHONWARNINGS", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(FEWSTEP_CACHE=str(cache), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **extra)
    return env


def _cmd(k: int, args: list[str]) -> list[str]:
    if k == 1:
        return [sys.executable, "-m", "fewstep", *args]
    return [str(TORCHRUN), "--standalone", f"--nproc-per-node={k}", "-m", "fewstep", "--", *args]


def _run(k: int, args: list[str], cache: Path, **extra: str) -> subprocess.CompletedProcess:
    p = subprocess.run(_cmd(k, args), env=_env(cache, **extra), capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, f"{' '.join(args)} under {k} processes: exit {p.returncode}\n{p.stderr[-3000:]}"
    return p


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, ValueError, IndexError):
                continue
    return sorted(out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """K = 1 and 2 with the default groups (K = 3 too with FEWSTEP_DIST_ALL=1), and K = 1 with two noise groups:
    what K = 2 runs by default."""
    if not TORCHRUN.exists():
        pytest.skip(f"no torchrun beside {sys.executable}")
    root = tmp_path_factory.mktemp("dist")
    out: dict[object, object] = {"root": root}
    for k, name, extra in [
        (1, "k1", []),
        (1, "g2", ["--noise-groups", "2"]),
        (2, "k2", []),
        *([(3, "k3", [])] if ALL else []),
    ]:
        p = _run(k, [*FIT, *extra, "--eval-samples", "64", "--out", str(root / name)], root / f"cache-{name}")
        out[name] = json.loads(p.stdout)
    return out


def _shards(cache: Path) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return {p.name: load_file(p) for p in sorted(cache.glob("teacher/*/seeds-*.safetensors"))}


def _params(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "params.safetensors")


def _close(a: float | None, b: float | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and math.isclose(a, b, rel_tol=RTOL))


def _same_artifact(a: Path, b: Path, exact: bool = False) -> None:
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        x, y = pa[k].double(), pb[k].double()
        assert x.shape == y.shape
        if exact:
            assert torch.equal(pa[k], pb[k]), f"{k}: {x} vs {y}"
            continue
        scale = max(1.0, float(x.abs().max())) if x.numel() else 1.0
        assert float((x - y).abs().max() if x.numel() else 0.0) <= RTOL * scale, f"{k}: {x} vs {y}"
    da, db = (json.loads((p / "solver.json").read_text()) for p in (a, b))
    for key in ("method", "nfe", "schedule", "model", "start", "teacher"):
        assert da[key] == db[key], key
    assert {k: v for k, v in da["fit"].items() if k != "noise_groups"} == {
        k: v for k, v in db["fit"].items() if k != "noise_groups"
    }
    if exact:
        for key in ("grid", "eval_times", "tableau", "validation", "history"):
            assert da[key] == db[key], key
        return
    va, vb = da["validation"], db["validation"]
    assert va["kept_start"] == vb["kept_start"]
    assert [r["solver"] for r in va["classic_ranking"]] == [r["solver"] for r in vb["classic_ranking"]]
    for key in ("rmse_to_teacher", "start_rmse_to_teacher", "confirm_rmse_to_teacher", "confirm_start_rmse_to_teacher"):
        assert _close(va[key], vb[key]), (key, va[key], vb[key])
    assert [h["step"] for h in da["history"]] == [h["step"] for h in db["history"]]
    for ha, hb in zip(da["history"], db["history"], strict=True):
        assert _close(ha["val"], hb["val"]) and _close(ha["loss"], hb["loss"]), (ha, hb)
    for t in (da["grid"], db["grid"]), (da["eval_times"], db["eval_times"]):
        assert all(_close(x, y) for x, y in zip(*t, strict=True))


def _same_table(a: dict, b: dict, learned_exact: bool = False) -> None:
    assert {k: v for k, v in a.items() if k not in ("results", "artifact")} == {
        k: v for k, v in b.items() if k not in ("results", "artifact")
    }
    ra, rb = a["results"], b["results"]
    assert [(r["solver"], r["grid"], r["nfe"]) for r in ra] == [(r["solver"], r["grid"], r["nfe"]) for r in rb]
    for x, y in zip(ra, rb, strict=True):
        x, y = ({k: v for k, v in r.items() if k not in ("seconds", "artifact")} for r in (x, y))  # two folders
        if x["grid"] == "learned" and not learned_exact:
            assert _close(x["rmse"], y["rmse"]) and _close(x["rmse_sem"], y["rmse_sem"]), (x, y)
        else:
            assert x == y


def test_teacher_shards_are_bit_identical_to_one_process(runs):
    root = runs["root"]
    one, two = _shards(root / "cache-k1"), _shards(root / "cache-k2")
    assert one and one.keys() == two.keys()
    for name in one:
        assert one[name].keys() == two[name].keys()
        for key in one[name]:
            assert torch.equal(one[name][key], two[name][key]), f"{name}: {key}"
    man1, man2 = (
        json.loads(next((root / c).glob("teacher/*/manifest.json")).read_text()) for c in ("cache-k1", "cache-k2")
    )
    assert man1 == man2  # rank 0 listed every shard the two processes wrote


def test_an_interrupted_multi_process_teacher_resumes_in_one_process_with_the_same_shards(runs, tmp_path, one_thread):
    """What a killed two-process teacher run leaves (one rank's shard written, not listed; another never written)
    is completed by one process: the missing shard bit-identical, the unlisted one reused and listed."""
    from fewstep.fit.teacher import default_teacher, generate_teacher
    from fewstep.seeds import fit_seeds
    from fewstep.specs import load_model

    root = runs["root"]
    cache = tmp_path / "cache"
    shutil.copytree(root / "cache-k2", cache)
    folder = next(cache.glob("teacher/*/"))
    man = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps(dict(man, shards=[]), indent=1))  # nothing listed yet
    train = "seeds-0-128.safetensors"
    (folder / train).unlink()  # never written
    m = load_model("zoo:gmm")
    spec = default_teacher(m)  # the one the runs' fits used
    got = generate_teacher(m, fit_seeds(64), spec, cache_dir=cache, progress=False)
    assert got.computed_evals > 0
    val = [p for p in folder.glob("seeds-*.safetensors") if p.name != train]
    got_val = generate_teacher(m, range(500000, 500032), spec, cache_dir=cache, progress=False)
    assert got_val.computed_evals == 0 and val  # the unlisted shard was used as it is
    want = _shards(root / "cache-k1")
    for name, t in _shards(cache).items():
        assert all(torch.equal(t[k], want[name][k]) for k in t), name
    listed = {e["file"] for e in json.loads((folder / "manifest.json").read_text())["shards"]}
    assert listed == set(want)


def test_a_fit_and_its_table_do_not_depend_on_the_number_of_processes(runs):
    root = runs["root"]
    for k in (2, 3) if ALL else (2,):
        _same_artifact(root / "k1", root / f"k{k}")
        _same_table(runs["k1"], runs[f"k{k}"])
        d1, dk = (json.loads((root / n / "solver.json").read_text()) for n in ("k1", f"k{k}"))
        c1, ck = d1["cost"], dk["cost"]  # network evaluations summed over the processes: the same counts
        assert c1["total_evals"] == ck["total_evals"]
        assert {x: c1["fit"][x] for x in ("forward_evals", "backward_evals")} == {
            x: ck["fit"][x] for x in ("forward_evals", "backward_evals")
        }
        assert dk["timing"]["processes"] == k
        assert not (root / f"k{k}" / CKPT).exists()


def test_with_the_same_noise_groups_a_fit_is_bit_identical_under_one_and_two_processes(runs):
    root = runs["root"]
    _same_artifact(root / "g2", root / "k2", exact=True)
    _same_table(runs["g2"], runs["k2"], learned_exact=True)


def test_an_eval_table_is_the_same_under_two_processes(runs, tmp_path):
    """eval with metrics (gmm: sliced Wasserstein and log-likelihood, computed by rank 0 on the gathered samples),
    a learned solver among classic ones: the same JSON, bit for bit, but for the wall times."""
    args = [
        "eval",
        "--model",
        "zoo:gmm",
        "--nfe",
        "4",
        "--samples",
        "64",
        "--json",
        "--solver",
        "unipc@logsnr",
        "--solver",
        "ddim@time",
        "--solver",
        str(runs["root"] / "k1"),
    ]
    one = json.loads(_run(1, args, tmp_path / "c").stdout)
    two = json.loads(_run(2, args, tmp_path / "c").stdout)
    assert any(r.get("swd") is not None for r in one["results"])
    _same_table(one, two, learned_exact=True)


def test_a_fit_killed_under_two_processes_resumes_in_one_and_ends_where_an_uninterrupted_fit_ends(runs):
    """Both with two noise groups: the resumed fit is the uninterrupted one-process fit, bit for bit."""
    root = runs["root"]
    out, cache = root / "killed", root / "cache-killed"
    args = [*FIT, "--noise-groups", "2", "--eval-samples", "0", "--out", str(out)]
    p = subprocess.Popen(
        _cmd(2, args),
        env=_env(cache),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (out / CKPT).exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        workers = _children(p.pid)
        assert (out / CKPT).exists() and len(workers) == 2, p.stderr.read()[-2000:] if p.poll() is not None else ""
        os.kill(workers[1], signal.SIGKILL)  # one worker dies; torchrun stops the other
        p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode != 0
    assert not (out / "solver.json").exists(), "the fit ended before it was killed"
    _run(1, args, cache)  # resumed by one process
    doc = json.loads((out / "solver.json").read_text())
    assert doc["timing"]["resumed_from_step"] > 0
    assert not (out / CKPT).exists()
    _same_artifact(root / "g2", out, exact=True)


def test_an_error_on_one_rank_stops_the_run_within_seconds_with_its_one_line_message(tmp_path):
    if not TORCHRUN.exists():
        pytest.skip(f"no torchrun beside {sys.executable}")
    args = [*FIT, "--eval-samples", "0", "--out", str(tmp_path / "x")]
    p = subprocess.Popen(
        _cmd(2, args),
        env=_env(tmp_path / "c", FEWSTEP_FAULT="1:fit step 5"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    lines: list[tuple[float, str]] = []

    def read() -> None:
        for ln in p.stderr:
            lines.append((time.monotonic(), ln.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = p.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:  # a hang: fail, and take the whole group down
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        pytest.fail("the run hung after rank 1 raised")
    ended = time.monotonic()
    reader.join(5)
    ours = [(t, ln) for t, ln in lines if ln.startswith("error: rank 1: ")]
    assert code != 0
    assert len(ours) == 1 and "injected fault at fit step 5" in ours[0][1], "\n".join(ln for _, ln in lines)
    assert ended - ours[0][0] < 5.0, f"the run took {ended - ours[0][0]:.1f} s to stop after rank 1's error"
    # no traceback from fewstep's processes (torchrun's own report of the failed worker is its business)
    assert not any("/fewstep/" in ln and 'File "' in ln for _, ln in lines), "\n".join(ln for _, ln in lines)
    others = [ln for _, ln in lines if ln.startswith("error: ") and not ln.startswith("error: rank 1: ")]
    assert all(ln.startswith("error: rank 0: another process of this run stopped") for ln in others), others
    assert not (tmp_path / "x" / "solver.json").exists()


def test_one_process_is_a_world_of_one_with_the_same_helpers():
    """Not under a launcher: rank 0 of 1, every collective a no-op, and the group bookkeeping that several
    processes use gives the rows back in order."""
    from fewstep.distributed import Dist, current, device_for
    from fewstep.errors import FewstepError, ModelOutputError

    d = current()
    assert (d.rank, d.world, d.main) == (0, 1, True) and d.mine(5) and d.share([3, 4, 5]) == [3, 4, 5]
    assert device_for("cuda:1", d) == "cuda:1"  # one process: the device as given
    n, G = 10, 3
    x = torch.arange(n * 2, dtype=torch.float64).view(n, 2)
    assert d.groups(G) == [0, 1, 2]
    assert torch.equal(d.gather_groups([x[g::G] for g in range(G)], G, n), x)
    assert [int(v) for v in d.sum_ints([3, 4])] == [3, 4]
    with pytest.raises(ModelOutputError):
        d.agree(lambda: (_ for _ in ()).throw(ModelOutputError("nan")))
    two = Dist(rank=1, world=2)  # a second process's view: which items are its own
    assert [i for i in range(6) if two.mine(i)] == [1, 3, 5] and two.groups(4) == [1, 3]
    with pytest.raises(FewstepError):  # fewer groups than processes: refused before any collective
        Dist(rank=0, world=3).gather_groups([x], 2, n)


# ================================================================== the end of a run: 20 two-process runs in a row
# Each run forks two processes from one that imported torch once (a run then costs the processes' own work and
# their interpreter shutdown, ~1 s, instead of torchrun's ~4 s). They join by env:// as under torchrun, do a
# collective of each kind, import torch.distributed.nn once joined (what a fit's optimizer imports, through
# torch._dynamo: it can keep the group, and so gloo's worker threads, alive after destroy_process_group, and a
# worker releasing a collective's tensors while the interpreter shuts down would abort the process after its
# complete output, SIGABRT), and end as ``fewstep.cli.main`` ends a completed run: shutdown(), exit_process(0).
# MODE "held": something else keeps the group (exit_process must then skip the interpreter's shutdown, and
# still deliver every line).
EXIT_RUNS = 20
LAUNCHER = r"""
import json, os, socket, sys

import torch

from fewstep import distributed

RUNS, MODE = int(sys.argv[1]), sys.argv[2]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def work(rank, port):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    d = distributed.init("cpu")
    import torch.distributed.nn  # noqa: F401  # what a fit's optimizer imports: part of the case
    rows = d.gather_rows(torch.arange(6.0).view(6, 1)[d.rank::2], 6)
    objs = d.all_gather_object(d.rank)
    n = d.sum_ints([d.rank + 1])[0]
    doc = d.broadcast_object({"rows": rows.view(-1).tolist(), "objs": objs, "n": n} if d.main else None)
    held = torch.distributed.group.WORLD if MODE == "held" else None  # noqa: F841  # a reference kept to the end
    if d.main:
        print(json.dumps(doc))  # block-buffered in a pipe: exit_process must flush it
    distributed.shutdown()
    os.write(2, ("@left " + json.dumps([rank, distributed.backend_threads()]) + "\n").encode())  # one write
    distributed.exit_process(0)


child = None
for i in range(RUNS):
    port = free_port()
    pids = []
    for rank in (0, 1):
        pid = os.fork()
        if pid == 0:
            child = rank
            break
        pids.append(pid)
    if child is not None:
        break
    codes = [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids]
    print("@codes " + json.dumps(codes), file=sys.stderr, flush=True)
if child is not None:
    work(child, port)  # at the top level: its SystemExit ends the interpreter as a script's does
"""


def _runs_in_a_row(mode: str, runs: int, tmp_path: Path) -> tuple[list[list[int]], list[list], list[str], str]:
    """(exit codes of each run's two processes, each process's backend threads left after shutdown, rank 0's
    output lines, what else the processes said on stderr) of ``runs`` forked two-process runs."""
    env = _env(tmp_path / "c")
    env.pop("PYTHONUNBUFFERED", None)  # rank 0's output waits in a buffer until the process flushes it
    p = subprocess.run(
        [sys.executable, "-c", LAUNCHER, str(runs), mode], env=env, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert p.returncode == 0, p.stderr[-3000:]
    codes = [json.loads(ln[7:]) for ln in p.stderr.splitlines() if ln.startswith("@codes ")]
    left = [json.loads(ln[6:]) for ln in p.stderr.splitlines() if ln.startswith("@left ")]
    said = "\n".join(ln for ln in p.stderr.splitlines() if not ln.startswith("@"))
    return codes, left, p.stdout.splitlines(), said


needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="forks its two-process runs")
WANT = {"rows": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0], "objs": [0, 1], "n": 3}


@needs_fork
def test_twenty_two_process_runs_in_a_row_exit_0_with_their_backend_threads_joined(tmp_path):
    codes, left, out, said = _runs_in_a_row("clean", EXIT_RUNS, tmp_path)
    failed = [(i, c) for i, c in enumerate(codes) if c != [0, 0]]
    assert len(codes) == EXIT_RUNS and not failed, f"runs that did not exit 0 (-6: SIGABRT): {failed}\n{said[-2000:]}"
    assert [json.loads(ln) for ln in out] == [WANT] * EXIT_RUNS
    assert sorted(r for r, _ in left) == sorted([0, 1] * EXIT_RUNS)
    if Path("/proc/self/task").is_dir():  # where thread names can be read: the group's threads were joined
        assert all(names == [] for _, names in left), [x for x in left if x[1]][:4]


@needs_fork
def test_a_process_whose_group_is_still_held_after_shutdown_exits_0_with_its_output(tmp_path):
    codes, left, out, said = _runs_in_a_row("held", 10, tmp_path)
    assert codes == [[0, 0]] * 10, said[-2000:]
    assert [json.loads(ln) for ln in out] == [WANT] * 10
    if Path("/proc/self/task").is_dir():
        assert all(names for _, names in left)  # the case exit_process is for: the backend's threads still run
