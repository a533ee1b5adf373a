"""Faults and bad input through the ``fewstep`` command: exit codes, one line on stderr, nothing left on disk.

Every case runs ``python -m fewstep ...`` as a subprocess (env: FEWSTEP_CACHE in a temporary folder,
HF_HUB_OFFLINE=1, OMP_NUM_THREADS=1; cwd: a fresh working folder) and the tests assert on what it did:
its exit code, that stderr holds exactly one ``error:`` (or ``warning:``) line naming the problem, and
that nothing new appeared in the working folder (recursive listings before and after; the cache is
separate) unless the case is meant to write. The in-process versions of these cases are in
test_faults.py.

Each subprocess pays ~2 s for importing torch (and a fit ~2 s more for torch's optimiser machinery), so
the module-scoped fixture ``runs`` launches every selected case at once on 3 worker threads (longest
chains first; cases that need the shared artifact or teacher cache start once it is built in process)
and keeps the results; one parametrized test per case asserts on its result.

By default each kind of fault is covered by the variants that take distinct code paths (37 subprocesses,
~125 CPU-seconds: about a minute on 2 idle cores). ``FEWSTEP_CLI_FAULTS=all`` runs the whole matrix (every
artifact damage through every reader, every shard, manifest, checkpoint and option variant: 96 tests,
several minutes).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import queue
import re
import resource
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ALL = os.environ.get("FEWSTEP_CLI_FAULTS", "") == "all"
WORKERS = 3
TIMEOUT = 240  # seconds per subprocess: a hang fails the case instead of the session
MODEL = "zoo:gmm"

# the fit the shard, manifest and stale-temporary cases run again (its teacher data is in the shared cache)
FIT = [
    "fit",
    "--model",
    MODEL,
    "--nfe",
    "4",
    "--samples",
    "64",
    "--val-samples",
    "32",
    "--confirm-samples",
    "0",
    "--steps",
    "10",
    "--start",
    "unipc@logsnr",
    "--eval-samples",
    "0",
    "--json",
    "--out",
    "X",
]
# a fit long enough to be killed after its first checkpoint
LONG_FIT = [
    "fit",
    "--model",
    MODEL,
    "--nfe",
    "4",
    "--samples",
    "64",
    "--val-samples",
    "32",
    "--confirm-samples",
    "0",
    "--steps",
    "200",
    "--start",
    "unipc@logsnr",
    "--eval-samples",
    "0",
    "--json",
    "--out",
    "X",
]
BLOWUP = [
    "fit",
    "--model",
    MODEL,
    "--nfe",
    "4",
    "--samples",
    "256",
    "--steps",
    "50",
    "--eval-samples",
    "0",
    "--lr-coef",
    "1000",
    "--lr-grid",
    "1000",
    "--out",
    "X",
]
BENCH = [
    "bench",
    "--model",
    MODEL,
    "--nfe",
    "3",
    "--method",
    "s4s",
    "--fit-samples",
    "64",
    "--samples",
    "16",
    "--metrics",
    "none",
    "--out",
    "B",
]
CKPT = "fit-checkpoint.safetensors"
ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
#: cases that cannot say anything here (not launched)
SKIPS = {"path/sample-out-read-only": (ROOT, "running as root: file permissions do not apply")}


# ============================================================================ running fewstep
def _listing(folder: Path) -> set[str]:
    """Every file and folder under ``folder`` (hidden ones too), relative to it."""
    out: set[str] = set()
    for dirpath, dirs, files in os.walk(folder):
        rel = Path(dirpath).relative_to(folder)
        out.update(str(rel / n) for n in dirs + files)
    return out


@dataclass
class Run:
    """One finished ``fewstep`` subprocess."""

    args: list[str]
    code: int
    stdout: str
    stderr: str
    seconds: float
    new: set[str]  # paths that appeared in the working or input folder
    gone: set[str]  # paths that disappeared from them

    def __str__(self) -> str:
        return (
            f"fewstep {' '.join(self.args)}\n  exit {self.code} after {self.seconds:.1f} s\n"
            f"  new on disk: {sorted(self.new)}\n  gone: {sorted(self.gone)}\n"
            f"  stdout: {self.stdout[-1500:]!r}\n  stderr: {self.stderr[-3000:]!r}"
        )

    def lines(self) -> list[str]:
        """stderr's non-empty lines (a progress bar's carriage returns split it too)."""
        return [ln for ln in self.stderr.splitlines() if ln.strip()]


class Space:
    """A case's folders: ``work`` (the cwd), ``inp`` (files the case reads), ``cache`` (FEWSTEP_CACHE)."""

    def __init__(self, root: Path) -> None:
        self.root, self.work, self.inp, self.cache = root, root / "work", root / "in", root / "cache"
        for p in (self.work, self.inp, self.cache):
            p.mkdir(parents=True, exist_ok=True)

    def _snapshot(self) -> set[str]:
        return {f"work/{p}" for p in _listing(self.work)} | {f"in/{p}" for p in _listing(self.inp)}

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("FEWSTEP_DEBUG", "PYTHONWARNINGS")}
        env.update(FEWSTEP_CACHE=str(self.cache), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
        return env

    def run(self, *args: str, preexec: Callable[[], None] | None = None) -> Run:
        before = self._snapshot()
        t0 = time.perf_counter()
        p = subprocess.run(
            [sys.executable, "-m", "fewstep", *args],
            cwd=self.work,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            preexec_fn=preexec,
        )
        secs = time.perf_counter() - t0
        after = self._snapshot()
        return Run(list(args), p.returncode, p.stdout, p.stderr, secs, after - before, before - after)

    def popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "fewstep", *args],
            cwd=self.work,
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )


