"""The one training loop every trainer uses, with its checkpoint layout, resume rule and data parallelism.

- :func:`fit` runs a :class:`Task` (a method's step function) on a :class:`Runtime` (device, autocast, rank);
- :func:`prepare_run` applies the resume/overwrite rule to ``OUT`` and its checkpoint ``OUT.training``;
- :func:`commit_checkpoint` / :func:`restore_committed` carry a checkpoint across machines (``artifacts/``);
- :class:`TrainingInterrupted` is the Ctrl-C that saved a checkpoint first;
- :func:`init_distributed` joins torchrun's process group with the backend the device needs.
"""

from leanfm.training.checkpoint import (
    STATE_FILE,
    TrainingInterrupted,
    checkpoint_path,
    commit_checkpoint,
    load_checkpoint,
    prepare_run,
    restore_committed,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from leanfm.training.distributed import DistributedContext, average_gradients, init_distributed, local_device
from leanfm.training.loop import FitResult, Runtime, Task, fit, warmup_cosine, warmup_cosine_lr

__all__ = [
    "STATE_FILE",
    "DistributedContext",
    "FitResult",
    "Runtime",
    "Task",
    "TrainingInterrupted",
    "average_gradients",
    "checkpoint_path",
    "commit_checkpoint",
    "fit",
    "init_distributed",
    "load_checkpoint",
    "local_device",
    "prepare_run",
    "restore_committed",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "warmup_cosine",
    "warmup_cosine_lr",
]
