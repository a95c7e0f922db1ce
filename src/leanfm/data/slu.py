"""Spoken-language-understanding data in JointBERT's layout, and the two compositional re-splits.

Layout (any folder; ATIS and SNIPS ship like this): ``{train,dev,test}/{seq.in,seq.out,label}`` with one utterance
per line — whitespace-separated words, their BIO slot tags (one per word), the intent — plus ``intent_label.txt``
and ``slot_label.txt`` (one label per line). :func:`load` checks every line and names the file and line of the first
problem. JointBERT built its label files from the training split, so ATIS dev/test use a few labels those files do
not list (e.g. ``atis_day_name``); ``allow_unseen=True`` keeps such gold labels in dev/test (a model cannot predict
them, so they count as errors), the default refuses them.

Compositional splits (the abstract in ``shared/seeds``; METHODS.md section 7) pool train+dev+test and re-split:

- **novel-combination**: a set ``H`` of slot-type pairs is held out; the test side is every utterance holding a pair
  of ``H``, so no test pair of ``H`` co-occurs in any training utterance. Pairs are tried in a seeded order and one
  is kept only if every slot type of the (new) test side is still seen in training and the test side stays under
  ``max_test``; selection stops once the test side holds ``min_test`` of the utterances.
- **length**: train/dev on utterances with ``<= k`` slot spans, test on ``> k``; ``k`` is the threshold whose test
  share is closest to 17.5% (the 15-20% the issue asks for).

Dev is a seeded share of the training side in both. :func:`resplit` writes the same layout plus ``split.json``.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leanfm.errors import LeanfmError
from leanfm.paths import atomic_directory

log = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")
FILES = ("seq.in", "seq.out", "label")
KINDS = ("novel-combination", "length")
DATA_ENV = "LEANFM_DATA"


@dataclass(frozen=True)
class Utterance:
    """One utterance: words, their BIO tags (same length) and the intent."""

    tokens: tuple[str, ...]
    tags: tuple[str, ...]
    intent: str

    def spans(self) -> list[tuple[str, int, int]]:
        """Slot spans ``(type, start, end)`` (end exclusive); an ``I-`` without its ``B-`` starts a span too."""
        out: list[tuple[str, int, int]] = []
        for i, tag in enumerate(self.tags):
            if tag.startswith("B-") or (tag.startswith("I-") and (not out or out[-1][2] != i
                                                                    or out[-1][0] != tag[2:])):
                out.append((tag[2:], i, i + 1))
            elif tag.startswith("I-"):
                out[-1] = (out[-1][0], out[-1][1], i + 1)
        return out

    def slot_types(self) -> frozenset[str]:
        return frozenset(kind for kind, _, _ in self.spans())


@dataclass
class SluData:
    """The three splits and the label inventories (label files' order, JointBERT's UNK/PAD entries kept)."""

    train: list[Utterance]
    dev: list[Utterance]
    test: list[Utterance]
    intents: list[str]
    slots: list[str]
    source: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def split(self, name: str) -> list[Utterance]:
        if name not in SPLITS:
            raise LeanfmError(f"unknown split '{name}'; accepted: {', '.join(SPLITS)}")
        return list(getattr(self, name))

    def sizes(self) -> dict[str, int]:
        return {name: len(self.split(name)) for name in SPLITS}


def data_root() -> Path | None:
    """``$LEANFM_DATA`` (a folder holding ``slu/atis`` etc.) when set, else None. Never a hard-coded path."""
    value = os.environ.get(DATA_ENV)
    return Path(value).expanduser() if value else None


def resolve(name_or_dir: str | Path) -> Path:
    """A folder in the layout: an existing path, or a name (``atis``) under ``$LEANFM_DATA/slu/``."""
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        return path
    root = data_root()
    if root is not None and (root / "slu" / str(name_or_dir)).is_dir():
        return root / "slu" / str(name_or_dir)
    where = f"; ${DATA_ENV}/slu/{name_or_dir} does not exist either" if root else f" (and ${DATA_ENV} is unset)"
    raise LeanfmError(f"SLU data folder '{name_or_dir}' not found{where}; get ATIS/SNIPS in JointBERT's layout "
                      "(github monologg/JointBERT, data/) and pass its folder")


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise LeanfmError(f"'{path}' is missing; the JointBERT layout needs {{train,dev,test}}/{{seq.in,seq.out,label}}"
                          ", intent_label.txt and slot_label.txt")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise LeanfmError(f"cannot read '{path}' as UTF-8 text ({err})") from None
    return text.splitlines()


def _labels(path: Path) -> list[str]:
    labels = [line.strip() for line in _read_lines(path)]
    for number, label in enumerate(labels, 1):
        if not label or " " in label:
            raise LeanfmError(f"{path}:{number}: label {label!r} is invalid; accepted: one non-empty word per line")
    duplicate = next((label for label, count in Counter(labels).items() if count > 1), None)
    if duplicate is not None:
        raise LeanfmError(f"{path}: label '{duplicate}' is listed twice")
    return labels


def _check_tag(tag: str, where: str) -> None:
    if tag != "O" and not (tag[:2] in ("B-", "I-") and len(tag) > 2):
        raise LeanfmError(f"{where}: tag '{tag}' is not BIO; accepted: O, B-<type>, I-<type>")


def read_split(folder: Path, split: str, intents: list[str], slots: list[str],
               allow_unseen: bool = False) -> list[Utterance]:
    """One split, checked line by line (equal line counts, words = tags, BIO tags, labels in the label files)."""
    base = folder / split
    words, tags, labels = (_read_lines(base / name) for name in FILES)
    for name, lines in (("seq.out", tags), ("label", labels)):
        if len(lines) != len(words):
            raise LeanfmError(f"{base / name} has {len(lines)} lines but {base / 'seq.in'} has {len(words)}; "
                              "accepted: one line per utterance in each file")
    known_intents, known_slots = set(intents), set(slots)
    strict = split == "train" or not allow_unseen
    out = []
    for number, (w, t, label) in enumerate(zip(words, tags, labels, strict=True), 1):
        tokens, tag_list, intent = tuple(w.split()), tuple(t.split()), label.strip()
        if not tokens:
            raise LeanfmError(f"{base / 'seq.in'}:{number}: empty utterance")
        if len(tag_list) != len(tokens):
            raise LeanfmError(f"{base / 'seq.out'}:{number}: {len(tag_list)} tags for {len(tokens)} words in seq.in")
        for tag in tag_list:
            _check_tag(tag, f"{base / 'seq.out'}:{number}")
            if strict and tag not in known_slots:
                raise LeanfmError(f"{base / 'seq.out'}:{number}: unknown slot tag '{tag}' (not in slot_label.txt)")
        if not intent or " " in intent:
            raise LeanfmError(f"{base / 'label'}:{number}: intent {intent!r} is invalid; accepted: one word")
        if strict and intent not in known_intents:
            raise LeanfmError(f"{base / 'label'}:{number}: unknown intent '{intent}' (not in intent_label.txt)")
        out.append(Utterance(tokens, tag_list, intent))
    return out


def load(folder: str | Path, *, allow_unseen: bool = False) -> SluData:
    """Read a dataset in JointBERT's layout from ``folder`` (see the module docstring for ``allow_unseen``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LeanfmError(f"SLU data folder '{folder}' does not exist")
    intents, slots = _labels(folder / "intent_label.txt"), _labels(folder / "slot_label.txt")
    for tag in slots:
        if tag not in ("PAD", "UNK"):
            _check_tag(tag, str(folder / "slot_label.txt"))
    parts = {split: read_split(folder, split, intents, slots, allow_unseen) for split in SPLITS}
    unseen = sum(1 for split in ("dev", "test") for u in parts[split]
                 if u.intent not in intents or any(t not in slots for t in u.tags))
    if unseen:
        log.info("%s: %d dev/test utterances use labels missing from the label files (kept as gold)", folder, unseen)
    return SluData(parts["train"], parts["dev"], parts["test"], intents, slots, str(folder))