# ============================================================================ the cases and their scheduler
@dataclass
class Task:
    fn: Callable[[Space, Context], Any]
    priority: int = 1  # higher starts first: long chains before single runs
    setup: bool = False  # needs the shared artifact and teacher cache
    after: str | None = None  # runs once this task has finished (it reads its result)


TASKS: dict[str, Task] = {}
#: tests whose cases read other tasks' results (test name -> task names)
EXTRA_NEEDS: dict[str, list[str]] = {}


def task(name: str, priority: int = 1, setup: bool = False, after: str | None = None) -> Callable:
    def register(fn: Callable) -> Callable:
        assert name not in TASKS, name
        TASKS[name] = Task(fn, priority, setup, after)
        return fn

    return register


class Failed:
    """A task that raised: re-raised by the test that reads it."""

    def __init__(self, exc: BaseException) -> None:
        self.exc, self.text = exc, "".join(traceback.format_exception(exc))


@dataclass
class Context:
    """What tasks share: the built artifact and cache (after setup) and other tasks' results."""

    base: Path
    results: dict[str, Any] = field(default_factory=dict)
    artifact: Path | None = None  # a good 4-step learned solver for zoo:gmm
    cache: Path | None = None  # a teacher cache holding FIT's shards

    def result(self, name: str) -> Any:
        r = self.results[name]
        if isinstance(r, Failed):
            raise RuntimeError(f"task {name} failed:\n{r.text}")
        return r


def _setup(ctx: Context) -> None:
    """The shared artifact and teacher cache, built in process (no torch import to pay)."""
    import torch

    from fewstep.fit.api import fit
    from fewstep.specs import load_model

    d = ctx.base / "setup"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = load_model(MODEL)
        # unipc has a corrector, so the artifact holds every table (C included); FIT's teacher and seeds
        fit(
            model,
            "s4s-alt",
            4,
            out=d / "A",
            samples=64,
            val_samples=32,
            confirm_samples=0,
            steps=10,
            start="unipc@logsnr",
            cache_dir=d / "cache",
            progress=False,
        )
    finally:
        torch.set_num_threads(n)
    ctx.artifact, ctx.cache = d / "A", d / "cache"


def _execute(wanted: set[str], base: Path) -> dict[str, Any]:
    """Run the wanted tasks on WORKERS threads; returns name -> result (or Failed)."""
    ctx = Context(base)
    children: dict[str, list[str]] = {}
    for name in wanted:
        if TASKS[name].after:
            children.setdefault(TASKS[name].after, []).append(name)
    q: queue.PriorityQueue = queue.PriorityQueue()
    order = itertools.count()
    done = threading.Condition()

    def push(name: str) -> None:
        q.put((-TASKS[name].priority, next(order), name))

    def finish(name: str, res: Any) -> None:
        with done:
            ctx.results[name] = res
            for child in children.get(name, []):
                push(child)
            done.notify_all()

    def worker() -> None:
        while True:
            _, _, name = q.get()
            if name is None:
                return
            try:
                res = TASKS[name].fn(Space(base / re.sub(r"[^\w.-]+", "_", name)), ctx)
            except BaseException as e:  # whatever a task raises is kept for the test that reads it
                res = Failed(e)
            finish(name, res)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(WORKERS)]
    for t in threads:
        t.start()
    for name in sorted(wanted):
        if not TASKS[name].setup and not TASKS[name].after:
            push(name)
    later = sorted(n for n in wanted if TASKS[n].setup and not TASKS[n].after)
    if later:
        try:
            _setup(ctx)
        except BaseException as e:  # whatever the setup raises is the result of each task waiting on it
            for name in later:
                finish(name, Failed(e))
            later = []
    for name in later:
        push(name)
    with done:
        while len(ctx.results) < len(wanted):
            done.wait()
    for _ in threads:
        q.put((math.inf, next(order), None))
    for t in threads:
        t.join()
    return ctx.results


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory) -> Callable[[str], Any]:
    """Launch every case the selected tests need, concurrently; returns name -> its result."""
    wanted: set[str] = set()
    for item in request.session.items:
        if getattr(item, "module", None) is not sys.modules[__name__]:
            continue
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("case") in SKIPS and SKIPS[params["case"]][0]:
            continue
        if "case" in params:
            wanted.add(params["case"])
        wanted.update(EXTRA_NEEDS.get(item.originalname, []))
    wanted = {n for n in wanted if n in TASKS}
    for name in list(wanted):  # and what they run after
        while TASKS[name].after:
            name = TASKS[name].after
            wanted.add(name)
    results = _execute(wanted, tmp_path_factory.mktemp("cli-faults"))

    def get(name: str) -> Any:
        r = results[name]
        if isinstance(r, Failed):
            raise r.exc
        return r

    return get


# ============================================================================ assertions
def one_line(r: Run, prefix: str = "error:", *patterns: str) -> str:
    """stderr is exactly one non-empty line starting with ``prefix`` and matching every pattern."""
    lines = r.lines()
    assert len(lines) == 1 and lines[0].startswith(prefix), f"want one {prefix!r} line\n{r}"
    for p in patterns:
        assert re.search(p, lines[0]), f"{p!r} not in the line\n{r}"
    return lines[0]


