"""Turning a corpus split into token windows: evaluation windows and calibration samples.

Shared by the evaluation harness (contiguous, non-overlapping windows from the start of a split) and by
the compressors (random windows, seeded, so every method sees the same data).

Calibration is a user choice (:func:`mixed_calibration_windows`): a comma-separated list of *sources*, each a
named corpus (``austen`` = its ``calib`` split, or ``NAME:SPLIT``) or a text file / folder the user passes
(every ``*.txt``, ``*.md``, ``*.rst`` file below it, sorted). The windows are shared out evenly between the
sources. The default mixes Austen's prose with the Python documentation: a model calibrated on one novelist
alone kept Austen at 1.8x dense perplexity but other text at 9x (issue 13), and the papers calibrate on
generic text.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from leanfm.data.corpus import CORPORA, SPLITS, corpus
from leanfm.errors import LeanfmError


@functools.lru_cache(maxsize=8)
def split_token_ids(tokenizer: Any, corpus_name: str, split: str) -> torch.Tensor:
    """All token ids of a corpus split as one 1-D tensor (cached per tokenizer object in this process)."""
    ids = tokenizer(corpus(corpus_name, split), return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def token_windows(ids: torch.Tensor, seqlen: int, windows: int | None = None) -> torch.Tensor:
    """Cut ``ids`` (shape ``[T]``) into non-overlapping windows, shape ``[min(windows, T // seqlen), seqlen]``."""
    if seqlen < 2:
        raise LeanfmError(f"seqlen {seqlen} is too small; accepted: an integer >= 2")
    available = ids.numel() // seqlen
    if available == 0:
        raise LeanfmError(f"text has {ids.numel()} tokens, fewer than one window of seqlen {seqlen}")
    count = available if windows is None else min(windows, available)
    return ids[: count * seqlen].view(count, seqlen)


def calibration_windows(
    tokenizer: object,
    samples: int = 32,
    seqlen: int = 512,
    corpus_name: str = "austen",
    split: str = "calib",
    seed: int = 0,
) -> torch.Tensor:
    """``samples`` random windows of ``seqlen`` tokens from a split, shape ``[samples, seqlen]``.

    Start offsets are drawn with a seeded generator, so two methods given the same arguments calibrate on
    identical data. A one-source :func:`mixed_calibration_windows`.
    """
    return mixed_calibration_windows(tokenizer, f"{corpus_name}:{split}", samples, seqlen, seed)


def random_windows(ids: torch.Tensor, samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``samples`` windows of ``ids`` at start offsets drawn with ``seed``, shape ``[samples, seqlen]``."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (samples,), generator=generator)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


DEFAULT_CALIBRATION = "austen,pydocs"
TEXT_SUFFIXES = (".txt", ".md", ".rst")


@dataclass(frozen=True)
class CalibrationSource:
    """One calibration source: a named corpus split, or a file/folder of text (``path`` set)."""

    name: str
    split: str = "calib"
    path: str | None = None

    def describe(self) -> str:
        """How the source is recorded in a compression report."""
        return self.path if self.path is not None else f"{self.name}:{self.split}"


def parse_calibration(spec: str) -> list[CalibrationSource]:
    """Sources of a ``--calib-corpus`` value (one-line error for an unknown corpus or a missing path)."""
    items = [item.strip() for item in spec.split(",") if item.strip()]
    if not items:
        raise LeanfmError(f"calibration '{spec}' names no source; accepted: comma-separated corpora "
                          f"({', '.join(CORPORA)}, NAME:SPLIT) or text files/folders")
    sources = []
    for item in items:
        name, _, split = item.partition(":")
        if name in CORPORA:
            if split and split not in SPLITS and not split.startswith("novel:"):
                raise LeanfmError(f"unknown split '{split}' in calibration source '{item}'; "
                                  f"accepted: {', '.join(SPLITS)}")
            sources.append(CalibrationSource(name, split or "calib"))
        elif Path(item).exists():
            sources.append(CalibrationSource(Path(item).name, "file", str(Path(item).resolve())))
        else:
            raise LeanfmError(f"calibration source '{item}' is neither a corpus ({', '.join(CORPORA)}) "
                              "nor an existing text file or folder")
    return sources


def read_text_source(path: str | Path) -> str:
    """All text below ``path`` (a file, or every ``*.txt``/``*.md``/``*.rst`` file of a folder, sorted)."""
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix in TEXT_SUFFIXES)
    text = "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)
    if not text.strip():
        raise LeanfmError(f"calibration source '{path}' holds no text; accepted: a text file or a folder of "
                          f"{'/'.join(TEXT_SUFFIXES)} files")
    return text


def source_token_ids(tokenizer: Any, source: CalibrationSource) -> torch.Tensor:
    """Token ids of one calibration source, 1-D."""
    if source.path is None:
        return split_token_ids(tokenizer, source.name, source.split)
    ids = tokenizer(read_text_source(source.path), return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def mixed_calibration_windows(tokenizer: Any, sources: str = DEFAULT_CALIBRATION, samples: int = 32,
                              seqlen: int = 512, seed: int = 0) -> torch.Tensor:
    """``samples`` windows ``[samples, seqlen]`` shared out evenly between the sources of ``sources``
    (see :func:`mixed_windows`)."""
    if samples < 1:
        raise LeanfmError(f"calibration samples {samples} must be >= 1")
    parsed = parse_calibration(sources)
    return mixed_windows([source_token_ids(tokenizer, s) for s in parsed], samples, seqlen, seed,
                         [s.describe() for s in parsed])


def mixed_windows(ids: list[torch.Tensor], samples: int, seqlen: int, seed: int,
                  names: list[str] | None = None) -> torch.Tensor:
    """``samples`` windows from several token streams, ``[samples, seqlen]``, grouped by stream in order.

    Stream ``i`` gives ``samples // n`` windows (the first ``samples % n`` streams one more), drawn with ``seed``
    as in :func:`random_windows`.
    """
    rows = []
    for index, stream in enumerate(ids):
        count = samples // len(ids) + (1 if index < samples % len(ids) else 0)
        if count == 0:
            continue
        if stream.numel() <= seqlen:
            name = names[index] if names else f"#{index}"
            raise LeanfmError(f"text source '{name}' has {stream.numel()} tokens, too few for seqlen {seqlen}")
        rows.append(random_windows(stream, count, seqlen, seed))
    return torch.cat(rows)
