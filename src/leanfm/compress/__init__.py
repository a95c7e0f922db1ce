"""Structured compression of causal LMs: the shared checkpoint format, layer-by-layer engine and methods."""

from leanfm.compress.structure import CompressedAttention, LayerSpec, finalize, restructure_block

__all__ = ["CompressedAttention", "LayerSpec", "finalize", "restructure_block"]