def refused(r: Run, code: int, *patterns: str) -> str:
    """Exit ``code``, one error line matching ``patterns``, nothing new (or gone) on disk."""
    assert r.code == code, f"want exit {code}\n{r}"
    line = one_line(r, "error:", *patterns)
    assert not r.new and not r.gone, f"the working or input folder changed\n{r}"
    return line


def no_problem_lines(r: Run) -> None:
    """No error, warning or traceback on stderr (progress bars are fine)."""
    bad = [
        ln
        for ln in r.lines()
        if ln.lstrip().startswith(("error", "warning", "Traceback")) or "Error" in ln or "Warning" in ln
    ]
    assert not bad, f"unexpected lines {bad}\n{r}"


def xfail(reason: str) -> pytest.MarkDecorator:
    return pytest.mark.xfail(strict=True, raises=AssertionError, reason=reason)


def cases(names: list[str], bugs: dict[str, str] | None = None) -> list:
    """pytest params: the task names, the known bugs marked xfail (strict)."""
    bugs = bugs or {}
    out = []
    for n in names:
        marks = [xfail(bugs[n])] if n in bugs else []
        if n in SKIPS:
            marks.append(pytest.mark.skipif(SKIPS[n][0], reason=SKIPS[n][1]))
        out.append(pytest.param(n, marks=marks, id=n.split("/", 1)[1]))
    return out


def _copy_cache(ctx: Context, sp: Space) -> Path:
    """The shared teacher cache copied into this case's cache; returns the teacher folder in it."""
    shutil.copytree(ctx.cache, sp.cache, dirs_exist_ok=True)
    folders = list((sp.cache / "teacher").iterdir())
    assert len(folders) == 1, folders
    return folders[0]


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# ============================================================================ 1. a fit whose solves blow up
@task("blowup/again-and-restart", priority=40)
def _blowup(sp: Space, ctx: Context) -> dict[str, Any]:
    first = sp.run(*BLOWUP)
    files = {n: (sp.work / "X" / n).exists() for n in ("solver.json", "params.safetensors", CKPT)}
    doc_text = (sp.work / "X" / "solver.json").read_text() if files["solver.json"] else ""
    again = [sp.run(*BLOWUP)] + ([sp.run(*BLOWUP, "--restart")] if ALL else [])
    return {"runs": [first, *again], "files": files, "doc": doc_text, "work": sp.work}


@pytest.mark.parametrize("case", cases(["blowup/again-and-restart"]))
def test_a_fit_whose_solves_blow_up_keeps_its_start_and_says_so(runs, case):
    res = runs(case)
    first, *again = res["runs"]
    assert first.code == 0, first
    no_problem_lines(first)
    assert res["files"] == {"solver.json": True, "params.safetensors": True, CKPT: False}, first
    assert first.new == {"work/X", "work/X/solver.json", "work/X/params.safetensors"}, first
    doc = json.loads(res["doc"], parse_constant=lambda c: pytest.fail(f"solver.json holds {c}"))
    assert doc["validation"]["kept_start"] is True
    notes = [ln for ln in first.stdout.splitlines() if ln.startswith("note:")]
    assert len(notes) == 1 and "blew up" in notes[0] and "start was kept" in notes[0], first
    for r in again:  # the same command again (and, with FEWSTEP_CLI_FAULTS=all, with --restart) ends the same way
        assert r.code == 0, r
        no_problem_lines(r)
        assert not r.new and not r.gone, r
        assert any(ln.startswith("note:") and "blew up" in ln for ln in r.stdout.splitlines()), r
    assert not (res["work"] / "X" / CKPT).exists()


# ============================================================================ 2. a bad teacher shard
def _rewrite_shard(path: Path, change: Callable | None, meta_change: Callable | None, rechecksum: bool) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    from fewstep.fit.teacher_cache import checksum

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  # safe_open is not iterable
    if change:
        change(t)
    if meta_change:
        meta_change(meta)
    if rechecksum:  # a self-consistent shard: the check after the checksum must catch it
        meta["checksum"] = checksum(t)
    save_file(t, str(path), metadata=meta)


SHARD_EDITS: dict[str, tuple[Callable | None, Callable | None, bool, str]] = {
    # name: (tensor change, metadata change, recompute the checksum, what the warning says)
    "edited": (lambda t: t["target"].__setitem__((0, 0), 3.0), None, False, "checksum"),
    "scaled": (lambda t: t["target"].mul_(1.01), None, False, "checksum"),
    "nan": (lambda t: t["target"].__setitem__((1, 2), float("nan")), None, True, "NaN"),
    "other-model": (None, lambda m: m.__setitem__("fingerprint", "0123456789abcdef"), True, "fingerprint"),
    "other-teacher": (None, lambda m: m.__setitem__("teacher", "ddim@time:10"), True, "teacher"),
}
SHARD_DEFAULT = ["edited", "other-model"]


def _shard_case(edit: str) -> Callable:
    def run(sp: Space, ctx: Context) -> dict[str, Any]:
        folder = _copy_cache(ctx, sp)
        shard = folder / "seeds-0-128.safetensors"
        assert shard.is_file(), sorted(p.name for p in folder.iterdir())
        _rewrite_shard(shard, *SHARD_EDITS[edit][:3])
        r = sp.run(*FIT)
        from safetensors import safe_open

        with safe_open(str(shard), "pt") as f:
            meta = f.metadata()
        return {"run": r, "shard": shard.name, "meta": meta, "cache": _listing(folder)}

    return run


