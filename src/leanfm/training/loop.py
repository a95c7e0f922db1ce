"""The one training loop: every trainer hands :func:`fit` a :class:`Task` (its step function) and nothing else.

Why one loop: the rules that make long runs safe — where tensors live, autocast for that device, gradient
averaging across ranks, the learning-rate schedule, atomic checkpoints with the RNG state, exact resume, Ctrl-C
that saves before it stops — were written four times and disagreed. Here they are written once; a method
supplies what is its own: the trainable modules, the optimizer, a seeded batch per step and the loss of a batch
("one loop, many step functions").

A step of :func:`fit` is::

    lr <- task.lr(step);  batch <- to_device(task.batch(step));  loss, record <- task.loss(step, batch)
    loss.backward();  average gradients over ranks;  optimizer.step();  history += {"step": step + 1, **record}

Exact resume: batches are drawn from generators seeded by ``(seed, step)`` or saved in the checkpoint
(``task.generators``), and torch's RNG is saved too, so a resumed run takes the steps an uninterrupted run takes.
The checkpoint always describes a step boundary: the RNG state is captured at each boundary, and Ctrl-C arriving
while the optimizer updates is held until the update is complete.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leanfm.config import MethodConfig
from leanfm.device import autocast as device_autocast
from leanfm.device import fast_bfloat16, resolve_device
from leanfm.errors import LeanfmError
from leanfm.progress import progress
from leanfm.training.checkpoint import (
    FORMAT,
    TrainingInterrupted,
    check_layout,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from leanfm.training.distributed import DistributedContext, average_gradients, init_distributed, local_device

log = logging.getLogger(__name__)
Record = dict[str, Any] | Callable[[], dict[str, Any]]


@dataclass(frozen=True)
class Runtime:
    """Where a run's tensors live (``device``), its place in a data-parallel job, and whether to autocast."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    context: DistributedContext = field(default_factory=DistributedContext)
    amp: bool = False

    @classmethod
    def for_config(cls, config: Any, context: DistributedContext | None = None) -> Runtime:
        """From ``config.device`` (default auto) and ``config.autocast`` (default off); joins torchrun's group.

        ``autocast`` is honoured only where bfloat16 runs natively (:func:`leanfm.device.fast_bfloat16`): on a CPU
        without AVX512-BF16/AMX PyTorch emulates it, and a bf16-autocast Linear measured ~10x slower than float32
        on an AVX2 machine (576 -> 1536, 512 rows, one thread: 494-545 ms vs 42-83 ms), so there the run trains
        in float32 and says so once.
        """
        device = resolve_device(getattr(config, "device", "auto"))
        context = context or init_distributed(device)
        local = local_device(device, context)
        amp = bool(getattr(config, "autocast", False))
        if amp and not fast_bfloat16(local):
            log.info("bfloat16 is emulated on %s (no AVX512-BF16/AMX): training in float32", local)
            amp = False
        return cls(local, context, amp)

    def autocast(self) -> Any:
        """bfloat16 autocast for this device's type when enabled (a no-op context otherwise)."""
        return device_autocast(self.device, self.amp)

    def to_device(self, batch: Any) -> Any:
        """``batch`` with every tensor (in tuples, lists and dicts too) moved to the device."""
        if isinstance(batch, torch.Tensor):
            return batch.to(self.device)
        if isinstance(batch, tuple | list):
            return type(batch)(self.to_device(x) for x in batch)
        if isinstance(batch, dict):
            return {k: self.to_device(v) for k, v in batch.items()}
        return batch


@dataclass
class Task:
    """One trainer's part of the loop.

    ``modules``: the trainable modules by name (their state is checkpointed); ``frozen``: modules that run but do
    not learn (moved to the device, put in eval mode, gradients off). ``batch(step)`` builds this rank's batch
    on the CPU from seeded generators; ``loss(step, batch)`` gets it on the device and returns the loss to
    minimise and a record of plain numbers for the history — or a callable giving the record after the optimizer
    step, for values the update changes. ``lr(step)``: the learning rate of ``step`` (None keeps the optimizer's).
    ``generators``: the trainer's own generators whose state must survive a resume. A parameter group of the
    optimizer with an ``lr_scale`` entry gets ``lr(step) * lr_scale``.
    """

    name: str
    modules: dict[str, nn.Module]
    optimizer: torch.optim.Optimizer
    batch: Callable[[int], Any]
    loss: Callable[[int, Any], tuple[torch.Tensor, Record]]
    lr: Callable[[int], float] | None = None
    frozen: tuple[nn.Module, ...] = ()
    generators: dict[str, torch.Generator] = field(default_factory=dict)
    log_every: int = 1


@dataclass
class FitResult:
    """Where a run ended: steps done, the history of records, seconds spent training (over all resumes)."""

    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from: int | None = None  # the checkpoint's step when the run continued one


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then a cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    done = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, done)))


def warmup_cosine_lr(lr: float, total: int, warmup: int) -> Callable[[int], float]:
    """``lr(step)``: linear warm-up over ``warmup`` steps, then a cosine decay to 0 at ``total``."""
    return lambda step: lr * warmup_cosine(step, total, warmup)


