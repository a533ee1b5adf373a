"""Shared fixtures."""

from __future__ import annotations

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
