"""Shared fixtures."""

from __future__ import annotations

import os
import textwrap

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny batches: one thread is fastest, and far faster than several on a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def kill_at_call(monkeypatch):
    """``kill(n, run)``: ``run()`` with the fit loop's n-th training objective call raising KeyboardInterrupt (a
    kill mid-fit); the loop is restored afterwards."""
    import fewstep.fit.loop as loop

    real = loop._objective

    def kill(n, run):
        calls = {"n": 0}

        def dies(*a, **k):
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt
            return real(*a, **k)

        monkeypatch.setattr(loop, "_objective", dies)
        try:
            return run()
        finally:
            monkeypatch.setattr(loop, "_objective", real)

    return kill


#: a user's own model file, as `fewstep --model path/to/file.py:factory` takes it (the tests' Gaussian model)
FACTORY = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from fewstep import VPLinear
    from gauss import make_gauss

    def model():
        return make_gauss(VPLinear(), "eps", d=6)
""")


@pytest.fixture()
def user_model(tmp_path):
    """A ``file.py:factory`` model spec written into ``tmp_path``."""
    f = tmp_path / "mymodel.py"
    f.write_text(FACTORY.format(tests=os.path.dirname(__file__)))
    return f"{f}:model"
