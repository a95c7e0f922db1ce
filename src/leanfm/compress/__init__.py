"""Structured compression of causal LMs: the shared checkpoint format, layer-by-layer engine and methods."""

from leanfm.compress.api import BLOCK_METHODS, compress_model, save_compressed
from leanfm.compress.modegpt import CompressionReport, ModegptConfig
from leanfm.compress.structure import CompressedAttention, LayerSpec, finalize, restructure_block

__all__ = [
    "BLOCK_METHODS",
    "CompressedAttention",
    "CompressionReport",
    "LayerSpec",
    "ModegptConfig",
    "compress_model",
    "finalize",
    "restructure_block",
    "save_compressed",
]
