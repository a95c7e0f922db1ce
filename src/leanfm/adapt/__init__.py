"""Adapting a pretrained encoder to tasks: compositional spoken-language understanding (``slu``), continual
adapters on class-incremental tasks (``continual``: sequential LoRA, C-LoRA, STAMINA) and prompt tuning for
compositional zero-shot learning (``mmpt``: MMPT with zero-shot, CoOp and CSP as peers), the small
text-to-image diffusion model that continual customisation starts from (``t2i``) and that customisation itself
(``t2i_continual``: LoRA, C-LoRA, STAMINA on the U-Net's cross-attention).

Importing the package registers its trainers (``slu``, ``continual``, ``mmpt``, ``t2i``, ``continual-t2i``).
"""

from leanfm.adapt import continual, mmpt, slu, t2i, t2i_continual

__all__ = ["continual", "mmpt", "slu", "t2i", "t2i_continual"]
