"""Notices of third-party libraries that say nothing a fewstep user can act on, dropped one by one.

transformers (5.x) logs "`CLIPImageProcessor` requires torchvision (not installed); falling back to
`CLIPImageProcessorPil` ..." (and the same for SigLIP) whenever diffusers imports a pipeline class. fewstep
never runs an image processor (prompts go through the text encoders only), so the fallback changes nothing for
it. Only these messages are dropped; every other transformers or diffusers message stays.
"""

from __future__ import annotations

import logging

#: the logger transformers' lazy-import fallback writes to, and the text of the notice it writes there
NOTICE_LOGGER = "transformers.utils.import_utils"
NOTICE_TEXT = "requires torchvision (not installed); falling back to"


class _DropTorchvisionFallback(logging.Filter):
    """Drops the image-processor torchvision fallback notice, passes every other record."""

    def filter(self, record: logging.LogRecord) -> bool:
        return NOTICE_TEXT not in record.getMessage()


def quiet_torchvision_notices() -> None:
    """Drop transformers' "requires torchvision ... falling back to ...Pil" notices from now on (installed once;
    transformers need not be imported yet)."""
    log = logging.getLogger(NOTICE_LOGGER)
    if not any(isinstance(f, _DropTorchvisionFallback) for f in log.filters):
        log.addFilter(_DropTorchvisionFallback())
