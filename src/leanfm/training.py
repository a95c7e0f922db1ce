"""Shared machinery for the training loops (DISP-LLM's hypernetwork, the ViT, the alignment trainers).

Why one place: every trainer needs the same three guarantees — checkpoints written atomically (a crash or
Ctrl-C never leaves a half-written file), bit-for-bit resume (model, optimizer, step and the RNG state all come
back), and data parallelism with ``torch.distributed`` started from ``torchrun``'s environment (gloo on CPU,
nccl on GPU) so that the same command runs on one process or many.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from leanfm.paths import atomic_directory

log = logging.getLogger(__name__)
STATE_FILE = "state.pt"


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in a data-parallel job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """True on the process that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when gradients must be averaged across processes."""
        return self.world_size > 1

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch (row ``i`` goes to rank ``i % world_size``)."""
        return batch[self.rank :: self.world_size]

    def barrier(self) -> None:
        """Wait for every rank (no-op in one process)."""
        if self.distributed:
            dist.barrier()


def init_distributed() -> DistributedContext:
    """Join the process group that ``torchrun`` describes in the environment, or run alone.

    Backend: nccl when CUDA is available, gloo otherwise (CPU). Safe to call twice.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        log.info("joined %s process group: rank %d of %d", backend, dist.get_rank(), dist.get_world_size())
    return DistributedContext(dist.get_rank(), dist.get_world_size())


def average_gradients(parameters: Any, context: DistributedContext) -> None:
    """All-reduce and average the ``.grad`` of ``parameters`` across ranks (the DDP step, made explicit)."""
    if not context.distributed:
        return
    for param in parameters:
        if param.grad is not None:
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
            param.grad /= context.world_size


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then a cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    done = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, done)))


def save_checkpoint(folder: Path, state: dict[str, Any]) -> None:
    """Replace ``folder`` with one holding ``state.pt`` — atomically (old or new, never partial)."""
    with atomic_directory(folder) as tmp:
        torch.save(state, tmp / STATE_FILE)


def load_checkpoint(folder: Path) -> dict[str, Any] | None:
    """The state saved by :func:`save_checkpoint`, or None when there is none (tensors only, no pickled code)."""
    path = folder / STATE_FILE
    if not path.is_file():
        return None
    return torch.load(path, weights_only=True)
