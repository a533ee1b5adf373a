"""benchmarks/stale.py on a throwaway git repository: current, stale, staged, unrecorded and unknown commits."""

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
spec = importlib.util.spec_from_file_location("stale", Path(__file__).parents[1] / "benchmarks" / "stale.py")
stale = importlib.util.module_from_spec(spec)
sys.modules["stale"] = stale  # dataclasses look their module up
spec.loader.exec_module(stale)


def git(root, *args):
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=root,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def commit(root, msg):
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", msg)
    return git(root, "rev-parse", "HEAD")


def test_stale_sections(tmp_path):
    root = tmp_path
    git(root, "init", "-q")
    (root / "src/fewstep/solvers").mkdir(parents=True)
    (root / "src/fewstep/solvers/kernel.py").write_text("a = 1\n")
    (root / "src/fewstep/report.py").write_text("b = 1\n")
    c1 = commit(root, "code")
    doc = root / "BENCHMARKS.md"
    doc.write_text(
        f"# B\n## 1. Kernel\n<!-- measured: {c1[:7]} -->\n| a |\n|---|\n"
        f"## 2. Report\n<!-- measured: {c1} code: src/fewstep/report.py -->\n| a |\n|---|\n"
        "## 3. Prose only\ntext\n## 4. Table without marker\n| a |\n|---|\n"
        "## 5. Known stale\n<!-- measured: stale -->\n"
        "## 6. Foreign\n<!-- measured: 0123456789abcdef -->\n"
    )
    commit(root, "benchmarks")
    out = stale.check(root, doc)
    assert [o.split(":")[1].split()[1] for o in out] == ["'4.", "'5.", "'6."]
    assert "unrecorded" in out[0] and "marked stale" in out[1] and "not a commit" in out[2]

    (root / "src/fewstep/solvers/kernel.py").write_text("a = 2\n")  # only the kernel's section goes stale
    git(root, "add", "-A")
    staged = stale.check(root, doc, staged=True)
    assert len(staged) == 4 and "'1. Kernel'" in staged[0] and "changed in this commit" in staged[0]
    c3 = commit(root, "kernel change")
    after = stale.check(root, doc)
    assert len(after) == 4 and f"changed since in {c3[:10]}" in after[0]
    assert not any("'2. Report'" in o for o in after)


def test_sections_parse_markers_under_the_nearest_heading():
    s = stale.sections("## A\n<!-- measured: abc code: x y -->\n### B\n<!-- measured: def -->\n### C\n| t |\n")
    assert [(x.title, x.markers) for x in s] == [
        ("A", [("abc", ("x", "y"))]),
        ("B", [("def", stale.DEFAULT_CODE)]),
        ("C", [("abc", ("x", "y"))]),
    ]  # C inherits its section's
