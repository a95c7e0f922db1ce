"""Compositional zero-shot learning (CZSL) data in the community's standard layout, two offline datasets built in
it, and the captioned pools a base encoder is pretrained on.

The layout is the one ExplainableML/czsl releases MIT-States, UT-Zappos and C-GQA in::

    ROOT/images/<relative image paths>
    ROOT/compositional-split-natural/{train,val,test}_pairs.txt   one "attr obj" per line
    ROOT/metadata_compositional-split-natural.t7                  torch.save'd list of
        {"image": <path under images/>, "attr": str, "obj": str, "set": "train" | "val" | "test"}

Reading follows the community's loader: entries with attribute ``NA`` or a set other than those three are skipped
(the public files hold both). Our reading: any other entry whose pair is not listed for its own split is an error,
where the community's loader drops it silently — a typo would otherwise shrink a split unnoticed.

Two builders write the same layout deterministically (PNG images, seeded splits): ``shapes`` (attribute =
texture-colour, object = shape, size a nuisance) and ``emoji`` (attribute = skin tone or gender, object = hand
gesture or people role, drawn by the Noto colour font and, where npm is reachable, Twemoji). Pair splits follow
the natural splits: ~55% of pairs seen in training with every attribute and object among them, the rest unseen
and divided between val and test, whose pair files also list a seeded half of the seen pairs. The emoji test
images of a seen pair are drawn in another style than its training images, so they are not augmented copies.

The pools (emoji outside the CZSL vocabulary, shapes of seen pairs only, CIFAR-10) are what the base dual encoder
is pretrained on: they must hold no image of an unseen pair, which :func:`pool_overlap` checks.
"""

from __future__ import annotations

import json
import logging
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import emoji as emoji_lib
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from leanfm.data import shapes
from leanfm.data.debian import find_package_path
from leanfm.data.npm import npm_package
from leanfm.errors import LeanfmError
from leanfm.paths import atomic_directory, leanfm_home

