"""Corpora, calibration sampling and offline datasets (synthetic speech, rendered shapes)."""

from leanfm.data import shapes, speech
from leanfm.data.calibration import calibration_windows, token_windows
from leanfm.data.corpus import AUSTEN_NOVELS, CORPORA, SPLITS, corpus

__all__ = ["AUSTEN_NOVELS", "CORPORA", "SPLITS", "calibration_windows", "corpus", "shapes", "speech", "token_windows"]
