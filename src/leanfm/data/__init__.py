"""Corpora, calibration sampling and offline datasets."""

from leanfm.data.calibration import calibration_windows, token_windows
from leanfm.data.corpus import AUSTEN_NOVELS, CORPORA, SPLITS, corpus

__all__ = ["AUSTEN_NOVELS", "CORPORA", "SPLITS", "calibration_windows", "corpus", "token_windows"]
