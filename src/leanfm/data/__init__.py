"""Corpora, calibration sampling and offline datasets (synthetic speech, rendered shapes).

``speech`` (scipy, espeak-ng) and ``shapes`` are imported by those who use them (``from leanfm.data import speech``),
not by every ``import leanfm``.
"""

from leanfm.data.calibration import calibration_windows, token_windows
from leanfm.data.corpus import AUSTEN_NOVELS, CORPORA, SPLITS, corpus

__all__ = ["AUSTEN_NOVELS", "CORPORA", "SPLITS", "calibration_windows", "corpus", "token_windows"]
