"""Adapting a pretrained encoder to a task: compositional spoken-language understanding (``slu``).

Importing the package registers its trainers (``slu``).
"""

from leanfm.adapt import slu

__all__ = ["slu"]
