"""Rendered attribute x object shapes with captions, with whole combinations held out of training.

Why rendered shapes: no captioned image set exists offline, and compositional captions ("a small striped red
triangle") let us hold out whole attribute-object *combinations* from training and test zero-shot whether the
image encoder learned the attributes or memorised the pairs. 2 sizes x 3 textures x 6 colours x 5 shapes = 180
captions; a seeded 20% of the combinations never appear in training. Data only: CWCL (``leanfm.align``) and
compositional prompt tuning read the same images from here; the image encoder is in :mod:`leanfm.models.encoders`.
"""

from __future__ import annotations

import itertools

import torch

SIZES = {"small": 6.0, "large": 11.0}
TEXTURES = ("solid", "striped", "dotted")
COLOURS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.75, 0.2), "blue": (0.15, 0.25, 0.95),
           "yellow": (0.95, 0.9, 0.1), "purple": (0.6, 0.15, 0.75), "orange": (1.0, 0.55, 0.05)}
SHAPES = ("circle", "square", "triangle", "cross", "diamond")
IMAGE = 32


def all_combinations() -> list[tuple[str, str, str, str]]:
    """Every (size, texture, colour, shape) in a fixed order."""
    return list(itertools.product(SIZES, TEXTURES, COLOURS, SHAPES))


def caption(combo: tuple[str, str, str, str]) -> str:
    """``a small striped red triangle``."""
    size, texture, colour, shape = combo
    return f"a {size} {texture} {colour} {shape}"


def split_combinations(seed: int = 0, held_out: float = 0.2) -> tuple[list, list]:
    """(train, held-out) combinations; every attribute value still occurs in training."""
    combos = all_combinations()
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(combos), generator=generator).tolist()
        cut = round(held_out * len(combos))
        test, train = [combos[i] for i in order[:cut]], [combos[i] for i in order[cut:]]
        if all({c[k] for c in train} == {c[k] for c in combos} for k in range(4)):
            return train, test


def split_validation(train: list, fraction: float, seed: int = 0) -> tuple[list, list]:
    """(fit, validation): a seeded ``fraction`` of the *training* combinations held out to choose settings
    (e.g. a loss temperature), so the test combinations of :func:`split_combinations` are never looked at; every
    attribute value still occurs in ``fit``. ``fraction`` 0 returns ``(train, [])``."""
    if fraction <= 0:
        return list(train), []
    generator = torch.Generator().manual_seed(1_000 + seed)  # not split_combinations' draw
    cut = max(1, round(fraction * len(train)))
    for _ in range(1000):
        order = torch.randperm(len(train), generator=generator).tolist()
        validation, fit = [train[i] for i in order[:cut]], [train[i] for i in order[cut:]]
        if all({c[k] for c in fit} == {c[k] for c in train} for k in range(4)):
            return fit, validation
    raise ValueError(f"no validation split of {len(train)} combinations at fraction {fraction} keeps every "
                     "attribute value in training")


def render(combo: tuple[str, str, str, str], generator: torch.Generator) -> torch.Tensor:
    """One ``[3, 32, 32]`` image in [0, 1]: the shape at a jittered position/size on a noisy background."""
    size, texture, colour, shape = combo
    radius = SIZES[size] + float(torch.rand((), generator=generator)) * 1.5 - 0.75
    margin = radius + 1
    cx, cy = (margin + torch.rand(2, generator=generator) * (IMAGE - 2 * margin)).tolist()
    y, x = torch.meshgrid(torch.arange(IMAGE, dtype=torch.float32), torch.arange(IMAGE, dtype=torch.float32),
                          indexing="ij")
    dx, dy = x - cx, y - cy
    if shape == "circle":
        mask = dx**2 + dy**2 <= radius**2
    elif shape == "square":
        mask = (dx.abs() <= radius * 0.85) & (dy.abs() <= radius * 0.85)
    elif shape == "triangle":
        mask = (dy >= -radius) & (dy <= radius) & (dx.abs() <= (dy + radius) / 2)
    elif shape == "cross":
        arm = radius / 3
        mask = ((dx.abs() <= arm) & (dy.abs() <= radius)) | ((dy.abs() <= arm) & (dx.abs() <= radius))
    else:  # diamond
        mask = dx.abs() + dy.abs() <= radius
    if texture == "striped":
        mask = mask & ((y.long() // 2) % 2 == 0)
    elif texture == "dotted":
        mask = mask & ((x.long() % 3 == 0) & (y.long() % 3 == 0) | (x.long() % 3 == 1) & (y.long() % 3 == 1))
    background = 0.35 + 0.1 * torch.rand((), generator=generator) + 0.05 * torch.randn(3, IMAGE, IMAGE,
                                                                                      generator=generator)
    rgb = torch.tensor(COLOURS[colour])[:, None, None] * (0.9 + 0.1 * torch.rand((), generator=generator))
    return torch.where(mask[None], rgb.expand(3, IMAGE, IMAGE), background).clamp(0, 1)


def render_set(combos: list, per_combo: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """``per_combo`` images of each combination: ``[N, 3, 32, 32]`` and their captions."""
    generator = torch.Generator().manual_seed(seed)
    images, captions = [], []
    for combo in combos:
        for _ in range(per_combo):
            images.append(render(combo, generator))
            captions.append(caption(combo))
    return torch.stack(images), captions
