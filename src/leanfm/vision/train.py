"""Train a small transformers ViT on Fashion-MNIST (the base model for the token-reduction benchmarks).

Patch size 2 on 28x28 images gives 196 patch tokens + 1 class token, the token count of ImageNet ViTs at
224/16, so token reduction has the same room to work. Training checkpoints atomically every
``checkpoint_every`` steps (model, optimizer, schedule position, RNG) and ``resume`` continues from there.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import ViTConfig, ViTForImageClassification

from leanfm.data.images import fashion_mnist, to_pixel_values
from leanfm.errors import LeanfmError
from leanfm.paths import atomic_directory, atomic_write_json
from leanfm.progress import progress
from leanfm.training import load_checkpoint, save_checkpoint, warmup_cosine

log = logging.getLogger(__name__)


@dataclass
class ViTTrainConfig:
    """Model and optimisation settings.

    Measured: the defaults (5 epochs, ~63 min on one CPU thread) reach 81.6% test accuracy; 6 more epochs from
    those weights at lr 1e-3 (``init_from``, ~67 min) reach 84.5%, still short of the ~90% a well-trained small
    ViT gets on Fashion-MNIST: 2x2-pixel tokens leave all spatial aggregation to 4 narrow layers (see
    BENCHMARKS.md, ToFu section).
    """

    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    mlp: int = 256
    patch_size: int = 2  # 14 x 14 = 196 patch tokens, like ViT-B/16 at 224
    epochs: int = 5
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 200
    seed: int = 0
    checkpoint_every: int = 100
    train_limit: int | None = None  # use only the first N training images (tests)
    init_from: str | None = None  # start from a trained model folder (a further run with a fresh schedule)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.hidden_size % self.heads:
            raise LeanfmError("epochs and batch_size must be >= 1 and hidden_size divisible by heads")


def build_vit(config: ViTTrainConfig) -> ViTForImageClassification:
    """A fresh ViT classifier for 1-channel 28x28 images and 10 classes, seeded."""
    vit_config = ViTConfig(
        image_size=28, patch_size=config.patch_size, num_channels=1, hidden_size=config.hidden_size,
        num_hidden_layers=config.layers, num_attention_heads=config.heads, intermediate_size=config.mlp,
        num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(config.seed)
    return ViTForImageClassification(vit_config)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a random shift of up to 2 pixels (zero padding), per image."""
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    padded = nn.functional.pad(images, (2, 2, 2, 2), value=float(images.min()))
    dx, dy = torch.randint(0, 5, (2,), generator=generator).tolist()
    return padded[..., dy : dy + 28, dx : dx + 28]


@torch.no_grad()
def accuracy_and_throughput(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 64) -> dict:
    """Top-1 accuracy and images/s (inference, batches of ``batch_size``) on uint8 ``images``."""
    model.eval()
    correct, seconds = 0, 0.0
    for start in progress(range(0, len(images), batch_size), desc="eval", total=math.ceil(len(images) / batch_size)):
        pixels = to_pixel_values(images[start : start + batch_size])
        tick = time.perf_counter()
        logits = model(pixel_values=pixels).logits
        seconds += time.perf_counter() - tick
        correct += int((logits.argmax(-1) == labels[start : start + batch_size]).sum())
    return {"accuracy": correct / len(images), "images_per_s": len(images) / seconds, "images": len(images)}


def _lr_at(step: int, total: int, config: ViTTrainConfig) -> float:
    return config.lr * warmup_cosine(step, total, config.warmup_steps)


def train_vit(out: Path, config: ViTTrainConfig | None = None, resume: bool = True) -> dict:
    """Train (or resume) and save ``out/model`` (``save_pretrained``) and ``out/metrics.json``; returns metrics."""
    config = config or ViTTrainConfig()
    images, labels = fashion_mnist("train")
    if config.train_limit:
        images, labels = images[: config.train_limit], labels[: config.train_limit]
    model = build_vit(config)
    if config.init_from:
        trained = load_vit(Path(config.init_from))
        shape = ("image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers",
                 "num_attention_heads", "intermediate_size", "num_labels")
        if any(getattr(trained.config, k) != getattr(model.config, k) for k in shape):
            raise LeanfmError(f"--init-from '{config.init_from}' has a different architecture; accepted: a model "
                              "trained with the same layers/width/MLP/patch size")
        model.load_state_dict(trained.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = math.ceil(len(images) / config.batch_size)
    total, step = steps_per_epoch * config.epochs, 0
    checkpoint = out / "checkpoint"
    if resume and (state := load_checkpoint(checkpoint)) is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        step = state["step"]
        log.info("resuming ViT training at step %d of %d", step, total)
    start = time.perf_counter()
    model.train()
    for epoch_step in progress(range(step, total), desc="train vit", total=total - step):
        epoch, index = divmod(epoch_step, steps_per_epoch)
        if index == 0 or epoch_step == step:  # a fresh permutation per epoch, reproducible after resume
            order = torch.randperm(len(images), generator=torch.Generator().manual_seed(config.seed + epoch))
        batch = order[index * config.batch_size : (index + 1) * config.batch_size]
        pixels = augment(to_pixel_values(images[batch]), generator)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(epoch_step, total, config)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(pixel_values=pixels).logits.float(), labels[batch])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {epoch_step}")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (epoch_step + 1) % config.checkpoint_every == 0:
            save_checkpoint(checkpoint, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                         "step": epoch_step + 1, "generator": generator.get_state()})
    test_images, test_labels = fashion_mnist("test")
    metrics = {**accuracy_and_throughput(model, test_images, test_labels), "train_seconds": time.perf_counter() - start,
               "steps": total, "config": asdict(config)}
    stage = {k: metrics[k] for k in ("steps", "train_seconds", "accuracy")} | {"epochs": config.epochs, "lr": config.lr}
    earlier = []
    if config.init_from and (Path(config.init_from) / "metrics.json").is_file():
        before = read_metrics(Path(config.init_from))
        earlier = before.get("stages") or [{k: before[k] for k in ("steps", "train_seconds", "accuracy")}
                                           | {"epochs": before["config"]["epochs"], "lr": before["config"]["lr"]}]
    metrics["stages"] = [*earlier, stage]  # the whole training history when runs continue one another
    with atomic_directory(out / "model") as tmp:
        model.save_pretrained(tmp)
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


def load_vit(folder: Path) -> ViTForImageClassification:
    """Load a trained classifier saved by :func:`train_vit` (``folder`` or ``folder/model``)."""
    path = folder / "model" if (folder / "model" / "config.json").is_file() else folder
    if not (path / "config.json").is_file():
        raise LeanfmError(f"no trained ViT in '{folder}'; run 'leanfm vision train --out {folder}' first")
    return ViTForImageClassification.from_pretrained(path).eval()


def read_metrics(folder: Path) -> dict:
    """The metrics saved beside a trained model."""
    return json.loads((folder / "metrics.json").read_text())
