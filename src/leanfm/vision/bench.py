"""Accuracy and images/s of a trained ViT with no patch, ToMe or ToFu — the ``leanfm vision bench`` job."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from leanfm.config import MethodConfig, get_method, list_methods
from leanfm.data.images import fashion_mnist
from leanfm.errors import LeanfmError
from leanfm.vision import tofu, tome  # noqa: F401  registers the token-reduction patches
from leanfm.vision.patch import remove_patch
from leanfm.vision.train import accuracy_and_throughput, load_vit


def bench_methods() -> tuple[str, ...]:
    """``none`` (no patch) and every registered token-reduction patch."""
    return ("none", *(spec.name for spec in list_methods("patch")))


def patch_for(model: torch.nn.Module, method: str, config: MethodConfig | None = None, **settings: Any
              ) -> torch.nn.Module:
    """Apply ``method`` (``none`` or a registered patch) to ``model`` in place, replacing any earlier patch.

    Settings come as a config of the method's class or as its fields (``r=16, merge="average"``).
    """
    remove_patch(model)
    if method == "none":
        return model
    if method not in bench_methods():
        raise LeanfmError(f"unknown method '{method}'; accepted: {', '.join(bench_methods())}")
    spec = get_method(method, "patch")
    assert spec.config is not None
    if config is None:
        config = spec.config.from_dict(settings)
    elif not isinstance(config, spec.config):
        raise LeanfmError(f"method '{method}' takes a {spec.config.__name__}, not a {type(config).__name__}")
    return spec.entry(model, config)


def bench(folder: Path, method: str = "none", config: MethodConfig | None = None, limit: int | None = None,
          batch_size: int = 64, **settings: Any) -> dict[str, Any]:
    """Test accuracy and images/s of the ViT in ``folder`` under ``method`` (its config or its settings)."""
    model = patch_for(load_vit(folder), method, config, **settings)
    images, labels = fashion_mnist("test")
    if limit:
        images, labels = images[:limit], labels[:limit]
    result = accuracy_and_throughput(model, images, labels, batch_size=batch_size)
    shown = config.to_dict() if config is not None else settings
    return {"method": method, **{k: v if isinstance(v, int | float) else str(v) for k, v in shown.items()},
            **result, "threads": torch.get_num_threads(), "batch_size": batch_size}
