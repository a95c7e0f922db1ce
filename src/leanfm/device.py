"""Which device a command runs on, the autocast that goes with it, and the matching process-group backend.

Why one place: three trainers used to hard-code ``torch.autocast("cpu", ...)`` and the distributed set-up picked
nccl whenever CUDA existed, even when every tensor stayed on the CPU. The rule here is the only one: the backend
follows the device the tensors live on (nccl only for CUDA tensors, gloo otherwise), and autocast follows the
device too.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from leanfm.errors import LeanfmError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; one-line error otherwise."""
    if isinstance(name, torch.device):
        return name
    text = (name or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise LeanfmError(f"device '{name}' is not available (no CUDA on this machine); accepted: auto, cpu")
        device = torch.device(text)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise LeanfmError(f"device '{name}' does not exist; this machine has {torch.cuda.device_count()} GPU(s)")
        return device
    raise LeanfmError(f"unknown device '{name}'; accepted: auto, cpu, cuda, cuda:N")


def autocast(device: torch.device, enabled: bool = True, dtype: torch.dtype = torch.bfloat16) -> Any:
    """``torch.autocast`` for ``device``'s type (bf16 by default), or a no-op context when disabled."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def distributed_backend(device: torch.device) -> str:
    """nccl for CUDA tensors, gloo for everything else (CPU tensors never go through nccl)."""
    return "nccl" if device.type == "cuda" else "gloo"


def fast_bfloat16(device: torch.device) -> bool:
    """Whether bfloat16 matmuls run natively here: CUDA with bf16 support, or a CPU with AVX512-BF16 / AMX.

    Why: on such CPUs a bfloat16 forward of SmolLM2 measured ~2.7x faster than float32 and a few-row matmul
    costs about one row; without them PyTorch emulates bf16 and it is slower than float32.
    """
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def decode_dtype(name: str, device: torch.device) -> str:
    """``auto`` -> ``bfloat16`` where :func:`fast_bfloat16`, else ``float32``; other names pass through."""
    if name == "auto":
        return "bfloat16" if fast_bfloat16(device) else "float32"
    return name
