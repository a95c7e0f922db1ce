"""Train one encoder into a frozen encoder's embedding space (LiT-style), with CWCL or the CLIP loss.

Either tower can be the frozen one: the trainer only sees the trainable encoder and the frozen side's
embeddings of every training pair, computed once (the frozen tower never changes, so re-running it every step
would be wasted work). Data parallel under torchrun: each rank encodes its rows of a seeded global batch, the
loss gathers every rank's rows with gradients (:func:`leanfm.align.cwcl.gather`) and gradients are averaged, so
N processes take the same steps as one process with the same global batch. Checkpoints are atomic and resume is
exact (step-seeded batches, dropout RNG saved).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leanfm.align.cwcl import LOSSES, ContrastiveLoss
from leanfm.errors import LeanfmError
from leanfm.progress import progress
from leanfm.training import (
    DistributedContext,
    average_gradients,
    load_checkpoint,
    save_checkpoint,
    warmup_cosine,
)

log = logging.getLogger(__name__)


@dataclass
class AlignConfig:
    """Optimisation settings shared by the speech and image alignments."""

    loss: str = "cwcl"
    other: str = "cwcl"  # the frozen->trainable direction of CWCL: cwcl or clip (METHODS.md: unsure)
    weight_power: float = 1.0  # CWCL weights ** power (1 = the paper's; see align/cwcl.py)
    steps: int = 1500
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int = 100
    tau: float = 0.07
    seed: int = 0
    checkpoint_every: int = 250

    def __post_init__(self) -> None:
        if self.loss not in LOSSES or self.other not in LOSSES:
            raise LeanfmError(f"unknown loss '{self.loss}'/'{self.other}'; accepted: {', '.join(LOSSES)}")
        if not self.weight_power > 0:
            raise LeanfmError(f"weight power {self.weight_power} is invalid; accepted: a number > 0")
        for name in ("steps", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise LeanfmError(f"{name} {getattr(self, name)} is invalid; accepted: an integer >= 1")


def train_aligned(encoder: nn.Module, encode: Callable[[nn.Module, torch.Tensor], torch.Tensor],
                  targets: torch.Tensor, config: AlignConfig, checkpoint: Path | None = None, resume: bool = False,
                  context: DistributedContext | None = None) -> dict[str, Any]:
    """Train ``encoder`` so that ``encode(encoder, rows)`` matches the frozen embeddings ``targets[rows]``.

    ``encode`` turns a LongTensor of example indices into trainable-tower embeddings ``[len(rows), d]``.
    Returns steps, seconds and the loss curve.
    """
    context = context or DistributedContext()
    loss_fn = ContrastiveLoss(config.loss, config.tau, config.other, power=config.weight_power)
    params = list(encoder.parameters()) + list(loss_fn.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    step, history, seconds = 0, [], 0.0
    if resume and checkpoint is not None and (state := load_checkpoint(checkpoint)) is not None:
        if state["config"] != asdict(config) | {"steps": state["config"]["steps"]}:
            raise LeanfmError(f"checkpoint in '{checkpoint}' was trained with other settings; use the same ones "
                              "or --overwrite")
        encoder.load_state_dict(state["encoder"])
        loss_fn.load_state_dict(state["loss"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        step, history, seconds = state["step"], state["history"], state["seconds"]

    def save() -> None:
        if checkpoint is not None and context.is_main:
            save_checkpoint(checkpoint, {"encoder": encoder.state_dict(), "loss": loss_fn.state_dict(),
                                         "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
                                         "step": step, "history": history, "seconds": seconds,
                                         "config": asdict(config)})

    if config.batch_size % context.world_size:
        raise LeanfmError(f"batch size {config.batch_size} must be divisible by the {context.world_size} processes")
    count = targets.shape[0]
    encoder.train()
    try:
        for _ in progress(range(step, config.steps), desc=f"align {config.loss}", total=config.steps - step):
            tick = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = config.lr * warmup_cosine(step, config.steps, config.warmup)
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
            rows = torch.randperm(count, generator=generator)[: config.batch_size]
            local = context.shard(rows)
            loss = loss_fn(encode(encoder, local), targets[local])
            loss.backward()
            average_gradients(params, context)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            seconds += time.perf_counter() - tick
            history.append({"step": step, "loss": float(loss.detach()), "tau": float(loss_fn.tau.detach())})
            if step % 50 == 0:
                log.info("align step %d loss %.4f tau %.4f", step, history[-1]["loss"], history[-1]["tau"])
            if step % config.checkpoint_every == 0:
                save()
    except KeyboardInterrupt:
        save()
        raise
    save()
    encoder.eval()
    return {"steps": step, "seconds": seconds, "history": history}

