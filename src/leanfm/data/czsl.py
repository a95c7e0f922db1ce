"""Compositional zero-shot learning (CZSL) data in the community's standard layout: reading, writing, splitting.

The layout is the one ExplainableML/czsl releases MIT-States, UT-Zappos and C-GQA in::

    ROOT/images/<relative image paths>
    ROOT/compositional-split-natural/{train,val,test}_pairs.txt   one "attr obj" per line
    ROOT/metadata_compositional-split-natural.t7                  torch.save'd list of
        {"image": <path under images/>, "attr": str, "obj": str, "set": "train" | "val" | "test"}

Reading follows the community's loader: entries with attribute ``NA`` or a set other than those three are skipped
(the public files hold both). Our reading: any other entry whose pair is not listed for its own split is an error,
where the community's loader drops it silently — a typo would otherwise shrink a split unnoticed. The metadata is
read with ``torch.load(weights_only=True)``: no arbitrary unpickling.

Pair splits follow the natural splits: ~55% of pairs seen in training with every attribute and object among them,
the rest unseen and divided between val and test, whose pair files also list a seeded half of the seen pairs.
The offline datasets built in this layout and the base encoder's pretraining pools live in
:mod:`leanfm.data.czsl_build`; :func:`pool_overlap` is the check that a pool holds no unseen pair.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from leanfm.errors import LeanfmError
from leanfm.paths import atomic_directory

__all__ = [
    "METADATA", "SPLITS", "SPLIT_DIR", "CZSLData", "Pair", "Sample", "fit_square", "flatten_alpha", "image_to_tensor",
    "load_images", "pool_overlap", "read_czsl", "split_pairs", "tensor_to_image", "write_czsl",
]

logger = logging.getLogger(__name__)

SPLIT_DIR = "compositional-split-natural"
METADATA = "metadata_compositional-split-natural.t7"
SPLITS = ("train", "val", "test")
Pair = tuple[str, str]


@dataclass(frozen=True)
class Sample:
    """One image: its path under ``images/``, its attribute and object, and its split."""

    image: str
    attr: str
    obj: str
    split: str


@dataclass
class CZSLData:
    """A CZSL dataset: sorted vocabularies, pair lists per split (file order) and the kept samples."""

    root: Path
    attrs: list[str]
    objs: list[str]
    pairs: dict[str, list[Pair]]
    samples: list[Sample]

    def split(self, name: str) -> list[Sample]:
        """The samples of ``train``, ``val`` or ``test``."""
        if name not in SPLITS:
            raise LeanfmError(f"unknown CZSL split '{name}'; accepted: {', '.join(SPLITS)}")
        return [s for s in self.samples if s.split == name]

    @property
    def seen_pairs(self) -> list[Pair]:
        """The training pairs (the only ones a method may train on)."""
        return list(self.pairs["train"])

    def unseen_pairs(self) -> list[Pair]:
        """Pairs of val or test that are not training pairs, val's first, each once."""
        seen = set(self.pairs["train"])
        return list(dict.fromkeys(p for name in ("val", "test") for p in self.pairs[name] if p not in seen))

    def all_pairs(self) -> list[Pair]:
        """Open world: every attribute x object, attribute-major (feasible or not)."""
        return [(a, o) for a in self.attrs for o in self.objs]


# ----------------------------------------------------------------------------------------------------- reading


def read_czsl(root: str | Path) -> CZSLData:
    """Read a folder in the standard CZSL layout; one-line ``LeanfmError`` on anything malformed."""
    root = Path(root)
    if not root.is_dir():
        raise LeanfmError(f"CZSL folder '{root}' does not exist; expected images/, {SPLIT_DIR}/ and {METADATA}")
    pairs = {name: _read_pairs(root / SPLIT_DIR / f"{name}_pairs.txt") for name in SPLITS}
    attrs = sorted({a for listed in pairs.values() for a, _ in listed})
    objs = sorted({o for listed in pairs.values() for _, o in listed})
    samples = _samples(_read_metadata(root / METADATA), pairs, root / METADATA)
    for name in SPLITS:
        if not any(s.split == name for s in samples):
            raise LeanfmError(f"CZSL data '{root}' has no {name} samples; every split needs images")
    return CZSLData(root, attrs, objs, pairs, samples)


