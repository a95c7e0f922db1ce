"""The JointBERT-layout loader (line-by-line errors) and the compositional re-splits' guarantees."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from leanfm.data import slu
from leanfm.errors import LeanfmError

TYPES = {"from": ("boston", "denver"), "to": ("dallas", "new york"), "date": ("monday", "tomorrow"),
         "airline": ("delta", "united"), "time": ("noon", "8 pm")}
WORDS = {"from": "from", "to": "to", "date": "on", "airline": "with", "time": "at"}


def _utterance(kinds: tuple[str, ...], variant: int) -> tuple[str, str, str]:
    """``show flights from boston to dallas ...``: one carrier word (O) then the value (B-/I-) per slot."""
    words, tags = ["show", "flights"], ["O", "O"]
    for kind in kinds:
        value = TYPES[kind][variant % 2].split()
        words += [WORDS[kind], *value]
        tags += ["O", f"B-{kind}"] + [f"I-{kind}"] * (len(value) - 1)
    intent = "flight" if variant % 3 else "airfare"
    return " ".join(words), " ".join(tags), intent


def make_dataset(root: Path, copies: int = 3) -> Path:
    """Every combination of 0-4 of the five slot types, ``copies`` variants each, spread over train/dev/test."""
    rows = [_utterance(kinds, v) for n in range(5) for kinds in itertools.combinations(sorted(TYPES), n)
            for v in range(copies)]
    parts = {"train": rows[0::3] + rows[1::3], "dev": rows[2::6], "test": rows[5::6]}
    for split, part in parts.items():
        (root / split).mkdir(parents=True)
        for i, name in enumerate(slu.FILES):
            (root / split / name).write_text("".join(r[i] + "\n" for r in part))
    slots = ["PAD", "UNK", "O"] + [f"{p}-{k}" for k in sorted(TYPES) for p in "BI"]
    (root / "slot_label.txt").write_text("\n".join(slots) + "\n")
    (root / "intent_label.txt").write_text("UNK\nairfare\nflight\n")
    return root


def test_load_reads_the_layout(tmp_path):
    data = slu.load(make_dataset(tmp_path / "d"))
    assert sum(data.sizes().values()) == 31 * 3 and data.intents == ["UNK", "airfare", "flight"]
    u = data.train[0]
    assert len(u.tokens) == len(u.tags)
    spans = slu.Utterance(("to", "new", "york", "at", "noon"), ("O", "B-to", "I-to", "O", "B-time"), "f").spans()
    assert spans == [("to", 1, 3), ("time", 4, 5)]


@pytest.mark.parametrize(("file", "line", "text", "words"), [
    ("train/seq.out", 2, "O O", "train/seq.out:2: 2 tags for"),
    ("train/seq.out", 1, "O B-nowhere", "train/seq.out:1: unknown slot tag 'B-nowhere'"),
    ("train/seq.out", 1, "O X-from", "train/seq.out:1: tag 'X-from' is not BIO"),
    ("dev/label", 3, "booking", "dev/label:3: unknown intent 'booking'"),
    ("test/seq.in", 1, "", "test/seq.in:1: empty utterance"),
])
def test_malformed_lines_are_one_line_errors_naming_file_and_line(tmp_path, file, line, text, words):
    root = make_dataset(tmp_path / "d")
    lines = (root / file).read_text().splitlines()
    lines[line - 1] = text
    (root / file).write_text("\n".join(lines) + "\n")
    with pytest.raises(LeanfmError) as caught:
        slu.load(root)
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_missing_files_and_uneven_line_counts_are_refused(tmp_path):
    root = make_dataset(tmp_path / "d")
    (root / "dev" / "label").write_text("flight\n")
    with pytest.raises(LeanfmError, match=r"dev/label has 1 lines but .*seq.in has"):
        slu.load(root)
    (root / "intent_label.txt").unlink()
    with pytest.raises(LeanfmError, match=r"intent_label\.txt' is missing"):
        slu.load(root)


def test_unseen_dev_labels_are_kept_only_when_allowed(tmp_path):
    root = make_dataset(tmp_path / "d")
    labels = (root / "test" / "label").read_text().splitlines(True)
    (root / "test" / "label").write_text("day_name\n" + "".join(labels[1:]))
    with pytest.raises(LeanfmError, match="test/label:1: unknown intent 'day_name'"):
        slu.load(root)
    assert slu.load(root, allow_unseen=True).test[0].intent == "day_name"


def test_novel_combination_split_guarantees(tmp_path):
    data = slu.load(make_dataset(tmp_path / "d", copies=6))
    new = slu.split_novel_combination(data, seed=3, min_test=0.15, max_test=0.3)
    held = {tuple(p) for p in new.info["held_out_pairs"]}
    train_pairs = set().union(*(slu.pairs_of(u) for u in new.train + new.dev))
    train_types = {t for u in new.train for t in u.slot_types()}
    assert held and not held & train_pairs  # no held-out pair co-occurs in training (dev is training side)
    assert all(slu.pairs_of(u) & held for u in new.test)  # every test utterance has a novel pair
    assert {t for u in new.test for t in u.slot_types()} <= train_types  # every test slot type seen in training
    assert sorted(map(str, new.train + new.dev + new.test)) == sorted(map(str, data.train + data.dev + data.test))
    again = slu.split_novel_combination(data, seed=3, min_test=0.15, max_test=0.3)
    assert again.test == new.test and again.dev == new.dev  # deterministic


def test_length_split_thresholds_and_written_layout(tmp_path):
    root = make_dataset(tmp_path / "d")
    stats = slu.resplit(root, "length", tmp_path / "len")
    new = slu.load(tmp_path / "len")
    k = stats["k"]
    assert all(len(u.spans()) <= k for u in new.train + new.dev) and all(len(u.spans()) > k for u in new.test)
    assert stats == json.loads((tmp_path / "len" / "split.json").read_text())
    assert stats["sizes"] == new.sizes() and stats["max_slots"]["train"] == k
    # 0-4 slots in C(5, n) combinations: 1, 5, 10, 10, 5 -> k=3 leaves 5/31 = 16% for test
    assert k == 3 and stats["test_share"] == pytest.approx(5 / 31, abs=0.01)
    with pytest.raises(LeanfmError, match="unknown split kind 'random'"):
        slu.resplit(root, "random", tmp_path / "x")


def test_resolve_uses_the_environment_only_as_a_default(tmp_path, monkeypatch):
    make_dataset(tmp_path / "slu" / "mini")
    monkeypatch.delenv(slu.DATA_ENV, raising=False)
    with pytest.raises(LeanfmError, match="LEANFM_DATA is unset"):
        slu.resolve("mini")
    monkeypatch.setenv(slu.DATA_ENV, str(tmp_path))
    assert slu.resolve("mini") == tmp_path / "slu" / "mini"
    assert slu.resolve(tmp_path / "slu" / "mini") == tmp_path / "slu" / "mini"