# ---------------------------------------------------------------- compositional re-splits


def pairs_of(utterance: Utterance) -> set[tuple[str, str]]:
    """Unordered pairs of distinct slot types that co-occur in ``utterance``."""
    return set(itertools.combinations(sorted(utterance.slot_types()), 2))


def _dev_from_train(side: list[Utterance], dev_fraction: float, seed: int) -> tuple[list[Utterance], list[Utterance]]:
    """A seeded ``dev_fraction`` of the training side as dev, skipping utterances whose move would leave a slot type
    with no training utterance (so "every test slot type is seen in training" still holds after dev is drawn)."""
    order = list(range(len(side)))
    random.Random(seed).shuffle(order)
    left = Counter(kind for u in side for kind in u.slot_types())
    dev_rows: set[int] = set()
    for i in order:
        if len(dev_rows) >= round(len(side) * dev_fraction):
            break
        kinds = side[i].slot_types()
        if all(left[kind] > 1 for kind in kinds):
            left.subtract(kinds)
            dev_rows.add(i)
    return ([u for i, u in enumerate(side) if i not in dev_rows], [u for i, u in enumerate(side) if i in dev_rows])


def _pool(data: SluData) -> list[Utterance]:
    return data.train + data.dev + data.test


def _labels_of(data: SluData, pool: list[Utterance]) -> tuple[list[str], list[str]]:
    """The source's label lists plus any label the pooled utterances use that they lack (ATIS dev/test)."""
    intents = data.intents + sorted({u.intent for u in pool} - set(data.intents))
    slots = data.slots + sorted({t for u in pool for t in u.tags} - set(data.slots))
    return intents, slots


