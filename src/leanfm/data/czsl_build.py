"""The offline CZSL datasets (``leanfm czsl build emoji|shapes``) and the pools a base encoder is pretrained on.

Both builders write the standard layout of :mod:`leanfm.data.czsl` deterministically (PNG images, seeded pair
splits): ``shapes`` (attribute = texture-colour, object = shape, size a nuisance) and ``emoji`` (attribute = skin
tone or gender, object = hand gesture or people role, drawn by the Noto colour font and, where npm is reachable,
Twemoji). The emoji test images of a seen pair are drawn in another style than its training images, so they are
not augmented copies.

The pools (emoji outside the CZSL vocabulary, shapes of seen pairs only, CIFAR-10) are what the base dual encoder
is pretrained on: they must hold no image of an unseen pair, which :func:`pretraining_pool` checks with
:func:`leanfm.data.czsl.pool_overlap`.
"""

from __future__ import annotations

import json
import logging
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

import emoji as emoji_lib
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from leanfm.data import shapes
from leanfm.data.czsl import (
    SPLITS,
    CZSLData,
    Pair,
    Sample,
    fit_square,
    flatten_alpha,
    image_to_tensor,
    pool_overlap,
    split_pairs,
    tensor_to_image,
    write_czsl,
)
from leanfm.data.debian import find_package_path
from leanfm.data.npm import npm_package
from leanfm.errors import LeanfmError
from leanfm.paths import atomic_directory, leanfm_home

__all__ = [
    "EMOJI_STYLES", "GENDERS", "GESTURES", "POOL_SOURCES", "ROLES", "TONES", "build_emoji", "build_shapes",
    "cifar10_pool", "emoji_pool", "emoji_pool_entries", "emoji_vocabulary", "pretraining_pool", "shapes_pairs",
    "shapes_pool",
]

logger = logging.getLogger(__name__)


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
                image = tensor_to_image(shapes.render((size, texture, colour, obj), generator))
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
            images.append(image_to_tensor(_augment(by_name[drawn_by[k % len(drawn_by)]].glyph(text), rng)))
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
                images.append(image_to_tensor(fit_square(flatten_alpha(image), 32)))
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
