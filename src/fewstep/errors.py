"""Errors that fewstep raises for bad input: each names the problem and the fix; :func:`debug`: whether to show
tracebacks instead."""

from __future__ import annotations

import os

#: set (not "0") to show tracebacks instead of one-line errors; ``fewstep --debug`` sets it
DEBUG_ENV = "FEWSTEP_DEBUG"


def debug() -> bool:
    """Show tracebacks instead of one-line errors (``--debug`` or FEWSTEP_DEBUG=1)."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


class FewstepError(ValueError):
    """Base class: a user-facing error whose message is one clear line."""


class GridError(FewstepError):
    """A time grid that is not strictly monotone or leaves the schedule's range."""


class SolverNameError(FewstepError):
    """An unknown solver or grid name."""


class NFEError(FewstepError):
    """An NFE budget below what a solver needs."""


class ShapeError(FewstepError):
    """A model output or noise tensor with the wrong shape."""


class ModelOutputError(FewstepError):
    """A model returned NaN or inf."""


class ArtifactError(FewstepError):
    """A learned-solver artifact that is malformed or made for another model."""


class ModelSpecError(FewstepError):
    """A model spec (zoo:NAME, file.py:factory, package.module:factory) that cannot be loaded."""


class NothingToRunError(FewstepError):
    """None of the solvers asked for can run on this model (found before any expensive work)."""