SHARD_CASES = [f"shard/{e}" for e in SHARD_EDITS if ALL or e in SHARD_DEFAULT]
for _e in SHARD_EDITS:
    task(f"shard/{_e}", priority=5, setup=True)(_shard_case(_e))


@pytest.mark.parametrize("case", cases(SHARD_CASES))
def test_a_bad_teacher_shard_is_recomputed_with_one_warning_naming_it(runs, case):
    res = runs(case)
    r = res["run"]
    assert r.code == 0, r
    one_line(r, "warning:", re.escape(res["shard"]), "recomputing", SHARD_EDITS[case.split("/")[1]][3])
    assert r.new == {"work/X", "work/X/solver.json", "work/X/params.safetensors"}, r
    assert res["meta"]["fingerprint"] != "0123456789abcdef" and res["meta"]["teacher"] != "ddim@time:10"
    assert not [p for p in res["cache"] if p.endswith(".tmp")], res["cache"]


# ============================================================================ 3. a malformed manifest
MANIFEST_EDITS: dict[str, Callable[[dict], None]] = {
    "seeds-abc": lambda doc: doc["shards"][0].__setitem__("seeds", ["abc", 1]),
    "seeds-5": lambda doc: doc["shards"][0].__setitem__("seeds", 5),
    "shards-1-2": lambda doc: doc.__setitem__("shards", [1, 2]),
}


def _manifest_case(edit: str) -> Callable:
    def run(sp: Space, ctx: Context) -> dict[str, Any]:
        from fewstep.io import _HOST

        folder = _copy_cache(ctx, sp)
        man = folder / "manifest.json"
        doc = json.loads(man.read_text())
        want = [e["seeds"] for e in doc["shards"]]
        MANIFEST_EDITS[edit](doc)
        man.write_text(json.dumps(doc))
        # and what a SIGKILL during the manifest's write leaves: a temporary named after a process now gone
        stale = folder / f".manifest.json.{_HOST}-{_dead_pid()}.x1y2z3.tmp"
        stale.write_text('{"half": ')
        r = sp.run(*FIT)
        return {
            "run": r,
            "want": want,
            "have": [e["seeds"] for e in json.loads(man.read_text())["shards"]],
            "stale": stale.exists(),
            "tmp": sorted(p for p in _listing(folder) if p.endswith(".tmp")),
        }

    return run


MANIFEST_CASES = [f"manifest/{e}" for e in MANIFEST_EDITS if ALL or e == "seeds-abc"]
for _e in MANIFEST_EDITS:
    task(f"manifest/{_e}", priority=5, setup=True)(_manifest_case(_e))


@pytest.mark.parametrize("case", cases(MANIFEST_CASES))
def test_a_malformed_manifest_is_rebuilt_with_one_warning(runs, case):
    res = runs(case)
    r = res["run"]
    assert r.code == 0, r
    one_line(r, "warning:", r"manifest\.json", "rebuilt from the shards")
    assert r.new == {"work/X", "work/X/solver.json", "work/X/params.safetensors"}, r
    assert res["have"] == res["want"]  # rebuilt from the shards, which describe themselves


@pytest.mark.parametrize("case", cases(["manifest/seeds-abc"]))
def test_the_temporary_of_a_killed_manifest_write_is_removed_by_the_next_run(runs, case):
    res = runs(case)
    assert res["run"].code == 0, res["run"]
    assert not res["stale"] and not res["tmp"], res["tmp"]


# ============================================================================ 4. killed fits, edited checkpoints
@task("checkpoint/killed", priority=60)
def _killed(sp: Space, ctx: Context) -> dict[str, Any]:
    """LONG_FIT killed with SIGKILL as soon as its first checkpoint is on disk."""
    ck = sp.work / "X" / CKPT
    p = sp.popen(*LONG_FIT)
    deadline = time.monotonic() + TIMEOUT
    while not ck.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    out, err = p.communicate()
    assert ck.is_file() and not (sp.work / "X" / "solver.json").exists(), (
        f"the fit ended (exit {p.returncode}) before it could be killed after a checkpoint:\n{err[-2000:]}"
    )
    assert p.returncode == -signal.SIGKILL
    return {"work": sp.work, "cache": sp.cache, "pid": p.pid}


def _ck_rewrite(
    path: Path, change_tensors: Callable | None = None, change_doc: Callable | None = None, rechecksum: bool = True
) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    from fewstep.fit.checkpoint import _checksum

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  # safe_open is not iterable
    doc = json.loads(meta["doc"])
    if change_tensors:
        change_tensors(t)
    if change_doc:
        change_doc(doc)
    meta["doc"] = json.dumps(doc)
    if rechecksum:  # a self-consistent file: the field checks behind the checksum must catch it
        meta["checksum"] = _checksum(t, meta["doc"])
    save_file(t, str(path), metadata=meta)


def _first(t: dict, prefix: str, suffix: str = "") -> str:
    return next(k for k in sorted(t) if k.startswith(prefix) and k.endswith(suffix))


