"""One entry point for every compressor: pick a method by name, compress, save a loadable checkpoint.

The methods themselves are found in the method registry (:mod:`leanfm.config`): each compressor module
registers ``name -> (config class, entry)`` in one line, and ``import leanfm.compress`` imports them all, so
this module never names a method.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

from torch import nn
from transformers import PreTrainedModel

from leanfm.compress.base import CompressionReport, check_architecture
from leanfm.config import get_method
from leanfm.paths import atomic_directory, check_output_dir


def compress_model(model: nn.Module, tokenizer: Any, method: str = "modegpt", **settings: Any) -> CompressionReport:
    """Compress ``model`` in place with the registered compressor ``method`` and return the report.

    ``settings`` are fields of that method's config class (``ratio`` required): e.g. ``ridge`` for ``modegpt``,
    ``steps`` for ``disp``. A setting the method does not have is a one-line error naming the accepted ones.
    """
    spec = get_method(method, "compress")
    check_architecture(model)
    assert spec.config is not None  # every compressor has a config class
    config = spec.config.from_dict(settings)
    return spec.entry(model, tokenizer, config)


def save_compressed(model: nn.Module, tokenizer: Any, out: Path, report: CompressionReport,
                    overwrite: bool = False) -> Path:
    """Write model, tokenizer and ``compression.json`` to ``out`` atomically (all or nothing; a crash leaves a
    previous ``out`` intact)."""
    check_output_dir(out, overwrite)
    with atomic_directory(out) as tmp:  # replaces an existing ``out`` only once the new one is complete
        cast(PreTrainedModel, model).save_pretrained(tmp, safe_serialization=True)  # a compressed transformers model
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "compression.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    return out
