"""Nothing on stderr a user cannot act on (issue 20, suite item 6): transformers' "`CLIPImageProcessor` requires
torchvision (not installed); falling back to ..." notices, logged when diffusers imports a pipeline class, are
dropped where fewstep loads a pipeline, and nothing else is."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fewstep.integrations.quiet import NOTICE_LOGGER, quiet_torchvision_notices

NOTICE = (
    "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil` for "
    "backward compatibility. Install torchvision to use the default backend, or import "
    "`CLIPImageProcessorPil` directly to silence this warning."
)


class Recorder(logging.Handler):
    """Keeps the messages that reach it (attached to the logger itself: transformers' loggers do not propagate
    to the root logger once transformers is imported)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_only_the_torchvision_fallback_notice_is_dropped():
    quiet_torchvision_notices()
    quiet_torchvision_notices()  # installed once
    log, other = logging.getLogger(NOTICE_LOGGER), logging.getLogger("transformers.modeling_utils")
    assert len(log.filters) == len({type(f) for f in log.filters})
    rec = Recorder()
    for lg in (log, other):
        lg.addHandler(rec)
    try:
        log.warning(NOTICE)
        log.warning("`Foo` requires sentencepiece")
        other.warning(NOTICE)  # another logger: not ours to drop
    finally:
        for lg in (log, other):
            lg.removeHandler(rec)
    assert rec.messages == ["`Foo` requires sentencepiece", NOTICE]


def test_loading_a_pipeline_prints_no_torchvision_notice(tmp_path):
    """A fresh process loads a tiny SD pipeline folder as fewstep does (the notices are logged once per process,
    so only a fresh one shows them)."""
    pytest.importorskip("transformers")
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        from tiny_pipelines import save_pipeline
    finally:
        sys.path.pop(0)
    folder = save_pipeline("sd", tmp_path / "sd")
    code = (
        "from fewstep.integrations.load import load_diffusers\n"
        f"m = load_diffusers({str(folder)!r}, prompts=['a photo of a cat'])\n"
        "print(m.sample_shape)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "FEWSTEP_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "(4, 8, 8)"
    assert "torchvision" not in r.stderr, r.stderr