def fit(task: Task, config: MethodConfig, runtime: Runtime, *, steps: int | None = None,
        checkpoint: Path | None = None, resume: bool = False) -> FitResult:
    """Train ``task`` up to ``steps`` (default ``config.steps``), checkpointing every ``config.checkpoint_every``.

    With ``resume`` and a checkpoint in ``checkpoint``, continue it (its settings must match ``config``'s
    fingerprint). Ctrl-C saves the checkpoint, then raises :class:`TrainingInterrupted`.
    """
    total = getattr(config, "steps", None) if steps is None else steps
    if total is None:
        raise LeanfmError(f"{type(config).__name__} has no steps setting; pass steps= to fit")
    _place(task, runtime.device)
    result = FitResult()
    if resume and checkpoint is not None and (state := load_checkpoint(checkpoint)) is not None:
        _restore(task, config, runtime, state, checkpoint, result)
        log.info("resuming %s at step %d of %d", task.name, result.step, total)
    _loop(task, config, runtime, total, checkpoint, result)
    for module in task.modules.values():
        module.eval()
    return result


def _place(task: Task, device: torch.device) -> None:
    """Move every module to ``device``; the optimizer is pointed at the moved parameters.

    ``Module.to`` keeps a parameter object for some moves (CPU -> CUDA) and makes a new one for others (-> meta,
    or with ``torch.__future__``'s overwrite flag), so the optimizer the trainer built is remapped either way.
    """
    for module in task.frozen:
        module.requires_grad_(False)
        module.to(device).eval()
    moved: dict[int, nn.Parameter] = {}
    for module in task.modules.values():
        before = list(module.parameters())
        module.to(device).train()
        moved.update({id(old): new for old, new in zip(before, module.parameters(), strict=True)})
    for group in task.optimizer.param_groups:
        group["params"] = [moved.get(id(p), p) for p in group["params"]]


def _restore(task: Task, config: MethodConfig, runtime: Runtime, state: dict[str, Any], folder: Path,
             result: FitResult) -> None:
    check_layout(state, folder)
    config.check_resume(state["fingerprint"], where=f"training checkpoint '{folder}'")
    for name, module in task.modules.items():
        module.load_state_dict(state["modules"][name])
    task.optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"], runtime.device, task.generators)
    result.step, result.history, result.seconds = state["step"], state["history"], state["seconds"]
    result.resumed_from = state["step"]


def _state(task: Task, config: MethodConfig, result: FitResult, rng: dict[str, Any]) -> dict[str, Any]:
    return {"format": FORMAT, "modules": {name: m.state_dict() for name, m in task.modules.items()},
            "optimizer": task.optimizer.state_dict(), "step": result.step, "history": result.history,
            "seconds": result.seconds, "rng": rng, "fingerprint": config.fingerprint(), "config": config.to_dict()}


def _loop(task: Task, config: MethodConfig, runtime: Runtime, total: int, checkpoint: Path | None,
          result: FitResult) -> None:
    def save(rng: dict[str, Any]) -> None:
        if checkpoint is not None and runtime.context.is_main:
            save_checkpoint(checkpoint, _state(task, config, result, rng))

    every = getattr(config, "checkpoint_every", 0) or total
    boundary = rng_state(runtime.device, task.generators)  # the RNG at the step the history has reached
    try:
        for _ in progress(range(result.step, total), desc=task.name, total=total - result.step):
            tick = time.perf_counter()
            record = _forward_backward(task, runtime, result.step)
            with _held_interrupt():
                task.optimizer.step()
                task.optimizer.zero_grad(set_to_none=True)
                values = record() if callable(record) else record
                result.step += 1
                result.seconds += time.perf_counter() - tick
                result.history.append({"step": result.step, **values})
                boundary = rng_state(runtime.device, task.generators)
            _log(task, runtime, result, total)
            if result.step % every == 0:
                save(boundary)
    except KeyboardInterrupt as interrupt:
        save(boundary)
        raise TrainingInterrupted(checkpoint, result.step) from interrupt
    save(boundary)


def _forward_backward(task: Task, runtime: Runtime, step: int) -> Record:
    """Set the step's learning rate, compute its loss on the device, backpropagate and average gradients."""
    if task.lr is not None:
        rate = task.lr(step)
        for group in task.optimizer.param_groups:
            group["lr"] = rate * group.get("lr_scale", 1.0)  # a group may train faster or slower than the rest
    batch = runtime.to_device(task.batch(step))
    loss, record = task.loss(step, batch)
    loss.backward()
    average_gradients((p for group in task.optimizer.param_groups for p in group["params"]), runtime.context)
    return record


def _log(task: Task, runtime: Runtime, result: FitResult, total: int) -> None:
    if not runtime.context.is_main or result.step % task.log_every:
        return
    values = " ".join(f"{k} {_fmt(v)}" for k, v in result.history[-1].items() if k != "step")
    log.info("%s step %d/%d %s", task.name, result.step, total, values)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list | tuple):
        return " ".join(_fmt(v) for v in value)
    return str(value)


@contextlib.contextmanager
def _held_interrupt() -> Iterator[None]:
    """Hold Ctrl-C until the block ends, then raise it: an optimizer update is never cut in half.

    Only where Python's own Ctrl-C handler is installed (the main thread; not when SIGINT is ignored, as in a
    background job, or handled by someone else); elsewhere this is a no-op.
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    pending: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, _frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if pending:
        raise KeyboardInterrupt
