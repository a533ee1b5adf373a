"""Bugs the type checker found in the solvers, sampling and schedules (issue 25)."""

from __future__ import annotations

import pytest
import torch

from fewstep import VPLinear
from fewstep.errors import FewstepError
from fewstep.solvers.learned import LearnedSolver, window_mask


def test_a_learned_corrector_without_its_mask_is_refused_by_name():
    """V_init without V_mask reached ``None.bool()`` (an AttributeError from deep inside the constructor)."""
    n = 3
    t = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)
    with pytest.raises(FewstepError, match="V_mask"):
        LearnedSolver(
            VPLinear(),
            t,
            "D",
            torch.eye(n, dtype=torch.float64),
            window_mask(n, 2),
            V_init=torch.zeros(n, n + 1, dtype=torch.float64),
        )


def test_a_learned_corrector_with_its_mask_builds_its_tables():
    n = 3
    t = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)
    s = LearnedSolver(
        VPLinear(),
        t,
        "D",
        torch.eye(n, dtype=torch.float64),
        window_mask(n, 2),
        V_init=torch.zeros(n, n + 1, dtype=torch.float64),
        V_mask=window_mask(n, 2, corrector=True),
    )
    tab = s.tableau()
    assert tab.C is not None and tuple(tab.C.shape) == (n, n + 1)
