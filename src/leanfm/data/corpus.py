"""Text corpora with fixed, documented, non-overlapping splits.

``austen`` — Jane Austen's six novels from Debian's ``r-cran-janeaustenr`` (public domain, ~1M SmolLM2 tokens):

===========  ==================================================================================
split        content
===========  ==================================================================================
``train``    the first 90% of the paragraphs of Emma, Mansfield Park, Northanger Abbey,
             Pride and Prejudice, Sense and Sensibility
``calib``    the last 10% of the paragraphs of those five novels (calibration for compressors)
``eval``     Persuasion, whole — a held-out novel never seen by ``train``/``calib``
``novel:X``  one whole novel by its janeaustenr name (``prideprejudice``, ...), e.g. to compare with
             published figures; overlaps the splits above by design
===========  ==================================================================================

``pydocs`` — the reStructuredText sources of Python 3.11's documentation (Debian ``python3.11-doc``);
files are assigned to splits by a stable CRC32 of their relative path: ``eval`` (10%), ``calib`` (10%),
``train`` (80%).

Lines wrapped by the original typesetting are re-flowed: a paragraph is one line, paragraphs are
separated by a blank line.
"""

from __future__ import annotations

import functools
import zlib

from leanfm.data.debian import find_package_path
from leanfm.data.rdata import read_lazyload_db
from leanfm.errors import LeanfmError
from leanfm.paths import atomic_write_text, leanfm_home

AUSTEN_NOVELS = (
    "emma",
    "mansfieldpark",
    "northangerabbey",
    "persuasion",
    "prideprejudice",
    "sensesensibility",
)
AUSTEN_EVAL_NOVEL = "persuasion"
AUSTEN_TRAIN_FRACTION = 0.9
CORPORA = ("austen", "pydocs")
SPLITS = ("train", "calib", "eval")
_JANEAUSTENR_DATA = "usr/lib/R/site-library/janeaustenr/data"
_PYDOCS_SOURCES = "usr/share/doc/python3.11/html/_sources"


def _reflow(lines: list[str | None]) -> list[str]:
    """Join hard-wrapped lines into paragraphs (a blank line ends a paragraph)."""
    paragraphs, current = [], []
    for line in lines:
        text = (line or "").strip()
        if text:
            current.append(text)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return paragraphs


def austen_novel_paragraphs(novel: str) -> list[str]:
    """Paragraphs of one novel, extracted once from the R database and cached as text."""
    if novel not in AUSTEN_NOVELS:
        raise LeanfmError(f"unknown Austen novel '{novel}'; accepted: {', '.join(AUSTEN_NOVELS)}")
    cached = leanfm_home() / "corpora" / "austen" / f"{novel}.txt"
    if not cached.is_file():
        database = read_lazyload_db(find_package_path("r-cran-janeaustenr", _JANEAUSTENR_DATA))
        cached.parent.mkdir(parents=True, exist_ok=True)
        for name in AUSTEN_NOVELS:
            atomic_write_text(cached.with_name(f"{name}.txt"), "\n\n".join(_reflow(database[name].value)))
    return cached.read_text(encoding="utf-8").split("\n\n")


def _austen(split: str) -> str:
    if split.startswith("novel:"):
        return "\n\n".join(austen_novel_paragraphs(split.removeprefix("novel:")))
    if split == "eval":
        return "\n\n".join(austen_novel_paragraphs(AUSTEN_EVAL_NOVEL))
    parts = []
    for novel in AUSTEN_NOVELS:
        if novel == AUSTEN_EVAL_NOVEL:
            continue
        paragraphs = austen_novel_paragraphs(novel)
        cut = int(len(paragraphs) * AUSTEN_TRAIN_FRACTION)
        parts.extend(paragraphs[:cut] if split == "train" else paragraphs[cut:])
    return "\n\n".join(parts)


def _pydocs_split_of(relative: str) -> str:
    bucket = zlib.crc32(relative.encode()) % 10
    return "eval" if bucket == 0 else "calib" if bucket == 1 else "train"


def _pydocs(split: str) -> str:
    root = find_package_path("python3.11-doc", _PYDOCS_SOURCES)
    files = sorted(root.rglob("*.rst.txt"))
    chosen = [p for p in files if _pydocs_split_of(str(p.relative_to(root))) == split]
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in chosen)


@functools.lru_cache(maxsize=16)
def corpus(name: str, split: str = "eval") -> str:
    """Return the text of ``split`` of corpus ``name`` (see the module docstring for the splits)."""
    if name not in CORPORA:
        raise LeanfmError(f"unknown corpus '{name}'; accepted: {', '.join(CORPORA)}")
    valid = SPLITS + (("novel:<name>",) if name == "austen" else ())
    if split not in SPLITS and not (name == "austen" and split.startswith("novel:")):
        raise LeanfmError(f"unknown split '{split}' of corpus '{name}'; accepted: {', '.join(valid)}")
    text = _austen(split) if name == "austen" else _pydocs(split)
    if not text.strip():
        raise LeanfmError(f"corpus '{name}' split '{split}' is empty")
    return text
