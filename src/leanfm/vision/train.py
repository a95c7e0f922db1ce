"""Train a small transformers ViT on Fashion-MNIST (the base model for the token-reduction benchmarks).

Patch size 2 on 28x28 images gives 196 patch tokens + 1 class token, the token count of ImageNet ViTs at
224/16, so token reduction has the same room to work. Training runs on the one training loop
(:func:`leanfm.training.fit`): checkpoints in ``OUT.training`` every ``checkpoint_every`` steps and on Ctrl-C
(model, optimizer, step, RNG and the augmentation generator), ``resume`` continues one exactly.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import ViTConfig, ViTForImageClassification

from leanfm.config import MethodConfig, check_at_least, option, register_method
from leanfm.data.images import fashion_mnist, to_pixel_values
from leanfm.errors import LeanfmError
from leanfm.models.artifacts import MANIFEST, read_manifest
from leanfm.paths import atomic_directory
from leanfm.progress import progress
from leanfm.training import (
    DistributedContext,
    Runtime,
    Task,
    checkpoint_path,
    fit,
    prepare_run,
    warmup_cosine_lr,
)
from leanfm.training.options import DEVICE_HELP, check_device_name

log = logging.getLogger(__name__)
DATASETS = ("fashion-mnist",)
IMAGE_SIZE = 28


@dataclass
class ViTTrainConfig(MethodConfig):
    """Model and optimisation settings.

    Measured: the defaults (5 epochs, ~63 min on one CPU thread) reach 81.6% test accuracy; 6 more epochs from
    those weights at lr 1e-3 (``init_from``, ~67 min) reach 84.5%, still short of the ~90% a well-trained small
    ViT gets on Fashion-MNIST: 2x2-pixel tokens leave all spatial aggregation to 4 narrow layers (see
    BENCHMARKS.md, ToFu section).
    """

    RESUMABLE: ClassVar[tuple[str, ...]] = ("epochs", "checkpoint_every", "device", "eval_limit")

    dataset: str = option("fashion-mnist", "training and test images", choices=DATASETS)
    hidden_size: int = option(128, "ViT width")
    layers: int = option(4, "transformer layers")
    heads: int = option(4, "attention heads")
    mlp: int = option(256, "MLP width")
    patch_size: int = option(2, "patch size in pixels (2: 14 x 14 = 196 patch tokens, like ViT-B/16 at 224)")
    epochs: int = option(5, "passes over the training images")
    batch_size: int = option(128, "images per step (global, split across ranks)")
    lr: float = option(2e-3, "peak learning rate (warm-up, then cosine)")
    weight_decay: float = option(0.05, "AdamW weight decay")
    warmup_steps: int = option(200, "warm-up steps")
    seed: int = option(0, "seed of the weights, the epoch orders and the augmentation")
    checkpoint_every: int = option(100, "steps between training checkpoints")
    train_limit: int | None = option(None, "train on the first N training images only")
    eval_limit: int | None = option(None, "measure accuracy on the first N test images only (default: all)")
    init_from: str | None = option(None, "continue from a trained ViT folder with a fresh schedule (one of a "
                                         "depth dividing --layers is grown, function-preserving)")
    autocast: bool = option(True, "bfloat16 autocast where the device runs bf16 natively (false: float32)")
    device: str = option("auto", DEVICE_HELP)

    def validate(self) -> None:
        check_at_least(self, 1, "hidden_size", "layers", "heads", "mlp", "patch_size", "epochs", "batch_size",
                       "checkpoint_every")
        if self.hidden_size % self.heads:
            raise LeanfmError(f"hidden_size {self.hidden_size} is not divisible by heads {self.heads}; "
                              "accepted: a multiple of heads")
        if IMAGE_SIZE % self.patch_size:
            raise LeanfmError(f"patch_size {self.patch_size} does not divide the {IMAGE_SIZE}-pixel images; "
                              "accepted: 1, 2, 4, 7, 14 or 28")
        for name in ("train_limit", "eval_limit"):
            if getattr(self, name) is not None:
                check_at_least(self, 1, name)
        check_device_name(self.device)
        super().validate()


def build_vit(config: ViTTrainConfig) -> ViTForImageClassification:
    """A fresh ViT classifier for 1-channel 28x28 images and 10 classes, seeded."""
    vit_config = ViTConfig(  # type: ignore[call-arg]  # stub lacks **kwargs: num_labels goes to PretrainedConfig
        image_size=IMAGE_SIZE, patch_size=config.patch_size, num_channels=1, hidden_size=config.hidden_size,
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
    """Top-1 accuracy and images/s (inference, batches of ``batch_size``) on uint8 ``images``, on the model's device."""
    model.eval()
    device = next(model.parameters()).device
    correct, seconds = 0, 0.0
    for start in progress(range(0, len(images), batch_size), desc="eval", total=math.ceil(len(images) / batch_size)):
        pixels = to_pixel_values(images[start : start + batch_size]).to(device)
        tick = time.perf_counter()
        logits = model(pixel_values=pixels).logits
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - tick
        correct += int((logits.argmax(-1).cpu() == labels[start : start + batch_size]).sum())
    return {"accuracy": correct / len(images), "images_per_s": len(images) / seconds, "images": len(images)}


