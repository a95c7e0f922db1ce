"""Faster generation: DynaMo multi-token heads and the n-gram statistics they use."""
