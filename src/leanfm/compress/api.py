"""One entry point for every training-free compressor: pick a method, compress, save a loadable checkpoint."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from leanfm.compress.baselines import svd_block, wanda_block
from leanfm.compress.modegpt import CompressionReport, ModegptConfig, compress, compress_block
from leanfm.compress.structure import COMPRESSED_CLASSES
from leanfm.data.calibration import calibration_windows
from leanfm.errors import LeanfmError
from leanfm.models.adapters import get_adapter
from leanfm.paths import atomic_directory, check_output_dir

BLOCK_METHODS: dict[str, Callable[..., Any]] = {
    "modegpt": compress_block, "wanda-sp": wanda_block, "svd-llm": svd_block,
}
TRAINED_METHODS = ("disp",)  # learn their structure by training instead of one calibration pass
METHODS = (*BLOCK_METHODS, *TRAINED_METHODS)


def check_method(method: str) -> str:
    """``method`` if it is a known compressor; a one-line error lists the valid ones."""
    if method not in METHODS:
        raise LeanfmError(f"unknown method '{method}'; accepted: {', '.join(METHODS)}")
    return method


def check_architecture(model: nn.Module) -> None:
    """Fail early when ``model`` cannot be compressed (e.g. an encoder such as bert)."""
    model_type = get_adapter(model).model_type
    if model_type not in COMPRESSED_CLASSES:
        raise LeanfmError(
            f"unsupported architecture '{model_type}' for compression; supported: {', '.join(COMPRESSED_CLASSES)}"
        )


def compress_model(model: nn.Module, tokenizer: Any, method: str = "modegpt", **settings: Any) -> CompressionReport:
    """Compress ``model`` in place with ``method`` (see :data:`METHODS`) and return the report.

    ``settings`` are :class:`ModegptConfig` fields (``ratio`` required), or :class:`DispConfig` fields for
    ``disp``; calibration windows come from the ``calib`` split with the config's seed, so every
    training-free method sees identical data.
    """
    check_method(method)
    check_architecture(model)
    if method == "disp":
        from leanfm.compress.disp import DispConfig, compress_disp

        return compress_disp(model, tokenizer, DispConfig(**settings))
    block_fn = BLOCK_METHODS[method]
    config = ModegptConfig(**settings)
    calib = calibration_windows(tokenizer, samples=config.calib_samples, seqlen=config.calib_seqlen, seed=config.seed)
    return compress(model, calib, config, method=method, block_fn=block_fn)


def save_compressed(model: nn.Module, tokenizer: Any, out: Path, report: CompressionReport,
                    overwrite: bool = False) -> Path:
    """Write model, tokenizer and ``compression.json`` to ``out`` atomically (all or nothing)."""
    check_output_dir(out, overwrite)
    if out.exists() and overwrite:
        shutil.rmtree(out)
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "compression.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    return out