def vit_task(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, config: ViTTrainConfig,
             runtime: Runtime) -> tuple[Task, int]:
    """The classifier's part of the training loop, and the total number of steps.

    Each epoch visits the images in a permutation seeded by ``seed + epoch``; the global batch is augmented
    with the checkpointed generator, then split across ranks.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = math.ceil(len(images) / config.batch_size)
    total = steps_per_epoch * config.epochs
    orders: dict[int, torch.Tensor] = {}

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = divmod(step, steps_per_epoch)
        if epoch not in orders:  # a fresh permutation per epoch, the same after a resume
            orders.clear()
            orders[epoch] = torch.randperm(len(images), generator=torch.Generator().manual_seed(config.seed + epoch))
        rows = orders[epoch][index * config.batch_size : (index + 1) * config.batch_size]
        pixels = augment(to_pixel_values(images[rows]), generator)
        return runtime.context.shard(pixels), runtime.context.shard(labels[rows])

    def loss(step: int, pair: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        pixels, target = pair
        with runtime.autocast():
            value = nn.functional.cross_entropy(model(pixel_values=pixels).logits.float(), target)
        if not torch.isfinite(value):
            raise FloatingPointError(f"non-finite loss at step {step}")
        return value, {"loss": float(runtime.context.mean(value))}

    task = Task("train vit", {"model": model}, optimizer, batch, loss,
                lr=warmup_cosine_lr(config.lr, total, config.warmup_steps), generators={"augment": generator},
                log_every=50)
    return task, total


def train_vit(config: ViTTrainConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
              context: DistributedContext | None = None) -> dict[str, Any]:
    """``leanfm vision train``: train (or resume) and save ``out/model`` and ``out/metrics.json``; returns metrics.

    The checkpoint is ``OUT.training`` (:func:`leanfm.training.prepare_run`'s rule); ``out`` is written whole,
    atomically, at the end.
    """
    out = Path(out)
    _refuse_old_checkpoint(out, overwrite)
    runtime = Runtime.for_config(config, context)
    checkpoint = prepare_run(out, resume=resume, overwrite=overwrite, context=runtime.context)
    images, labels = fashion_mnist("train")
    if config.train_limit:
        images, labels = images[: config.train_limit], labels[: config.train_limit]
    model = build_vit(config)
    if config.init_from:
        _load_weights(model, config.init_from)
    task, total = vit_task(model, images, labels, config, runtime)
    result = fit(task, config, runtime, steps=total, checkpoint=checkpoint, resume=resume)
    test_images, test_labels = fashion_mnist("test")
    if config.eval_limit:
        test_images, test_labels = test_images[: config.eval_limit], test_labels[: config.eval_limit]
    metrics = {**accuracy_and_throughput(model, test_images, test_labels), "train_seconds": result.seconds,
               "steps": total, "config": config.to_dict()}
    metrics["stages"] = _stages(config, metrics)
    metrics["history"] = result.history
    if runtime.context.is_main:
        with atomic_directory(out) as tmp:
            model.cpu().save_pretrained(tmp / "model")
            (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    runtime.context.barrier()
    return metrics


def _refuse_old_checkpoint(out: Path, overwrite: bool) -> None:
    """Checkpoints of the trainer before the one training loop lived in ``OUT/checkpoint``: refuse, clearly."""
    if (out / "checkpoint" / "state.pt").is_file() and not overwrite:
        raise LeanfmError(f"'{out / 'checkpoint'}' is a checkpoint of an older leanfm ViT trainer and cannot be "
                          f"resumed (checkpoints now live in '{checkpoint_path(out)}'); pass --overwrite to start over")


def _load_weights(model: ViTForImageClassification, folder: str) -> None:
    """Start from a trained model of the same architecture (a further run with a fresh schedule), or grow a
    shallower one whose depth divides ``layers`` (:func:`grow_layers`)."""
    trained = load_vit(Path(folder))
    shape = ("image_size", "patch_size", "num_channels", "hidden_size", "num_attention_heads", "intermediate_size",
             "num_labels")
    depth, target = trained.config.num_hidden_layers, model.config.num_hidden_layers
    if any(getattr(trained.config, k) != getattr(model.config, k) for k in shape) or target % depth:
        raise LeanfmError(f"--init-from '{folder}' has a different architecture; accepted: a model trained with "
                          f"the same width/MLP/patch size and {target} layers or a divisor of {target}")
    if target == depth:
        model.load_state_dict(trained.state_dict())
    else:
        grow_layers(model, trained)


GROWN_ZERO = ("attention.o_proj", "mlp.fc2")  # a ViT layer's two residual-branch output projections


def grow_layers(model: ViTForImageClassification, trained: ViTForImageClassification) -> None:
    """Function-preserving depth growth: layer ``i`` of the ``d``-layer ``trained`` becomes layers ``i*k .. i*k+k-1``
    of the ``k*d``-layer ``model``; the first is the trained layer, the others are its copies with both residual
    output projections (attention and MLP, weights and biases) set to zero, so each is the identity
    (``h + 0 + 0``) and the grown model computes exactly the trained one's logits at step 0.

    Why: an 8-layer ViT from scratch costs ~19 CPU-hours on this project's 2-core machine (~9 s x 7500 steps);
    growing the committed 4-layer one and training all 8 layers for a few epochs is the shortcut of progressive
    growth (Gong et al. 2019, "Efficient training of BERT by progressively stacking"; the zeroed outputs are the
    function-preserving variant of bert2BERT / Net2Net). The copies' inner weights (attention, MLP input) start
    from the trained layer's, so their outputs get a useful gradient from the first step; our choice, not a
    published recipe for ViT.
    """
    depth, target = trained.config.num_hidden_layers, model.config.num_hidden_layers
    copies = target // depth
    state = {k: v for k, v in trained.state_dict().items() if not k.startswith("vit.layers.")}
    for index, layer in enumerate(trained.vit.layers):
        for copy in range(copies):
            for key, value in layer.state_dict().items():
                zero = copy > 0 and key.rsplit(".", 1)[0] in GROWN_ZERO
                state[f"vit.layers.{index * copies + copy}.{key}"] = torch.zeros_like(value) if zero else value
    model.load_state_dict(state)


def _stages(config: ViTTrainConfig, metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """The whole training history when runs continue one another (``init_from``): earlier stages, then this one."""
    stage = {k: metrics[k] for k in ("steps", "train_seconds", "accuracy")} | {"epochs": config.epochs, "lr": config.lr}
    earlier: list[dict[str, Any]] = []
    if config.init_from and any((Path(config.init_from) / f).is_file() for f in ("metrics.json", MANIFEST)):
        before = read_metrics(Path(config.init_from))
        earlier = before.get("stages") or [{k: before[k] for k in ("steps", "train_seconds", "accuracy")}
                                           | {"epochs": before["config"]["epochs"], "lr": before["config"]["lr"]}]
    return [*earlier, stage]


def load_vit(folder: str | Path) -> ViTForImageClassification:
    """Load a trained classifier saved by :func:`train_vit` (``folder`` or ``folder/model``), in float32.

    bf16 artifacts (:mod:`leanfm.models.artifacts`) are upcast, so every ViT runs in the same precision.
    """
    folder = Path(folder)
    path = folder / "model" if (folder / "model" / "config.json").is_file() else folder
    if not (path / "config.json").is_file():
        raise LeanfmError(f"no trained ViT in '{folder}'; run 'leanfm vision train --out {folder}' first")
    return ViTForImageClassification.from_pretrained(path, dtype=torch.float32).eval()


def read_metrics(folder: str | Path) -> dict:
    """The metrics saved beside a trained model (``metrics.json``), or a committed artifact's manifest."""
    folder = Path(folder)
    if not (folder / "metrics.json").is_file() and (folder / MANIFEST).is_file():
        return read_manifest(folder)
    return json.loads((folder / "metrics.json").read_text())


register_method("vit", "train", ViTTrainConfig, train_vit,
                description="a small ViT on Fashion-MNIST, the base model of the token-reduction benchmarks")