def split_novel_combination(data: SluData, *, seed: int = 0, min_test: float = 0.15, max_test: float = 0.20,
                            dev_fraction: float = 0.1) -> SluData:
    """Hold out slot-type pairs until ``min_test`` of the pooled utterances are test (see the module docstring)."""
    pool = _pool(data)
    holders: dict[tuple[str, str], set[int]] = {}
    for i, u in enumerate(pool):
        for pair in pairs_of(u):
            holders.setdefault(pair, set()).add(i)
    candidates = sorted(holders)
    random.Random(seed).shuffle(candidates)
    train_count = Counter(kind for u in pool for kind in u.slot_types())  # utterances per type on the train side
    test: set[int] = set()
    held: list[tuple[str, str]] = []
    for pair in candidates:
        new = holders[pair] - test
        if not new or len(test) + len(new) > max_test * len(pool):
            continue
        loss = Counter(kind for i in new for kind in pool[i].slot_types())
        if any(train_count[kind] - n < 1 for kind, n in loss.items()):
            continue  # this pair would leave a test slot type unseen in training
        train_count.subtract(loss)
        test |= new
        held.append(pair)
        if len(test) >= min_test * len(pool):
            break
    if not test:
        raise LeanfmError(f"no slot-type pair can be held out with a test share <= {max_test} while every test slot "
                          "type stays seen in training (too few or too uniform multi-slot utterances)")
    side = [u for i, u in enumerate(pool) if i not in test]
    train, dev = _dev_from_train(side, dev_fraction, seed)
    intents, slots = _labels_of(data, pool)
    info = {"kind": "novel-combination", "seed": seed, "held_out_pairs": [list(p) for p in held]}
    return SluData(train, dev, [pool[i] for i in sorted(test)], intents, slots, data.source, info)


def choose_k(pool: list[Utterance], target: float = 0.175) -> int:
    """The slot-count threshold whose test share (utterances with more than ``k`` slots) is closest to ``target``."""
    counts = [len(u.spans()) for u in pool]
    shares = {k: sum(c > k for c in counts) / len(counts) for k in range(max(counts))}
    if not shares:
        raise LeanfmError("every utterance has no slot; a length split needs slots")
    return min(shares, key=lambda k: (abs(shares[k] - target), k))


def split_length(data: SluData, *, k: int | None = None, seed: int = 0, dev_fraction: float = 0.1) -> SluData:
    """Train/dev on utterances with ``<= k`` slot spans, test on ``> k`` (``k`` by :func:`choose_k` when None)."""
    pool = _pool(data)
    k = choose_k(pool) if k is None else k
    side = [u for u in pool if len(u.spans()) <= k]
    test = [u for u in pool if len(u.spans()) > k]
    if not side or not test:
        raise LeanfmError(f"length threshold k={k} leaves an empty side; accepted: 0 <= k < the most slots")
    train, dev = _dev_from_train(side, dev_fraction, seed)
    intents, slots = _labels_of(data, pool)
    return SluData(train, dev, test, intents, slots, data.source, {"kind": "length", "seed": seed, "k": k})


def statistics(data: SluData) -> dict[str, Any]:
    """Sizes, test share, slot counts per split and the split's guarantees (checked, not assumed)."""
    sizes = data.sizes()
    train_types = {t for u in data.train for t in u.slot_types()}
    train_pairs = set().union(*(pairs_of(u) for u in data.train)) if data.train else set()
    test_types = {t for u in data.test for t in u.slot_types()}
    return {
        **data.info, "source": data.source, "sizes": sizes,
        "test_share": round(sizes["test"] / max(1, sum(sizes.values())), 4),
        "max_slots": {s: max((len(u.spans()) for u in data.split(s)), default=0) for s in SPLITS},
        "mean_slots": {s: round(sum(len(u.spans()) for u in data.split(s)) / max(1, sizes[s]), 3) for s in SPLITS},
        "test_types_unseen_in_train": sorted(test_types - train_types),
        "test_with_novel_pair": sum(bool(pairs_of(u) - train_pairs) for u in data.test),
        "intents": len(data.intents), "slot_labels": len(data.slots),
    }


def write(data: SluData, out: Path) -> None:
    """Write ``data`` in the JointBERT layout into ``out`` (atomically) with ``split.json`` statistics."""
    with atomic_directory(out) as tmp:
        for split in SPLITS:
            (tmp / split).mkdir()
            rows = data.split(split)
            for name, lines in (("seq.in", [" ".join(u.tokens) for u in rows]),
                                ("seq.out", [" ".join(u.tags) for u in rows]), ("label", [u.intent for u in rows])):
                (tmp / split / name).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        (tmp / "intent_label.txt").write_text("".join(x + "\n" for x in data.intents), encoding="utf-8")
        (tmp / "slot_label.txt").write_text("".join(x + "\n" for x in data.slots), encoding="utf-8")
        (tmp / "split.json").write_text(json.dumps(statistics(data), indent=2) + "\n", encoding="utf-8")


def resplit(source: str | Path, kind: str, out: str | Path, *, seed: int = 0, k: int | None = None) -> dict[str, Any]:
    """Pool ``source``'s utterances, re-split them by ``kind``, write the layout to ``out``; returns the stats."""
    if kind not in KINDS:
        raise LeanfmError(f"unknown split kind '{kind}'; accepted: {', '.join(KINDS)}")
    data = load(resolve(source), allow_unseen=True)
    if kind == "novel-combination":
        if k is not None:
            raise LeanfmError("k applies to the length split only")
        new = split_novel_combination(data, seed=seed)
    else:
        new = split_length(data, k=k, seed=seed)
    write(new, Path(out))
    return statistics(new)
