"""Vision transformers: token reduction (ToMe baseline, ToFu) and the small ViT they are measured on.

Importing the package registers the patches (``tome``, ``tofu``) and the ViT trainer (``vit``).
"""

from leanfm.vision import tofu, tome, train
from leanfm.vision.merge import bipartite_soft_matching, reduce_tokens

__all__ = ["bipartite_soft_matching", "reduce_tokens", "tofu", "tome", "train"]
