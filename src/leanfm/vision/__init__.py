"""Vision transformers: token reduction (ToMe baseline, ToFu)."""

from leanfm.vision import tofu, tome
from leanfm.vision.merge import bipartite_soft_matching, reduce_tokens

__all__ = ["bipartite_soft_matching", "reduce_tokens", "tofu", "tome"]
