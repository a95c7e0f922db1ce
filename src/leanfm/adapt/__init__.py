"""Adapting a pretrained encoder to tasks: compositional spoken-language understanding (``slu``), continual
adapters on class-incremental tasks (``continual``: sequential LoRA, C-LoRA, STAMINA) and prompt tuning for
compositional zero-shot learning (``mmpt``: MMPT with zero-shot, CoOp and CSP as peers).

Importing the package registers its trainers (``slu``, ``continual``, ``mmpt``).
"""

from leanfm.adapt import continual, mmpt, slu

__all__ = ["continual", "mmpt", "slu"]