def _read_pairs(path: Path) -> list[Pair]:
    if not path.is_file():
        raise LeanfmError(f"CZSL pair file '{path}' is missing; expected one 'attr obj' per line")
    pairs: list[Pair] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        words = line.split()
        if words and len(words) != 2:
            raise LeanfmError(f"{path}:{number}: expected 'attr obj' (two words), found {line.strip()!r}")
        if words:
            pairs.append((words[0], words[1]))
    if not pairs:
        raise LeanfmError(f"CZSL pair file '{path}' lists no pairs")
    return list(dict.fromkeys(pairs))


def _read_metadata(path: Path) -> list[dict]:
    if not path.is_file():
        raise LeanfmError(f"CZSL metadata '{path}' is missing; expected a torch.save'd list of image/attr/obj/set")
    try:
        entries = torch.load(path, weights_only=True)  # plain containers only: no arbitrary unpickling
    except Exception as err:  # any failure to load safely is the user's file, said in one line
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise LeanfmError(f"CZSL metadata '{path}' cannot be loaded with weights_only=True ({reason})") from None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise LeanfmError(f"CZSL metadata '{path}' is not a list of dicts with keys image, attr, obj, set")
    return entries


def _samples(entries: list[dict], pairs: dict[str, list[Pair]], path: Path) -> list[Sample]:
    by_split = {name: set(listed) for name, listed in pairs.items()}
    attrs = {a for listed in pairs.values() for a, _ in listed}
    objs = {o for listed in pairs.values() for _, o in listed}
    samples = []
    for index, entry in enumerate(entries):
        missing = [k for k in ("image", "attr", "obj", "set") if k not in entry]
        if missing:
            raise LeanfmError(f"{path}: entry {index} lacks '{missing[0]}'; expected keys image, attr, obj, set")
        image, attr, obj, split = (str(entry[k]) for k in ("image", "attr", "obj", "set"))
        if attr == "NA" or split not in SPLITS:
            continue  # incomplete labels or images outside the three splits, skipped as the community does
        if attr not in attrs or obj not in objs:
            kind, word = ("attribute", attr) if attr not in attrs else ("object", obj)
            raise LeanfmError(f"{path}: image '{image}' has {kind} '{word}', which no pair file lists")
        if (attr, obj) not in by_split[split]:
            raise LeanfmError(f"{path}: image '{image}' is '{attr} {obj}', not a pair of {split}_pairs.txt")
        samples.append(Sample(image, attr, obj, split))
    return samples


def load_images(data: CZSLData, samples: list[Sample], size: int = 32) -> torch.Tensor:
    """``[N, 3, size, size]`` floats in [0, 1], RGB.

    Our reading of "resize": the shorter side is scaled to ``size`` (Pillow's bilinear filter widens its support
    when shrinking, so this is antialiased) and the centre cropped, as the community's test transform does.
    Transparent images are composited on white.
    """
    out = torch.empty(len(samples), 3, size, size)
    for index, sample in enumerate(samples):
        path = data.root / "images" / sample.image
        if not path.is_file():
            raise LeanfmError(f"CZSL image '{path}' is missing ({sample.attr} {sample.obj}, {sample.split})")
        with Image.open(path) as image:
            out[index] = image_to_tensor(fit_square(flatten_alpha(image), size))
    return out


