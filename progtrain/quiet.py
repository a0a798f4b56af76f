"""Silencing what is noise on a progtrain console, in one place.

- :func:`deepspeed_probe_off`: DeepSpeed, imported by accelerate and transformers when installed,
  probes for an accelerator at import and prints "Setting accelerator to CPU ..." on **stdout** (where
  results go) when it finds none; setting ``DS_ACCELERATOR=cpu`` first gives the same choice silently.
- :func:`transformers_bars_off`: transformers' own progress bars ("Loading weights", "Writing model
  shards" at every checkpoint save); progtrain's commands report what they load and save.

What a user needs stays: warnings and errors, progtrain's run messages (``progtrain.console``), the
training progress bar and data preparation progress.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator


def deepspeed_probe_off() -> None:
    """Set ``DS_ACCELERATOR=cpu`` when it is unset and torch sees no CUDA/MPS device (imports torch;
    call before accelerate or DeepSpeed are imported)."""
    if "DS_ACCELERATOR" in os.environ:
        return
    import torch

    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


@contextlib.contextmanager
def transformers_bars_off() -> Iterator[None]:
    """transformers' progress bars off inside the block, restored afterwards (public
    ``transformers.utils.logging`` switches)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()
