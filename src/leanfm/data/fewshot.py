"""Sentence-classification data in the 16-shot layout of RLPrompt / TrojLLM, and class-incremental task sequences.

Layout (any folder; ``--data DIR`` names it, or a folder holding it as ``fewshot/``):
``<task>/16-<seed>/{train,dev,test}.tsv`` with the header ``sentence<TAB>label`` (``text<TAB>label`` in a few AG
News files) and integer labels. Train and dev
hold 16 examples per class drawn from the dataset's original training set at each seed; ``test.tsv`` is the full
official test set (the same file at every seed). :func:`read_tsv` checks every line and names the file and line of
the first problem.

**Class-incremental sequences** (:func:`build_sequence`, for continual adapters). Each task owns a disjoint set of
classes named ``<dataset>:<label>``. Where the data come from — our reading of the issue's suggestion, so that
nothing is tuned on a test example:

- *train* and *test*: the official test set of each dataset is split per class by a seeded permutation
  (``split_seed``): the first half is the training pool, the second half the test set (each capped per class);
- *val*: the union of the 16-shot train and dev files over all seeds — drawn from the dataset's *training* set,
  so disjoint from both halves above — for choosing a method's hyperparameters;
- SNIPS intents (the long sequence only): its own train / dev / test splits, read from JointBERT's layout.

``text4``: AG News (4 classes), TREC (6), Subj (2), SST-2 (2) as four tasks. ``text11``: eleven tasks of two or
three classes (AG News and TREC split finer, plus Subj, SST-2, CR and SNIPS's seven intents), interleaved so that
consecutive tasks come from different datasets. MR is left out: it is drawn from the same Rotten Tomatoes reviews
as SST-2, so "MR positive" and "SST-2 positive" could not be told apart.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from leanfm.data import slu
from leanfm.errors import LeanfmError

LABELS: dict[str, tuple[str, ...]] = {
    "sst-2": ("negative", "positive"),
    "mr": ("negative", "positive"),
    "cr": ("negative", "positive"),
    "subj": ("subjective", "objective"),
    "trec": ("description", "entity", "abbreviation", "human", "location", "numeric"),
    "agnews": ("world", "sports", "business", "sci/tech"),
}
SNIPS = "snips"
HEADERS = (("sentence", "label"), ("text", "label"))  # a few AG News files say "text"

# (dataset, label indices or None for all): one entry per task
SEQUENCES: dict[str, tuple[tuple[str, tuple[int, ...] | None], ...]] = {
    "text4": (("agnews", None), ("trec", None), ("subj", None), ("sst-2", None)),
    "text11": (("agnews", (0, 1)), ("trec", (0, 1)), (SNIPS, (0, 1)), ("subj", None), ("agnews", (2, 3)),
               ("trec", (2, 3)), (SNIPS, (2, 3)), ("sst-2", None), ("trec", (4, 5)), (SNIPS, (4, 5, 6)),
               ("cr", None)),
}


@dataclass(frozen=True)
class Example:
    """One sentence and its label (an index into the dataset's or the sequence's label list)."""

    text: str
    label: int


@dataclass
class ClassTask:
    """One task of a class-incremental sequence: its classes (global indices) and three splits."""

    name: str
    classes: tuple[int, ...]
    train: list[Example]
    val: list[Example]
    test: list[Example]


@dataclass
class TaskSequence:
    """Tasks with disjoint classes; ``class_names[i]`` names global class ``i`` (``dataset:label``)."""

    name: str
    class_names: list[str]
    tasks: list[ClassTask]

    def sizes(self) -> list[dict[str, int]]:
        return [{"train": len(t.train), "val": len(t.val), "test": len(t.test)} for t in self.tasks]


def fewshot_root(folder: str | Path) -> Path:
    """The folder holding ``<task>/16-<seed>/``: ``folder`` itself or its ``fewshot/`` child."""
    path = Path(folder).expanduser()
    for candidate in (path, path / "fewshot"):
        if candidate.is_dir() and any((candidate / task).is_dir() for task in LABELS):
            return candidate
    raise LeanfmError(f"'{folder}' holds no 16-shot data; accepted: a folder with <task>/16-<seed>/test.tsv "
                      f"(tasks {', '.join(LABELS)}) or its parent (with fewshot/)")


def read_tsv(path: Path, classes: int) -> list[Example]:
    """Examples of one ``sentence<TAB>label`` file; the first bad line is a one-line error naming file and line."""
    if not path.is_file():
        raise LeanfmError(f"'{path}' is missing; the 16-shot layout has <task>/16-<seed>/{{train,dev,test}}.tsv")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise LeanfmError(f"cannot read '{path}' as UTF-8 text ({err})") from None
    if not lines or tuple(lines[0].strip().split("\t")) not in HEADERS:
        raise LeanfmError(f"{path}:1: header is not 'sentence<TAB>label' (or 'text<TAB>label')")
    out = []
    for number, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        text, sep, label = line.rstrip("\r").rpartition("\t")
        if not sep or not label.strip().isdigit() or int(label) >= classes:
            raise LeanfmError(f"{path}:{number}: line is not 'sentence<TAB>label' with a label in 0..{classes - 1}")
        if text.strip():  # CR's test set has one line with a blank sentence: nothing to classify
            out.append(Example(text.strip(), int(label)))
    return out


def _seeds(root: Path, task: str) -> list[Path]:
    folders = sorted(p for p in (root / task).glob("16-*") if p.is_dir())
    if not folders:
        raise LeanfmError(f"'{root / task}' has no 16-<seed> folders")
    return folders


def test_set(root: Path, task: str) -> list[Example]:
    """The official test set of ``task`` (the first seed folder's ``test.tsv``; every seed ships the same file)."""
    return read_tsv(_seeds(root, task)[0] / "test.tsv", len(LABELS[task]))


def validation_pool(root: Path, task: str) -> list[Example]:
    """The 16-shot train + dev examples of every seed (from the original training set), deduplicated, in file order."""
    seen: set[str] = set()
    out = []
    for folder in _seeds(root, task):
        for split in ("train", "dev"):
            for example in read_tsv(folder / f"{split}.tsv", len(LABELS[task])):
                if example.text not in seen:
                    seen.add(example.text)
                    out.append(example)
    return out


def _by_class(examples: Sequence[Example]) -> dict[int, list[Example]]:
    groups: dict[int, list[Example]] = defaultdict(list)
    for example in examples:
        groups[example.label].append(example)
    return groups


def _shuffled(examples: list[Example], seed: int, salt: str) -> list[Example]:
    out = list(examples)
    random.Random(f"{seed}:{salt}").shuffle(out)
    return out


def _snips(root: Path) -> slu.SluData:
    for folder in (root / "slu" / SNIPS, root / SNIPS, root.parent / "slu" / SNIPS):
        if (folder / "intent_label.txt").is_file():
            return slu.load(folder, allow_unseen=True)
    raise LeanfmError(f"no SNIPS data under '{root}'; accepted: slu/snips/ in JointBERT's layout beside fewshot/")


def _dataset_splits(root: Path, dataset: str, split_seed: int,
                    snips: slu.SluData | None) -> tuple[list[str], dict[str, list[Example]]]:
    """(label names, {"train", "val", "test"} examples with dataset-local labels)."""
    if dataset == SNIPS:
        assert snips is not None
        names = sorted({u.intent for u in snips.train})
        index = {name: i for i, name in enumerate(names)}

        def convert(utterances: list[slu.Utterance]) -> list[Example]:
            return [Example(" ".join(u.tokens), index[u.intent]) for u in utterances if u.intent in index]

        return names, {"train": convert(snips.train), "val": convert(snips.dev), "test": convert(snips.test)}
    names = list(LABELS[dataset])
    train, test = [], []
    for label, group in sorted(_by_class(test_set(root, dataset)).items()):
        shuffled = _shuffled(group, split_seed, f"{dataset}:{label}")
        half = len(shuffled) // 2
        train += shuffled[:half]
        test += shuffled[half:]
    return names, {"train": train, "val": validation_pool(root, dataset), "test": test}


def build_sequence(folder: str | Path, name: str = "text4", *, split_seed: int = 0, train_per_class: int = 200,
                   val_per_class: int = 50, test_per_class: int = 200) -> TaskSequence:
    """The class-incremental sequence ``name`` (module docstring) from ``folder``; caps are per class (0: all)."""
    if name not in SEQUENCES:
        raise LeanfmError(f"unknown task sequence '{name}'; accepted: {', '.join(SEQUENCES)}")
    for cap, value in (("train_per_class", train_per_class), ("val_per_class", val_per_class),
                       ("test_per_class", test_per_class)):
        if value < 0:
            raise LeanfmError(f"{cap} {value} is invalid; accepted: an integer >= 0 (0: all)")
    root = fewshot_root(folder)
    plan = SEQUENCES[name]
    snips = _snips(root) if any(dataset == SNIPS for dataset, _ in plan) else None
    cache: dict[str, tuple[list[str], dict[str, list[Example]]]] = {}
    class_names: list[str] = []
    tasks = []
    for dataset, labels in plan:
        if dataset not in cache:
            cache[dataset] = _dataset_splits(root, dataset, split_seed, snips)
        names, splits = cache[dataset]
        local = tuple(range(len(names))) if labels is None else labels
        first = len(class_names)
        class_names += [f"{dataset}:{names[i]}" for i in local]
        remap = {label: first + i for i, label in enumerate(local)}
        caps = {"train": train_per_class, "val": val_per_class, "test": test_per_class}
        chosen: dict[str, list[Example]] = {}
        for split, examples in splits.items():
            groups = _by_class(examples)
            chosen[split] = []
            for label in local:
                group = _shuffled(groups.get(label, []), split_seed, f"{dataset}:{split}:{label}")
                chosen[split] += [Example(e.text, remap[label]) for e in group[: caps[split] or None]]
            if not chosen[split]:
                raise LeanfmError(f"{dataset} has no {split} examples of labels {list(local)}")
        task_name = dataset if labels is None else f"{dataset}[{','.join(names[i] for i in local)}]"
        tasks.append(ClassTask(task_name, tuple(remap.values()), chosen["train"], chosen["val"], chosen["test"]))
    return TaskSequence(name, class_names, tasks)


# Held-out text for language-model evaluation: the sentences of the 16-shot tasks, grouped by the kind of text
# they are (none of it is in any calibration mix). "test" = the official test sets; "val" = the 16-shot train +
# dev pools (drawn from the original training sets), for choosing settings without touching a test set.
TEXT_DOMAINS: dict[str, tuple[str, ...]] = {
    "reviews": ("sst-2", "cr"),  # movie and product reviews
    "news": ("agnews",),
    "questions": ("trec",),
}


def domain_text(folder: str | Path, domain: str, split: str = "test") -> str:
    """The sentences of one :data:`TEXT_DOMAINS` domain, one per line, tasks in the listed order."""
    if domain not in TEXT_DOMAINS:
        raise LeanfmError(f"unknown text domain '{domain}'; accepted: {', '.join(TEXT_DOMAINS)}")
    if split not in ("test", "val"):
        raise LeanfmError(f"unknown split '{split}' of the 16-shot text; accepted: test, val")
    root = fewshot_root(folder)
    read = test_set if split == "test" else validation_pool
    return "\n".join(example.text for task in TEXT_DOMAINS[domain] for example in read(root, task))
