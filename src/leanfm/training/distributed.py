"""Data parallelism with ``torch.distributed``, started from ``torchrun``'s environment.

Why explicit: every trainer takes the same global batch on every rank and keeps every ``world_size``-th row,
then averages gradients, so N processes follow the one-process loss curve step for step. Rank and world size
are plain values (:class:`DistributedContext`), so one process needs no process group at all.

The backend follows the device the tensors live on (:func:`leanfm.device.distributed_backend`): gloo for CPU
tensors, nccl only for CUDA tensors — choosing nccl because a GPU exists, while the tensors stay on the CPU,
fails at the first all-reduce.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from leanfm.device import distributed_backend, resolve_device
from leanfm.errors import LeanfmError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in a data-parallel job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """True on the process that writes files and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when gradients must be averaged across processes."""
        return self.world_size > 1

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch (row ``i`` goes to rank ``i % world_size``).

        A batch with fewer rows than ranks is a one-line error: a rank with an empty shard would average a NaN
        loss into everyone's gradients (or hang waiting in a collective the others never reach).
        """
        if batch.shape[0] < self.world_size:
            raise LeanfmError(f"batch of {batch.shape[0]} rows cannot be shared by {self.world_size} processes; "
                              f"accepted: a batch size >= the number of processes ({self.world_size})")
        return batch[self.rank :: self.world_size]

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` averaged over ranks (a detached copy; itself in one process)."""
        value = value.detach().clone()
        if self.distributed:
            dist.all_reduce(value)
            value /= self.world_size
        return value

    def barrier(self) -> None:
        """Wait for every rank (no-op in one process)."""
        if self.distributed:
            dist.barrier()


def init_distributed(device: str | torch.device) -> DistributedContext:
    """Join the process group ``torchrun`` describes in the environment, or run alone.

    ``device`` is where the job's tensors will live; it alone picks the backend (gloo for CPU, nccl for CUDA).
    Safe to call twice.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    if not dist.is_initialized():
        backend = distributed_backend(resolve_device(device))
        if backend == "nccl":  # one GPU per rank; nccl's own collectives (barrier) use the current device
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
        log.info("joined %s process group: rank %d of %d", backend, dist.get_rank(), dist.get_world_size())
    return DistributedContext(dist.get_rank(), dist.get_world_size())


def local_device(device: torch.device, context: DistributedContext) -> torch.device:
    """This rank's device: ``cuda`` without an index means GPU ``LOCAL_RANK`` under torchrun (one GPU per rank)."""
    if device.type != "cuda" or device.index is not None or not context.distributed:
        return device
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def average_gradients(parameters: Iterable[torch.nn.Parameter], context: DistributedContext) -> None:
    """All-reduce and average the ``.grad`` of ``parameters`` across ranks (the DDP step, made explicit)."""
    if not context.distributed:
        return
    for param in parameters:
        if param.grad is not None:
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
            param.grad /= context.world_size
