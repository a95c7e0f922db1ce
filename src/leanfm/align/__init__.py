"""Aligning a new modality encoder to a frozen pretrained one: CWCL and the CLIP baseline.

Importing the package registers its trainers (``cwcl-speech``, ``cwcl-image``).
"""

from leanfm.align import cwcl, pipeline

__all__ = ["cwcl", "pipeline"]
