"""Shared fixtures: fixed threads, quiet progress, and cached tiny models."""

from __future__ import annotations

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