__all__ = [
    "EMOJI_STYLES", "METADATA", "SPLITS", "SPLIT_DIR", "CZSLData", "Sample", "build_emoji", "build_shapes",
    "cifar10_pool", "emoji_pool", "emoji_pool_entries", "emoji_vocabulary", "load_images", "pool_overlap",
    "read_czsl", "shapes_pool", "split_pairs", "write_czsl",
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
            out[index] = _to_tensor(_fit(_rgb(image), size))
    return out


def _rgb(image: Image.Image) -> Image.Image:
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _fit(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    scale = size / min(width, height)
    new = (max(size, round(width * scale)), max(size, round(height * scale)))
    if new != image.size:
        image = image.resize(new, Image.Resampling.BILINEAR)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255


def _to_image(tensor: torch.Tensor) -> Image.Image:
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


def _eval_counts(split: dict[str, list[Pair]], per_train_pair: int,
                 per_eval_pair: int) -> Iterator[tuple[str, Pair, int]]:
    """(split, pair, images) for every pair of every split."""
    for name in SPLITS:
        for pair in split[name]:
            yield name, pair, per_train_pair if name == "train" else per_eval_pair


# ------------------------------------------------------------------------------------------------------ shapes


def shapes_pairs() -> list[Pair]:
    """The 90 shapes pairs: attribute ``<texture>-<colour>`` (18) x object = shape (5)."""
    return [(f"{t}-{c}", s) for t in shapes.TEXTURES for c in shapes.COLOURS for s in shapes.SHAPES]


def build_shapes(out: str | Path, seed: int = 0, per_train_pair: int = 16, per_eval_pair: int = 8) -> Path:
    """Today's rendered shapes (:mod:`leanfm.data.shapes`) in the CZSL layout; size is a per-image nuisance."""
    split = split_pairs(shapes_pairs(), seed)
    generator = torch.Generator().manual_seed(seed + 1_000_003)

    def images() -> Iterator[tuple[Sample, Image.Image]]:
        for name, (attr, obj), count in _eval_counts(split, per_train_pair, per_eval_pair):
            texture, colour = attr.split("-")
            for k in range(count):
                size = tuple(shapes.SIZES)[int(torch.randint(len(shapes.SIZES), (), generator=generator))]
                image = _to_image(shapes.render((size, texture, colour, obj), generator))
                yield Sample(f"{attr}_{obj}/{name}_{k:03d}.png", attr, obj, name), image

    info = {"dataset": "shapes", "seed": seed, "per_train_pair": per_train_pair, "per_eval_pair": per_eval_pair}
    path = write_czsl(out, split, images(), info)
    logger.info("shapes CZSL data in %s: %s pairs", path, {k: len(v) for k, v in split.items()})
    return path


def shapes_pool(seed: int, n_per_pair: int, exclude: CZSLData) -> tuple[torch.Tensor, list[str]]:
    """Shapes renders of ``exclude``'s TRAIN pairs only, with :func:`shapes.caption` captions (size drawn at random)."""
    generator = torch.Generator().manual_seed(seed)
    images, captions = [], []
    for attr, obj in exclude.seen_pairs:
        texture, _, colour = attr.partition("-")
        if texture not in shapes.TEXTURES or colour not in shapes.COLOURS or obj not in shapes.SHAPES:
            raise LeanfmError(f"pair '{attr} {obj}' is not a shapes pair (texture-colour shape); is this shapes data?")
        for _ in range(n_per_pair):
            size = tuple(shapes.SIZES)[int(torch.randint(len(shapes.SIZES), (), generator=generator))]
            images.append(shapes.render((size, texture, colour, obj), generator))
            captions.append(shapes.caption((size, texture, colour, obj)))
    return torch.stack(images), captions


# ------------------------------------------------------------------------------------------------------- emoji

EMOJI_STYLES = ("noto", "twitter")
TONES = {"light": "\U0001f3fb", "medium-light": "\U0001f3fc", "medium": "\U0001f3fd", "medium-dark": "\U0001f3fe",
         "dark": "\U0001f3ff"}
GENDERS = ("man", "woman")
# CLDR names (as in emoji.EMOJI_DATA) of objects that have all five skin-tone forms; roles also have man/woman forms
GESTURES = ("thumbs_up", "thumbs_down", "waving_hand", "OK_hand", "victory_hand", "raised_fist", "raised_hand",
            "clapping_hands", "crossed_fingers", "call_me_hand", "index_pointing_up", "folded_hands", "flexed_biceps",
            "love-you_gesture", "sign_of_the_horns")
ROLES = ("teacher", "cook", "farmer", "health_worker", "scientist", "technologist", "artist", "pilot", "astronaut",
         "firefighter", "judge", "mechanic", "office_worker", "student", "singer")
NOTO_FONT = ("fonts-noto-color-emoji", "usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
TWITTER_NPM = ("emoji-datasource-twitter", "16.0.0")
_CANVAS = 96  # drawn at 3x the stored 32 px, then downsampled with antialiasing
_NOT_POOLED = {0x20E3} | set(range(0x1F1E6, 0x1F200)) | set(range(0xE0020, 0xE0080))  # keycaps, flags, tag flags


def _cldr_names() -> dict[str, str]:
    """CLDR name without colons -> fully qualified emoji string."""
    qualified = emoji_lib.STATUS["fully_qualified"]
    return {data["en"].strip(":"): text for text, data in emoji_lib.EMOJI_DATA.items() if data["status"] == qualified}


def emoji_vocabulary(max_objects: int | None = None) -> dict[Pair, str]:
    """(attribute, object) -> emoji string: gestures x tones, roles x tones, roles x {man, woman}.

    Objects are lower-cased CLDR names (``ok_hand``, ``health_worker``); ``max_objects`` keeps the first half
    gestures and half roles (tests). A role with a tone is its gender-neutral person form.
    """
    if max_objects is not None and max_objects < 2:
        raise LeanfmError(f"max_objects must be at least 2 (one gesture, one role); got {max_objects}")
    k = len(GESTURES) + len(ROLES) if max_objects is None else max_objects
    names = _cldr_names()
    vocabulary = {}
    for obj in GESTURES[:(k + 1) // 2] + ROLES[:k // 2]:
        for tone in TONES:
            vocabulary[(tone, obj.lower())] = names[f"{obj}_{tone}_skin_tone"]
        if obj in ROLES:
            for gender in GENDERS:
                vocabulary[(gender, obj.lower())] = names[f"{gender}_{obj}"]
    return vocabulary


def _key(text: str) -> str:
    """Lower-case hex code points joined by '-', variation selector dropped (Twemoji's file naming)."""
    return "-".join(f"{ord(c):x}" for c in text if c != "\ufe0f")


class _NotoStyle:
    """Glyphs of Debian's Noto colour font through Pillow (raqm shapes ZWJ and skin-tone sequences to one glyph)."""

    name = "noto"

    def __init__(self) -> None:
        path = find_package_path(*NOTO_FONT)
        self.font = ImageFont.truetype(str(path), 109, layout_engine=ImageFont.Layout.RAQM)
        self.cache: dict[str, Image.Image] = {}

    def has(self, text: str) -> bool:
        left, top, right, bottom = self.font.getbbox(text)
        return bottom > top and right - left <= 1.5 * self.font.size  # missing: empty; a broken sequence: wider

    def glyph(self, text: str) -> Image.Image:
        if text not in self.cache:
            _, _, right, bottom = self.font.getbbox(text)
            canvas = Image.new("RGBA", (int(right), int(bottom)), (0, 0, 0, 0))
            ImageDraw.Draw(canvas).text((0, 0), text, font=self.font, embedded_color=True)
            self.cache[text] = canvas.crop(canvas.getbbox())
        return self.cache[text]


class _TwitterStyle:
    """Twemoji 64 px PNGs from npm ``emoji-datasource-twitter`` (indexed by its ``emoji.json``)."""

    name = "twitter"

    def __init__(self) -> None:
        folder = npm_package(*TWITTER_NPM, include=("emoji.json", "img/twitter/64/"))
        self.paths: dict[str, Path] = {}
        for entry in json.loads((folder / "emoji.json").read_text(encoding="utf-8")):
            for item in [entry, *entry.get("skin_variations", {}).values()]:
                path = folder / "img" / "twitter" / "64" / item["image"]
                if item.get("has_img_twitter") and path.is_file():
                    self.paths["-".join(p for p in item["unified"].lower().split("-") if p != "fe0f")] = path
        self.cache: dict[str, Image.Image] = {}

    def has(self, text: str) -> bool:
        return _key(text) in self.paths

    def glyph(self, text: str) -> Image.Image:
        if text not in self.cache:
            with Image.open(self.paths[_key(text)]) as image:
                rgba = image.convert("RGBA")
            self.cache[text] = rgba.crop(rgba.getbbox())
        return self.cache[text]


def _styles(names: tuple[str, ...]) -> list[_NotoStyle | _TwitterStyle]:
    """The available drawing styles among ``names``; an unavailable one is a warning, none at all an error."""
    unknown = [n for n in names if n not in EMOJI_STYLES]
    if unknown or not names:
        raise LeanfmError(f"unknown emoji style '{unknown[0] if unknown else ''}'; accepted: {', '.join(EMOJI_STYLES)}")
    styles: list[_NotoStyle | _TwitterStyle] = []
    for name in dict.fromkeys(names):
        try:
            styles.append(_NotoStyle() if name == "noto" else _TwitterStyle())
        except LeanfmError as err:
            logger.warning("emoji style '%s' is not available (%s); building without it", name, err)
    if not styles:
        raise LeanfmError(f"no emoji drawing style is available (tried {', '.join(names)})")
    return styles


def _augment(glyph: Image.Image, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """The glyph at scale 0.6-1.0 of the canvas, rotated +-15 degrees, at a random position, on a plain light,
    dark or random background; drawn at 96 px and downsampled to ``size``."""
    kind = int(rng.integers(3))
    low, high = ((200, 256), (0, 56), (0, 256))[kind]
    canvas = Image.new("RGB", (_CANVAS, _CANVAS), tuple(int(v) for v in rng.integers(low, high, 3)))
    side = rng.uniform(0.6, 1.0) * _CANVAS
    scale = side / max(glyph.size)
    resized = glyph.resize((max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))),
                           Image.Resampling.LANCZOS)
    turned = resized.convert("RGBa").rotate(float(rng.uniform(-15, 15)), Image.Resampling.BICUBIC,
                                            expand=True).convert("RGBA")  # premultiplied: no dark fringes
    spans = [(min(0, _CANVAS - n), max(0, _CANVAS - n)) for n in turned.size]
    x, y = (int(rng.integers(lo, hi + 1)) for lo, hi in spans)
    canvas.paste(turned, (x, y), turned)
    return canvas.resize((size, size), Image.Resampling.LANCZOS)


def _emoji_plan(split: dict[str, list[Pair]], styles: list[str], rng: np.random.Generator, per_train_pair: int,
                per_eval_pair: int) -> Iterator[tuple[str, Pair, int, str]]:
    """(split, pair, index, style) of every image: a seen pair trains on one seeded style and is evaluated on the
    others; unseen pairs are evaluated on all styles in turn."""
    train_style = {pair: styles[int(rng.integers(len(styles)))] for pair in split["train"]}
    for name, pair, count in _eval_counts(split, per_train_pair, per_eval_pair):
        if name == "train":
            choices = [train_style[pair]]
        elif pair in train_style and len(styles) > 1:
            choices = [s for s in styles if s != train_style[pair]]
        else:
            choices = styles
        for k in range(count):
            yield name, pair, k, choices[k % len(choices)]


def build_emoji(out: str | Path, seed: int = 0, styles: tuple[str, ...] = EMOJI_STYLES, max_objects: int | None = None,
                per_train_pair: int = 12, per_eval_pair: int = 6) -> Path:
    """Real drawn emoji in the CZSL layout: skin tone / gender x gesture / role (see :func:`emoji_vocabulary`).

    Image paths are ``<attr>_<obj>/<split>_<style>_<k>.png``, so the drawing style of every image is on record.
    With one style only, seen-pair test images differ from training images by augmentation alone (warned).
    """
    vocabulary = emoji_vocabulary(max_objects)
    drawers = [s for s in _styles(styles) if _covers(s, vocabulary)]
    if not drawers:
        raise LeanfmError(f"no emoji style among {', '.join(styles)} draws the whole CZSL vocabulary")
    by_name = {s.name: s for s in drawers}
    if len(drawers) == 1:
        logger.warning("only the '%s' emoji style is available: seen-pair val/test images differ from training "
                       "images by augmentation only", drawers[0].name)
    split = split_pairs(sorted(vocabulary), seed)
    rng = np.random.default_rng(seed)

    def images() -> Iterator[tuple[Sample, Image.Image]]:
        for name, (attr, obj), k, style in _emoji_plan(split, list(by_name), rng, per_train_pair, per_eval_pair):
            image = _augment(by_name[style].glyph(vocabulary[(attr, obj)]), rng)
            yield Sample(f"{attr}_{obj}/{name}_{style}_{k:03d}.png", attr, obj, name), image

    info = {"dataset": "emoji", "seed": seed, "styles": list(by_name), "max_objects": max_objects,
            "per_train_pair": per_train_pair, "per_eval_pair": per_eval_pair}
    path = write_czsl(out, split, images(), info)
    logger.info("emoji CZSL data in %s (styles %s): %s pairs", path, ", ".join(by_name),
                {k: len(v) for k, v in split.items()})
    return path


def _covers(style: _NotoStyle | _TwitterStyle, vocabulary: dict[Pair, str]) -> bool:
    missing = [pair for pair, text in vocabulary.items() if not style.has(text)]
    if missing:
        logger.warning("emoji style '%s' cannot draw '%s %s'; building without it", style.name, *missing[0])
    return not missing


# ------------------------------------------------------------------------------------------------------- pools


def emoji_pool_entries(exclude: CZSLData, styles: tuple[str, ...] = EMOJI_STYLES) -> list[tuple[str, str, list[str]]]:
    """(emoji, caption, styles drawing it) of every emoji OUTSIDE the CZSL vocabulary that a style can draw.

    Left out: any emoji with a skin-tone modifier, flags and keycaps, and every emoji whose CLDR name, with a
    ``man_``/``woman_``/``person_`` prefix removed, is an object of ``exclude`` (``thumbs_up``, ``man_teacher``).
    The caption is the CLDR name with underscores as spaces (``grinning face``).
    """
    objects = {o.lower() for o in exclude.objs}
    drawers = _styles(styles)
    entries = []
    for name, text in _cldr_names().items():
        points = {ord(c) for c in text}
        base = re.sub(r"^(man|woman|person)_", "", name).lower()
        if points & ({ord(t) for t in TONES.values()} | _NOT_POOLED) or name.lower() in objects or base in objects:
            continue
        drawn_by = [s.name for s in drawers if s.has(text)]
        if drawn_by:
            entries.append((text, name.replace("_", " "), drawn_by))
    return entries


def emoji_pool(seed: int, n_per_emoji: int, styles: tuple[str, ...] = EMOJI_STYLES,
               exclude: CZSLData | None = None, limit: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """``[N, 3, 32, 32]`` augmented emoji outside the CZSL vocabulary and their captions, styles in turn.

    ``exclude`` defaults to the whole emoji vocabulary; ``limit`` keeps a seeded subset of emoji (tests).
    """
    if exclude is None:
        vocabulary = emoji_vocabulary()
        exclude = CZSLData(Path("."), sorted({a for a, _ in vocabulary}), sorted({o for _, o in vocabulary}),
                           {name: [] for name in SPLITS}, [])
    entries = emoji_pool_entries(exclude, styles)
    rng = np.random.default_rng(seed)
    if limit is not None:
        entries = [entries[i] for i in sorted(rng.permutation(len(entries))[:limit].tolist())]
    by_name = {s.name: s for s in _styles(styles)}
    images, captions = [], []
    for text, caption, drawn_by in entries:
        for k in range(n_per_emoji):
            images.append(_to_tensor(_augment(by_name[drawn_by[k % len(drawn_by)]].glyph(text), rng)))
            captions.append(caption)
    return torch.stack(images), captions


def cifar10_pool(folder: str | Path, per_class: int, seed: int = 0, split: str = "train"
                 ) -> tuple[torch.Tensor, list[str]]:
    """``per_class`` seeded CIFAR-10 images per class, ``[N, 3, 32, 32]``, captioned ``a photo of a(n) <class>``.

    ``folder`` holds ``cifar10-jpeg/{train,test}/<class>/<n>.jpg`` (or is that ``cifar10-jpeg`` folder), or is
    ``cifar10-jpeg.tar``, which is extracted once under ``$LEANFM_HOME/cifar10`` (never beside the tar).
    """
    root = _cifar_root(Path(folder))
    if split not in ("train", "test"):
        raise LeanfmError(f"unknown CIFAR-10 split '{split}'; accepted: train, test")
    classes = sorted(p.name for p in (root / split).iterdir() if p.is_dir())
    generator = torch.Generator().manual_seed(seed)
    images, captions = [], []
    for name in classes:
        files = sorted((root / split / name).glob("*.jpg"))
        if len(files) < per_class:
            raise LeanfmError(f"CIFAR-10 class '{name}' has {len(files)} {split} images; asked for {per_class}")
        for index in sorted(torch.randperm(len(files), generator=generator)[:per_class].tolist()):
            with Image.open(files[index]) as image:
                images.append(_to_tensor(_fit(_rgb(image), 32)))
            captions.append(f"a photo of {'an' if name[0] in 'aeiou' else 'a'} {name}")
    return torch.stack(images), captions


def _cifar_root(path: Path) -> Path:
    if path.is_file() and path.name.endswith(".tar"):
        target = leanfm_home() / "cifar10"
        if not (target / "cifar10-jpeg" / "train").is_dir():
            logger.info("extracting %s into %s", path, target)
            with atomic_directory(target) as tmp, tarfile.open(path) as archive:
                archive.extractall(tmp, filter="data")
        path = target
    for candidate in (path / "cifar10-jpeg", path):
        if (candidate / "train").is_dir() and (candidate / "test").is_dir():
            return candidate
    raise LeanfmError(f"'{path}' is not CIFAR-10 as cifar10-jpeg/{{train,test}}/<class>/<n>.jpg nor cifar10-jpeg.tar")


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


POOL_SOURCES = ("emoji", "shapes", "cifar10")


def _is_emoji(data: CZSLData) -> bool:
    return set(data.attrs) <= set(TONES) | set(GENDERS)


def pretraining_pool(sources: list[str], excluded: list[CZSLData], *, per_item: int = 8, per_pair: int = 40,
                     per_class: int = 500, cifar: str | Path | None = None, seed: int = 0
                     ) -> tuple[torch.Tensor, list[str], dict]:
    """The captioned pool a base image tower is aligned on, none of it from ``excluded``'s val/test-only pairs.

    ``emoji``: emoji outside the emoji CZSL vocabulary (``per_item`` renders each); ``shapes``: renders of the
    shapes dataset's *train* pairs (``per_pair`` each); ``cifar10``: ``per_class`` photos per class from ``cifar``.
    The emoji and shapes sources need the matching dataset in ``excluded``. Returns (images, captions, counts).
    """
    unknown = [s for s in sources if s not in POOL_SOURCES]
    if unknown or not sources:
        raise LeanfmError(f"unknown pool source(s) {unknown or sources}; accepted: {', '.join(POOL_SOURCES)}")
    parts: list[tuple[torch.Tensor, list[str]]] = []
    info: dict = {}
    for source in sources:
        if source == "cifar10":
            if cifar is None:
                raise LeanfmError("pool source cifar10 needs a CIFAR-10 folder or cifar10-jpeg.tar (--cifar)")
            parts.append(cifar10_pool(cifar, per_class, seed))
        else:
            match = [d for d in excluded if _is_emoji(d) == (source == "emoji")]
            if not match:
                raise LeanfmError(f"pool source {source} needs its CZSL dataset to exclude (--exclude DIR built by "
                                  f"'leanfm czsl build {source}')")
            parts.append(emoji_pool(seed, per_item, exclude=match[0]) if source == "emoji"
                         else shapes_pool(seed, per_pair, match[0]))
        info[source] = len(parts[-1][1])
    images = torch.cat([p[0] for p in parts])
    captions = [c for p in parts for c in p[1]]
    for data in excluded:
        hits = pool_overlap(captions, data)
        if hits:
            raise LeanfmError(f"the pool names {len(hits)} val/test-only pair(s) of '{data.root}' (e.g. '{hits[0]}'); "
                              "accepted: a pool without them")
    return images, captions, info
