"""Train one encoder into a frozen encoder's embedding space (LiT-style), with CWCL or the CLIP loss.

Either tower can be the frozen one: the trainer only sees the trainable encoder and the frozen side's
embeddings of every training pair, computed once (the frozen tower never changes, so re-running it every step
would be wasted work). The loop is :func:`leanfm.training.fit`: data parallel under torchrun (each rank encodes
its rows of a seeded global batch, the loss gathers every rank's rows with gradients —
:func:`leanfm.align.cwcl.gather` — and gradients are averaged, so N processes take the same steps as one
process), atomic checkpoints and exact resume (step-seeded batches, the dropout RNG saved).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leanfm.align.cwcl import LOSSES, ContrastiveLoss
from leanfm.config import MethodConfig, check_at_least, option
from leanfm.errors import LeanfmError
from leanfm.training import DistributedContext, Runtime, Task, fit, warmup_cosine_lr
from leanfm.training.options import DEVICE_HELP, check_device_name


@dataclass
class AlignConfig(MethodConfig):
    """Optimisation settings shared by the speech and image alignments."""

    loss: str = option("cwcl", "cwcl or clip (the baseline)", choices=LOSSES)
    other: str = option("cwcl", "CWCL's frozen->trainable direction: cwcl or clip (METHODS.md: unsure)",
                        choices=LOSSES)
    weight_power: float = option(1.0, "raise CWCL's weights to this power (1 = the paper's; >1 sharpens, "
                                      "see BENCHMARKS.md)")
    steps: int = option(1500, "training steps")
    batch_size: int = option(128, "global batch of training pairs, split across ranks")
    lr: float = option(1e-3, "peak learning rate (warm-up, then cosine)")
    weight_decay: float = option(0.05, "AdamW weight decay")
    warmup: int = option(100, "warm-up steps")
    tau: float = option(0.07, "temperature of the contrastive loss (its initial value when learned)")
    learn_tau: bool = option(True, "learn the temperature (CLIP's logit scale); off: fixed at --tau")
    tau_lr: float = option(0.0, "learning rate of the temperature's log-scale, in its own group without weight "
                                "decay; 0 = the encoder's rate")
    seed: int = option(0, "seed of the batches (and of the data the pipelines build)")
    checkpoint_every: int = option(250, "steps between training checkpoints")
    device: str = option("auto", DEVICE_HELP)

    def validate(self) -> None:
        if self.loss not in LOSSES or self.other not in LOSSES:
            raise LeanfmError(f"unknown loss '{self.loss}'/'{self.other}'; accepted: {', '.join(LOSSES)}")
        if not self.weight_power > 0:
            raise LeanfmError(f"weight power {self.weight_power} is invalid; accepted: a number > 0")
        check_at_least(self, 1, "steps", "batch_size", "checkpoint_every")
        if not self.tau > 0 or self.tau_lr < 0:
            raise LeanfmError(f"tau {self.tau}, tau lr {self.tau_lr}: accepted tau > 0 and tau lr >= 0")
        check_device_name(self.device)
        super().validate()


Inputs = Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]]


def train_aligned(encoder: nn.Module, inputs: Inputs, targets: torch.Tensor, config: AlignConfig,
                  checkpoint: Path | None = None, resume: bool = False,
                  context: DistributedContext | None = None) -> dict[str, Any]:
    """Train ``encoder`` so that ``encoder(*inputs(rows))`` matches the frozen embeddings ``targets[rows]``.

    ``inputs`` maps a LongTensor of example indices to the encoder's input tensor(s), on the CPU (the loop moves
    them to ``config.device``; the encoder returns to its own device afterwards). Returns steps, seconds and the
    loss curve.
    """
    runtime = Runtime.for_config(config, context)
    world = runtime.context.world_size
    if config.batch_size % world:
        raise LeanfmError(f"batch size {config.batch_size} must be divisible by the {world} processes")
    loss_fn = ContrastiveLoss(config.loss, config.tau, config.other, learn_tau=config.learn_tau,
                              power=config.weight_power)
    # The log-scale is a temperature, not a weight: no decay pulling it towards τ = 1, and its own rate if asked.
    groups: list[dict[str, Any]] = [{"params": list(encoder.parameters())},
              {"params": list(loss_fn.parameters()), "weight_decay": 0.0,
               "lr_scale": config.tau_lr / config.lr if config.tau_lr else 1.0}]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    count = targets.shape[0]

    def batch(step: int) -> tuple[Any, torch.Tensor]:
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        rows = runtime.context.shard(torch.randperm(count, generator=generator)[: config.batch_size])
        return inputs(rows), targets[rows]

    def loss(_step: int, pair: tuple[Any, torch.Tensor]) -> tuple[torch.Tensor, Callable[[], dict[str, float]]]:
        x, q = pair
        value = loss_fn(encoder(*x) if isinstance(x, tuple) else encoder(x), q)
        return value, lambda: {"loss": float(value.detach()), "tau": float(loss_fn.tau.detach())}  # tau: updated

    task = Task(f"align {config.loss}", {"encoder": encoder, "loss": loss_fn}, optimizer, batch, loss,
                lr=warmup_cosine_lr(config.lr, config.steps, config.warmup), log_every=50)
    origin = next(encoder.parameters()).device
    result = fit(task, config, runtime, checkpoint=checkpoint, resume=resume)
    encoder.to(origin)  # trained on config.device; handed back where it came from (evaluation reads CPU data)
    return {"steps": result.step, "seconds": result.seconds, "world_size": world, "device": str(runtime.device),
            "history": result.history}