CKPT_EDITS: dict[str, Callable[[Path], None]] = {
    "history-removed": lambda p: _ck_rewrite(p, change_doc=lambda d: d.pop("history")),
    "optimiser-groups-broken": lambda p: _ck_rewrite(p, change_doc=lambda d: d["opt"].__setitem__("param_groups", "x")),
    "optimiser-extra-group": lambda p: _ck_rewrite(
        p, change_doc=lambda d: d["opt"]["param_groups"].append(dict(d["opt"]["param_groups"][0]))
    ),
    "optimiser-tensor-shape": lambda p: _ck_rewrite(
        p,
        change_tensors=lambda t: t.__setitem__(_first(t, "opt.", "exp_avg"), t[_first(t, "opt.", "exp_avg")][..., :1]),
    ),
    "tensor-changed": lambda p: _ck_rewrite(
        p, change_tensors=lambda t: t.__setitem__(_first(t, "cur."), t[_first(t, "cur.")] + 1), rechecksum=False
    ),
    "nan-parameters": lambda p: _ck_rewrite(
        p,
        change_tensors=lambda t: [
            v.fill_(float("nan")) for k, v in t.items() if k.startswith("cur.") and v.is_floating_point()
        ],
    ),
}
CKPT_DEFAULT = ["history-removed", "optimiser-tensor-shape", "tensor-changed"]  # the first also runs --restart
CKPT_BUGS: dict[str, str] = {}  # none open: the bugs these cases found are fixed


def _ckpt_case(edit: str) -> Callable:
    def run(sp: Space, ctx: Context) -> dict[str, Any]:
        killed = ctx.result("checkpoint/killed")
        shutil.copytree(killed["work"], sp.work, dirs_exist_ok=True)
        shutil.copytree(killed["cache"], sp.cache, dirs_exist_ok=True)
        CKPT_EDITS[edit](sp.work / "X" / CKPT)
        rerun = sp.run(*LONG_FIT)
        # the fix the line names (by default once: every restart is a whole fit)
        restart = sp.run(*LONG_FIT, "--restart") if ALL or edit == CKPT_DEFAULT[0] else None
        return {"rerun": rerun, "restart": restart, "left": _listing(sp.work / "X")}

    return run


CKPT_CASES = [f"checkpoint/{e}" for e in CKPT_EDITS if ALL or e in CKPT_DEFAULT]
for _e in CKPT_EDITS:
    task(f"checkpoint/{_e}", priority=20, after="checkpoint/killed")(_ckpt_case(_e))


@pytest.mark.parametrize("case", cases(CKPT_CASES, CKPT_BUGS))
def test_an_edited_checkpoint_of_a_killed_fit_is_refused_naming_it_and_restart(runs, case):
    res = runs(case)
    refused(res["rerun"], 2, r"X/fit-checkpoint\.safetensors", "--restart")
    r = res["restart"]
    if r is None:
        return
    assert r.code == 0, r
    assert not r.lines(), r
    # the fit is finished: its artifact, no checkpoint, no temporary a killed write left
    assert res["left"] == {"solver.json", "params.safetensors"}, res["left"]


# ============================================================================ 5. damaged artifacts
def _setter(path: list, value: Any) -> Callable[[dict], None]:
    def change(doc: dict) -> None:
        node = doc
        for k in path[:-1]:
            node = node[k]
        if value is KeyError:
            del node[path[-1]]
        else:
            node[path[-1]] = value

    return change


ARTIFACT_EDITS: dict[str, tuple[Callable[[dict], None], list[str]]] = {
    "eval-time-7": (
        _setter(["tableau", "eval_times", 1], 7.0),
        [r"tableau\.eval_times must lie in \[0, 1\]", r"\b7\b"],
    ),
    "nan-a": (_setter(["tableau", "a", 0], float("nan")), [r"tableau\.a holds NaN"]),
    "inf-a": (_setter(["tableau", "a", 2], float("inf")), [r"tableau\.a holds NaN or inf"]),
    "inf-C": (_setter(["tableau", "C", 0, 0], float("inf")), [r"tableau\.C holds NaN or inf"]),
    "nan-eval-time": (_setter(["tableau", "eval_times", 0], float("nan")), [r"tableau\.eval_times holds NaN"]),
    "a-1e200": (_setter(["tableau", "a", 1], 1e200), [r"tableau\.a holds 1e\+200"]),
    "B-1e300": (_setter(["tableau", "B", 1, 0], 1e300), [r"tableau\.B holds 1e\+300"]),
    "B_mask-shape": (
        _setter(["tableau", "B_mask"], [[1, 0], [1, 1]]),
        [r"tableau\.B_mask must be a 0/1 list of shape"],
    ),
    "fingerprint-missing": (_setter(["model", "fingerprint"], KeyError), [r"model\.fingerprint must be 16 hex digits"]),
    "model-string": (_setter(["model"], "gmm"), [r"field model must be an object"]),
    "nfe-abc": (_setter(["nfe"], "abc"), [r"field nfe must be an integer"]),
    "schedule-bad-value": (_setter(["schedule", "beta_max"], "x"), [r"field schedule"]),
    "schedule-extra-key": (_setter(["schedule", "shift"], 3.0), [r"field schedule has .*shift"]),
    "params-absolute": (_setter(["params"], "/etc/passwd"), [r"field params must name a file inside"]),
    "params-dotdot": (_setter(["params"], "../A/params.safetensors"), [r"field params must name a file inside"]),
}


def _reader(command: str, d: Path) -> list[str]:
    return {
        "show": ["show", str(d)],
        "eval": ["eval", "--model", MODEL, "--solver", str(d), "--samples", "8"],
        "sample": ["sample", "--model", MODEL, "--solver", str(d), "--n", "2", "--out", "s.safetensors"],
        "eval-force": ["eval", "--model", MODEL, "--solver", str(d), "--samples", "8", "--force"],
        "sample-force": [
            "sample",
            "--model",
            MODEL,
            "--solver",
            str(d),
            "--n",
            "2",
            "--out",
            "s.safetensors",
            "--force",
        ],
    }[command]


