"""Trained artifacts that later work builds on (the benchmark ViT, ...): small bf16 checkpoints with a manifest.

Why: some models take an hour or more of CPU training to rebuild, and later benchmarks and methods start from
them. Such a model is committed once under the repository's ``artifacts/<name>/`` as a transformers folder with
bf16 safetensors weights (at most ~30 MB) and ``manifest.json``: the command that rebuilds it, steps, seed,
data, the metric measured *on the bf16 weights as saved*, and library versions. The library never looks for
``artifacts/`` itself; benchmarks and users pass the folder (it loads like any checkpoint folder).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leanfm.errors import LeanfmError
from leanfm.paths import atomic_directory
from leanfm.version import __version__

MANIFEST = "manifest.json"
MAX_MB = 30.0
REQUIRED = ("name", "command", "steps", "seed", "data", "metrics")


def write_artifact(model: nn.Module, folder: str | Path, manifest: dict[str, Any], max_mb: float = MAX_MB) -> Path:
    """Save ``model`` (a transformers ``PreTrainedModel``) in bf16 with ``manifest`` to ``folder``, atomically.

    The caller's model is left in its own dtype (the bf16 copy is made tensor by tensor). ``manifest`` must name
    ``REQUIRED`` keys; sizes and versions are added here. Refuses a checkpoint over ``max_mb``.
    """
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise LeanfmError(f"artifact manifest lacks {', '.join(missing)}; "
                          f"accepted: a manifest with {', '.join(REQUIRED)}")
    state = {k: v.detach().to(torch.bfloat16) if v.is_floating_point() else v.detach()
             for k, v in model.state_dict().items()}
    size_mb = sum(v.numel() * v.element_size() for v in state.values()) / 2**20
    if size_mb > max_mb:
        raise LeanfmError(f"artifact '{manifest['name']}' would be {size_mb:.1f} MB; accepted: at most {max_mb} MB")
    target = Path(folder)
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)  # type: ignore[operator]
        full = {**manifest, "dtype": "bfloat16", "size_mb": round(size_mb, 2),
                "parameters": sum(v.numel() for v in state.values()),
                "versions": {"leanfm": __version__, "torch": torch.__version__}}
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2) + "\n", encoding="utf-8")
    return target


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of an artifact folder; a missing or corrupt one is a one-line error."""
    path = Path(folder) / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LeanfmError(f"'{folder}' is not an artifact ({MANIFEST} missing)") from None
    except (OSError, json.JSONDecodeError) as err:
        raise LeanfmError(f"artifact manifest '{path}' is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise LeanfmError(f"artifact manifest '{path}' holds {type(data).__name__}; accepted: a JSON object")
    return data
