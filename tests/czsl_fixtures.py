"""A tiny CZSL dataset in the exact public layout and a tiny frozen base model, written by tests.

The dataset: attributes = 3 colours, objects = 3 shapes (rendered by :mod:`leanfm.data.shapes`), 6 seen pairs,
one unseen pair in val and two in test; 4 images per pair and split. The base: the seeded random 2-layer BERT
(``tiny-bert``, 32 wide) and a 2-layer ViT image tower projecting to 32, saved as an aligned-tower folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from leanfm.data import shapes
from leanfm.models.encoders import ImageEncoder, save_tower

ATTRS = ("red", "green", "blue")
OBJS = ("circle", "square", "triangle")
TRAIN = [("red", "circle"), ("red", "square"), ("green", "square"), ("green", "triangle"), ("blue", "circle"),
         ("blue", "triangle")]
VAL = [("red", "circle"), ("green", "triangle"), ("red", "triangle")]  # unseen: red triangle
TEST = [("green", "square"), ("blue", "circle"), ("green", "circle"), ("blue", "square")]  # unseen: the last two
SPLIT_DIR = "compositional-split-natural"
METADATA = "metadata_compositional-split-natural.t7"


def make_czsl(root: Path, per_pair: int = 4) -> Path:
    """Write the dataset under ``root`` (images/<attr>_<obj>/<split>_<k>.png, pair files, torch-saved metadata)."""
    generator = torch.Generator().manual_seed(0)
    (root / SPLIT_DIR).mkdir(parents=True, exist_ok=True)
    metadata = []
    for split, pairs in (("train", TRAIN), ("val", VAL), ("test", TEST)):
        (root / SPLIT_DIR / f"{split}_pairs.txt").write_text("".join(f"{a} {o}\n" for a, o in pairs))
        for attr, obj in pairs:
            folder = root / "images" / f"{attr}_{obj}"
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(per_pair):
                image = shapes.render(("large", "solid", attr, obj), generator)  # [3, 32, 32] in [0, 1]
                pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{split}_{k}.png")
                metadata.append({"image": f"{attr}_{obj}/{split}_{k}.png", "attr": attr, "obj": obj, "set": split})
    metadata.append({"image": "red_circle/train_0.png", "attr": "NA", "obj": "circle", "set": "train"})  # skipped
    torch.save(metadata, root / METADATA)
    return root


def make_base(folder: Path, logit_scale: float = 10.0, seed: int = 0) -> Path:
    """A random image tower for ``tiny-bert`` saved as an aligned-tower folder (what ``czsl pretrain`` writes)."""
    torch.manual_seed(seed)
    tower = ImageEncoder(out_dim=32, hidden=16, layers=2, heads=2, image_size=32)
    return save_tower(folder, tower, {"kind": "image", "frozen": "tiny-bert", "logit_scale": logit_scale})