def _artifact_case(edit: str, command: str) -> Callable:
    def run(sp: Space, ctx: Context) -> Run:
        d = sp.inp / "A"
        shutil.copytree(ctx.artifact, d)
        doc = json.loads((d / "solver.json").read_text())
        ARTIFACT_EDITS[edit][0](doc)
        (d / "solver.json").write_text(json.dumps(doc))  # NaN / Infinity as Python's json writes them
        return sp.run(*_reader(command, d))

    return run


READERS = ["show", "eval", "sample"]
# by default: one damage of each kind, each through one reader (in turn), and the missing fingerprint with --force
ARTIFACT_DEFAULT = [
    "eval-time-7/show",
    "nan-a/eval",
    "B-1e300/sample",
    "schedule-extra-key/show",
    "params-dotdot/eval",
    "fingerprint-missing/sample-force",
]
ARTIFACT_CASES = []
for _e in ARTIFACT_EDITS:
    for _c in READERS + (["eval-force", "sample-force"] if _e == "fingerprint-missing" else []):
        task(f"artifact/{_e}/{_c}", priority=1, setup=True)(_artifact_case(_e, _c))
        if ALL or f"{_e}/{_c}" in ARTIFACT_DEFAULT:
            ARTIFACT_CASES.append(f"artifact/{_e}/{_c}")


@pytest.mark.parametrize("case", cases(ARTIFACT_CASES))
def test_a_damaged_artifact_is_refused_in_one_line_naming_the_field(runs, case):
    refused(runs(case), 2, *ARTIFACT_EDITS[case.split("/")[1]][1])


# ============================================================================ 6. numeric options out of range
FIT_ARGS = ["fit", "--model", MODEL, "--out", "X"]
OPTIONS: dict[str, tuple[list[str], list[str]]] = {
    # name: (arguments, what the line must say: the option and the valid range)
    "eval-samples-0": (["eval", "--model", MODEL, "--samples", "0"], ["--samples", r"(>=|greater than or equal to) 1"]),
    "eval-samples-neg": (
        ["eval", "--model", MODEL, "--samples", "-3"],
        ["--samples", r"(>=|greater than or equal to) 1"],
    ),
    "sample-n-0": (
        ["sample", "--model", MODEL, "--n", "0", "--out", "s.safetensors"],
        ["--n", r"(>=|greater than or equal to) 1"],
    ),
    "fit-batch-0": (FIT_ARGS + ["--batch", "0"], ["--batch", r"(>=|greater than or equal to) 1"]),
    "fit-batch-neg": (FIT_ARGS + ["--batch", "-1"], ["--batch", r"(>=|greater than or equal to) 1"]),
    "fit-steps-0": (FIT_ARGS + ["--steps", "0"], ["--steps", r"(>=|greater than or equal to) 1"]),
    "fit-steps-neg": (FIT_ARGS + ["--steps", "-5"], ["--steps", r"(>=|greater than or equal to) 1"]),
    "fit-relax-neg": (FIT_ARGS + ["--relax", "-1"], ["--relax", ">= 0"]),
    "fit-k-0": (FIT_ARGS + ["--k", "0"], ["--k", r"(>=|greater than or equal to) 1"]),
    "fit-lr-coef-nan": (FIT_ARGS + ["--lr-coef", "nan"], ["--lr-coef", "finite number > 0"]),
    "fit-lr-coef-neg": (FIT_ARGS + ["--lr-coef", "-0.1"], ["--lr-coef", "finite number > 0"]),
    "fit-polish-1": (FIT_ARGS + ["--polish", "1"], ["--polish", r"share in \[0, 1\)"]),
    "fit-device-foo": (FIT_ARGS + ["--device", "foo"], ["--device foo", "cpu, cuda"]),
    "fit-threads-neg": (FIT_ARGS + ["--threads", "-1"], ["--threads", r"(>=|greater than or equal to) 1"]),
    "eval-nfe-0": (["eval", "--model", MODEL, "--nfe", "0"], ["--nfe", r"(>=|greater than or equal to) 1"]),
}
# by default one option per kind of check: an integer range, a float callback, the device (fit: no X written)
OPTIONS_DEFAULT = ["eval-samples-neg", "fit-lr-coef-nan", "fit-device-foo", "fit-polish-1"]


def _option_case(name: str) -> Callable:
    return lambda sp, ctx: sp.run(*OPTIONS[name][0])


OPTION_CASES = [f"option/{n}" for n in OPTIONS if ALL or n in OPTIONS_DEFAULT]
for _n in OPTIONS:
    task(f"option/{_n}")(_option_case(_n))


@pytest.mark.parametrize("case", cases(OPTION_CASES))
def test_a_numeric_option_out_of_range_is_refused_naming_it_and_the_range(runs, case):
    refused(runs(case), 2, *OPTIONS[case.split("/")[1]][1])  # nothing written: no X, no fit-checkpoint


# ============================================================================ 7. output paths
def _fsize(limit: int = 20000) -> Callable[[], None]:
    def lim() -> None:  # Python ignores SIGXFSZ: a write past the limit fails with OSError "File too large"
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return lim


@task("path/fit-out-a-file")
def _fit_out_file(sp: Space, ctx: Context) -> Run:
    (sp.work / "taken").write_text("mine")
    return sp.run(*FIT_ARGS[:-1], "taken")


