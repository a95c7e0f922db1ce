"""Captioned images for the small text-to-image model: emoji drawn by the Noto colour font, and rendered shapes.

Why these: no captioned photo set is usable offline on two CPU cores (CIFAR-10 would take hundreds of CPU-hours),
while an emoji is a real drawing with a name ("a picture of penguin") and the shapes (:mod:`leanfm.data.shapes`)
have compositional captions ("a small striped red triangle"). Each image is augmented with a seeded shift, scale
and background, so every caption has many distinct images.

The concept split is fixed and depends only on the pinned ``emoji`` package (never on the font or a run's seed):

* :data:`HELD_OUT` — 40 emoji (objects and animals, chosen by hand to be distinct) that pretraining never sees;
  the continual sequences take prefixes of it (10 and 30 concepts).
* pretraining emoji — the single-code-point emoji of Emoji <= 12 (drawn by any Noto colour font), minus skin-tone
  modifiers, regional indicators and keycaps, minus every emoji whose name shares a word (or its plural) with a
  held-out name ("camera with flash" goes with "camera"), one emoji per last name word (the first by name: the
  76 "... face" emoji, near-identical at 32 px, give one concept), in a permutation seeded by
  :data:`SPLIT_SEED`; a run takes the first ``count``, so smaller runs use subsets of larger ones.
* shapes — every size x texture x colour x shape combination (180), all in pretraining.

Renders are cached under ``$LEANFM_HOME/t2i`` (uint8 safetensors, written atomically), keyed by the concepts,
the number of renders, the seed and the font file.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import emoji as emoji_lib
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from safetensors.torch import load_file, save

from leanfm.data import shapes
from leanfm.errors import LeanfmError
from leanfm.paths import atomic_write_bytes, leanfm_home

__all__ = [
    "FONT_PACKAGE", "HELD_OUT", "IMAGE", "NOTO_FONT", "SOURCES", "SPLIT_SEED", "Concept", "check_font",
    "emoji_caption", "held_out_concepts", "image_grid", "parse_sources", "pretraining_concepts", "render_concepts",
    "write_png",
]
log = logging.getLogger(__name__)

NOTO_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
FONT_PACKAGE = "fonts-noto-color-emoji"
SOURCES = ("emoji", "shapes")
SPLIT_SEED = 0  # the pretraining emoji order; fixed: changing it changes every run's concepts
IMAGE = 32
MAX_EMOJI_VERSION = 12.0  # every Noto colour font since 2019 draws these
HELD_OUT = (
    "penguin", "rocket", "pineapple", "guitar", "snail", "cactus", "crab", "violin", "parrot", "octopus",
    "giraffe", "mushroom", "strawberry", "anchor", "umbrella", "koala", "owl", "hedgehog", "tractor", "volcano",
    "kangaroo", "flamingo", "avocado", "saxophone", "helicopter", "trophy", "snowman", "sunflower", "dolphin",
    "zebra", "camera", "bicycle", "cupcake", "turtle", "watermelon", "lobster", "robot", "crown", "balloon", "candle",
)
_FONT_SIZE = 109  # the one size of the CBDT bitmaps (136 x 128 px glyphs)
_CANVAS = 64  # drawn at 2x, downsampled with antialiasing
_SKIPPED = set(range(0x1F3FB, 0x1F400)) | set(range(0x1F1E6, 0x1F200)) | {0x20E3}  # tones, letters, keycap
_RENDER_FORMAT = "t2i-render-1"  # bump when the drawing changes: old caches are then ignored


@dataclass(frozen=True)
class Concept:
    """One captioned concept: ``source`` (emoji or shapes), ``name`` (CLDR name or shape caption), ``key`` (the
    emoji string, or the shape combination joined by spaces)."""

    source: str
    name: str
    key: str

    @property
    def caption(self) -> str:
        """``a picture of penguin`` for an emoji, ``a small striped red triangle`` for a shape."""
        return emoji_caption(self.name) if self.source == "emoji" else self.name


def emoji_caption(name: str) -> str:
    """The caption of an emoji: ``a picture of <name>``."""
    return f"a picture of {name}"


def parse_sources(text: str) -> tuple[str, ...]:
    """``"emoji,shapes"`` -> ``("emoji", "shapes")``; an unknown caption set is a one-line error."""
    names = tuple(dict.fromkeys(part.strip() for part in str(text).split(",") if part.strip()))
    unknown = [n for n in names if n not in SOURCES]
    if unknown or not names:
        raise LeanfmError(f"unknown caption set '{unknown[0] if unknown else text}'; accepted: "
                          f"{', '.join(SOURCES)} or a comma-separated list of them")
    return names


def _emoji_table() -> dict[str, str]:
    """Readable name -> emoji string, for the fully qualified single-code-point emoji of Emoji <= 12."""
    qualified = emoji_lib.STATUS["fully_qualified"]
    table = {}
    for text, data in emoji_lib.EMOJI_DATA.items():
        points = [ord(c) for c in text if c != "\ufe0f"]
        if (data["status"] != qualified or len(points) != 1 or points[0] in _SKIPPED
                or float(data["E"]) > MAX_EMOJI_VERSION):
            continue
        table[data["en"].strip(":").replace("_", " ").replace("\u2019", "'")] = text
    return table


def held_out_concepts(n: int | None = None) -> list[Concept]:
    """The first ``n`` (default all 40) of :data:`HELD_OUT`, never seen in pretraining."""
    if n is not None and not 1 <= n <= len(HELD_OUT):
        raise LeanfmError(f"{n} held-out concepts asked for; accepted: 1 to {len(HELD_OUT)}")
    table = _emoji_table()
    return [Concept("emoji", name, table[name]) for name in HELD_OUT[:n]]


def _pretraining_emoji() -> list[Concept]:
    """Every pretraining emoji in the fixed seeded order (see the module docstring)."""
    table = _emoji_table()
    banned = {w + plural for name in HELD_OUT for w in name.split() for plural in ("", "s", "es")}
    by_last: dict[str, str] = {}
    for name in sorted(table):
        words = name.lower().split()
        if banned.isdisjoint(words) and words[-1] not in by_last:
            by_last[words[-1]] = name
    names = sorted(by_last.values())
    order = np.random.default_rng(SPLIT_SEED).permutation(len(names))
    return [Concept("emoji", names[i], table[names[i]]) for i in order]


def pretraining_concepts(sources: str | Sequence[str] = "emoji,shapes", emoji_count: int = 200) -> list[Concept]:
    """The concepts a model is pretrained on: the first ``emoji_count`` pretraining emoji, then all 180 shapes."""
    names = parse_sources(sources if isinstance(sources, str) else ",".join(sources))
    concepts: list[Concept] = []
    if "emoji" in names:
        pool = _pretraining_emoji()
        if not 1 <= emoji_count <= len(pool):
            raise LeanfmError(f"emoji_count {emoji_count} is invalid; accepted: 1 to {len(pool)}")
        concepts += pool[:emoji_count]
    if "shapes" in names:
        concepts += [Concept("shapes", shapes.caption(c), " ".join(c)) for c in shapes.all_combinations()]
    return concepts


def check_font(font: str | Path = NOTO_FONT) -> Path:
    """``font`` as a path if it is a readable file; otherwise a one-line error naming the package to install."""
    path = Path(font).expanduser()
    if not path.is_file():
        raise LeanfmError(f"emoji font '{path}' does not exist; install the Debian package {FONT_PACKAGE} "
                          f"('apt-get install {FONT_PACKAGE}') or pass the path of NotoColorEmoji.ttf")
    return path


class _Glyphs:
    """Emoji glyphs of the colour font, drawn once each at the bitmap size and cropped to their ink."""

    def __init__(self, font: Path) -> None:
        try:
            self.font = ImageFont.truetype(str(font), _FONT_SIZE, layout_engine=ImageFont.Layout.BASIC)
        except OSError as err:
            raise LeanfmError(f"emoji font '{font}' cannot be read ({err}); accepted: NotoColorEmoji.ttf from "
                              f"{FONT_PACKAGE}") from None
        self.cache: dict[str, Image.Image] = {}

    def __call__(self, text: str) -> Image.Image:
        if text not in self.cache:
            _, _, right, bottom = self.font.getbbox(text)
            canvas = Image.new("RGBA", (max(1, int(right)), max(1, int(bottom))), (0, 0, 0, 0))
            ImageDraw.Draw(canvas).text((0, 0), text, font=self.font, embedded_color=True)
            box = canvas.getbbox()
            if box is None:
                raise LeanfmError(f"the emoji font draws nothing for '{text}'; accepted: a Noto colour font")
            self.cache[text] = canvas.crop(box)
        return self.cache[text]


def _draw_emoji(glyph: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """The glyph scaled to 55-90% of the canvas at a random position, on a plain background (light, dark or any
    colour, a third each); ``[3, 32, 32]`` uint8."""
    low, high = ((190, 256), (0, 70), (0, 256))[int(rng.integers(3))]
    canvas = Image.new("RGB", (_CANVAS, _CANVAS), tuple(int(v) for v in rng.integers(low, high, 3)))
    scale = rng.uniform(0.55, 0.9) * _CANVAS / max(glyph.size)
    sized = glyph.resize((max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))),
                         Image.Resampling.LANCZOS)
    x, y = (int(rng.integers(0, _CANVAS - n + 1)) for n in sized.size)
    canvas.paste(sized, (x, y), sized)
    small = canvas.resize((IMAGE, IMAGE), Image.Resampling.LANCZOS)
    return np.array(small, dtype=np.uint8).transpose(2, 0, 1)


def _render(concepts: Sequence[Concept], per_concept: int, seed: int, font: Path | None) -> torch.Tensor:
    glyphs = _Glyphs(font) if font is not None else None
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    out = torch.empty(len(concepts), per_concept, 3, IMAGE, IMAGE, dtype=torch.uint8)
    for i, concept in enumerate(concepts):
        for k in range(per_concept):
            if concept.source == "emoji":
                assert glyphs is not None  # a font is checked whenever an emoji is asked for
                out[i, k] = torch.from_numpy(_draw_emoji(glyphs(concept.key), rng))
            else:
                combo = tuple(concept.key.split(" "))
                out[i, k] = (shapes.render(combo, generator) * 255).round().to(torch.uint8)  # type: ignore[arg-type]
    return out


def render_concepts(concepts: Sequence[Concept], per_concept: int, seed: int = 0, font: str | Path = NOTO_FONT,
                    cache: bool = True) -> torch.Tensor:
    """``per_concept`` augmented renders of each concept: uint8 ``[C, per_concept, 3, 32, 32]``.

    The same arguments give the same images (seeded); with ``cache`` they are read from, or written atomically
    to, ``$LEANFM_HOME/t2i``. The font is needed only when ``concepts`` holds an emoji (checked first).
    """
    if per_concept < 1:
        raise LeanfmError(f"per_concept {per_concept} is invalid; accepted: an integer >= 1")
    path = check_font(font) if any(c.source == "emoji" for c in concepts) else None
    stat = path.stat() if path is not None else None
    key = json.dumps([_RENDER_FORMAT, [(c.source, c.name, c.key) for c in concepts], per_concept, seed,
                      [str(path), stat.st_size, int(stat.st_mtime)] if stat is not None else None])
    target = leanfm_home() / "t2i" / f"renders-{hashlib.sha256(key.encode()).hexdigest()[:20]}.safetensors"
    if cache and target.is_file():
        return load_file(str(target))["images"]
    log.info("rendering %d concepts x %d images", len(concepts), per_concept)
    images = _render(concepts, per_concept, seed, path)
    if cache:
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, save({"images": images}, metadata={"key": key}))
    return images


def image_grid(images: torch.Tensor, columns: int = 8, scale: int = 2) -> Image.Image:
    """``[N, 3, H, W]`` in [0, 1] -> one RGB image, ``columns`` per row, 2 px gaps, each enlarged ``scale`` times."""
    n, _, h, w = images.shape
    rows = -(-n // columns)
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    grid = Image.new("RGB", (columns * (w * scale + 2) + 2, rows * (h * scale + 2) + 2), (255, 255, 255))
    for i in range(n):
        tile = Image.fromarray(pixels[i].transpose(1, 2, 0)).resize((w * scale, h * scale), Image.Resampling.NEAREST)
        grid.paste(tile, (2 + (i % columns) * (w * scale + 2), 2 + (i // columns) * (h * scale + 2)))
    return grid


def write_png(image: Image.Image, path: str | Path) -> Path:
    """Write ``image`` as a PNG atomically (the old file or the new one, never half of one)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)
