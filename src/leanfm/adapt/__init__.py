"""Adapting a pretrained encoder to tasks: compositional spoken-language understanding (``slu``) and continual
adapters on class-incremental tasks (``continual``: sequential LoRA, C-LoRA, STAMINA).

Importing the package registers its trainers (``slu``, ``continual``).
"""

from leanfm.adapt import continual, slu

__all__ = ["continual", "slu"]