@task("path/fit-out-under-a-file")
def _fit_out_under_file(sp: Space, ctx: Context) -> Run:
    (sp.work / "taken").write_text("mine")
    return sp.run(*FIT_ARGS[:-1], "taken/sub")


@task("path/sample-out-a-folder")
def _sample_out_folder(sp: Space, ctx: Context) -> Run:
    (sp.work / "outdir").mkdir()
    return sp.run("sample", "--model", MODEL, "--n", "2", "--out", "outdir")


@task("path/sample-out-a-safetensors-folder")
def _sample_out_st_folder(sp: Space, ctx: Context) -> Run:
    (sp.work / "outdir.safetensors").mkdir()
    return sp.run("sample", "--model", MODEL, "--n", "2", "--out", "outdir.safetensors")


@task("path/sample-out-under-a-file")
def _sample_under_file(sp: Space, ctx: Context) -> Run:
    (sp.work / "taken").write_text("mine")
    return sp.run("sample", "--model", MODEL, "--n", "2", "--out", "taken/x.safetensors")


@task("path/sample-out-read-only")
def _sample_read_only(sp: Space, ctx: Context) -> Run:
    ro = sp.work / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        return sp.run("sample", "--model", MODEL, "--n", "2", "--out", "ro/s.safetensors")
    finally:
        ro.chmod(0o755)


@task("path/sample-write-fails-midway", priority=2)
def _sample_fsize(sp: Space, ctx: Context) -> Run:
    return sp.run("sample", "--model", MODEL, "--n", "4096", "--out", "big.safetensors", preexec=_fsize())


@task("path/fit-cache-write-fails-midway", priority=3)
def _fit_fsize(sp: Space, ctx: Context) -> dict[str, Any]:
    r = sp.run(*FIT, preexec=_fsize())
    return {"run": r, "cache": _listing(sp.cache)}


PATH_EXPECT: dict[str, list[str]] = {
    "path/fit-out-a-file": [r"--out taken\b", "is a file"],
    "path/fit-out-under-a-file": [r"--out taken/sub:", r"taken is a file"],
    "path/sample-out-a-folder": [r"--out outdir\b", "is a folder"],
    "path/sample-out-a-safetensors-folder": [r"--out outdir\.safetensors\b", "is a folder"],
    "path/sample-out-under-a-file": [r"taken/x\.safetensors", r"taken is a file"],
    "path/sample-out-read-only": [r"ro/s\.safetensors", "permission denied"],
    "path/sample-write-fails-midway": [r"big\.safetensors", "File too large"],
}
PATH_DEFAULT = [
    "path/fit-out-a-file",
    "path/fit-out-under-a-file",
    "path/sample-out-a-folder",
    "path/sample-out-read-only",
    "path/sample-write-fails-midway",
]
PATH_BUGS: dict[str, str] = {}  # none open: the bugs these cases found are fixed
PATH_CASES = [n for n in PATH_EXPECT if ALL or n in PATH_DEFAULT]


@pytest.mark.parametrize("case", cases(PATH_CASES, PATH_BUGS))
def test_an_output_path_that_cannot_be_written_is_refused_in_one_line(runs, case):
    refused(runs(case), 2, *PATH_EXPECT[case])  # no partial file, no temporary


@pytest.mark.parametrize("case", cases(["path/fit-cache-write-fails-midway"]))
def test_a_cache_write_that_fails_midway_names_the_file_and_leaves_no_temporary(runs, case):
    res = runs(case)
    refused(res["run"], 2, r"seeds-\d+-\d+\.safetensors", "File too large")
    assert not [p for p in res["cache"] if p.endswith(".tmp") or p.endswith(".safetensors")], res["cache"]


# ============================================================================ 8. nothing can run: exit 1, early
@task("early/nothing-can-run", priority=4)
def _nothing(sp: Space, ctx: Context) -> dict[str, Run]:
    return {"zoo": sp.run("zoo"), "eval": sp.run("eval", "--model", MODEL, "--solver", "ipndm@time", "--nfe", "2")}


@pytest.mark.parametrize("case", cases(["early/nothing-can-run"]))
def test_eval_with_no_solver_that_can_run_exits_1_before_any_reference_solve(runs, case):
    res = runs(case)
    zoo, r = res["zoo"], res["eval"]
    assert zoo.code == 0, zoo
    refused(r, 1, "ipndm", "NFE")
    assert r.seconds < 2 * zoo.seconds + 1.0, f"took {r.seconds:.1f} s against `fewstep zoo`'s {zoo.seconds:.1f} s"


# ============================================================================ 9. sample --nfe and a learned solver
@task("learned-nfe/wrong-nfe", priority=2, setup=True)
def _wrong_nfe(sp: Space, ctx: Context) -> Run:
    return sp.run(
        "sample", "--model", MODEL, "--solver", str(ctx.artifact), "--nfe", "9", "--n", "2", "--out", "s.safetensors"
    )


@task("learned-nfe/its-own-nfe", priority=2, setup=True)
def _own_nfe(sp: Space, ctx: Context) -> dict[str, Any]:
    from safetensors import safe_open

    r = sp.run("sample", "--model", MODEL, "--solver", str(ctx.artifact), "--n", "2", "--out", "s.safetensors")
    meta, mode = None, None
    if (sp.work / "s.safetensors").is_file():
        with safe_open(str(sp.work / "s.safetensors"), "pt") as f:
            meta = f.metadata()
        mode = stat.S_IMODE((sp.work / "s.safetensors").stat().st_mode)
    return {"run": r, "meta": meta, "mode": mode}


