"""Settings every trainer's config shares: the device field's help text and its check.

The check is syntax only: whether CUDA exists is asked when the run starts
(:func:`leanfm.device.resolve_device`), so a config saved on a GPU machine still loads on a CPU one.
"""

from __future__ import annotations

import re

from leanfm.errors import LeanfmError

DEVICE_HELP = "where to train: auto (CUDA when available), cpu, cuda or cuda:N"
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device_name(name: str) -> None:
    """One-line error unless ``name`` is auto, cpu, cuda or cuda:N."""
    if not isinstance(name, str) or not _DEVICE.fullmatch(name.strip().lower()):
        raise LeanfmError(f"unknown device '{name}'; accepted: auto, cpu, cuda, cuda:N")
