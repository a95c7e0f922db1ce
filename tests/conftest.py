"""Shared fixtures: fixed threads, quiet progress, and cached tiny models."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch

from leanfm.progress import set_quiet

torch.set_num_threads(2)
set_quiet(True)

TINY = ("tiny-llama", "tiny-opt", "tiny-phi", "tiny-neox")


@pytest.fixture(scope="session")
def tokenizer():
    from leanfm.models.registry import smollm2_tokenizer

    return smollm2_tokenizer()


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M in float32 (loaded once per session)."""
    from leanfm import load_model

    return load_model("smollm2-135m")


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh $LEANFM_HOME, so caches written by the test (renders, synthesised speech) are its own."""
    monkeypatch.setenv("LEANFM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def ctrl_c_fit(real_fit: Callable, step: int, call: int | None = None) -> Callable:
    """A stand-in for ``leanfm.training.fit`` that raises KeyboardInterrupt inside the loss of step ``step`` (as a
    real Ctrl-C arrives mid-step) — in the ``call``-th run of the patched module's ``fit``, or in any run when
    ``call`` is None. Patch it over the module's own ``fit`` name."""
    calls: list[str] = []

    def fit(task: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(task.name)

        def loss(at: int, batch: Any) -> Any:
            if at == step and call in (None, len(calls)):
                raise KeyboardInterrupt
            return task.loss(at, batch)

        return real_fit(dataclasses.replace(task, loss=loss), *args, **kwargs)

    return fit
