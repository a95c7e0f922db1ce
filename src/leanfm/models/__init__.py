"""Model registry, loading and architecture adapters."""

from leanfm.models import sliced as _sliced  # noqa: F401  registers leanfm_sliced_llama with the Auto classes
from leanfm.models.adapters import ADAPTERS, ArchAdapter, AttentionLayout, BlockParts, get_adapter
from leanfm.models.registry import (
    ModelSpec,
    list_models,
    load_model,
    register_model,
    resolve_dtype,
    unregister_model,
)

__all__ = [
    "ADAPTERS",
    "ArchAdapter",
    "AttentionLayout",
    "BlockParts",
    "ModelSpec",
    "get_adapter",
    "list_models",
    "load_model",
    "register_model",
    "resolve_dtype",
    "unregister_model",
]