@pytest.mark.parametrize("case", cases(["learned-nfe/wrong-nfe"]))
def test_sample_refuses_an_nfe_the_learned_solver_does_not_make(runs, case):
    refused(runs(case), 2, "--nfe 9", "makes 4 evaluations")


@pytest.mark.parametrize("case", cases(["learned-nfe/its-own-nfe"]))
def test_sample_with_a_learned_solver_records_its_nfe(runs, case):
    res = runs(case)
    assert res["run"].code == 0 and not res["run"].lines(), res["run"]
    assert res["run"].new == {"work/s.safetensors"}, res["run"]
    assert res["meta"]["nfe"] == "4"


# ============================================================================ 10. bench --reuse
@task("bench/reuse", priority=40)
def _bench(sp: Space, ctx: Context) -> dict[str, Any]:
    first = sp.run(*BENCH, "--steps", "10")
    refit = sp.run(*BENCH, "--steps", "20", "--reuse")
    doc = json.loads((sp.work / "B" / "s4s-nfe3" / "solver.json").read_text()) if refit.code == 0 else {}
    again = sp.run(*BENCH, "--steps", "20", "--reuse")
    return {"runs": [first, refit, again], "steps": (doc.get("fit") or {}).get("steps"), "work": sp.work}


@pytest.mark.parametrize("case", cases(["bench/reuse"]))
def test_bench_reuse_refits_a_fit_with_other_settings_and_reuses_a_matching_one(runs, case):
    res = runs(case)
    first, refit, again = res["runs"]
    for r in res["runs"]:
        assert r.code == 0, r
        no_problem_lines(r)
    assert "fitted s4s at NFE 3" in first.stderr, first
    line = [ln for ln in refit.lines() if "s4s at NFE 3" in ln]
    assert line and line[-1].startswith("refitted") and "other settings" in line[-1], refit
    assert "steps 10 -> 20" in line[-1], refit
    assert res["steps"] == 20
    assert any(ln.startswith("reused s4s at NFE 3") for ln in again.lines()), again
    assert not again.new, again


# ============================================================================ 11. file modes
@task("modes/image-samples", priority=3)
def _image_samples(sp: Space, ctx: Context) -> dict[str, Any]:
    def umask() -> None:
        os.umask(0o027)

    r = sp.run("sample", "--model", "zoo:digits-empirical", "--n", "4", "--out", "img.safetensors", preexec=umask)
    return {"run": r, "modes": {p.name: stat.S_IMODE(p.stat().st_mode) for p in sp.work.iterdir()}}


EXTRA_NEEDS["test_files_written_by_the_cli_have_the_usual_mode"] = [
    "blowup/again-and-restart",
    "bench/reuse",
    "modes/image-samples",
]


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_files_written_by_the_cli_have_the_usual_mode(runs):
    img = runs("modes/image-samples")
    assert img["run"].code == 0, img["run"]
    assert img["modes"] == {"img.safetensors": 0o640, "img.png": 0o640}  # 0o666 & ~umask 027
    want = 0o666 & ~_umask()
    files = [runs("blowup/again-and-restart")["work"] / "X" / n for n in ("solver.json", "params.safetensors")]
    b = runs("bench/reuse")["work"] / "B"
    files += [b / "bench.json", b / "s4s-nfe3" / "solver.json", b / "s4s-nfe3" / "params.safetensors"]
    got = {str(f): oct(stat.S_IMODE(f.stat().st_mode)) for f in files}
    assert got == {str(f): oct(want) for f in files}


# ============================================================================ 12. a user factory that fails
FACTORIES = {
    "syntax-error": ("def make(:\n    pass\n", [r"broken\.py", "SyntaxError", "line 1"]),
    "import-error": (
        "from os import does_not_exist_anywhere\n\ndef make():\n    pass\n",
        [r"broken\.py", "ImportError", "does_not_exist_anywhere"],
    ),
    "raises": (
        "def make():\n    raise RuntimeError('boom in the factory')\n",
        [r"broken\.py", "RuntimeError", "boom in the factory"],
    ),
}


def _factory_case(kind: str, debug: bool) -> Callable:
    def run(sp: Space, ctx: Context) -> Run:
        f = sp.inp / "broken.py"
        f.write_text(FACTORIES[kind][0])
        return sp.run(*(["--debug"] if debug else []), "eval", "--model", f"{f}:make", "--samples", "4")

    return run


for _k in FACTORIES:
    task(f"factory/{_k}")(_factory_case(_k, False))
    task(f"factory/{_k}-debug")(_factory_case(_k, True))
FACTORY_CASES = [f"factory/{k}" for k in FACTORIES if ALL or k != "import-error"]
DEBUG_CASES = [f"factory/{k}-debug" for k in FACTORIES if ALL or k == "raises"]


@pytest.mark.parametrize("case", cases(FACTORY_CASES))
def test_a_failing_user_factory_is_reported_in_one_line_naming_the_file(runs, case):
    line = refused(runs(case), 2, *FACTORIES[case.split("/")[1]][1])
    assert "--debug" in line


@pytest.mark.parametrize("case", cases(DEBUG_CASES))
def test_debug_shows_the_factorys_traceback(runs, case):
    r = runs(case)
    assert r.code != 0, r
    assert "Traceback (most recent call last)" in r.stderr and "broken.py" in r.stderr, r
    assert FACTORIES[case.split("/")[1].removesuffix("-debug")][1][1] in r.stderr, r
    assert not r.new and not r.gone, r