def flatten_alpha(image: Image.Image) -> Image.Image:
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def fit_square(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    scale = size / min(width, height)
    new = (max(size, round(width * scale)), max(size, round(height * scale)))
    if new != image.size:
        image = image.resize(new, Image.Resampling.BILINEAR)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255


def tensor_to_image(tensor: torch.Tensor) -> Image.Image:
    """``[3, H, W]`` in [0, 1] -> an RGB PIL image."""
    array = (tensor.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


# ----------------------------------------------------------------------------------------------------- writing


def write_czsl(out: str | Path, pairs: dict[str, list[Pair]], samples_with_images: Iterable[tuple[Sample, Image.Image]],
               info: dict | None = None) -> Path:
    """Write a dataset in the standard layout, atomically; it is read back before it replaces ``out``.

    ``info`` (build parameters) goes to ``build.json`` beside the standard files, which readers ignore.
    """
    out = Path(out)
    if set(pairs) != set(SPLITS):
        raise LeanfmError(f"pairs must have exactly the splits {', '.join(SPLITS)}; got {', '.join(sorted(pairs))}")
    if any(len(word.split()) != 1 for listed in pairs.values() for pair in listed for word in pair):
        raise LeanfmError("CZSL attribute and object names must be single words (the pair files are space separated)")
    with atomic_directory(out) as tmp:
        (tmp / SPLIT_DIR).mkdir()
        for name in SPLITS:
            lines = "".join(f"{a} {o}\n" for a, o in pairs[name])
            (tmp / SPLIT_DIR / f"{name}_pairs.txt").write_text(lines, encoding="utf-8")
        entries = []
        for sample, image in samples_with_images:
            path = tmp / "images" / sample.image
            if ".." in Path(sample.image).parts or Path(sample.image).is_absolute():
                raise LeanfmError(f"image path '{sample.image}' must be relative to images/ and stay inside it")
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path, format="PNG")
            entries.append({"image": sample.image, "attr": sample.attr, "obj": sample.obj, "set": sample.split})
        torch.save(entries, tmp / METADATA)
        if info is not None:
            (tmp / "build.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        read_czsl(tmp)  # never publish a folder our own reader refuses
    return out


def split_pairs(pairs: list[Pair], seed: int, train: float = 0.55, val: float = 0.20,
                seen_in_eval: float = 0.5) -> dict[str, list[Pair]]:
    """Seeded natural split: ``train`` ~55% of ``pairs`` covering every attribute and object, the rest unseen
    into ``val`` (~20%) and ``test``; val and test also list a seeded ``seen_in_eval`` share of the seen pairs.

    Every list keeps the order of ``pairs``.
    """
    attrs, objs = {a for a, _ in pairs}, {o for _, o in pairs}
    n_train, n_val = round(train * len(pairs)), max(1, round(val * len(pairs)))
    if n_train < 1 or n_train + n_val >= len(pairs):
        raise LeanfmError(f"cannot split {len(pairs)} pairs into seen, val-unseen and test-unseen pairs")
    generator = torch.Generator().manual_seed(seed)
    for _ in range(1000):
        order = torch.randperm(len(pairs), generator=generator).tolist()
        seen = sorted(order[:n_train])
        if {pairs[i][0] for i in seen} == attrs and {pairs[i][1] for i in seen} == objs:
            break
    else:
        raise LeanfmError(f"no split of {len(pairs)} pairs puts every attribute and object in training (seed {seed})")
    n_seen_eval = round(seen_in_eval * len(seen))
    split = {"train": seen}
    for name, unseen in (("val", order[n_train:n_train + n_val]), ("test", order[n_train + n_val:])):
        shown = [seen[i] for i in torch.randperm(len(seen), generator=generator)[:n_seen_eval].tolist()]
        split[name] = sorted(unseen + shown)
    return {name: [pairs[i] for i in indices] for name, indices in split.items()}


def pool_overlap(captions: Iterable[str], data: CZSLData, pairs: Iterable[Pair] | None = None) -> list[str]:
    """The captions that name a pair of ``pairs`` (default: ``data``'s unseen val/test pairs); empty means clean.

    A caption names a pair when it contains the attribute and the object as whole phrases, with ``_`` (and, as
    an alternative, ``-``) read as spaces: ``a small striped red triangle`` names ``(striped-red, triangle)``,
    ``thumbs up medium-light skin tone`` names ``(medium-light, thumbs_up)`` but not ``(medium, thumbs_up)``.
    """
    def patterns(word: str) -> list[re.Pattern[str]]:
        spaced = word.lower().replace("_", " ")
        return [re.compile(rf"(?<![\w-]){re.escape(v)}(?![\w-])") for v in {spaced, spaced.replace("-", " ")}]

    targets = [(patterns(a), patterns(o)) for a, o in (data.unseen_pairs() if pairs is None else pairs)]
    hits = []
    for caption in dict.fromkeys(captions):
        text = caption.lower().replace("_", " ")
        if any(any(p.search(text) for p in ap) and any(p.search(text) for p in op) for ap, op in targets):
            hits.append(caption)
    return hits
