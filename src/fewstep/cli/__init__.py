"""The ``fewstep`` command: eval, sample, fit, show, bench, guidance, demo, zoo.

One module per group of commands; :mod:`.common` holds the app, the one-line errors and the input
checks they share. ``main`` is the console entry point (``python -m fewstep`` too).
"""

from __future__ import annotations

import os
import sys

try:
    import typer
except ImportError:  # pragma: no cover - the cli extra is missing
    sys.stderr.write("the fewstep command needs its CLI extra: pip install 'fewstep[cli]'\n")
    raise SystemExit(2) from None

from ..errors import DEBUG_ENV  # noqa: E402
from . import fitting, measure, sampling  # noqa: E402,F401 - the commands register themselves on the app
from .common import app, main  # noqa: E402 - after the check for the CLI extra


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="show tracebacks instead of one-line errors")) -> None:
    """Learned few-step solvers for diffusion and flow models."""
    if debug:
        os.environ[DEBUG_ENV] = "1"


__all__ = ["app", "main"]
