"""A tiny dataset in the 16-shot layout (every task of the text4 and text11 sequences), written by tests."""

from __future__ import annotations

import random
from pathlib import Path

from leanfm.data.fewshot import LABELS

# a few words per class that make the class learnable by a tiny random BERT
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo",
         "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango"]
FILLER = ["the", "a", "of", "and", "to", "in", "is", "it", "that", "was"]


def _sentence(rng: random.Random, word: str) -> str:
    words = [rng.choice(FILLER) for _ in range(rng.randint(3, 8))]
    words.insert(rng.randrange(len(words) + 1), word)
    return " ".join(words)


def make_fewshot(root: Path, *, per_class_test: int = 12, tasks: tuple[str, ...] = ("agnews", "trec", "subj",
                                                                                    "sst-2")) -> Path:
    """``root/fewshot/<task>/16-{13,42}/{train,dev,test}.tsv``; class k of task i is marked by its own word."""
    rng = random.Random(0)
    offset = 0
    for task in tasks:
        classes = len(LABELS[task])
        test = [(_sentence(rng, WORDS[(offset + c) % len(WORDS)]), c) for c in range(classes)
                for _ in range(per_class_test)]
        for seed in (13, 42):
            folder = root / "fewshot" / task / f"16-{seed}"
            folder.mkdir(parents=True, exist_ok=True)
            for split, rows in (("train", 4), ("dev", 2)):
                lines = [(_sentence(rng, WORDS[(offset + c) % len(WORDS)]), c) for c in range(classes)
                         for _ in range(rows)]
                _write(folder / f"{split}.tsv", lines)
            _write(folder / "test.tsv", test)
        offset += classes
    return root


def _write(path: Path, rows: list[tuple[str, int]]) -> None:
    path.write_text("sentence\tlabel\n" + "".join(f"{s}\t{c}\n" for s, c in rows), encoding="utf-8")
