"""Accuracy and images/s of a trained ViT with no patch, ToMe or ToFu — the ``leanfm vision bench`` job."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from leanfm.data.images import fashion_mnist
from leanfm.errors import LeanfmError
from leanfm.vision import tofu, tome
from leanfm.vision.patch import RValue
from leanfm.vision.train import accuracy_and_throughput, load_vit

BENCH_METHODS = ("none", "tome", "tofu")


def patch_for(model: torch.nn.Module, method: str, r: RValue, **tofu_kwargs: Any) -> torch.nn.Module:
    """Apply ``method`` (``none``/``tome``/``tofu``) to ``model`` in place."""
    if method not in BENCH_METHODS:
        raise LeanfmError(f"unknown method '{method}'; accepted: {', '.join(BENCH_METHODS)}")
    tome.remove_patch(model)
    if method == "tome":
        tome.apply_patch(model, r=r)
    elif method == "tofu":
        tofu.apply_patch(model, r=r, **tofu_kwargs)
    return model


def bench(folder: Path, method: str = "none", r: RValue = 0, limit: int | None = None,
          batch_size: int = 64, **tofu_kwargs: Any) -> dict[str, Any]:
    """Test accuracy and images/s of the ViT in ``folder`` under ``method`` with ``r`` tokens per layer."""
    model = patch_for(load_vit(folder), method, r, **tofu_kwargs)
    images, labels = fashion_mnist("test")
    if limit:
        images, labels = images[:limit], labels[:limit]
    result = accuracy_and_throughput(model, images, labels, batch_size=batch_size)
    return {"method": method, "r": r, **{k: str(v) for k, v in tofu_kwargs.items()}, **result,
            "threads": torch.get_num_threads(), "batch_size": batch_size}
