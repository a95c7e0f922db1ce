"""Faster generation: DynaMo multi-token heads and the n-gram statistics they use.

Importing the package registers DynaMo's trainer and decoder.
"""

from leanfm.decode import dynamo, training

__all__ = ["dynamo", "training"]
